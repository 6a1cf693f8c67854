"""vLLM plugin entry point (group `vllm.general_plugins`): registers the NE-COCO architectures.

Tiny and idempotent: vLLM calls it in every process, possibly more than once. Model classes are
registered as lazy "module:Class" strings (core/architectures.py's table), so nothing heavy is
imported here.
"""

# Lazy imports: vLLM and the config classes load inside register(), which vLLM calls in each process.

from vllm_coco.core.architectures import ARCHITECTURES


def register() -> None:
    from vllm import ModelRegistry

    from vllm_coco.serve.hf_configs import register as register_configs

    register_configs()  # coco_llama / coco_mistral model types for transformers' AutoConfig
    known = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES:
        if arch.ne_class not in known:
            ModelRegistry.register_model(arch.ne_class, arch.vllm_class)
