"""capture(): the span-gathering hooks give the same numbers as pooling |h| with a plain span mask.

The reference runs every span alone (no padding) through a float64 model, keeps each q/k/v
projection's full output and averages |h| over a 0/1 mask of the span. capture runs the same
spans in padded batches (several span lengths and positions in one batch) and pools in float32.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny

ROOT = Path(__file__).resolve().parents[1]

# (sequence length, start, end): a response at the end, the whole sequence, the middle, a
# one-token sequence, a decision token (the last), the first token of a long one, the inside
SHAPES = [(12, 9, 12), (5, 0, 5), (17, 3, 8), (1, 0, 1), (9, 8, 9), (17, 0, 1), (7, 2, 6)]


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny.tiny_config(layers=2)).double().eval()


def make_spans(seed=0):
    import random

    from vllm_coco.identify.capture import Span

    rng = random.Random(seed)
    return [Span([rng.randrange(4, 64) for _ in range(n)], start, end) for n, start, end in SHAPES]


def reference(model, spans):
    """(rows [spans, neurons], calib mean, calib std, act mean, mean intensity), float64, by masking."""
    import torch

    from vllm_coco.core.models import attention_layers, layout_of

    layout = layout_of(model)
    rows, span_h = [], []
    for s in spans:
        outs = {}
        handles = [getattr(attn, f"{p}_proj").register_forward_hook(
                       lambda m, a, o, key=(layer, p), outs=outs: outs.__setitem__(key, o[0].double()))
                   for layer, attn in enumerate(attention_layers(model)) for p in "qkv"]
        with torch.no_grad():
            model(input_ids=torch.tensor([s.ids]))
        for h in handles:
            h.remove()
        h = torch.zeros((len(s.ids), layout.total), dtype=torch.float64)  # [tokens, neurons]
        for (layer, p), o in outs.items():
            off = layout.flat(layer, p, 0)
            h[:, off:off + o.shape[1]] = o
        mask = torch.zeros(len(s.ids), dtype=torch.float64)  # [tokens]
        mask[s.start:s.end] = 1.0
        rows.append((mask[:, None] * h.abs()).sum(0) / mask.sum())
        span_h.append(h[mask.bool()])
    rows, h = torch.stack(rows).numpy(), torch.cat(span_h).numpy()  # [spans, neurons], [span tokens, neurons]
    return rows, np.abs(h).mean(0), np.abs(h).std(0), h.mean(0), rows.mean(0)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_capture_equals_a_masked_reference(model, tmp_path, monkeypatch, batch_size):
    import vllm_coco.identify.capture as cap

    bufs = []

    class Spy(cap._Recorder):  # keeps each batch's float32 rows (the matrix holds them as float16)
        buf = property(lambda self: self._buf, lambda self, v: (v is None or bufs.append(v), setattr(self, "_buf", v)))

    monkeypatch.setattr(cap, "_Recorder", Spy)
    spans = make_spans()
    res = cap.capture(model, spans, tmp_path / "m.safetensors", batch_size=batch_size, pad_id=0, progress=False)
    rows, mean, std, act, mean_int = reference(model, spans)
    assert res.tokens == sum(n for n, _, _ in SHAPES) and res.span_tokens == sum(e - s for _, s, e in SHAPES)
    assert res.rows == len(spans) and res.layout.total == rows.shape[1]
    batches = cap._batches(spans, batch_size)
    assert len(bufs) == len(batches) and max(len(b) for b in batches) == batch_size
    if batch_size > 1:
        assert len({len(spans[i].ids) for i in batches[0]}) > 1  # padding in a batch
    got = np.zeros_like(rows)
    for idx, buf in zip(batches, bufs):
        got[idx] = buf.numpy()
    np.testing.assert_allclose(got, rows, rtol=0, atol=1e-6)
    ref16 = rows.astype(np.float16)  # the matrix: the same rows rounded to float16 (one ulp apart at most)
    mat = np.asarray(cap.open_matrix(tmp_path / "m.safetensors"))
    assert mat.dtype == np.float16 and mat.shape == rows.shape
    assert np.all(np.abs(mat.astype(np.float64) - ref16) <= np.spacing(np.abs(ref16)))
    for name, want in (("calib_mean", mean), ("calib_std", std), ("act_mean", act), ("mean_intensity", mean_int)):
        np.testing.assert_allclose(getattr(res, name), want, rtol=0, atol=1e-6, err_msg=name)


def test_span_index_is_row_by_row_in_the_flattened_batch():
    import torch

    from vllm_coco.identify.capture import Span, _span_index

    spans = [Span([5] * 4, 1, 3), Span([5] * 6, 5, 6), Span([5] * 2, 0, 2)]
    flat, weights, count = _span_index(spans, [1, 0, 2], "cpu")  # width 6
    assert flat.tolist() == [5, 6 + 1, 6 + 2, 12 + 0, 12 + 1]
    assert torch.equal(weights, torch.tensor([[1.0, 0, 0, 0, 0], [0, 0.5, 0.5, 0, 0], [0, 0, 0, 0.5, 0.5]]))
    assert count[:, 0].tolist() == [1.0, 2.0, 2.0]


@pytest.mark.parametrize("start,end", [(2, 2), (3, 2), (0, 6), (-1, 2)])
def test_a_span_outside_its_sequence_is_refused_before_anything_is_written(model, tmp_path, start, end):
    from vllm_coco.identify.capture import Span, capture

    with pytest.raises(ValueError, match="span 1"):
        capture(model, [Span([4, 5, 6], 0, 3), Span([4, 5, 6, 7, 8], start, end)], tmp_path / "m.safetensors",
                progress=False)
    assert not (tmp_path / "m.safetensors").exists()


def test_gpu_check_dry_run_times_three_span_shapes(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--parts", "capture"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("capture_ratio", "capture_ratio_half_span", "capture_ratio_full_span",
                "capture_tok_s", "capture_half_span_tok_s", "capture_full_span_tok_s", "plain_tok_s"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert res["capture_span_tokens"] == 8 and res["capture_tokens_per_pass"] > 0
    assert res["capture_check_pass"] is True and res["capture_check_max_rel"] <= 2e-3  # rows = masked formula
