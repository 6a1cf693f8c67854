#!/usr/bin/env python
"""Benchmark evaluation: lm-eval's stock hf backend vs `CocoHFLM` (shared-prefix scoring, in-memory edits).

In one run, on the same stereo_coco documents (the 6 categories x --limit documents each, chat
template on, as `coco-tools eval --tasks stereo_coco --limit N` scores them), for one condition
(base) and for five (base + COCO / RAND / NORM / MACT ablate-zero), each path timed end to end as a
user runs it (task manager + model load + simple_evaluate; interpreter start-up not included):
  stock  per condition: lm-eval's HFLM loads the model (the baked ablated checkpoint for an
         ablation) and simple_evaluate scores it; always float32. The bake (`coco-tools bake
         --mode ablate-zero`, its own process) is timed apart and NOT counted in stock_s_5
         (eval_speedup_5_with_bake counts it).
  Before the first timed phase an untimed warm-up pays the process's one-time costs (imports, the
  first task index and data read, torch's first kernels), so neither path is charged for them.
  new    one CocoHFLM load, the 4 ablations registered in memory, prefetch of all 5, then 5
         simple_evaluate calls (the first scores every condition in the same batches); --dtype.
Everything it needs is made from --model into a temporary directory (or --work, kept and reused):
a small identify run (`--limit 6 --categories Age,SES --null-rounds 0`), the RAND / NORM / MACT
baselines (`coco-tools select`) and the 4 baked checkpoints. It checks that the new path's
per-option log-likelihoods match stock within 1e-4 (float32) and that the picked options agree.

    .venv/bin/python tools/bench_eval.py --model models/smollm2                    # ~15 min on 2 cores
    .venv/bin/python tools/bench_eval.py --model models/smollm2 --dtype bfloat16   # new path in bf16
    .venv/bin/python tools/bench_eval.py --model models/smollm2 --agreement 51     # bf16 vs fp32 picks
These machines are shared: every timed phase reports the CPU the rest of the machine used meanwhile
("busy", in cores); --quiet-wait S waits up to S s for an idle machine before each phase, and
--max-busy C redoes (up to --redo times) a phase during which the rest used more than C cores.
--agreement N scores 6 x N documents under the 5 conditions with CocoHFLM in float32 and in bfloat16
(no stock path, no bake) and reports the share of identical picks and the log-likelihood differences.
Last line: a JSON object (speed: eval_speedup_1, eval_speedup_5, the times, n_docs, max_abs_diff,
pick_agreement, machine; --agreement: pick_agreement_pct, max_abs_diff, machine).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ["stereo_coco"]  # the group: stereo_coco_{Age,Gender_identity,Race_ethnicity,Religion,Nationality,SES}
ABLATIONS = ("coco", "rand", "norm", "mact")  # the neuron sets ablated (ablate-zero) besides base
CONDITIONS = ("base",) + ABLATIONS
TOLERANCE = 1e-4  # max |Δ loglik| allowed between the new path (float32) and stock
IDENTIFY_ARGS = ["--limit", "6", "--categories", "Age,SES", "--null-rounds", "0"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def coco_tools(*args: str) -> float:
    """Run `coco-tools ARGS` in its own process (as a user would); returns its wall time in seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vllm_coco.cli", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"coco-tools {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def prepare(model: str, work: Path, bake: bool) -> tuple[dict[str, Path], dict[str, float]]:
    """The neuron sets (identify + 3 baselines) and, with `bake`, the ablate-zero checkpoints, made in
    `work` unless already there. Returns ({condition: neurons dir}, {condition: bake seconds})."""
    neurons = {name: work / f"neurons-{name}" for name in ABLATIONS}
    if not neurons["coco"].exists():
        log(f"identify {model} {' '.join(IDENTIFY_ARGS)}")
        secs = coco_tools("identify", model, *IDENTIFY_ARGS, "--out", str(neurons["coco"]))
        log(f"identify done in {secs:.0f} s")
    for name in ABLATIONS[1:]:
        if not neurons[name].exists():
            coco_tools("select", str(neurons["coco"]), "--baseline", name, "--out", str(neurons[name]))
    bake_s = {}
    if bake:
        for name in ABLATIONS:
            out = work / f"ablate-{name}"
            if not out.exists():
                bake_s[name] = coco_tools("bake", model, str(neurons[name]), "--mode", "ablate-zero", "--out", str(out))
                log(f"baked {name} in {bake_s[name]:.1f} s")
    return neurons, bake_s


class Meter:
    """Wall time of a phase and the CPU the rest of the machine used meanwhile, in cores (from
    /proc/stat minus this process): these machines are shared, and a busy neighbour slows a phase."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        busy, own = self._busy(), self._own()
        self.others = None if busy is None else max(0.0, (busy - self.busy0) - (own - self.own0)) / self.wall
        return False

    @staticmethod
    def _busy() -> float | None:
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def evaluate(lm, limit: int) -> tuple[dict, dict]:
    """simple_evaluate of the stereo_coco group; returns (picks and per-option log-likelihoods keyed by
    (task, doc_id), the group's metrics). The task manager is built here: every run of a user builds one."""
    import lm_eval

    from vllm_coco.core.pick import pick
    from vllm_coco.tasks.evaluate import task_manager

    tm = task_manager(TASKS)
    res = lm_eval.simple_evaluate(model=lm, tasks=TASKS, limit=limit, apply_chat_template=True, task_manager=tm,
                                  bootstrap_iters=0, log_samples=True)
    docs = {}
    for task, rows in res["samples"].items():
        for row in rows:
            lls = [float(r[0]) for r in row["filtered_resps"]]
            docs[(task, row["doc_id"])] = (lls, pick(row["doc"], row["filtered_resps"]))
    group = res["results"]["stereo_coco"]
    return docs, {k.split(",")[0]: group[k] for k in ("success_rate,none", "bias_ambig,none")}


def run_new(model: str, neurons: dict[str, Path] | None, dtype: str, batch_size: int, limit: int) -> dict:
    """CocoHFLM end to end: one load, the ablations in memory (when `neurons`), prefetch, one evaluation
    per condition. Returns the times, the per-condition documents and metrics, and lm.stats."""
    from vllm_coco.edit.conditions import linear_edit
    from vllm_coco.tasks.prefix_lm import CocoHFLM

    names = ["base"] + (list(neurons) if neurons else [])
    docs, metrics, evals = {}, {}, []
    with Meter() as whole:
        t0 = time.perf_counter()
        lm = CocoHFLM(model, dtype=dtype, device="cpu", batch_size=batch_size)
        t_load = time.perf_counter() - t0
        for name in names[1:]:
            lm.add_condition(name, linear_edit(neurons[name], "ablate-zero", model_dir=Path(model)))
        if len(names) > 1:
            lm.prefetch(names)
        t_ready = time.perf_counter() - t0
        for name in names:
            t1 = time.perf_counter()
            lm.use(name)
            docs[name], metrics[name] = evaluate(lm, limit)
            evals.append(time.perf_counter() - t1)
    stats = dict(lm.stats)
    del lm
    gc.collect()
    return {"total_s": whole.wall, "others": whole.others, "load_s": t_load, "setup_s": t_ready, "eval_s": evals,
            "docs": docs, "metrics": metrics, "stats": stats}


def run_stock(model_dir: Path, batch_size: int, limit: int) -> dict:
    """lm-eval's HFLM end to end on one checkpoint (float32), as `coco-tools eval --backend hf-stock` runs it."""
    from lm_eval.models.huggingface import HFLM

    with Meter() as m:
        lm = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=batch_size, device="cpu")
        docs, metrics = evaluate(lm, limit)
    del lm
    gc.collect()
    return {"total_s": m.wall, "others": m.others, "docs": docs, "metrics": metrics}


def wait_quiet(limit_s: float) -> None:
    """Wait up to `limit_s` seconds for the rest of the machine to go idle (< 0.25 cores over 5 s)."""
    if limit_s <= 0:
        return
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        with Meter() as m:
            time.sleep(5)
        if m.others is None or m.others < 0.25:
            return
    log(f"the machine stayed busy for {limit_s:.0f} s; timing anyway")


def compare(a: dict, b: dict) -> dict:
    """Per-option log-likelihood differences and pick agreement between two {key: (logliks, pick)} maps."""
    if a.keys() != b.keys():
        sys.exit(f"the two paths scored different documents ({len(a)} vs {len(b)})")
    rows = [(abs(x - y), k, o, x, y) for k in a for o, (x, y) in enumerate(zip(a[k][0], b[k][0]))]
    worst = max(rows, key=lambda r: r[0])
    same = sum(a[k][1] == b[k][1] for k in a)
    return {"n": len(a), "agree": same, "max_abs_diff": worst[0], "mean_abs_diff": sum(r[0] for r in rows) / len(rows),
            "max_rel_diff": max(r[0] / max(abs(r[3]), 1e-9) for r in rows),
            "worst": {"task": worst[1][0], "doc_id": worst[1][1], "option": worst[2], "a": worst[3], "b": worst[4]}}


def phase(args, what: str, fn, *fn_args) -> dict:
    """One timed phase: wait for a quiet machine (--quiet-wait), and redo it (up to --redo times) while the
    rest of the machine used more than --max-busy cores during it; the last try counts."""
    for attempt in range(args.redo + 1):
        wait_quiet(args.quiet_wait)
        log(what + (f" (try {attempt + 1}: the machine was busy)" if attempt else ""))
        res = fn(*fn_args)
        log(f"{what}: {res['total_s']:.1f} s (rest of the machine: {busy(res['others'])} cores)")
        if res["others"] is None or args.max_busy is None or res["others"] <= args.max_busy:
            break
    res["tries"] = attempt + 1
    return res


def busy(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def r2(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def warm_up(model: str) -> None:
    """Untimed, before the first timed phase: the one-time costs of a process (importing lm-eval's and
    transformers' model and task modules, the first task index and BBQ read, torch's first kernels),
    which whichever path ran first would otherwise pay alone (~3 s here)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from vllm_coco.tasks.evaluate import task_manager
    from vllm_coco.tasks.prefix_lm import CocoHFLM  # noqa: F401 (the import is the point)

    task_manager(TASKS).load(TASKS)
    lm = HFLM(pretrained=model, dtype="float32", batch_size=1, device="cpu")
    with torch.no_grad():
        lm.model(torch.tensor([[1, 2, 3]]))
    del lm
    gc.collect()


def speed(args, work: Path) -> dict:
    neurons, bake_s = prepare(args.model, work, bake=True)
    log("warm-up (untimed)")
    warm_up(args.model)
    ckpt = {"base": Path(args.model), **{n: work / f"ablate-{n}" for n in ABLATIONS}}
    new1 = phase(args, f"new path, 1 condition ({args.dtype})", run_new, args.model, None, args.dtype,
                 args.batch_size, args.limit)
    stock = {name: phase(args, f"stock path, {name} ({ckpt[name]})", run_stock, ckpt[name], args.batch_size,
                         args.limit) for name in CONDITIONS}
    new5 = phase(args, f"new path, 5 conditions ({args.dtype})", run_new, args.model, neurons, args.dtype,
                 args.batch_size, args.limit)
    per = {name: compare(stock[name]["docs"], new5["docs"][name]) for name in CONDITIONS}
    base1 = compare(stock["base"]["docs"], new1["docs"]["base"])
    n_docs = per["base"]["n"]
    stock_1, stock_5 = stock["base"]["total_s"], sum(s["total_s"] for s in stock.values())
    new_1, new_5 = new1["total_s"], new5["total_s"]
    bake_total = sum(bake_s.values()) if len(bake_s) == len(ABLATIONS) else None
    max_diff = max([p["max_abs_diff"] for p in per.values()] + [base1["max_abs_diff"]])
    agree = sum(p["agree"] for p in per.values())
    n_picks = len(CONDITIONS) * n_docs
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"python {info['python']}")
    print(f"{n_docs} stereo_coco documents per condition (6 categories x --limit {args.limit}), batch size "
          f"{args.batch_size}; stock float32, new {args.dtype}; busy = cores the rest of the machine used meanwhile")
    print(f"{'condition':>10} {'stock s':>8} {'busy':>5} {'bake s':>7} {'new eval s':>10} {'picks agree':>12} "
          f"{'max |Δ|':>9} {'success stock/new':>18}")
    for i, name in enumerate(CONDITIONS):
        b = f"{bake_s[name]:.1f}" if name in bake_s else "-"
        m_s, m_n = stock[name]["metrics"]["success_rate"], new5["metrics"][name]["success_rate"]
        print(f"{name:>10} {stock[name]['total_s']:>8.1f} {busy(stock[name]['others']):>5} {b:>7} "
              f"{new5['eval_s'][i]:>10.1f} {per[name]['agree']:>5}/{per[name]['n']:<6} "
              f"{per[name]['max_abs_diff']:>9.2e} {m_s:>8.3f} / {m_n:.3f}")
    print(f"{'path':>10} {'1 condition s':>14} {'5 conditions s':>15}")
    print(f"{'stock':>10} {stock_1:>14.1f} {stock_5:>15.1f}   (bake of the 4 checkpoints not counted: "
          f"{'-' if bake_total is None else round(bake_total, 1)} s)")
    print(f"{'new':>10} {new_1:>14.1f} {new_5:>15.1f}   (busy {busy(new1['others'])} / {busy(new5['others'])}; 5: load "
          f"{new5['load_s']:.1f} s, conditions + prefetch {new5['setup_s'] - new5['load_s']:.1f} s, evaluations "
          f"{' / '.join(f'{t:.1f}' for t in new5['eval_s'])} s)")
    print(f"{'speedup':>10} {stock_1 / new_1:>14.2f} {stock_5 / new_5:>15.2f}")
    print(f"{'new tok/s':>10} {new1['stats']['tokens'] / new1['eval_s'][0]:>14.0f} "
          f"{new5['stats']['tokens'] / new5['eval_s'][0]:>15.0f}   (model tokens / scoring evaluation)")
    ok = args.dtype != "float32" or max_diff <= TOLERANCE and agree == n_picks
    worst = max(per.values(), key=lambda p: p["max_abs_diff"])
    max_rel = max(p["max_rel_diff"] for p in per.values())
    print(f"largest |Δ|: {worst['worst']['task']} doc {worst['worst']['doc_id']} option {worst['worst']['option']}: "
          f"stock {worst['worst']['a']:.6f}, new {worst['worst']['b']:.6f}; max relative |Δ| {max_rel:.2e}")
    print(f"{'parity' if args.dtype == 'float32' else 'vs stock float32'}: max |Δ loglik| {max_diff:.2e}"
          f"{f' (tolerance {TOLERANCE:g})' if args.dtype == 'float32' else ''}, picks agree {agree}/{n_picks}"
          f"{(': OK' if ok else ': FAIL') if args.dtype == 'float32' else ''}")
    return {"eval_speedup_1": round(stock_1 / new_1, 3), "eval_speedup_5": round(stock_5 / new_5, 3),
            "eval_speedup_5_with_bake": round((stock_5 + bake_total) / new_5, 3) if bake_total else None,
            "stock_s_1": r2(stock_1), "stock_s_5": r2(stock_5), "new_s_1": r2(new_1), "new_s_5": r2(new_5),
            "bake_s": r2(bake_total), "bake_counted": False,
            "stock_s": {n: r2(s["total_s"]) for n, s in stock.items()},
            "new_s_5_parts": {"load": r2(new5["load_s"]), "conditions_prefetch": r2(new5["setup_s"] - new5["load_s"]),
                              "evals": [r2(t) for t in new5["eval_s"]]},
            "tries": {"new_1": new1["tries"], **{f"stock_{n}": s["tries"] for n, s in stock.items()},
                      "new_5": new5["tries"]},
            "busy_cores": {"new_1": r2(new1["others"]), **{f"stock_{n}": r2(s["others"]) for n, s in stock.items()},
                           "new_5": r2(new5["others"])},
            "n_docs": n_docs, "conditions": len(CONDITIONS), "limit": args.limit, "dtype_new": args.dtype,
            "dtype_stock": "float32", "batch_size": args.batch_size, "max_abs_diff": float(f"{max_diff:.3g}"),
            "max_abs_diff_per_condition": {n: float(f"{p['max_abs_diff']:.3g}") for n, p in per.items()},
            "max_rel_diff": float(f"{max_rel:.3g}"), "largest_diff": worst["worst"],
            "pick_agreement": round(agree / n_picks, 4), "parity_ok": ok, "new_stats_1": new1["stats"],
            "new_stats_5": new5["stats"],
            # model tokens per second of the new path's scoring evaluation (the first; it includes
            # lm-eval's task building and request construction)
            "new_tok_s": {"1": round(new1["stats"]["tokens"] / new1["eval_s"][0]),
                          "5": round(new5["stats"]["tokens"] / new5["eval_s"][0])},
            "machine": info}


def agreement(args, work: Path) -> dict:
    neurons, _ = prepare(args.model, work, bake=False)
    warm_up(args.model)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runs[dtype] = phase(args, f"CocoHFLM {dtype}, 5 conditions, --limit {args.agreement}", run_new, args.model,
                            neurons, dtype, args.batch_size, args.agreement)
    per = {name: compare(runs["float32"]["docs"][name], runs["bfloat16"]["docs"][name]) for name in CONDITIONS}
    n, agree = sum(p["n"] for p in per.values()), sum(p["agree"] for p in per.values())
    max_diff = max(p["max_abs_diff"] for p in per.values())
    # how close to a tie the float32 answer was where bfloat16 picks another option (top-two score gap)
    margins = []
    for name in CONDITIONS:
        d32, d16 = runs["float32"]["docs"][name], runs["bfloat16"]["docs"][name]
        for key, (lls, choice) in d32.items():
            if d16[key][1] != choice:
                top = sorted(lls, reverse=True)
                margins.append(top[0] - top[1])
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"python {info['python']}")
    print(f"CocoHFLM bfloat16 vs float32, {per['base']['n']} stereo_coco documents per condition "
          f"(6 categories x --limit {args.agreement}), batch size {args.batch_size}")
    print(f"{'condition':>10} {'picks agree':>12} {'agree %':>8} {'max |Δ|':>9} {'mean |Δ|':>9} "
          f"{'success fp32/bf16':>18}")
    for name in CONDITIONS:
        p = per[name]
        m32, m16 = runs["float32"]["metrics"][name]["success_rate"], runs["bfloat16"]["metrics"][name]["success_rate"]
        print(f"{name:>10} {p['agree']:>5}/{p['n']:<6} {100 * p['agree'] / p['n']:>8.2f} {p['max_abs_diff']:>9.3f} "
              f"{p['mean_abs_diff']:>9.4f} {m32:>8.3f} / {m16:.3f}")
    print(f"{'all':>10} {agree:>5}/{n:<6} {100 * agree / n:>8.2f} {max_diff:>9.3f}")
    if margins:
        median = sorted(margins)[len(margins) // 2]
        print(f"disagreements: float32 top-two gap max {max(margins):.3f}, median {median:.3f}")
    t32, t16 = runs["float32"]["total_s"], runs["bfloat16"]["total_s"]
    print(f"time (load + 5 conditions): float32 {t32:.1f} s, bfloat16 {t16:.1f} s, ratio {t32 / t16:.2f} "
          f"(busy {busy(runs['float32']['others'])} / {busy(runs['bfloat16']['others'])} cores)")
    base = per["base"]
    return {"pick_agreement_pct": round(100 * base["agree"] / base["n"], 2), "n_docs": base["n"],
            "pick_agreement_pct_all": round(100 * agree / n, 2), "n_picks_all": n,
            "max_abs_diff": round(base["max_abs_diff"], 4), "max_abs_diff_all": round(max_diff, 4),
            "mean_abs_diff": round(base["mean_abs_diff"], 5),
            "per_condition": {k: {"agree": v["agree"], "n": v["n"], "max_abs_diff": round(v["max_abs_diff"], 4),
                                  "mean_abs_diff": round(v["mean_abs_diff"], 5)} for k, v in per.items()},
            "disagreement_fp32_gap_max": round(max(margins), 4) if margins else None,
            "fp32_s": round(t32, 2), "bf16_s": round(t16, 2), "bf16_speedup": round(t32 / t16, 3),
            "busy_cores": {"fp32": r2(runs["float32"]["others"]), "bf16": r2(runs["bfloat16"]["others"])},
            "limit": args.agreement, "batch_size": args.batch_size, "machine": info}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (e.g. from `coco-tools demo-model`)")
    ap.add_argument("--limit", type=int, default=18, help="documents per category (default 18: 108 in all)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="dtype of the new path (stock is always float32)")
    ap.add_argument("--batch-size", type=int, default=8, help="both paths (default 8, coco-tools eval's)")
    ap.add_argument("--agreement", type=int, metavar="N",
                    help="instead of the speed run: bf16 vs fp32 picks of CocoHFLM on 6 x N documents")
    ap.add_argument("--quiet-wait", type=float, default=0, metavar="S",
                    help="before each timed phase, wait up to S s for the rest of the machine to go idle")
    ap.add_argument("--max-busy", type=float, metavar="CORES",
                    help="redo a timed phase during which the rest of the machine used more than CORES cores")
    ap.add_argument("--redo", type=int, default=2, help="at most this many redos per phase (with --max-busy)")
    ap.add_argument("--work", help="keep the prepared artifacts here and reuse them (default: a temp dir)")
    ap.add_argument("--out", help="also write the JSON summary to this file")
    args = ap.parse_args()
    if (args.agreement or args.limit) < 1 or args.batch_size < 1:
        sys.exit("--limit, --agreement and --batch-size must be positive")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and transformers' bars (read when tqdm is imported)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        summary = agreement(args, work) if args.agreement else speed(args, work)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary))
    if not summary.get("parity_ok", True):
        sys.exit(1)


if __name__ == "__main__":
    main()
