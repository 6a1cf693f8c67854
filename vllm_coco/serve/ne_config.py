"""NE-COCO model types. An NE directory's config.json says `model_type: coco_llama` (or
`coco_mistral`) and `architectures: [CocoLlamaForCausalLM]`, so that plain transformers refuses it
(the gate would be silently dropped) while vLLM, with the plugin, serves it.

Importing this module is cheap; `register()` imports transformers and is idempotent.
"""

from __future__ import annotations

BASE_TO_NE_ARCH = {"LlamaForCausalLM": "CocoLlamaForCausalLM", "MistralForCausalLM": "CocoMistralForCausalLM"}
NE_TO_BASE_TYPE = {"coco_llama": "llama", "coco_mistral": "mistral"}
LOADER = "vllm_coco.serve.hf_reference.load_ne_model"

_registered = False


def register() -> None:
    """Make transformers' AutoConfig understand coco_llama / coco_mistral configs (its public
    `register` API); AutoModelForCausalLM on such a directory then names our loader."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from vllm_coco.serve import hf_configs as h

    for cfg, refuse in ((h.CocoLlamaConfig, h.RefuseCocoLlama), (h.CocoMistralConfig, h.RefuseCocoMistral)):
        if cfg.model_type not in CONFIG_MAPPING:
            AutoConfig.register(cfg.model_type, cfg)
            AutoModelForCausalLM.register(cfg, refuse)
    _registered = True
