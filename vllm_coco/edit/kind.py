"""What an edit kind is (docs/METHOD.md §6): a name, its parameters, and its effect as data.

Every linear kind acts on the selected q/k/v channels of an attention layer the same way,

    h_n <- gain_n * h_n + offset_n      (the other channels unchanged: gain 1, offset 0)

so a kind only says how to compute (gain, offset) for a module's selected neurons from their edit
weights w_n and calibration means (`effect`). The executors run any kind from those tables alone:
`coco-tools bake` folds them into the weight and bias rows (edit/bake.py), the in-memory conditions
apply them per batch row (edit/conditions.py), and an NE directory carries them as named edits that
vLLM serves per request (`coco-tools ne --with KIND`, serve/vllm_models.py). The built-in kinds are
edit/kinds/*.py; edit/registry.py lists them and takes new ones (docs/EXTENDING.md). The NE gate
is the one nonlinear kind (GateKind: its parameters here, its formula edit/gate.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from vllm_coco.core.checks import finite
from vllm_coco.core.errors import CocoError


@dataclass(frozen=True)
class Param:
    """One number a kind takes (`coco-tools bake --alpha`, the sweep's grid)."""

    name: str  # the keyword (`alpha`); its CLI option is --NAME
    default: float
    help: str
    lo: float | None = None  # the range a sweep may ask for (the config checks it before any run)
    hi: float | None = None
    lo_open: bool = False  # lo itself is out


@dataclass(frozen=True)
class Neurons:
    """What an effect may read about one module's selected neurons (best first): their edit weights
    and the artifact's per-neuron arrays the kind `reads` (core/artifact.py), by array name."""

    weights: np.ndarray  # [r] float64 edit weights w_n (docs/METHOD.md §5)
    stats: Mapping[str, np.ndarray]  # name -> [r] float64, e.g. "act_mean" (the ablate-mean value)

    @property
    def act_means(self) -> np.ndarray:
        """[r] calibration means of h_n (docs/METHOD.md §1.4)."""
        return self.stats["act_mean"]

    @property
    def mean_diffs(self) -> np.ndarray:
        """[r] mean of h_n on the unbiased rows minus on the biased rows (docs/METHOD.md §1.4)."""
        return self.stats["mean_diff"]


# (neurons, settings, spelling) -> (gain [r], offset [r]); spelling maps a parameter to the name the
# user gave it by (`--alpha`, `--le-alpha`), for error messages.
Effect = Callable[[Neurons, Mapping[str, float], Mapping[str, str]], tuple[np.ndarray, np.ndarray]]


def given(params: Mapping[str, float] | None, alpha: float | None) -> dict[str, float]:
    """The settings a caller gave: `params`, and `alpha` (the common strength option) when given."""
    return {**(params or {}), **({"alpha": alpha} if alpha is not None else {})}


class _Settings:
    """What every kind does with its `params`: complete and check the settings a caller gave."""

    name: str
    params: tuple[Param, ...]

    def settings(self, given: Mapping[str, float | None] | None = None, spelling: Mapping[str, str] | None = None,
                 mode_word: str = "mode") -> dict[str, float]:
        """`given` completed with the defaults and checked finite. CocoError for a parameter this kind
        does not take, named as the user spelled it (`spelling`: parameter -> option; `mode_word`: how
        the user picked the kind, `--mode` or `mode`)."""
        spelling = spelling or {}
        given = {k: v for k, v in (given or {}).items() if v is not None}
        known = {p.name for p in self.params}
        for key in given.keys() - known:
            takes = f" (it takes {', '.join(sorted(known))})" if known else ""
            option = spelling.get(key, f"--{key}")
            raise CocoError(f"{option} does not apply to {mode_word} {self.name}{takes}; drop it")
        return {p.name: finite(given.get(p.name, p.default), spelling.get(p.name, f"--{p.name}"))
                for p in self.params}


@dataclass(frozen=True)
class GateKind(_Settings):
    """The NE-COCO gate (docs/METHOD.md §7): a nonlinear, input-dependent gain on the gated q/v
    channels, run by edit/gate.py everywhere; `coco-tools ne` writes it, it does not bake."""

    name: str
    label: str
    summary: str
    params: tuple[Param, ...] = ()


@dataclass(frozen=True)
class LinearKind(_Settings):
    """A per-channel gain and offset on selected q/k/v outputs (see the module docstring)."""

    name: str  # the CLI and config spelling (`--mode NAME`, `--with NAME`, coco_edit NAME)
    label: str  # the report's name for it
    summary: str  # the formula, one line: --help and docs
    effect: Effect
    params: tuple[Param, ...] = ()
    ablation: bool = False  # a causal check (the experiment's ablation stage), not an enhancement
    reads: tuple[str, ...] = ()  # the artifact's per-neuron arrays the effect reads (Neurons.stats)
    shifts: bool = False  # may give a non-zero offset: baking it needs a bias on the module

    def tables(self, neurons: Neurons, settings: Mapping[str, float],
               spelling: Mapping[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(gain, offset), each [r] float64, for one module's selected neurons."""
        spelling = {p.name: f"--{p.name}" for p in self.params} | dict(spelling or {})
        gain, offset = self.effect(neurons, settings, spelling)
        return np.asarray(gain, dtype=np.float64), np.asarray(offset, dtype=np.float64)

    def options(self, settings: Mapping[str, float]) -> str:
        """`--mode le --alpha 2`: the kind and its settings as `coco-tools bake` takes them."""
        return " ".join([f"--mode {self.name}", *(f"--{k} {v:g}" for k, v in settings.items())])

    def fix(self) -> str:
        """What to change when the edit overflows a model."""
        if self.params:
            return f"choose a smaller {' / '.join('--' + p.name for p in self.params)}"
        return "re-run `coco-tools identify` on this model"
