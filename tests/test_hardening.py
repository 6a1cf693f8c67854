"""Hardening: every reproduction of the "bad input must exit 2 with one line and write nothing"
issue, as an acceptance test.

The contract (README, "Exit codes"): 0 success; 1 only for a bug; 2 bad input, exactly one line on
stderr naming the problem, and nothing written; a source model directory or neuron artifact is
never modified. The cases below are grouped by what is bad:

  output paths    an output equal to / inside / containing an input, reached through `..` or a
                  symlink ("overlaps"); an empty output path ("empty"); an unwritable parent
                  ("writable"); missing parents (created, and removed again on failure)
  numbers         NaN / inf / overflowing values in CLI options, configs, artifact arrays, NE
                  hyperparameters and edit results ("finite")
  artifacts       bad neurons.json / neurons.safetensors, arrays of the wrong length, neurons
                  outside the layout
  model dirs      bad config.json, garbage or missing weights, .bin only, remote code
  data            non-UTF-8 or absurdly nested contrast JSONL, BBQ rows missing fields
  CLI             click usage errors as one line, `--seed -1`, `run` configs, SIGTERM, umask
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import expect_bad as _expect_bad
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
COCO_TOOLS = Path(sys.executable).parent / "coco-tools"


# --------------------------------------------------------------------------- helpers

def digests(d) -> dict:
    """sha256 of every file under `d` (following the path as given), by relative path."""
    d = Path(d)
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def expect_bad(parent, *args, match, unchanged=()):
    """conftest.expect_bad, refusing to run where `match` already occurs in the parent's path (pytest
    names tmp_path after the test: a message that merely echoes a path must not pass)."""
    assert match.lower() not in str(parent).lower(), f"{match!r} occurs in {parent}: rename the test"
    _expect_bad(parent, *args, match=match, unchanged=unchanged)


def listing(d) -> list:
    return sorted(os.listdir(d))


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err}"
    return lines[0]


def identify_ok(model, pairs, out, *extra):
    code, _, err = run_cli("identify", model, "--out", out, "--data", pairs, "--split", "all", "--quiet",
                           "--null-rounds", "0", "--ratio", "0.05", *extra)
    assert code == 0, err
    return Path(out)


def corrupt_artifact(src, dst, *, arrays=None, meta=None, json_bytes=None, st_bytes=None) -> Path:
    """A copy of the artifact `src` at `dst` with one thing broken:
    arrays(dict) / meta(dict) edit the loaded arrays / JSON in place (they may also return a
    replacement), json_bytes(bytes) / st_bytes(bytes) return the new raw file content."""
    from safetensors.numpy import load_file, save_file

    dst = Path(dst)
    shutil.copytree(src, dst)
    js, st = dst / "neurons.json", dst / "neurons.safetensors"
    if arrays is not None:
        a = load_file(str(st))
        a = arrays(a) or a
        save_file({k: np.ascontiguousarray(v) for k, v in a.items()}, str(st), metadata={"method": "coco-v1"})
    if meta is not None:
        m = json.loads(js.read_text())
        m = meta(m) or m
        js.write_text(json.dumps(m, indent=1) + "\n")
    if json_bytes is not None:
        js.write_bytes(json_bytes(js.read_bytes()))
    if st_bytes is not None:
        st.write_bytes(st_bytes(st.read_bytes()))
    return dst


@pytest.fixture(scope="module")
def umask022():
    """Build the module fixtures with the usual umask, so modes are predictable."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def art(planted, tmp_path_factory, umask022):
    """A real neuron artifact of the planted tiny model (13 selected neurons)."""
    model, pairs = planted
    return identify_ok(model, pairs, tmp_path_factory.mktemp("hardening-art") / "neurons")


@pytest.fixture(scope="module")
def ne_dir(planted, art, tmp_path_factory):
    out = tmp_path_factory.mktemp("hardening-ne") / "ne"
    code, _, err = run_cli("ne", planted[0], art, "--out", out)
    assert code == 0, err
    return out


# =========================================================================== output paths

def _path_case_setup(tmp_path, planted, art, monkeypatch):
    """cwd = tmp_path/work holding m/victim (a copy of the planted model), a/victim (a copy of the
    artifact) and the symlinks vlink -> m/victim, alink -> a/victim."""
    work = tmp_path / "work"
    (work / "m").mkdir(parents=True)
    (work / "a").mkdir()
    shutil.copytree(planted[0], work / "m" / "victim")
    shutil.copytree(art, work / "a" / "victim")
    os.symlink("m/victim", work / "vlink")
    os.symlink("a/victim", work / "alink")
    monkeypatch.chdir(work)
    return work


# (id, argv with MODEL -> a model path, ART -> an artifact path; paths relative to work/)
OVERLAP_CASES = [
    ("bake-out-dotdot-is-model-force", ["bake", "m/victim", "ART", "--out", "m/../m/victim", "--force"]),
    ("bake-model-symlink-out-is-target-force", ["bake", "vlink", "ART", "--out", "m/victim", "--force"]),
    ("bake-out-dotdot-inside-model", ["bake", "m/victim", "ART", "--out", "./m/../m/victim/edited"]),
    ("bake-out-inside-model-via-symlink", ["bake", "m/victim", "ART", "--out", "vlink/edited"]),
    ("bake-out-contains-model-via-dotdot-force", ["bake", "m/victim", "ART", "--out", "m/victim/..", "--force"]),
    ("bake-out-is-artifact-via-symlink-force", ["bake", "MODEL", "a/victim", "--out", "alink", "--force"]),
    ("select-out-dotdot-is-artifact-force",
     ["select", "a/victim", "--out", "a/../a/victim", "--baseline", "rand", "--force"]),
    ("select-out-inside-artifact-via-symlink", ["select", "a/victim", "--out", "alink/sub"]),
    ("ne-out-dotdot-is-model-force", ["ne", "m/victim", "ART", "--out", "m/../m/victim", "--force"]),
    ("ne-out-inside-artifact-via-dotdot", ["ne", "MODEL", "a/victim", "--out", "a/../a/victim/ne"]),
    ("identify-out-inside-model-via-symlink", ["identify", "m/victim", "--out", "vlink/neurons", "--data", "PAIRS",
                                               "--split", "all", "--quiet", "--null-rounds", "0"]),
    ("identify-out-dotdot-is-model-force", ["identify", "vlink", "--out", "m/../m/victim", "--force", "--data",
                                            "PAIRS", "--split", "all", "--quiet", "--null-rounds", "0"]),
]


@pytest.mark.parametrize("argv", [c[1] for c in OVERLAP_CASES], ids=[c[0] for c in OVERLAP_CASES])
def test_out_aliasing_an_input_is_refused_and_the_input_is_untouched(argv, tmp_path, planted, art,
                                                                           monkeypatch):
    work = _path_case_setup(tmp_path, planted, art, monkeypatch)
    subs = {"MODEL": str(planted[0]), "ART": str(art), "PAIRS": str(planted[1])}
    args = [subs.get(a, a) for a in argv]
    victims = [work / "m" / "victim", work / "a" / "victim"]
    before = [digests(v) for v in victims]
    before_inside = [listing(v) for v in victims]
    expect_bad(work, *args, match="overlaps", unchanged=victims)
    for sub in ("m", "a"):
        assert listing(work / sub) == ["victim"]
    # explicit: every source file byte-identical, nothing created inside a source
    assert [digests(v) for v in victims] == before
    assert [listing(v) for v in victims] == before_inside


# (id, argv; OUT is replaced by "")
EMPTY_CASES = [
    ("select-force", ["select", "ART", "--out", "", "--force"]),
    ("select", ["select", "ART", "--out", ""]),
    ("identify-force", ["identify", "MODEL", "--out", "", "--force", "--data", "PAIRS", "--split", "all",
                        "--quiet", "--null-rounds", "0"]),
    ("bake-force", ["bake", "MODEL", "ART", "--out", "", "--force"]),
    ("bake-lora-force", ["bake", "MODEL", "ART", "--out", "", "--lora", "--force"]),
    ("ne-force", ["ne", "MODEL", "ART", "--out", "", "--force"]),
    ("demo-model-force", ["demo-model", "", "--force"]),
    ("demo-model", ["demo-model", ""]),
]


@pytest.mark.parametrize("argv", [c[1] for c in EMPTY_CASES], ids=[c[0] for c in EMPTY_CASES])
def test_blank_out_is_refused_and_the_current_directory_survives(argv, tmp_path, planted, art,
                                                                         monkeypatch):
    """`--out ""` is the current directory to pathlib: with --force it would be replaced."""
    from vllm_coco.data import demo_model as models

    def no_demo(*a, **k):  # never spend 30 s writing SmolLM2 into the cwd when the check is missing
        raise AssertionError("demo-model started writing although OUT is empty")

    monkeypatch.setattr(models, "write_demo_model", no_demo)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    important = cwd / "important.txt"
    important.write_text("do not delete me\n")
    sha = hashlib.sha256(important.read_bytes()).hexdigest()
    monkeypatch.chdir(cwd)
    subs = {"MODEL": str(planted[0]), "ART": str(art), "PAIRS": str(planted[1])}
    args = [subs.get(a, a) for a in argv]
    parent_before = listing(tmp_path)
    expect_bad(cwd, *args, match="empty", unchanged=(cwd, art, planted[0]))
    assert important.is_file() and hashlib.sha256(important.read_bytes()).hexdigest() == sha
    assert listing(cwd) == ["important.txt"] and listing(tmp_path) == parent_before


def test_output_under_a_read_only_directory_is_refused(tmp_path, art):
    if os.geteuid() == 0:
        pytest.skip("running as root: root ignores directory permissions, so read-only cannot be simulated")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        expect_bad(ro, "select", art, "--out", ro / "out", match="writable")
        expect_bad(ro, "select", art, "--out", ro / "new" / "deeper", match="writable")
    finally:
        ro.chmod(0o755)


def test_missing_parents_are_created(tmp_path, art):
    out = tmp_path / "NEW" / "deeper" / "out"
    code, _, err = run_cli("select", art, "--out", out)
    assert code == 0, err
    assert (out / "neurons.json").is_file() and (out / "neurons.safetensors").is_file()
    assert listing(tmp_path) == ["NEW"] and listing(tmp_path / "NEW" / "deeper") == ["out"]


def test_parents_created_for_a_failed_command_are_removed(tmp_path, planted, art):
    expect_bad(tmp_path, "bake", planted[0], art, "--out", tmp_path / "NEW" / "x", "--alpha", "1e39",
               match="finite")
    assert not (tmp_path / "NEW").exists()


def test_parents_created_before_an_interrupt_are_removed(tmp_path, art, monkeypatch):
    """A failure after the parents exist (here: Ctrl-C while writing) takes them away again."""
    from vllm_coco.core import artifact

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "save", interrupted)
    before = listing(tmp_path)
    code, _, err = run_cli("select", art, "--out", tmp_path / "NEW" / "deeper" / "out")
    assert code == 130, err
    assert listing(tmp_path) == before


# =========================================================================== numbers

NONFINITE_OPTION_CASES = [
    ("bake-alpha-1e39", ["bake", "MODEL", "ART", "--out", "OUT", "--alpha", "1e39"]),
    ("bake-lora-alpha-1e39", ["bake", "MODEL", "ART", "--out", "OUT", "--alpha", "1e39", "--lora"]),
    ("bake-alpha-nan", ["bake", "MODEL", "ART", "--out", "OUT", "--alpha", "nan"]),
    ("bake-alpha-inf", ["bake", "MODEL", "ART", "--out", "OUT", "--alpha", "inf"]),
    ("ne-alpha-nan", ["ne", "MODEL", "ART", "--out", "OUT", "--alpha", "nan"]),
    ("ne-alpha-inf", ["ne", "MODEL", "ART", "--out", "OUT", "--alpha", "inf"]),
    ("ne-beta-nan", ["ne", "MODEL", "ART", "--out", "OUT", "--beta", "nan"]),
    ("ne-beta-inf", ["ne", "MODEL", "ART", "--out", "OUT", "--beta", "inf"]),
    ("identify-tau-nan", ["identify", "MODEL", "--out", "OUT", "--data", "PAIRS", "--split", "all", "--quiet",
                          "--null-rounds", "0", "--tau", "nan"]),
    ("identify-tau-inf", ["identify", "MODEL", "--out", "OUT", "--data", "PAIRS", "--split", "all", "--quiet",
                          "--null-rounds", "0", "--tau", "inf"]),
    ("select-threshold-minus-inf", ["select", "ART", "--out", "OUT", "--threshold", "-inf"]),
    ("select-threshold-nan", ["select", "ART", "--out", "OUT", "--threshold", "nan"]),
]


@pytest.mark.parametrize("argv", [c[1] for c in NONFINITE_OPTION_CASES], ids=[c[0] for c in NONFINITE_OPTION_CASES])
def test_nan_inf_option_is_refused(argv, tmp_path, planted, art):
    subs = {"MODEL": str(planted[0]), "ART": str(art), "PAIRS": str(planted[1]), "OUT": str(tmp_path / "out")}
    expect_bad(tmp_path, *[subs.get(a, a) for a in argv], match="finite", unchanged=(art, planted[0]))


def test_nan_in_run_config_is_refused(tmp_path, planted):
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["models"] = [{"path": str(planted[0]), "name": "tiny"}]
    cfg["out"] = str(tmp_path / "out")
    cfg["sweep"]["edits"]["le@stereo"]["alpha"] = [0.5, float("nan")]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    expect_bad(tmp_path, "run", config, match="finite")


def _set(key, value):
    def edit(a):
        a[key] = np.full_like(a[key], value)
    return edit


# (id, array, value, command args after MODEL ART)
NONFINITE_ARRAY_CASES = [
    ("weight-nan-bake-le", "weight", np.nan, ["bake"]),
    ("weight-inf-bake-le", "weight", np.inf, ["bake"]),
    ("weight-nan-bake-lora", "weight", np.nan, ["bake", "--lora"]),
    ("weight-inf-bake-lora", "weight", np.inf, ["bake", "--lora"]),
    ("act_mean-nan-bake-ablate-mean", "act_mean", np.nan, ["bake", "--mode", "ablate-mean"]),
    ("act_mean-inf-bake-ablate-mean", "act_mean", -np.inf, ["bake", "--mode", "ablate-mean"]),
    ("calib_std-nan-ne", "calib_std", np.nan, ["ne"]),
    ("calib_std-inf-ne", "calib_std", np.inf, ["ne"]),
    ("calib_mean-nan-ne", "calib_mean", np.nan, ["ne"]),
    ("direction-nan-ne", "direction", np.nan, ["ne"]),
    ("direction-inf-ne", "direction", np.inf, ["ne"]),
]


@pytest.mark.parametrize("key,value,cmd", [c[1:] for c in NONFINITE_ARRAY_CASES],
                         ids=[c[0] for c in NONFINITE_ARRAY_CASES])
def test_nan_inf_in_artifact_array_is_refused(key, value, cmd, tmp_path, planted, art):
    bad = corrupt_artifact(art, tmp_path / "bad", arrays=_set(key, value))
    expect_bad(tmp_path, cmd[0], planted[0], bad, "--out", tmp_path / "out", *cmd[1:], match="finite",
               unchanged=(bad, planted[0]))


def test_ne_dir_with_nan_alpha_is_refused_on_load(tmp_path, ne_dir):
    """An NE directory whose config carries a non-finite alpha is refused when loaded, not served."""
    from vllm_coco.core.errors import CocoError
    from vllm_coco.serve.hf_reference import load_ne_model

    bad = tmp_path / "ne"
    shutil.copytree(ne_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["coco"]["alpha"] = float("nan")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CocoError, match="finite"):
        load_ne_model(bad)


# =========================================================================== artifacts

def _drop(*path):
    def edit(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return edit


def _neuron0(**changes):
    def edit(m):
        m["neurons"][0].update(changes)
    return edit


def _shorter(key, by=1):
    def edit(a):
        a[key] = a[key][:-by]
    return edit


# (id, corruption kwargs for corrupt_artifact, command, match)
ARTIFACT_CASES = []
for _cmd in ("select", "report", "bake", "ne"):
    ARTIFACT_CASES += [
        (f"json-malformed-{_cmd}", {"json_bytes": lambda b: b[: len(b) // 2]}, _cmd, "neurons.json"),
        (f"json-list-{_cmd}", {"json_bytes": lambda b: b"[1, 2, 3]\n"}, _cmd, "neurons.json"),
        (f"json-not-utf8-{_cmd}", {"json_bytes": lambda b: b.replace(b'"coco-v1"', b'"coco-v1\xff\xfe"', 1)
                                       .replace(b'"method"', b'"\xc3\x28method"', 1)}, _cmd, "neurons.json"),
        (f"json-empty-{_cmd}", {"json_bytes": lambda b: b""}, _cmd, "neurons.json"),
        (f"safetensors-truncated-{_cmd}", {"st_bytes": lambda b: b[: len(b) // 2]}, _cmd, "neurons.safetensors"),
        (f"safetensors-garbage-{_cmd}", {"st_bytes": lambda b: b"\x00garbage" * 64}, _cmd, "neurons.safetensors"),
        (f"safetensors-empty-{_cmd}", {"st_bytes": lambda b: b""}, _cmd, "neurons.safetensors"),
    ]
ARTIFACT_CASES += [
    # missing keys each command reads
    ("json-no-model-report", {"meta": _drop("model")}, "report", "neurons.json"),
    ("json-no-model-bake", {"meta": _drop("model")}, "bake", "neurons.json"),
    ("json-no-model-ne", {"meta": _drop("model")}, "ne", "neurons.json"),
    ("json-no-selection-select", {"meta": _drop("selection")}, "select", "neurons.json"),
    ("json-no-selection-report", {"meta": _drop("selection")}, "report", "neurons.json"),
    ("json-no-selection-ne", {"meta": _drop("selection")}, "ne", "neurons.json"),
    ("json-no-categories-select", {"meta": _drop("categories")}, "select", "neurons.json"),
    ("json-no-significance-select", {"meta": _drop("significance")}, "select", "neurons.json"),
    ("json-no-neurons-report", {"meta": _drop("neurons")}, "report", "neurons.json"),
    ("json-no-weighting-ne", {"meta": _drop("selection", "weighting")}, "ne", "neurons.json"),
    ("json-no-q_size-report", {"meta": _drop("model", "q_size")}, "report", "neurons.json"),
    # arrays of the wrong length / shape
    ("weight-shorter-than-selected-bake", {"arrays": _shorter("weight", 3)}, "bake", "neurons.safetensors"),
    ("weight-shorter-than-selected-bake-lora", {"arrays": _shorter("weight", 3)}, "bake --lora",
     "neurons.safetensors"),
    ("act_mean-short-bake-ablate-mean", {"arrays": _shorter("act_mean", 200)}, "bake --mode ablate-mean",
     "neurons.safetensors"),
    ("direction-short-ne", {"arrays": _shorter("direction", 7)}, "ne", "neurons.safetensors"),
    ("calib_std-short-ne", {"arrays": _shorter("calib_std", 200)}, "ne", "neurons.safetensors"),
    ("score-short-select", {"arrays": _shorter("score", 5)}, "select", "neurons.safetensors"),
    ("layer-short-select", {"arrays": _shorter("layer", 5)}, "select", "neurons.safetensors"),
    ("direction-2d-ne", {"arrays": lambda a: a.update(direction=a["direction"].reshape(-1, 1))}, "ne",
     "neurons.safetensors"),
    ("weight-2d-bake", {"arrays": lambda a: a.update(weight=np.stack([a["weight"], a["weight"]]))}, "bake",
     "neurons.safetensors"),
    ("selected-missing-bake", {"arrays": lambda a: {k: v for k, v in a.items() if k != "selected"}}, "bake",
     "neurons.safetensors"),
    # neurons outside the layout: neurons.json entries, `selected` indices
    ("neuron-layer-99-report", {"meta": _neuron0(layer=99)}, "report", "neurons"),
    ("neuron-layer-minus-1-report", {"meta": _neuron0(layer=-1)}, "report", "neurons"),
    ("neuron-proj-x-report", {"meta": _neuron0(proj="x")}, "report", "neurons"),
    ("neuron-layer-string-report", {"meta": _neuron0(layer="1")}, "report", "neurons"),
    ("selected-past-end-bake", {"arrays": lambda a: a["selected"].__setitem__(0, 10 ** 6)}, "bake", "neuron"),
    ("selected-negative-bake", {"arrays": lambda a: a["selected"].__setitem__(0, -1)}, "bake", "neuron"),
]


def _command_argv(cmd: str, model, neurons, tmp_path) -> list:
    name, *extra = cmd.split()
    if name == "select":
        return ["select", neurons, "--out", tmp_path / "out", *extra]
    if name == "report":
        return ["report", neurons, "--png", tmp_path / "heat.png", *extra]
    return [name, model, neurons, "--out", tmp_path / "out", *extra]


@pytest.mark.parametrize("corruption,cmd,match", [c[1:] for c in ARTIFACT_CASES], ids=[c[0] for c in ARTIFACT_CASES])
def test_broken_artifact_is_refused(corruption, cmd, match, tmp_path, planted, art):
    bad = corrupt_artifact(art, tmp_path / "bad", **corruption)
    expect_bad(tmp_path, *_command_argv(cmd, planted[0], bad, tmp_path), match=match, unchanged=(bad, planted[0]))


# =========================================================================== model directories

def _bad_model(src: Path, dst: Path, kind: str) -> Path:
    shutil.copytree(src, dst)
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if kind == "config-list":
        cfg_path.write_text(json.dumps([cfg]))
    elif kind == "config-no-model_type":
        cfg.pop("model_type")
        cfg_path.write_text(json.dumps(cfg))
    elif kind == "config-unknown-model_type":
        cfg["model_type"] = "no_such_architecture"
        cfg["architectures"] = ["NoSuchArchitectureForCausalLM"]
        cfg_path.write_text(json.dumps(cfg))
    elif kind == "weights-truncated":
        w = dst / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    elif kind == "weights-garbage":
        (dst / "model.safetensors").write_bytes(os.urandom(4096))
    elif kind == "weights-missing":
        (dst / "model.safetensors").unlink()
    elif kind == "bin-only":
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(str(dst / "model.safetensors")), dst / "pytorch_model.bin")
        (dst / "model.safetensors").unlink()
    else:
        raise ValueError(kind)
    return dst


# (id, kind, command, match). bake and ne get --force so that a fingerprint mismatch with the
# artifact (which any change of the weights causes) is not what refuses the directory.
MODEL_DIR_CASES = []
for _cmd in ("identify", "bake", "ne"):
    MODEL_DIR_CASES += [
        (f"config-list-{_cmd}", "config-list", _cmd, "config.json"),
        (f"weights-truncated-{_cmd}", "weights-truncated", _cmd, "model.safetensors"),
        (f"weights-garbage-{_cmd}", "weights-garbage", _cmd, "model.safetensors"),
        (f"weights-missing-{_cmd}", "weights-missing", _cmd, "weight"),
        (f"bin-only-{_cmd}", "bin-only", _cmd, "safetensors"),
    ]
MODEL_DIR_CASES += [
    ("config-no-model_type-identify", "config-no-model_type", "identify", "config.json"),
    ("config-unknown-model_type-identify", "config-unknown-model_type", "identify", "config.json"),
]


@pytest.mark.parametrize("kind,cmd,match", [c[1:] for c in MODEL_DIR_CASES], ids=[c[0] for c in MODEL_DIR_CASES])
def test_broken_model_directory_is_refused(kind, cmd, match, tmp_path, planted, art):
    bad = _bad_model(planted[0], tmp_path / "model", kind)
    out = tmp_path / "out"
    if cmd == "identify":
        argv = ["identify", bad, "--out", out, "--data", planted[1], "--split", "all", "--quiet", "--null-rounds", "0"]
    else:
        argv = [cmd, bad, art, "--out", out, "--force"]
    expect_bad(tmp_path, *argv, match=match, unchanged=(bad, art))


def test_remote_code_model_is_refused_without_loading_or_prompting(tmp_path, planted):
    """A config.json with auto_map asks transformers to import the directory's own Python. coco-tools
    must refuse it (exit 2, one line) before any of that code runs, and never prompt for consent."""
    d = tmp_path / "remote"
    shutil.copytree(planted[0], d)
    sentinel = tmp_path / "remote-code-ran"
    (d / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n"
                               "from transformers import LlamaConfig, LlamaForCausalLM\n"
                               "class EvilConfig(LlamaConfig):\n    pass\n"
                               "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    before = listing(tmp_path)
    proc = subprocess.run([str(COCO_TOOLS), "identify", str(d), "--out", str(tmp_path / "out"), "--data",
                           str(planted[1]), "--split", "all", "--quiet", "--null-rounds", "0"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    assert "remote code" in one_line(proc.stderr).lower()
    assert "[y/N]" not in proc.stdout + proc.stderr
    assert not sentinel.exists(), "the model directory's Python code was executed"
    assert listing(tmp_path) == before


# =========================================================================== contrast data

def _pairs_lines(pairs: Path) -> list[bytes]:
    return pairs.read_bytes().splitlines(keepends=True)


CONTRAST_CASES = [
    ("non-utf8-bytes", lambda lines: lines[:3] + [lines[3].replace(b'"prompt": "', b'"prompt": "\xff\xfe', 1)]
     + lines[4:]),
    ("latin1-line", lambda lines: lines[:2] + ['{"category": "Age", "prompt": "caf\xe9", "biased": "b1", '
                                               '"unbiased": "u1"}\n'.encode("latin-1")] + lines[2:]),
    ("deeply-nested-json", lambda lines: lines[:5] + [b'{"category": "Age", "prompt": ' + b"[" * 200_000
                                                      + b"]" * 200_000 + b', "biased": "b1", "unbiased": "u1"}\n']
     + lines[5:]),
]


@pytest.mark.parametrize("make", [c[1] for c in CONTRAST_CASES], ids=[c[0] for c in CONTRAST_CASES])
def test_broken_contrast_file_is_refused(make, tmp_path, planted):
    f = tmp_path / "pairs.jsonl"
    f.write_bytes(b"".join(make(_pairs_lines(planted[1]))))
    expect_bad(tmp_path, "identify", planted[0], "--out", tmp_path / "out", "--data", f, "--split", "all",
               "--quiet", "--null-rounds", "0", match="pairs.jsonl")


@pytest.mark.parametrize("field", ["context_condition", "ans0", "question_polarity", "answer_info"])
def test_bbq_directory_row_missing_a_field_is_refused(field, tmp_path, planted):
    import tiny

    bbq = tiny.planted_bbq(tmp_path / "bbq")
    rows = [json.loads(line) for line in (bbq / "Age.jsonl").read_text().splitlines()]
    del rows[3][field]
    (bbq / "Age.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expect_bad(tmp_path, "identify", planted[0], "--out", tmp_path / "out", "--data", bbq, "--categories",
               "Age,SES", "--split", "all", "--quiet", "--null-rounds", "0", match="Age.jsonl", unchanged=(bbq,))


# =========================================================================== CLI

@pytest.mark.parametrize("cmd", ["identify", "select"])
def test_negative_rng_option_is_refused(cmd, tmp_path, planted, art):
    if cmd == "identify":
        argv = ["identify", planted[0], "--out", tmp_path / "out", "--data", planted[1], "--split", "all",
                "--quiet", "--null-rounds", "0", "--seed", "-1"]
    else:
        argv = ["select", art, "--out", tmp_path / "out", "--baseline", "rand", "--seed", "-1"]
    expect_bad(tmp_path, *argv, match="--seed")


USAGE_CASES = [
    ("out-is-an-existing-file", ["bake", "MODEL", "ART", "--out", "FILE"]),
    ("select-out-is-an-existing-file", ["select", "ART", "--out", "FILE"]),
    ("unknown-mode", ["bake", "MODEL", "ART", "--out", "OUT", "--mode", "nope"]),
    ("unknown-option", ["select", "ART", "--out", "OUT", "--nope"]),
    ("missing-required-option", ["select", "ART"]),
    ("missing-argument", ["bake", "MODEL"]),
    ("not-an-int", ["identify", "MODEL", "--out", "OUT", "--limit", "many"]),
    ("unknown-command", ["identfy", "MODEL"]),
]


@pytest.mark.parametrize("argv", [c[1] for c in USAGE_CASES], ids=[c[0] for c in USAGE_CASES])
def test_usage_error_is_one_line(argv, tmp_path, planted, art):
    f = tmp_path / "existing.txt"
    f.write_text("keep\n")
    subs = {"MODEL": str(planted[0]), "ART": str(art), "FILE": str(f), "OUT": str(tmp_path / "out")}
    before = listing(tmp_path)
    code, out, err = run_cli(*[subs.get(a, a) for a in argv])
    assert code == 2, (code, out, err)
    one_line(err)
    assert listing(tmp_path) == before and f.read_text() == "keep\n"


@pytest.mark.parametrize("results", [5, [1, 2], "text", None], ids=["int", "list", "string", "null"])
def test_compare_refuses_a_non_mapping_section(results, tmp_path):
    f = tmp_path / "run1.json"
    f.write_text(json.dumps({"results": results}))
    expect_bad(tmp_path, "compare", f, "--png", tmp_path / "c.png", match="results")


@pytest.mark.parametrize("content", [[1, 2], 7, {"results": {"stereo_coco": 5}},
                                     {"results": {"stereo_coco": [0.5]}, "group_subtasks": 3}],
                         ids=["file-is-list", "file-is-int", "task-entry-int", "task-entry-list"])
def test_compare_refuses_malformed_structure(content, tmp_path):
    f = tmp_path / "run1.json"
    f.write_text(json.dumps(content))
    expect_bad(tmp_path, "compare", f, "--png", tmp_path / "c.png", match="results")


# --------------------------------------------------------------------------- run CONFIG

def _run_config(tmp_path: Path, model: Path, out, **ident) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["models"] = [{"path": str(model), "name": "tiny"}]
    cfg["out"] = str(out)
    cfg["identify"].update(ident)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_run_refuses_out_aliasing_a_model_dir(where, tmp_path, planted, monkeypatch):
    from vllm_coco.experiment import pipeline

    def no_stage(*a, **k):  # keep a missing check from running the whole pipeline into the model
        raise AssertionError("the pipeline started a stage although `out` overlaps a model directory")

    monkeypatch.setattr(pipeline, "_identify", no_stage)
    holder = tmp_path / "holder"
    model = holder / "tiny-model"
    holder.mkdir()
    shutil.copytree(planted[0], model)
    out = {"equal": model, "inside": model / "runs", "containing": holder}[where]
    config = _run_config(tmp_path, model, out)
    before = digests(holder)
    expect_bad(tmp_path, "run", config, match="overlaps", unchanged=(holder,))
    assert digests(holder) == before
    assert not (model / "pipeline.log").exists() and not (holder / "pipeline.log").exists()
    assert not (model / "tiny").exists() and not (model / "runs").exists() and listing(holder) == ["tiny-model"]


def test_run_refuses_a_bogus_torch_target_before_writing(tmp_path, planted):
    config = _run_config(tmp_path, planted[0], tmp_path / "out", device="nonsense")
    expect_bad(tmp_path, "run", config, match="device")
    assert not (tmp_path / "out").exists()  # no pipeline.log, no .identify.partial/


# --------------------------------------------------------------------------- modes

def _modes(d: Path) -> dict:
    return {str(p.relative_to(d)): stat.S_IMODE(p.stat().st_mode) for p in sorted(d.rglob("*"))}


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_get_the_users_umask(tmp_path, planted, art, ne_dir, umask_022):
    """With umask 022 every new file is 0644 and every new directory 0755 (mkstemp / mkdtemp make
    0600 / 0700; outputs must not keep that)."""
    sel = tmp_path / "sel"
    assert run_cli("select", art, "--out", sel, "--baseline", "rand")[0] == 0
    png = tmp_path / "heat.png"
    code, _, err = run_cli("report", sel, "--png", png)
    assert code == 0, err
    code, _, err = run_cli("report", sel)  # default: NEURONS_DIR/heatmap.png
    assert code == 0, err
    baked = tmp_path / "le"
    assert run_cli("bake", planted[0], art, "--out", baked)[0] == 0
    lora = tmp_path / "lora"
    assert run_cli("bake", planted[0], art, "--out", lora, "--lora")[0] == 0
    ne = tmp_path / "ne"
    assert run_cli("ne", planted[0], art, "--out", ne)[0] == 0
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": {"stereo_coco_Age": {"success_rate,none": 0.5},
                                               "stereo_coco": {"success_rate,none": 0.5}}}))
    cpng = tmp_path / "compare.png"
    code, _, err = run_cli("compare", results, "--png", cpng)
    assert code == 0, err

    wrong = {}
    for d in (sel, baked, lora, ne):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, (d, oct(stat.S_IMODE(d.stat().st_mode)))
        for name, mode in _modes(d).items():
            want = 0o755 if (d / name).is_dir() else 0o644
            if mode != want:
                wrong[f"{d.name}/{name}"] = oct(mode)
    for f in (png, cpng):
        if stat.S_IMODE(f.stat().st_mode) != 0o644:
            wrong[f.name] = oct(stat.S_IMODE(f.stat().st_mode))
    assert any(n.endswith(".safetensors") for n in os.listdir(sel))
    assert (sel / "heatmap.png").is_file()
    assert not wrong, f"files without the umask's mode (want 0644 / dirs 0755): {wrong}"


# --------------------------------------------------------------------------- SIGTERM

@pytest.mark.parametrize("replace", [False, True], ids=["new-output", "replacing-with-force"])
def test_sigterm_leaves_nothing_half_written(replace, tmp_path, planted):
    """SIGTERM while identify writes: the process exits 143 (128 + SIGTERM; not 130, Ctrl-C's) with one
    stderr line saying "terminated", the temporary directory is gone, no .tmp-*/.old-* is left beside
    --out, and --out is as before (absent, or with --force the previous output intact)."""
    import tiny

    pairs = tiny.planted_pairs(tmp_path / "big.jsonl", n=300)  # ~600 pairs at batch 1: a few seconds
    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "neurons"
    extra = []
    if replace:
        out.mkdir()
        (out / "old.txt").write_text("previous output\n")
        extra = ["--force"]
    before = listing(parent)
    kept = digests(out) if replace else None
    proc = subprocess.Popen([str(COCO_TOOLS), "identify", str(planted[0]), "--out", str(out), "--data", str(pairs),
                             "--split", "all", "--quiet", "--null-rounds", "0", "--batch-size", "1", *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if any(".tmp-" in n for n in os.listdir(parent)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"identify finished before it could be interrupted: {proc.communicate()}"
        assert any(".tmp-" in n for n in os.listdir(parent)), "no temporary output directory appeared"
        time.sleep(0.3)  # well inside the capture
        proc.send_signal(signal.SIGTERM)
        _stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, (proc.returncode, stderr[-3000:])
    assert one_line(stderr).startswith("coco-tools: terminated"), stderr
    assert listing(parent) == before, listing(parent)
    assert not any(".tmp-" in n or ".old-" in n for n in os.listdir(parent))
    if replace:
        assert digests(out) == kept
    else:
        assert not out.exists()


# ---------------------------------------------------------------- found by the session's review

def test_model_named_like_the_runs_own_output_is_refused(tmp_path, planted):
    from vllm_coco.core.errors import CocoError
    from vllm_coco.experiment import config

    for name in config.RESERVED_NAMES:
        with pytest.raises(CocoError, match="name of the run's own output"):
            config.validate({"models": [{"path": str(planted[0]), "name": name}]})


def test_integer_too_large_for_a_float_is_refused(tmp_path, planted):
    from vllm_coco.core.checks import finite
    from vllm_coco.core.errors import CocoError

    with pytest.raises(CocoError, match="not a finite number"):
        finite(10 ** 400, "--alpha")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models: [{{path: {planted[0]}}}]\nidentify: {{ratio: {10 ** 400}}}\n")
    expect_bad(tmp_path, "run", cfg, "--check", match="finite")


@pytest.mark.parametrize("cmd", ["report", "compare"])
def test_figure_path_must_be_a_png(cmd, tmp_path, art):
    if cmd == "report":
        expect_bad(tmp_path, "report", art, "--png", tmp_path / "heat.txt", match="does not end in .png")
    else:
        res = tmp_path / "run1.json"
        res.write_text(json.dumps({"results": {"stereo_coco": {"success_rate,none": 0.5}}}))
        before = res.read_bytes()
        expect_bad(tmp_path, "compare", res, "--png", res, match="does not end in .png")
        assert res.read_bytes() == before


def test_ne_gate_tensors_must_match_the_config(tmp_path, ne_dir):
    from safetensors.numpy import load_file, save_file

    from vllm_coco.core.errors import CocoError
    from vllm_coco.core.ne_format import GATE_FILE, NEDirectory

    bad = tmp_path / "ne"
    shutil.copytree(ne_dir, bad)
    tensors = load_file(str(bad / GATE_FILE))
    key = next(k for k in tensors if k.endswith(".w_hat"))
    tensors[key] = tensors[key][:, :1].copy()
    save_file(tensors, str(bad / GATE_FILE))
    with pytest.raises(CocoError, match="do not match"):
        NEDirectory.read(bad).gates()


def test_damaged_shard_index_is_refused_before_writing(tmp_path, planted, art):
    model = tmp_path / "m"
    shutil.copytree(planted[0], model)
    (model / "model.safetensors.index.json").write_text("{not json")
    for cmd in (("bake", model, art, "--out", tmp_path / "o"), ("ne", model, art, "--out", tmp_path / "o")):
        expect_bad(tmp_path, *cmd, match="model.safetensors.index.json", unchanged=(model,))


def test_run_check_applies_the_output_rule(tmp_path, planted):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models: [{{path: {planted[0]}}}]\nout: {planted[0] / 'run'}\n")
    expect_bad(tmp_path, "run", cfg, "--check", match="overlaps", unchanged=(planted[0],))
