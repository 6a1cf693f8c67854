"""Ground truth: identify must recover neurons planted in a tiny model; baselines behave as defined."""

import json

import numpy as np
import pytest
import tiny
from conftest import run_cli
from safetensors.numpy import load_file


def _identify(planted, out, *extra):
    model, pairs = planted
    code, stdout, stderr = run_cli("identify", model, "--out", out, "--data", pairs, "--split", "all",
                                   "--quiet", *extra)
    assert code == 0, stderr
    return json.loads((out / "neurons.json").read_text()), load_file(str(out / "neurons.safetensors"))


def _addr(n):
    return (n["layer"], n["proj"], n["index"])


@pytest.fixture(scope="module")
def coco(planted, tmp_path_factory):
    return _identify(planted, tmp_path_factory.mktemp("coco") / "n", "--ratio", "0.02")


def test_coco_ranks_planted_neurons_first(coco):
    meta, arrays = coco
    top = [_addr(n) for n in meta["neurons"]]
    assert set(top[:2]) == set(tiny.PLANTED)
    assert tiny.HUGE not in top
    for cat in meta["categories"]:  # and in every category on its own
        assert {_addr(n) for n in meta["per_category"][cat]["neurons"][:2]} == set(tiny.PLANTED)
    # the planted neurons fire more on biased responses: direction < 0
    assert all(n["direction"] < 0 for n in meta["neurons"][:2])


def test_partial_neuron_ranks_below_planted_and_above_noise(coco):
    meta, arrays = coco
    flat = {(int(l), "qkv"[p], int(i)): f for f, (l, p, i) in
            enumerate(zip(arrays["layer"], arrays["proj"], arrays["index"]))}
    loss = arrays["loss"]
    order = np.argsort(loss)
    rank = {f: r for r, f in enumerate(order)}
    partial = rank[flat[tiny.PARTIAL]]
    assert partial >= 2
    assert partial < 10, "the partially reacting neuron still has more contrast than random neurons"
    assert rank[flat[tiny.HUGE]] > len(loss) // 4


def test_artifact_layout(coco):
    meta, arrays = coco
    n = meta["model"]["num_neurons"]
    assert n == 2 * (64 + 32 + 32)
    assert meta["method"] == "coco-v1" and meta["model"]["fingerprint"].startswith("sha256:")
    assert meta["selection"]["count"] == round(0.02 * n) == len(meta["neurons"])
    for key in ("score", "loss", "direction", "calib_mean", "calib_std", "mean_intensity", "weight_norm"):
        assert arrays[key].shape == (n,), key
    for cat in meta["categories"]:
        assert arrays[f"score.{cat}"].shape == (n,)
    w = [x["weight"] for x in meta["neurons"]]
    assert max(w) == 1.0 and min(w) >= 0
    assert meta["significance"]["beat_null"] >= 2
    # neurons are best first
    losses = [x["loss"] for x in meta["neurons"]]
    assert losses == sorted(losses)
    # scores are consistent: combined = mean over categories
    np.testing.assert_allclose(arrays["score"], np.mean([arrays[f"score.{c}"] for c in meta["categories"]], 0))


def test_mact_picks_the_huge_neuron(planted, tmp_path):
    meta, _ = _identify(planted, tmp_path / "mact", "--ratio", "0.02", "--baseline", "mact")
    assert _addr(meta["neurons"][0]) == tiny.HUGE
    assert meta["selection"]["baseline"] == "mact" and len(meta["neurons"]) == round(0.02 * 256)


def test_norm_picks_the_largest_weight_row(planted, tmp_path):
    meta, _ = _identify(planted, tmp_path / "norm", "--ratio", "0.01", "--baseline", "norm")
    assert _addr(meta["neurons"][0]) == tiny.HUGE  # its weight row has norm 5, every other row far less


def test_rand_depends_only_on_seed(planted, coco, tmp_path):
    a, _ = _identify(planted, tmp_path / "r1", "--ratio", "0.02", "--baseline", "rand", "--null-rounds", "0")
    b, _ = _identify(planted, tmp_path / "r2", "--ratio", "0.02", "--baseline", "rand", "--null-rounds", "0")
    c, _ = _identify(planted, tmp_path / "r3", "--ratio", "0.02", "--baseline", "rand", "--null-rounds", "0",
                     "--seed", "7")
    sets = [[_addr(n) for n in m["neurons"]] for m in (a, b, c)]
    assert sets[0] == sets[1]
    assert set(sets[0]) != set(sets[2])
    coco_meta = coco[0]
    assert a["selection"]["by_proj"] == c["selection"]["by_proj"] == coco_meta["selection"]["by_proj"]


def test_threshold_selection(planted, coco, tmp_path):
    meta, _ = coco
    thr = (meta["neurons"][1]["score"] + meta["neurons"][2]["score"]) / 2
    m, _ = _identify(planted, tmp_path / "t", "--threshold", str(thr))
    assert {_addr(n) for n in m["neurons"]} == set(tiny.PLANTED)
    assert m["selection"]["rule"] == "threshold"


def test_capture_matches_a_direct_forward(planted, tmp_path):
    """Intensities in the matrix equal |q_proj output| averaged over the response tokens, computed by hand."""
    import torch

    from vllm_coco.core.models import load_model
    from vllm_coco.data.contrast import load_contrast
    from vllm_coco.identify.capture import capture, open_matrix, response_spans

    model_dir, pairs_path = planted
    pairs, _ = load_contrast(str(pairs_path), split="all", limit=3)
    model, tok = load_model(model_dir)
    spans = response_spans(tok, pairs[:3])
    res = capture(model, spans, tmp_path / "m.safetensors", batch_size=4, pad_id=tok.pad_token_id, progress=False)
    mat = np.asarray(open_matrix(tmp_path / "m.safetensors"), dtype=np.float32)
    layer = 1
    attn = model.model.layers[layer].self_attn
    tokens = []  # every response token's v_proj output: the calibration set
    for row, span in enumerate(spans):
        seen = {}
        h = attn.v_proj.register_forward_hook(lambda m, a, o, seen=seen: seen.__setitem__("v", o))
        with torch.no_grad():
            model(input_ids=torch.tensor([span.ids]))
        h.remove()
        ref = seen["v"][0, span.start:span.end].abs().mean(0).numpy()  # [kv_size]
        tokens.append(seen["v"][0, span.start:span.end].numpy())
        off = res.layout.flat(layer, "v", 0)
        np.testing.assert_allclose(mat[row, off:off + 32], ref, rtol=2e-3, atol=1e-4)  # float16 storage
    h = np.concatenate(tokens).astype(np.float64)  # [calibration tokens, kv_size]
    sl = slice(off, off + 32)
    np.testing.assert_allclose(res.calib_mean[sl], np.abs(h).mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.calib_std[sl], np.abs(h).std(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.act_mean[sl], h.mean(0), rtol=1e-5, atol=1e-7)
    assert res.span_tokens == len(h)


def test_select_reproduces_identify_without_the_model(planted, coco, tmp_path):
    """Re-selecting from a stored artifact equals running identify with that selection."""
    src = tmp_path / "src"
    _identify(planted, src, "--ratio", "0.02")
    for baseline in ("rand", "mact", "norm"):
        direct, _ = _identify(planted, tmp_path / f"id-{baseline}", "--ratio", "0.02", "--baseline", baseline)
        code, _, err = run_cli("select", src, "--out", tmp_path / f"sel-{baseline}", "--baseline", baseline)
        assert code == 0, err
        derived = json.loads((tmp_path / f"sel-{baseline}" / "neurons.json").read_text())
        for key in ("neurons", "per_category", "selection", "significance"):
            assert derived[key] == direct[key], (baseline, key)
        assert (tmp_path / f"sel-{baseline}" / "intensities.safetensors").is_file()
    code, _, err = run_cli("select", src, "--out", tmp_path / "t", "--threshold", "100")
    assert code == 2 and "no neuron scores at least" in err and not (tmp_path / "t").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_identify_on_cuda_equals_cpu(coco, planted, tmp_path):
    """`identify --device cuda` (capture and COCO scoring on the GPU) gives the CPU run's artifact:
    the same selected neurons in the same order, losses and statistics within float tolerance."""
    meta, arrays = coco
    meta_gpu, arrays_gpu = _identify(planted, tmp_path / "n", "--ratio", "0.02", "--device", "cuda")
    assert [_addr(n) for n in meta_gpu["neurons"]] == [_addr(n) for n in meta["neurons"]]
    for key in ("loss", "calib_mean", "calib_std", "act_mean", "mean_intensity"):
        finite = np.isfinite(arrays[key])
        assert np.array_equal(finite, np.isfinite(arrays_gpu[key])), key
        np.testing.assert_allclose(arrays_gpu[key][finite], arrays[key][finite], rtol=1e-4, atol=1e-5, err_msg=key)
