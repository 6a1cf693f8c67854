"""The steering-vector baseline (docs/METHOD.md §1.4, §5.4, §6.5): identify's signed mean differences
equal a hand computation on an independent forward, `--baseline diffmean` picks the planted layer's
v channels, and the `steer` kind adds exactly alpha times the mean difference.

(Baked == in-memory == NE named edit for `steer` is tests/test_conditions.py's MODES.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from conftest import run_cli

from vllm_coco.core import artifact
from vllm_coco.core.models import NeuronLayout
from vllm_coco.identify import selection


def _qkv_by_hand(model, ids: list[int]) -> torch.Tensor:
    """Every q/k/v output of one sequence in the global neuron order (layer-major, [q | k | v]),
    from the decoder's hidden states and each layer's own norm and projections (no hooks). -> [T, N]"""
    with torch.no_grad():
        hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states  # inputs of each layer
        cols = []
        for layer, block in enumerate(model.model.layers):
            x = block.input_layernorm(hs[layer][0])  # [T, hidden]
            cols += [getattr(block.self_attn, f"{p}_proj")(x) for p in "qkv"]  # [T, q_size], [T, kv], [T, kv]
        return torch.cat(cols, dim=-1).double()


def test_mean_diff_is_the_unbiased_minus_biased_mean_of_h(planted, planted_neurons):
    """arrays["mean_diff"] = mean over categories of (mean over unbiased rows - mean over biased rows)
    of each row's mean h over its response tokens; per category likewise (docs/METHOD.md §1.4)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_coco.data.contrast import encode_example

    model_dir, pairs_file = planted
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in Path(pairs_file).read_text().splitlines()]
    per_cat: dict[str, list[torch.Tensor]] = {}
    for r in rows:
        sides = []
        for response in (r["unbiased"], r["biased"]):
            ids, start = encode_example(tok, r["prompt"], response, chat=False)
            sides.append(_qkv_by_hand(model, ids)[start:].mean(0))  # [N]
        per_cat.setdefault(r["category"], []).append(sides[0] - sides[1])  # paired: same counts per side
    meta, arrays = artifact.load(planted_neurons)
    expect = {c: torch.stack(d).mean(0).numpy() for c, d in per_cat.items()}
    scale = max(np.abs(e).max() for e in expect.values())
    assert scale > 1.0  # the planted neurons differ by ~3 per unit weight: a real signal to match
    for c, e in expect.items():
        assert np.abs(arrays[f"mean_diff.{c}"] - e).max() <= 1e-5 * scale, c
    combined = np.mean(list(expect.values()), axis=0)
    assert np.abs(arrays["mean_diff"] - combined).max() <= 1e-5 * scale
    # the planted neurons' biased words carry dimension 0: they are more active on the biased side
    layout = NeuronLayout(meta["model"]["num_layers"], meta["model"]["q_size"], meta["model"]["kv_size"])
    planted_v = layout.flat(1, "v", 5)
    assert abs(arrays["mean_diff"][planted_v]) >= np.quantile(np.abs(arrays["mean_diff"]), 0.95)


def _arrays(num_layers=4, q=8, kv=4, diff_layer=2, seed=0) -> dict[str, np.ndarray]:
    """Per-neuron arrays where one layer's v channels carry the largest mean difference relative to
    their activations (and another layer has a larger raw difference on larger activations)."""
    layout = NeuronLayout(num_layers, q, kv)
    la = layout.arrays()
    rng = np.random.default_rng(seed)
    diff = rng.normal(0, 0.01, layout.total)
    calib = np.ones(layout.total)
    v_of = lambda layer: (la["layer"] == layer) & (la["proj"] == 2)  # noqa: E731
    diff[v_of(diff_layer)] += 0.5  # ratio ~0.5
    diff[v_of(0)] += 2.0
    calib[v_of(0)] = 10.0  # larger raw difference, but ratio ~0.2
    diff[(la["layer"] == 1) & (la["proj"] == 0)] += 5.0  # a q difference: not the steering site
    return {"layer": la["layer"], "proj": la["proj"], "mean_diff": diff.astype(np.float32),
            "calib_mean": calib.astype(np.float32)}


def test_diffmean_picks_the_layer_with_the_largest_relative_difference():
    arrays = _arrays()
    sel = selection.baseline("diffmean", np.arange(3), arrays, seed=0)
    want = np.flatnonzero((arrays["layer"] == 2) & (arrays["proj"] == 2))
    assert sel.tolist() == want.tolist()  # all 4 v channels of layer 2, whatever the COCO count
    moved = _arrays(diff_layer=3)
    assert selection.baseline("diffmean", np.arange(3), moved, seed=0).tolist() == \
        np.flatnonzero((moved["layer"] == 3) & (moved["proj"] == 2)).tolist()


def test_select_diffmean_then_steer_adds_alpha_times_the_difference(planted, planted_neurons, tmp_path):
    """`coco-tools select --baseline diffmean` writes one layer's v channels; `steer` at alpha 2 gives
    each of them the offset 2 * mean_diff and gain 1 (the tables every executor runs)."""
    from vllm_coco.edit.conditions import linear_edit

    out = tmp_path / "diffmean"
    code, _, err = run_cli("select", planted_neurons, "--out", out, "--baseline", "diffmean")
    assert code == 0, err
    meta, arrays = artifact.load(out)
    layers = {n["layer"] for n in meta["neurons"]}
    assert len(layers) == 1 and {n["proj"] for n in meta["neurons"]} == {"v"}
    assert len(meta["neurons"]) == meta["model"]["kv_size"]
    edit = linear_edit(out, "steer", alpha=2.0, model_dir=planted[0])
    (layer,) = layers
    q, kv = meta["model"]["q_size"], meta["model"]["kv_size"]
    assert sorted(edit.channels) == [layer]
    rows = edit.channels[layer] - (q + kv)  # packed [q | k | v] -> v channel
    flat = [NeuronLayout(meta["model"]["num_layers"], q, kv).flat(layer, "v", int(j)) for j in rows]
    np.testing.assert_allclose(edit.offset[layer], 2.0 * arrays["mean_diff"][flat].astype(np.float64), rtol=0,
                               atol=1e-12)
    np.testing.assert_array_equal(edit.gain[layer], 1.0)
    assert np.abs(edit.offset[layer]).max() > 0.1  # a real offset: the comparison can fail


def test_steer_refuses_an_artifact_without_mean_differences(planted, planted_neurons, tmp_path):
    """An artifact written before signed mean differences existed: one line naming the fix, exit 2."""
    import shutil

    from safetensors.numpy import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(planted_neurons, old)
    arrays = {k: v for k, v in load_file(str(old / artifact.ARRAYS_NAME)).items() if not k.startswith("mean_diff")}
    save_file(arrays, str(old / artifact.ARRAYS_NAME), metadata={"method": "coco-v1"})
    code, _, err = run_cli("bake", planted[0], old, "--mode", "steer", "--out", tmp_path / "o")
    assert code == 2 and "mean_diff" in err and "re-run `coco-tools identify`" in err
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli("select", old, "--out", tmp_path / "s", "--baseline", "diffmean")
    assert code == 2 and "re-run `coco-tools identify`" in err


def test_which_architectures_can_hold_the_steering_offset_as_a_checkpoint(tmp_path):
    """A kind that shifts outputs (steer, ablate-mean) bakes into a Llama (attention_bias switched on)
    and into a model whose config has attention biases, not into a bias-free Mistral: the experiment
    then runs it in memory only, or skips that arm when it must write checkpoints (vLLM backend)."""
    import tiny

    from vllm_coco.experiment.edits import checkpointable

    llama = tiny.random_model(tmp_path / "llama")
    mistral = tiny.random_model(tmp_path / "mistral", arch="mistral")
    for kind in ("steer", "ablate-mean"):
        assert checkpointable(llama, kind) and not checkpointable(mistral, kind)
    for kind in ("le", "ablate-zero", "ne"):
        assert checkpointable(mistral, kind)
    cfg = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    assert checkpointable(mistral, "steer")
