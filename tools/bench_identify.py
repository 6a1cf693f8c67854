#!/usr/bin/env python
"""Benchmark the capture stage of `coco-tools identify` against a plain forward pass.

In one run, over the same batches of real BBQ contrast pairs on the same model:
  plain    the decoder forward pass alone (no hooks), as a user would run it under no_grad
  capture  the same forward with the q/k/v intensity hooks, streaming rows to disk
Each is timed `--repeats` times (best taken: these machines are noisy); the ratio of tokens/s
is `capture_ratio`. Peak memory (max RSS) is measured in a fresh process for each of two data
sizes: with the on-disk matrix it must stay flat as the data grows.

With --vllm, one vLLM engine (the capture engine of `identify --backend vllm`: eager, no prefix
caching) runs the larger size's sequences three ways, interleaved:
  vllm plain    each sequence as a prompt, one output token (the forward alone)
  vllm logprob  the same with prompt log-probabilities (the LM head on every token)
  vllm capture  `EngineCapture.capture`: the recorder pooling |h| in the forward, rows to disk
`vllm_capture_ratio` = capture / plain tokens/s (target >= 0.9), `vllm_vs_hf` = vLLM capture /
HF capture tokens/s.

    .venv/bin/python tools/bench_identify.py --model models/smollm2 [--vllm]
Last line: a JSON object with capture_ratio and the peak memory at each size (and the vLLM figures).
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


def vllm_worker(model_dir: str, pairs: int, repeats: int, dtype: str) -> dict:
    from contextlib import closing

    from vllm import SamplingParams

    from vllm_coco.core.models import load_tokenizer
    from vllm_coco.data.contrast import load_contrast
    from vllm_coco.identify.capture import response_spans
    from vllm_coco.identify.engine_capture import EngineCapture

    data, _ = load_contrast("bbq", None, "identify", max(2, pairs // 6))
    spans = response_spans(load_tokenizer(Path(model_dir)), data)
    tokens = sum(len(s.ids) for s in spans)
    with closing(EngineCapture(Path(model_dir), dtype)) as eng, tempfile.TemporaryDirectory() as d:
        prompts = eng.prompts(spans)
        runs = {
            "plain": lambda: eng.llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False),
            "logprob": lambda: eng.llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0),
                                                use_tqdm=False),
            "capture": lambda: eng.capture(spans, Path(d) / "m.safetensors", progress=False),
        }
        runs["plain"]()  # warm-up
        times = {k: [] for k in runs}
        for _ in range(repeats):  # interleaved, so drift hits all alike
            for k, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {"sequences": len(spans), "tokens": tokens, **{f"{k}_tok_s": tokens / min(t) for k, t in times.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (e.g. from `coco-tools demo-model`)")
    ap.add_argument("--sizes", default="48,192", help="two data sizes in contrast pairs (default 48,192)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vllm", action="store_true", help="also time capture inside a vLLM engine (--backend vllm)")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--vllm-worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.worker, args.batch_size, args.repeats, args.dtype, args.device)))
        return
    if args.vllm_worker:
        print(json.dumps(vllm_worker(args.model, args.vllm_worker, args.repeats, args.dtype)))
        return
    def run(flag, size, env=()):
        cmd = [sys.executable, __file__, "--model", args.model, flag, str(size), "--batch-size",
               str(args.batch_size), "--repeats", str(args.repeats), "--dtype", args.dtype, "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", **dict(env)})
        if proc.returncode:
            sys.exit(f"worker failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    sizes = [int(s) for s in args.sizes.split(",")]
    results = [run("--worker", size) for size in sizes]
    engine = run("--vllm-worker", sizes[-1], {"VLLM_CPU_KVCACHE_SPACE": "1"}) if args.vllm else None
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
    if engine:
        print(f"vLLM engine (eager), {engine['sequences']} sequences, {engine['tokens']} tokens:")
        for k in ("plain", "logprob", "capture"):
            print(f"{'vllm ' + k:>14} {engine[k + '_tok_s']:>10.0f} tok/s")
        summary.update({"vllm_capture_ratio": round(engine["capture_tok_s"] / engine["plain_tok_s"], 4),
                        "vllm_vs_hf": round(engine["capture_tok_s"] / big["capture_tok_s"], 4),
                        **{f"vllm_{k}_tok_s": round(engine[f"{k}_tok_s"], 1) for k in ("plain", "logprob", "capture")}})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
