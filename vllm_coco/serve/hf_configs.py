"""transformers config classes of the NE-COCO model types (module level, so they pickle across
vLLM's worker processes), and `register()`, which makes AutoConfig understand them.

An NE directory's config.json says `model_type: coco_llama` (or `coco_mistral`), so plain
AutoModelForCausalLM refuses it with a pointer to the loader that applies the gate (the gate is
never silently dropped), while vLLM with the plugin serves it. Import this module lazily: it
imports transformers. `register()` is idempotent.
"""

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from vllm_coco.core.ne_format import LOADER


class CocoLlamaConfig(LlamaConfig):
    model_type = "coco_llama"


class CocoMistralConfig(MistralConfig):
    model_type = "coco_mistral"


class _RefuseAutoModel(PreTrainedModel):
    """What AutoModelForCausalLM finds for an NE config: a pointer to the real loader."""

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        raise ValueError(f"{path} is an NE-COCO directory: its gate runs only through {LOADER}(path) "
                         "(Hugging Face reference) or vLLM with the vllm-coco plugin")


class RefuseCocoLlama(_RefuseAutoModel):
    config_class = CocoLlamaConfig


class RefuseCocoMistral(_RefuseAutoModel):
    config_class = CocoMistralConfig


def register() -> None:
    """Make AutoConfig read coco_llama / coco_mistral configs (transformers' public `register` API)."""
    for cfg, refuse in ((CocoLlamaConfig, RefuseCocoLlama), (CocoMistralConfig, RefuseCocoMistral)):
        if cfg.model_type not in CONFIG_MAPPING:
            AutoConfig.register(cfg.model_type, cfg)
            AutoModelForCausalLM.register(cfg, refuse)
