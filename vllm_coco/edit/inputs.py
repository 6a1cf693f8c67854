"""What every edit reads and checks before it writes anything: the base model directory (plain
safetensors weights, not an NE directory), the neuron artifact, and an output path that reaches
neither."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vllm_coco.core import ne_format
from vllm_coco.core.artifact import Artifact
from vllm_coco.core.atomic import check_output_dir
from vllm_coco.core.json_file import read_config
from vllm_coco.core.models import check_weights, resolve_model_dir


@dataclass(frozen=True)
class EditInputs:
    model_dir: Path
    config: dict  # the base model's config.json
    artifact: Artifact
    sources: tuple  # the inputs an output may not overlap

    @classmethod
    def open(cls, model: str, neurons_dir: str, out: str, force: bool) -> EditInputs:
        model_dir = resolve_model_dir(model)
        check_weights(model_dir)
        art = Artifact.read(neurons_dir)
        sources = (model_dir, Path(neurons_dir))
        check_output_dir(out, force, sources)
        config = read_config(model_dir)
        ne_format.refuse_ne(config, model_dir)
        return cls(model_dir, config, art, sources)
