#!/usr/bin/env python
"""Paired comparison of stereo_coco success rates from `coco-tools eval --log-samples` outputs.

Each model directory holds samples_stereo_coco_<category>.jsonl (lm-eval's logged documents with
the options' log-likelihoods). Every answer is re-scored under both option rules of
vllm_coco.core.pick (summed, per byte), so one evaluation gives both columns. Differences against
the base are paired by BBQ item (an item's success = its share of "unknown" answers over the three
option orders); the interval is a percentile bootstrap over items. docs/RESULTS.md's larger-sample
table was made with this script:

    coco-tools eval models/smollm2 --tasks stereo_coco --limit 60 --no-chat --log-samples --out runs/ev-base
    coco-tools eval runs/abl --tasks stereo_coco --limit 60 --no-chat --log-samples --out runs/ev-abl
    .venv/bin/python tools/paired_compare.py runs/ev-base runs/ev-abl [more ...]
"""

from __future__ import annotations

import argparse
import glob
import random
import sys
from pathlib import Path

from vllm_coco.core.names import SCORINGS
from vllm_coco.experiment.stats import option_logliks
from vllm_coco.tasks.metrics import agg_acc_disambig, agg_success_rate, process_mc


def records(run_dir: Path, scoring: str) -> list[dict]:
    """One record per logged stereo_coco document, re-scored with `scoring`."""
    files = sorted(glob.glob(str(run_dir / "samples_stereo_coco_*.jsonl")))
    if not files:
        sys.exit(f"paired_compare: error: {run_dir} has no samples_stereo_coco_*.jsonl; run `coco-tools eval "
                 "--tasks stereo_coco --log-samples` first")
    out = []
    for f in files:
        for doc, lls in option_logliks(f).values():
            out.append(process_mc({**doc, "scoring": scoring}, [(ll, False) for ll in lls])["success_rate"])
    return out


def per_item(recs) -> dict[str, float]:
    """Item id -> share of its ambiguous documents answered "unknown"."""
    items: dict[str, list[bool]] = {}
    for r in recs:
        if r["condition"] == "ambig":
            items.setdefault(r["id"], []).append(r["role"] == "unknown")
    return {k: sum(v) / len(v) for k, v in items.items()}


def paired(base: dict, edit: dict, rounds: int = 5000, seed: int = 0) -> dict:
    """Mean paired difference over the items both share, its bootstrap 95 % interval, items up/down."""
    ids = sorted(set(base) & set(edit))
    if not ids:
        raise ValueError("the two runs share no ambiguous item; evaluate both with the same --limit")
    diffs = [edit[i] - base[i] for i in ids]
    rng = random.Random(seed)
    boots = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(rounds))
    return {"items": len(ids), "diff": sum(diffs) / len(diffs), "lo": boots[int(0.025 * rounds)],
            "hi": boots[int(0.975 * rounds) - 1], "up": sum(d > 0 for d in diffs), "down": sum(d < 0 for d in diffs)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path, help="eval output of the base model")
    ap.add_argument("edits", type=Path, nargs="+", help="eval outputs of edited models")
    ap.add_argument("--rounds", type=int, default=5000, help="bootstrap resamples")
    args = ap.parse_args(argv)
    print("| model | scoring | success | Δ vs base [95 % CI] | items up / down | acc_disambig |")
    print("|---|---|---|---|---|---|")
    for scoring in SCORINGS:
        base_recs = records(args.base, scoring)
        base = per_item(base_recs)
        print(f"| {args.base.name} | {scoring} | {agg_success_rate(base_recs):.3f} | | | "
              f"{agg_acc_disambig(base_recs):.3f} |")
        for d in args.edits:
            recs = records(d, scoring)
            p = paired(base, per_item(recs), args.rounds)
            print(f"| {d.name} | {scoring} | {agg_success_rate(recs):.3f} | {p['diff']:+.3f} "
                  f"[{p['lo']:+.3f}, {p['hi']:+.3f}] | {p['up']} / {p['down']} of {p['items']} | "
                  f"{agg_acc_disambig(recs):.3f} |")


if __name__ == "__main__":
    main()
