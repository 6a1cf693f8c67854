"""`coco-tools run CONFIG.yaml`: the paper's experiment end to end, resumable stage by stage.

Per model (OUT/<model>/<stage>/):
  identify   COCO neurons on the identify split (identify.identify)
  baselines  RAND / NORM / MACT with the same count (identify.reselect: no model run)
  ablation   causal check: each set zeroed (bake --mode ablate-zero), stereo_coco success rate on
             the test split for the base model and every ablated one
  stability  split-half check: the identify data's two halves (and nested quarters) scored and
             selected alone from the stored intensities (no model run), the Jaccard overlap of
             their sets; each half's set ablated on the test split like the sets above
  sweep      every edit kind's grid (sweep.edits) at every neuron share of sweep.ratio (LE: the
             COCO set re-selected at that share), on the *validate* split, by successive halving
             (sweep.rungs, sweep.eta); admissible: acc_disambig and KL on neutral text within their
             declared floors; chosen per kind: the admissible one with the lowest Δ|s_AMB|
  final      base and each kind's chosen edit on the test split, on every benchmark of
             final.benchmarks (experiment/benchmarks.py; the chosen edits are kept under final/models/)
Then once: report (OUT/report/: figures.py draws the PNGs, report.py renders OUT/REPORT.md).

Each stage returns a typed result (results.py) wrapped in a Stage (result, dir, hash, seconds);
done.json stores the result's to_json() and a reused stage reads the same typed object back.

Every stage is built in OUT/<model>/.<stage>.partial/ and renamed into place when complete, with
a done.json holding the hash of everything the stage depends on (its config section, the model,
the data, the hashes of the stages it reads). A stage whose done.json hash matches is reused;
inside an unfinished stage, finished steps (one edited model, one evaluation) are reused too, so
an interrupted run resumes where it stopped. Every line of progress also goes to OUT/pipeline.log.
"""

from __future__ import annotations

# Lazy imports: identify/run.py, tasks/evaluate.py and the edit recipes (torch, transformers, lm-eval)
# load inside the stages that run them, so `coco-tools run --check` stays light.
import dataclasses
import datetime
import gc
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from vllm_coco import METHOD_VERSION, __version__
from vllm_coco.core.atomic import check_output_dir, plain_mode, remove_tree, swap_in, write_text
from vllm_coco.core.errors import CocoError
from vllm_coco.core.names import PAIRED_CONTRASTS, PARALLEL_OPTIONS
from vllm_coco.edit import model_card, registry
from vllm_coco.edit.registry import label
from vllm_coco.experiment import benchmarks, figures, report, stats, versus
from vllm_coco.experiment.benchmarks import NEUTRAL, STEREO
from vllm_coco.experiment.config import Eval, NeuronSet, RunConfig
from vllm_coco.experiment.edits import Edits, checkpointable
from vllm_coco.experiment.report import fmt
from vllm_coco.experiment.results import (
    LABELS,
    AblationResult,
    BaselineSet,
    BaselinesResult,
    Candidate,
    FinalResult,
    FinalRun,
    GroupSummary,
    HalfSplit,
    IdentifyResult,
    ModelResults,
    ParityResult,
    ReportResult,
    SetsResult,
    StabilityResult,
    Stage,
    SweepResult,
    SweepRow,
)
from vllm_coco.experiment.sweep import admissible, candidates, choose, promote, rung_limits, shares
from vllm_coco.tasks import results as lm_results

PIPELINE_VERSION = 6  # bump when a stage's output format or meaning changes: forces a recompute
DONE = "done.json"
STEP = "step.json"
LOG = "pipeline.log"
REPORT = "REPORT.md"
T = TypeVar("T")


# --------------------------------------------------------------------------- small helpers

def _plain(value):
    """JSON for what json cannot write itself: a config section as its keys (as written in a file)."""
    return value.model_dump(by_alias=True) if isinstance(value, BaseModel) else str(value)


def spec_hash(spec) -> str:
    blob = json.dumps(spec, sort_keys=True, default=_plain).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _write_json(path: Path, data) -> None:
    """Write JSON atomically (temp file + rename)."""
    write_text(path, json.dumps(data, indent=1, default=_plain) + "\n")


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


# --------------------------------------------------------------------------- context and stages

@dataclasses.dataclass(frozen=True)
class RunModel:
    """A model of the config (config.ModelEntry) with its directory resolved (a hub id fetched)."""

    name: str
    path: str
    parity_of: str | None
    dir: Path


class Run:
    """One invocation: the resolved config, the output root, the log."""

    def __init__(self, cfg: RunConfig, out: Path, echo=print, config_path: str = ""):
        self.cfg = cfg
        self.config_path = config_path
        self.out = out
        self.echo = echo
        self.backend = None  # resolved eval backend
        self.log_path = out / LOG
        self.stages: list[dict] = []  # (label, stage, status, seconds) of this invocation
        self._lm: tuple[str, object] | None = None  # (model dir, CocoHFLM): backend hf loads each model once

    @property
    def in_memory(self) -> bool:
        """Edits run as conditions on one loaded model (backend hf) rather than as written directories."""
        return self.backend == "hf"

    def writes(self, m: RunModel, kind: str) -> bool:
        """Whether the run can evaluate edit kind `kind` on model m: in memory any kind runs; written,
        only one a checkpoint of m can hold (checkpointable)."""
        return self.in_memory or checkpointable(m.dir, kind)

    def edits(self, m: RunModel, steps: Steps) -> Edits:
        """The edits a stage evaluates on m, in memory (backend hf: on the loaded model) or written."""
        return Edits(m.dir, steps, self.lm(m.dir) if self.in_memory else None, self.cfg.keep_models)

    def lm(self, model_dir: Path):
        """The loaded `CocoHFLM` of model_dir, shared by every stage of that model (one in memory at a time)."""
        if self._lm is None or self._lm[0] != str(model_dir):
            from vllm_coco.tasks.evaluate import load_lm

            self._lm = None
            gc.collect()
            self._lm = (str(model_dir), load_lm(model_dir, eval_options(self, (), "test", None)))
        return self._lm[1]

    def log(self, line: str) -> None:
        self.echo(line)
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {line}\n")

    def stage(self, root: Path, model: str, name: str, spec: dict, body, kind: type[T]) -> Stage[T]:
        """Run `body(partial_dir, steps) -> result` (a `kind`) unless a finished stage with the same
        hash exists; done.json holds result.to_json(), a reused stage reads it back as a `kind`."""
        spec = {"stage": name, "pipeline": PIPELINE_VERSION, "method": METHOD_VERSION, **spec}
        h = spec_hash(spec)
        final = root / name
        partial = root / f".{name}.partial"
        finished = _read_json(partial / DONE)
        if not final.exists() and finished and finished.get("hash") == h:
            os.replace(partial, final)  # interrupted between the two renames below: finish the swap
        done = _read_json(final / DONE)
        tag = f"[{model}] {name}"
        if done and done.get("hash") == h:
            try:
                reused = Stage(kind.from_json(done["result"]), final, h, float(done["seconds"]))
            except (KeyError, TypeError, ValueError):  # a damaged done.json: compute the stage again
                reused = None
            if reused is not None:
                self.log(f"{tag}: reused (finished {done.get('finished')}, {reused.seconds:.1f} s; config unchanged)")
                self.stages.append({"label": model, "stage": name, "status": "reused", "seconds": 0.0})
                return reused
        root.mkdir(parents=True, exist_ok=True)
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
        seconds = round(time.time() - t0, 1)
        done = {"stage": name, "model": model, "hash": h, "spec": spec, "seconds": seconds,
                "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                "tool": f"vllm-coco {__version__}", "result": result.to_json()}
        (partial / "stage.json").unlink()
        _write_json(partial / DONE, done)
        swap_in(partial, final)
        reused = f" ({steps.reused} finished steps reused)" if steps.reused else ""
        self.log(f"{tag}: done in {seconds:.1f} s{reused}")
        self.stages.append({"label": model, "stage": name, "status": "computed", "seconds": seconds})
        return Stage(result, final, h, seconds)


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
    code = ("import json, sys; from vllm_coco.experiment.pipeline import _child_eval; "
            "_child_eval(json.loads(sys.argv[1]))")
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


def eval_options(run: Run, tasks, split: str, limit, metadata=None, log_samples: bool = False):
    from vllm_coco.tasks.evaluate import EvalOptions

    ev = run.cfg.eval
    return EvalOptions(tasks=tuple(tasks), backend=run.backend, limit=limit, batch_size=ev.batch_size,
                       device=ev.device, max_model_len=ev.max_model_len, split=split, metadata=metadata,
                       chat=run.cfg.data.chat_template, scoring=ev.scoring, log_samples=log_samples,
                       dtype=ev.dtype if run.backend == "hf" else "float32",
                       **({k: getattr(ev, k) for k in (*PARALLEL_OPTIONS, "distributed_executor_backend")}
                          if run.backend == "vllm" else {}))


def evaluate(run: Run, model_dir: Path, tasks, split: str, limit, out: Path, metadata=None,
             condition: str | None = None, prefetch=(), log_samples: bool = False) -> dict:
    """Evaluate model_dir on `tasks` into `out` (results.json); returns lm-eval's results dict.
    In memory (backend hf): `condition` names an edit registered on run.lm(model_dir), and the
    conditions in `prefetch` are scored in the same batches for their own evaluations later."""
    from vllm_coco.tasks.evaluate import run_eval

    opts = eval_options(run, tasks, split, limit, metadata, log_samples)
    if run.backend == "vllm":
        eval_in_subprocess(model_dir, opts, out)
    elif run.in_memory:
        lm = run.lm(model_dir)
        lm.prefetch([c for c in prefetch if c != condition])
        run_eval(str(model_dir), opts, out=str(out), force=True, lm=lm, condition=condition)
    else:
        run_eval(str(model_dir), opts, out=str(out), force=True)
        gc.collect()
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def eval_groups(run: Run, model_dir: Path, parts: list[tuple[str, list, object]], split: str, steps: Steps,
                key: str, spec: dict, metadata=None, condition: str | None = None, prefetch=(),
                dirs: dict | None = None) -> dict:
    """Evaluate task groups with their own limits; groups with the same limit share one run.
    parts: [(part name, tasks, limit)] -> {part name: results dict}. `condition`, `prefetch`: see evaluate.
    Every document is logged (samples_<task>.jsonl, for the paired intervals); `dirs` gets each
    part's evaluation directory."""
    by_limit: dict = {}
    for name, tasks, limit in parts:
        by_limit.setdefault(limit, []).append((name, tasks))
    out = {}
    for i, (limit, group) in enumerate(by_limit.items()):
        tasks = [t for _, ts in group for t in ts]
        sub = f"{key}/eval{i}" if len(by_limit) > 1 else f"{key}/eval"
        d = steps.do(sub, {**spec, "tasks": tasks, "limit": limit, "split": split, "metadata": metadata,
                           "backend": run.backend, "scoring": run.cfg.eval.scoring},
                     lambda d, tasks=tasks, limit=limit: evaluate(run, model_dir, tasks, split, limit, d, metadata,
                                                                  condition, prefetch, log_samples=True))
        res = json.loads((d / "results.json").read_text(encoding="utf-8"))
        for name, _ in group:
            out[name] = res
            if dirs is not None:
                dirs[name] = d
    return out


# --------------------------------------------------------------------------- the stages

def _engine_parallel(ev: Eval) -> dict:
    """The eval section's vLLM parallelism that one identify engine takes (not data parallelism)."""
    keys = ("tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend")
    return {k: getattr(ev, k) for k in keys if getattr(ev, k) not in (None, 1)}


def identify_options(cfg: RunConfig, **extra):
    """The run config's identify settings as `coco-tools identify` takes them (IdentifyOptions), on the
    identify split; `extra` adds or overrides options (the parity stage: a smaller limit)."""
    from vllm_coco.identify.run import IdentifyOptions

    # the section's keys are IdentifyOptions' names; the spread over devices is the identify stage's own
    return IdentifyOptions(**{
        **cfg.identify.model_dump(exclude={"device_map", "backend"}), "split": "identify", "seed": cfg.seed,
        "data": cfg.data.source, "categories": tuple(cfg.data.categories), "chat": cfg.data.chat_template,
        "scoring": cfg.eval.scoring, **extra})


def _identify(run: Run, m: RunModel, root: Path, data_spec: dict) -> Stage[IdentifyResult]:
    from vllm_coco.identify.run import identify

    ic = run.cfg.identify
    spec = {"model": str(m.dir), "model_stamp": model_stamp(m.dir), "data": data_spec,
            "identify": ic, "seed": run.cfg.seed,
            # behavior mode picks the model's answers the way the evaluation scores them
            "scoring": run.cfg.eval.scoring if ic.contrast == "behavior" else None}

    def body(partial: Path, steps: Steps) -> IdentifyResult:
        # inside vLLM, the engine spreads as the evaluation's does
        parallel = _engine_parallel(run.cfg.eval) if ic.backend == "vllm" else {}
        opts = identify_options(run.cfg, device_map=ic.device_map, backend=ic.backend, **parallel)
        d = steps.do("neurons", {}, lambda d: identify(str(m.dir), str(d), opts, progress=sys.stderr.isatty()))
        gc.collect()
        return IdentifyResult.from_meta(json.loads((d / "neurons.json").read_text(encoding="utf-8")), "neurons")

    return run.stage(root, m.name, "identify", spec, body, IdentifyResult)


def _baselines(run: Run, m: RunModel, root: Path, ident: Stage[IdentifyResult]) -> Stage[BaselinesResult]:
    from vllm_coco.identify.run import reselect

    spec = {"identify": ident.hash, "baselines": run.cfg.baselines}

    def body(partial: Path, steps: Steps) -> BaselinesResult:
        sets = {}
        for b in run.cfg.baselines:
            d = steps.do(b, {}, lambda d, b=b: reselect(str(ident.dir / ident.result.neurons), str(d), baseline=b))
            sel = json.loads((d / "neurons.json").read_text(encoding="utf-8"))["selection"]
            sets[b] = BaselineSet(neurons=b, count=sel["count"], by_proj=dict(sel["by_proj"]))
        return BaselinesResult(sets=sets)

    return run.stage(root, m.name, "baselines", spec, body, BaselinesResult)


def _neuron_sets(ident: Stage[IdentifyResult], bases: Stage[BaselinesResult]) -> dict[str, Path]:
    """Every neuron set's directory: COCO first, then the baselines in the config's order."""
    sets = {"coco": ident.dir / ident.result.neurons}
    for b, info in bases.result.sets.items():
        sets[b] = bases.dir / info.neurons
    return sets


def score_test(run: Run, m: RunModel, steps: Steps, key: str, model_dir: Path, limit, where: dict[str, Path],
               what: str, condition: str | None = None, prefetch=(), mode: str | None = None) -> GroupSummary:
    """stereo_coco on the test split for one model or in-memory condition (ablated by `mode`; None:
    the base): the evaluation directory goes to where[key], one log line says its success rate."""
    t0, dirs, cats = time.time(), {}, run.cfg.data.categories
    res = eval_groups(run, model_dir, [("stereo", [f"stereo_coco_{c}" for c in cats], limit)], "test", steps,
                      f"evals/{key}", {"model": key, "mode": mode or "base"}, condition=condition,
                      prefetch=prefetch, dirs=dirs)["stereo"]
    where[key] = dirs["stereo"]
    out = STEREO.summarize(res, cats)
    run.log(f"  [{m.name}] {what}: success_rate {fmt(out.get('success_rate'))} ({time.time() - t0:.0f} s)")
    return out


BASE_EVAL = Path("evals/base/eval")  # the ablation stage's base evaluation (eval_groups, one group)


def ablated_name(name: str, mode: str, modes: list[str]) -> str:
    """A set's key under `mode` in the ablation stage's steps: its name under the first mode (the
    directories of earlier runs keep theirs), NAME-MODE under the others."""
    return name if mode == modes[0] else f"{name}-{mode}"


def _ablation(run: Run, m: RunModel, root: Path, ident: Stage[IdentifyResult], bases: Stage[BaselinesResult],
              data_spec: dict) -> Stage[AblationResult]:
    ac = run.cfg.ablation
    modes = ac.modes
    spec = {"model": str(m.dir), "model_stamp": model_stamp(m.dir), "identify": ident.hash,
            "baselines": bases.hash, "ablation": ac, "data": data_spec, "backend": run.backend,
            "scoring": run.cfg.eval.scoring}

    where: dict[str, Path] = {}  # set (under each mode) -> its evaluation directory

    def score(name: str, model_dir: Path, steps: Steps, condition=None, prefetch=(), mode=None) -> GroupSummary:
        what = "ablation " + LABELS.get(name, name) + ("" if mode in (None, modes[0]) else f" ({mode})")
        return score_test(run, m, steps, ablated_name(name, mode, modes) if mode else name, model_dir, ac.limit,
                          where, what, condition, prefetch, mode)

    def body(partial: Path, steps: Steps) -> AblationResult:
        sets = _neuron_sets(ident, bases)
        evaluable = [mode for mode in modes if run.writes(m, mode)]
        if not evaluable:
            raise CocoError(f"models {m.name}: no ablation.modes kind can be written for this architecture "
                            f"({', '.join(modes)}); add ablate-zero or use eval.backend hf")
        for mode in (mode for mode in modes if mode not in evaluable):
            run.log(f"  [{m.name}] ablation: {mode} skipped (its checkpoint needs q/k/v biases this "
                    "architecture lacks; eval.backend hf runs it in memory)")
        from vllm_coco.edit.recipe import Recipe

        edits = run.edits(m, steps)  # every set under every mode, scored in the base's batches in memory
        for mode in evaluable:
            for name, neurons in sets.items():
                edits.add(f"ablate-{ablated_name(name, mode, modes)}", Recipe(mode), neurons)
        base = score("base", m.dir, steps, prefetch=edits.alongside())
        base_recs = stats.bbq_records(where["base"])  # read once: every ablation kind is compared with it
        results = [_ablation_mode(edits, steps, sets, mode, modes, score, where, (base, base_recs), ac.limit)
                   for mode in evaluable]
        return dataclasses.replace(results[0], also={r.mode: r for r in results[1:]})

    return run.stage(root, m.name, "ablation", spec, body, AblationResult)


def _ablation_mode(edits: Edits, steps: Steps, sets: dict[str, Path], mode: str, modes: list[str], score,
                   where: dict[str, Path], base: tuple[GroupSummary, list[dict]], limit) -> AblationResult:
    """Every set ablated by `mode`, against the stage's base evaluation (its summary and records):
    summaries, intervals, specificity."""
    base, base_recs = base
    scored = {}
    for name, neurons in sets.items():
        key = ablated_name(name, mode, modes)
        edited = edits.model(f"ablate-{key}", f"models/{key}", {"neurons": str(neurons), "mode": mode})
        scored[name] = score(name, edited.dir, steps, condition=edited.condition, mode=mode)
        edits.release(edited)
    recs = {name: stats.bbq_records(where[ablated_name(name, mode, modes)]) for name in scored}
    intervals = {name: {k: stats.compare(base_recs, recs[name], k) for k in stats.METRIC_STATS} for name in scored}
    specific = {name: stats.compare_diff(base_recs, recs["coco"], recs[name])
                for name in scored if name != "coco" and "coco" in recs}
    return AblationResult(mode=mode, limit=limit, split="test", base=base, sets=scored, intervals=intervals,
                          specific=specific)


def _stability(run: Run, m: RunModel, root: Path, ident: Stage[IdentifyResult], abl: Stage[AblationResult],
               data_spec: dict) -> Stage[StabilityResult] | None:
    """Split-half stability (identify/stability.py): the identify data's halves (and smaller nested
    subsets) scored and selected alone from the stored intensities, their overlap; with `ablate`,
    each half's set ablated on the test split like the ablation stage's sets, against its base."""
    sc, ac = run.cfg.stability, run.cfg.ablation
    if not sc.fractions:
        return None
    limit = ac.limit if sc.limit is None else sc.limit
    spec = {"model": str(m.dir), "model_stamp": model_stamp(m.dir), "identify": ident.hash,
            "ablation": abl.hash, "stability": sc, "limit": limit, "mode": abl.result.mode, "seed": run.cfg.seed,
            "data": data_spec, "backend": run.backend, "scoring": run.cfg.eval.scoring}

    def body(partial: Path, steps: Steps) -> StabilityResult:
        import numpy as np

        from vllm_coco.core.artifact import Artifact
        from vllm_coco.identify import stability as st
        from vllm_coco.identify.run import rescore

        full = ident.dir / ident.result.neurons
        meta, arrays = Artifact.read(full)
        row_cat, row_label = arrays["row_category"], arrays["row_label"]
        paired, seed = meta["data"].get("contrast", "response") in PAIRED_CONTRASTS, run.cfg.seed
        count, total = len(arrays["selected"]), len(arrays["loss"])
        splits = []
        for fraction in sorted(sc.fractions, reverse=True):
            halves = st.split_halves(row_cat, row_label, paired, seed, fraction)
            if halves is None:
                run.log(f"  [{m.name}] stability: {fraction:g} of the identify data leaves a category fewer "
                        f"than {st.MIN_UNITS} pairs per side; skipped")
                continue
            dirs = [steps.do(f"sets/f{fraction:g}-{side}", {"fraction": fraction, "side": side, "seed": seed},
                             lambda d, rows=rows, side=side, fraction=fraction: rescore(
                                 str(full), str(d), rows, f"stability: subset {side}, {fraction:g} of each "
                                 f"category's identify data (seed {seed})"))
                    for side, rows in zip("ab", halves)]
            sels = [Artifact.read(d).arrays["selected"] for d in dirs]
            split = HalfSplit(fraction=fraction, pairs=st.units_per_category(halves[0], row_cat, row_label),
                              jaccard=st.jaccard(*sels), jaccard_full=[st.jaccard(x, arrays["selected"]) for x in sels],
                              neurons=[str(d.relative_to(partial)) for d in dirs])
            splits.append(split)
            run.log(f"  [{m.name}] stability: {split.pairs} pairs per category per subset: Jaccard "
                    f"{split.jaccard:.3f} (vs the full set {split.jaccard_full[0]:.3f} / {split.jaccard_full[1]:.3f}; "
                    f"chance {st.chance_jaccard(count, total):.3f})")
        res = {"count": count, "total": total, "chance": st.chance_jaccard(count, total), "splits": splits,
               "pairs": st.units_per_category(np.arange(len(row_cat)), row_cat, row_label)}
        if not (sc.ablate and splits):
            return StabilityResult(**res)
        from vllm_coco.edit.recipe import Recipe

        sides = {f"half-{side}": partial / rel for side, rel in zip("ab", splits[0].neurons)}
        edits, mode = run.edits(m, steps), abl.result.mode
        for name, neurons in sides.items():
            edits.add(f"ablate-{name}", Recipe(mode), neurons)
        where: dict[str, Path] = {}

        def score(name: str, neurons: Path) -> GroupSummary:
            edited = edits.model(f"ablate-{name}", f"models/{name}", {"neurons": str(neurons), "mode": mode})
            others = [c for c in edits.alongside() if c != edited.condition]
            out = score_test(run, m, steps, name, edited.dir, limit, where, f"stability: {name} ablated",
                             edited.condition, others, mode)
            edits.release(edited)
            return out

        ablated = {name[-1]: score(name, neurons) for name, neurons in sides.items()}
        base = stats.bbq_records(abl.dir / BASE_EVAL)
        intervals = {name[-1]: stats.compare(base, stats.bbq_records(d), "success_rate") for name, d in where.items()}
        return StabilityResult(**res, limit=limit, ablated=ablated, intervals=intervals)

    return run.stage(root, m.name, "stability", spec, body, StabilityResult)


def share_sets(run: Run, ident: Stage[IdentifyResult], steps: Steps) -> None:
    """The COCO set at each swept share other than identify's (LE edits it): `select --ratio` of the
    identify artifact into sets/r<share>/ of the stage (no model run)."""
    from vllm_coco.identify.run import reselect

    full = ident.dir / ident.result.neurons
    for r in shares(run.cfg.sweep, run.cfg.identify.ratio):
        if r != run.cfg.identify.ratio:
            steps.do(f"sets/r{r:g}", {"ratio": r}, lambda d, r=r: reselect(str(full), str(d), ratio=r))


@dataclasses.dataclass(frozen=True)
class Sources:
    """Where a model's candidate edits take their neurons: the identify stage's set and the sets
    stage's named ones (None: config `sets` is empty)."""
    ident: Stage[IdentifyResult]
    sets: Stage[SetsResult] | None

    def neurons(self, run: Run, sets_dir: Path, cand: Candidate) -> Path:
        """The artifact a candidate edits: a KIND@SET arm's set; a linear kind at a share other than
        identify's reads that share's set (share_sets, under the sweep stage's directory `sets_dir`);
        the NE gate takes its share of q/v neurons from the identify artifact itself (ne_gate.select_ne)."""
        if cand.set is not None:
            return self.sets.dir / self.sets.result.sets[cand.set].neurons
        if not recipe(cand).is_gate and cand.ratio is not None and cand.ratio != run.cfg.identify.ratio:
            return sets_dir / "sets" / f"r{cand.ratio:g}"
        return self.ident.dir / self.ident.result.neurons


def _sets(run: Run, m: RunModel, root: Path, ident: Stage[IdentifyResult], data_spec: dict) -> Stage[SetsResult] | None:
    """The config's `sets`: each identified anew with its contrast (the identify section's other
    options), or re-selected from the identify stage's set ("coco") or an earlier set."""
    sets = run.cfg.sets
    if not sets:
        return None
    spec = {"model": str(m.dir), "model_stamp": model_stamp(m.dir), "identify": ident.hash,
            "identify_cfg": run.cfg.identify, "sets": sets, "data": data_spec, "seed": run.cfg.seed,
            "scoring": run.cfg.eval.scoring}

    def body(partial: Path, steps: Steps) -> SetsResult:
        out = {}
        for name, s in sets.items():
            d = steps.do(name, s, lambda d, s=s: _make_set(run, m, ident, partial, s, d))
            out[name] = IdentifyResult.from_meta(json.loads((d / "neurons.json").read_text(encoding="utf-8")), name)
            gc.collect()
        return SetsResult(sets=out)

    return run.stage(root, m.name, "sets", spec, body, SetsResult)


def _make_set(run: Run, m: RunModel, ident: Stage[IdentifyResult], partial: Path, s: NeuronSet, d: Path) -> None:
    from vllm_coco.identify.run import identify, reselect

    if s.from_ is None:
        limit = run.cfg.identify.limit if s.limit is None else s.limit
        opts = identify_options(run.cfg, contrast=s.contrast, limit=limit, baseline=s.baseline,
                                abstention_filter=bool(s.abstention_filter))
        identify(str(m.dir), str(d), opts, progress=sys.stderr.isatty())
    else:
        source = ident.dir / ident.result.neurons if s.from_ == "coco" else partial / s.from_
        reselect(str(source), str(d), baseline=s.baseline, abstention_filter=s.abstention_filter)


# the parity stage's two conditions: (name, edited?); the edit is the NE gate at its defaults
PARITY_GATE = Candidate(key="parity-ne", edit=registry.gate().name, settings={})
PARITY = (("base", False), (PARITY_GATE.edit, True))


def recipe(cand: Candidate):
    """The candidate as an edit every backend runs (edit/recipe.py)."""
    from vllm_coco.edit.recipe import Recipe

    return Recipe(cand.edit, dict(cand.settings), cand.ratio)


def _sweep(run: Run, m: RunModel, root: Path, src: Sources, data_spec: dict) -> Stage[SweepResult]:
    """Successive halving over the candidates on the validate split (sweep.py): every candidate at the
    first rung's sample, the best 1/eta of each kind at the next, ...; each scored on stereo_coco
    (Δ|s_AMB|, Δ acc_disambig, Δ success rate vs the base at that rung) and on KL on neutral text."""
    sw = run.cfg.sweep
    spec = {"model": str(m.dir), "model_stamp": model_stamp(m.dir), "identify": src.ident.hash,
            "sets": src.sets and src.sets.hash, "sweep": sw,
            "identify_ratio": run.cfg.identify.ratio, "data": data_spec, "backend": run.backend,
            "scoring": run.cfg.eval.scoring, "floors": _sweep_floors()}

    def body(partial: Path, steps: Steps) -> SweepResult:
        cands = _evaluable(run, m, candidates(sw, run.cfg.identify.ratio))
        share_sets(run, src.ident, steps)
        neurons = {c.key: src.neurons(run, partial, c) for c in cands}
        edits = run.edits(m, steps)
        for c in cands:
            edits.add(f"sweep-{c.key}", recipe(c), neurons[c.key])
        rows, alive, base = [], cands, None
        for rung, limit in enumerate(rung_limits(sw)):
            base, scored = _sweep_rung(run, m, steps, rung, limit, alive, edits)
            rows += scored
            alive = [c for c in alive if c.key in promote(scored, sw.eta)]
        chosen = {e: choose(rows, e) for e in sw.edits}
        for c in chosen.values():
            run.log(f"  [{m.name}] sweep: {c.note}")
        return SweepResult(split="validate", limits=rung_limits(sw), neutral_limit=sw.neutral_limit,
                           floors=_sweep_floors(), base=base, rows=rows, chosen=chosen)

    return run.stage(root, m.name, "sweep", spec, body, SweepResult)


def _evaluable(run: Run, m: RunModel, cands: list[Candidate]) -> list[Candidate]:
    """The candidates the run can evaluate on m (Run.writes); the others' arms are logged as skipped."""
    keep = [c for c in cands if run.writes(m, c.edit)]
    for arm in dict.fromkeys(c.arm for c in cands if c not in keep):
        run.log(f"  [{m.name}] sweep: {label(arm)} skipped (written checkpoints of this architecture cannot "
                "hold its offsets; eval.backend hf runs it in memory)")
    return keep


def _sweep_floors() -> dict[str, float]:
    """The admissibility floors: the declared ones of acc_disambig (stereo) and KL (neutral)."""
    return {"acc_disambig": STEREO.metric("acc_disambig").floor, "kl": NEUTRAL.metric("kl").floor}


def _sweep_rung(run: Run, m: RunModel, steps: Steps, rung: int, limit, cands: list[Candidate], edits: Edits):
    """One rung: the base and `cands` on `limit` validate documents per category -> (base row, rows)."""
    cats = run.cfg.data.categories
    tasks = [f"stereo_coco_{c}" for c in cats]
    t0, tag = time.time(), f"rung {rung + 1} ({limit or 'all'} documents per category, {len(cands)} candidates)"

    def score(key: str, model_dir: Path, condition=None, prefetch=()):
        dirs: dict[str, Path] = {}
        res = eval_groups(run, model_dir, [("stereo", tasks, limit)], "validate", steps, f"evals/{key}-l{limit}",
                          {"model": key}, condition=condition, prefetch=prefetch, dirs=dirs)
        return STEREO.summarize(res["stereo"], cats), stats.bbq_records(dirs["stereo"])

    base_sum, base_recs = score("base", m.dir, prefetch=edits.alongside({f"sweep-{c.key}" for c in cands}))
    base = SweepRow.score(None, rung, limit, base_sum, 0.0)
    run.log(f"  [{m.name}] sweep {tag}: base success_rate {fmt(base.success_rate)}, |s_AMB| "
            f"{fmt(base.abs_bias_ambig)} ({time.time() - t0:.0f} s)")
    rows = []
    for cand in cands:
        t0 = time.time()
        edited = edits.model(f"sweep-{cand.key}", f"models/{cand.key}", {"cand": cand.spec()})
        summ, recs = score(cand.key, edited.dir, condition=edited.condition)
        edits.release(edited)
        deltas = {k: stats.compare(base_recs, recs, k) for k in ("success_rate", "abs_bias_ambig", "acc_disambig")}
        kl = _sweep_kl(run, m, steps, cand, edits.recipes[f"sweep-{cand.key}"][1])
        row = SweepRow.score(cand, rung, limit, summ, kl, deltas)
        row = dataclasses.replace(row, admissible=admissible(row, **_floor_args()))
        rows.append(row)
        run.log(f"  [{m.name}] sweep {label(cand.arm)} {row.params} @{limit or 'all'}: Δ|s_AMB| "
                f"{row.bias.text() if row.bias else 'n/a'}, Δ acc_disambig {fmt(row.acc.delta if row.acc else None)}, "
                f"KL {fmt(row.kl, 4)}{'' if row.admissible else ' (outside the floors)'} ({time.time() - t0:.0f} s)")
    return base, rows


def _floor_args() -> dict[str, float]:
    floors = _sweep_floors()
    return {"acc_floor": floors["acc_disambig"], "kl_floor": floors["kl"]}


def _sweep_kl(run: Run, m: RunModel, steps: Steps, cand: Candidate, neurons: Path) -> float:
    """The candidate's mean KL per token on the validate neutral passages (measured once per candidate)."""
    d = measure_step(run, m, steps, f"evals/{cand.key}/neutral", NEUTRAL, cand, neurons, f"sweep-{cand.key}",
                     run.cfg.sweep.neutral_limit, split="validate")
    res = json.loads((d / "results.json").read_text(encoding="utf-8"))
    return lm_results.metric(res, NEUTRAL.name, "kl")




def final_benchmarks(cfg: RunConfig) -> dict[str, benchmarks.Benchmark]:
    """The benchmarks the final stage runs (config `final.benchmarks`), in order."""
    return {name: benchmarks.get(name) for name in cfg.final.benchmarks}


def _final(run: Run, m: RunModel, root: Path, src: Sources, sweep: Stage[SweepResult],
           data_spec: dict) -> Stage[FinalResult]:
    fc, cats = run.cfg.final, run.cfg.data.categories
    benches = final_benchmarks(run.cfg)
    limits = {name: fc.benchmarks[name].limit for name in benches}
    chosen = {e: sweep.result.chosen_row(e) for e in sweep.result.chosen}
    spec = {"model": str(m.dir), "model_stamp": model_stamp(m.dir), "identify": src.ident.hash,
            "sets": src.sets and src.sets.hash, "sweep": sweep.hash, "final": fc, "data": data_spec,
            "backend": run.backend, "scoring": run.cfg.eval.scoring}
    where: dict[str, dict[str, Path]] = {}  # run -> benchmark -> evaluation directory
    metadata = {k: v for b in benches.values() for k, v in (b.metadata(cats) or {}).items()} or None

    def evaluate_one(name: str, cand: Candidate | None, edits: Edits, steps: Steps, prefetch=()) -> FinalRun:
        t0 = time.time()
        model_dir, written, condition = _final_model(run, m, name, cand, edits)
        dirs: dict[str, Path] = {}
        parts = [(b.name, b.tasks(cats), limits[b.name]) for b in benches.values() if b.tasks(cats)]
        res = eval_groups(run, model_dir, parts, "test", steps, f"evals/{name}", {"model": name}, metadata,
                          condition=condition, prefetch=prefetch, dirs=dirs)  # one evaluation per distinct limit
        for b in (b for b in benches.values() if not b.tasks(cats)):  # measured on the loaded base model
            neurons = None if cand is None else src.neurons(run, sweep.dir, cand)
            dirs[b.name] = d = measure_step(run, m, steps, f"evals/{name}/{b.name}", b, cand, neurons, f"final-{name}",
                                            limits[b.name])
            res[b.name] = json.loads((d / "results.json").read_text(encoding="utf-8"))
        where[name] = dirs
        out = FinalRun(params="-" if cand is None else cand.params, model=written,
                       summaries={b.name: b.summarize(res[b.name], cats) for b in benches.values()},
                       intervals=None if cand is None else {
                           b.name: b.intervals(where["base"][b.name], dirs[b.name], cats) for b in benches.values()})
        run.log(f"  [{m.name}] final {label(name)}: success_rate "
                f"{fmt(out.stereo.get('success_rate'))} ({time.time() - t0:.0f} s)")
        return out

    def body(partial: Path, steps: Steps) -> FinalResult:
        edits = run.edits(m, steps)  # in memory, scored in the base's batches
        for e, row in ((e, row) for e, row in chosen.items() if row is not None):
            edits.add(f"final-{e}", recipe(row.candidate), src.neurons(run, sweep.dir, row.candidate))
        base = evaluate_one("base", None, edits, steps, prefetch=edits.alongside())
        edits = {e: evaluate_one(e, row.candidate, edits, steps) for e, row in chosen.items() if row is not None}
        recs = {e: STEREO.records(where[e][STEREO.name], cats) for e in edits}
        vs = versus.compare(STEREO.records(where["base"][STEREO.name], cats), recs)
        for e, fr in ((e, fr) for e, fr in edits.items() if fr.model):  # written edits' cards carry the verdicts
            verdicts = benchmarks.judge_all(fr.intervals or {}, label(e), run.cfg)
            model_card.with_verdicts(partial / fr.model / model_card.CARD,
                                     [[v.claim, f"**{v.status}**", report.evidence(v)] for v in verdicts])
        return FinalResult(split="test", limits=limits, base=base, edits=edits, versus=vs)

    return run.stage(root, m.name, "final", spec, body, FinalResult)


def measure_step(run: Run, m: RunModel, steps: Steps, key: str, bench, cand: Candidate | None, neurons: Path | None,
                 condition: str, limit, split: str = "test") -> Path:
    """`bench.measure` (a benchmark that is not an lm-eval task) of the base model (cand None) or of a
    candidate registered as `condition`, in memory on the base model whatever the eval backend (the
    condition equals the written directory); a finished step is reused. Returns its directory."""
    def fn(d: Path):
        lm = run.lm(m.dir)
        if cand is not None:
            lm.add_condition(condition, recipe(cand).condition(neurons, m.dir))
        bench.measure(lm, "base" if cand is None else condition, d, limit, split=split)

    spec = {"cand": None if cand is None else cand.spec(), "limit": limit, "bench": bench.name, "split": split}
    return steps.do(key, spec, fn)


def _final_model(run: Run, m: RunModel, name: str, cand: Candidate | None, edits: Edits):
    """(model dir to evaluate, the written edit relative to the stage or None, in-memory condition or None).
    The chosen edits are the run's product: written even when evaluated in memory, where a checkpoint
    of this architecture can hold them."""
    if cand is None:
        return m.dir, None, None
    spec = {k: v for k, v in cand.spec().items() if k != "key"}
    edited = edits.model(f"final-{name}", f"models/{name}", {"cand": spec}, product=True)
    if edited.written is None:  # only in memory (the sweep let no other through)
        run.log(f"  [{m.name}] final {label(name)}: evaluated in memory, not written (a checkpoint of this "
                "architecture cannot hold its offsets)")
    return edited.dir, edited.written and f"models/{name}", edited.condition


def _max_loglik_diff(a: Path, b: Path, tasks) -> tuple[float, int]:
    """Max |Δ| over every option log-likelihood of the documents two evaluations logged; the count."""
    worst, docs = 0.0, 0
    for t in tasks:
        da, db = (stats.option_logliks(d / stats.SAMPLES.format(task=t)) for d in (a, b))
        if da.keys() != db.keys():
            return float("inf"), docs
        for k, (_, la) in da.items():
            worst = max([worst] + [abs(x - y) for x, y in zip(la, db[k][1])])
            docs += 1
    return worst, docs


def _parity(run: Run, m: RunModel, ref: RunModel, root: Path, data_spec: dict) -> Stage[ParityResult]:
    """Identify both models at a small size and evaluate base and NE-COCO on a small sample: a twin
    must reproduce its reference to `parity.tolerance` (CocoError otherwise: a code-path bug)."""
    from vllm_coco.core.artifact import Artifact
    from vllm_coco.identify.run import identify

    pc, ic = run.cfg.parity, run.cfg.identify
    cats = run.cfg.data.categories
    tasks = [f"stereo_coco_{c}" for c in cats]
    spec = {"model": str(m.dir), "model_stamp": model_stamp(m.dir), "reference": str(ref.dir),
            "reference_stamp": model_stamp(ref.dir), "parity": pc, "data": data_spec, "identify": ic,
            "seed": run.cfg.seed, "backend": run.backend, "scoring": run.cfg.eval.scoring}

    def body(partial: Path, steps: Steps) -> ParityResult:
        opts = identify_options(run.cfg, limit=pc.identify_limit, null_rounds=0)
        evals = {}
        for x in (ref, m):
            neurons = steps.do(f"neurons/{x.name}", {},
                               lambda d, x=x: identify(str(x.dir), str(d), opts, progress=False))
            edits = run.edits(x, steps)
            edits.add(PARITY_GATE.key, recipe(PARITY_GATE), neurons)
            for cond, edit in PARITY:
                model_dir, condition, prefetch = x.dir, None, edits.alongside()
                if edit:
                    edited = edits.model(PARITY_GATE.key, f"models/{x.name}-{cond}", {})
                    model_dir, condition, prefetch = edited.dir, edited.condition, ()
                evals[(x.name, cond)] = steps.do(
                    f"evals/{x.name}-{cond}", {"limit": pc.limit},
                    lambda d, md=model_dir, c=condition, p=prefetch: evaluate(run, md, tasks, "test", pc.limit, d,
                                                                              condition=c, prefetch=p,
                                                                              log_samples=True))
        (ma, aa), (mb, ab) = (Artifact.read(partial / f"neurons/{x.name}") for x in (ref, m))
        diffs = {c: _max_loglik_diff(evals[(ref.name, c)], evals[(m.name, c)], tasks) for c, _ in PARITY}
        res = ParityResult(reference=ref.name, identify_limit=pc.identify_limit, limit=pc.limit,
                           tolerance=pc.tolerance,
                           max_abs_score=float(abs(aa["score"].astype(float) - ab["score"].astype(float)).max()),
                           same_selection=sorted(aa["selected"].tolist()) == sorted(ab["selected"].tolist()),
                           selected=len(ab["selected"]), docs=diffs["base"][1],
                           max_abs_loglik={c: d[0] for c, d in diffs.items()})
        run.log(f"  [{m.name}] parity with {ref.name}: identical {'yes' if res.identical else 'NO'} (max |Δ| "
                f"score {res.max_abs_score:.2g}, log-likelihood base {diffs['base'][0]:.2g} / NE {diffs['ne'][0]:.2g} "
                f"over {res.docs} documents; same selection: {'yes' if res.same_selection else 'no'})")
        if not res.identical:
            raise CocoError(f"parity: {m.name} does not reproduce {ref.name} within {pc.tolerance:g} (max |Δ| "
                            f"score {res.max_abs_score:.3g}, log-likelihood {res.max_abs_loglik}, same selection "
                            f"{res.same_selection}): the {m.name} code path differs; see {partial}")
        return res

    return run.stage(root, m.name, "parity", spec, body, ParityResult)


# --------------------------------------------------------------------------- report

def _report(run: Run, models: list[ModelResults], parities: dict[str, Stage[ParityResult]]) -> Stage[ReportResult]:
    spec = {"models": {m.name: {s: stage.hash for s, stage in m.stages().items()} for m in models},
            "parity": {name: stage.hash for name, stage in parities.items()},
            "config": run.config_path}
    cats = run.cfg.data.categories

    def body(partial: Path, steps: Steps) -> ReportResult:
        figs = {m.name: figures.draw(m, cats, partial) for m in models}
        for png in (p for f in figs.values() for p in f.paths()):
            plain_mode(png)
        layouts = {m.name: report.neuron_layout(m.identify) for m in models}
        text = report.render(run.cfg, run.config_path, run.out, run.backend, models, figs, layouts,
                             {name: stage.result for name, stage in parities.items()})
        (partial / REPORT).write_text(text, encoding="utf-8")
        return ReportResult(report=REPORT, figures=sorted(p.name for f in figs.values() for p in f.paths()))

    done = run.stage(run.out, "all", "report", spec, body, ReportResult)
    # OUT/REPORT.md links figures as report/<name>.png
    write_text(run.out / REPORT, (done.dir / REPORT).read_text(encoding="utf-8"))
    return done


# --------------------------------------------------------------------------- entry point

def plan(cfg: RunConfig) -> list[str]:
    sw = cfg.sweep
    n_cand = len(candidates(sw, cfg.identify.ratio))
    lines = [f"output: {cfg.out}"]
    for m in cfg.models:
        if m.parity_of is not None:
            lines.append(f"[{m.name}] {m.path}: parity with {m.parity_of} (identify "
                         f"{cfg.parity.identify_limit} pairs per category, base + NE-COCO on "
                         f"{cfg.parity.limit} documents per category)")
            continue
        lines.append(f"[{m.name}] {m.path}: identify -> baselines ({', '.join(cfg.baselines) or 'none'}) -> "
                     f"ablation ({1 + len(cfg.ablation.modes) * (1 + len(cfg.baselines))} evals) -> "
                     + (f"stability ({len(cfg.stability.fractions)} split(s)"
                        + (", 2 evals" if cfg.stability.ablate else "") + ") -> "
                        if cfg.stability.fractions else "")
                     + (f"sets ({', '.join(cfg.sets)}) -> " if cfg.sets else "")
                     + f"sweep ({n_cand} candidates, {sw.rungs} rung(s) of successive halving) "
                     f"-> final (base, {', '.join(label(e) for e in cfg.sweep.edits)}; benchmarks "
                     f"{', '.join(cfg.final.benchmarks)})")
    lines.append("report: OUT/REPORT.md")
    return lines


def run_pipeline(config_path: str, out: str | None = None, check: bool = False, echo=print) -> dict:
    """Validate CONFIG, then run (or reuse) every stage; returns {"report": path, "stages": [...]}."""
    from vllm_coco.core.models import check_device, resolve_model_dir
    from vllm_coco.experiment import config as config_mod

    cfg = config_mod.load(config_path, overrides={"out": out} if out is not None else None)
    if check:  # the output rule against the local inputs too (hub models are not fetched for a check)
        local = [Path(m.path).expanduser() for m in cfg.models if Path(m.path).expanduser().exists()]
        check_output_dir(cfg.out, force=False, sources=tuple(local), what="out:", merge=True)
        for line in plan(cfg):
            echo(line)
        return {"report": None, "stages": []}
    check_device(cfg.identify.device, "identify.device:")
    if cfg.eval.device is not None:
        check_device(cfg.eval.device, "eval.device:")
    models = [RunModel(m.name, m.path, m.parity_of, resolve_model_dir(m.path)) for m in cfg.models]  # hub ids: fetched
    src = cfg.data.source
    inputs = [m.dir for m in models] + ([Path(src).expanduser()] if Path(src).expanduser().is_dir() else [])
    # a run resumes by writing into an existing out; out may never overlap an input
    out_dir = check_output_dir(cfg.out, force=False, sources=tuple(inputs), what="out:", merge=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown the stage lines
    run = Run(cfg, out_dir, echo, config_path=str(config_path))
    run.backend = config_mod.resolve_backend(cfg.eval.backend)
    t0 = time.time()
    run.log(f"coco-tools run {config_path}: {len(models)} model(s), eval backend {run.backend}, output {out_dir}")
    data_spec = {"source": cfg.data.source, "categories": cfg.data.categories,
                 "chat_template": cfg.data.chat_template}
    done_models, parities = [], {}
    for m in models:
        root = out_dir / m.name
        if m.parity_of is not None:
            ref = next(x for x in models if x.name == m.parity_of)
            parities[m.name] = _parity(run, m, ref, root, data_spec)
            continue
        ident = _identify(run, m, root, data_spec)
        bases = _baselines(run, m, root, ident)
        abl = _ablation(run, m, root, ident, bases, data_spec)
        stab = _stability(run, m, root, ident, abl, data_spec)
        sets = _sets(run, m, root, ident, data_spec)
        src = Sources(ident, sets)
        sweep = _sweep(run, m, root, src, data_spec)
        final = _final(run, m, root, src, sweep, data_spec)
        done_models.append(ModelResults(name=m.name, path=m.path, identify=ident, baselines=bases,
                                        ablation=abl, stability=stab, sets=sets, sweep=sweep, final=final))
    rep = _report(run, done_models, parities)
    computed = [s for s in run.stages if s["status"] == "computed"]
    summary = ("every stage reused" if not computed else
               f"{len(computed)} stage(s) computed, {len(run.stages) - len(computed)} reused")
    run.log(f"finished in {time.time() - t0:.1f} s ({summary}): {out_dir / REPORT}")
    return {"report": out_dir / REPORT, "stages": run.stages, "report_stage": rep}
