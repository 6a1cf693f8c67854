"""NE-COCO model types. An NE directory's config.json says `model_type: coco_llama` (or
`coco_mistral`) and `architectures: [CocoLlamaForCausalLM]`, so that plain transformers refuses it
(the gate would be silently dropped) while vLLM, with the plugin, serves it.

Importing this module is cheap; `register()` imports transformers and is idempotent.
"""

from __future__ import annotations

BASE_TO_NE_ARCH = {"LlamaForCausalLM": "CocoLlamaForCausalLM", "MistralForCausalLM": "CocoMistralForCausalLM"}
NE_TO_BASE_TYPE = {"coco_llama": "llama", "coco_mistral": "mistral"}
LOADER = "vllm_coco.hf_reference.load_ne_model"

_registered = False


def register() -> None:
    """Make transformers' AutoConfig understand coco_llama / coco_mistral configs (public
    `AutoConfig.register` API); AutoModelForCausalLM on such a directory then names our loader."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for ne_type, base in ((("coco_llama"), LlamaConfig), (("coco_mistral"), MistralConfig)):
        if ne_type in CONFIG_MAPPING:
            continue
        cfg_cls = type(f"Coco{base.__name__}", (base,), {"model_type": ne_type})
        AutoConfig.register(ne_type, cfg_cls)
        AutoModelForCausalLM.register(cfg_cls, _refusing_class(cfg_cls))
    _registered = True


def _refusing_class(cfg_cls):
    from transformers import PreTrainedModel

    class NotLoadableWithAutoModel(PreTrainedModel):
        config_class = cfg_cls

        @classmethod
        def from_pretrained(cls, path, *args, **kwargs):
            raise ValueError(f"{path} is an NE-COCO directory: its gate runs only through {LOADER}(path) "
                             "(Hugging Face reference) or vLLM with the vllm-coco plugin")

    return NotLoadableWithAutoModel
