"""An edit as the experiment makes it (docs/METHOD.md §8.6): a kind, its settings and the neuron
share, runnable in memory (a condition of a loaded model) or written (a directory), the same
numbers either way (tests/test_conditions.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vllm_coco.edit import registry
from vllm_coco.edit.bake import bake
from vllm_coco.edit.conditions import Edit, linear_edit, ne_edit
from vllm_coco.edit.kind import GateKind
from vllm_coco.edit.ne import write_ne


@dataclass(frozen=True)
class Recipe:
    kind: str  # a registered kind (edit/registry.py), the NE gate included
    settings: dict[str, float] = field(default_factory=dict)
    ratio: float | None = None  # the neuron share (None: the artifact's own)

    @property
    def is_gate(self) -> bool:
        """The gate picks its own share of q/v neurons from the full artifact (edit/ne_gate.py);
        a linear kind edits the artifact's selected set."""
        return isinstance(registry.any_kind(self.kind), GateKind)

    def condition(self, neurons: Path, model_dir: Path) -> Edit:
        """The edit in memory, for a model loaded from `model_dir`."""
        if self.is_gate:
            return ne_edit(neurons, **self.settings, ratio=self.ratio, model_dir=model_dir)
        return linear_edit(neurons, self.kind, params=self.settings, model_dir=model_dir)

    def write(self, model_dir: Path, neurons: Path, out: Path) -> None:
        """The edit as a directory: an NE-COCO directory for the gate, a baked checkpoint otherwise."""
        if self.is_gate:
            write_ne(str(model_dir), str(neurons), str(out), ratio=self.ratio, **self.settings)
        else:
            bake(str(model_dir), str(neurons), str(out), mode=self.kind, params=self.settings)
