"""Hardening, second round (issue 22): the traceback and message cases that are not about output
paths or numbers. Same contract as tests/test_hardening.py: bad input exits 2 with exactly one
line on stderr naming the problem and the fix, writes nothing and leaves every input as it was;
SIGTERM exits 143 with one line.

  generate   refused before any vLLM engine starts (a fake `vllm` module fails the test if one would)
  report     a damaged neurons.json field is refused before the heatmap is written
  run        the YAML loader's limits: depth, alias expansion, size, duplicate keys
  compare    a value that is no finite number prints as n/a with the reason, never `inf`
  signals    SIGTERM -> 143 (the subprocess test is test_hardening.py's test_sigterm_*)
  elsewhere  cases whose fix lives in a file this one's author did not own: strict xfail, naming
             the change; remove the mark when it lands
"""

from __future__ import annotations

import importlib.machinery
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import expect_bad, run_cli

COCO_TOOLS = Path(sys.executable).parent / "coco-tools"


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err[-3000:]}"
    return lines[0]


@pytest.fixture(scope="module")
def art(planted, tmp_path_factory):
    """A real neuron artifact of the planted tiny model."""
    model, pairs = planted
    out = tmp_path_factory.mktemp("cli-art") / "neurons"
    code, _, err = run_cli("identify", model, "--out", out, "--data", pairs, "--split", "all", "--quiet",
                           "--null-rounds", "0", "--ratio", "0.05")
    assert code == 0, err
    return out


# =========================================================================== generate

@pytest.fixture()
def no_engine(monkeypatch):
    """A `vllm` whose LLM fails the test: a check that went missing must not start a real engine
    (minutes, and not allowed in the fast tests). Cases that need vLLM's own argument parser
    (engine flags) do not use it."""
    fake = types.ModuleType("vllm")

    def engine(*a, **k):
        raise AssertionError("a vLLM engine was started although the input is bad")

    fake.LLM, fake.SamplingParams = engine, engine
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # for find_spec("vllm") callers
    monkeypatch.setitem(sys.modules, "vllm", fake)


def _prompts(d: Path, lines: list) -> Path:
    """A prompts file in its own folder (so expect_bad can check it is unchanged); None -> a blank line."""
    d.mkdir()
    f = d / "p.jsonl"
    f.write_text("".join("\n" if x is None else json.dumps(x) + "\n" for x in lines))
    return f


def _broken_template_model(planted, d: Path) -> Path:
    model = d / "tmpl-model"
    shutil.copytree(planted[0], model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }\n")  # `}` for `}}`
    return model


# (id, prompts lines, extra args, match): the file line numbers skip a blank line on purpose
GENERATE_CASES = [
    ("empty-prompt-no-chat", [{"prompt": "n1"}, None, {"prompt": ""}], ["--no-chat"], "p.jsonl:3: the prompt is empty"),
    ("prompt-longer-than-context", [{"prompt": "n1"}, {"prompt": "n1 " * 350_000}], ["--no-chat"],
     "p.jsonl:2: the prompt is 350000 tokens, and the model's context is 256"),
    ("prompt-longer-than-max-model-len", [{"prompt": "n1 " * 40}], ["--no-chat", "--max-model-len", "16"],
     "context is 16 (--max-model-len)"),
    ("max-model-len-above-the-models", [{"prompt": "n1"}], ["--max-model-len", "100000"], "pass at most 256"),
    ("dtype-banana", [{"prompt": "n1"}], ["--dtype", "banana"], "--dtype"),
    ("empty-messages", [{"prompt": "n1"}, {"messages": []}], [], "p.jsonl:2:"),
    ("message-content-not-text", [{"messages": [{"role": "user", "content": 5}]}], [], "p.jsonl:1:"),
]


@pytest.mark.parametrize("lines,extra,match", [c[1:] for c in GENERATE_CASES], ids=[c[0] for c in GENERATE_CASES])
def test_generate_refuses_a_bad_request_before_the_engine(lines, extra, match, tmp_path, planted, no_engine):
    prompts = _prompts(tmp_path / "in", lines)
    expect_bad(tmp_path, "generate", planted[0], "--prompts", prompts, "--out", tmp_path / "o.jsonl", *extra,
               match=match, unchanged=(planted[0], prompts.parent))


def test_generate_refuses_a_broken_chat_template_before_the_engine(tmp_path, planted, no_engine):
    model = _broken_template_model(planted, tmp_path / "m")
    prompts = _prompts(tmp_path / "in", [{"prompt": "n1"}])
    expect_bad(tmp_path, "generate", model, "--prompts", prompts, "--out", tmp_path / "o.jsonl",
               match="p.jsonl:1: the model's chat template fails (TemplateSyntaxError", unchanged=(model,))


def test_generate_unknown_engine_flag_is_one_line(tmp_path, planted):
    """argparse printed vLLM's whole usage (250 lines) before the error."""
    pytest.importorskip("vllm")
    prompts = _prompts(tmp_path / "in", [{"prompt": "n1"}])
    expect_bad(tmp_path, "generate", planted[0], "--prompts", prompts, "--out", tmp_path / "o.jsonl",
               "--no-such-engine-flag", "3", match="unrecognized arguments: --no-such-engine-flag 3")


def test_generate_dtypes_are_vllms():
    """cli.VLLM_DTYPES is checked by click; it must stay vLLM's own list."""
    pytest.importorskip("vllm")
    from typing import get_args

    from vllm.config.model import ModelDType

    from vllm_coco.cli import VLLM_DTYPES

    assert VLLM_DTYPES == get_args(ModelDType)


def test_context_limit_is_an_upper_bound_of_vllms(tmp_path):
    """The check before the engine may only refuse what vLLM refuses: with RoPE scaling the context
    grows by the factor (vLLM multiplies for some rope types only: never less than ours)."""
    from vllm_coco.serve.generate import context_limit

    d = tmp_path / "m"
    d.mkdir()
    cfg = {"model_type": "llama", "max_position_embeddings": 4096,
           "rope_parameters": {"rope_type": "linear", "factor": 4.0}}
    (d / "config.json").write_text(json.dumps(cfg))
    assert context_limit(d, None)[0] == 16384
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert context_limit(d, None) is None  # vLLM assumes 2048: the engine's own check decides
    assert context_limit(d, 100) == (100, "--max-model-len")


# =========================================================================== report

def _damaged(art, d: Path, edit) -> Path:
    bad = d / "art"
    shutil.copytree(art, bad)
    meta = json.loads((bad / "neurons.json").read_text())
    edit(meta)
    (bad / "neurons.json").write_text(json.dumps(meta, indent=1) + "\n")
    return bad


# (id, edit of neurons.json, match): each crashed with a traceback, some after writing heatmap.png
REPORT_CASES = [
    ("null-best-score-a-string", lambda m: m["significance"].update(null_best_score="x", beat_null=3),
     "significance.null_best_score is 'x'"),
    ("no-model-path", lambda m: m["model"].pop("path"), "model.path is missing"),
    ("no-architecture", lambda m: m["model"].pop("architecture"), "model.architecture is missing"),
    ("no-rule", lambda m: m["selection"].pop("rule"), "selection.rule is missing"),
    ("beat-null-missing", lambda m: m["significance"].update(null_best_score=0.5, beat_null=None),
     "significance.beat_null is missing"),
]


@pytest.mark.parametrize("edit,match", [c[1:] for c in REPORT_CASES], ids=[c[0] for c in REPORT_CASES])
def test_report_refuses_a_damaged_field_before_writing(edit, match, tmp_path, art):
    bad = _damaged(art, tmp_path, edit)
    expect_bad(tmp_path, "report", bad, match=match, unchanged=(bad,))  # unchanged: no heatmap.png in it
    expect_bad(tmp_path, "report", bad, "--png", tmp_path / "h.png", match=match)


def test_report_category_without_a_neuron_list(tmp_path, art):
    """The artifact check takes a per-category entry without `neurons` as empty; report must too."""
    cat = json.loads((art / "neurons.json").read_text())["categories"][0]
    bad = _damaged(art, tmp_path, lambda m: m["per_category"][cat].pop("neurons"))
    code, out, err = run_cli("report", bad, "--category", cat, "--png", tmp_path / "h.png")
    assert code == 0, err
    assert "0 neurons" in out


# =========================================================================== run CONFIG (YAML)

def _config(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "cfg" / "c.yaml"
    f.parent.mkdir()
    f.write_text(text)
    return f


LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))

# (id, config text with MODEL for the planted model, match)
YAML_CASES = [
    ("5000-deep-flow", "models: [{path: MODEL}]\nseed: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than"),
    ("5000-deep-block", "models: [{path: MODEL}]\nseed:\n" + "- " * 5000 + "1\n", "nested deeper than"),
    ("billion-laughs", "models: [{path: MODEL}]\n" + LAUGHS, "through aliases"),
    ("alias-cycle", "models: [{path: MODEL}]\nbaselines: &b [rand, *b]\n", "refers to the collection that holds it"),
    ("duplicate-top-key", "models: [{path: MODEL}]\nseed: 1\nseed: 2\n", "line 3: key 'seed' is given twice"),
    ("duplicate-nested-key", "models: [{path: MODEL}]\nsweep: {limit: 4, limit: 8}\n", "key 'limit' is given twice"),
    ("larger-than-1-MiB", "models: [{path: MODEL}]\n# " + "x" * (1 << 20) + "\n", "larger than 1 MiB"),
]


@pytest.mark.parametrize("text,match", [c[1:] for c in YAML_CASES], ids=[c[0] for c in YAML_CASES])
def test_run_config_yaml_limits(text, match, tmp_path, planted):
    config = _config(tmp_path, text.replace("MODEL", str(planted[0])))
    expect_bad(tmp_path, "run", config, "--check", match=match, unchanged=(config.parent,))


def test_run_config_anchors_and_merge_keys_still_work(tmp_path):
    """The limits refuse abuse, not YAML: an alias used a few times and a `<<` merge overridden."""
    from vllm_coco.experiment.config import read_yaml

    f = _config(tmp_path, "alphas: &a [0.5, 1.0]\nsweep: {edits: {le: {alpha: *a}, ne: {alpha: *a}}}\n"
                          "base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n")
    got = read_yaml(f)
    assert got["sweep"] == {"edits": {"le": {"alpha": [0.5, 1.0]}, "ne": {"alpha": [0.5, 1.0]}}}
    assert got["d"] == {"x": 3, "y": 2}


# =========================================================================== compare

def _results(path: Path, values: dict, name: str) -> Path:
    """An lm-eval results file; values: {task: value or raw JSON text of the value}."""
    body = ", ".join(f'"{t}": {{"success_rate,none": {v}}}' for t, v in values.items())
    path.write_text(f'{{"results": {{{body}}}, "coco": {{"name": "{name}"}}}}')
    return path


def test_compare_prints_no_inf(tmp_path):
    """Infinity, NaN, an integer beyond float range and a difference that overflows: "n/a" with the
    reason in the table's note, never `inf`, a 300-digit number, or a traceback."""
    a = _results(tmp_path / "a.json", {"stereo_coco_Age": 0.5, "stereo_coco_SES": "Infinity",
                                       "stereo_coco_Race_ethnicity": "1" + "0" * 400, "stereo_coco": -1e308}, "base")
    b = _results(tmp_path / "b.json", {"stereo_coco_Age": "NaN", "stereo_coco_SES": 0.25,
                                       "stereo_coco_Race_ethnicity": 0.5, "stereo_coco": 1e308}, "edit")
    code, out, err = run_cli("compare", a, b, "--png", tmp_path / "c.png", "--group", "stereo_coco")
    assert code == 0, err
    table = out.split("\n(")[0]  # the note below it names inf and nan as reasons
    assert "inf" not in table.lower() and "nan" not in table.lower() and table.count("n/a") == 3, out
    assert "n/a: the results file holds no finite number there" in out
    assert max(len(line) for line in out.splitlines()[:5]) < 100, out  # no 300-digit numbers
    assert (tmp_path / "c.png").is_file() and err == ""


# =========================================================================== signals and the one-line rule

def test_sigterm_exits_143_with_one_line(tmp_path, art, monkeypatch):
    """In process: the SIGTERM exception reaches coco-tools' own handler. As a KeyboardInterrupt
    (before) click turned it into Abort: exit 130, "interrupted", after a blank line."""
    from vllm_coco import cli
    from vllm_coco.identify import run

    def terminated(*a, **k):
        cli._on_sigterm(15, None)

    monkeypatch.setattr(run, "reselect", terminated)
    code, _, err = run_cli("select", art, "--out", tmp_path / "out")
    assert code == 143, err
    assert err.startswith("coco-tools: terminated") and one_line(err)
    assert not (tmp_path / "out").exists()


def test_held_stderr_drops_library_noise_only_on_a_coco_error(capfd):
    """What libraries print before a CocoError (an import warning through logging's last resort,
    argparse's usage) must not add lines to the error; on success it is still shown."""
    import logging

    from vllm_coco.core.errors import CocoError, held_stderr

    log = logging.getLogger("some.library.without.handlers")
    log.propagate = False  # no handler at all (pytest's sit on the root logger): logging's last resort prints
    with pytest.raises(CocoError), held_stderr():
        log.warning("noise before the error")
        print("more noise", file=sys.stderr)
        raise CocoError("the one line")
    assert capfd.readouterr().err == ""
    with held_stderr():
        log.warning("a warning worth seeing")
    assert "a warning worth seeing" in capfd.readouterr().err


# =========================================================================== fixes owned elsewhere

def _xfail(where: str):
    return pytest.mark.xfail(strict=True, reason=f"needs the change in {where} (see the issue 22 report); "
                                                  "remove this mark when it lands")


def test_serve_dry_run_refuses_edits_that_are_a_dict(tmp_path, planted, art):
    ne = tmp_path / "ne"
    assert run_cli("ne", planted[0], art, "--out", ne, "--with", "le")[0] == 0
    cfg = json.loads((ne / "config.json").read_text())
    cfg["coco"]["edits"] = {"name": "le"}
    (ne / "config.json").write_text(json.dumps(cfg))
    expect_bad(tmp_path, "serve", ne, "--dry-run", match="coco.edits", unchanged=(ne,))


def test_ne_le_alpha_errors_name_le_alpha(tmp_path, planted, art):
    expect_bad(tmp_path, "ne", planted[0], art, "--out", tmp_path / "o", "--with", "le", "--le-alpha=-5",
               match="--le-alpha -5")


def test_ne_config_without_hidden_size_is_refused(tmp_path, planted, art):
    model = tmp_path / "m"
    shutil.copytree(planted[0], model)
    cfg = json.loads((model / "config.json").read_text())
    del cfg["hidden_size"], cfg["head_dim"]
    (model / "config.json").write_text(json.dumps(cfg))
    expect_bad(tmp_path, "ne", model, art, "--out", tmp_path / "o", match="hidden_size", unchanged=(model,))


def test_identify_broken_chat_template_is_one_line(tmp_path, planted):
    model = _broken_template_model(planted, tmp_path / "m")
    expect_bad(tmp_path, "identify", model, "--out", tmp_path / "o", "--data", planted[1], "--split", "all",
               "--quiet", "--null-rounds", "0", match="chat template", unchanged=(model,))


def test_identify_weights_of_the_wrong_shape_is_one_line(tmp_path, planted):
    """transformers logs its load report (7+ lines) through its own stderr handler: only a real
    process shows it, so this runs coco-tools as one."""
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "m"
    shutil.copytree(planted[0], model)
    tensors = load_file(str(model / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key][:-1].copy()
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    proc = subprocess.run([str(COCO_TOOLS), "identify", str(model), "--out", str(tmp_path / "o"), "--data",
                           str(planted[1]), "--split", "all", "--quiet", "--null-rounds", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "up_proj" in one_line(proc.stderr)


def test_held_stderr_hands_back_handlers_made_inside_it(capfd):
    """A library imported inside the block makes its handler on the held buffer: after the block it
    must write to the real stderr, or every later warning of that library is lost."""
    import logging
    import sys

    from vllm_coco.core.errors import held_stderr

    log = logging.getLogger("coco-test-made-inside")
    with held_stderr():
        handler = logging.StreamHandler(sys.stderr)  # what a first `import transformers` does
        log.addHandler(handler)
    try:
        log.warning("after the block")
        assert "after the block" in capfd.readouterr().err
    finally:
        log.removeHandler(handler)
