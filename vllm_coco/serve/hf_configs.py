"""transformers config classes of the NE-COCO model types (module level, so they pickle across
vLLM's worker processes). Registered by `ne_config.register()`."""

from transformers import LlamaConfig, MistralConfig, PreTrainedModel

from vllm_coco.serve.ne_config import LOADER


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
