"""Per-request NE-COCO settings: what a request may ask of an NE directory, checked once, named once.

A request says what it wants in vLLM's `SamplingParams.extra_args` (on the OpenAI server: the
`vllm_xargs` field), with flat keys because `vllm_xargs` holds scalars only:

    coco_edit   "ne" (the gate, default), "base" (no edit), or a named edit the directory carries
    coco_alpha  gate strength (0: exactly the base model)          } the gate's only;
    coco_beta   gate sharpness (> 0)                                } a request without them gets
    coco_lam    weight of the networked engagement, in [0, 1]      } the directory's values

`Menu.parse` turns those into a `Setting` or raises a one-line ValueError naming the field and
the allowed values (the engine turns it into HTTP 400). `Menu.salt` names the prefix-cache
namespace of a setting: None for the directory's default, so default requests keep sharing KV
blocks with requests that say nothing. No torch and no vLLM here: the API server imports it to
validate, the scheduler to salt, the model runner to fill its per-token buffers.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from vllm_coco.core.names import BASE_EDIT, NE_EDIT, SALT_PREFIX, XARG_ALPHA, XARG_BETA, XARG_EDIT, XARG_LAM, XARGS


@dataclass(frozen=True)
class Setting:
    """One request's edit: `edit` is "ne", "base" or a named edit; alpha/beta/lam drive the gate
    (alpha is 0 for every edit but "ne")."""

    edit: str
    alpha: float
    beta: float
    lam: float


@dataclass(frozen=True)
class Menu:
    """What an NE directory offers a request: the gate's configured hyperparameters, its smallest
    weight (bounding the strengths a request may ask for) and its named edits, in column order."""

    alpha: float
    beta: float
    lam: float
    w_min: float
    edits: tuple[str, ...] = ()

    @classmethod
    def read(cls, ne_dir) -> Menu:
        from vllm_coco.core.ne_format import NEDirectory

        ne = NEDirectory.read(Path(ne_dir))
        c = ne.coco
        return cls(float(c["alpha"]), float(c["beta"]), float(c["lam"]), ne.w_min(), tuple(ne.edit_names))

    @property
    def names(self) -> tuple[str, ...]:
        return (NE_EDIT, BASE_EDIT) + self.edits

    @property
    def default(self) -> Setting:
        return Setting(NE_EDIT, self.alpha, self.beta, self.lam)

    def parse(self, extra_args: dict | None) -> Setting:
        """The setting a request's extra_args ask for (the default when they hold no coco_* key)."""
        args = {k: v for k, v in (extra_args or {}).items() if isinstance(k, str) and k.startswith("coco_")}
        if not args:
            return self.default
        unknown = sorted(set(args) - set(XARGS))
        if unknown:
            raise ValueError(f"unknown NE-COCO setting {unknown[0]!r}; allowed keys: {', '.join(XARGS)}")
        edit = args.get(XARG_EDIT, NE_EDIT)
        if not isinstance(edit, str) or edit not in self.names:
            raise ValueError(f"{XARG_EDIT} {edit!r} is not an edit of this model; allowed: {', '.join(self.names)}")
        gate = [k for k in (XARG_ALPHA, XARG_BETA, XARG_LAM) if k in args]
        if edit != NE_EDIT:
            if gate:
                raise ValueError(f"{gate[0]} applies to the gate ({XARG_EDIT} {NE_EDIT!r}), not to {XARG_EDIT} "
                                 f"{edit!r}; drop it or pick {NE_EDIT!r}")
            return Setting(edit, 0.0, self.beta, self.lam)
        alpha, beta, lam = (_number(args, k, d) for k, d in ((XARG_ALPHA, self.alpha), (XARG_BETA, self.beta),
                                                             (XARG_LAM, self.lam)))
        from vllm_coco.core.checks import ne_hyper
        from vllm_coco.core.errors import CocoError

        try:
            ne_hyper(alpha, beta, lam, self.w_min, (XARG_ALPHA, XARG_BETA, XARG_LAM))
        except CocoError as exc:
            raise ValueError(str(exc)) from None
        return Setting(NE_EDIT, alpha, beta, lam)

    def salt(self, setting: Setting) -> str | None:
        """The prefix-cache salt of a setting: None for the directory's default, else "coco:" + a
        hash of the canonical setting (namespaced: it cannot equal a LoRA name or a plain salt).
        The KV of a prompt depends on the setting (v channels are gated), so
        requests with different settings must not share blocks; equal settings hash equal."""
        if setting == self.default:
            return None
        canon = f"{setting.edit}|{_f32(setting.alpha)}|{_f32(setting.beta)}|{_f32(setting.lam)}"
        return SALT_PREFIX + hashlib.sha256(canon.encode()).hexdigest()[:16]

    def columns(self, setting: Setting) -> tuple[float, float, float, int]:
        """(alpha, beta, lam, named-edit column or -1) for the model's per-token buffers."""
        col = self.edits.index(setting.edit) if setting.edit in self.edits else -1
        return setting.alpha, setting.beta, setting.lam, col


@lru_cache(maxsize=8)
def menu_of(ne_dir: str) -> Menu:
    """The Menu of an NE directory, read once per process."""
    return Menu.read(ne_dir)


def _number(args: dict, key: str, default: float) -> float:
    v = args.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"{key} {v!r} is not a number; pass a finite number")
    try:
        f = float(v)
    except ValueError:
        raise ValueError(f"{key} {v!r} is not a number; pass a finite number") from None
    if not math.isfinite(f):
        raise ValueError(f"{key} {v!r} is not a finite number; pass a finite number")
    return f


def _f32(x: float) -> str:
    """The float32 the model computes with, spelled exactly: 0.1 and 0.10000000001 salt alike."""
    import struct

    return struct.pack("<f", x).hex()
