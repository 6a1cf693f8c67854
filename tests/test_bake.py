"""`coco-tools bake`: LE-COCO and ablations baked into safetensors, and LE as a PEFT LoRA adapter."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from conftest import expect_bad, run_cli

# ---------------------------------------------------------------------------------------
# helpers

def _digests(d):
    """sha256 of every file under d, by relative path."""
    out = {}
    for root, _, files in os.walk(d):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _tensors(d):
    """{name: numpy array} over every *.safetensors file of d, and {name: file name}."""
    from safetensors import safe_open

    arrays, where = {}, {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), framework="numpy") as fh:
                for k in fh.keys():
                    arrays[k], where[k] = fh.get_tensor(k), f
    return arrays, where


def _file_metadata(d):
    from safetensors import safe_open

    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), framework="numpy") as fh:
                out[f] = fh.metadata()
    return out


def _selected(neurons_dir):
    """[(layer, proj, index, weight)] from neurons.json, and the act_mean of each (global layout)."""
    from safetensors.numpy import load_file

    from vllm_coco.core.models import NeuronLayout

    meta = json.loads((neurons_dir / "neurons.json").read_text())
    arrays = load_file(str(neurons_dir / "neurons.safetensors"))
    m = meta["model"]
    layout = NeuronLayout(m["num_layers"], m["q_size"], m["kv_size"])
    return [(n["layer"], n["proj"], n["index"], n["weight"],
             float(arrays["act_mean"][layout.flat(n["layer"], n["proj"], n["index"])]))
            for n in meta["neurons"]]


def _identify(model, pairs, out, *extra):
    code, _, err = run_cli("identify", model, "--out", out, "--data", pairs, "--split", "all", "--quiet",
                           "--null-rounds", "0", *extra)
    assert code == 0, err
    return out


def _bake(*args):
    code, out, err = run_cli("bake", *args)
    assert code == 0, (out, err)
    return out


def _load(d, cls=None):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = (cls or AutoModelForCausalLM).from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _logits(model, tokenizer, prompts):
    import torch

    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits for p in prompts]


PROMPTS = ["n1 n2 n3 b1 b2", "n7 u3 u4 n9", "n0 n5 b7 u1 n11 n12"]


@pytest.fixture(scope="module")
def art(planted, tmp_path_factory):
    """(model_dir, neurons_dir magnitude, neurons_dir signed): 13 neurons, up to 4 rows per module."""
    model, pairs = planted
    root = tmp_path_factory.mktemp("bake-art")
    mag = _identify(model, pairs, root / "mag", "--ratio", "0.05")
    signed = _identify(model, pairs, root / "signed", "--ratio", "0.05", "--weighting", "signed")
    return model, mag, signed


# ---------------------------------------------------------------------------------------
# LE

def test_le_scales_exactly_the_selected_rows(art, tmp_path):
    model, neurons, _ = art
    before = _digests(model)
    out = tmp_path / "le"
    _bake(model, neurons, "--out", out, "--alpha", "0.5")
    assert _digests(model) == before  # the source is only read

    src, src_where = _tensors(model)
    dst, dst_where = _tensors(out)
    assert dst_where == src_where and set(dst) == set(src)
    assert _file_metadata(out) == _file_metadata(model)  # e.g. {"format": "pt"} kept
    rows = {}
    for layer, proj, index, w, _ in _selected(neurons):
        rows.setdefault(f"model.layers.{layer}.self_attn.{proj}_proj.weight", {})[index] = w
    for name, a in src.items():
        b = dst[name]
        assert b.dtype == a.dtype and b.shape == a.shape
        edited = rows.get(name, {})
        keep = [i for i in range(a.shape[0]) if i not in edited]
        assert a[keep].tobytes() == b[keep].tobytes(), name  # everything else: byte-identical
        for i, w in edited.items():
            np.testing.assert_allclose(b[i], (1 + 0.5 * w) * a[i], rtol=1e-6, atol=0)
            assert not np.array_equal(b[i], a[i])

    # every non-weight file is copied unchanged (the model card is the edit's own); coco_edit.json records provenance
    src_files, dst_files = _digests(model), _digests(out)
    assert set(dst_files) == set(src_files) | {"coco_edit.json", "README.md"}
    for f in src_files:
        if not f.endswith(".safetensors") and f != "README.md":
            assert dst_files[f] == src_files[f], f
    from vllm_coco.core.artifact import artifact_hash
    from vllm_coco.core.models import fingerprint

    rec = json.loads((out / "coco_edit.json").read_text())
    assert rec["method"] == "coco-v1" and rec["mode"] == "le" and rec["settings"] == {"alpha": 0.5}
    assert rec["neurons"] == artifact_hash(neurons) and rec["base_fingerprint"] == fingerprint(model)
    assert rec["count"] == 13 and rec["weighting"] == "magnitude" and rec["tool"].startswith("vllm-coco ")


def test_le_signed_alpha_at_the_limit(art, tmp_path):
    """Signed weights reach -1: alpha 1 gives factor 0 (allowed); the baked row is then zero."""
    model, _, signed = art
    out = tmp_path / "le"
    _bake(model, signed, "--out", out, "--alpha", "1")
    dst, _ = _tensors(out)
    zeroed = [n for n in _selected(signed) if n[3] == -1.0]
    assert zeroed
    for layer, proj, index, *_ in zeroed:
        assert not dst[f"model.layers.{layer}.self_attn.{proj}_proj.weight"][index].any()


# ---------------------------------------------------------------------------------------
# LoRA

def test_lora_merged_equals_baked_checkpoint(art, tmp_path):
    pytest.importorskip("peft")
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    model, neurons, _ = art
    before = _digests(model)
    baked, adapter = tmp_path / "le", tmp_path / "lora"
    _bake(model, neurons, "--out", baked, "--alpha", "0.5")
    _bake(model, neurons, "--out", adapter, "--alpha", "0.5", "--lora")
    assert _digests(model) == before
    assert sorted(os.listdir(adapter)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                          "coco_edit.json"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(model.absolute()) and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == cfg["lora_alpha"] == 4  # (layer 0, q) holds 4 of the 13 neurons: others zero-padded
    rec = json.loads((adapter / "coco_edit.json").read_text())
    assert rec["format"] == "lora" and rec["rank"] == 4 and rec["settings"] == {"alpha": 0.5}

    merged = PeftModel.from_pretrained(_load(model), adapter).merge_and_unload()
    reference = _load(baked)
    ref_state = reference.state_dict()
    for name, tensor in merged.state_dict().items():
        if any(f"{p}_proj.weight" in name for p in "qkv"):
            assert (tensor - ref_state[name]).abs().max().item() <= 1e-5, name
    tok = AutoTokenizer.from_pretrained(model)
    for a, b in zip(_logits(merged, tok, PROMPTS), _logits(reference, tok, PROMPTS)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_lora_of_another_gain_only_kind_equals_its_checkpoint(art, tmp_path):
    """--lora holds any kind without offsets: ablate-zero's B = -E_R (gain 0) merges to zeroed rows."""
    pytest.importorskip("peft")
    from peft import PeftModel

    model, neurons, _ = art
    _bake(model, neurons, "--out", tmp_path / "zero", "--mode", "ablate-zero")
    _bake(model, neurons, "--out", tmp_path / "lora", "--mode", "ablate-zero", "--lora")
    merged = PeftModel.from_pretrained(_load(model), tmp_path / "lora").merge_and_unload().state_dict()
    ref = _load(tmp_path / "zero").state_dict()
    for layer, proj, index, *_ in _selected(neurons):
        name = f"model.layers.{layer}.self_attn.{proj}_proj.weight"
        assert merged[name][index].abs().max().item() <= 1e-6, name
    for name, tensor in merged.items():
        assert (tensor - ref[name]).abs().max().item() <= 1e-6, name


# ---------------------------------------------------------------------------------------
# ablations

def test_ablate_zero_zeroes_rows_and_generates(art, tmp_path):
    import torch
    from transformers import AutoTokenizer

    model, neurons, _ = art
    out = tmp_path / "zero"
    _bake(model, neurons, "--out", out, "--mode", "ablate-zero")
    src, _ = _tensors(model)
    dst, _ = _tensors(out)
    assert set(dst) == set(src)  # no bias to zero on this model: nothing added
    for layer, proj, index, *_ in _selected(neurons):
        assert not dst[f"model.layers.{layer}.self_attn.{proj}_proj.weight"][index].any()
    assert json.loads((out / "coco_edit.json").read_text())["settings"] == {}
    tok = AutoTokenizer.from_pretrained(out)
    m = _load(out)
    with torch.no_grad():
        gen = m.generate(**tok("n1 n2 n3", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == 3 + 4


def test_ablate_mean_outputs_the_calibration_mean(art, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, neurons, _ = art
    out = tmp_path / "mean"
    _bake(model, neurons, "--out", out, "--mode", "ablate-mean")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attention_bias"] is True and json.loads((model / "config.json").read_text())["attention_bias"] is False
    dst, _ = _tensors(out)
    sel = _selected(neurons)
    for layer in range(2):
        for proj in "qkvo":
            bias = dst[f"model.layers.{layer}.self_attn.{proj}_proj.bias"]
            edited = {i: c for l, p, i, _, c in sel if l == layer and p == proj}
            expect = np.zeros_like(bias)
            for i, c in edited.items():
                expect[i] = c
            np.testing.assert_array_equal(bias, expect)  # zero except the ablated channels

    m = _load(out, LlamaForCausalLM)  # every bias present: no missing key, nothing left random
    tok = AutoTokenizer.from_pretrained(out)
    seen = {}
    hooks = []
    for layer, proj, index, _, _c in sel:
        mod = getattr(m.model.layers[layer].self_attn, f"{proj}_proj")

        def hook(module, args, output, key=(layer, proj, index)):
            seen.setdefault(key, []).append(output[0, :, key[2]].clone())  # [tokens]
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for p in PROMPTS:
            m(**tok(p, return_tensors="pt"))
    for h in hooks:
        h.remove()
    for layer, proj, index, _, c in sel:
        outputs = torch.cat(seen[(layer, proj, index)])
        assert torch.all(outputs == torch.tensor(c, dtype=torch.float32)), (layer, proj, index)


# ---------------------------------------------------------------------------------------
# sharded source

@pytest.fixture(scope="module")
def sharded(planted, tmp_path_factory):
    """The planted model saved in several shards with an index, and an artifact for it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, pairs = planted
    root = tmp_path_factory.mktemp("sharded")
    d = root / "model"
    AutoModelForCausalLM.from_pretrained(model).save_pretrained(d, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(model).save_pretrained(d)
    assert (d / "model.safetensors.index.json").is_file()
    return d, _identify(d, pairs, root / "neurons", "--ratio", "0.05")


def test_sharded_le_keeps_shards_and_index(sharded, tmp_path):
    model, neurons = sharded
    out = tmp_path / "le"
    _bake(model, neurons, "--out", out)
    src, src_where = _tensors(model)
    dst, dst_where = _tensors(out)
    assert dst_where == src_where and len(set(src_where.values())) > 2
    assert (out / "model.safetensors.index.json").read_bytes() == (model / "model.safetensors.index.json").read_bytes()
    changed = {k for k in src if src[k].tobytes() != dst[k].tobytes()}
    assert changed == {f"model.layers.{l}.self_attn.{p}_proj.weight" for l, p, *_ in _selected(neurons)}
    _load(out)


def test_sharded_ablate_mean_adds_biases_beside_their_weights(sharded, tmp_path):
    model, neurons = sharded
    out = tmp_path / "mean"
    _bake(model, neurons, "--out", out, "--mode", "ablate-mean")
    dst, where = _tensors(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == where  # every tensor, the new biases included, where the index says
    for name in where:
        if name.endswith("_proj.bias"):
            assert where[name] == where[name[: -len(".bias")] + ".weight"]
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in dst.values())
    _load(out)


# ---------------------------------------------------------------------------------------
# Mistral

@pytest.fixture(scope="module")
def mistral(planted, tmp_path_factory):
    import tiny

    _, pairs = planted
    root = tmp_path_factory.mktemp("mistral")
    model = tiny.random_model(root / "model", arch="mistral")
    return model, _identify(model, pairs, root / "neurons")


def test_mistral_bakes_and_loads(mistral, tmp_path):
    pytest.importorskip("peft")
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, MistralForCausalLM

    model, neurons = mistral
    for args in (("--alpha", "0.5"), ("--mode", "ablate-zero")):
        out = tmp_path / args[-1]
        _bake(model, neurons, "--out", out, *args)
        m = _load(out, MistralForCausalLM)
        with torch.no_grad():
            m.generate(**AutoTokenizer.from_pretrained(out)("n1 n2", return_tensors="pt"), max_new_tokens=2,
                       do_sample=False)
    # 3 neurons: some of the 6 modules get an all-zero adapter pair, which PEFT must still load
    _bake(model, neurons, "--out", tmp_path / "lora", "--alpha", "0.5", "--lora")
    merged = PeftModel.from_pretrained(_load(model, MistralForCausalLM), tmp_path / "lora").merge_and_unload()
    tok = AutoTokenizer.from_pretrained(model)
    for a, b in zip(_logits(merged, tok, PROMPTS), _logits(_load(tmp_path / "0.5"), tok, PROMPTS)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# bad input: one line on stderr, exit 2, nothing written, the source untouched

def _expect_bad(parent, *args, match, sources=()):
    expect_bad(parent, "bake", *args, match=match, unchanged=sources)


def test_not_an_artifact_dir(art, tmp_path):
    model, *_ = art
    (tmp_path / "empty").mkdir()
    _expect_bad(tmp_path, model, tmp_path / "empty", "--out", tmp_path / "o", match="is not a neuron artifact")


def test_fingerprint_mismatch_needs_force(art, tmp_path):
    import tiny

    _, neurons, _ = art
    other = tiny.random_model(tmp_path / "other")  # same layout, other weights
    _expect_bad(tmp_path, other, neurons, "--out", tmp_path / "o", match="does not hold the weights",
                sources=(other,))
    _bake(other, neurons, "--out", tmp_path / "o", "--force")
    rec = json.loads((tmp_path / "o" / "coco_edit.json").read_text())
    assert rec["artifact_model_fingerprint"] != rec["base_fingerprint"]


@pytest.mark.parametrize("alpha", ["-1.5", "1.5"])
def test_alpha_making_a_factor_negative(art, tmp_path, alpha):
    model, mag, signed = art
    # magnitude weights are in [0, 1]: only a negative alpha can flip a sign; signed reach both -1 and +1
    neurons = mag if alpha.startswith("-") else signed
    _expect_bad(tmp_path, model, neurons, "--out", tmp_path / "o", "--alpha", alpha,
                match="makes the edit factor 1 + alpha*w negative", sources=(model,))


def test_existing_out_needs_force(art, tmp_path):
    model, neurons, _ = art
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _expect_bad(tmp_path, model, neurons, "--out", out, match="already exists; pass --force")
    assert (out / "keep.txt").read_text() == "mine"
    _bake(model, neurons, "--out", out, "--force")
    assert (out / "coco_edit.json").is_file() and not (out / "keep.txt").exists()


def test_out_is_the_source(art, tmp_path):
    model, neurons, _ = art
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    for out in (copy, copy / "edited", neurons):
        _expect_bad(tmp_path, copy, neurons, "--out", out, "--force", match="overlaps the input",
                    sources=(copy, neurons))


def test_layout_mismatch(art, tmp_path):
    import tiny

    _, neurons, _ = art
    other = tiny.random_model(tmp_path / "deeper", layers=3)
    _expect_bad(tmp_path, other, neurons, "--out", tmp_path / "o", "--force", match="was made for a model with")


@pytest.mark.parametrize("args, match", [
    (("--mode", "ablate-mean", "--lora"), "--lora holds gain-only edits"),
    (("--mode", "ablate-mean", "--alpha", "2"), "--alpha does not apply to --mode ablate-mean"),
    (("--mode", "le", "--param", "beta=2"), "--beta does not apply to --mode le (it takes alpha)"),
    (("--mode", "scale"), "'scale' is not one of 'le', 'ablate-zero', 'ablate-mean'"),
])
def test_option_conflicts(art, tmp_path, args, match):
    model, neurons, _ = art
    _expect_bad(tmp_path, model, neurons, "--out", tmp_path / "o", *args, match=match)


def test_ablate_mean_on_mistral_is_refused(mistral, tmp_path):
    model, neurons = mistral
    _expect_bad(tmp_path, model, neurons, "--out", tmp_path / "o", "--mode", "ablate-mean",
                match="needs q/k/v biases")


def test_help_documents_exit_codes():
    code, out, _ = run_cli("bake", "--help")
    assert code == 0 and "Exit codes" in out and "Examples" in out and "--lora" in out
