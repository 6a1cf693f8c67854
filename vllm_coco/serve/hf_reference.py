"""Hugging Face reference for NE-COCO: a transformers model with the gate in its attention.

For users without vLLM, and the oracle the vLLM model is tested against. The gate needs q and v
of a layer at once (W_hat mixes them), so each attention module is wrapped: the wrapper computes
the packed [q | k | v] projections, applies `gate.apply_gate` (the same function vLLM uses), and
hands the gated outputs to the unchanged attention forward through stand-in projection modules.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vllm_coco.core.checks import tensors_finite
from vllm_coco.core.errors import CocoError
from vllm_coco.edit.gate import apply_gate
from vllm_coco.edit.ne import GATE_FILE, GATE_KEYS, gate_prefix
from vllm_coco.serve.ne_config import NE_TO_BASE_TYPE


class _Stored(nn.Module):
    """Stands in for q_proj / k_proj / v_proj: returns the tensor the wrapper stored for this call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.out = None

    def forward(self, x):
        out, self.out = self.out, None
        if out is None:  # called outside the wrapper: behave like the plain projection
            return self.linear(x)
        return out


class GatedAttention(nn.Module):
    """Wraps one attention module; gate tensors are buffers named like the checkpoint's."""

    def __init__(self, attn: nn.Module, gate: dict[str, torch.Tensor], alpha: float, beta: float, lam: float):
        super().__init__()
        self.inner = attn
        self.alpha, self.beta, self.lam = alpha, beta, lam
        self.coco_gate = nn.Module()
        for k in GATE_KEYS:
            self.coco_gate.register_buffer(k, gate[k])
        self.sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        for p in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, p, _Stored(getattr(attn, p)))

    def forward(self, *args, **kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        a = self.inner
        qkv = torch.cat([a.q_proj.linear(x), a.k_proj.linear(x), a.v_proj.linear(x)], dim=-1)  # [b, t, q+2kv]
        g = self.coco_gate
        qkv = apply_gate(qkv, g.channels, g.mu, g.sigma, g.w, g.w_hat, self.alpha, self.beta, self.lam)
        a.q_proj.out, a.k_proj.out, a.v_proj.out = qkv.split(self.sizes, dim=-1)
        return a(*args, **kwargs)


def read_ne_config(ne_dir: Path) -> dict:
    from vllm_coco.core.models import read_config

    path = Path(ne_dir) / "config.json"
    if not path.is_file():
        raise CocoError(f"{ne_dir} is not a model directory (no config.json)")
    cfg = read_config(ne_dir)
    if not isinstance(cfg.get("coco"), dict) or cfg.get("model_type") not in NE_TO_BASE_TYPE:
        raise CocoError(f"{ne_dir} is not an NE-COCO directory (no coco section); create one with `coco-tools ne`")
    check_coco_section(cfg, path)
    return cfg


def check_coco_section(cfg: dict, path: Path) -> None:
    """The `coco` section of an NE directory's config.json: finite hyperparameters in range and one
    list of channel indices per layer (CocoError naming the file)."""
    from vllm_coco.core.checks import finite
    from vllm_coco.serve.ne_config import BASE_TO_NE_ARCH

    coco = cfg["coco"]
    fix = "re-export the directory with `coco-tools ne`"
    try:
        finite(coco.get("alpha"), f"{path}: coco.alpha")
        finite(coco.get("beta"), f"{path}: coco.beta", lo=0, lo_open=True)
        finite(coco.get("lam"), f"{path}: coco.lam", lo=0, hi=1)
    except CocoError as exc:
        raise CocoError(f"{exc}; {fix}") from None
    if coco.get("base_architecture") not in BASE_TO_NE_ARCH:
        raise CocoError(f"{path}: coco.base_architecture {coco.get('base_architecture')!r} is not one of "
                        f"{', '.join(BASE_TO_NE_ARCH)}; {fix}")
    channels = coco.get("channels")
    layers = cfg.get("num_hidden_layers")
    if (not isinstance(channels, list) or len(channels) != layers
            or not all(isinstance(c, list) and all(isinstance(i, int) and i >= 0 for i in c) for c in channels)):
        raise CocoError(f"{path}: coco.channels is not one list of channel indices per layer; {fix}")


def load_ne_model(ne_dir, dtype: torch.dtype = torch.float32, device: str = "cpu", alpha: float | None = None):
    """Load an NE-COCO directory as a transformers causal LM with the NE gate applied.

    `alpha` overrides the directory's strength (0 gives exactly the base model). Returns (model, tokenizer).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ne_dir = Path(ne_dir)
    cfg = read_ne_config(ne_dir)
    coco = cfg["coco"]
    base_cfg = {k: v for k, v in cfg.items() if k not in ("coco", "architectures", "model_type")}
    config = AutoConfig.for_model(NE_TO_BASE_TYPE[cfg["model_type"]], **base_cfg)
    config.architectures = [coco["base_architecture"]]
    model = AutoModelForCausalLM.from_pretrained(ne_dir, config=config, dtype=dtype, trust_remote_code=False,
                                                 use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(ne_dir, trust_remote_code=False)
    try:
        tensors = load_file(str(ne_dir / GATE_FILE))
    except Exception as exc:  # missing, truncated or garbage
        raise CocoError(f"{ne_dir / GATE_FILE} is not a readable safetensors file ({type(exc).__name__}); "
                        "re-export the directory with `coco-tools ne`") from None
    tensors_finite(tensors, f"{ne_dir / GATE_FILE}", "re-export the directory with `coco-tools ne`")
    a = coco["alpha"] if alpha is None else alpha
    for layer, decoder_layer in enumerate(model.model.layers):
        if not coco["channels"][layer]:
            continue
        gate = {k: tensors[f"{gate_prefix(layer)}.{k}"] for k in GATE_KEYS}
        decoder_layer.self_attn = GatedAttention(decoder_layer.self_attn, gate, a, coco["beta"], coco["lam"])
    model.to(device).eval()
    return model, tokenizer
