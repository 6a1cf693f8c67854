#!/usr/bin/env python
"""Serving throughput of vanilla vs LE-COCO (baked) vs NE-COCO (plugin gate) in vLLM.

In one run, on the same prompts, vLLM's offline engine in its default compiled mode: the base
model, its LE-baked checkpoint and its NE-COCO directory (both made here from --neurons), all
three engines alive at once and timed round-robin (--rounds; best round per model), so machine
noise hits the three alike; at batch 1 (requests one at a time) and batch 32 (all at once,
continuous batching). Every request generates exactly --max-tokens tokens (ignore_eos).

Per-request settings: a fourth engine serves the same NE directory with per-request settings
(serve/launch.engine_kwargs) and runs the batch with 1, 8 and 32 distinct strengths (coco_alpha
spread over [0.25, 2]; requests assigned round-robin). Each of those timings is paired with a
vanilla timing of the same batch right before it, and the reported ratio is the median over rounds
of the paired ratios (the min and max are printed beside it): the machine's drift between two
adjacent timings is far smaller than across a whole round. --per-request-only skips the LE and
fixed NE engines and batch 1 (for large batches, where four engines would not fit in memory).

    .venv/bin/python tools/bench_serving.py --base models/smollm2 --neurons runs/default/neurons
Last line: a JSON object with vanilla_tok_s, le_tok_s, ne_tok_s (batch 32), ne_ratio and
ne_ratio_distinct_{1,8,32} (per-request engine with that many distinct strengths / vanilla,
median of the paired rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

PROMPT = ("Context: {i} people were waiting for the bus, an older man and a young woman among them. "
          "Question: who was bad with technology? Answer and explain in detail.")


def timed(llm, prompts, sp) -> float:
    """Generated tokens per second for one generate() call over `prompts`."""
    t0 = time.perf_counter()
    res = llm.generate(prompts, sp, use_tqdm=False)
    return sum(len(r.outputs[0].token_ids) for r in res) / (time.perf_counter() - t0)


def sp_with(sp, alpha: float):
    """`sp` carrying a per-request gate strength."""
    out = sp.clone()
    out.extra_args = {"coco_alpha": round(alpha, 6)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="base model directory")
    ap.add_argument("--neurons", required=True, help="neuron artifact of that model (coco-tools identify)")
    ap.add_argument("--batch1-requests", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compiled mode)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--distinct", default="1,8,32", help="numbers of distinct strengths in the batch")
    ap.add_argument("--per-request-only", action="store_true",
                    help="only vanilla and the per-request engine, batch --batch only")
    args = ap.parse_args()
    distinct = [int(d) for d in args.distinct.split(",")]

    from vllm import LLM, SamplingParams

    from vllm_coco.edit.bake import bake
    from vllm_coco.edit.ne import write_ne

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [PROMPT.format(i=i) for i in range(max(args.batch1_requests, args.batch))]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(tmp) / "vllm-cache"))
        le, ne = Path(tmp) / "le", Path(tmp) / "ne"
        bake(args.base, args.neurons, str(le), mode="le", alpha=1.0)
        coco = write_ne(args.base, args.neurons, str(ne))
        fixed = (("vanilla", args.base),) if args.per_request_only else (
            ("vanilla", args.base), ("le", le), ("ne", ne))
        engines = {name: LLM(model=str(m), dtype="float32", max_model_len=512, seed=0, enforce_eager=args.eager)
                   for name, m in fixed}
        from vllm_coco.serve.launch import engine_kwargs

        per_request = LLM(**engine_kwargs(ne), dtype="float32", max_model_len=512, seed=0, enforce_eager=args.eager)
        batch = prompts[:args.batch]
        mixes = {d: [sp_with(sp, 0.25 + 1.75 * (i % d) / max(d - 1, 1)) for i in range(len(batch))] for d in distinct}
        for llm in engines.values():
            llm.generate(prompts[:4], sp, use_tqdm=False)  # warm-up
        per_request.generate(batch[:4], mixes[max(distinct)][:4], use_tqdm=False)
        rounds = {name: {"batch1": [], "batch": []} for name in engines}
        mixed = {d: [] for d in distinct}
        paired = {d: [] for d in distinct}
        for r in range(args.rounds):
            for name, llm in engines.items():
                if not args.per_request_only:
                    one = [timed(llm, [p], sp) for p in prompts[:args.batch1_requests]]
                    rounds[name]["batch1"].append(sum(one) / len(one))
                rounds[name]["batch"].append(timed(llm, batch, sp))
            for d in distinct:
                # the vanilla timing right before, so the pair sees the same machine state
                v = timed(engines["vanilla"], batch, sp)  # not in vanilla's best-of: as many tries as LE / NE
                mixed[d].append(timed(per_request, batch, mixes[d]))
                paired[d].append(mixed[d][-1] / v)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"distinct {d}: {paired[d][-1]:.3f}" for d in distinct), flush=True)
        results = {n: {"batch1_tok_s": max(r["batch1"], default=float("nan")),
                       "batch_tok_s": max(r["batch"])} for n, r in rounds.items()}
        best = {d: max(v) for d, v in mixed.items()}
        ratio = {d: statistics.median(v) for d, v in paired.items()}
        from vllm_coco.core.engine import shutdown

        for llm in (*engines.values(), per_request):  # before exit, not in the interpreter's teardown
            shutdown(llm)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; vLLM offline engine, "
          f"{'eager' if args.eager else 'compiled'} mode, fp32, {args.max_tokens} tokens/request; "
          f"NE gate: {coco['count']} channels in {sum(1 for c in coco['channels'] if c)} layers")
    batch = f"batch {args.batch} tok/s"
    print(f"{'model':>8} {'batch 1 tok/s':>14} {batch:>15} {'ratio@' + str(args.batch):>9}")
    base_tok_s = results["vanilla"]["batch_tok_s"]
    for name, r in results.items():
        print(f"{name:>8} {r['batch1_tok_s']:>14.1f} {r['batch_tok_s']:>15.1f} {r['batch_tok_s'] / base_tok_s:>9.3f}")
    print(f"\nper-request NE engine, batch {args.batch}, distinct strengths in the batch "
          f"(ratio: median over {args.rounds} rounds of tok/s / the vanilla timing just before):")
    print(f"{'distinct':>8} {'best tok/s':>10} {'ratio':>7} {'min':>7} {'max':>7}")
    for d in distinct:
        print(f"{d:>8} {best[d]:>10.1f} {ratio[d]:>7.3f} {min(paired[d]):>7.3f} {max(paired[d]):>7.3f}")
    fixed_ratios = {} if args.per_request_only else {
        "le_tok_s": round(results["le"]["batch_tok_s"], 1), "ne_tok_s": round(results["ne"]["batch_tok_s"], 1),
        "ne_ratio": round(results["ne"]["batch_tok_s"] / base_tok_s, 4),
        "batch1": {k: round(v["batch1_tok_s"], 1) for k, v in results.items()}}
    print(json.dumps({"vanilla_tok_s": round(base_tok_s, 1), **fixed_ratios,
                      **{f"ne_ratio_distinct_{d}": round(v, 4) for d, v in ratio.items()},
                      "paired_rounds": {d: [round(x, 4) for x in v] for d, v in paired.items()},
                      "batch": args.batch, "max_tokens": args.max_tokens,
                      "mode": "eager" if args.eager else "compiled"}))


if __name__ == "__main__":
    main()
