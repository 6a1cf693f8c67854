"""Retention that can see damage: KL and bits per byte on neutral text (tasks/neutral_text.py), and
the at-chance rule of the accuracy tasks (experiment/benchmarks.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vllm_coco.experiment import benchmarks, stats
from vllm_coco.tasks import neutral_text


@pytest.fixture(scope="module")
def lm(bbq_tiny_model):
    """A tiny random Llama as the final stage loads it, with an identity edit (gain 1 on every v
    channel) and a planted damaging one (every v channel of every layer zeroed)."""
    from vllm_coco.edit.conditions import LinearEdit
    from vllm_coco.tasks.prefix_lm import CocoHFLM

    lm = CocoHFLM(str(bbq_tiny_model))
    cfg = lm.model.config
    v_start = (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim  # packed [q | k | v]
    v = {layer: np.arange(v_start, w) for layer, w in enumerate(lm.conditions.widths)}
    zeros = {k: np.zeros(len(c)) for k, c in v.items()}
    lm.add_condition("identity", LinearEdit("identity", v, {k: np.ones(len(c)) for k, c in v.items()}, zeros))
    lm.add_condition("damage", LinearEdit("damage", v, zeros, zeros))
    return lm


def test_neutral_texts_are_distinct_passages():
    texts = neutral_text.neutral_texts(30)
    assert len(texts) == 30 == len(set(texts)) and all(len(t) > 100 for t in texts)


def test_bits_per_byte_equal_a_plain_forward(lm):
    """The base row's bits per byte = -sum log p / (ln 2 * bytes) from an independent forward."""
    text = neutral_text.neutral_texts(1)[0]
    got = neutral_text.shift_of_text(lm.model, lm.conditions, lm.tokenizer, text, "base")
    ids, nbytes = neutral_text.tokens_and_bytes(lm.tokenizer, text)
    assert nbytes > 0.8 * len(text[:nbytes].encode("utf-8"))
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)  # [T-1, V]
    nll = -sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    assert got["bpb_base"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-5)
    assert got["kl"] == 0.0 and got["bpb"] == got["bpb_base"]


def test_identity_edit_has_zero_kl_and_a_damaging_one_does_not(lm, tmp_path):
    same = neutral_text.measure(lm, "identity", tmp_path / "identity", 5, "neutral")
    hurt = neutral_text.measure(lm, "damage", tmp_path / "damage", 5, "neutral")
    assert same["results"]["neutral"]["kl,none"] == pytest.approx(0.0, abs=1e-7)
    assert same["results"]["neutral"]["bpb,none"] == pytest.approx(same["results"]["neutral"]["bpb_base,none"])
    assert hurt["results"]["neutral"]["kl,none"] > 1e-3
    assert hurt["results"]["neutral"]["bpb,none"] != pytest.approx(hurt["results"]["neutral"]["bpb_base,none"])
    neutral_text.measure(lm, "base", tmp_path / "base", 5, "neutral")
    ivs = benchmarks.NEUTRAL.intervals(tmp_path / "base", tmp_path / "damage", [])
    assert ivs["kl"].n == 5 and ivs["kl"].lo > 0
    assert ivs["kl"].delta == pytest.approx(hurt["results"]["neutral"]["kl,none"])
    verdict = benchmarks.NEUTRAL.verdicts(ivs, "LE-COCO", {})[0]
    assert verdict.status == ("not supported" if ivs["kl"].lo > 0.05 else verdict.status)
    rows = [json.loads(x) for x in (tmp_path / "damage" / "samples_neutral.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == list(range(5))


def _log(d, task, values):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"samples_{task}.jsonl").write_text("".join(json.dumps({"doc_id": i, "acc": v}) + "\n"
                                                     for i, v in enumerate(values)))


def test_an_accuracy_task_at_chance_does_not_count(tmp_path):
    """BoolQ at 0.5 (chance 0.5) is left out of the pooled retention comparison; MMLU at 0.9 counts.
    With both at chance the verdict is "at chance: no evidence", never "supported"."""
    base, edit = tmp_path / "base", tmp_path / "edit"
    _log(base, "coco_mmlu", [1.0] * 36 + [0.0] * 4)
    _log(edit, "coco_mmlu", [1.0] * 36 + [0.0] * 4)
    _log(base, "coco_boolq", [1.0, 0.0] * 20)
    _log(edit, "coco_boolq", [0.0] * 40)  # a damaged model on a task the base only guesses
    ivs = benchmarks.RETENTION.intervals(base, edit, [])
    assert ivs["base_acc:coco_mmlu"].lo > 0.25 and ivs["base_acc:coco_boolq"].lo < 0.5
    assert ivs["acc"].n == 40 and ivs["acc"].delta == 0.0  # MMLU only
    _log(base, "coco_mmlu", [1.0] * 10 + [0.0] * 30)
    ivs = benchmarks.RETENTION.intervals(base, edit, [])
    assert "acc" not in ivs
    verdict = benchmarks.RETENTION.verdicts(ivs, "LE-COCO", {"sweep": {"retention_floor": 0.02}})[0]
    assert verdict.status == stats.AT_CHANCE and verdict.claim.startswith("LE-COCO keeps retention accuracy")
