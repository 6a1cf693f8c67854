"""An identify artifact's selected neurons grouped by the module they live in, and the gain and
offset tables an edit kind gives them (docs/METHOD.md §6): what every executor of a linear edit
(bake, the in-memory conditions, an NE directory's named edits) starts from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vllm_coco.core.errors import CocoError
from vllm_coco.core.models import NeuronLayout
from vllm_coco.edit.kind import LinearKind, Neurons


@dataclass
class ModuleEdit:
    """The selected rows of one (layer, projection) module."""

    rows: list[int] = field(default_factory=list)  # output channels, best first
    weights: list[float] = field(default_factory=list)  # w_n of each row
    flat: list[int] = field(default_factory=list)  # each row's global neuron id (docs/METHOD.md §1.1)

    def neurons(self, arrays: dict[str, np.ndarray], reads: tuple[str, ...]) -> Neurons:
        """What a kind that `reads` these per-neuron artifact arrays sees of this module's rows."""
        idx = np.asarray(self.flat, dtype=np.int64)
        return Neurons(np.asarray(self.weights, dtype=np.float64),
                       {name: np.asarray(arrays[name], dtype=np.float64)[idx] for name in reads})


def planned_edits(meta: dict, arrays: dict[str, np.ndarray]) -> dict[tuple[int, str], ModuleEdit]:
    """Group the artifact's selected neurons by (layer, projection)."""
    m = meta["model"]
    layout = NeuronLayout(m["num_layers"], m["q_size"], m["kv_size"])
    selected, weight = arrays["selected"], arrays["weight"]  # [k], [k]
    if len(selected) == 0:
        raise CocoError("the neuron artifact selects no neurons; re-run `coco-tools identify`")
    edits: dict[tuple[int, str], ModuleEdit] = {}
    for flat, w in zip(selected.tolist(), weight.tolist()):
        if not 0 <= flat < layout.total:
            raise CocoError(f"the neuron artifact selects neuron {flat} outside its own layout; re-run identify")
        layer, proj, index = layout.address(flat)
        e = edits.setdefault((layer, proj), ModuleEdit())
        e.rows.append(index)
        e.weights.append(float(w))
        e.flat.append(flat)
    return edits


def check_inputs(kind: LinearKind, arrays: dict, neurons_dir) -> None:
    """CocoError when the artifact lacks a per-neuron array `kind` reads."""
    missing = [name for name in kind.reads if name not in arrays]
    if missing:
        raise CocoError(f"{neurons_dir} predates the per-neuron {', '.join(missing)} that {kind.name} reads; "
                        "re-run `coco-tools identify`")


def module_tables(kind: LinearKind, settings: dict, edits: dict[tuple[int, str], ModuleEdit],
                  arrays: dict[str, np.ndarray], spelling: dict | None = None
                  ) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """(gain, offset) [r] per edited module, rows in ModuleEdit.rows order. The kind first sees every
    selected neuron at once, so a refusal (an alpha out of range) speaks of the whole set."""
    every = ModuleEdit(weights=[w for e in edits.values() for w in e.weights],
                       flat=[n for e in edits.values() for n in e.flat])
    kind.tables(every.neurons(arrays, kind.reads), settings, spelling)
    return {key: kind.tables(e.neurons(arrays, kind.reads), settings, spelling) for key, e in edits.items()}


def shifts(kind: LinearKind, tables: dict) -> bool:
    """Whether the edit gives any channel an offset (the kind says so, or its tables do)."""
    return kind.shifts or any(np.any(offset != 0) for _, offset in tables.values())
