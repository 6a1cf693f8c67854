"""Contrast data: BBQ answer-role mapping, seeded disjoint splits, the four sources."""

import json
import shutil

import pytest

from vllm_coco.core.errors import CocoError
from vllm_coco.data import contrast as data


def _row(**kw):
    row = {"example_id": 0, "question_index": "1", "question_polarity": "neg", "context_condition": "ambig",
           "category": "Race_ethnicity", "context": "c", "question": "q", "label": 2,
           "ans0": "The Black woman", "ans1": "The White woman", "ans2": "Unknown",
           "answer_info": {"ans0": ["Black", "F-Black"], "ans1": ["White", "F-White"], "ans2": ["Unknown", "unknown"]},
           "additional_metadata": {"stereotyped_groups": ["Black", "African American"]}}
    row.update(kw)
    return row


def test_race_prefix_and_polarity():
    it = data.bbq_item(_row())
    assert (it.unknown, it.biased) == (2, 0)
    it = data.bbq_item(_row(question_polarity="nonneg"))
    assert it.biased == 1  # the non-stereotyped group is the biased answer to a non-negative question


def test_gender_ses_and_nationality_labels():
    g = _row(answer_info={"ans0": ["man", "man"], "ans1": ["woman", "woman"], "ans2": ["Unknown", "unknown"]},
             additional_metadata={"stereotyped_groups": ["F"]})
    assert data.bbq_item(g).biased == 1
    t = _row(answer_info={"ans0": ["trans woman", "trans_F"], "ans1": ["cis woman", "nonTrans_F"],
                          "ans2": ["Unknown", "unknown"]},
             additional_metadata={"stereotyped_groups": ["Transgender women"]})
    assert data.bbq_item(t).biased == 0
    s = _row(answer_info={"ans0": ["rich", "highSES"], "ans1": ["poor", "lowSES"], "ans2": ["Unknown", "unknown"]},
             additional_metadata={"stereotyped_groups": ["low SES"]})
    assert data.bbq_item(s).biased == 1
    n = _row(answer_info={"ans0": ["Nigerian", "Africa"], "ans1": ["Swedish", "Europe"],
                          "ans2": ["Unknown", "unknown"]},
             additional_metadata={"stereotyped_groups": ["Nigerian"]})
    assert data.bbq_item(n).biased == 0
    age = _row(answer_info={"ans0": ["young", "nonOld"], "ans1": ["old", "old"], "ans2": ["Unknown", "unknown"]},
               additional_metadata={"stereotyped_groups": ["old"]})
    assert data.bbq_item(age).biased == 1  # "nonOld" must not match "old"


def test_ambiguous_mapping_is_dropped():
    both = _row(answer_info={"ans0": ["Black", "Black"], "ans1": ["African American", "African American"],
                             "ans2": ["Unknown", "unknown"]})
    assert data.bbq_item(both) is None


def test_packaged_bbq_splits_are_disjoint_and_seeded():
    items = {}
    for split in data.SPLITS:
        its, stats = data.bbq_items("bbq", ["Age", "Religion"], split=split)
        items[split] = its
        assert all(it.condition == "ambig" for it in its)
    for cat in ("Age", "Religion"):
        groups = [{it.question_index for it in items[s] if it.category == cat} for s in data.SPLITS]
        assert all(groups), "every split gets templates"
        assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    again, _ = data.bbq_items("bbq", ["Age"], split="identify")
    assert [i.example_id for i in again] == [i.example_id for i in items["identify"] if i.category == "Age"]
    other, _ = data.bbq_items("bbq", ["Age"], split="identify", seed=5)
    assert {i.question_index for i in other} != {i.question_index for i in again}


def test_default_categories_map_nearly_everything():
    _, stats = data.bbq_items("bbq", data.DEFAULT_CATEGORIES, split="all")
    for cat, s in stats.items():
        assert s["items"] > 0 and s["dropped"] <= 0.01 * s["items"], (cat, s)


def test_limit_is_per_category_and_seeded():
    pairs, info = data.load_contrast("bbq", ["Age", "SES"], limit=5)
    assert data.category_counts(pairs) == {"Age": 5, "SES": 5}
    again, _ = data.load_contrast("bbq", ["Age", "SES"], limit=5)
    assert pairs == again
    assert info["counts"]["Age"]["used"] == 5


def test_native_directory_and_hub_local_copy_agree(tmp_path):
    src = data.packaged_bbq_dir()
    native = tmp_path / "native"
    native.mkdir()
    shutil.copy(src / "Religion.jsonl", native / "Religion.jsonl")
    # a local copy of a hub dataset repo: one config per category, split "test"
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    shutil.copy(src / "Religion.jsonl", hub / "data" / "Religion.jsonl")
    (hub / "README.md").write_text("---\nconfigs:\n- config_name: Religion\n  data_files:\n"
                                   "  - split: test\n    path: data/Religion.jsonl\n---\n")
    a, _ = data.load_contrast(str(native), ["Religion"], limit=6)
    b, _ = data.load_contrast(f"hf:{hub}", ["Religion"], limit=6)
    c, _ = data.load_contrast("bbq", ["Religion"], limit=6)
    assert a == b == c and len(a) == 6


def test_jsonl_pairs_and_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    lines = [{"category": "A", "prompt": f"p{i}", "biased": "b", "unbiased": "u"} for i in range(4)]
    good.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    pairs, info = data.load_contrast(str(good), split="all")
    assert len(pairs) == 4 and info["kind"] == "jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(CocoError, match=r"bad.jsonl:2: malformed JSON"):
        data.load_contrast(str(bad), split="all")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"category": "A", "prompt": "x"}) + "\n")
    with pytest.raises(CocoError, match=r"missing.jsonl:2: .*biased, unbiased"):
        data.load_contrast(str(missing), split="all")
    with pytest.raises(CocoError, match="unknown category Z.*valid: A"):
        data.load_contrast(str(good), ["Z"], split="all")


def test_unknown_bbq_category_lists_valid_ones():
    with pytest.raises(CocoError, match="unknown category Agee.*valid: .*Age"):
        data.load_contrast("bbq", ["Agee"])


def test_encode_without_chat_template_joins_with_a_space():
    import tiny

    tok = tiny.word_tokenizer(["n1", "n2", "b1"])
    ids, start = data.encode_example(tok, "n1 n2", "b1")
    assert tok.convert_ids_to_tokens(ids[start:]) == ["b1"]
    assert tok.convert_ids_to_tokens(ids[:start]) == ["n1", "n2"]


def test_encode_can_skip_the_chat_template():
    import tiny

    tok = tiny.word_tokenizer(["n1", "n2", "b1"])
    tok.chat_template = ("{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
                         "{% if add_generation_prompt %}>{% endif %}")
    with_chat, start = data.encode_example(tok, "n1 n2", "b1")
    plain, pstart = data.encode_example(tok, "n1 n2", "b1", chat=False)
    assert plain == data.encode_example(tiny.word_tokenizer(["n1", "n2", "b1"]), "n1 n2", "b1")[0]
    assert with_chat != plain
    assert tok.convert_ids_to_tokens(with_chat[start:]) == tok.convert_ids_to_tokens(plain[pstart:]) == ["b1"]


def test_the_split_does_not_depend_on_the_seed():
    """--seed changes the sample, never the split: the evaluation splits with the fixed SPLIT_SEED,
    so identify pairs drawn under any seed come from identify-split templates only."""
    from vllm_coco.data.contrast import bbq_items, load_contrast

    test_templates = {it.question_index for it in bbq_items("bbq", ["Religion"], split="test", condition=None)[0]}
    for seed in (0, 1, 7):
        pairs, info = load_contrast("bbq", ["Religion"], split="identify", limit=20, seed=seed)
        assert pairs and not {p.group for p in pairs} & test_templates
        assert info["split_seed"] == 0 and info["seed"] == seed
