"""Where the experiment evaluates an edit (docs/METHOD.md §8.6): in memory, as a condition of the
base model the run loaded once (eval backend hf: a stage's edits are scored in the base's batches),
or written, as a directory an engine loads (any other backend). A stage declares the edits it
evaluates (`Edits.add`) and asks for each one's `EditedModel`; this module is the one place that
tells the two apart, so every stage is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_coco.edit import registry
from vllm_coco.edit.bake import holds_offsets

if TYPE_CHECKING:
    from vllm_coco.edit.recipe import Recipe


def checkpointable(model_dir: Path, kind: str) -> bool:
    """Whether a written edit of `kind` on the model in `model_dir` can exist: a kind that shifts
    outputs needs a checkpoint that holds q/k/v biases (edit/bake.holds_offsets); the gate and the
    gain-only kinds always can."""
    return not getattr(registry.any_kind(kind), "shifts", False) or holds_offsets(model_dir)


def drop_weights(model_dir: Path) -> None:
    """Free the disk of an evaluated edit: its weights go, its coco_edit.json / config stay."""
    for f in model_dir.glob("*.safetensors"):
        f.unlink()


@dataclass(frozen=True)
class EditedModel:
    """One edit ready to evaluate: the model directory, the in-memory condition on it (None: the
    directory holds the edit), and the directory written for the user (None: not written)."""

    dir: Path
    condition: str | None
    written: Path | None


class Edits:
    """The edits one stage evaluates on one model. `lm`: the model loaded in memory (the CocoHFLM that
    takes conditions), or None when every edit is written for an engine to load; `steps`: the stage's
    finished steps (pipeline.Steps), so a written edit is reused when the stage resumes."""

    def __init__(self, model_dir: Path, steps, lm=None, keep_models: bool = False):
        self.model_dir, self.steps, self.lm, self.keep_models = model_dir, steps, lm, keep_models
        self.recipes: dict[str, tuple[Recipe, Path]] = {}

    def add(self, name: str, recipe: Recipe, neurons: Path) -> None:
        """Declare edit `name`: `recipe` on the neuron artifact `neurons`. In memory it becomes a
        condition of the loaded model now, so the base's evaluation can score it in the same batches."""
        self.recipes[name] = (recipe, neurons)
        if self.lm is not None:
            self.lm.add_condition(name, recipe.condition(neurons, self.model_dir))

    def alongside(self, names=None) -> list[str]:
        """The declared edits (or those of `names`) an evaluation scores in its batches: in memory only."""
        return [] if self.lm is None else [n for n in self.recipes if names is None or n in names]

    def model(self, name: str, key: str, spec: dict, product: bool = False) -> EditedModel:
        """Edit `name` ready to evaluate. Written to the stage's step `key` (reused when `spec`
        matches) when an engine must load it, or in memory when the user keeps it (keep_models, or
        `product`: the final stage's chosen edits) and a checkpoint can hold it."""
        recipe, neurons = self.recipes[name]
        kept = (product or self.keep_models) and checkpointable(self.model_dir, recipe.kind)
        written = None
        if self.lm is None or kept:
            written = self.steps.do(key, spec, lambda d: recipe.write(self.model_dir, neurons, d))
        return EditedModel(written, None, written) if self.lm is None else EditedModel(self.model_dir, name, written)

    def release(self, edited: EditedModel) -> None:
        """After its evaluation: an edit written only so an engine could load it loses its weights."""
        if edited.condition is None and edited.written is not None and not self.keep_models:
            drop_weights(edited.written)
