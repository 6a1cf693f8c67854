"""transformers config classes of the NE-COCO model types, one per row of core/architectures.py
(module level, so they pickle across vLLM's worker processes), and `register()`, which makes
AutoConfig understand them.

An NE directory's config.json says `model_type: coco_llama` (or `coco_mistral`), so plain
AutoModelForCausalLM refuses it with a pointer to the loader that applies the gate (the gate is
never silently dropped), while vLLM with the plugin serves it. Import this module lazily: it
imports transformers. `register()` is idempotent.
"""

import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from vllm_coco.core.architectures import ARCHITECTURES
from vllm_coco.core.ne_format import LOADER


class _RefuseAutoModel(PreTrainedModel):
    """What AutoModelForCausalLM finds for an NE config: a pointer to the real loader."""

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        raise ValueError(f"{path} is an NE-COCO directory: its gate runs only through {LOADER}(path) "
                         "(Hugging Face reference) or vLLM with the vllm-coco plugin")


def _module_class(name: str, bases: tuple, attrs: dict) -> type:
    """A class defined in this module's namespace under `name` (so pickle finds it by name)."""
    cls = type(name, bases, {"__module__": __name__, "__qualname__": name, **attrs})
    globals()[name] = cls
    return cls


# model_type -> (config class, what AutoModelForCausalLM builds for it: a refusal)
CLASSES = {}
for _arch in ARCHITECTURES:
    _config = _module_class(f"Coco{_arch.config_class}", (getattr(transformers, _arch.config_class),),
                            {"model_type": _arch.ne_model_type})
    CLASSES[_arch.ne_model_type] = (_config, _module_class(f"RefuseCoco{_arch.config_class}", (_RefuseAutoModel,),
                                                           {"config_class": _config}))


def register() -> None:
    """Make AutoConfig read the coco_* configs (transformers' public `register` API)."""
    for model_type, (cfg, refuse) in CLASSES.items():
        if model_type not in CONFIG_MAPPING:
            AutoConfig.register(model_type, cfg)
            AutoModelForCausalLM.register(cfg, refuse)
