"""Per-neuron intensities of every q/k/v output channel, streamed to an on-disk float16 matrix.

Intensity of neuron n on example x (spec, "Intensity"): mean over the example's span of tokens
(the response tokens, teacher-forced) of |h_n(t)|, where h is the q/k/v projection output before
rotary embedding. Rows go to a safetensors file written in place through a memmap, so memory
stays at one batch however large the data set is. The calibration statistics (mean and std of
|h| over all span tokens) are accumulated on the side for NE-COCO.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .models import NeuronLayout, attention_layers, layout_of

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
    """Read-only memmap of a matrix written by `create_matrix` (or any 2-D F16 safetensors)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    meta = header[MATRIX_NAME]
    return np.memmap(path, dtype=np.float16, mode="r", offset=8 + n + meta["data_offsets"][0],
                     shape=tuple(meta["shape"]))


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


class _Recorder:
    """Forward hooks that pool |h| of each q/k/v projection into one [batch, neurons] buffer."""

    def __init__(self, model, layout: NeuronLayout, device):
        import torch

        self.layout = layout
        self.sum = torch.zeros(layout.total, dtype=torch.float64, device=device)  # Σ|h| over span tokens
        self.sumsq = torch.zeros(layout.total, dtype=torch.float64, device=device)  # Σ|h|²
        self.signed = torch.zeros(layout.total, dtype=torch.float64, device=device)  # Σh
        self.buf = None  # [batch, neurons] float32
        self.weights = None  # [batch, tokens] span mask / span length
        self.mask = None  # [batch, tokens] span mask
        self.handles = []
        for layer, attn in enumerate(attention_layers(model)):
            for proj in ("q", "k", "v"):
                off = layout.flat(layer, proj, 0)
                module = getattr(attn, f"{proj}_proj")
                self.handles.append(module.register_forward_hook(self._hook(off, layout.proj_size(proj))))

    def _hook(self, off: int, size: int):
        import torch

        def hook(module, args, out):
            h = out.float()  # [batch, tokens, size]
            a = h.abs()
            self.buf[:, off:off + size] = torch.einsum("bt,btc->bc", self.weights, a)
            self.sumsq[off:off + size] += torch.einsum("bt,btc->c", self.mask, a * a).double()
            self.signed[off:off + size] += torch.einsum("bt,btc->c", self.mask, h).double()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _batches(spans: list[Span], batch_size: int):
    """Indices grouped into batches of similar length (longest first: padding and OOM show early)."""
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i].ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


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
    return ids.to(device), attn.to(device), span.to(device)


def capture(model, spans: list[Span], matrix_path: Path, batch_size: int = 8, pad_id: int = 0,
            progress: bool = True) -> CaptureResult:
    """Run every span through the model (teacher-forced, no grad) and write intensities row by row.

    Row i of the matrix is spans[i]. Only the decoder stack runs (no LM head: logits are not needed).
    """
    import torch
    from tqdm.auto import tqdm

    layout = layout_of(model)
    device = next(model.parameters()).device
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    matrix = create_matrix(matrix_path, len(spans), layout.total)
    rec = _Recorder(model, layout, device)
    tokens = span_tokens = 0
    col_sum = np.zeros(layout.total, dtype=np.float64)
    bar = tqdm(total=len(spans), desc="capture", unit="seq", disable=not progress)
    try:
        with torch.no_grad():
            for idx in _batches(spans, batch_size):
                ids, attn, span = _collate(spans, idx, pad_id, device)
                count = span.sum(1, keepdim=True)  # [batch, 1]
                rec.mask, rec.weights = span, span / count
                rec.buf = torch.empty((len(idx), layout.total), dtype=torch.float32, device=device)
                decoder(input_ids=ids, attention_mask=attn, use_cache=False)
                rec.sum += (rec.buf * count).sum(0).double()
                block = rec.buf.cpu().numpy()  # [batch, neurons]
                col_sum += block.sum(0)
                matrix[np.asarray(idx)] = block.astype(np.float16)
                tokens += int(attn.sum())
                span_tokens += int(count.sum())
                bar.update(len(idx))
                bar.set_postfix(tok=tokens)
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
                         mean_intensity=col_sum / max(len(spans), 1))


def response_spans(tokenizer, pairs, chat: bool = True) -> list[Span]:
    """Two spans per pair, biased then unbiased (rows 2i and 2i+1), pooled over the response;
    `chat`: render the prompt with the tokenizer's chat template when it has one."""
    from .data import encode_example

    spans = []
    for p in pairs:
        for response in (p.biased, p.unbiased):
            ids, start = encode_example(tokenizer, p.prompt, response, chat=chat)
            spans.append(Span(ids, start, len(ids)))
    return spans
