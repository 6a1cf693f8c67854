"""The model architectures NE-COCO serves: one table entry each (docs/EXTENDING.md).

Everything else derives from this table: the NE directory format's class and model-type maps
(core/ne_format.py), the transformers config classes of the NE model types (serve/hf_configs.py),
the vLLM plugin's registrations (serve/plugin.py) and the architectures `identify --backend vllm`
runs. Light on purpose (no imports): vLLM's plugin loader reads it in every process.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    base: str  # the Hugging Face class a base model's config.json names (LlamaForCausalLM)
    model_type: str  # its config's model_type (llama)
    config_class: str  # the transformers config class of that model type (LlamaConfig)
    vllm_class: str  # "module:Class" of the gated vLLM model (serve/vllm_models.py)

    @property
    def ne_class(self) -> str:
        """The class an NE directory's config.json names (CocoLlamaForCausalLM)."""
        return "Coco" + self.base

    @property
    def ne_model_type(self) -> str:
        """An NE directory's model_type (coco_llama): plain AutoModel refuses it (serve/hf_configs.py)."""
        return "coco_" + self.model_type


ARCHITECTURES = (
    Architecture("LlamaForCausalLM", "llama", "LlamaConfig", "vllm_coco.serve.vllm_models:CocoLlamaForCausalLM"),
    Architecture("MistralForCausalLM", "mistral", "MistralConfig",
                 "vllm_coco.serve.vllm_models:CocoMistralForCausalLM"),
)
BY_BASE = {a.base: a for a in ARCHITECTURES}
BY_NE_TYPE = {a.ne_model_type: a for a in ARCHITECTURES}
