"""NE-COCO models for vLLM: Llama and Mistral with the NE gate inside the attention path.

Subclassed through vLLM's injection points (`attn_layer_type`, `layer_type`); nothing of vLLM is
patched. The gate acts on the packed `qkv_proj` output, before rotary embedding and the
paged-attention call, through `gate.apply_gate` (the same function as the Hugging Face reference).
Each tensor-parallel rank holds exactly the gate channels of its own q/k/v shards (sharding.py).
Imported lazily by vLLM through the plugin's "module:Class" registration.

Per-request settings (serve/request_settings.py) reach the layers as per-token rows of `CocoStep`,
persistent buffers that every gate and named edit shares. The model runner of `coco-tools serve`
(serve/per_request.py) writes the step's rows in place before each forward, so compiled graphs
read the new values without any Python running inside them; a forward nobody fills (plain
`vllm serve DIR`, warm-up) reads the directory's defaults.
"""

from __future__ import annotations

import os

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

from vllm_coco.core.errors import CocoError
from vllm_coco.core.ne_format import NEDirectory
from vllm_coco.core.sharding import HeadLayout, shard_plan
from vllm_coco.edit.gate import apply_gate
from vllm_coco.identify.engine_capture import RECORDER


class CocoStep(nn.Module):
    """The per-token settings of the step being run, one row per token of the packed batch:
    the gate's alpha/beta/lam `[max_tokens, 1]` and, per named edit, whether it is on (`on:
    [max_tokens, K]`: its strength, coco_scale; 0 where off). Rows past a step's tokens keep stale
    but finite values (padding tokens' outputs are discarded)."""

    def __init__(self, max_tokens: int, coco: dict):
        super().__init__()
        f32 = dict(dtype=torch.float32)
        self.register_buffer("alpha", torch.full((max_tokens, 1), float(coco["alpha"]), **f32), persistent=False)
        self.register_buffer("beta", torch.full((max_tokens, 1), float(coco["beta"]), **f32), persistent=False)
        self.register_buffer("lam", torch.full((max_tokens, 1), float(coco["lam"]), **f32), persistent=False)
        self.register_buffer("on", torch.zeros(max_tokens, len(coco.get("edits", [])), **f32), persistent=False)
        self.edit_names = [e["name"] for e in coco.get("edits", [])]
        self.defaults = (float(coco["alpha"]), float(coco["beta"]), float(coco["lam"]))

    def fill(self, alpha: torch.Tensor, beta: torch.Tensor, lam: torch.Tensor, on: torch.Tensor) -> None:
        """Write the step's rows in place (CPU tensors: alpha/beta/lam [n, 1], on [n, K]); the
        copy is asynchronous on a device, and the buffers keep their addresses (graph-safe)."""
        n = alpha.shape[0]
        for buf, src in ((self.alpha, alpha), (self.beta, beta), (self.lam, lam), (self.on, on)):
            buf[:n].copy_(src, non_blocking=True)

    def reset(self) -> None:
        """Every row back to the directory's default (no named edit on)."""
        a, b, lam = self.defaults
        self.alpha.fill_(a)
        self.beta.fill_(b)
        self.lam.fill_(lam)
        self.on.zero_()

    def bind(self, module: nn.Module) -> None:
        """Share the step's buffers with a gate or named edit (same storage, not state_dict)."""
        for name in ("alpha", "beta", "lam", "on"):
            module.register_buffer("step_" + name, getattr(self, name), persistent=False)


class _ShardedChannels(nn.Module):
    """This rank's share of a per-layer channel table whose checkpoint tensors hold the whole layer:
    `channels` (this rank's local indices) and per-channel rows, each kept by its weight_loader.
    `source` names the checkpoint tensors and config key in the error a mismatch raises."""

    source: str

    def __init__(self, channels: list[int], heads: HeadLayout, rows: dict[str, float]):
        super().__init__()
        self.tp = get_tensor_model_parallel_world_size()
        self.plan = shard_plan(channels, heads, self.tp, get_tensor_model_parallel_rank())
        self.global_channels = np.asarray(channels, dtype=np.int64)
        s_r = len(self.plan.rows)
        self.channels = nn.Parameter(torch.tensor(self.plan.local, dtype=torch.int64), requires_grad=False)
        set_weight_attrs(self.channels, {"weight_loader": self._load_channels})
        for name, init in rows.items():  # [S_r] float32 each
            p = nn.Parameter(torch.full((s_r,), init, dtype=torch.float32), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": self._load_rows})
            self.register_parameter(name, p)

    def _load_channels(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        if not np.array_equal(loaded.cpu().numpy(), self.global_channels):
            raise ValueError(f"{self.source} in the checkpoint disagree with config.json; "
                             "re-export the directory with `coco-tools ne`")
        param.data.copy_(torch.as_tensor(self.plan.local))

    def _load_rows(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded.float()[torch.as_tensor(self.plan.rows)])


class CocoGate(_ShardedChannels):
    """This rank's share of one layer's NE gate. Parameters are named like the checkpoint's
    `model.layers.{l}.self_attn.coco_gate.{channels,mu,sigma,w,w_hat}`, which hold the whole
    layer; each weight_loader keeps this rank's part (W_hat laid over the all-gather)."""

    source = "coco_gate.channels (config.json coco.channels)"

    def __init__(self, channels: list[int], heads: HeadLayout):
        super().__init__(channels, heads, {"mu": 0.0, "sigma": 1.0, "w": 0.0})
        self.w_hat = nn.Parameter(torch.zeros(len(self.plan.rows), self.tp * self.plan.pad, dtype=torch.float32),
                                  requires_grad=False)
        set_weight_attrs(self.w_hat, {"weight_loader": self._load_w_hat})

    def _load_w_hat(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        param.data.copy_(torch.from_numpy(self.plan.w_hat_rows(loaded.float().cpu().numpy())))

    def _gather(self, e: torch.Tensor) -> torch.Tensor:
        """[tokens, S_r] engagement -> every rank's, padded to P each: [tokens, tp * P]."""
        e = nn.functional.pad(e, (0, self.plan.pad - e.shape[-1]))
        return tensor_model_parallel_all_gather(e, dim=-1)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: [tokens, q_size + 2 * kv_size] of this rank -> the same with the gate applied at
        each token's own strength (the step's rows: equal on every rank, so the all-gather agrees)."""
        n = qkv.shape[0]
        return apply_gate(qkv, self.channels, self.mu, self.sigma, self.w, self.w_hat, self.step_alpha[:n],
                          self.step_beta[:n], self.step_lam[:n], gather=self._gather if self.tp > 1 else None)


class CocoNamedEdit(_ShardedChannels):
    """This rank's share of one layer's named constant edit (h <- gain * h + offset on its
    channels), applied to the tokens whose row of the step has it on. Parameters are named like
    the checkpoint's `model.layers.{l}.self_attn.coco_edits.{name}.{channels,gain,offset}`."""

    source = "coco_edits channels (config.json coco.edits)"

    def __init__(self, channels: list[int], heads: HeadLayout, column: int):
        super().__init__(channels, heads, {"gain": 1.0, "offset": 0.0})
        self.column = column

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: [tokens, width] -> the edit on the tokens that have it on; exactly qkv elsewhere
        (x * (1 + 0 * (g - 1)) + 0 * o = x)."""
        on = self.step_on[: qkv.shape[0], self.column:self.column + 1]  # [tokens, 1]
        sel = qkv.index_select(1, self.channels).float()  # [tokens, R_r]
        out = sel * (1.0 + on * (self.gain - 1.0)) + on * self.offset  # [tokens, R_r]
        return qkv.index_copy(1, self.channels, out.to(qkv.dtype))


def _make_edits(attn: LlamaAttention, config, prefix: str) -> tuple[CocoGate | None, nn.ModuleDict | None]:
    """The layer's gate and its named edits (None where it has none)."""
    if getattr(config, "coco", None) is None:  # a base model run under this class (identify --backend vllm)
        return None, None
    layer = extract_layer_index(prefix)
    heads = HeadLayout(attn.total_num_heads, attn.total_num_kv_heads, attn.head_dim)
    channels = config.coco["channels"][layer]
    gate = CocoGate(channels, heads) if channels else None
    named = {e["name"]: CocoNamedEdit(e["channels"][layer], heads, k)
             for k, e in enumerate(config.coco.get("edits", [])) if e["channels"][layer]}
    return gate, (nn.ModuleDict(named) if named else None)


class _GatedQKV:
    """Mixin for vLLM attention classes: the packed projection with the NE gate applied (and,
    while identification runs inside the engine, its output recorded first)."""

    coco_gate: CocoGate | None
    coco_edits: nn.ModuleDict | None
    coco_layer: int

    def gated_qkv(self, hidden_states: torch.Tensor):
        qkv, _ = self.qkv_proj(hidden_states)  # [tokens, q_size + 2 * kv_size]
        if RECORDER.active:  # identify --backend vllm runs eager: never true inside a compiled graph
            RECORDER.record(self.coco_layer, qkv)
        if self.coco_edits is not None:  # a token has one edit on at most: the others are exact identities
            for edit in self.coco_edits.values():
                qkv = edit(qkv)
        if self.coco_gate is not None:
            qkv = self.coco_gate(qkv)
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class CocoLlamaAttention(_GatedQKV, LlamaAttention):
    def __init__(self, config, *args, prefix: str = "", **kwargs):
        super().__init__(config, *args, prefix=prefix, **kwargs)
        self.coco_layer = extract_layer_index(prefix)
        self.coco_gate, self.coco_edits = _make_edits(self, config, prefix)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.gated_qkv(hidden_states)  # LlamaAttention.forward, gated
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class CocoMistralAttention(_GatedQKV, MistralAttention):
    def __init__(self, config, *args, prefix: str = "", **kwargs):
        super().__init__(config, *args, prefix=prefix, **kwargs)
        self.coco_layer = extract_layer_index(prefix)
        self.coco_gate, self.coco_edits = _make_edits(self, config, prefix)

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
    """Mixin for the CausalLM classes: owns the step's per-token settings (`coco_step`, shared by
    every gate and named edit), and hands each step's input ids and positions to the recorder
    while identification runs inside the engine (the attention layers see neither)."""

    coco_step: CocoStep | None

    def _bind_step(self, vllm_config: VllmConfig) -> None:
        coco = getattr(vllm_config.model_config.hf_config, "coco", None)
        self.coco_step = None
        if coco is None:
            return
        _check_directory(vllm_config.model_config.model)
        self.coco_step = CocoStep(vllm_config.scheduler_config.max_num_batched_tokens, coco)
        for m in self.modules():
            if isinstance(m, (CocoGate, CocoNamedEdit)):
                self.coco_step.bind(m)

    def forward(self, input_ids, positions, *args, **kwargs):
        if RECORDER.active:
            RECORDER.begin_step(input_ids, positions)
        return super().forward(input_ids, positions, *args, **kwargs)


def _check_directory(model: str) -> None:
    """The NE directory passes the checks every other reader applies (core/ne_format.py: settings in
    range, gate tensors finite float32 of the right shapes), so plain `vllm serve DIR` refuses a
    damaged one at load, naming the problem, instead of serving NaN."""
    if not os.path.isdir(model):  # a hub id: its files are vLLM's to fetch and check
        return
    try:
        NEDirectory.read(model)
    except CocoError as exc:
        raise ValueError(str(exc)) from None


class CocoLlamaForCausalLM(_StepInputs, LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type=CocoLlamaDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self._bind_step(vllm_config)


class CocoMistralForCausalLM(_StepInputs, MistralForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type=CocoMistralDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self._bind_step(vllm_config)
