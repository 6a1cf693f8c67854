"""vllm_coco.experiment.stats: reading logged samples, the paired bootstrap, verdicts."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from vllm_coco.core.errors import CocoError
from vllm_coco.experiment import stats
from vllm_coco.experiment.stats import Interval, Verdict
from vllm_coco.tasks import metrics
from vllm_coco.tasks.bbq_docs import ORDERS


def _direct(base: dict, edit: dict, rounds: int, seed: int):
    """The bootstrap written out: one `integers` call per round over the shared ids, means of values."""
    ids = sorted(set(base) & set(edit))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(rounds):
        pick = [ids[j] for j in rng.integers(0, len(ids), size=len(ids))]
        boots.append(sum(edit[i] for i in pick) / len(pick) - sum(base[i] for i in pick) / len(pick))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return sum(edit[i] - base[i] for i in ids) / len(ids), lo, hi


def _records(seed: int, cats=("Age", "SES"), items=12, p_unknown=0.4) -> list[dict]:
    """Hand-made BBQ records: `items` items per category, half ambiguous, three orders each."""
    rng = random.Random(seed)
    out = []
    for c in cats:
        for i in range(items):
            for _ in ORDERS:
                role = rng.choices(["unknown", "biased", "other", None], [p_unknown, 0.3, 0.25, 0.05])[0]
                out.append({"id": f"{c}:{i}", "condition": "ambig" if i % 2 else "disambig", "pos": 0, "role": role,
                            "choice": 0, "correct": rng.random() < 0.6})
    return out


def iv(lo, hi, delta=None) -> Interval:
    return Interval(n=10, delta=(lo + hi) / 2 if delta is None else delta, lo=lo, hi=hi, up=0, down=0, rounds=100)


# --------------------------------------------------------------------------- the bootstrap

def test_paired_bootstrap_equals_the_direct_loop():
    rng = random.Random(3)
    base = {f"Age:{i}": rng.choice([0, 1 / 3, 2 / 3, 1]) for i in range(30)}
    edit = {k: min(1.0, v + rng.choice([0, 0, 1 / 3])) for k, v in base.items()}
    got = stats.paired_bootstrap(base, edit, stats.mean, rounds=300, seed=7)
    delta, lo, hi = _direct(base, edit, 300, 7)
    assert got.n == 30 and got.rounds == 300
    assert got.delta == pytest.approx(delta, abs=1e-12)
    assert (got.lo, got.hi) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    assert got.up == sum(edit[k] > base[k] for k in base) and got.down == 0
    assert got.lo <= got.delta <= got.hi
    # another seed draws other ids
    assert stats.paired_bootstrap(base, edit, stats.mean, rounds=300, seed=8) != got


def test_items_shared_only_partially_are_paired_by_id():
    base = {"a": 0.0, "b": 1.0, "c": 0.0, "only_base": 1.0}
    edit = {"c": 1.0, "a": 1.0, "b": 1.0, "only_edit": 0.0}  # other order, other extras
    got = stats.paired_bootstrap(base, edit, stats.mean, rounds=200, seed=1)
    shared = {k: base[k] for k in "abc"}, {k: edit[k] for k in "abc"}
    delta, lo, hi = _direct(*shared, 200, 1)
    assert (got.n, got.up, got.down) == (3, 2, 0)
    assert got.delta == pytest.approx(2 / 3) and (got.lo, got.hi) == (pytest.approx(lo), pytest.approx(hi))
    with pytest.raises(CocoError, match="share no item"):
        stats.paired_bootstrap({"x": 1.0}, {"y": 1.0}, stats.mean)


def test_an_item_s_order_documents_move_together():
    # one record per item in the base, three in the edit: still one item each, so the same pairs
    base = [{"id": f"Age:{i}", "condition": "ambig", "role": "biased", "correct": False} for i in range(8)]
    edit = [{**r, "role": "unknown" if i % 2 else "biased"} for r in base for i in range(3)]
    got = stats.paired_bootstrap(base, edit, stats.success_rate, rounds=100)
    assert got.n == 8 and got.delta == pytest.approx(1 / 3) and got.lo == got.hi == pytest.approx(1 / 3)
    assert (got.up, got.down) == (8, 0)


@pytest.mark.parametrize("name", ["success_rate", "acc_disambig", "bias_disambig", "bias_ambig",
                                  "abs_bias_disambig", "abs_bias_ambig"])
def test_statistics_equal_the_task_aggregations(name):
    recs = _records(0)
    agg = getattr(metrics, f"agg_{name}")
    assert getattr(stats, name)(recs) == agg(recs)  # same counts, same arithmetic: exactly equal
    assert stats.STATISTICS[name] is getattr(stats, name)


def test_ratio_statistic_bootstrap_recomputes_the_aggregate():
    """s_DIS vectorized from per-item counts = metrics.agg_bias_disambig called on every resample."""
    base, edit = _records(1), _records(2)
    fast = stats.paired_bootstrap(base, edit, stats.bias_disambig, rounds=150, seed=4)
    slow = stats.paired_bootstrap(base, edit, metrics.agg_bias_disambig, rounds=150, seed=4)
    assert fast.delta == metrics.agg_bias_disambig(edit) - metrics.agg_bias_disambig(base)
    assert (fast.n, fast.up, fast.down, fast.rounds) == (slow.n, slow.up, slow.down, slow.rounds)
    assert (fast.lo, fast.hi) == (pytest.approx(slow.lo, abs=1e-12), pytest.approx(slow.hi, abs=1e-12))


def test_s_dis_edge_cases_follow_metrics():
    abstain = [{"id": "Age:0", "condition": "disambig", "role": "unknown", "correct": False}]
    assert stats.bias_disambig(abstain) == metrics.agg_bias_disambig(abstain) == 0.0  # no answer: 0
    assert np.isnan(stats.bias_disambig([{**abstain[0], "condition": "ambig"}]))  # no disambiguated doc: NaN
    assert np.isnan(stats.bias_ambig(abstain)) and np.isnan(metrics.agg_bias_ambig(abstain))


def test_by_category_is_the_document_weighted_mean_of_categories():
    recs = _records(5, cats=("Age", "SES", "Religion"))
    recs += [r | {"id": "Age:x" + r["id"]} for r in recs if r["id"].startswith("Age:")]  # Age twice the docs
    cats = {}
    for r in recs:
        cats.setdefault(r["id"].partition(":")[0], []).append(r)
    want = sum(metrics.agg_bias_disambig(v) * len(v) for v in cats.values()) / len(recs)
    assert stats.by_category(stats.bias_disambig)(recs) == pytest.approx(want, abs=1e-12)
    want = sum(metrics.agg_success_rate(v) * len(v) for v in cats.values()) / len(recs)
    assert stats.by_category(stats.success_rate)(recs) == pytest.approx(want, abs=1e-12)
    assert stats.by_category(stats.bias_disambig)(recs) != stats.bias_disambig(recs)  # pooling differs


def test_diff_interval_is_a_minus_b_over_items_all_three_share():
    rng = random.Random(9)
    base = {str(i): rng.random() for i in range(25)}
    a = {str(i): rng.random() for i in range(2, 25)}
    b = {str(i): rng.random() for i in range(20)}
    got = stats.diff_interval(base, a, b, stats.mean, rounds=200, seed=3)
    shared = [str(i) for i in range(2, 20)]
    delta, lo, hi = _direct({k: b[k] for k in shared}, {k: a[k] for k in shared}, 200, 3)
    assert got.n == 18 and got.delta == pytest.approx(delta, abs=1e-12)
    assert (got.lo, got.hi) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    assert got.up == sum(a[k] > b[k] for k in shared)


def test_undefined_statistic_gives_an_undefined_interval():
    dis = [{"id": f"Age:{i}", "condition": "disambig", "role": "biased", "correct": False} for i in range(4)]
    got = stats.paired_bootstrap(dis, dis, stats.success_rate, rounds=50)  # no ambiguous document
    assert (got.delta, got.lo, got.hi, got.rounds) == (None, None, None, 0) and got.text() == "n/a"
    assert Interval.from_json(json.loads(json.dumps(got.to_json()))) == got


def test_wrong_input_kind_is_refused():
    with pytest.raises(TypeError):
        stats.paired_bootstrap({"a": 1.0}, {"a": 0.0}, stats.success_rate)
    with pytest.raises(TypeError):
        stats.paired_bootstrap(_records(0), _records(0), stats.mean)


def test_speed_of_the_full_size_comparison():
    import time

    base = _records(1, cats=("Age", "Gender_identity", "Race_ethnicity", "Religion", "Nationality", "SES"), items=240)
    edit = _records(2, cats=("Age", "Gender_identity", "Race_ethnicity", "Religion", "Nationality", "SES"), items=240,
                    p_unknown=0.6)
    t = time.perf_counter()
    got = stats.paired_bootstrap(base, edit, stats.success_rate)
    assert time.perf_counter() - t < 3  # ~0.2 s on two CPU cores; generous for loaded machines
    assert got.n == 1440 and got.rounds == 2000 and got.lo > 0


# --------------------------------------------------------------------------- verdicts

def test_verdict_specific_flips_when_an_interval_crosses_zero():
    v = stats.verdict_specific({"COCO - RAND": iv(-0.2, -0.05), "COCO - NORM": iv(-0.3, -0.01)})
    assert v.status == "supported" and "below 0 for every baseline" in v.rule
    assert stats.verdict_specific({"COCO - RAND": iv(-0.2, -0.05), "COCO - NORM": iv(-0.3, 0.01)}).status \
        == "inconclusive"
    assert stats.verdict_specific({"COCO - RAND": iv(-0.2, -0.05), "COCO - NORM": iv(0.01, 0.2)}).status \
        == "not supported"
    assert stats.verdict_specific({}).status == "inconclusive"


def test_verdict_edit_flips_when_an_interval_crosses_its_bound():
    good, flat, bad = iv(0.02, 0.1), iv(-0.02, 0.1), iv(-0.1, -0.02)
    assert stats.verdict_edit(good, iv(0.0, 0.0)).status == "supported"  # an unchanged accuracy is not lowered
    assert stats.verdict_edit(good, iv(-0.01, 0.02)).status == "inconclusive"
    assert stats.verdict_edit(good, iv(-0.01, 0.02), margin=0.01).status == "supported"
    assert stats.verdict_edit(flat, iv(0.0, 0.02)).status == "inconclusive"
    assert stats.verdict_edit(bad, iv(0.0, 0.02)).status == "not supported"
    assert stats.verdict_edit(good, iv(-0.05, -0.01)).status == "not supported"
    assert stats.verdict_edit(good, iv(-0.05, -0.01), margin=0.02).status == "inconclusive"
    v = stats.verdict_edit(good, iv(0.0, 0.0), margin=0.02, edit="NE-COCO")
    assert v.claim.startswith("NE-COCO") and "-0.02" in v.rule and set(v.evidence) == {"success_rate", "acc_disambig"}
    assert "-0 " not in stats.verdict_edit(good, flat).rule


def test_verdict_retention_flips_at_the_floor():
    assert stats.verdict_retention(iv(-0.02, 0.01), 0.02).status == "supported"  # the floor itself is allowed
    assert stats.verdict_retention(iv(-0.03, 0.01), 0.02).status == "inconclusive"
    assert stats.verdict_retention(iv(-0.06, -0.021), 0.02).status == "not supported"
    assert "-0.02" in stats.verdict_retention(iv(0, 0), 0.02).rule


def test_verdict_jailbreak_flips_when_a_family_crosses_zero():
    fam = {"roleplay": iv(0.01, 0.2), "obfuscated": iv(0.05, 0.1), "templates": iv(0.02, 0.3)}
    assert stats.verdict_jailbreak(fam).status == "supported"
    assert stats.verdict_jailbreak({**fam, "templates": iv(-0.01, 0.3)}).status == "inconclusive"
    assert stats.verdict_jailbreak({**fam, "templates": iv(-0.2, -0.01)}).status == "not supported"
    assert stats.verdict_jailbreak({}).status == "inconclusive"


def test_undefined_intervals_are_inconclusive_and_verdicts_round_trip():
    none = Interval(n=0, delta=None, lo=None, hi=None, up=0, down=0, rounds=0)
    v = stats.verdict_edit(none, none)
    assert v.status == "inconclusive"
    assert stats.verdict_specific({"COCO - RAND": none}).status == "inconclusive"
    v = stats.verdict_jailbreak({"roleplay": iv(0.01, 0.2)})
    assert Verdict.from_json(json.loads(json.dumps(v.to_json()))) == v
    with pytest.raises(ValueError):
        Verdict(claim="x", status="maybe", rule="", evidence={})


def test_expected_halfwidth():
    assert stats.expected_halfwidth(0.5, 240) == pytest.approx(1.96 * (0.5 / 240) ** 0.5)
    assert stats.expected_halfwidth(0.5, 1440) < stats.expected_halfwidth(0.5, 240)
    n = stats.items_for_halfwidth(0.5, 0.05)
    assert stats.expected_halfwidth(0.5, n) <= 0.05 < stats.expected_halfwidth(0.5, n - 1)


# --------------------------------------------------------------------------- reading logged samples

def _write_samples(path, docs_preds, metric_keys=metrics.MC_METRICS):
    """lm-eval's log_samples rows: doc_id, doc, resps, and each metric's process_results value."""
    with open(path, "w", encoding="utf-8") as fh:
        for k, (doc, pred) in enumerate(docs_preds):
            rec = metrics.record(doc, pred)
            row = {"doc_id": k, "doc": doc, "resps": [], "filtered_resps": [], "metrics": list(metric_keys),
                   **{m: rec for m in metric_keys}}
            fh.write(json.dumps(row) + "\n")


def _docs(cat: str, items: int, condition="ambig"):
    for i in range(items):
        for order in ORDERS:
            pos = {orig: shown for shown, orig in enumerate(order)}
            doc = {"id": f"{cat}:{i}", "condition": condition, "order": list(order), "label": pos[2],
                   "unknown": pos[2], "biased": pos[0]}
            yield doc, pos[2] if i % 2 else pos[0]  # odd items answered "unknown", even ones biased


def test_bbq_records_read_logged_samples(tmp_path):
    _write_samples(tmp_path / "samples_stereo_coco_Age.jsonl", _docs("Age", 4))
    _write_samples(tmp_path / "samples_stereo_coco_SES.jsonl", _docs("SES", 2, "disambig"))
    _write_samples(tmp_path / "samples_stereo_coco_jailbreak_roleplay.jsonl", _docs("Age", 1),
                   metrics.JAILBREAK_METRICS)
    _write_samples(tmp_path / "samples_stereo_coco_gen_Age.jsonl", _docs("Age", 1), metrics.GEN_METRICS)
    recs = stats.bbq_records(tmp_path)
    assert len(recs) == 4 * 3 + 2 * 3  # the jailbreak and gen files are other tasks
    assert {r["id"] for r in recs} == {"Age:0", "Age:1", "Age:2", "Age:3", "SES:0", "SES:1"}
    assert stats.success_rate(recs) == metrics.agg_success_rate(recs) == 0.5
    assert len(stats.bbq_records(tmp_path, "stereo_coco_jailbreak_")) == 3
    assert len(stats.bbq_records(tmp_path, "stereo_coco_jailbreak_roleplay")) == 3
    assert len(stats.bbq_records(tmp_path, "stereo_coco_gen_")) == 3
    assert len(stats.bbq_records(tmp_path, "stereo_coco_Age")) == 12


def test_doc_values_read_a_per_document_metric(tmp_path):
    with open(tmp_path / "samples_coco_boolq.jsonl", "w") as fh:
        for k, acc in enumerate([1.0, 0.0, 1.0]):
            fh.write(json.dumps({"doc_id": k, "doc": {}, "metrics": ["acc"], "acc": acc}) + "\n")
    with open(tmp_path / "samples_coco_truthfulqa_ref.jsonl", "w") as fh:
        fh.write(json.dumps({"doc_id": 0, "metrics": ["ref_bits_per_byte"], "ref_bits_per_byte": [-3.5, 12]}) + "\n")
    vals = stats.doc_values(tmp_path, "coco_boolq", "acc")
    assert vals == {"coco_boolq:0": 1.0, "coco_boolq:1": 0.0, "coco_boolq:2": 1.0}
    assert stats.mean(vals) == pytest.approx(2 / 3)
    with pytest.raises(CocoError, match="not one number per document"):
        stats.doc_values(tmp_path, "coco_truthfulqa_ref", "ref_bits_per_byte")
    with pytest.raises(CocoError, match="not one number per document"):
        stats.doc_values(tmp_path, "coco_boolq", "acc_norm")


def test_missing_samples_name_the_directory_and_the_fix(tmp_path):
    for call in (lambda: stats.bbq_records(tmp_path), lambda: stats.doc_values(tmp_path, "coco_mmlu", "acc"),
                 lambda: stats.bbq_records(tmp_path / "nowhere")):
        with pytest.raises(CocoError) as e:
            call()
        assert str(tmp_path) in str(e.value) and "log_samples" in str(e.value) and "--log-samples" in str(e.value)
    # only the families' files: the default prefix still finds nothing
    _write_samples(tmp_path / "samples_stereo_coco_jailbreak_roleplay.jsonl", _docs("Age", 1))
    with pytest.raises(CocoError, match="log_samples"):
        stats.bbq_records(tmp_path)
    (tmp_path / "samples_stereo_coco_Age.jsonl").write_text('{"doc_id": 0, "acc": 1.0}\n')
    with pytest.raises(CocoError, match="no BBQ record"):
        stats.bbq_records(tmp_path)
    (tmp_path / "samples_stereo_coco_Age.jsonl").write_text("{not json\n")
    with pytest.raises(CocoError, match="line 1 is not JSON"):
        stats.bbq_records(tmp_path)
