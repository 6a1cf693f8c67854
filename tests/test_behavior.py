"""identify --contrast behavior: the model's own answers split the ambiguous items into the
biased set and the "unknown" set; intensities at the decision point (docs/METHOD.md §2.4)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import expect_bad, run_cli

from vllm_coco.core.errors import CocoError
from vllm_coco.data.contrast import BBQItem
from vllm_coco.identify import behavior


def _item(i, category="Age", answers=("The old man", "The boy", "Unknown")):
    return BBQItem(category=category, example_id=i, question_index="1", polarity="neg", condition="ambig",
                   context="ctx", question="Who forgot?", answers=answers, label=2, unknown=2, biased=0)


def _reference_logliks(model, spans):
    """One sequence at a time, no padding: sum of log p(token | prefix) over each span."""
    import torch

    out = []
    for s in spans:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([s.ids])).logits[0].double(), -1)  # [tokens, vocab]
        out.append(sum(float(logp[t - 1, s.ids[t]]) for t in range(s.start, s.end)))
    return np.array(out)


def test_option_logliks_equal_an_unbatched_reference(planted):
    from vllm_coco.core.models import load_model
    from vllm_coco.identify.capture import Span

    model, tok = load_model(planted[0])
    words = tok.convert_tokens_to_ids
    spans = [Span(words("n1 n2 n3 b1 b2".split()), 3, 5), Span(words("n4 u1".split()), 1, 2),
             Span(words("n5 n6 n7 n8 n9 n1 u2 u3 u4".split()), 6, 9), Span(words("n2 n3 b4".split()), 2, 3)]
    got = behavior.option_logliks(model, spans, batch_size=3, pad_id=tok.pad_token_id)
    np.testing.assert_allclose(got, _reference_logliks(model, spans), rtol=1e-5, atol=1e-5)


def test_choose_sum_vs_per_byte_and_the_two_sets():
    items = [_item(0), _item(1), _item(2), _item(3, "SES")]
    # summed log-likelihoods [items * 3]; "The old man" is 11 bytes, "The boy" and "Unknown" 7
    ll = np.array([-10.0, -9.0, -7.5,    # sum: unknown; per byte: old man (-0.91 > -1.07)
                   -5.0, -9.0, -9.5,     # both: old man
                   -12.0, -6.0, -9.0,    # both: the boy (neither set)
                   -20.0, -9.0, -6.0])   # both: unknown
    assert behavior.choose(items, ll, "sum") == [2, 0, 1, 2]
    assert behavior.choose(items, ll, "per-byte") == [0, 0, 1, 2]
    xs, ys, counts = behavior.contrast_sets(items, [2, 0, 1, 2])
    assert [it.example_id for it in xs] == [1] and [it.example_id for it in ys] == [0, 3]
    assert counts == {"Age": {"answered": 3, "biased": 1, "unknown": 1, "other": 1},
                      "SES": {"answered": 1, "biased": 0, "unknown": 1, "other": 0}}
    with pytest.raises(CocoError, match="scoring mean is not one of sum, per-byte"):
        behavior.choose(items, ll, "mean")


def test_too_small_sets_are_refused_naming_the_category():
    counts = {"Age": {"answered": 40, "biased": 25, "unknown": 12, "other": 3},
              "SES": {"answered": 40, "biased": 30, "unknown": 9, "other": 1}}
    behavior.check_sets({"Age": counts["Age"]}, "identify")
    with pytest.raises(CocoError, match=r"category SES: .* 30 of 40 .* 9 with \"unknown\"; .* at least 10"):
        behavior.check_sets(counts, "identify")


def test_decision_span_is_the_last_prompt_token(planted):
    """The captured intensity of a decision span is |h| at the last prompt token of a forward over
    the prompt alone (computed here by hand with a hook)."""
    import torch

    from vllm_coco.core.models import load_model
    from vllm_coco.data.contrast import encode_example
    from vllm_coco.identify.capture import capture, open_matrix

    model, tok = load_model(planted[0])
    items = [_item(i, answers=("b1", "u1", "u2")) for i in range(3)]
    items = [BBQItem(**{**it.__dict__, "context": ctx}) for it, ctx in zip(items, ["n1 n2", "n3 b4 b5", "n6"])]
    spans = behavior.decision_spans(tok, items, chat=False)
    for it, s in zip(items, spans):
        ids, start = encode_example(tok, it.user_message(), "u2", chat=False)
        assert s.ids == ids[:start] and (s.start, s.end) == (start - 1, start)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        res = capture(model, spans, Path(d) / "m.safetensors", batch_size=2, pad_id=tok.pad_token_id, progress=False)
        mat = np.asarray(open_matrix(Path(d) / "m.safetensors"), dtype=np.float32)  # [items, neurons]
    attn = model.model.layers[1].self_attn
    off = res.layout.flat(1, "q", 0)
    for row, s in enumerate(spans):
        seen = {}
        h = attn.q_proj.register_forward_hook(lambda m, a, o, seen=seen: seen.__setitem__("q", o))
        with torch.no_grad():
            model(input_ids=torch.tensor([s.ids]))
        h.remove()
        ref = seen["q"][0, -1].abs().numpy()  # [q_size]
        np.testing.assert_allclose(mat[row, off:off + len(ref)], ref, rtol=2e-3, atol=2e-3)  # float16 matrix


def test_behavior_identify_end_to_end(planted, tmp_path, monkeypatch):
    """On the tiny model and a BBQ directory in its vocabulary (the minimum set size lowered: a
    random tiny model rarely answers "unknown"), the artifact's sets are exactly the model's
    answers recomputed one item at a time, the rows are |X| + |Y|, and the null is the unpaired one."""
    import tiny

    from vllm_coco.core.models import load_model
    from vllm_coco.data.contrast import load_items

    monkeypatch.setattr(behavior, "MIN_PER_SET", 1)
    model_dir = planted[0]
    bbq = tiny.planted_bbq(tmp_path / "bbq")
    code, out, err = run_cli("identify", model_dir, "--out", tmp_path / "b", "--contrast", "behavior", "--no-chat",
                             "--data", bbq, "--categories", "Age,SES", "--split", "all", "--limit", "30", "--quiet",
                             "--ratio", "0.05")
    assert code == 0, err
    meta = json.loads((tmp_path / "b" / "neurons.json").read_text())
    data = meta["data"]
    nb, nu = (sum(v[k] for v in data["answers"].values()) for k in ("biased", "unknown"))
    assert f"from {nb} biased vs {nu} \"unknown\" answers in 2 categories" in out
    assert data["contrast"] == "behavior" and data["chat_template"] is False and data["scoring"] == "sum"

    items, _ = load_items(str(bbq), ["Age", "SES"], "all", 30, 0)
    model, tok = load_model(model_dir)
    ref = _reference_logliks(model, behavior.option_spans(tok, items, chat=False)).reshape(-1, 3)
    for cat in ("Age", "SES"):
        answers = [int(np.argmax(r)) for r, it in zip(ref, items) if it.category == cat]
        cat_items = [it for it in items if it.category == cat]
        biased = sum(a == it.biased for a, it in zip(answers, cat_items))
        unknown = sum(a == it.unknown for a, it in zip(answers, cat_items))
        assert data["answers"][cat] == {"answered": 30, "biased": biased, "unknown": unknown,
                                        "other": 30 - biased - unknown}
    assert data["rows"] == sum(data["answers"][c]["biased"] + data["answers"][c]["unknown"] for c in ("Age", "SES"))
    assert meta["selection"]["count"] == round(0.05 * meta["model"]["num_neurons"])
    assert meta["significance"]["null"] == "the two sets' union shuffled and re-split at the same sizes"
    # plain prompts end in the same token, so layer 0's q/k/v are constant at the decision point:
    # no contrast there, none of them may be selected (they would all score exactly 0 otherwise)
    assert meta["neurons"] and all(n["layer"] > 0 for n in meta["neurons"])
    assert all(math.isfinite(n["score"]) for n in meta["neurons"])
    for cat in ("Age", "SES"):
        pc = meta["per_category"][cat]
        assert "pairs" not in pc and (pc["biased"], pc["unknown"]) == (data["answers"][cat]["biased"],
                                                                        data["answers"][cat]["unknown"])
    # re-selection keeps the behavior-mode bookkeeping
    code, out, err = run_cli("select", tmp_path / "b", "--out", tmp_path / "r", "--baseline", "rand")
    assert code == 0, err
    re_meta = json.loads((tmp_path / "r" / "neurons.json").read_text())
    assert re_meta["significance"]["null"] == meta["significance"]["null"]
    assert re_meta["per_category"]["Age"]["biased"] == meta["per_category"]["Age"]["biased"]


@pytest.mark.parametrize("scoring", ["sum", "per-byte"])
def test_choose_agrees_with_the_evaluation_rule(scoring):
    """behavior.choose and the evaluation's pick (vllm_coco.core.pick) pick the same option from
    the same numbers (non-ASCII text included: lengths are UTF-8 bytes in both)."""
    from vllm_coco.core.pick import pick
    from vllm_coco.tasks.bbq_docs import item_docs

    answers = ("The grandfather", "The grandson", "Can’t be determined")  # ’ is 3 bytes
    items = [_item(i, answers=answers) for i in range(50)]
    rng = np.random.default_rng(0)
    ll = -rng.uniform(3, 30, size=(50, 3))
    ll[0] = [-10.0, -10.0, -10.0]  # a tie: the first option in both
    ours = behavior.choose(items, ll.ravel(), scoring)
    docs = [item_docs(it, scoring=scoring)[0] for it in items]  # order (0, 1, 2): position = option index
    theirs = [pick(d, [(float(x), False) for x in row]) for d, row in zip(docs, ll)]
    assert ours == theirs
    assert ours[0] == (0 if scoring == "sum" else 2)  # tie: first; per byte: -10/21 beats -10/15 and -10/12
    assert len(set(ours)) == 3


def test_behavior_refuses_small_sets_and_pairs_files(planted, tmp_path):
    model_dir, pairs = planted
    # 12 items per category cannot hold 10 biased and 10 "unknown" answers: refused before loading
    expect_bad(tmp_path, "identify", model_dir, "--out", tmp_path / "b", "--contrast", "behavior",
               "--categories", "Age", "--limit", "12", "--quiet",
               match="--limit 12 is too small for --contrast behavior")
    # 20 items: the tiny model's answers leave a set short (it rarely says "unknown")
    expect_bad(tmp_path, "identify", model_dir, "--out", tmp_path / "b", "--contrast", "behavior", "--no-chat",
               "--categories", "Age", "--limit", "20", "--quiet",
               match="behavior mode needs at least 10 of each: raise the items per category (--limit")
    expect_bad(tmp_path, "identify", model_dir, "--out", tmp_path / "b", "--contrast", "behavior",
               "--data", pairs, "--quiet", match="contrast-pairs file, which has no answer options")


def test_category_without_ambiguous_items_is_refused(tmp_path):
    import tiny

    from vllm_coco.data.contrast import load_items

    bbq = tiny.planted_bbq(tmp_path / "bbq")
    rows = [json.loads(line) for line in open(bbq / "Age.jsonl")]
    (bbq / "Age.jsonl").write_text("".join(json.dumps({**r, "context_condition": "disambig"}) + "\n" for r in rows))
    assert len(load_items(str(bbq), ["SES"], "all", None, 0)[0]) == 40
    with pytest.raises(CocoError, match=r"category Age has 0 ambiguous item\(s\) in split all"):
        load_items(str(bbq), ["Age", "SES"], "all", None, 0)
