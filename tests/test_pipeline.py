"""`coco-tools run`: the whole experiment on a tiny model, its resumability, and config validation."""

import copy
import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("identify", "baselines", "ablation", "stability", "sets", "sweep", "final")


# What the tests add to configs/tiny.yaml (which the README's fresh-clone test runs on the demo model
# as shipped): every control, both ablation kinds, every edit kind on each set, two shares, the
# stability stage's ablations.
EVERY_STAGE = {
    "baselines": ["rand", "norm", "mact"],
    "ablation": {"modes": ["ablate-zero", "ablate-mean"], "limit": 3},
    "stability": {"fractions": [0.5, 0.25], "ablate": True, "limit": None},
    "sweep": {"edits": {"le": {"alpha": [0.5, 1.0]}, "ne": {"alpha": [1.0], "beta": [2.0], "lam": [0.5]},
                        "le@stereo": {"alpha": [1.0]}, "steer@diffmean": {"alpha": [4.0]}},
              "ratio": [0.01, 0.02], "limit": 12, "rungs": 2, "eta": 3, "neutral_limit": 2},
}


def _tiny_config(tmp_path: Path, model: Path, **changes) -> Path:
    """configs/tiny.yaml plus EVERY_STAGE, with the tiny model and an output under tmp_path."""
    cfg = {**yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()), **copy.deepcopy(EVERY_STAGE)}
    cfg["models"] = [{"path": str(model), "name": "tiny"}]
    cfg["out"] = str(tmp_path / "out")
    for key, value in changes.items():
        cfg[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --------------------------------------------------------------------------- end to end

def _done_files(out: Path) -> dict:
    files = {f"tiny/{s}": out / "tiny" / s / "done.json" for s in STAGES}
    files["report"] = out / "report" / "done.json"
    return files


def test_pipeline_end_to_end_and_resume(bbq_tiny_model, tmp_path, monkeypatch):
    from vllm_coco.experiment import pipeline
    from vllm_coco.experiment.results import (
        AblationResult,
        BaselinesResult,
        FinalResult,
        IdentifyResult,
        SetsResult,
        StabilityResult,
        SweepResult,
    )
    from vllm_coco.experiment.sweep import promote

    config = _tiny_config(tmp_path, bbq_tiny_model)
    out = tmp_path / "out"
    calls = []
    real_evaluate = pipeline.evaluate

    def counting(*args, fail_at=None, **kwargs):
        calls.append(args[3])  # the split
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # as if Ctrl-C hit the run in the middle of the sweep
        return real_evaluate(*args, **kwargs)

    # run 1: interrupted at the 13th evaluation (9 ablation runs: base, and 4 sets under each of the 2 ablation
    # kinds; 2 stability half-set ablations, sweep base, then the first candidate)
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: counting(*a, fail_at=13, **k))
    code, stdout, err = run_cli("run", config)
    assert code == 130, err[-3000:]
    assert calls == ["test"] * 11 + ["validate"] * 2
    for stage in ("identify", "baselines", "ablation", "stability"):  # (sets: after stability, no evaluation)
        assert (out / "tiny" / stage / "done.json").is_file()
    assert not (out / "tiny" / "sweep").exists() and (out / "tiny" / ".sweep.partial").is_dir()
    assert not (out / "REPORT.md").exists()

    # run 2: finished stages reused, the sweep resumes from its finished steps
    calls.clear()
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: counting(*a, **k))
    code, stdout, err = run_cli("run", config)
    assert code == 0, err[-3000:]
    for stage in ("identify", "baselines", "ablation", "stability", "sets"):
        assert f"[tiny] {stage}: reused" in stdout, stage
    assert "[tiny] sweep: start (resuming its finished steps)" in stdout
    # the rest of the sweep's first rung (8 candidates), its second (base + the best third of each arm: 2 LE,
    # 1 NE, 1 LE on the stereotype set, 1 steering), then base and the 4 arms on test
    assert calls == ["validate"] * 8 + ["validate"] * 6 + ["test"] * 5
    for stage in ("sweep", "final"):
        assert re.search(rf"\[tiny\] {stage}: done in [\d.]+ s", stdout), stage
    report = (out / "REPORT.md").read_text()
    for heading in ("## Verdicts", "## Summary", "### Neurons", "### Causal check", "### Stability", "### Sweep",
                    "### Final, BBQ (", "### Final, BBQ, held-out", "### Final, Abstention control",
                    "### Final, Jailbreak", "### Final, Retention", "### Final, Neutral text",
                    "### Neuron sets edited by", "### COCO vs the steering baseline"):
        assert heading in report, heading
    # the verdicts come first, each computed (a status by a stated rule, from intervals with their n)
    assert report.index("## Verdicts") < report.index("## Summary")
    verdict_rows = [line for line in report.split("## Verdicts")[1].split("## Summary")[0].splitlines()
                    if line.startswith("| tiny |")]
    # (a), then per arm: reduces bias, (b)/(c), held-out transfer, abstention, (e) jailbreak, (d) retention
    # accuracy, neutral-text shift; then each COCO arm (le, ne, le@stereo) against the steering arm
    assert len(verdict_rows) == 2 + 7 * 4 + 3  # (a) under each ablation kind
    assert sum("Ablating the COCO neurons (ablate-mean) lowers" in r for r in verdict_rows) == 1
    assert sum("beats steering vector [diffmean] at equal retention" in r for r in verdict_rows) == 3
    for row in verdict_rows:
        assert re.search(r"\*\*(supported|not supported|inconclusive|at chance: no evidence)\*\*", row), row
        assert "(n=" in row or "at chance" in row, row
    # the tiny random model answers the accuracy tasks at chance: that check cannot fail, and says so
    assert sum("retention accuracy" in r and "**at chance: no evidence**" in r for r in verdict_rows) == 4
    assert report.count("- supported if") >= 4  # every rule stated once
    assert "Δ_COCO - Δ_X" in report and "paired 95 % interval" in report
    for section in report.split("\n### ")[1:]:  # every section has content beyond its title
        assert len(section.strip().splitlines()) > 2, section[:80]
    assert "RAND ablated" in report and "NORM ablated" in report and "MACT ablated" in report
    assert "**selected**" in report and "Significance (label-permutation null" in report
    pngs = sorted(p.name for p in (out / "report").glob("*.png"))
    assert pngs == ["tiny-ablation.png", "tiny-abstain.png", "tiny-deltas.png", "tiny-heldout.png",
                    "tiny-jailbreak.png", "tiny-neurons-heatmap.png", "tiny-neutral.png", "tiny-retention.png",
                    "tiny-stereo.png", "tiny-sweep.png"]
    for name in pngs:
        assert (out / "report" / name).stat().st_size > 1000
        assert f"report/{name}" in report
    # stage outputs: atomic directories with done.json, nothing half-written left behind
    done = {k: json.loads(p.read_text()) for k, p in _done_files(out).items()}
    assert all(d["hash"].startswith("sha256:") for d in done.values())
    assert not list(out.glob("**/.*.partial")) and not list(out.glob("**/.*.tmp-*"))
    sweep = SweepResult.from_json(done["tiny/sweep"]["result"])
    # every strength at every neuron share (sweep.ratio); LE at 2 % edits the set re-selected at 2 %
    keys = ["le-r{r}-a0.5", "le-r{r}-a1", "ne-r{r}-a1-b2-l0.5"]
    first = [r for r in sweep.rows if r.rung == 0]
    assert [r.key for r in first] == [k.format(r=r) for r in ("0.01", "0.02") for k in keys] + [
        "le@stereo-a1", "steer@diffmean-a4"]  # the KIND@SET arms at their set's own share
    assert [r.candidate.ratio for r in first] == [0.01] * 3 + [0.02] * 3 + [None] * 2
    assert [r.candidate.set for r in first] == [None] * 6 + ["stereo", "diffmean"] and {r.limit for r in first} == {6}
    # successive halving: the best third of each kind (at least one) goes on, and its rows are at the full limit
    second = [r for r in sweep.rows if r.rung == 1]
    assert sweep.limits == [6, 12] and {r.limit for r in second} == {12}
    assert [r.arm for r in second] == ["le", "le", "ne", "le@stereo", "steer@diffmean"]
    assert set(r.key for r in second) == set(promote(first, 3))
    assert sweep.chosen["le"].key in {r.key for r in second} and sweep.chosen["ne"].key in {r.key for r in second}
    assert all(r.kl is not None and r.kl >= 0 and r.bias is not None for r in sweep.rows)
    from vllm_coco.core.artifact import Artifact

    ident = Artifact.read(out / "tiny" / "identify" / "neurons")
    wide = Artifact.read(out / "tiny" / "sweep" / "sets" / "r0.02")
    from vllm_coco.identify.selection import count_for

    assert len(wide.arrays["selected"]) == count_for(len(ident.arrays["loss"]), 0.02) > len(ident.arrays["selected"])
    assert set(ident.arrays["selected"].tolist()) <= set(wide.arrays["selected"].tolist())  # top 1 % within top 2 %
    # stability: the two halves (2 of the 4 pairs per category each; a quarter is too small and skipped)
    stab = StabilityResult.from_json(done["tiny/stability"]["result"])
    assert [s.fraction for s in stab.splits] == [0.5] and stab.splits[0].pairs == 2 and stab.pairs == 4
    assert 0 <= stab.splits[0].jaccard <= 1 and set(stab.ablated) == set(stab.intervals) == {"a", "b"}
    halves = [Artifact.read(out / "tiny" / "stability" / rel) for rel in stab.splits[0].neurons]
    assert not set(halves[0].arrays["rows"].tolist()) & set(halves[1].arrays["rows"].tolist())  # disjoint
    assert all(len(h.arrays["selected"]) == stab.count for h in halves)
    # sweep evaluations read the validate split, the final ones the test split
    val = json.loads(next((out / "tiny" / "sweep" / "evals" / "base-l12").rglob("results.json")).read_text())
    test = json.loads(next((out / "tiny" / "final" / "evals" / "base").rglob("results.json")).read_text())
    assert val["coco"]["split"] == "validate" and test["coco"]["split"] == "test"
    final = FinalResult.from_json(done["tiny/final"]["result"])
    assert set(final.runs()) == {"base", "le", "ne", "le@stereo", "steer@diffmean"}
    assert [(v.coco, v.baseline) for v in final.versus] == [(a, "steer@diffmean") for a in ("le", "ne", "le@stereo")]
    assert all(v.diffs["abs_bias_ambig"].n > 0 for v in final.versus)
    sets = SetsResult.from_json(done["tiny/sets"]["result"])
    assert list(sets.sets) == ["stereo", "diffmean"] and sets.sets["stereo"].contrast == "stereotype"
    assert sets.sets["stereo"].abstention_removed is not None and sets.sets["diffmean"].baseline == "diffmean"
    steer_set = Artifact.read(out / "tiny" / "sets" / "diffmean")
    assert set(steer_set.arrays["proj"][steer_set.arrays["selected"]].tolist()) == {2}  # one layer's v channels
    # every done.json reads back as its stage's typed result, and writes the same JSON again
    kinds = {"identify": IdentifyResult, "baselines": BaselinesResult, "ablation": AblationResult,
             "stability": StabilityResult, "sets": SetsResult, "sweep": SweepResult, "final": FinalResult}
    for stage, kind in kinds.items():
        stored = done[f"tiny/{stage}"]["result"]
        assert kind.from_json(stored).to_json() == stored, stage
    abl = AblationResult.from_json(done["tiny/ablation"]["result"])
    assert list(abl.sets) == ["coco", "rand", "norm", "mact"] and abl.mode == "ablate-zero"
    assert list(abl.also) == ["ablate-mean"] and list(abl.also["ablate-mean"].sets) == list(abl.sets)
    assert abl.also["ablate-mean"].sets["coco"] != abl.sets["coco"] or abl.also["ablate-mean"].intervals
    assert "The same sets ablated by `ablate-mean`" in report
    assert (out / "tiny" / "final" / "models" / "ne" / "coco_gate.safetensors").is_file()
    assert (out / "tiny" / "final" / "models" / "le" / "coco_edit.json").is_file()
    card = (out / "tiny" / "final" / "models" / "le" / "README.md").read_text()  # a model card with the verdicts
    assert card.startswith("---\nbase_model: ") and "## Verdicts of the run that chose this edit" in card
    assert "| LE-COCO reduces BBQ bias" in card and "No evaluation is recorded" not in card
    # candidates' weights were dropped after their evaluation (keep_models: false)
    assert not list((out / "tiny" / "sweep" / "models").rglob("*.safetensors"))
    mtimes = {k: p.stat().st_mtime_ns for k, p in _done_files(out).items()}
    log_lines = (out / "pipeline.log").read_text().splitlines()

    # run 3: everything reused, no evaluation, same report, no done.json rewritten
    calls.clear()
    code, stdout, err = run_cli("run", config)
    assert code == 0, err[-3000:]
    assert calls == []
    for stage in STAGES:
        assert f"[tiny] {stage}: reused" in stdout, stage
    assert "[all] report: reused" in stdout and "every stage reused" in stdout
    assert {k: p.stat().st_mtime_ns for k, p in _done_files(out).items()} == mtimes
    assert (out / "REPORT.md").read_text() == report
    new_lines = (out / "pipeline.log").read_text().splitlines()[len(log_lines):]
    assert new_lines and not any(": start" in line or ": done in" in line for line in new_lines)

    # --check after a config change: the plan, nothing written
    cfg = yaml.safe_load(config.read_text())
    cfg["sweep"]["edits"]["le"] = {"alpha": [0.5]}
    config.write_text(yaml.safe_dump(cfg))
    code, stdout, err = run_cli("run", config, "--check")
    assert code == 0, err
    assert "sweep (6 candidates, 2 rung(s) of successive halving)" in stdout  # 2 shares x (1 LE + 1 NE) + 2 arms
    assert {k: p.stat().st_mtime_ns for k, p in _done_files(out).items()} == mtimes


def test_eval_in_subprocess(bbq_tiny_model, tmp_path):
    """The child-process evaluation the vllm backend uses (checked here with hf: same plumbing)."""
    from vllm_coco.core.errors import CocoError
    from vllm_coco.experiment.pipeline import eval_in_subprocess
    from vllm_coco.tasks.evaluate import EvalOptions

    opts = EvalOptions(tasks=("stereo_coco_Religion",), backend="hf", limit=3, device="cpu", split="validate")
    eval_in_subprocess(bbq_tiny_model, opts, tmp_path / "ok")
    res = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert res["coco"]["split"] == "validate" and res["results"]["stereo_coco_Religion"]["sample_len"] == 3
    bad = EvalOptions(tasks=("no_such_task",), backend="hf", limit=3)
    with pytest.raises(CocoError, match="unknown task no_such_task"):
        eval_in_subprocess(bbq_tiny_model, bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def _row(key, edit, bias, kl, acc=0.0, rung=0, hi=None, success=0.0):
    """A sweep row with Δ|s_AMB| `bias` (interval up to `hi`), KL and Δ acc_disambig `acc`, admissible by the rule."""
    from vllm_coco.experiment.results import Candidate, Interval, SweepRow
    from vllm_coco.experiment.sweep import admissible

    def iv(d, top=None):
        return Interval(n=20, delta=d, lo=d - 0.1, hi=d + 0.1 if top is None else top, up=0, down=0, rounds=100)

    cand = Candidate(key=key, edit=edit, settings={"alpha": 1.0})
    row = SweepRow(candidate=cand, rung=rung, limit=60, success_rate=0.5, acc_disambig=0.5, abs_bias_ambig=0.2, kl=kl,
                   admissible=False, per_category={}, delta=iv(success), bias=iv(bias, hi), acc=iv(acc))
    return dataclasses.replace(row, admissible=admissible(row, acc_floor=0.05, kl_floor=0.05))


def test_choose_the_most_bias_reducing_candidate_within_the_floors():
    """Synthetic table: the candidate that lowers |s_AMB| most breaks acc_disambig (or KL) and is refused."""
    from vllm_coco.experiment.sweep import choose, promote

    rows = [_row("le-a0.25", "le", -0.05, 0.01),
            _row("le-a0.5", "le", -0.30, 0.02, acc=-0.2, success=0.3),  # best bias and best success; acc falls
            _row("le-a1", "le", -0.10, 0.03), _row("le-a2", "le", -0.40, 0.2),  # best bias, KL too high
            _row("ne-a1", "ne", -0.20, 0.5), _row("ne-a2", "ne", 0.10, 0.3)]
    le = choose(rows, "le")
    assert le.key == "le-a1" and le.admissible and not le.beats_base  # its interval reaches above 0
    assert choose([_row("le-a1", "le", -0.10, 0.03, hi=-0.01)], "le").beats_base
    ne = choose(rows, "ne")
    assert ne.key == "ne-a2" and not ne.admissible and "lowest KL" in ne.note  # none admissible: the gentlest
    assert choose(rows, "toy").key is None
    # successive halving: the best third of each kind, admissible first
    assert promote(rows, 3) == ["le-a1", "le-a0.25", "ne-a1"]
    # the choice is made at the last rung a kind reached
    later = rows + [_row("le-a0.25", "le", -0.2, 0.01, rung=1), _row("le-a1", "le", 0.05, 0.01, rung=1)]
    assert choose(later, "le").key == "le-a0.25"


def test_rung_limits():
    from vllm_coco.experiment.config import Sweep
    from vllm_coco.experiment.sweep import rung_limits

    assert rung_limits(Sweep(limit=60, rungs=2, eta=3)) == [20, 60]
    assert rung_limits(Sweep(limit=60, rungs=3, eta=3)) == [6, 20, 60]
    assert rung_limits(Sweep(limit=None, rungs=2, eta=3)) == [None, None]
    assert rung_limits(Sweep(limit=60, rungs=1, eta=3)) == [60]


# --------------------------------------------------------------------------- typed results, report

def _lm(tasks: dict[str, dict], docs: int = 3) -> dict:
    """A stand-in lm-eval results dict: task -> {metric: value}."""
    return {"results": {t: {f"{k},none": v for k, v in ms.items()} for t, ms in tasks.items()},
            "n-samples": {t: {"original": 10, "effective": docs} for t in tasks}}


def _typed_results(le=True, ne=True, baselines=("rand",)):
    """One of every typed stage result, from stand-in lm-eval results (NaN and missing metrics included)."""
    from vllm_coco.experiment import results as R
    from vllm_coco.experiment.benchmarks import JAILBREAK, RETENTION, STEREO

    cats = ["Religion", "Age"]
    stereo = STEREO.summarize(_lm({"stereo_coco_Religion": {"success_rate": 0.25, "acc_disambig": float("nan"),
                                                            "pos0_rate": 1 / 3},
                                   "stereo_coco_Age": {"success_rate": 1.0, "bias_ambig": -0.5}}), cats)
    jail = JAILBREAK.summarize(_lm({f"stereo_coco_jailbreak_{f}": {"success_rate": 0.5}
                                    for f in JAILBREAK.fixed_groups}), cats)
    lm_ret = _lm({"coco_mmlu": {"acc": 0.5}, "coco_boolq": {"acc": 1.0},
                  "coco_truthfulqa_ref": {"ref_bits_per_byte": 1.6}})
    summaries = {"stereo": stereo, "jailbreak": jail, "retention": RETENTION.summarize(lm_ret, cats)}
    meta = {"selection": {"count": 3, "by_proj": {"q": 1, "k": 0, "v": 2}},
            "model": {"num_neurons": 256}, "data": {"pairs": 8, "contrast": "response"},
            "significance": {"null": "label-permutation", "rounds": 1, "null_best_score": -1.3, "beat_null": 3},
            "per_category": {c: {"pairs": 4, "count": 3, "null_best_score": 0.5, "beat_null": 2, "neurons": []}
                             for c in cats},
            "timing_s": {"capture": 1.0, "total": 2.0}}
    cand_le = R.Candidate(key="le-a0.5", edit="le", settings={"alpha": 0.5})  # no ratio: the artifact's share
    cand_ne = R.Candidate(key="ne-r0.02-a1-b2-l0.5", edit="ne", settings={"alpha": 1.0, "beta": 2.0, "lam": 0.5},
                          ratio=0.02)
    iv = R.Interval(n=40, delta=0.05, lo=-0.01, hi=0.11, up=9, down=4, rounds=2000)
    no_items = R.Interval(n=0, delta=None, lo=None, hi=None, up=0, down=0, rounds=0)
    base_row = R.SweepRow.score(None, 0, 3, stereo, 0.0)
    rows = [R.SweepRow.score(c, 0, 3, stereo, 0.01, {"success_rate": iv, "abs_bias_ambig": iv, "acc_disambig": iv})
            for c in (cand_le, cand_ne)]
    choice = {"le": R.Choice(key=cand_le.key, admissible=True, beats_base=False, note="le note"),
              "ne": R.Choice(key=cand_ne.key, admissible=False, beats_base=True, note="ne note")}
    run = {e: R.FinalRun(params=c.params, model=f"models/{e}", summaries=summaries,
                         intervals={"stereo": {"success_rate": iv, "acc_disambig": no_items},
                                    "jailbreak": {"success_rate:roleplay": iv}, "retention": {"acc": iv}})
           for e, c in (("le", cand_le), ("ne", cand_ne))}
    ident = R.IdentifyResult.from_meta(meta)
    final_base = R.FinalRun(params="-", model=None, summaries=summaries)
    return {
        "identify": ident,
        "baselines": R.BaselinesResult(sets={b: R.BaselineSet(neurons=b, count=3, by_proj={"q": 3, "k": 0, "v": 0})
                                             for b in baselines}),
        "ablation": R.AblationResult(mode="ablate-zero", limit=None, split="test", base=stereo,
                                     sets={s: stereo for s in ("coco", *baselines)},
                                     intervals={s: {"success_rate": iv} for s in ("coco", *baselines)},
                                     specific={b: iv for b in baselines}),
        "stability": R.StabilityResult(
            count=3, total=256, pairs=8, chance=0.006,
            splits=[R.HalfSplit(fraction=f, pairs=int(8 * f), jaccard=j, jaccard_full=[0.5, 0.2],
                                neurons=[f"sets/f{f:g}-a", f"sets/f{f:g}-b"]) for f, j in ((0.5, 0.5), (0.25, 0.2))],
            limit=3, ablated={"a": stereo, "b": stereo}, intervals={"a": iv, "b": no_items}),
        "sweep": R.SweepResult(split="validate", limits=[3], neutral_limit=2, floors={"acc_disambig": 0.05, "kl": 0.05},
                               base=base_row, rows=rows, chosen=choice),
        "final": R.FinalResult(split="test", limits={"stereo": 3, "jailbreak": 3, "retention": None},
                               base=final_base,
                               edits={e: r for e, r in run.items() if {"le": le, "ne": ne}[e]}),
        "sets": R.SetsResult(sets={"stereo": ident}),
        "report": R.ReportResult(report="REPORT.md", figures=["a.png"]),
        "parts": [stereo, jail, cand_le, cand_ne, base_row, choice["le"], final_base, ident.significance,
                  ident.per_category["Age"], R.BaselineSet(neurons="rand", count=3, by_proj={"q": 3}), iv, no_items,
                  R.ParityResult(reference="a", identify_limit=4, limit=6, tolerance=1e-4, max_abs_score=0.0,
                                 same_selection=True, selected=3, docs=12,
                                 max_abs_loglik={"base": 0.0, "ne": 1e-6}),
                  R.Versus(coco="le", baseline="steer@diffmean", diffs={"abs_bias_ambig": iv})],
    }


def test_typed_results_round_trip_through_json():
    """Every stage result (and every part of one) survives done.json: to_json -> JSON text -> from_json."""
    import dataclasses

    from vllm_coco.experiment import results as R

    typed = _typed_results()
    objects = [v for k, v in typed.items() if k != "parts"] + typed["parts"] + typed["stability"].splits
    json_classes = {c for c in vars(R).values() if isinstance(c, type) and issubclass(c, R.Json)
                    and dataclasses.is_dataclass(c) and c is not R.GroupSummary}
    assert json_classes <= {type(o) for o in objects}, json_classes - {type(o) for o in objects}  # each one tested
    for obj in objects:
        text = json.dumps(obj.to_json(), allow_nan=False)  # strict JSON: no NaN in a stored result
        back = type(obj).from_json(json.loads(text))
        assert back == obj and back.to_json() == obj.to_json(), type(obj).__name__
    stereo = typed["parts"][0]
    assert stereo.get("acc_disambig", "Religion") is None and stereo.get("acc_disambig") is None  # NaN -> None
    assert stereo.get("success_rate") == (0.25 * 3 + 1.0 * 3) / 6 and stereo.docs["all"] == 6
    assert stereo.get("bias_ambig") == -0.5 and stereo.get("abs_bias_ambig", "Age") is None


def test_report_renderers_are_small():
    import inspect

    from vllm_coco.experiment import report

    funcs = [f for _, f in inspect.getmembers(report, inspect.isfunction) if f.__module__ == report.__name__]
    assert len(funcs) >= 10
    sizes = {f.__name__: len(inspect.getsource(f).splitlines()) for f in funcs}
    assert max(sizes.values()) <= 40, sizes


def test_report_from_typed_results_without_baselines_or_ne(tmp_path):
    """The report's n/a paths: no control set configured, no NE candidate in the sweep."""
    from vllm_coco.experiment import report
    from vllm_coco.experiment.figures import ModelFigures
    from vllm_coco.experiment.results import ModelResults, Stage

    typed = _typed_results(ne=False, baselines=())
    stages = {s: Stage(typed[s], tmp_path / s, "sha256:x", 1.0) for s in STAGES}
    m = ModelResults(name="tiny", path="models/tiny", **stages)
    figs = ModelFigures(*(tmp_path / f"tiny-{n}.png" for n in ("neurons-heatmap", "ablation", "deltas", "sweep")),
                        finals={b: tmp_path / f"tiny-{b}.png" for b in ("stereo", "jailbreak", "retention")})
    from vllm_coco.experiment import config

    cfg = config.validate({"models": ["org/stand-in"], "data": {"categories": ["Religion", "Age"]},
                           "identify": {"limit": 4}})
    text = report.render(cfg, "c.yaml", tmp_path, "hf", [m], {"tiny": figs}, {"tiny": "layer q k v"})
    assert "Baselines: n/a" in text and "RAND ablated" not in text
    assert "| tiny | 0.625 | 0.625 (+0.000) [alpha=0.5] | n/a (no candidate) | 0.625 (+0.000) |" in text
    assert "No final evaluation for NE-COCO: no such candidate in the sweep." in text
    assert "| all | \\|s_AMB\\| (lower is better) | 6 | n/a | n/a |" in text
    assert '| all | success rate = accuracy, ambiguous items ("unknown") | 6 | 0.625 | 0.625 (+0.000) |' in text
    assert "| coco_truthfulqa_ref | reference answer, bits per byte (lower is better) | 3 | 1.600 | 1.600 (+0.000) |" \
        in text
    assert "ablating COCO changed the success rate by +0.000." in text
    for b in ("stereo", "jailbreak", "retention"):  # one section and one figure per declared benchmark
        assert f"![{b}](report/tiny-{b}.png)" in text
    assert "| success rate, roleplay | +0.050 [-0.010, +0.110] (n=40) |" in text
    # LE only: verdicts (a) and LE's (b), (d), (e); the stored intervals feed them
    assert "| tiny | LE-COCO raises the success rate without lowering disambiguated accuracy | **inconclusive** |" \
        in text
    assert "success_rate: +0.050 [-0.010, +0.110] (n=40); acc_disambig: n/a (n=0)" in text
    assert "NE-COCO raises" not in text
    assert "| tiny | LE-COCO keeps retention" in text and "function" not in text  # each verdict names its edit
    # sample sizes: measured ± next to the planning formula's at the base rate (0.625), and the n for ±0.05
    assert "| final: LE-COCO stereo success_rate (test) | 40 | ±0.060 | ±0.212 | 721 |" in text
    # stability: the overlaps per split, the half-set ablations, a reading computed from them
    assert "| 50 % | 4 | 0.500 | 0.500 / 0.200 |" in text and "| 25 % | 2 | 0.200 |" in text
    assert "| subset A (50 %) | +0.050 [-0.010, +0.110] | 40 |" in text
    assert ("the two halves share far more neurons than chance (0.500, 83x chance); the overlap rises from 2 to 4 "
            "pairs per category (0.200 -> 0.500), so more identify data would still change the set; ablating the "
            "halves' sets lowers the success rate beyond noise for neither.") in text


def test_validate_docs_are_disjoint_from_test_docs():
    from vllm_coco.tasks.bbq_docs import load_stereo, stereo_docs
    from vllm_coco.tasks.jailbreak import jailbreak_docs

    for cat in ("Religion", "Age"):
        val = stereo_docs(cat, split="validate")
        test = stereo_docs(cat, split="test")
        assert val and test
        assert not {d["question_index"] for d in val} & {d["question_index"] for d in test}
        assert load_stereo(category=cat, coco_split="validate")["test"]["id"] == [d["id"] for d in val]
        jb = jailbreak_docs("roleplay", [cat], split="validate")
        assert {d["question_index"] for d in jb} <= {d["question_index"] for d in val}
    with pytest.raises(ValueError, match="coco_split"):
        load_stereo(category="Religion", coco_split="identify")


def test_experiment_metrics_are_task_metrics():
    """The benchmarks read only metrics their tasks report (one list each, kept in step)."""
    from vllm_coco.experiment.benchmarks import JAILBREAK, STEREO
    from vllm_coco.tasks.metrics import JAILBREAK_METRICS, MC_METRICS

    assert {m.key for m in STEREO.metrics} <= set(MC_METRICS)
    assert {m.key for m in JAILBREAK.metrics} <= set(JAILBREAK_METRICS)


def test_eval_split_reaches_the_tasks_through_metadata():
    from vllm_coco.tasks.evaluate import task_manager

    tm = task_manager(["stereo_coco_Religion"], metadata={"coco_split": "validate", "max_items": 1})
    docs = list(tm.load(["stereo_coco_Religion"])["tasks"]["stereo_coco_Religion"].eval_docs)
    from vllm_coco.data.contrast import bbq_items

    val = {it.question_index for it in bbq_items("bbq", ["Religion"], split="validate", condition=None)[0]}
    assert docs and {d["question_index"] for d in docs} <= val


# --------------------------------------------------------------------------- config validation

BAD = [
    ({"bogus": 1}, r"^bogus: unknown key"),
    ({"sweep": {"edits": {"le": {"alpha": [0.5, float("inf")]}}}},
     r"^sweep\.edits\.le\.alpha\[1\]: inf is not a finite number"),
    ({"sweep": {"edits": {"le": {"alpha": [0.5, "x"]}}}}, r"^sweep\.edits\.le\.alpha\[1\]: 'x' is not a number"),
    ({"sweep": {"extra": 1}}, r"^sweep\.extra: unknown key"),
    ({"sweep": {"ne_ratio": 0.01}}, r"^sweep\.ne_ratio: was replaced by sweep\.ratio \(a list"),
    ({"sweep": {"ratio": [0.01, 0.0]}}, r"^sweep\.ratio\[1\]: 0(\.0)? must be (greater than|above|more than) 0"),
    ({"sweep": {"ratio": [0.01, 0.01]}}, r"^sweep\.ratio\[1\]: 0\.01 is listed twice"),
    ({"stability": {"fractions": [0.6]}}, r"^stability\.fractions\[0\]: 0\.6 must be at most 0\.5"),
    ({"stability": {"ablate": "yes"}}, r"^stability\.ablate: 'yes' is not true or false"),
    ({"stability": {"limit": 0}}, r"^stability\.limit: 0 must be at least 1"),
    ({"sweep": {"edits": {"ne": {"lam": [1.5]}}}}, r"^sweep\.edits\.ne\.lam\[0\]: 1\.5 must be at most 1"),
    ({"sweep": {"le_alpha": [0.5]}}, r"^sweep\.le_alpha: was replaced by sweep\.edits\.le\.alpha"),
    ({"sweep": {"edits": {"ablate-zero": {}}}},
     r"^sweep\.edits\.ablate-zero: 'ablate-zero' is not one of le, steer, ne"),
    ({"sweep": {"edits": {"le": {"beta": [2]}}}},
     r"^sweep\.edits\.le\.beta: le takes no setting beta \(it takes alpha\)"),
    ({"sweep": {"edits": {}}}, r"^sweep\.edits: \{\} is not a mapping of edit kinds"),
    ({"sweep": {"retention_floor": 0.1}}, r"^sweep\.retention_floor: was replaced by the declared floors"),
    ({"sweep": {"eta": 1}}, r"^sweep\.eta: 1 must be at least 2"),
    ({"sweep": {"rungs": 0}}, r"^sweep\.rungs: 0 must be at least 1"),
    ({"identify": {"ratio": 0}}, r"^identify\.ratio: 0\.0 must be greater than 0"),
    ({"identify": {"ratio": 1.5}}, r"^identify\.ratio: 1\.5 must be at most 1"),
    ({"identify": {"limit": 1}}, r"^identify\.limit: 1 must be at least 2"),
    ({"final": {"benchmarks": {"stereo": {"limit": 0}}}}, r"^final\.benchmarks\.stereo\.limit: 0 must be at least 1"),
    ({"final": {"benchmarks": {"stereo": {"limit": 2.5}}}}, r"^final\.benchmarks\.stereo\.limit: 2\.5 is not an int"),
    ({"final": {"limit": 3}}, r"^final\.limit: was replaced by final\.benchmarks\.stereo\.limit"),
    ({"final": {"benchmarks": {"retention": {}}}}, r"^final\.benchmarks: .* that includes stereo"),
    ({"final": {"benchmarks": {"stereo": {}, "mmlu": {}}}}, r"^final\.benchmarks\.mmlu: 'mmlu' is not one of"),
    ({"data": {"categories": ["Age", "Race_x_SES"]}},
     r"^final\.benchmarks\.heldout: Race_x_SES is held out by this benchmark and also in data\.categories"),
    ({"eval": {"backend": "tpu"}}, r"^eval\.backend: 'tpu' is not one of auto, hf, vllm"),
    ({"eval": {"nested": {"deeper": 1}}}, r"^eval\.nested: unknown key"),
    ({"baselines": ["rand", "best"]}, r"^baselines\[1\]: 'best' is not one of"),
    ({"data": {"categories": ["Religion", "Disability_status"]}}, r"^data\.categories\[1\]: Disability_status has no"),
    ({"models": [{"path": "./nowhere/model"}]}, r"^models\[0\]\.path: \./nowhere/model does not exist"),
    ({"models": [{"path": "MODEL", "colour": "red"}]}, r"^models\[0\]\.colour: unknown key"),
    ({"models": []}, r"^models: must be a non-empty list"),
    ({"keep_models": "yes"}, r"^keep_models: 'yes' is not true or false"),
    ({"data": {"chat_template": "no"}}, r"^data\.chat_template: 'no' is not true or false"),
    ({"identify": {"contrast": "answers"}}, r"^identify\.contrast: 'answers' is not one of response, behavior"),
    ({"eval": {"scoring": "mean"}}, r"^eval\.scoring: 'mean' is not one of sum, per-byte"),
    ({"ablation": {"mode": "ablate-zero"}}, r"^ablation\.mode: was replaced by ablation\.modes \(a list"),
    ({"ablation": {"modes": ["ablate-zero", "le"]}},
     r"^ablation\.modes\[1\]: 'le' is not one of ablate-zero, ablate-mean"),
    ({"ablation": {"modes": []}}, r"^ablation\.modes: \[\] is not a non-empty list of ablation kinds"),
    ({"sets": {"x": {"contrast": "bogus"}}}, r"^sets\.x\.contrast: 'bogus' is not one of response, behavior"),
    ({"sets": {"x": {"from": "y"}, "y": {"from": "x"}}}, r"^sets\.x\.from: the sets x, y are re-selected from each"),
    ({"sets": {"x": {"contrast": "response", "abstention_filter": True}}},
     r"^sets\.x\.abstention_filter: needs the stereotype contrast"),
    ({"sets": {"x": {"from": "coco", "limit": 5}}}, r"^sets\.x\.limit: a set re-selected from coco keeps its limit"),
    ({"sets": {"x": {"from": "nowhere"}}}, r"^sets\.x\.from: 'nowhere' is not coco or another set"),
    ({"sets": {"x": {"from": "coco", "baseline": "rand"}}}, r"^sets\.x\.baseline: 'rand' is not one of coco, diffmean"),
    ({"sweep": {"edits": {"le@nope": {}}}}, r"^sweep\.edits\.le@nope: 'nope' is not a set of `sets`"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(":")[0].strip("^\\") for _, m in BAD])
def test_bad_config_exits_2_naming_the_key(tmp_path, bbq_tiny_model, change, message):
    cfg = {**yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()), **copy.deepcopy(EVERY_STAGE)}
    cfg["out"] = str(tmp_path / "out")
    cfg["models"] = [{"path": str(bbq_tiny_model)}]
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    if "models" in change:
        cfg["models"] = [{**m, "path": str(bbq_tiny_model)} if m.get("path") == "MODEL" else m
                         for m in change["models"]]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli("run", path)
    assert code == 2, (out, err)
    line = err.strip()
    assert "\n" not in line and line.startswith("coco-tools: error: "), err
    assert re.search(message, line.removeprefix("coco-tools: error: ")), line
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml"]  # nothing written


def test_config_file_errors(tmp_path):
    code, _, err = run_cli("run", tmp_path / "missing.yaml")
    assert code == 2 and "does not exist" in err
    (tmp_path / "broken.yaml").write_text("out: [unclosed\n")
    code, _, err = run_cli("run", tmp_path / "broken.yaml")
    assert code == 2 and "not valid YAML" in err and err.count("\n") == 1
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    code, _, err = run_cli("run", tmp_path / "list.yaml")
    assert code == 2 and "config: expected a mapping" in err


def test_shipped_configs_validate(monkeypatch, tmp_path):
    """default.yaml and tiny.yaml validate here (once the demo models exist); full.yaml names hub ids."""
    from vllm_coco.experiment import config

    monkeypatch.chdir(ROOT)
    full = config.load("configs/full.yaml")
    assert [m.path for m in full.models] == ["meta-llama/Meta-Llama-3-8B-Instruct",
                                             "mistralai/Mistral-7B-Instruct-v0.3"]
    assert full.eval.backend == "vllm" and full.identify.dtype == "bfloat16"
    for name in ("default", "tiny"):
        raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        raw["models"] = [{"path": "org/stand-in", "name": m.get("name")} for m in raw["models"]] \
            if not all(Path(m["path"]).is_dir() for m in raw["models"]) else raw["models"]
        cfg = config.validate(raw)
        assert cfg.eval.backend in ("hf", "vllm", "auto")


def test_default_config_file_is_the_builtin_default():
    """configs/default.yaml spells out config.DEFAULTS: `coco-tools run` with only `models` set does
    exactly what the shipped default file does (one definition; the file adds the comments)."""
    from vllm_coco.experiment import config

    raw = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    models = [{"path": "org/stand-in", "name": m.get("name")} for m in raw["models"]]
    assert config.validate({**raw, "models": models}) == config.validate({"models": models})
    assert list(raw) == list(config.RunConfig.model_fields)


@pytest.mark.slow
def test_parity_twin_identical_then_injected_difference(bbq_tiny_model, tmp_path):
    """A `parity_of` twin gets the parity stage, not a full run; a twin whose numbers differ stops the run."""
    import shutil

    from safetensors.torch import load_file, save_file

    twin = tmp_path / "twin"
    shutil.copytree(bbq_tiny_model, twin)
    config = _tiny_config(tmp_path, bbq_tiny_model, models=[{"path": str(bbq_tiny_model), "name": "tiny"},
                                                        {"path": str(twin), "name": "twin", "parity_of": "tiny"}])
    code, stdout, err = run_cli("run", config)
    assert code == 0, err[-3000:]
    assert "[twin] parity: done" in stdout and "parity with tiny: identical yes" in stdout
    assert not (tmp_path / "out" / "twin" / "ablation").exists()  # no full run for a twin
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "## Parity twins" in report and re.search(r"\| twin \| tiny \| yes \| 0 \|", report)

    # a small change in one layer's q projection: the twin no longer reproduces its reference
    weights = load_file(str(twin / "model.safetensors"))
    name = next(k for k in weights if k.endswith("layers.0.self_attn.q_proj.weight"))
    weights[name][0] += 0.05
    save_file(weights, str(twin / "model.safetensors"), metadata={"format": "pt"})
    code, stdout, err = run_cli("run", config)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("coco-tools: error: parity: twin does not reproduce tiny")
    assert "parity with tiny: identical NO" in stdout


def test_parity_of_must_name_an_earlier_full_model(bbq_tiny_model, tmp_path):
    for models, msg in [([{"path": str(bbq_tiny_model), "name": "a", "parity_of": "b"}], "models[0].parity_of"),
                        ([{"path": str(bbq_tiny_model), "name": "a"},
                          {"path": str(bbq_tiny_model), "name": "b", "parity_of": "a"},
                          {"path": str(bbq_tiny_model), "name": "c", "parity_of": "b"}], "b is itself a parity twin")]:
        code, _, err = run_cli("run", _tiny_config(tmp_path, bbq_tiny_model, models=models), "--check")
        assert code == 2 and msg in err, err


@pytest.mark.slow
def test_readme_main_job_runs_on_a_fresh_clone(tmp_path):
    """The README's main-job command on a fresh `git clone` (no models/, no runs/), with the tiny
    config and an `out` under directories that do not exist yet. The clone borrows this checkout's
    .venv (CI builds that one from scratch with the README's set-up); the paths are the clone's."""
    import shutil
    import subprocess

    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert not (clone / "models").exists() and not (clone / "runs").exists()
    (clone / ".venv").symlink_to(ROOT / ".venv")
    proc = subprocess.run(["tools/main_job.sh", "configs/tiny.yaml", "--out", "runs/fresh/a/b"], cwd=clone,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (clone / "runs" / "fresh" / "a" / "b" / "REPORT.md").read_text()
    assert "## Verdicts" in report and re.search(r"\*\*(supported|not supported|inconclusive)\*\*", report)
    assert (clone / "models" / "smollm2" / "config.json").is_file()


def test_identify_section_is_the_identify_commands_options_by_name():
    """One declaration per option end to end (identify/settings.py): the config's identify section and
    `coco-tools identify`'s flags are its fields, of the same names, help and choices; IdentifyOptions
    takes them by name with the same defaults; the config differs only in the run's budget (it samples
    48 pairs where the command takes all, and draws one null round)."""
    import click

    unset = getattr(click.core, "UNSET", None)  # click >= 8.3 marks a flag without a default so
    from vllm_coco.cli import identify
    from vllm_coco.experiment.config import Identify
    from vllm_coco.identify.run import IdentifyOptions
    from vllm_coco.identify.settings import IdentifySettings

    flags = {p.name: p for p in identify.params}
    assert issubclass(Identify, IdentifySettings) and list(Identify.model_fields) == list(IdentifySettings.model_fields)
    for key, field in IdentifySettings.model_fields.items():
        assert key in IdentifyOptions.__dataclass_fields__, key
        assert flags[key].opts == [f"--{key.replace('_', '-')}"] and flags[key].help == field.description, key
        flag_default = None if flags[key].default is unset else flags[key].default  # a flag without one: None
        assert flag_default == field.default == IdentifyOptions.__dataclass_fields__[key].default, key
        if key not in ("limit", "null_rounds"):
            assert Identify.model_fields[key].default == field.default, key
        if isinstance(flags[key].type, click.Choice):
            assert Identify.model_validate({key: flags[key].type.choices[-1]}), key
            with pytest.raises(Exception, match="is not one of"):
                Identify.model_validate({key: "no-such-choice"})


def test_edits_are_conditions_in_memory_and_directories_otherwise(tmp_path):
    """experiment/edits.py, the one place the stages' two backends part: in memory an edit is a condition
    of the loaded model (written too only where the user keeps it and a checkpoint can hold it); for an
    engine it is a directory, written once per spec and stripped of its weights after its evaluation."""
    import tiny

    from vllm_coco.experiment.edits import Edits
    from vllm_coco.experiment.pipeline import Steps

    mistral = tiny.random_model(tmp_path / "mistral", arch="mistral")  # no q/k/v biases: steer is not writable
    writes = []

    @dataclasses.dataclass(frozen=True)
    class Kind:  # a Recipe as Edits uses one: its kind, its condition, its writer
        kind: str

        def condition(self, neurons, model_dir):
            return ("condition", self.kind, neurons)

        def write(self, model_dir, neurons, out):
            writes.append(out.name)
            out.mkdir(parents=True)
            (out / "model.safetensors").write_bytes(b"w")

    class Loaded:
        def __init__(self):
            self.conditions = {}

        def add_condition(self, name, edit):
            self.conditions[name] = edit

    for keep in (False, True):
        lm, steps = Loaded(), Steps(tmp_path / f"memory-{keep}")
        edits = Edits(mistral, steps, lm, keep_models=keep)
        edits.add("sweep-le", Kind("le"), Path("n"))
        edits.add("sweep-steer", Kind("steer"), Path("n"))
        assert lm.conditions == {"sweep-le": ("condition", "le", Path("n")),
                                 "sweep-steer": ("condition", "steer", Path("n"))}
        assert edits.alongside() == ["sweep-le", "sweep-steer"] and edits.alongside({"sweep-le"}) == ["sweep-le"]
        le = edits.model("sweep-le", "models/le", {"a": 1})
        assert (le.dir, le.condition) == (mistral, "sweep-le") and (le.written is not None) == keep
        steer = edits.model("sweep-steer", "models/steer", {"a": 1}, product=True)
        assert (steer.dir, steer.condition, steer.written) == (mistral, "sweep-steer", None)  # cannot be written
        assert edits.model("sweep-le", "models/final-le", {}, product=True).written is not None  # the product
    writes.clear()
    edits = Edits(mistral, Steps(tmp_path / "engine"), None)
    edits.add("ablate-coco", Kind("ablate-zero"), Path("n"))
    assert edits.alongside() == []
    first = edits.model("ablate-coco", "models/coco", {"mode": "ablate-zero"})
    assert first.condition is None and first.dir == first.written == tmp_path / "engine" / "models" / "coco"
    assert edits.model("ablate-coco", "models/coco", {"mode": "ablate-zero"}) == first and writes == ["coco"]  # reused
    edits.release(first)
    assert not list(first.dir.glob("*.safetensors"))
