"""`coco-tools run CONFIG.yaml`: the paper's experiment end to end, resumable stage by stage.

Per model (OUT/<model>/<stage>/):
  identify   COCO neurons on the identify split (identify.identify)
  baselines  RAND / NORM / MACT with the same count (identify.reselect: no model run)
  ablation   causal check: each set zeroed (bake --mode ablate-zero), stereo_coco success rate on
             the test split for the base model and every ablated one
  sweep      LE-COCO alphas and an NE-COCO grid scored on the *validate* split; a candidate is
             admissible when its retention accuracy (coco_mmlu, coco_boolq) is at least the base
             model's minus `sweep.retention_floor`; the best admissible LE and NE are chosen
  final      base, chosen LE, chosen NE on the test split: stereo_coco, stereo_coco_jailbreak,
             coco_retention (the chosen edits are kept under final/models/)
Then once: report (OUT/report/: figures; OUT/REPORT.md).

Every stage is built in OUT/<model>/.<stage>.partial/ and renamed into place when complete, with
a done.json holding the hash of everything the stage depends on (its config section, the model,
the data, the hashes of the stages it reads). A stage whose done.json hash matches is reused;
inside an unfinished stage, finished steps (one edited model, one evaluation) are reused too, so
an interrupted run resumes where it stopped. Every line of progress also goes to OUT/pipeline.log.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from vllm_coco import METHOD_VERSION, __version__
from vllm_coco.core.atomic import check_output_dir, plain_mode, remove_tree, write_text
from vllm_coco.core.errors import CocoError
from vllm_coco.tasks import results as lm_results

PIPELINE_VERSION = 1  # bump when a stage's output format or meaning changes: forces a recompute
DONE = "done.json"
STEP = "step.json"
LOG = "pipeline.log"
REPORT = "REPORT.md"
RETENTION_SWEEP = ("coco_mmlu", "coco_boolq")  # the accuracy tasks the retention floor reads
RETENTION_FINAL = ("coco_mmlu", "coco_boolq", "coco_truthfulqa_ref")
JAILBREAK_FAMILIES = ("roleplay", "obfuscated", "templates")
LABELS = {"coco": "COCO", "rand": "RAND", "norm": "NORM", "mact": "MACT"}


# --------------------------------------------------------------------------- small helpers

def spec_hash(spec) -> str:
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _write_json(path: Path, data) -> None:
    """Write JSON atomically (temp file + rename)."""
    write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def model_stamp(model_dir: Path) -> list:
    """Cheap identity of a model directory: names, sizes and mtimes of its weights and config
    (a stage depending on the model is recomputed when these change)."""
    files = sorted(list(model_dir.glob("*.safetensors")) + [model_dir / "config.json"])
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _delta(v, base, digits: int = 3) -> str:
    if v is None or base is None or any(isinstance(x, float) and math.isnan(x) for x in (v, base)):
        return _fmt(v, digits)
    return f"{v:.{digits}f} ({v - base:+.{digits}f})"


def _num_tag(x: float) -> str:
    return f"{x:g}"


# --------------------------------------------------------------------------- context and stages

class Run:
    """One invocation: the resolved config, the output root, the log."""

    def __init__(self, cfg: dict, out: Path, echo=print):
        self.cfg = cfg
        self.out = out
        self.echo = echo
        self.backend = None  # resolved eval backend
        self.log_path = out / LOG
        self.stages: list[dict] = []  # (label, stage, status, seconds) of this invocation

    def log(self, line: str) -> None:
        self.echo(line)
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {line}\n")

    def stage(self, root: Path, label: str, name: str, spec: dict, body) -> dict:
        """Run `body(partial_dir, steps) -> result` unless a finished stage with the same hash
        exists; returns the stage's done.json (with "dir": where the stage lives)."""
        spec = {"stage": name, "pipeline": PIPELINE_VERSION, "method": METHOD_VERSION, **spec}
        h = spec_hash(spec)
        final = root / name
        done = _read_json(final / DONE)
        tag = f"[{label}] {name}"
        if done and done.get("hash") == h:
            self.log(f"{tag}: reused (finished {done['finished']}, {done['seconds']:.1f} s; config unchanged)")
            self.stages.append({"label": label, "stage": name, "status": "reused", "seconds": 0.0})
            return {**done, "dir": final}
        root.mkdir(parents=True, exist_ok=True)
        partial = root / f".{name}.partial"
        marker = _read_json(partial / "stage.json")
        if partial.exists() and (not marker or marker.get("hash") != h):
            remove_tree(partial)  # left over from another configuration
        resumed = partial.exists()
        partial.mkdir(exist_ok=True)
        _write_json(partial / "stage.json", {"hash": h})
        why = " (config changed)" if done else ""
        self.log(f"{tag}: start{why}" + (" (resuming its finished steps)" if resumed else ""))
        t0 = time.time()
        steps = Steps(partial)
        result = body(partial, steps)
        seconds = time.time() - t0
        done = {"stage": name, "model": label, "hash": h, "spec": spec, "seconds": round(seconds, 1),
                "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                "tool": f"vllm-coco {__version__}", "result": result}
        (partial / "stage.json").unlink()
        _write_json(partial / DONE, done)
        remove_tree(final)
        os.replace(partial, final)
        self.log(f"{tag}: done in {seconds:.1f} s" + (f" ({steps.reused} finished steps reused)" if steps.reused else ""))
        self.stages.append({"label": label, "stage": name, "status": "computed", "seconds": round(seconds, 1)})
        return {**done, "dir": final}


class Steps:
    """Finished sub-steps of an unfinished stage (one directory each, with step.json)."""

    def __init__(self, partial: Path):
        self.partial, self.reused = partial, 0

    def do(self, key: str, spec: dict, fn) -> Path:
        """Make partial/key with fn(path) unless it is already there for this spec."""
        d = self.partial / key
        h = spec_hash(spec)
        rec = _read_json(d / STEP)
        if rec and rec.get("hash") == h:
            self.reused += 1
            return d
        remove_tree(d)
        d.parent.mkdir(parents=True, exist_ok=True)
        fn(d)
        _write_json(d / STEP, {"hash": h})
        return d


# --------------------------------------------------------------------------- evaluation

def _child_eval(args: dict) -> None:
    """Entry point of the evaluation subprocess (vLLM backend: one engine per process)."""
    from vllm_coco.tasks.evaluate import EvalOptions, run_eval

    try:
        run_eval(args["model"], EvalOptions(**args["opts"]), out=args["out"], force=True)
    except CocoError as exc:
        print(f"coco-tools: error: {exc}", file=sys.stderr)
        sys.exit(2)


def eval_in_subprocess(model_dir: Path, opts, out: Path) -> None:
    """run_eval in a child process (the vLLM backend: one engine per process, since an engine does
    not give everything back when dropped in-process). Exit 2 in the child -> CocoError here."""
    payload = json.dumps({"model": str(model_dir), "out": str(out), "opts": opts.__dict__})
    code = "import json, sys; from vllm_coco.experiment.pipeline import _child_eval; _child_eval(json.loads(sys.argv[1]))"
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = subprocess.run([sys.executable, "-c", code, payload], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode == 2:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CocoError(last.removeprefix("coco-tools: error: "))
    if proc.returncode != 0:
        raise RuntimeError(f"evaluation of {model_dir} on {', '.join(opts.tasks)} failed (exit {proc.returncode}):\n"
                           + proc.stderr[-4000:])


def evaluate(run: Run, model_dir: Path, tasks, split: str, limit, out: Path, metadata=None) -> dict:
    """Evaluate model_dir on `tasks` into `out` (results.json); returns lm-eval's results dict."""
    from vllm_coco.tasks.evaluate import EvalOptions, run_eval

    ev = run.cfg["eval"]
    opts = EvalOptions(tasks=tuple(tasks), backend=run.backend, limit=limit, batch_size=ev["batch_size"],
                       device=ev["device"], max_model_len=ev["max_model_len"], split=split, metadata=metadata,
                       chat=run.cfg["data"]["chat_template"], scoring=ev["scoring"])
    if run.backend == "vllm":
        eval_in_subprocess(model_dir, opts, out)
    else:
        run_eval(str(model_dir), opts, out=str(out), force=True)
        gc.collect()
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def _weighted(results: dict, tasks, metric: str):
    """Doc-weighted mean of a metric over subtasks (as lm-eval's weight_by_size groups), NaN-aware."""
    num = den = 0.0
    for t in tasks:
        v, n = lm_results.metric(results, t, metric), lm_results.docs(results, t)
        if v is None or math.isnan(v) or n == 0:
            continue
        num, den = num + v * n, den + n
    return num / den if den else float("nan")


STEREO_METRICS = ("success_rate", "acc_disambig", "bias_ambig", "abs_bias_ambig", "bias_disambig",
                  "order_consistency", "pos0_rate", "pos1_rate", "pos2_rate")


def stereo_summary(results: dict, categories) -> dict:
    """{metric: {category: value, "all": value}} of the stereo_coco_<category> tasks, plus docs."""
    tasks = [f"stereo_coco_{c}" for c in categories]
    out = {m: {**{c: lm_results.metric(results, t, m) for c, t in zip(categories, tasks)},
               "all": _weighted(results, tasks, m)} for m in STEREO_METRICS}
    out["docs"] = {c: lm_results.docs(results, t) for c, t in zip(categories, tasks)}
    return out


def retention_summary(results: dict, tasks) -> dict:
    out = {}
    for t in tasks:
        if t == "coco_truthfulqa_ref":
            out[t] = lm_results.metric(results, t, "ref_bits_per_byte")
        else:
            out[t] = lm_results.metric(results, t, "acc")
        out[f"{t}_docs"] = lm_results.docs(results, t)
    accs = [out[t] for t in tasks if t in RETENTION_SWEEP and out[t] is not None]
    out["acc_mean"] = sum(accs) / len(accs) if accs else None
    return out


def jailbreak_summary(results: dict) -> dict:
    out = {}
    for fam in JAILBREAK_FAMILIES:
        t = f"stereo_coco_jailbreak_{fam}"
        out[fam] = {"success_rate": lm_results.metric(results, t, "success_rate"),
                    "bias_ambig": lm_results.metric(results, t, "bias_ambig"), "docs": lm_results.docs(results, t)}
    tasks = [f"stereo_coco_jailbreak_{f}" for f in JAILBREAK_FAMILIES]
    out["all"] = {"success_rate": _weighted(results, tasks, "success_rate"),
                  "bias_ambig": _weighted(results, tasks, "bias_ambig"),
                  "docs": sum(lm_results.docs(results, t) for t in tasks)}
    return out


def eval_groups(run: Run, model_dir: Path, parts: list[tuple[str, list, object]], split: str, steps: Steps,
                key: str, spec: dict, metadata=None) -> dict:
    """Evaluate task groups with their own limits; groups with the same limit share one run.
    parts: [(part name, tasks, limit)] -> {part name: results dict}."""
    by_limit: dict = {}
    for name, tasks, limit in parts:
        by_limit.setdefault(limit, []).append((name, tasks))
    out = {}
    for i, (limit, group) in enumerate(by_limit.items()):
        tasks = [t for _, ts in group for t in ts]
        sub = f"{key}/eval{i}" if len(by_limit) > 1 else f"{key}/eval"
        d = steps.do(sub, {**spec, "tasks": tasks, "limit": limit, "split": split, "metadata": metadata,
                           "backend": run.backend, "scoring": run.cfg["eval"]["scoring"]},
                     lambda d, tasks=tasks, limit=limit: evaluate(run, model_dir, tasks, split, limit, d, metadata))
        res = json.loads((d / "results.json").read_text(encoding="utf-8"))
        for name, _ in group:
            out[name] = res
    return out


# --------------------------------------------------------------------------- the stages

def _identify(run: Run, m: dict, root: Path, data_spec: dict) -> dict:
    from vllm_coco.identify.run import IdentifyOptions, identify

    ic = run.cfg["identify"]
    spec = {"model": str(m["dir"]), "model_stamp": model_stamp(m["dir"]), "data": data_spec,
            "identify": ic, "seed": run.cfg["seed"],
            # behavior mode picks the model's answers the way the evaluation scores them
            "scoring": run.cfg["eval"]["scoring"] if ic["contrast"] == "behavior" else None}

    def body(partial: Path, steps: Steps) -> dict:
        opts = IdentifyOptions(data=run.cfg["data"]["source"], categories=tuple(run.cfg["data"]["categories"]),
                               split="identify", limit=ic["limit"], ratio=ic["ratio"], weighting=ic["weighting"],
                               tau=ic["tau"], null_rounds=ic["null_rounds"], seed=run.cfg["seed"],
                               batch_size=ic["batch_size"], dtype=ic["dtype"], device=ic["device"],
                               chat=run.cfg["data"]["chat_template"], contrast=ic["contrast"],
                               scoring=run.cfg["eval"]["scoring"])
        d = steps.do("neurons", {}, lambda d: identify(str(m["dir"]), str(d), opts, progress=sys.stderr.isatty()))
        gc.collect()
        meta = json.loads((d / "neurons.json").read_text(encoding="utf-8"))
        return {"neurons": "neurons", "count": meta["selection"]["count"], "by_proj": meta["selection"]["by_proj"],
                "num_neurons": meta["model"]["num_neurons"], "pairs": meta["data"]["pairs"],
                "contrast": meta["data"]["contrast"], "answers": meta["data"].get("answers"),
                "significance": meta["significance"],
                "per_category": {c: {k: v for k, v in pc.items() if k != "neurons"}
                                 for c, pc in meta["per_category"].items()},
                "timing_s": meta["timing_s"]}

    return run.stage(root, m["name"], "identify", spec, body)


def _baselines(run: Run, m: dict, root: Path, ident: dict) -> dict:
    from vllm_coco.identify.run import reselect

    spec = {"identify": ident["hash"], "baselines": run.cfg["baselines"]}

    def body(partial: Path, steps: Steps) -> dict:
        out = {}
        for b in run.cfg["baselines"]:
            d = steps.do(b, {}, lambda d, b=b: reselect(str(ident["dir"] / "neurons"), str(d), baseline=b))
            meta = json.loads((d / "neurons.json").read_text(encoding="utf-8"))
            out[b] = {"neurons": b, "count": meta["selection"]["count"], "by_proj": meta["selection"]["by_proj"]}
        return out

    return run.stage(root, m["name"], "baselines", spec, body)


def _neuron_sets(ident: dict, bases: dict) -> dict[str, Path]:
    sets = {"coco": ident["dir"] / "neurons"}
    for b, info in bases["result"].items():
        sets[b] = bases["dir"] / info["neurons"]
    return sets


def _ablation(run: Run, m: dict, root: Path, ident: dict, bases: dict, data_spec: dict) -> dict:
    from vllm_coco.edit.bake import bake

    ac = run.cfg["ablation"]
    cats = run.cfg["data"]["categories"]
    tasks = [f"stereo_coco_{c}" for c in cats]
    spec = {"model": str(m["dir"]), "model_stamp": model_stamp(m["dir"]), "identify": ident["hash"],
            "baselines": bases["hash"], "ablation": ac, "data": data_spec, "backend": run.backend,
            "scoring": run.cfg["eval"]["scoring"]}

    def body(partial: Path, steps: Steps) -> dict:
        out = {}
        for name, neurons in [("base", None), *_neuron_sets(ident, bases).items()]:
            t0 = time.time()
            model_dir = m["dir"]
            if neurons is not None:
                model_dir = steps.do(f"models/{name}", {"neurons": str(neurons), "mode": ac["mode"]},
                                     lambda d, n=neurons: bake(str(m["dir"]), str(n), str(d), mode=ac["mode"]))
            res = eval_groups(run, model_dir, [("stereo", tasks, ac["limit"])], "test", steps, f"evals/{name}",
                              {"model": name, "mode": ac["mode"]})["stereo"]
            out[name] = stereo_summary(res, cats)
            if neurons is not None and not run.cfg["keep_models"]:
                _drop_weights(model_dir)
            run.log(f"  [{m['name']}] ablation {LABELS.get(name, name)}: success_rate "
                    f"{_fmt(out[name]['success_rate']['all'])} ({time.time() - t0:.0f} s)")
        return {"mode": ac["mode"], "limit": ac["limit"], "split": "test", "runs": out}

    return run.stage(root, m["name"], "ablation", spec, body)


def _drop_weights(model_dir: Path) -> None:
    """Free the disk of an evaluated candidate: its weights go, its coco_edit.json / config stay."""
    for f in model_dir.glob("*.safetensors"):
        f.unlink()


def _candidates(sw: dict) -> list[dict]:
    out = [{"key": f"le-a{_num_tag(a)}", "edit": "le", "alpha": a} for a in sw["le_alpha"]]
    for a in sw["ne_alpha"]:
        for b in sw["ne_beta"]:
            for lam in sw["ne_lam"]:
                out.append({"key": f"ne-a{_num_tag(a)}-b{_num_tag(b)}-l{_num_tag(lam)}", "edit": "ne",
                            "alpha": a, "beta": b, "lam": lam})
    return out


def _make_edit(m: dict, neurons: Path, cand: dict, ratio, out: Path) -> None:
    from vllm_coco.edit.bake import bake
    from vllm_coco.edit.ne import write_ne

    if cand["edit"] == "le":
        bake(str(m["dir"]), str(neurons), str(out), mode="le", alpha=cand["alpha"])
    else:
        write_ne(str(m["dir"]), str(neurons), str(out), alpha=cand["alpha"], beta=cand["beta"], lam=cand["lam"],
                 ratio=ratio)


def _params(c: dict) -> str:
    if c["edit"] == "le":
        return f"alpha={_num_tag(c['alpha'])}"
    return f"alpha={_num_tag(c['alpha'])}, beta={_num_tag(c['beta'])}, lam={_num_tag(c['lam'])}"


def choose(rows: list[dict], base: dict, edit: str) -> dict:
    """The best admissible candidate of one edit kind: highest validate success rate; ties go to
    the higher retention, then the earlier (gentler) candidate. None admissible: the one with the
    highest retention, flagged. Returns {"key", "admissible", "beats_base", "note"}."""
    mine = [r for r in rows if r["edit"] == edit]
    if not mine:
        return {"key": None, "admissible": False, "beats_base": False, "note": f"no {edit.upper()} candidate"}
    ok = [r for r in mine if r["admissible"]]

    def sr(r):
        v = r["success_rate"]
        return -math.inf if v is None or math.isnan(v) else v

    def ret(r):
        return -math.inf if r["retention"] is None else r["retention"]

    if ok:
        best = max(ok, key=lambda r: (sr(r), ret(r), -mine.index(r)))
        beats = sr(best) > sr(base)
        note = (f"best admissible {edit.upper()} ({_params(best)}) "
                + ("beats the base model on validate" if beats else
                   "does not beat the base model on validate: no candidate improved the success rate"))
        return {"key": best["key"], "admissible": True, "beats_base": beats, "note": note}
    best = max(mine, key=lambda r: (ret(r), sr(r), -mine.index(r)))
    return {"key": best["key"], "admissible": False, "beats_base": sr(best) > sr(base),
            "note": f"no {edit.upper()} candidate keeps retention within the floor; kept the one with the "
                    f"highest retention ({_params(best)}) for the final evaluation"}


def _sweep(run: Run, m: dict, root: Path, ident: dict, data_spec: dict) -> dict:
    sw = run.cfg["sweep"]
    cats = run.cfg["data"]["categories"]
    stereo = [f"stereo_coco_{c}" for c in cats]
    neurons = ident["dir"] / "neurons"
    spec = {"model": str(m["dir"]), "model_stamp": model_stamp(m["dir"]), "identify": ident["hash"], "sweep": sw,
            "data": data_spec, "backend": run.backend,
            "scoring": run.cfg["eval"]["scoring"]}

    def score(model_dir: Path, key: str, steps: Steps) -> tuple[dict, dict]:
        res = eval_groups(run, model_dir, [("stereo", stereo, sw["limit"]),
                                           ("retention", list(RETENTION_SWEEP), sw["retention_limit"])],
                          "validate", steps, f"evals/{key}", {"model": key})
        return stereo_summary(res["stereo"], cats), retention_summary(res["retention"], RETENTION_SWEEP)

    def body(partial: Path, steps: Steps) -> dict:
        t0 = time.time()
        base_stereo, base_ret = score(m["dir"], "base", steps)
        base = {"key": "base", "edit": "base", "params": "-", "success_rate": base_stereo["success_rate"]["all"],
                "acc_disambig": base_stereo["acc_disambig"]["all"], "retention": base_ret["acc_mean"],
                "retention_tasks": base_ret, "per_category": base_stereo["success_rate"], "admissible": True}
        run.log(f"  [{m['name']}] sweep base: success_rate {_fmt(base['success_rate'])}, retention "
                f"{_fmt(base['retention'])} ({time.time() - t0:.0f} s)")
        rows = []
        for cand in _candidates(sw):
            t0 = time.time()
            d = steps.do(f"models/{cand['key']}", {"cand": cand, "ratio": sw["ne_ratio"]},
                         lambda d, c=cand: _make_edit(m, neurons, c, sw["ne_ratio"], d))
            st, ret = score(d, cand["key"], steps)
            if not run.cfg["keep_models"]:
                _drop_weights(d)
            r = {**cand, "params": _params(cand), "success_rate": st["success_rate"]["all"],
                 "acc_disambig": st["acc_disambig"]["all"], "retention": ret["acc_mean"], "retention_tasks": ret,
                 "per_category": st["success_rate"]}
            floor_ok = (r["retention"] is not None and base["retention"] is not None
                        and r["retention"] >= base["retention"] - sw["retention_floor"] - 1e-12)
            r["admissible"] = bool(floor_ok)
            rows.append(r)
            run.log(f"  [{m['name']}] sweep {cand['edit'].upper()} {r['params']}: success_rate "
                    f"{_fmt(r['success_rate'])}, retention {_fmt(r['retention'])}"
                    f"{'' if r['admissible'] else ' (below the retention floor)'} ({time.time() - t0:.0f} s)")
        chosen = {e: choose(rows, base, e) for e in ("le", "ne")}
        for e, c in chosen.items():
            run.log(f"  [{m['name']}] sweep: {c['note']}")
        return {"split": "validate", "limit": sw["limit"], "retention_limit": sw["retention_limit"],
                "retention_floor": sw["retention_floor"], "base": base, "rows": rows, "chosen": chosen}

    return run.stage(root, m["name"], "sweep", spec, body)


def _final(run: Run, m: dict, root: Path, ident: dict, sweep: dict, data_spec: dict) -> dict:
    fc = run.cfg["final"]
    cats = run.cfg["data"]["categories"]
    rows = {r["key"]: r for r in sweep["result"]["rows"]}
    chosen = {e: rows.get(c["key"]) for e, c in sweep["result"]["chosen"].items()}
    spec = {"model": str(m["dir"]), "model_stamp": model_stamp(m["dir"]), "identify": ident["hash"],
            "sweep": sweep["hash"], "final": fc, "data": data_spec, "backend": run.backend,
            "scoring": run.cfg["eval"]["scoring"],
            "ne_ratio": run.cfg["sweep"]["ne_ratio"]}
    parts = [("stereo", [f"stereo_coco_{c}" for c in cats], fc["limit"]),
             ("jailbreak", ["stereo_coco_jailbreak"], fc["jailbreak_limit"]),
             ("retention", list(RETENTION_FINAL), fc["retention_limit"])]
    metadata = {"categories": list(cats)}  # the jailbreak families draw items from these categories

    def body(partial: Path, steps: Steps) -> dict:
        out = {}
        for name in ("base", "le", "ne"):
            t0 = time.time()
            cand = chosen.get(name)
            if name != "base" and cand is None:
                out[name] = None
                continue
            model_dir = m["dir"]
            if cand is not None:
                model_dir = steps.do(f"models/{name}", {"cand": {k: cand[k] for k in ("edit", "alpha", "beta", "lam")
                                                                 if k in cand}},
                                     lambda d, c=cand: _make_edit(m, ident["dir"] / "neurons", c,
                                                                  run.cfg["sweep"]["ne_ratio"], d))
            res = eval_groups(run, model_dir, parts, "test", steps, f"evals/{name}", {"model": name}, metadata)
            out[name] = {"params": "-" if cand is None else _params(cand), "model": None if cand is None else
                         f"models/{name}", "stereo": stereo_summary(res["stereo"], cats),
                         "jailbreak": jailbreak_summary(res["jailbreak"]),
                         "retention": retention_summary(res["retention"], RETENTION_FINAL)}
            run.log(f"  [{m['name']}] final {name.upper() if name != 'base' else 'base'}: success_rate "
                    f"{_fmt(out[name]['stereo']['success_rate']['all'])} ({time.time() - t0:.0f} s)")
        return {"split": "test", **{k: fc[k] for k in fc}, "runs": out}

    return run.stage(root, m["name"], "final", spec, body)


# --------------------------------------------------------------------------- report

def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _contrast_source(r: dict, limit) -> str:
    """How the contrast sets were made, for the report's neuron section."""
    per_cat = limit if limit else "all"
    if r.get("contrast") == "behavior":
        answers = r["answers"]  # {category: {"answered", "biased", "unknown", "other"}}
        nb, nu = sum(v["biased"] for v in answers.values()), sum(v["unknown"] for v in answers.values())
        return (f"from the model's own answers (behavior mode) to the ambiguous identify-split items (up to {per_cat} "
                f"per category): {nb} answered with the biased option vs {nu} answered \"unknown\", "
                "intensities at the last prompt token.")
    return (f"from {r['pairs']} contrast pairs (response mode: biased vs \"unknown\" answer teacher-forced; "
            f"identify split, up to {per_cat} per category).")


def write_report(run: Run, models: list[dict], report_dir: Path) -> str:
    """REPORT.md text; figures written into report_dir (names relative to OUT)."""
    from vllm_coco.identify import report as neuron_report
    from vllm_coco.core.artifact import load as load_artifact
    from vllm_coco.tasks.compare import bar_chart

    cfg = run.cfg
    cats = cfg["data"]["categories"]
    rel = "report"  # the stage directory (figures are written into its partial twin first)
    md = ["# COCO experiment report", "",
          f"Config: `{cfg['_config_path']}` · output: `{run.out}` · tool: vllm-coco {__version__} "
          f"({METHOD_VERSION}) · eval backend: {run.backend} · data: {cfg['data']['source']}, "
          f"{len(cats)} categories ({', '.join(cats)}) · seed {cfg['seed']} · prompts: "
          f"{'chat template' if cfg['data']['chat_template'] else 'plain (no chat template)'} · option scoring: "
          f"{'summed log-likelihood' if cfg['eval']['scoring'] == 'sum' else 'log-likelihood per byte'}", "",
          "Success rate = share of ambiguous BBQ answers that pick the \"unknown\" option, averaged over the "
          "three cyclic option orders (higher is better). Sweep numbers are on the **validate** split, "
          "ablation and final numbers on the held-out **test** split; neurons were identified on the "
          "identify split. Sample sizes are per category (lm-eval documents; 3 documents = one item "
          "under the three orders): small samples mean wide error bars.", ""]

    # headline
    md += ["## Summary", ""]
    head_rows = []
    for m in models:
        f = m["final"]["result"]["runs"]
        b = f["base"]["stereo"]["success_rate"]["all"]
        cells = [m["name"], _fmt(b)]
        for e in ("le", "ne"):
            cells.append("n/a (no candidate)" if f.get(e) is None else
                         f"{_delta(f[e]['stereo']['success_rate']['all'], b)} [{f[e]['params']}]")
        abl = m["ablation"]["result"]["runs"]
        cells.append(_delta(abl["coco"]["success_rate"]["all"], abl["base"]["success_rate"]["all"]))
        head_rows.append(cells)
    md += [_md_table(["model", "base (test)", "LE-COCO (test)", "NE-COCO (test)", "COCO ablated (test)"],
                     head_rows), ""]

    for m in models:
        name = m["name"]
        ident, abl, sweep, final = m["identify"], m["ablation"], m["sweep"], m["final"]
        md += [f"## {name}", "", f"Model: `{m['path']}`", ""]
        times = ", ".join(f"{s} {m[s]['seconds']:.0f} s" for s in ("identify", "baselines", "ablation", "sweep", "final"))
        md += [f"Compute time per stage (when computed): {times}.", ""]

        # neurons
        r = ident["result"]
        meta, _ = load_artifact(ident["dir"] / "neurons")
        grid = neuron_report.counts(meta)
        heat = report_dir / f"{name}-neurons-heatmap.png"
        neuron_report.heatmap(grid, f"COCO neurons (combined)\n{name}: {int(grid.sum())} selected", heat)
        sig = r["significance"]
        md += ["### Neurons: count, significance, where they sit", "",
               f"{r['count']} of {r['num_neurons']} q/k/v neurons selected (ratio {cfg['identify']['ratio']}, "
               f"{r['by_proj']}) " + _contrast_source(r, cfg['identify']['limit']), ""]
        if sig.get("null_best_score") is None:
            md += ["Significance: n/a (identify.null_rounds is 0: no label-permutation null was computed).", ""]
        else:
            md += [f"Significance (label-permutation null, {sig['rounds']} rounds): {sig['beat_null']} of "
                   f"{r['count']} selected neurons score above the null's best ({sig['null_best_score']:.4f}).", ""]
            behavior = r.get("contrast") == "behavior"  # per_category then counts answers, not pairs
            prow = [[c, f"{pc['biased']} / {pc['unknown']}" if behavior else str(pc["pairs"]), str(pc["count"]),
                     "n/a" if pc.get("beat_null") is None else f"{pc['beat_null']}/{pc['count']}",
                     _fmt(pc.get("null_best_score"), 4)] for c, pc in r["per_category"].items()]
            md += [_md_table(["category", "biased / unknown answers" if behavior else "pairs", "selected", "beat null",
                              "null best score"], prow), ""]
        md += ["Selected neurons per layer and projection (combined set):", "", "```",
               neuron_report.table(grid, meta), "```", "", f"![neuron heatmap]({rel}/{heat.name})", ""]

        # ablation
        runs = abl["result"]["runs"]
        sets = [k for k in runs]
        md += ["### Causal check: ablation (test split)", "",
               f"Each neuron set ablated (`bake --mode {abl['result']['mode']}`); stereo_coco success rate, lm-eval limit "
               f"{abl['result']['limit'] or 'all'} documents per category.", ""]
        if len(sets) <= 2:
            md += ["Baselines: n/a (no RAND / NORM / MACT baseline configured in `baselines`).", ""]
        arows = []
        for c in [*cats, "all"]:
            base = runs["base"]["success_rate"][c]
            arows.append([c] + [_fmt(base)] + [_delta(runs[s]["success_rate"][c], base) for s in sets[1:]])
        md += [_md_table(["category", "base"] + [f"{LABELS[s]} ablated" for s in sets[1:]], arows), ""]
        abl_png = report_dir / f"{name}-ablation.png"
        bar_chart([(c, [runs[s]["success_rate"][c] for s in sets]) for c in [*cats, "all"]],
              ["base"] + [f"{LABELS[s]} ablated" for s in sets[1:]], abl_png,
              f"{name}: success rate after ablation (test)")
        coco_d = runs["coco"]["success_rate"]["all"] - runs["base"]["success_rate"]["all"]
        others = [runs[s]["success_rate"]["all"] - runs["base"]["success_rate"]["all"] for s in sets[2:]]
        verdict = ("n/a (success rates undefined)" if math.isnan(coco_d) else
                   f"ablating COCO changed the success rate by {coco_d:+.3f}"
                   + (f"; the baselines by {', '.join(f'{LABELS[s]} {d:+.3f}' for s, d in zip(sets[2:], others))}"
                      if others else ""))
        md += [f"Reading: {verdict}.", "", f"![ablation]({rel}/{abl_png.name})", ""]

        # sweep
        sr = sweep["result"]
        b = sr["base"]
        md += ["### Sweep (validate split)", "",
               f"stereo_coco limit {sr['limit'] or 'all'} documents per category; retention = mean accuracy of "
               f"coco_mmlu and coco_boolq (limit {sr['retention_limit'] or 'all'} each); admissible when retention "
               f">= base - {sr['retention_floor']}.", ""]
        srows = [["base", "-", _fmt(b["success_rate"]), _fmt(b["acc_disambig"]), _fmt(b["retention"]), "-", ""]]
        for row in sr["rows"]:
            sel = "**selected**" if row["key"] in (sr["chosen"]["le"]["key"], sr["chosen"]["ne"]["key"]) else ""
            srows.append([row["edit"].upper(), row["params"], _delta(row["success_rate"], b["success_rate"]),
                          _fmt(row["acc_disambig"]), _delta(row["retention"], b["retention"]),
                          "yes" if row["admissible"] else "no", sel])
        md += [_md_table(["edit", "hyperparameters", "success rate", "acc (disambig.)", "retention", "admissible",
                          ""], srows), ""]
        for e in ("le", "ne"):
            md.append(f"- {e.upper()}: {sr['chosen'][e]['note']}.")
        md.append("")

        # final
        fr = final["result"]["runs"]
        present = [k for k in ("base", "le", "ne") if fr.get(k) is not None]
        labels = {"base": "base", "le": "LE-COCO", "ne": "NE-COCO"}
        md += ["### Final: per-category success rate (test split)", "",
               f"stereo_coco limit {final['result']['limit'] or 'all'} documents per category; "
               f"LE {fr['le']['params'] if fr.get('le') else 'n/a'}, NE {fr['ne']['params'] if fr.get('ne') else 'n/a'}.", ""]
        frows = []
        for c in [*cats, "all"]:
            base = fr["base"]["stereo"]["success_rate"][c]
            frows.append([c, str(fr["base"]["stereo"]["docs"].get(c, "")) if c != "all" else
                          str(sum(fr["base"]["stereo"]["docs"].values())), _fmt(base)]
                         + [_delta(fr[k]["stereo"]["success_rate"][c], base) for k in present[1:]])
        md += [_md_table(["category", "docs", "base"] + [labels[k] for k in present[1:]], frows), ""]
        orow = []
        for metric, what in (("acc_disambig", "accuracy, disambiguated items"),
                             ("abs_bias_ambig", "\\|s_AMB\\| (lower is better)"),
                             ("bias_disambig", "s_DIS (0 is unbiased)"),
                             ("order_consistency", "same answer under all 3 orders"),
                             ("pos0_rate", "answers at position 1"), ("pos1_rate", "answers at position 2"),
                             ("pos2_rate", "answers at position 3")):
            base = fr["base"]["stereo"][metric]["all"]
            orow.append([f"{metric} ({what})", _fmt(base)] + [_delta(fr[k]["stereo"][metric]["all"], base)
                                                               for k in present[1:]])
        md += ["Other stereo_coco metrics (all categories; n/a = no document of that condition in the sample):", "",
               _md_table(["metric", "base"] + [labels[k] for k in present[1:]], orow), ""]
        fin_png = report_dir / f"{name}-success-rate.png"
        bar_chart([(c, [fr[k]["stereo"]["success_rate"][c] for k in present]) for c in [*cats, "all"]],
              [labels[k] for k in present], fin_png, f"{name}: success rate (test)")
        md += [f"![success rate]({rel}/{fin_png.name})", ""]

        # jailbreak
        md += ["### Jailbreak (test split, ambiguous items under attack)", "",
               f"lm-eval limit {final['result']['jailbreak_limit'] or 'all'} documents per attack family.", ""]
        jrows = []
        for fam in (*JAILBREAK_FAMILIES, "all"):
            base = fr["base"]["jailbreak"][fam]["success_rate"]
            jrows.append([fam, str(fr["base"]["jailbreak"][fam]["docs"]), _fmt(base)]
                         + [_delta(fr[k]["jailbreak"][fam]["success_rate"], base) for k in present[1:]])
        md += [_md_table(["attack", "docs", "base"] + [labels[k] for k in present[1:]], jrows), ""]

        # retention
        md += ["### Retention (offline subsets)", "",
               f"lm-eval limit {final['result']['retention_limit'] or 'all'} documents per task.", ""]
        rrows = []
        for t, what in (("coco_mmlu", "MMLU subset accuracy"), ("coco_boolq", "BoolQ accuracy"),
                        ("coco_truthfulqa_ref", "TruthfulQA reference answer, bits per byte (lower is better)")):
            base = fr["base"]["retention"][t]
            rrows.append([f"{t} ({what})", str(fr["base"]["retention"][f"{t}_docs"]), _fmt(base)]
                         + [_delta(fr[k]["retention"][t], base) for k in present[1:]])
        md += [_md_table(["task", "docs", "base"] + [labels[k] for k in present[1:]], rrows), ""]
        if len(present) < 3:
            md += [f"n/a for {', '.join(labels[k] for k in ('le', 'ne') if k not in present)}: no such candidate "
                   "in the sweep.", ""]
        md += [f"Edited models: `{final['dir']}/models/` (le: a baked checkpoint; ne: an NE-COCO directory for "
               "`vllm serve` with the vllm-coco plugin).", ""]
    return "\n".join(md).rstrip() + "\n"


def _report(run: Run, models: list[dict]) -> dict:
    spec = {"models": {m["name"]: {s: m[s]["hash"] for s in ("identify", "baselines", "ablation", "sweep", "final")}
                       for m in models}, "config": run.cfg["_config_path"]}

    def body(partial: Path, steps: Steps) -> dict:
        text = write_report(run, models, partial)
        (partial / REPORT).write_text(text, encoding="utf-8")
        for png in partial.glob("*.png"):
            plain_mode(png)
        return {"report": REPORT, "figures": sorted(p.name for p in partial.glob("*.png"))}

    done = run.stage(run.out, "all", "report", spec, body)
    # OUT/REPORT.md links figures as report/<name>.png
    write_text(run.out / REPORT, (done["dir"] / REPORT).read_text(encoding="utf-8"))
    return done


# --------------------------------------------------------------------------- entry point

def plan(cfg: dict) -> list[str]:
    sw = cfg["sweep"]
    n_cand = len(sw["le_alpha"]) + len(sw["ne_alpha"]) * len(sw["ne_beta"]) * len(sw["ne_lam"])
    lines = [f"output: {cfg['out']}"]
    for m in cfg["models"]:
        lines.append(f"[{m['name']}] {m['path']}: identify -> baselines ({', '.join(cfg['baselines']) or 'none'}) -> "
                     f"ablation ({1 + 1 + len(cfg['baselines'])} evals) -> sweep ({1 + n_cand} candidates incl. base) "
                     f"-> final (base, LE, NE)")
    lines.append("report: OUT/REPORT.md")
    return lines


def run_pipeline(config_path: str, out: str | None = None, check: bool = False, echo=print) -> dict:
    """Validate CONFIG, then run (or reuse) every stage; returns {"report": path, "stages": [...]}."""
    from vllm_coco.experiment import config as config_mod
    from vllm_coco.core.models import check_device, resolve_model_dir

    cfg = config_mod.load(config_path, overrides={"out": out} if out is not None else None)
    cfg["_config_path"] = str(config_path)
    if check:
        for line in plan(cfg):
            echo(line)
        return {"report": None, "stages": []}
    check_device(cfg["identify"]["device"], "identify.device:")
    if cfg["eval"]["device"] is not None:
        check_device(cfg["eval"]["device"], "eval.device:")
    models = [{**m, "dir": resolve_model_dir(m["path"])} for m in cfg["models"]]  # hub ids are fetched here
    src = cfg["data"]["source"]
    inputs = [m["dir"] for m in models] + ([Path(src)] if Path(src).is_dir() else [])
    # a run resumes by writing into an existing out; out may never overlap an input
    out_dir = check_output_dir(cfg["out"], force=False, sources=tuple(inputs), what="out:", merge=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    import logging

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown the stage lines
    run = Run(cfg, out_dir, echo)
    run.backend = config_mod.resolve_backend(cfg["eval"]["backend"])
    t0 = time.time()
    run.log(f"coco-tools run {config_path}: {len(models)} model(s), eval backend {run.backend}, output {out_dir}")
    data_spec = {"source": cfg["data"]["source"], "categories": cfg["data"]["categories"],
                 "chat_template": cfg["data"]["chat_template"]}
    done_models = []
    for m in models:
        root = out_dir / m["name"]
        ident = _identify(run, m, root, data_spec)
        bases = _baselines(run, m, root, ident)
        abl = _ablation(run, m, root, ident, bases, data_spec)
        sweep = _sweep(run, m, root, ident, data_spec)
        final = _final(run, m, root, ident, sweep, data_spec)
        done_models.append({"name": m["name"], "path": m["path"], "identify": ident, "baselines": bases,
                            "ablation": abl, "sweep": sweep, "final": final})
    rep = _report(run, done_models)
    computed = [s for s in run.stages if s["status"] == "computed"]
    summary = ("every stage reused" if not computed else
               f"{len(computed)} stage(s) computed, {len(run.stages) - len(computed)} reused")
    run.log(f"finished in {time.time() - t0:.1f} s ({summary}): {out_dir / REPORT}")
    return {"report": out_dir / REPORT, "stages": run.stages, "report_stage": rep}
