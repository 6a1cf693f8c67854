"""Per-neuron intensities of every q/k/v output channel, streamed to an on-disk float16 matrix.

Intensity of neuron n on example x (spec, "Intensity"): mean over the example's span of tokens
(the response tokens, teacher-forced) of |h_n(t)|, where h is the q/k/v projection output before
rotary embedding. Rows go to a safetensors file written in place through a memmap, so memory
stays at one batch however large the data set is. The calibration statistics (mean and std of
|h| over all span tokens) are accumulated on the side for NE-COCO.
"""

from __future__ import annotations

# Lazy imports: torch is imported inside the functions that use it (directly or through the modules
# they import), so importing this module stays light.
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vllm_coco.core.errors import CocoError
from vllm_coco.core.models import NeuronLayout, attention_layers, layout_of
from vllm_coco.core.names import PROJS
from vllm_coco.data.contrast import encode_example

MATRIX_NAME = "intensities"


# --------------------------------------------------------------------------- on-disk matrix

def create_matrix(path: Path, rows: int, cols: int) -> np.memmap:
    """A float16 [rows, cols] safetensors file, returned as a writable memmap of its data."""
    header = {MATRIX_NAME: {"dtype": "F16", "shape": [rows, cols], "data_offsets": [0, rows * cols * 2]}}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors wants the data 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + rows * cols * 2)
    return np.memmap(path, dtype=np.float16, mode="r+", offset=8 + len(blob), shape=(rows, cols))


def open_matrix(path: Path) -> np.memmap:
    """Read-only memmap of a matrix written by `create_matrix` (or any 2-D F16 safetensors).
    CocoError naming the file when its header is not that: another dtype (a float32 matrix read
    as float16 would be silently misread), another rank, or data the file does not hold."""
    def bad(problem: str):
        return CocoError(f"{path}: {problem}; re-run `coco-tools identify` to rewrite it")

    size = Path(path).stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > min(size, 1 << 20):
                raise ValueError("header length")
            meta = json.loads(fh.read(n))[MATRIX_NAME]
        rows, cols = (int(x) for x in meta["shape"])
        start, end = (int(x) for x in meta["data_offsets"])
        dtype = meta["dtype"]
    except (struct.error, ValueError, KeyError, TypeError, RecursionError):  # truncated, garbage, not ours
        raise bad(f"is not a readable {MATRIX_NAME} matrix (a safetensors header with one 2-D F16 tensor)") from None
    if dtype != "F16":
        raise bad(f"holds {dtype} intensities, not F16 (float16)")
    if rows < 0 or cols < 0 or end - start != rows * cols * 2 or start < 0 or 8 + n + end > size:
        raise bad(f"its header ([{rows}, {cols}] at bytes {start}..{end}) does not match the {size}-byte file")
    return np.memmap(path, dtype=np.float16, mode="r", offset=8 + n + start, shape=(rows, cols))


# --------------------------------------------------------------------------- capture

@dataclass
class Span:
    """One sequence to run and the token positions [start, end) its intensities pool over."""

    ids: list[int]
    start: int
    end: int


@dataclass
class CaptureResult:
    layout: NeuronLayout
    rows: int
    tokens: int  # all tokens run through the model (including padding-free lengths)
    span_tokens: int  # tokens intensities were pooled over
    calib_mean: np.ndarray  # [neurons] float64, mean of |h| over span tokens (NE's mu)
    calib_std: np.ndarray  # [neurons] float64, std of |h| (NE's sigma)
    act_mean: np.ndarray  # [neurons] float64, mean of h itself (signed: what ablate-mean outputs)
    mean_intensity: np.ndarray  # [neurons] float64, mean over rows (the MACT statistic)
    contrast: np.ndarray  # [K, neurons] float64, row_coef @ (each row's mean of h over its span)


class _Recorder:
    """Forward hooks that pool |h| of each q/k/v projection into one [batch, neurons] buffer.

    Before each batch, `capture` sets `span_idx` and `weights` (from `_span_index`) and a fresh
    `buf`. A hook gathers the batch's span tokens from its projection's output and reduces only
    those: a response is a few tokens at the end of a long prompt, so the float32 copy and the
    reductions are a small fraction of what the forward itself touches.
    """

    def __init__(self, model, layout: NeuronLayout, device):
        import torch

        self.layout = layout
        self.sum = torch.zeros(layout.total, dtype=torch.float64, device=device)  # Σ|h| over span tokens
        self.sumsq = torch.zeros(layout.total, dtype=torch.float64, device=device)  # Σ|h|²
        self.signed = torch.zeros(layout.total, dtype=torch.float64, device=device)  # Σh
        self.contrast = None  # [K, neurons] float64: Σ over rows of coef[k, row] * (the row's mean h)
        self.coef = None  # [K, batch] float64: this batch's columns of capture's row_coef
        self.buf = None  # [batch, neurons] float32
        self.span_idx = None  # [n_span] long: the span tokens' positions in the flattened [batch * tokens]
        self.weights = None  # [batch, n_span] float32: 1 / span length where the token is the row's, else 0
        self.handles = []
        for layer, attn in enumerate(attention_layers(model)):
            for proj in PROJS:
                off = layout.flat(layer, proj, 0)
                module = getattr(attn, f"{proj}_proj")
                self.handles.append(module.register_forward_hook(self._hook(off, layout.proj_size(proj))))

    def _hook(self, off: int, size: int):
        import torch

        def hook(module, args, out):
            # index_select with device-side indices: no boolean mask (its nonzero() would wait
            # for the device) and nothing read back, so the forward stays queued ahead of the GPU.
            if out.device != self.buf.device:  # a layer placed elsewhere by a device map
                out = out.to(self.buf.device)
            h = out.reshape(-1, size).index_select(0, self.span_idx).float()  # [n_span, size]
            a = h.abs()  # [n_span, size]
            self.buf[:, off:off + size] = self.weights @ a  # [batch, size]: mean over each row's span
            # The calibration std is sqrt(E|h|² - (E|h|)²): for a neuron with a large mean and a small
            # spread the two terms cancel, so both sums are taken in float64 from the same values
            # (float32 squares, or a mean from the float32 pooled rows, left a 7 % error on the GPU).
            a64 = a.double()  # [n_span, size]
            self.sum[off:off + size] += a64.sum(0)  # [size]
            self.sumsq[off:off + size] += (a64 * a64).sum(0)  # [size]
            self.signed[off:off + size] += h.sum(0, dtype=torch.float64)  # [size]
            if len(self.coef):
                self.contrast[:, off:off + size] += self.coef @ (self.weights @ h).double()  # [K, size]

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _batches(spans: list[Span], batch_size: int):
    """Indices grouped into batches of similar length (longest first: padding and OOM show early)."""
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i].ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _to_device(t, device):
    """A CPU tensor on `device`. To CUDA through pinned memory, non_blocking: a copy from pageable
    memory synchronizes the stream, which would drain the GPU before every batch."""
    import torch

    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _collate(spans: list[Span], idx: list[int], pad_id: int, device):
    """Right-padded input_ids / attention_mask and the span mask, all [batch, tokens]."""
    import torch

    width = max(len(spans[i].ids) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(idx), width), dtype=torch.long)
    span = torch.zeros((len(idx), width), dtype=torch.float32)
    for b, i in enumerate(idx):
        s = spans[i]
        ids[b, :len(s.ids)] = torch.tensor(s.ids)
        attn[b, :len(s.ids)] = 1
        span[b, s.start:s.end] = 1.0
    return _to_device(ids, device), _to_device(attn, device), _to_device(span, device)


def _span_index(spans: list[Span], idx: list[int], device):
    """Where a batch's span tokens are, built on the CPU (nothing waits for the device):
    positions in the flattened right-padded [batch * tokens] output [n_span] (row by row), the
    pooling weights [batch, n_span] (1 / span length on the row's own tokens) and the span
    lengths [batch, 1] float32, all on `device`."""
    import torch

    width = max(len(spans[i].ids) for i in idx)
    flat = torch.cat([torch.arange(b * width + spans[i].start, b * width + spans[i].end) for b, i in enumerate(idx)])
    lengths = [spans[i].end - spans[i].start for i in idx]
    row = torch.repeat_interleave(torch.arange(len(idx)), torch.tensor(lengths))  # [n_span] row of each token
    weights = torch.zeros((len(idx), len(flat)), dtype=torch.float32)
    weights[row, torch.arange(len(flat))] = 1.0 / torch.tensor(lengths, dtype=torch.float32)[row]
    count = torch.tensor(lengths, dtype=torch.float32)[:, None]
    return _to_device(flat, device), _to_device(weights, device), _to_device(count, device)


def _check_spans(spans: list[Span]) -> None:
    """Every span a non-empty range inside its sequence (an empty one would pool to 0/0)."""
    for i, s in enumerate(spans):
        if not 0 <= s.start < s.end <= len(s.ids):
            raise ValueError(f"span {i}: [{s.start}, {s.end}) is not a non-empty range of its {len(s.ids)} tokens")


def _write_rows(matrix: np.memmap, col_sum: np.ndarray, idx: list[int], rows, done) -> None:
    """One batch's rows [batch, neurons] (a float32 CPU tensor, complete once the CUDA event `done`
    is) into the matrix as float16, and their column sums into col_sum [neurons]."""
    if done is not None:
        done.synchronize()
    block = rows.numpy()  # [batch, neurons]
    col_sum += block.sum(0)
    matrix[np.asarray(idx)] = block.astype(np.float16)


def capture(model, spans: list[Span], matrix_path: Path, batch_size: int = 8, pad_id: int = 0,
            progress: bool = True, row_coef: np.ndarray | None = None) -> CaptureResult:
    """Run every span through the model (teacher-forced, no grad) and write intensities row by row.

    Row i of the matrix is spans[i]. `row_coef` [K, rows] weighs each row's signed mean activation
    (mean of h over its span) into K sums, CaptureResult.contrast: identify's mean differences
    between the unbiased and the biased rows of each category, docs/METHOD.md §1.4). Only the decoder
    stack runs (no LM head: logits are not needed). The only waits for the device are the batches'
    rows: each batch's rows are copied back (non_blocking on CUDA) and written to the matrix while the
    next batch runs.
    """
    import torch

    _check_spans(spans)
    layout = layout_of(model)
    device = next(model.parameters()).device
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    matrix = create_matrix(matrix_path, len(spans), layout.total)
    rec = _Recorder(model, layout, device)
    coef = np.zeros((0, len(spans))) if row_coef is None else np.asarray(row_coef, dtype=np.float64)
    rec.contrast = torch.zeros((len(coef), layout.total), dtype=torch.float64, device=device)
    tokens = span_tokens = 0
    col_sum = np.zeros(layout.total, dtype=np.float64)
    bar = tqdm(total=len(spans), desc="capture", unit="seq", disable=not progress)
    pending = None  # the previous batch's write, done once this batch is queued
    try:
        with torch.no_grad():
            for idx in _batches(spans, batch_size):
                ids, attn, _ = _collate(spans, idx, pad_id, device)
                rec.span_idx, rec.weights, _ = _span_index(spans, idx, device)
                rec.buf = torch.empty((len(idx), layout.total), dtype=torch.float32, device=device)
                rec.coef = torch.from_numpy(coef[:, idx]).to(device)  # [K, batch]
                decoder(input_ids=ids, attention_mask=attn, use_cache=False)
                if device.type == "cuda":  # into pinned memory, ready when `done` is
                    rows, done = rec.buf.to("cpu", non_blocking=True), torch.cuda.Event()
                    done.record()
                else:
                    rows, done = rec.buf.cpu(), None
                if pending is not None:
                    _write_rows(matrix, col_sum, *pending)
                    bar.update(len(pending[0]))
                pending = (idx, rows, done)
                tokens += sum(len(spans[i].ids) for i in idx)
                span_tokens += sum(spans[i].end - spans[i].start for i in idx)
                bar.set_postfix(tok=tokens)
            if pending is not None:
                _write_rows(matrix, col_sum, *pending)
                bar.update(len(pending[0]))
    finally:
        rec.remove()
        bar.close()
    matrix.flush()
    del matrix
    mean = (rec.sum / span_tokens).cpu().numpy()
    var = (rec.sumsq / span_tokens).cpu().numpy() - mean ** 2
    return CaptureResult(layout=layout, rows=len(spans), tokens=tokens, span_tokens=span_tokens,
                         calib_mean=mean, calib_std=np.sqrt(np.clip(var, 0, None)),
                         act_mean=(rec.signed / span_tokens).cpu().numpy(),
                         mean_intensity=col_sum / max(len(spans), 1), contrast=rec.contrast.cpu().numpy())


def response_spans(tokenizer, pairs, chat: bool = True) -> list[Span]:
    """Two spans per pair, biased then unbiased (rows 2i and 2i+1), pooled over the response;
    `chat`: render the prompt with the tokenizer's chat template when it has one."""
    spans = []
    for p in pairs:
        for response in (p.biased, p.unbiased):
            ids, start = encode_example(tokenizer, p.prompt, response, chat=chat)
            spans.append(Span(ids, start, len(ids)))
    return spans
