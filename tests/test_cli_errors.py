"""Bad input: one line on stderr, exit code 2, nothing written."""

import json
import os
import subprocess
import sys

import pytest
from conftest import expect_bad, run_cli


@pytest.fixture()
def tiny_model(tmp_path_factory):
    import tiny

    return tiny.random_model(tmp_path_factory.mktemp("m") / "model")


def _listing(path):
    return sorted(os.listdir(path))


def _expect_bad(tmp_path, *args, match):
    expect_bad(tmp_path, *args, match=match)


def test_missing_model_dir(tmp_path):
    _expect_bad(tmp_path, "identify", tmp_path / "nope", "--out", tmp_path / "o", match="does not exist")


def test_not_a_model_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    _expect_bad(tmp_path, "identify", d, "--out", tmp_path / "o", match="no config.json")


def test_architecture_without_qkv(tmp_path):
    import tiny
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(d)
    tiny.word_tokenizer(tiny.NEUTRAL).save_pretrained(d)
    _expect_bad(tmp_path, "identify", d, "--out", tmp_path / "o", "--limit", "2", "--categories", "Age",
                match="no self_attn.q_proj/k_proj/v_proj")


def test_unknown_category(tmp_path, tiny_model):
    _expect_bad(tmp_path, "identify", tiny_model, "--out", tmp_path / "o", "--categories", "Age,Martians",
                match="unknown category Martians in BBQ data bbq; valid:")


def test_malformed_contrast_line(tmp_path, tiny_model):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"category": "A", "prompt": "n1", "biased": "b1", "unbiased": "u1"}) + "\n"
                 + '{"category": "A", "prompt": \n')
    _expect_bad(tmp_path, "identify", tiny_model, "--out", tmp_path / "o", "--data", f, match="pairs.jsonl:2:")


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.1"])
def test_ratio_outside_range(tmp_path, tiny_model, ratio):
    _expect_bad(tmp_path, "identify", tiny_model, "--out", tmp_path / "o", "--ratio", ratio,
                match="outside (0, 1]")


def test_empty_selection(tmp_path, planted):
    model, pairs = planted
    _expect_bad(tmp_path, "identify", model, "--out", tmp_path / "o", "--data", pairs, "--split", "all",
                "--threshold", "100", "--quiet", match="no neuron scores at least --threshold 100")


def test_existing_out_needs_force(tmp_path, planted):
    model, pairs = planted
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _expect_bad(tmp_path, "identify", model, "--out", out, "--data", pairs, match="already exists; pass --force")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli("identify", model, "--out", out, "--data", pairs, "--split", "all", "--force",
                           "--quiet", "--null-rounds", "0")
    assert code == 0, err
    assert (out / "neurons.json").is_file() and not (out / "keep.txt").exists()


def test_out_inside_model_dir_is_refused(tmp_path, tiny_model):
    before = _listing(tiny_model)
    code, _, err = run_cli("identify", tiny_model, "--out", tiny_model / "neurons")
    assert code == 2 and "overlaps the input" in err
    assert _listing(tiny_model) == before


def test_interrupted_run_leaves_nothing(tmp_path, planted, monkeypatch):
    """A failure after capture started (here: scoring raises) removes the temp dir."""
    from vllm_coco.identify import run as ident

    model, pairs = planted

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ident, "score_matrix", boom)
    before = _listing(tmp_path)
    code, _, err = run_cli("identify", model, "--out", tmp_path / "o", "--data", pairs, "--split", "all",
                           "--quiet")
    assert code == 130 and "interrupted" in err
    assert _listing(tmp_path) == before


def test_help_is_fast_and_documents_exit_codes():
    out = subprocess.run([sys.executable, "-m", "vllm_coco.cli", "identify", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "Exit codes" in out and "Examples" in out
    code = ("import sys, vllm_coco.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'vllm') if m in sys.modules]; print(heavy)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_generate_rejects_a_malformed_prompts_file_before_starting_an_engine(tmp_path, tiny_model):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hi"}\n{"prompt": 3}\n')
    _expect_bad(tmp_path, "generate", tiny_model, "--prompts", f, "--out", tmp_path / "o.jsonl", match="p.jsonl:2:")
    _expect_bad(tmp_path, "generate", tiny_model, "--prompts", tmp_path / "missing.jsonl", "--out",
                tmp_path / "o.jsonl", match="does not exist")
