"""Identification inside vLLM (`coco-tools identify --backend vllm`): the same per-neuron
intensities as `capture.py`, recorded in the engine's own forward, on every rank it runs.

Three parts, one per process role:

* `EngineRecorder` (worker, one per process, `RECORDER`): the plugin's attention layers hand it
  their packed q/k/v projection output (`vllm_models._GatedQKV`), before the gate and rotary
  embedding, exactly where the Hugging Face hooks read q_proj/k_proj/v_proj. The model's forward
  first gives it the step's input ids and positions (`begin_step`). A prompt is found in the packed
  step by its tokens: rows whose positions restart at 0 open a sequence, and the sequence's token
  ids are the key of the spans the driver registered. A rank pools |h| over each span of its own
  q/k/v columns (tensor parallel: its head shards; pipeline parallel: its layers only).
* `CaptureExtension` (worker, vLLM's `worker_extension_cls` injection point): the RPCs the driver
  calls through `LLM.collective_rpc`: register spans, collect the pooled rows.
* `capture` (driver): starts one engine on the base model under the plugin's architecture
  (`hf_overrides`; eager, so the recorder's Python runs every step; no prefix caching, so every
  token is computed; no chunked prefill, so a prompt is whole in one step), submits the spans in
  blocks (each prompt once, one output token), lays every rank's columns into the global neuron
  numbering (`sharding.rank_channels`) and writes the same float16 matrix and `CaptureResult` as
  the Hugging Face path.
"""

from __future__ import annotations

# Lazy imports: vLLM, torch, safetensors, numpy are imported inside the functions that use them
# (directly or through the modules they import), so importing this module stays light.
import math
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vllm_coco.core import names as N
from vllm_coco.core.engine import shutdown
from vllm_coco.core.errors import CocoError
from vllm_coco.core.models import NeuronLayout
from vllm_coco.core.ne_format import BASE_TO_NE_ARCH
from vllm_coco.identify.capture import CaptureResult, Span, _check_spans, create_matrix

EXTENSION = "vllm_coco.identify.engine_capture.CaptureExtension"
BLOCK_VALUES = 2 ** 25  # pooled float32 values per block and rank sent back at once (128 MB)


class EngineRecorder:
    """Worker side: pools |h| of this rank's packed q/k/v columns over registered spans.

    `table` maps a prompt's token ids to its spans [(row, start, end)]; each prompt is recorded
    once (`done`), whatever else the engine runs (padding rows, a request seen twice) is ignored,
    and the driver checks that every row came back.
    """

    def __init__(self):
        self.table: dict[tuple, list[tuple[int, int, int]]] | None = None

    @property
    def active(self) -> bool:
        return self.table is not None

    def begin(self, entries: list[tuple[list[int], int, int, int]]) -> None:
        """entries: [(prompt token ids, row, start, end)]; clears what an earlier block left."""
        self.table = {}
        for ids, row, start, end in entries:
            self.table.setdefault(tuple(ids), []).append((int(row), int(start), int(end)))
        self.done: set[tuple] = set()
        self.rows: list[int] = []  # matrix row of each pooled row, in recording order
        self.pooled: dict[int, list] = {}  # layer -> per step [step rows, width] float32, mean |h| per row
        self.signed: dict[int, list] = {}  # layer -> per step [step rows, width] float32, mean h per row
        self.sums: dict[int, list] = {}  # layer -> [Σ|h|, Σ|h|², Σh] over span tokens, each [width] float64
        self.span_tokens = 0
        self._step = None

    def begin_step(self, input_ids, positions) -> None:
        """Called by the model's forward before its layers: find the registered prompts in the step."""
        import torch

        ids, pos = input_ids.tolist(), positions.tolist()
        starts = [i for i in range(len(pos)) if pos[i] == 0]
        rows, flat, lengths = [], [], []
        for k, a in enumerate(starts):
            b = starts[k + 1] if k + 1 < len(starts) else len(pos)
            while b > a + 1 and pos[b - 1] != b - 1 - a:  # a padded tail does not continue the sequence
                b -= 1
            key = tuple(ids[a:b])
            if key in self.done or key not in self.table:
                continue
            self.done.add(key)
            for row, start, end in self.table[key]:
                rows.append(row)
                flat.extend(range(a + start, a + end))
                lengths.append(end - start)
        if not rows:
            self._step = None
            return
        dev = input_ids.device
        which = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lengths))  # [n_span] row of each token
        weights = torch.zeros(len(rows), len(flat), dtype=torch.float32)  # [step rows, n_span]
        weights[which, torch.arange(len(flat))] = 1.0 / torch.tensor(lengths, dtype=torch.float32)[which]
        self._step = (torch.tensor(flat, device=dev), weights.to(dev))
        self.rows.extend(rows)
        self.span_tokens += len(flat)

    def record(self, layer: int, qkv) -> None:
        """qkv: [tokens, this rank's q_size + 2 * kv_size], the projection output of `layer`."""
        import torch

        if self._step is None:
            return
        idx, weights = self._step
        h = qkv.index_select(0, idx).float()  # [n_span, width]
        a = h.abs()
        self.pooled.setdefault(layer, []).append(weights @ a)  # [step rows, width]: mean over each span
        self.signed.setdefault(layer, []).append(weights @ h)  # [step rows, width]
        a64 = a.double()
        step = [a64.sum(0), (a64 * a64).sum(0), h.sum(0, dtype=torch.float64)]  # [width] each
        acc = self.sums.setdefault(layer, step)
        if acc is not step:
            for x, y in zip(acc, step):
                x += y

    def collect(self) -> dict:
        """This rank's share of the block: rows, per layer pooled [rows, width] and the sums."""
        import torch

        if self.table is None:
            raise RuntimeError("coco_capture_collect without coco_capture_begin")
        out = {"rows": _pack(np.asarray(self.rows, dtype=np.int64)), "span_tokens": self.span_tokens,
               "layers": [[layer, _pack(torch.cat(self.pooled[layer]).cpu().numpy()),
                           _pack(np.stack([x.cpu().numpy() for x in self.sums[layer]])),
                           _pack(torch.cat(self.signed[layer]).cpu().numpy())] for layer in self.pooled]}
        self.begin([])  # frees this block's rows
        self.table = None
        return out


RECORDER = EngineRecorder()


# What a worker returns travels through vLLM's msgpack encoder, which (without
# VLLM_ALLOW_INSECURE_SERIALIZATION) gives numpy arrays back as bare (dtype, shape, buffer index)
# triples: arrays go as plain bytes and are rebuilt on the driver.
def _pack(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def _unpack(d: dict) -> np.ndarray:
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])


class CaptureExtension:
    """Methods added to every vLLM worker (engine option `worker_extension_cls`), called by the
    driver through `LLM.collective_rpc`; `self` is the worker."""

    def coco_rank(self) -> dict:
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return {"tp": get_tensor_model_parallel_world_size(), "tp_rank": get_tensor_model_parallel_rank(),
                "pp_rank": get_pp_group().rank_in_group}

    def coco_capture_begin(self, entries) -> None:
        RECORDER.begin(entries)

    def coco_capture_collect(self) -> dict:
        return {**self.coco_rank(), **RECORDER.collect()}


def _layout(config) -> tuple[NeuronLayout, object]:
    from vllm_coco.core.sharding import HeadLayout

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    heads = HeadLayout(config.num_attention_heads, kv, head_dim)
    return NeuronLayout(config.num_hidden_layers, heads.q_size, heads.kv_size), heads


def _columns(layout: NeuronLayout, heads, shares: list[dict]) -> list[tuple[int, np.ndarray, list, dict]]:
    """[(layer, the global neuron ids of the rank's columns [rank width], the rank's arrays of that
    layer, the share)] for every layer each rank's share holds; every layer must be held by some rank."""
    from vllm_coco.core.sharding import rank_channels

    out = []
    for share in shares:
        channels = rank_channels(heads, share["tp"], share["tp_rank"])  # [local width] packed [q|k|v] channels
        out.extend((layer, layer * layout.per_layer + channels, [_unpack(a) for a in arrays], share)
                   for layer, *arrays in share["layers"])
    held = sorted({o[0] for o in out})
    if held != list(range(layout.num_layers)):
        raise CocoError(f"the engine recorded layers {held}, not all "
                        f"{layout.num_layers}; is the model served by the vllm-coco plugin (pip install -e .)?")
    return out


class EngineCapture:
    """One vLLM engine on a base model for the whole identify job: the model's answers (behavior
    mode) and the capture run on it; `close` stops it."""

    def __init__(self, model_dir: Path, dtype: str = "float32", engine: dict | None = None):
        from vllm_coco.core.models import auto_config

        config = auto_config(model_dir)
        arch = (getattr(config, "architectures", None) or ["?"])[0]
        if arch not in BASE_TO_NE_ARCH:
            raise CocoError(f"--backend vllm identifies {' and '.join(BASE_TO_NE_ARCH)} models, not {arch}; "
                            "use --backend hf")
        self.model_dir = Path(model_dir)
        self.layout, self.heads = _layout(config)
        positions = getattr(config, "max_position_embeddings", None) or N.MAX_MODEL_LEN
        kwargs = dict(max_model_len=min(N.MAX_MODEL_LEN, positions), seed=0, **(engine or {}))
        kwargs.setdefault("max_num_batched_tokens", max(kwargs["max_model_len"], 4096))
        self.max_model_len = kwargs["max_model_len"]
        # CPU builds reserve VLLM_CPU_KVCACHE_SPACE GiB of KV cache (the default fails on 24 GiB): enough
        # for one step's tokens, with a margin
        width = 2 * config.num_hidden_layers * self.heads.kv_size * (4 if dtype == "float32" else 2)
        need = width * kwargs["max_num_batched_tokens"] * 1.25
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(need / 2 ** 30))))
        from vllm import LLM

        # eager: the recorder's Python runs every step; no prefix caching: every token is computed;
        # no chunked prefill: a prompt is whole in one step
        kwargs.update(model=str(model_dir), dtype=dtype, enforce_eager=True, enable_prefix_caching=False,
                      enable_chunked_prefill=False, worker_extension_cls=EXTENSION,
                      hf_overrides={"architectures": [BASE_TO_NE_ARCH[arch]]})
        self.llm = None
        self.llm = LLM(**kwargs)

    def close(self) -> None:
        """Stop the engine (its workers and their memory); idempotent."""
        if self.llm is not None:
            shutdown(self.llm)  # the engine process, its workers and client threads, now
            self.llm = None

    def prompts(self, spans: list[Span]):
        """The spans' token ids as vLLM prompts."""
        from vllm.inputs import TokensPrompt

        longest = max((len(s.ids) for s in spans), default=0)
        if longest >= self.max_model_len:
            raise CocoError(f"a prompt of {longest} tokens does not fit the engine's context of {self.max_model_len}; "
                            "pass a larger --max-model-len to the engine or shorter data")

        return [TokensPrompt(prompt_token_ids=list(s.ids)) for s in spans]

    def option_logliks(self, spans: list[Span], progress: bool = False) -> np.ndarray:
        """As `behavior.option_logliks`: the summed log-likelihood of each span's tokens [spans]."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate(self.prompts(spans), params, use_tqdm=progress)
        # the first token has no log-likelihood (prompt_logprobs[0] is None): skipped, as the HF path does
        return np.array([sum(o.prompt_logprobs[t][s.ids[t]].logprob for t in range(max(s.start, 1), s.end))
                         for s, o in zip(spans, outs)], dtype=np.float64)

    def weight_norms(self) -> np.ndarray:
        """L2 norm of every q/k/v weight row, in the global neuron numbering: [neurons]. Read from
        the checkpoint one tensor at a time (the engine's CPU kernels may repack their weights)."""
        from safetensors import safe_open

        from vllm_coco.core.models import weight_files

        out = np.full(self.layout.total, np.nan)
        for path in weight_files(self.model_dir):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    parts = key.split(".")  # model.layers.{l}.self_attn.{q,k,v}_proj.weight
                    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[3] == "self_attn" \
                            and parts[4] in ("q_proj", "k_proj", "v_proj") and parts[5] == "weight":
                        off = self.layout.flat(int(parts[2]), parts[4][0], 0)
                        w = f.get_tensor(key).float()  # [out, hidden]
                        out[off:off + w.shape[0]] = w.norm(dim=1).numpy()
        if np.isnan(out).any():
            raise CocoError(f"{self.model_dir}: the checkpoint lacks some model.layers.*.self_attn.q/k/v_proj "
                            "weights; pass a Llama- or Mistral-style model directory")
        return out

    def capture(self, spans: list[Span], matrix_path: Path, progress: bool = True,
                row_coef: np.ndarray | None = None) -> CaptureResult:
        """Run every span through the engine and write intensities row by row (row i = spans[i]),
        as `capture.capture` does (spans end at their prompt's last token; `row_coef` as there)."""
        from vllm import SamplingParams

        _check_spans(spans)
        if any(s.end != len(s.ids) for s in spans):
            raise ValueError("the engine capture pools spans that end at the last prompt token")
        layout = self.layout
        matrix = create_matrix(matrix_path, len(spans), layout.total)
        sums = np.zeros((3, layout.total), dtype=np.float64)  # Σ|h|, Σ|h|², Σh over span tokens
        col_sum = np.zeros(layout.total, dtype=np.float64)
        coef = np.zeros((0, len(spans))) if row_coef is None else np.asarray(row_coef, dtype=np.float64)
        contrast = np.zeros((len(coef), layout.total), dtype=np.float64)  # [K, neurons]
        block = max(1, min(1024, BLOCK_VALUES // layout.total))
        params = SamplingParams(max_tokens=1, temperature=0.0)
        span_tokens = 0
        bar = tqdm(total=len(spans), desc="capture (vLLM)", unit="seq", disable=not progress)
        for b0 in range(0, len(spans), block):
            rows = range(b0, min(b0 + block, len(spans)))
            self.llm.collective_rpc("coco_capture_begin", args=([(spans[i].ids, i, spans[i].start, spans[i].end)
                                                                 for i in rows],))
            unique = list({tuple(spans[i].ids): spans[i] for i in rows}.values())  # each prompt once
            self.llm.generate(self.prompts(unique), params, use_tqdm=False)
            shares = self.llm.collective_rpc("coco_capture_collect")
            for share in shares:
                share["rows"] = _unpack(share["rows"])  # [block rows] matrix row of each recorded row
                if sorted(share["rows"].tolist()) != list(rows):  # the engine options above prevent it: a bug
                    raise RuntimeError(f"rank {share['tp_rank']} (pipeline stage {share['pp_rank']}) recorded "
                                       f"{share['rows'].size} of {len(rows)} prompts whole")
            out = np.zeros((len(rows), layout.total), dtype=np.float32)  # [block rows, neurons]
            signed = np.zeros_like(out)  # [block rows, neurons]: mean h per row
            filled = np.zeros(layout.total, dtype=bool)
            for _, g, (pooled, s, h), share in _columns(layout, self.heads, shares):
                out[np.ix_(share["rows"] - b0, g)] = pooled  # [rows, rank width]
                signed[np.ix_(share["rows"] - b0, g)] = h
                new = ~filled[g]  # a replicated KV column arrives from several ranks: count it once
                sums[:, g[new]] += s[:, new]
                filled[g] = True
            span_tokens += shares[0]["span_tokens"]
            col_sum += out.sum(0)
            contrast += coef[:, rows] @ signed.astype(np.float64)  # [K, neurons]
            matrix[b0:b0 + len(rows)] = out.astype(np.float16)
            bar.update(len(rows))
        bar.close()
        matrix.flush()
        del matrix
        mean = sums[0] / span_tokens
        var = sums[1] / span_tokens - mean ** 2
        return CaptureResult(layout=layout, rows=len(spans), tokens=sum(len(s.ids) for s in spans),
                             span_tokens=span_tokens, calib_mean=mean, calib_std=np.sqrt(np.clip(var, 0, None)),
                             act_mean=sums[2] / span_tokens, mean_intensity=col_sum / max(len(spans), 1),
                             contrast=contrast)
