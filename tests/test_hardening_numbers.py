"""Hardening, numbers (issue 22, "Wrong numbers, exit 0"): values that are finite as Python floats
but wrong for the model must be refused like any other bad input: exit 2, exactly one line on
stderr naming the file or option and the fix, nothing written, inputs unchanged.

  NE gate          effective strength / sharpness out of float32 range, damaged gate tensors of
                   an NE directory (mu 3e38, wrong dtype, w outside [-1, 1], sigma 0)
  finite forward   a base model with a NaN, inf or overflowing weight: the message names the base
                   model's weight, never "use a smaller strength"
  artifacts        arrays of the wrong dtype, weights outside the range identify produces, a
                   neurons.json that lists other neurons than neurons.safetensors selects, a
                   damaged intensities.safetensors, an unknown weighting
  model dirs       config.json that disagrees with the weights' shapes (layers, heads, hidden size)
  identify         NaN / inf weights, a temperature that ties every score

Each case was exit 0 (or a message without the file) before the fix; the table ids name them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import expect_bad as _expect_bad
from conftest import run_cli

# --------------------------------------------------------------------------- helpers


def digests(d) -> dict:
    d = Path(d)
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def expect_bad(parent, *args, match, unchanged=()):
    """conftest.expect_bad, refusing a `match` that already occurs in the parent's path (pytest names
    tmp_path after the test: a message that merely echoes a path must not pass)."""
    assert match.lower() not in str(parent).lower(), f"{match!r} occurs in {parent}: rename the test"
    _expect_bad(parent, *args, match=match, unchanged=unchanged)


def identify_args(model, pairs, out, *extra) -> list:
    return ["identify", model, "--out", out, "--data", pairs, "--split", "all", "--quiet", "--null-rounds", "0",
            "--ratio", "0.05", *extra]


@pytest.fixture(scope="module")
def art(planted, tmp_path_factory):
    """A real neuron artifact of the planted tiny model (magnitude weights, 13 neurons)."""
    model, pairs = planted
    out = tmp_path_factory.mktemp("numbers-art") / "neurons"
    code, _, err = run_cli(*identify_args(model, pairs, out))
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def ne_dir(planted, art, tmp_path_factory):
    out = tmp_path_factory.mktemp("numbers-ne") / "ne"
    code, _, err = run_cli("ne", planted[0], art, "--out", out)
    assert code == 0, err
    return out


def _edited_copy(src, dst, tensors: str, edit_tensors, framework: str, metadata: dict, edit_json) -> Path:
    """A copy of directory `src` at `dst`: its safetensors file `tensors` loaded with `framework`,
    edited in place and saved with `metadata`; its JSON file (name, edit) likewise. The one copier
    behind copy_artifact, copy_model and copy_ne."""
    import importlib

    st = importlib.import_module(f"safetensors.{framework}")
    dst = Path(dst)
    shutil.copytree(src, dst)
    if edit_tensors is not None:
        t = st.load_file(str(dst / tensors))
        edit_tensors(t)
        contiguous = {k: np.ascontiguousarray(v) for k, v in t.items()} if framework == "numpy" else t
        st.save_file(contiguous, str(dst / tensors), metadata=metadata)
    name, edit = edit_json
    if edit is not None:
        m = json.loads((dst / name).read_text())
        edit(m)
        (dst / name).write_text(json.dumps(m, indent=1) + "\n")
    return dst


def copy_artifact(src, dst, *, arrays=None, meta=None) -> Path:
    """A copy of the artifact `src` at `dst`, with arrays(dict) / meta(dict) edited in place."""
    return _edited_copy(src, dst, "neurons.safetensors", arrays, "numpy", {"method": "coco-v1"}, ("neurons.json", meta))


def copy_model(src, dst, *, weights=None, config=None) -> Path:
    """A copy of the model `src` at `dst`, with weights(dict of torch tensors) / config(dict) edited."""
    return _edited_copy(src, dst, "model.safetensors", weights, "torch", {"format": "pt"}, ("config.json", config))


def copy_ne(src, dst, *, gate=None, config=None) -> Path:
    """A copy of the NE directory `src` at `dst`, with its gate tensors (dict of numpy) / config edited."""
    return _edited_copy(src, dst, "coco_gate.safetensors", gate, "numpy", {"format": "pt"}, ("config.json", config))


def first_gate_key(g: dict, name: str) -> str:
    return sorted(k for k in g if k.endswith(f"coco_gate.{name}"))[0]


# --------------------------------------------------------------------------- NE export: effective numbers

# (id, extra options of `coco-tools ne MODEL ART --out OUT`, match). Before: exit 0, every logit NaN.
NE_OPTION_CASES = [
    ("alpha-1e39", ["--alpha", "1e39"], "--alpha"),
    ("alpha-gain-above-bound", ["--alpha", "5000"], "--alpha"),
    ("beta-1e39", ["--beta", "1e39"], "--beta"),
    ("beta-above-bound", ["--beta", "1e7"], "--beta"),
]


@pytest.mark.parametrize("extra,match", [c[1:] for c in NE_OPTION_CASES], ids=[c[0] for c in NE_OPTION_CASES])
def test_ne_option_out_of_float32_range_is_refused(extra, match, tmp_path, planted, art):
    expect_bad(tmp_path, "ne", planted[0], art, "--out", tmp_path / "out", *extra, match=match,
               unchanged=(art, planted[0]))


def _gate_set(name, value, dtype=None):
    def edit(g):
        k = first_gate_key(g, name)
        g[k] = np.full_like(g[k], value).astype(dtype or g[k].dtype)
    return edit


def _gate_w_hat_negative(g):
    k = first_gate_key(g, "w_hat")
    g[k] = -np.abs(g[k]) - 0.1


def _config_coco(key, value):
    def edit(c):
        c["coco"][key] = value
    return edit


# (id, gate edit, config edit, match): an NE directory damaged after export. Before: exit 0 from
# `serve --dry-run` (and every logit NaN when served) for the numbers; a message either way after.
NE_DIR_CASES = [
    ("mu-3e38", _gate_set("mu", 3e38), None, "coco_gate.safetensors"),
    ("mu-float16", _gate_set("mu", 1.0, np.float16), None, "coco_gate.safetensors"),
    ("sigma-zero", _gate_set("sigma", 0.0), None, "coco_gate.safetensors"),
    ("w-above-one", _gate_set("w", 5.0), None, "coco_gate.safetensors"),
    ("w_hat-negative", _gate_w_hat_negative, None, "coco_gate.safetensors"),
    ("config-alpha-1e39", None, _config_coco("alpha", 1e39), "coco.alpha"),
    ("config-beta-1e39", None, _config_coco("beta", 1e39), "coco.beta"),
    ("config-w_min-wrong", None, _config_coco("w_min", -0.5), "w_min"),
]


@pytest.mark.parametrize("gate,config,match", [c[1:] for c in NE_DIR_CASES], ids=[c[0] for c in NE_DIR_CASES])
def test_damaged_ne_directory_is_refused_before_serving(gate, config, match, tmp_path, ne_dir):
    bad = copy_ne(ne_dir, tmp_path / "ne", gate=gate, config=config)
    expect_bad(tmp_path, "serve", bad, "--dry-run", match=match, unchanged=(bad,))


def test_damaged_ne_directory_is_refused_by_the_hf_reference(tmp_path, ne_dir):
    """The Hugging Face reference reads the same NEDirectory: one validation for every reader."""
    from vllm_coco.core.errors import CocoError
    from vllm_coco.serve.hf_reference import load_ne_model

    bad = copy_ne(ne_dir, tmp_path / "ne", gate=_gate_set("mu", 3e38))
    with pytest.raises(CocoError, match="coco_gate.safetensors"):
        load_ne_model(bad)


def test_per_request_alpha_is_bounded_like_the_cli():
    """request_settings calls ne_hyper: an absurd coco_alpha is a one-line 400, not an engine crash."""
    from vllm_coco.serve.request_settings import Menu

    menu = Menu(alpha=1.0, beta=2.0, lam=0.5, w_min=0.25)
    for args in ({"coco_alpha": 1e39}, {"coco_alpha": 5000}, {"coco_beta": 1e39}):
        with pytest.raises(ValueError, match="coco_") as exc:
            menu.parse(args)
        assert "\n" not in str(exc.value)


def test_ne_hyper_bounds_use_the_largest_weight_when_given():
    """w_max (optional) sharpens the bound: alpha 1500 is fine when no weight exceeds 0.5."""
    from vllm_coco.core.checks import GAIN_MAX, ne_hyper
    from vllm_coco.core.errors import CocoError

    ne_hyper(1500.0, 2.0, 0.5, 0.1, w_max=0.5)
    with pytest.raises(CocoError, match=f"{GAIN_MAX:g}"):
        ne_hyper(1500.0, 2.0, 0.5, 0.1)  # w_max defaults to 1, the largest weight identify makes


# --------------------------------------------------------------------------- finite forward on export

def _weight_set(name, value, row=None):
    def edit(w):
        if row is None:
            w[name].fill_(value)
        else:
            w[name][row] = value
    return edit


Q0 = "model.layers.0.self_attn.q_proj.weight"
MLP1 = "model.layers.1.mlp.down_proj.weight"

# (id, weight edit, argv after MODEL ART / for identify, match). The model copy's fingerprint differs
# from the artifact's, so bake and ne get --force. Before: bake le on a NaN row said "use a smaller
# strength"; NaN elsewhere, and every other command, exit 0.
BASE_WEIGHT_CASES = [
    ("nan-q-row-bake-le", _weight_set(Q0, float("nan"), 3), ["bake", "--force"], Q0),
    ("nan-q-row-bake-lora", _weight_set(Q0, float("nan"), 3), ["bake", "--force", "--lora"], Q0),
    ("nan-mlp-bake-ablate", _weight_set(MLP1, float("nan"), 0), ["bake", "--force", "--mode", "ablate-zero"],
     MLP1),
    ("inf-mlp-ne", _weight_set(MLP1, float("inf"), 0), ["ne", "--force"], MLP1),
    ("nan-q-row-identify", _weight_set(Q0, float("nan"), 3), ["identify"], Q0),
    ("inf-mlp-identify", _weight_set(MLP1, float("-inf"), 0), ["identify"], MLP1),
    # finite weights whose forward overflows: the probe names the base model, not the edit
    ("overflowing-lm_head-bake", _weight_set("lm_head.weight", 3e38), ["bake", "--force"], "base model"),
    ("overflowing-lm_head-ne", _weight_set("lm_head.weight", 3e38), ["ne", "--force"], "base model"),
]


@pytest.mark.parametrize("weights,argv,match", [c[1:] for c in BASE_WEIGHT_CASES],
                         ids=[c[0] for c in BASE_WEIGHT_CASES])
def test_bad_base_weight_is_named_as_the_problem(weights, argv, match, tmp_path, planted, art):
    bad = copy_model(planted[0], tmp_path / "model", weights=weights)
    out = tmp_path / "out"
    if argv[0] == "identify":
        args = identify_args(bad, planted[1], out)
    else:
        args = [argv[0], bad, art, "--out", out, *argv[1:]]
    expect_bad(tmp_path, *args, match=match, unchanged=(bad, art))
    _, _, err = run_cli(*args)
    assert "smaller" not in err  # the strength is not the problem: the base model is


def test_probe_refuses_an_edit_with_non_finite_logits(planted):
    """The probe itself: an edit whose gain overflows the forward is refused with its own fix."""
    from vllm_coco.core.errors import CocoError
    from vllm_coco.edit.conditions import LinearEdit
    from vllm_coco.edit.probe import finite_forward

    ch = np.arange(16, dtype=np.int64)  # the first 16 q channels of layer 0
    edit = LinearEdit("le", {0: ch}, {0: np.full(16, 3e38)}, {0: np.full(16, 3e38)})
    with pytest.raises(CocoError, match="THE FIX") as exc:
        finite_forward(Path(planted[0]), {"le": (edit, "THE FIX")})
    assert "le" in str(exc.value) and "\n" not in str(exc.value)
    finite_forward(Path(planted[0]), {})  # the planted base model itself is finite


# --------------------------------------------------------------------------- artifacts

def _arr(key, fn):
    def edit(a):
        a[key] = fn(a[key])
    return edit


def _json_weights(value):
    """neurons.json's weights set like the arrays' (so only the weight range can refuse them)."""
    def edit(m):
        for n in m["neurons"]:
            n["weight"] = value
    return edit


def _json_neuron0_index_shift(m):
    n = m["neurons"][0]
    size = m["model"]["q_size"] if n["proj"] == "q" else m["model"]["kv_size"]
    n["index"] = (n["index"] + 1) % size


def _json_weighting(m):
    m["selection"]["weighting"] = "bogus"


# (id, arrays edit, meta edit, command, match). Before: exit 0 for all but `weighting` (exit 2 with
# "unknown --weighting", no file named).
ARTIFACT_CASES = [
    ("weight-minus-0.9-bake", _arr("weight", lambda w: np.full_like(w, -0.9)), _json_weights(-0.9), "bake",
     "outside [0, 1]"),
    ("weight-1000-bake", _arr("weight", lambda w: np.full_like(w, 1000.0)), _json_weights(1000.0), "bake",
     "outside [0, 1]"),
    ("weight-1000-ne", _arr("weight", lambda w: np.full_like(w, 1000.0)), _json_weights(1000.0), "ne",
     "outside [0, 1]"),
    ("calib_mean-float16-ne", _arr("calib_mean", lambda a: a.astype(np.float16)), None, "ne", "float16"),
    ("loss-float32-select", _arr("loss", lambda a: a.astype(np.float32)), None, "select", "float32"),
    ("row_label-7-select", _arr("row_label", lambda a: np.full_like(a, 7)), None, "select", "row_label"),
    ("json-neurons-differ-bake", None, _json_neuron0_index_shift, "bake", "neurons.json"),
    ("json-neurons-differ-report", None, _json_neuron0_index_shift, "report", "neurons.json"),
    ("json-neurons-differ-ne", None, _json_neuron0_index_shift, "ne", "neurons.json"),
    ("weighting-bogus-ne", None, _json_weighting, "ne", "neurons.json"),
]


def _command(cmd, model, neurons, tmp_path) -> list:
    if cmd == "select":
        return ["select", neurons, "--out", tmp_path / "out"]
    if cmd == "report":
        return ["report", neurons, "--png", tmp_path / "heat.png"]
    return [cmd, model, neurons, "--out", tmp_path / "out"]


@pytest.mark.parametrize("arrays,meta,cmd,match", [c[1:] for c in ARTIFACT_CASES], ids=[c[0] for c in ARTIFACT_CASES])
def test_artifact_with_wrong_numbers_is_refused(arrays, meta, cmd, match, tmp_path, planted, art):
    bad = copy_artifact(art, tmp_path / "bad", arrays=arrays, meta=meta)
    expect_bad(tmp_path, *_command(cmd, planted[0], bad, tmp_path), match=match, unchanged=(bad, planted[0]))


def test_mismatch_message_says_rerun_identify(tmp_path, planted, art):
    bad = copy_artifact(art, tmp_path / "bad", meta=_json_neuron0_index_shift)
    code, _, err = run_cli("bake", planted[0], bad, "--out", tmp_path / "out")
    assert code == 2 and "re-run `coco-tools identify`" in err


def _matrix_values(value):
    def edit(path: Path):
        from vllm_coco.identify.capture import open_matrix

        m = np.array(open_matrix(path))
        m[:, :] = value
        _write_matrix(path, m)
    return edit


def _matrix_as_float32(path: Path):
    from vllm_coco.identify.capture import open_matrix

    _write_matrix(path, np.array(open_matrix(path)).astype(np.float32))


def _write_matrix(path: Path, m: np.ndarray):
    from safetensors.numpy import save_file

    save_file({"intensities": np.ascontiguousarray(m)}, str(path))


# (id, edit of intensities.safetensors). Before: exit 0 with W_hat all zeros (NaN/inf) or off (F32).
MATRIX_CASES = [
    ("nan", _matrix_values(np.nan)),
    ("inf", _matrix_values(np.inf)),
    ("float32-read-as-float16", _matrix_as_float32),
]


@pytest.mark.parametrize("edit", [c[1] for c in MATRIX_CASES], ids=[c[0] for c in MATRIX_CASES])
def test_damaged_intensity_matrix_is_refused_by_ne(edit, tmp_path, planted, art):
    bad = copy_artifact(art, tmp_path / "bad")
    edit(bad / "intensities.safetensors")
    expect_bad(tmp_path, "ne", planted[0], bad, "--out", tmp_path / "out", match="intensities.safetensors",
               unchanged=(bad, planted[0]))


# --------------------------------------------------------------------------- model directories

def _cfg(key, value):
    def edit(c):
        c[key] = value
    return edit


# (id, config edit, command, match). Before: identify ran 31-for-30 layers with a random layer
# (exit 0); heads / hidden size mismatches failed inside transformers.
CONFIG_CASES = [
    ("layers-3-for-2-identify", _cfg("num_hidden_layers", 3), "identify", "num_hidden_layers"),
    ("layers-3-for-2-bake", _cfg("num_hidden_layers", 3), "bake", "num_hidden_layers"),
    ("layers-1-for-2-identify", _cfg("num_hidden_layers", 1), "identify", "num_hidden_layers"),
    ("kv-heads-4-for-2-identify", _cfg("num_key_value_heads", 4), "identify", "config.json"),
    ("heads-with-head_dim-identify", _cfg("head_dim", 32), "identify", "config.json"),
    ("hidden-32-for-64-identify", _cfg("hidden_size", 32), "identify", "config.json"),
]


@pytest.mark.parametrize("config,cmd,match", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_disagreeing_with_the_weights_is_refused(config, cmd, match, tmp_path, planted, art):
    bad = copy_model(planted[0], tmp_path / "model", config=config)
    out = tmp_path / "out"
    args = identify_args(bad, planted[1], out) if cmd == "identify" else [cmd, bad, art, "--out", out, "--force"]
    expect_bad(tmp_path, *args, match=match, unchanged=(bad, art))


def test_extra_bin_file_keeps_the_fingerprint(tmp_path, planted, art):
    """Only the weights that are loaded (*.safetensors) identify a model: a stray *.bin beside them
    must not turn the artifact's model into "another model" (before: exit 2 without --force)."""
    from vllm_coco.core.models import fingerprint

    m = copy_model(planted[0], tmp_path / "model")
    (m / "stray.bin").write_bytes(b"not loaded")
    assert fingerprint(m) == fingerprint(Path(planted[0]))
    code, _, err = run_cli("bake", m, art, "--out", tmp_path / "out")
    assert code == 0, err


# --------------------------------------------------------------------------- identify: temperature

@pytest.mark.parametrize("tau", ["1e300", "1e-300", "5000"])
def test_temperature_out_of_range_is_refused(tau, tmp_path, planted):
    """--tau 1e300 made every similarity 0: every score tied and identify reported success."""
    expect_bad(tmp_path, *identify_args(planted[0], planted[1], tmp_path / "out", "--tau", tau), match="--tau",
               unchanged=(planted[0],))


def test_all_scores_tied_is_refused():
    """The guard after scoring: neurons without any spread in loss cannot be ranked."""
    from vllm_coco.core.errors import CocoError
    from vllm_coco.identify.run import check_scores_rank

    check_scores_rank(np.array([1.0, 2.0, np.inf]), 0.1)
    for loss in (np.full(5, 3.2), np.full(5, np.inf)):
        with pytest.raises(CocoError, match="--tau"):
            check_scores_rank(loss, 0.1)
