"""NE-COCO models for vLLM: Llama and Mistral with the NE gate inside the attention path.

Subclassed through vLLM's injection points (`attn_layer_type`, `layer_type`); nothing of vLLM is
patched. The gate acts on the packed `qkv_proj` output, before rotary embedding and the
paged-attention call, through `gate.apply_gate` (the same function as the Hugging Face reference).
Each tensor-parallel rank holds exactly the gate channels of its own q/k/v shards (sharding.py).
Imported lazily by vLLM through the plugin's "module:Class" registration.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
)
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralAttention, MistralDecoderLayer, MistralForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.model_executor.utils import set_weight_attrs

from vllm_coco.core.sharding import HeadLayout, shard_plan
from vllm_coco.edit.gate import apply_gate
from vllm_coco.identify.engine_capture import RECORDER


class CocoGate(nn.Module):
    """This rank's share of one layer's NE gate. Parameters are named like the checkpoint's
    `model.layers.{l}.self_attn.coco_gate.{channels,mu,sigma,w,w_hat}`, which hold the whole
    layer; each weight_loader keeps this rank's part."""

    def __init__(self, channels: list[int], heads: HeadLayout, coco: dict):
        super().__init__()
        self.tp = get_tensor_model_parallel_world_size()
        self.plan = shard_plan(channels, heads, self.tp, get_tensor_model_parallel_rank())
        self.global_channels = np.asarray(channels, dtype=np.int64)
        self.alpha, self.beta, self.lam = float(coco["alpha"]), float(coco["beta"]), float(coco["lam"])
        s_r = len(self.plan.rows)
        f32 = dict(dtype=torch.float32, requires_grad=False)
        self.channels = nn.Parameter(torch.tensor(self.plan.local, dtype=torch.int64), requires_grad=False)
        self.mu = nn.Parameter(torch.zeros(s_r, **f32), requires_grad=False)
        self.sigma = nn.Parameter(torch.ones(s_r, **f32), requires_grad=False)
        self.w = nn.Parameter(torch.zeros(s_r, **f32), requires_grad=False)
        self.w_hat = nn.Parameter(torch.zeros(s_r, self.tp * self.plan.pad, **f32), requires_grad=False)
        set_weight_attrs(self.channels, {"weight_loader": self._load_channels})
        for p in (self.mu, self.sigma, self.w):
            set_weight_attrs(p, {"weight_loader": self._load_rows})
        set_weight_attrs(self.w_hat, {"weight_loader": self._load_w_hat})

    # The checkpoint holds the whole layer: keep this rank's rows (and lay W_hat over the gather).
    def _load_channels(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        if not np.array_equal(loaded.cpu().numpy(), self.global_channels):
            raise ValueError("coco_gate.channels in the checkpoint disagree with config.json coco.channels; "
                             "re-export the directory with `coco-tools ne`")
        param.data.copy_(torch.as_tensor(self.plan.local))

    def _load_rows(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded.float()[torch.as_tensor(self.plan.rows)])

    def _load_w_hat(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        param.data.copy_(torch.from_numpy(self.plan.w_hat_rows(loaded.float().cpu().numpy())))

    def _gather(self, e: torch.Tensor) -> torch.Tensor:
        """[tokens, S_r] engagement -> every rank's, padded to P each: [tokens, tp * P]."""
        e = nn.functional.pad(e, (0, self.plan.pad - e.shape[-1]))
        return tensor_model_parallel_all_gather(e, dim=-1)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: [tokens, q_size + 2 * kv_size] of this rank -> the same with the gate applied."""
        return apply_gate(qkv, self.channels, self.mu, self.sigma, self.w, self.w_hat, self.alpha, self.beta,
                          self.lam, gather=self._gather if self.tp > 1 else None)


def _make_gate(attn: LlamaAttention, config, prefix: str) -> CocoGate | None:
    if getattr(config, "coco", None) is None:  # a base model run under this class (identify --backend vllm)
        return None
    channels = config.coco["channels"][extract_layer_index(prefix)]
    if not channels:
        return None
    heads = HeadLayout(attn.total_num_heads, attn.total_num_kv_heads, attn.head_dim)
    return CocoGate(channels, heads, config.coco)


class _GatedQKV:
    """Mixin for vLLM attention classes: the packed projection with the NE gate applied (and,
    while identification runs inside the engine, its output recorded first)."""

    coco_gate: CocoGate | None
    coco_layer: int

    def gated_qkv(self, hidden_states: torch.Tensor):
        qkv, _ = self.qkv_proj(hidden_states)  # [tokens, q_size + 2 * kv_size]
        if RECORDER.active:  # identify --backend vllm runs eager: never true inside a compiled graph
            RECORDER.record(self.coco_layer, qkv)
        if self.coco_gate is not None:
            qkv = self.coco_gate(qkv)
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class CocoLlamaAttention(_GatedQKV, LlamaAttention):
    def __init__(self, config, *args, prefix: str = "", **kwargs):
        super().__init__(config, *args, prefix=prefix, **kwargs)
        self.coco_layer = extract_layer_index(prefix)
        self.coco_gate = _make_gate(self, config, prefix)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.gated_qkv(hidden_states)  # LlamaAttention.forward, gated
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class CocoMistralAttention(_GatedQKV, MistralAttention):
    def __init__(self, config, *args, prefix: str = "", **kwargs):
        super().__init__(config, *args, prefix=prefix, **kwargs)
        self.coco_layer = extract_layer_index(prefix)
        self.coco_gate = _make_gate(self, config, prefix)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.gated_qkv(hidden_states)  # MistralAttention.forward, gated
        q, k = self.rotary_emb(positions, q, k)
        if self.do_llama_4_scaling:
            q = (q * self._get_llama_4_attn_scale(positions)).to(q.dtype)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class CocoLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None):
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config,
                         attn_layer_type=CocoLlamaAttention)


class CocoMistralDecoderLayer(MistralDecoderLayer):
    """MistralDecoderLayer hard-codes MistralAttention, so this layer builds through
    LlamaDecoderLayer's `attn_layer_type` and adds Mistral's own state (forward is Mistral's)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None):
        LlamaDecoderLayer.__init__(self, vllm_config=vllm_config, prefix=prefix, config=config,
                                   attn_layer_type=CocoMistralAttention)
        self.layer_idx = int(prefix.split(sep=".")[-1])
        config = config or vllm_config.model_config.hf_config
        if getattr(config, "ada_rms_norm_t_cond", False):
            raise NotImplementedError("NE-COCO does not support Mistral's ada_rms_norm_t_cond variant")
        self.ada_rms_norm_t_cond = None


class _StepInputs:
    """Mixin for the CausalLM classes: hands each step's input ids and positions to the recorder
    while identification runs inside the engine (the attention layers see neither)."""

    def forward(self, input_ids, positions, *args, **kwargs):
        if RECORDER.active:
            RECORDER.begin_step(input_ids, positions)
        return super().forward(input_ids, positions, *args, **kwargs)


class CocoLlamaForCausalLM(_StepInputs, LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type=CocoLlamaDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)


class CocoMistralForCausalLM(_StepInputs, MistralForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type=CocoMistralDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
