"""Every directory `coco-tools bake` / `ne` writes carries a README.md model card (edit/model_card.py)."""

from __future__ import annotations

import json

import yaml
from conftest import run_cli


def _card(d):
    text = (d / "README.md").read_text()
    assert text.startswith("---\n"), text[:80]
    _, head, body = text.split("---\n", 2)
    return yaml.safe_load(head), body


def test_bake_lora_and_ne_cards_parse_and_name_the_base(planted, planted_neurons, tmp_path):
    model, neurons = planted[0], planted_neurons
    runs = {"le": ("bake", "--mode", "le", "--alpha", "0.5"), "lora": ("bake", "--lora", "--alpha", "0.5"),
            "ne": ("ne", "--alpha", "2")}
    formats = {"le": "transformers", "lora": "peft", "ne": "vllm"}
    neurons_hash = json.loads((neurons / "neurons.json").read_text())  # the artifact the card points at
    for name, (cmd, *opts) in runs.items():
        code, _, err = run_cli(cmd, model, neurons, "--out", tmp_path / name, *opts)
        assert code == 0, err
        meta, body = _card(tmp_path / name)
        assert meta["base_model"] == str(model) and meta["library_name"] == formats[name]
        assert "vllm-coco" in meta["tags"] and ("ne" if name == "ne" else "le") in meta["tags"]
        assert f"{neurons_hash['selection']['count']} q/k/v neurons" in body
        assert "alpha=0.5" in body or "alpha=2" in body
        assert "No evaluation is recorded" in body


def test_card_carries_the_base_license_and_replaces_its_readme(planted, planted_neurons, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(planted[0], base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/original\nlanguage: en\n---\n"
                                    "# The original card\n")
    code, _, err = run_cli("ne", base, planted_neurons, "--out", tmp_path / "ne", "--force")
    assert code == 0, err
    meta, body = _card(tmp_path / "ne")
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "org/original" and meta["language"] == "en"
    assert "The original card" not in body  # the base model's own card is not copied over this one


def test_verdicts_replace_the_evaluation_section(planted, planted_neurons, tmp_path):
    from vllm_coco.edit import model_card

    code, _, err = run_cli("bake", planted[0], planted_neurons, "--out", tmp_path / "le")
    assert code == 0, err
    row = ["LE-COCO reduces BBQ bias", "**inconclusive**", "abs_bias_ambig: -0.010 [-0.05, +0.03]"]
    model_card.with_verdicts(tmp_path / "le" / "README.md", [row])
    meta, body = _card(tmp_path / "le")
    assert meta["library_name"] == "transformers" and "No evaluation is recorded" not in body
    assert "| LE-COCO reduces BBQ bias | **inconclusive** | abs_bias_ambig: -0.010 [-0.05, +0.03] |" in body
