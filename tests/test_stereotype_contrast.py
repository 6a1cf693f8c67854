"""The `stereotype` contrast and the abstention filter (docs/METHOD.md §2.4, §5.6).

Data: every pair of an item shares its prompt and differs only in the answer letter, each side's
letter runs through A, B and C over the three cyclic orders (letters cancel), items whose correct
answer is the stereotype-consistent one are left out, and ambiguous and disambiguated items of both
polarities are in. Planted ground truth: on rows built from real BBQ items, a neuron that fires on
the stereotype-consistent option's letter and one that fires on the "unknown" option's letter; the
stereotype contrast ranks the first on top, and the abstention filter removes the second (and only
it). End to end: `coco-tools identify --contrast stereotype --abstention-filter` and `select`.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from conftest import run_cli

from vllm_coco.core import artifact
from vllm_coco.core import names as N
from vllm_coco.core.errors import CocoError
from vllm_coco.core.models import NeuronLayout
from vllm_coco.data.contrast import (
    CYCLIC_ORDERS,
    LETTERS,
    abstention_pairs,
    bbq_items,
    load_stereotype,
    stereotype_pairs,
)
from vllm_coco.identify.run import IdentifyOptions, abstention_losses, score_matrix, select_from_arrays

CATS = ["Age", "Gender_identity"]


@pytest.fixture(scope="module")
def items():
    """Identify-split BBQ items of two categories, both conditions, that the contrast keeps."""
    its, _ = bbq_items("bbq", CATS, split="identify", condition=None)
    return [it for it in its if stereotype_pairs(it)][::7]  # every 7th: a few hundred, all kinds


def test_pairs_differ_only_in_the_letter_and_letters_cancel(items):
    assert {it.condition for it in items} == {"ambig", "disambig"}
    assert {it.polarity for it in items} == {"neg", "nonneg"}
    for it in items:
        pairs = stereotype_pairs(it)
        assert len(pairs) == len(CYCLIC_ORDERS) == 3
        for p in pairs:
            assert p.biased in LETTERS and p.unbiased in LETTERS and p.biased != p.unbiased
            for letter in LETTERS:  # the letters name the options of this order
                assert f"\n{letter}. " in p.prompt
        # over the three orders each side's option is shown under A, B and C once
        assert sorted(p.biased for p in pairs) == list(LETTERS)
        assert sorted(p.unbiased for p in pairs) == list(LETTERS)
        unbiased_text = it.answers[it.label]
        for p in pairs:
            assert f"\n{p.unbiased}. {unbiased_text}\n" in p.prompt  # the correct option's letter
            assert f"\n{p.biased}. {it.answers[it.biased]}\n" in p.prompt  # the stereotype-consistent one's
        if it.condition == "ambig":
            assert it.label == it.unknown  # ambiguous: the correct answer is "unknown"
        else:
            assert it.label not in (it.unknown, it.biased)  # disambiguated, counter-stereotypical


def test_items_whose_answer_is_the_stereotype_are_left_out():
    its, _ = bbq_items("bbq", ["Age"], split="identify", condition="disambig")
    consistent = [it for it in its if it.label == it.biased]
    assert consistent and all(stereotype_pairs(it) == [] for it in consistent)
    pairs, control, info = load_stereotype("bbq", ["Age"], "identify", limit=30)
    assert len(pairs) == len(control) == 30  # 10 items, three pairs each
    assert info["counts"]["Age"]["consistent_left_out"] == len(consistent)
    by_item = Counter(p.meta["example_id"] for p in pairs)
    assert set(by_item.values()) == {3}


def test_abstention_pairs_are_unknown_against_each_named_option(items):
    named_is_biased = []
    for it in items:
        for p in abstention_pairs(it):
            assert f"\n{p.unbiased}. {it.answers[it.unknown]}\n" in p.prompt
            named = next(i for i in range(3) if f"\n{p.biased}. {it.answers[i]}\n" in p.prompt)
            assert named != it.unknown
            named_is_biased.append(named == it.biased)
    share = np.mean(named_is_biased)
    assert 0.4 < share < 0.6  # the named side is the stereotype-consistent option about half the time


# --------------------------------------------------------------------------- planted ground truth

LAYOUT = NeuronLayout(1, 8, 4)  # 16 neurons
STEREO_N, UNKNOWN_N = 3, 9  # the planted neurons' ids


def _letter_is(item, order, letter, option) -> bool:
    return LETTERS[order.index(option)] == letter


def _planted_rows(items, seed=0):
    """Rows in identify's order (contrast pairs, then the abstention control), one category index and
    label each, and a [rows, 16] intensity matrix: noise, plus neuron STEREO_N firing when the row's
    answer letter is the stereotype-consistent option's and UNKNOWN_N when it is "unknown"'s."""
    rng = np.random.default_rng(seed)
    cat_index = {c: i for i, c in enumerate(CATS)}
    rows, cat, label = [], [], []
    for build, sides in ((stereotype_pairs, (N.ROW_BIASED, N.ROW_UNBIASED)),
                         (abstention_pairs, (N.ROW_NAMED, N.ROW_UNKNOWN))):
        for it in items:
            for p, order in zip(build(it), CYCLIC_ORDERS):
                for letter, side in zip((p.biased, p.unbiased), sides):
                    rows.append((_letter_is(it, order, letter, it.biased), _letter_is(it, order, letter, it.unknown)))
                    cat.append(cat_index[it.category])
                    label.append(side)
    matrix = rng.normal(1.0, 0.3, (len(rows), LAYOUT.total))  # [rows, N]
    fires = np.asarray(rows, dtype=float)  # [rows, 2]
    matrix[:, STEREO_N] += 3.0 * fires[:, 0] + rng.normal(0, 0.1, len(rows))
    matrix[:, UNKNOWN_N] += 3.0 * fires[:, 1] + rng.normal(0, 0.1, len(rows))
    return np.abs(matrix), np.asarray(cat), np.asarray(label)


def _arrays(matrix, row_cat, row_label, opts):
    res = score_matrix(matrix, row_cat, row_label, CATS, opts, progress=False)
    abst = abstention_losses(matrix, row_cat, row_label, CATS, opts)
    la = LAYOUT.arrays()
    arrays = {"layer": la["layer"], "proj": la["proj"], "index": la["index"],
              "weight_norm": np.ones(LAYOUT.total), "mean_intensity": matrix.mean(0),
              "abstention_loss": np.mean(list(abst.values()), axis=0)}
    for key in ("loss", "score", "direction"):
        arrays[key] = np.mean([res[c][key] for c in CATS], axis=0)
    for c in CATS:
        arrays.update({f"{key}.{c}": res[c][key] for key in ("loss", "score", "direction", "mean_intensity")})
        arrays[f"abstention_loss.{c}"] = abst[c]
    sizes = {c: res[c]["sizes"] for c in CATS}
    return arrays, sizes


def _ids(entries) -> list[int]:
    """Global neuron ids of neurons.json entries."""
    return [LAYOUT.flat(n["layer"], n["proj"], n["index"]) for n in entries]


def test_stereotype_contrast_ranks_the_stereotype_neuron_first_and_the_filter_drops_the_unknown_one(items):
    matrix, row_cat, row_label = _planted_rows(items)
    opts = IdentifyOptions(contrast="stereotype", ratio=2 / LAYOUT.total, null_rounds=0)
    arrays, sizes = _arrays(matrix, row_cat, row_label, opts)
    order = np.argsort(arrays["loss"])
    assert order[0] == STEREO_N  # the stereotype neuron separates every pair
    assert order[1] == UNKNOWN_N  # the "unknown" neuron separates the ambiguous pairs only
    nulls = {"combined": None, **{c: None for c in CATS}}
    plain = select_from_arrays(dict(arrays), CATS, nulls, sizes, opts)
    assert _ids(plain["neurons"]) == [STEREO_N, UNKNOWN_N]
    filtered = select_from_arrays(dict(arrays), CATS, nulls, sizes,
                                  IdentifyOptions(contrast="stereotype", ratio=2 / LAYOUT.total, null_rounds=0,
                                                  abstention_filter=True))
    kept = _ids(filtered["neurons"])
    assert kept[0] == STEREO_N and UNKNOWN_N not in kept and len(kept) == 2
    assert filtered["selection"]["abstention_removed"] == 1  # the unknown neuron, and nothing else
    with pytest.raises(CocoError, match=r"the abstention filter leaves \d+ of 16 neurons, fewer"):  # all 16 asked
        select_from_arrays(dict(arrays), CATS, nulls, sizes,
                           IdentifyOptions(contrast="stereotype", ratio=1.0, null_rounds=0, abstention_filter=True))
    for c in CATS:  # per category likewise
        assert UNKNOWN_N not in _ids(filtered["per_category"][c]["neurons"])
        assert _ids(filtered["per_category"][c]["neurons"])[0] == STEREO_N


# --------------------------------------------------------------------------- end to end

def _lettered_model(out):
    """A tiny random Llama whose word vocabulary has the letters (the planted one reads them as <unk>)."""
    import tiny
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tok = tiny.word_tokenizer(tiny.NEUTRAL + tiny.BIASED + tiny.UNBIASED + list(LETTERS))
    return tiny.save_model(LlamaForCausalLM(tiny.tiny_config(vocab_size=len(tok))), tok, out)


def test_identify_stereotype_with_the_filter_then_select_without_it(tmp_path):
    import tiny

    model = _lettered_model(tmp_path / "model")
    bbq = tiny.planted_bbq(tmp_path / "bbq")
    out = tmp_path / "stereo"
    code, _, err = run_cli("identify", model, "--out", out, "--data", bbq, "--categories", "Age,SES", "--split", "all",
                           "--contrast", "stereotype", "--abstention-filter", "--limit", "30", "--null-rounds", "1",
                           "--quiet")
    assert code == 0, err
    meta, arrays = artifact.load(out)
    assert meta["data"]["contrast"] == "stereotype" and meta["selection"]["abstention_filter"] is True
    assert meta["data"]["pairs"] == meta["data"]["abstention_pairs"] == 60  # 10 items x 3 orders x 2 categories
    assert Counter(arrays["row_label"].tolist()) == {0: 60, 1: 60, 2: 60, 3: 60}
    assert "abstention_loss" in arrays and "abstention_loss.Age" in arrays
    assert meta["selection"]["abstention_removed"] is not None
    code, _, err = run_cli("select", out, "--out", tmp_path / "plain", "--no-abstention-filter")
    assert code == 0, err
    plain = json.loads((tmp_path / "plain" / "neurons.json").read_text())
    assert plain["selection"]["abstention_filter"] is False and plain["selection"]["abstention_removed"] is None
    code, _, err = run_cli("select", out, "--out", tmp_path / "steer", "--baseline", "diffmean")
    assert code == 0, err
    steer = json.loads((tmp_path / "steer" / "neurons.json").read_text())["selection"]
    assert steer["baseline"] == "diffmean" and steer["abstention_removed"] is None  # not read off the COCO ranking
    explained = arrays["abstention_loss"] <= arrays["loss"]
    flat = [NeuronLayout(meta["model"]["num_layers"], meta["model"]["q_size"], meta["model"]["kv_size"])
            .flat(n["layer"], n["proj"], n["index"]) for n in meta["neurons"]]
    assert not explained[flat].any()  # the filtered set holds no neuron the control explains


def test_bad_stereotype_options_are_one_line_errors(planted, tmp_path):
    model, pairs = planted
    code, _, err = run_cli("identify", model, "--out", tmp_path / "a", "--abstention-filter", "--quiet")
    assert code == 2 and "--abstention-filter needs --contrast stereotype" in err
    code, _, err = run_cli("identify", model, "--out", tmp_path / "b", "--data", pairs, "--contrast", "stereotype",
                           "--quiet")
    assert code == 2 and "contrast-pairs file" in err and "--contrast response" in err
    code, _, err = run_cli("identify", model, "--out", tmp_path / "c", "--contrast", "stereotype", "--limit", "4",
                           "--quiet")
    assert code == 2 and "--limit 4 is too small for --contrast stereotype" in err
    assert not any((tmp_path / d).exists() for d in "abc")
