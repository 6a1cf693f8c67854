#!/usr/bin/env python
"""Serving throughput of vanilla vs LE-COCO (baked) vs NE-COCO (plugin gate) in vLLM.

In one run, on the same prompts, vLLM's offline engine in its default compiled mode: the base
model, its LE-baked checkpoint and its NE-COCO directory (both made here from --neurons), each in
a fresh process, at batch 1 (requests one at a time) and batch 32 (all at once, continuous
batching). Every request generates exactly --max-tokens tokens (ignore_eos), so tok/s compare.

    .venv/bin/python tools/bench_serving.py --base models/smollm2 --neurons runs/default/neurons
Last line: a JSON object with vanilla_tok_s, le_tok_s, ne_tok_s (batch 32) and ne_ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = ("Context: {i} people were waiting for the bus, an older man and a young woman among them. "
          "Question: who was bad with technology? Answer and explain in detail.")


def worker(model: str, batch1: int, batch32: int, max_tokens: int, eager: bool) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", max_model_len=512, seed=0, enforce_eager=eager)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [PROMPT.format(i=i) for i in range(max(batch1, batch32))]
    llm.generate(prompts[:4], sp, use_tqdm=False)  # warm-up
    out = {}
    t0 = time.perf_counter()
    n = 0
    for p in prompts[:batch1]:
        n += len(llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids)
    out["batch1_tok_s"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    res = llm.generate(prompts[:batch32], sp, use_tqdm=False)
    out["batch32_tok_s"] = sum(len(r.outputs[0].token_ids) for r in res) / (time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="base model directory")
    ap.add_argument("--neurons", required=True, help="neuron artifact of that model (coco-tools identify)")
    ap.add_argument("--batch1-requests", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compiled mode)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch1_requests, args.batch, args.max_tokens, args.eager)))
        return

    from vllm_coco.bake import bake
    from vllm_coco.ne import write_ne

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        env.setdefault("VLLM_CACHE_ROOT", str(Path(tmp) / "vllm-cache"))
        le, ne = Path(tmp) / "le", Path(tmp) / "ne"
        bake(args.base, args.neurons, str(le), mode="le", alpha=1.0)
        coco = write_ne(args.base, args.neurons, str(ne))
        results = {}
        for name, model in (("vanilla", args.base), ("le", le), ("ne", ne)):
            cmd = [sys.executable, __file__, "--base", args.base, "--neurons", args.neurons, "--worker", str(model),
                   "--batch1-requests", str(args.batch1_requests), "--batch", str(args.batch),
                   "--max-tokens", str(args.max_tokens)] + (["--eager"] if args.eager else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; vLLM offline engine, "
          f"{'eager' if args.eager else 'compiled'} mode, fp32, {args.max_tokens} tokens/request; "
          f"NE gate: {coco['count']} channels in {sum(1 for c in coco['channels'] if c)} layers")
    print(f"{'model':>8} {'batch 1 tok/s':>14} {'batch ' + str(args.batch) + ' tok/s':>15} {'ratio@' + str(args.batch):>9}")
    base32 = results["vanilla"]["batch32_tok_s"]
    for name, r in results.items():
        print(f"{name:>8} {r['batch1_tok_s']:>14.1f} {r['batch32_tok_s']:>15.1f} {r['batch32_tok_s'] / base32:>9.3f}")
    print(json.dumps({"vanilla_tok_s": round(base32, 1), "le_tok_s": round(results["le"]["batch32_tok_s"], 1),
                      "ne_tok_s": round(results["ne"]["batch32_tok_s"], 1),
                      "ne_ratio": round(results["ne"]["batch32_tok_s"] / base32, 4),
                      "batch1": {k: round(v["batch1_tok_s"], 1) for k, v in results.items()}}))


if __name__ == "__main__":
    main()
