#!/usr/bin/env python
"""Benchmark the capture stage of `coco-tools identify` against a plain forward pass.

In one run, over the same batches of real BBQ contrast pairs on the same model:
  plain    the decoder forward pass alone (no hooks), as a user would run it under no_grad
  capture  the same forward with the q/k/v intensity hooks, streaming rows to disk
Each is timed `--repeats` times (best taken: these machines are noisy); the ratio of tokens/s
is `capture_ratio`. Peak memory (max RSS) is measured in a fresh process for each of two data
sizes: with the on-disk matrix it must stay flat as the data grows.

    .venv/bin/python tools/bench_identify.py --model models/smollm2
Last line: a JSON object with capture_ratio and the peak memory at each size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(model_dir: str, pairs: int, batch_size: int, repeats: int, dtype: str, device: str) -> dict:
    import torch

    from vllm_coco.core.models import load_model
    from vllm_coco.data.contrast import load_contrast
    from vllm_coco.identify.capture import _batches, _collate, capture, response_spans

    per_cat = max(2, pairs // 6)
    data, _ = load_contrast("bbq", None, "identify", per_cat)
    model, tok = load_model(Path(model_dir), dtype, device)
    spans = response_spans(tok, data)
    tokens = sum(len(s.ids) for s in spans)
    dev = next(model.parameters()).device
    decoder = model.get_decoder()

    def plain():
        with torch.no_grad():
            for idx in _batches(spans, batch_size):
                ids, attn, _ = _collate(spans, idx, tok.pad_token_id, dev)
                decoder(input_ids=ids, attention_mask=attn, use_cache=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def cap():
        with tempfile.TemporaryDirectory() as d:
            capture(model, spans, Path(d) / "m.safetensors", batch_size, tok.pad_token_id, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    plain()  # warm-up (allocator, kernels)
    t_plain, t_cap = [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        t0 = time.perf_counter()
        plain()
        t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cap()
        t_cap.append(time.perf_counter() - t0)
    out = {"pairs": len(data), "sequences": len(spans), "tokens": tokens,
           "plain_tok_s": tokens / min(t_plain), "capture_tok_s": tokens / min(t_cap),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if dev.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (e.g. from `coco-tools demo-model`)")
    ap.add_argument("--sizes", default="48,192", help="two data sizes in contrast pairs (default 48,192)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.worker, args.batch_size, args.repeats, args.dtype, args.device)))
        return
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--model", args.model, "--worker", str(size), "--batch-size",
               str(args.batch_size), "--repeats", str(args.repeats), "--dtype", args.dtype, "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode:
            sys.exit(f"worker failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}, "
          f"device {args.device}, dtype {args.dtype}, batch {args.batch_size}")
    print(f"{'pairs':>6} {'seqs':>6} {'tokens':>8} {'plain tok/s':>12} {'capture tok/s':>14} {'ratio':>6} "
          f"{'peak RSS MB':>12}")
    for r in results:
        print(f"{r['pairs']:>6} {r['sequences']:>6} {r['tokens']:>8} {r['plain_tok_s']:>12.0f} "
              f"{r['capture_tok_s']:>14.0f} {r['capture_tok_s'] / r['plain_tok_s']:>6.3f} {r['peak_rss_mb']:>12.0f}")
    big = results[-1]
    summary = {"capture_ratio": round(big["capture_tok_s"] / big["plain_tok_s"], 4),
               "plain_tok_s": round(big["plain_tok_s"], 1), "capture_tok_s": round(big["capture_tok_s"], 1),
               "peak_rss_mb": {str(r["pairs"]): round(r["peak_rss_mb"], 1) for r in results}}
    if "peak_cuda_mb" in big:
        summary["peak_cuda_mb"] = {str(r["pairs"]): round(r["peak_cuda_mb"], 1) for r in results}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
