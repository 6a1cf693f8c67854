"""NE-COCO: the gate formula, its bounds, the exported directory and the Hugging Face reference."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.numpy import load_file

from vllm_coco.edit import gate


def direct_gain(h, mu, sigma, w, w_hat, alpha, beta, lam):
    """docs/METHOD.md §7.3's formula, token by token and channel by channel."""
    h, mu, sigma, w, w_hat = (np.asarray(t, dtype=np.float64) for t in (h, mu, sigma, w, w_hat))
    out = np.empty_like(h)
    for t in range(h.shape[0]):
        z = (np.abs(h[t]) - mu) / sigma
        e = np.sign(w) * z
        for i in range(h.shape[1]):
            m = (1 - lam) * e[i] + lam * sum(w_hat[i, j] * e[j] for j in range(h.shape[1]))
            out[t, i] = 1 + alpha * w[i] / (1 + np.exp(-beta * m))
    return out


def _random_gate(s=6, tokens=9, seed=0, signed=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, s, generator=g) * 2
    mu, sigma = torch.rand(s, generator=g), torch.rand(s, generator=g) + 0.5
    w = torch.rand(s, generator=g) * 2 - 1 if signed else torch.rand(s, generator=g)
    w_hat = torch.rand(s, s, generator=g)
    w_hat.fill_diagonal_(0)
    w_hat /= w_hat.sum(1, keepdim=True)
    return h, mu, sigma, w, w_hat


@pytest.mark.parametrize("alpha,beta,lam", [(1.0, 2.0, 0.5), (0.5, 4.0, 0.0), (0.8, 1.0, 1.0)])
def test_gain_equals_direct_formula(alpha, beta, lam):
    h, mu, sigma, w, w_hat = _random_gate()
    got = gate.ne_gain(h, mu, sigma, w, w_hat, alpha, beta, lam).double().numpy()
    np.testing.assert_allclose(got, direct_gain(h, mu, sigma, w, w_hat, alpha, beta, lam), rtol=1e-6)


def test_gain_bounds_and_per_token_alpha():
    h, mu, sigma, w, w_hat = _random_gate(tokens=50)
    alpha = 0.7
    g = gate.ne_gain(h * 10, mu, sigma, w, w_hat, alpha, 2.0, 0.5)
    assert torch.all(g > 1 - alpha * w.abs() - 1e-6) and torch.all(g < 1 + alpha * w.abs() + 1e-6)
    per_tok = torch.full((50, 1), alpha)
    per_tok[::2] = 0.0  # per-request strength: rows with 0 are untouched
    g2 = gate.ne_gain(h, mu, sigma, w, w_hat, per_tok, 2.0, 0.5)
    assert torch.all(g2[::2] == 1.0)
    torch.testing.assert_close(g2[1::2], gate.ne_gain(h, mu, sigma, w, w_hat, alpha, 2.0, 0.5)[1::2])


def test_gain_is_monotone_in_engagement():
    _, mu, sigma, w, w_hat = _random_gate(signed=False)
    w_hat = torch.zeros_like(w_hat)  # lam only scales m: isolate monotonicity in m
    levels = torch.linspace(0, 5, 30)[:, None].expand(30, 6)
    g = gate.ne_gain(levels, mu, sigma, w, w_hat, 1.0, 2.0, 0.5)
    assert torch.all(g[1:] >= g[:-1])  # larger |h| -> more engaged -> larger gain (w >= 0)


def test_apply_gate_scales_only_selected_channels_and_alpha_zero_is_identity():
    x = torch.randn(2, 5, 12)  # [batch, tokens, q+2kv]
    ch = torch.tensor([1, 7, 10])
    _, mu, sigma, w, w_hat = _random_gate(s=3)
    y = gate.apply_gate(x, ch, mu, sigma, w, w_hat, 1.0, 2.0, 0.5)
    others = [i for i in range(12) if i not in (1, 7, 10)]
    assert torch.equal(y[..., others], x[..., others])
    gain = gate.ne_gain(x.reshape(-1, 12)[:, ch], mu, sigma, w, w_hat, 1.0, 2.0, 0.5).reshape(2, 5, 3)
    torch.testing.assert_close(y[..., ch], x[..., ch] * gain)
    assert torch.equal(gate.apply_gate(x, ch, mu, sigma, w, w_hat, 0.0, 2.0, 0.5), x)


def test_gate_traces_under_torch_compile():
    x = torch.randn(7, 12)
    ch = torch.tensor([0, 5, 11])
    _, mu, sigma, w, w_hat = _random_gate(s=3)
    fn = torch.compile(gate.apply_gate, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, ch, mu, sigma, w, w_hat, 1.0, 2.0, 0.5),
                               gate.apply_gate(x, ch, mu, sigma, w, w_hat, 1.0, 2.0, 0.5))


# --------------------------------------------------------------------------- NE directories

@pytest.fixture(scope="module")
def artifact_dir(planted, tmp_path_factory):
    model, pairs = planted
    out = tmp_path_factory.mktemp("ne") / "neurons"
    code, _, err = run_cli("identify", model, "--out", out, "--data", pairs, "--split", "all", "--quiet",
                           "--null-rounds", "0", "--ratio", "0.05")
    assert code == 0, err
    return out


def _ne(planted, artifact_dir, out, *extra):
    code, _, err = run_cli("ne", planted[0], artifact_dir, "--out", out, *extra)
    assert code == 0, err
    return out


def test_ne_directory_layout(planted, artifact_dir, tmp_path):
    from vllm_coco.edit import ne_gate

    out = _ne(planted, artifact_dir, tmp_path / "ne")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["CocoLlamaForCausalLM"] and cfg["model_type"] == "coco_llama"
    coco = cfg["coco"]
    assert (coco["alpha"], coco["beta"], coco["lam"]) == (1.0, 2.0, 0.5)
    gate_t = load_file(str(out / "coco_gate.safetensors"))
    assert all(".q_proj" not in k and ".v_proj" not in k for k in gate_t)
    n_qv = 2 * (64 + 32)
    assert coco["count"] == round(0.05 * n_qv) == sum(len(c) for c in coco["channels"])
    _, arrays = __import__("vllm_coco.core.artifact", fromlist=["load"]).load(artifact_dir)
    sel = ne_gate.select_ne(arrays, 0.05)
    assert np.all(arrays["proj"][sel] != 1)  # q and v only
    d = np.abs(arrays["direction"][arrays["proj"] != 1])
    assert np.isclose(np.sort(d)[::-1][len(sel) - 1], np.abs(arrays["direction"][sel]).min())
    for layer, chans in enumerate(coco["channels"]):
        n = len(chans)
        if n:
            wh = gate_t[f"model.layers.{layer}.self_attn.coco_gate.w_hat"]
            assert wh.shape == (n, n) and np.all(np.diag(wh) == 0)
            assert np.allclose(wh.sum(1)[wh.sum(1) > 0], 1)
            ch = gate_t[f"model.layers.{layer}.self_attn.coco_gate.channels"]
            assert ch.tolist() == chans
            assert np.all(np.diff(ch) > 0) and np.all(ch < 128) and not np.any((ch >= 64) & (ch < 96))
    # base weights byte-identical
    assert (out / "model.safetensors").read_bytes() == (planted[0] / "model.safetensors").read_bytes()


def test_w_hat_matches_numpy_corrcoef():
    from vllm_coco.edit.ne_gate import w_hat_of

    x = np.random.default_rng(0).random((40, 5))
    r = np.abs(np.corrcoef(x.T))
    np.fill_diagonal(r, 0)
    np.testing.assert_allclose(w_hat_of(x), r / r.sum(1, keepdims=True), rtol=1e-10)


def _logits(model, tok, text="n1 n2 n3 b1 b2 u3"):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def test_hf_reference_alpha_zero_is_the_base_model_and_alpha_changes_it(planted, artifact_dir, tmp_path):
    from vllm_coco.core.models import load_model
    from vllm_coco.serve.hf_reference import load_ne_model

    base, tok = load_model(planted[0])
    ne0 = _ne(planted, artifact_dir, tmp_path / "ne0", "--alpha", "0")
    m0, _ = load_ne_model(ne0)
    assert torch.equal(_logits(m0, tok), _logits(base, tok))
    m1, _ = load_ne_model(_ne(planted, artifact_dir, tmp_path / "ne1", "--alpha", "2"))
    assert not torch.allclose(_logits(m1, tok), _logits(base, tok), atol=1e-4)
    m1b, _ = load_ne_model(tmp_path / "ne1", alpha=0.0)  # runtime override
    assert torch.equal(_logits(m1b, tok), _logits(base, tok))


def test_hf_reference_equals_manual_gating(planted, artifact_dir, tmp_path):
    """The wrapped attention equals the base model with the gate applied by hand on q and v."""
    from vllm_coco.core.models import load_model
    from vllm_coco.serve.hf_reference import load_ne_model

    out = _ne(planted, artifact_dir, tmp_path / "ne", "--alpha", "1.5")
    ne_model, tok = load_ne_model(out)
    base, _ = load_model(planted[0])
    coco = json.loads((out / "config.json").read_text())["coco"]
    t = load_file(str(out / "coco_gate.safetensors"))
    handles = []
    for layer, chans in enumerate(coco["channels"]):
        if not chans:
            continue
        g = {k: torch.from_numpy(t[f"model.layers.{layer}.self_attn.coco_gate.{k}"]) for k in
             ("channels", "mu", "sigma", "w", "w_hat")}
        attn = base.model.layers[layer].self_attn
        state = {}

        def pre(mod, args, kwargs, attn=attn, g=g, state=state):
            x = kwargs.get("hidden_states", args[0] if args else None)
            lin = [torch.nn.functional.linear(x, getattr(attn, f"{p}_proj").weight) for p in "qkv"]  # no hooks
            qkv = torch.cat(lin, -1)
            gain = direct_gain(qkv.reshape(-1, qkv.shape[-1])[:, g["channels"]].detach().numpy(), g["mu"], g["sigma"],
                               g["w"], g["w_hat"], 1.5, coco["beta"], coco["lam"])
            state["gain"] = torch.from_numpy(gain).float().reshape(*qkv.shape[:-1], -1)

        def proj_hook(name, offset, attn=attn, g=g, state=state):
            def hook(mod, args, out):
                out = out.clone()
                for col, ch in enumerate(g["channels"].tolist()):
                    if offset <= ch < offset + out.shape[-1]:
                        out[..., ch - offset] *= state["gain"][..., col]
                return out
            return hook

        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(attn.q_proj.register_forward_hook(proj_hook("q", 0)))
        handles.append(attn.v_proj.register_forward_hook(proj_hook("v", 96)))
    want = _logits(base, tok)
    for h in handles:
        h.remove()
    torch.testing.assert_close(_logits(ne_model, tok), want, rtol=1e-5, atol=1e-5)


def test_plain_automodel_refuses_an_ne_directory(planted, artifact_dir, tmp_path):
    out = _ne(planted, artifact_dir, tmp_path / "ne")
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(out)!r})"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert plain.returncode != 0 and "coco_llama" in plain.stderr
    with_ours = subprocess.run([sys.executable, "-c", "import vllm_coco.serve.hf_configs as c; c.register(); " + code],
                               capture_output=True, text=True)
    assert with_ours.returncode != 0 and "vllm_coco.serve.hf_reference.load_ne_model" in with_ours.stderr


def test_ne_bad_inputs(planted, artifact_dir, tmp_path):
    import tiny

    other = tiny.random_model(tmp_path / "other", seed=5)
    for args, match in [
        ((other, artifact_dir, "--out", tmp_path / "o"), "does not hold the weights"),
        ((planted[0], artifact_dir, "--out", tmp_path / "o", "--lam", "2"), "--lam 2.0 is outside"),
        ((planted[0], artifact_dir, "--out", tmp_path / "o", "--alpha", "-3"), "can make a gate factor"),
        ((planted[0], tmp_path, "--out", tmp_path / "o"), "is not a neuron artifact"),
        ((planted[0], artifact_dir, "--out", planted[0]), "overlaps the input"),
    ]:
        before = sorted(p.name for p in tmp_path.iterdir())
        code, _, err = run_cli("ne", *args)
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, (args, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
