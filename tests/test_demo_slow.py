"""End-to-end on the real SmolLM2-135M-Instruct demo model and the packaged BBQ (slow)."""

import json

import pytest
import torch
from conftest import run_cli

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox jumps over the lazy dog because"


def _logits(model_dir):
    from vllm_coco.core.models import load_model

    model, tok = load_model(model_dir)
    with torch.no_grad():
        return model(**tok(PROMPT, return_tensors="pt")).logits[0]


def test_demo_model_matches_the_gguf_and_its_mistral_twin(demo_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_coco.data.demo_model import smollm2_gguf

    cfg = json.loads((demo_model / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 30
    from vllm_coco.edit.model_card import base_card

    assert base_card(demo_model) == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0",
                                     "language": "en"}  # its card, which its edits' cards carry on
    tok = AutoTokenizer.from_pretrained(demo_model)
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ours = _logits(demo_model)
    g = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    with torch.no_grad():
        want = ref(**tok(PROMPT, return_tensors="pt")).logits[0]
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-4)

    code, _, err = run_cli("demo-model", tmp_path / "mistral", "--arch", "mistral")
    assert code == 0, err
    mcfg = json.loads((tmp_path / "mistral" / "config.json").read_text())
    assert mcfg["architectures"] == ["MistralForCausalLM"] and mcfg["sliding_window"] is None
    torch.testing.assert_close(_logits(tmp_path / "mistral"), ours, rtol=0, atol=1e-4)


def test_identify_on_the_demo_model(demo_model, tmp_path):
    out = tmp_path / "neurons"
    code, stdout, err = run_cli("identify", demo_model, "--out", out, "--limit", "6",
                                "--categories", "Age,SES,Religion", "--null-rounds", "1", "--quiet")
    assert code == 0, err
    meta = json.loads((out / "neurons.json").read_text())
    total = 30 * (576 + 2 * 192)
    assert meta["model"]["num_neurons"] == total
    assert meta["selection"]["count"] == len(meta["neurons"]) == round(0.01 * total)
    assert meta["categories"] == ["Age", "SES", "Religion"]
    assert all(meta["per_category"][c]["count"] == round(0.01 * total) for c in meta["categories"])
    assert meta["data"]["pairs"] == 18 and meta["data"]["kind"] == "bbq"
    for n in meta["neurons"]:
        assert 0 <= n["layer"] < 30 and n["proj"] in "qkv" and 0 <= n["weight"] <= 1
    scores = [n["score"] for n in meta["neurons"]]
    assert scores[0] == max(scores)

    code, text, err = run_cli("report", out)
    assert code == 0, err
    assert "share" in text and (out / "heatmap.png").stat().st_size > 1000
    rows = [l for l in text.splitlines() if l.split()[:1] and l.split()[0].isdigit()]
    assert len(rows) == 30
    assert sum(int(r.split()[-1]) for r in rows) == round(0.01 * total)
