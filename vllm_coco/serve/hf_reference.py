"""Hugging Face reference for NE-COCO: a transformers model with the gate in its attention.

For users without vLLM, and the oracle the vLLM model is tested against. The gate needs q and v
of a layer at once (W_hat mixes them), so each attention module is wrapped: the wrapper computes
the packed [q | k | v] projections, applies `gate.apply_gate` (the same function vLLM uses), and
hands the gated outputs to the unchanged attention forward through stand-in projection modules.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_coco.core.ne_format import GATE_KEYS, NEDirectory
from vllm_coco.edit.gate import apply_gate


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
    a = ne.coco["alpha"] if alpha is None else alpha
    for layer, gate in ne.gates().items():
        decoder_layer = model.model.layers[layer]
        decoder_layer.self_attn = GatedAttention(decoder_layer.self_attn, gate, a, ne.coco["beta"], ne.coco["lam"])
    model.to(device).eval()
    return model, tokenizer
