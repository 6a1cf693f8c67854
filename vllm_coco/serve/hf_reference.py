"""Hugging Face reference for NE-COCO: a transformers model with the gate in its attention.

For users without vLLM, and the oracle the vLLM model is tested against. The gate is applied by
`edit.conditions` (which wraps each attention module and calls `gate.apply_gate`, the function vLLM
uses too): the directory's edit is registered as condition "ne" and made the model's default, and
each named edit it carries (`coco-tools ne --with MODE`) as a condition of its name, so
`model.coco_conditions.rows([...])` runs a batch whose rows pick different edits, as vLLM's
per-request settings do; `scaled_condition` adds a named edit at another strength (`coco_scale`).
"""

from __future__ import annotations

# Lazy imports: torch, transformers, numpy are imported inside the functions that use them (directly
# or through the modules they import), so importing this module stays light.
import torch

from vllm_coco.core.errors import CocoError
from vllm_coco.core.names import NE_EDIT, SCALE_MAX, XARG_SCALE
from vllm_coco.core.ne_format import NEDirectory


def load_ne_model(ne_dir, dtype: torch.dtype = torch.float32, device: str = "cpu", alpha: float | None = None):
    """Load an NE-COCO directory as a transformers causal LM with the NE gate applied.

    `alpha` overrides the directory's strength (0 gives exactly the base model). Returns (model, tokenizer).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ne = NEDirectory.read(ne_dir)
    base_type, base_cfg = ne.base_config()
    config = AutoConfig.for_model(base_type, **base_cfg)
    config.architectures = [ne.coco["base_architecture"]]
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it reads config.json on the side and warns that coco_llama is no known type
    try:
        model = AutoModelForCausalLM.from_pretrained(ne.path, config=config, dtype=dtype, trust_remote_code=False,
                                                     use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(ne.path, trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(level)
    from vllm_coco.edit.conditions import LinearEdit, install, ne_dir_edit

    model.to(device).eval()
    table = install(model)
    table.add(NE_EDIT, ne_dir_edit(ne.path, alpha=alpha))
    modes = {e["name"]: e["mode"] for e in ne.coco.get("edits", [])}
    for name, layers in ne.named_edits().items():
        channels = {layer: t["channels"].numpy() for layer, t in layers.items()}
        gain = {layer: t["gain"].double().numpy() for layer, t in layers.items()}
        offset = {layer: t["offset"].double().numpy() for layer, t in layers.items()}
        table.add(name, LinearEdit(modes[name], channels, gain, offset))
    table.use(NE_EDIT)
    return model, tokenizer


def scaled_condition(model, edit: str, scale: float) -> str:
    """Register the loaded directory's named edit `edit` at strength `scale` as a condition of its own
    and return the condition's name, for `model.coco_conditions.rows([...])`: what a request with
    coco_edit EDIT and coco_scale SCALE computes in vLLM (gain 1 + scale·(gain - 1), offset scale·offset)."""
    from vllm_coco.edit.conditions import LinearEdit

    table = model.coco_conditions
    named = table.edits[table.index(edit)]
    if not isinstance(named, LinearEdit):
        raise CocoError(f"{XARG_SCALE} applies to named edits, not to {edit!r}; pick one the directory carries")
    s = float(scale)
    if not abs(s) <= SCALE_MAX:  # nan fails too
        raise CocoError(f"{XARG_SCALE} {scale!r} is outside [-{SCALE_MAX:g}, {SCALE_MAX:g}]; "
                        "pass a strength such as 0.5")
    name = f"{edit}@{s!r}"  # "@" is in no edit kind's name (edit/registry.py): never a directory's edit
    if name not in table.names:
        table.add(name, LinearEdit(named.mode, named.channels, {k: 1.0 + s * (g - 1.0) for k, g in named.gain.items()},
                                   {k: s * o for k, o in named.offset.items()}))
    return name
