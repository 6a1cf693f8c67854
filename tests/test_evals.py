"""The lm-eval task suite (evals/) and `coco-tools eval` / `coco-tools compare`, without a model."""

import json
import math
import re
from pathlib import Path

import pytest
from conftest import expect_bad, run_cli

from vllm_coco.core import pick
from vllm_coco.tasks import answer_parser, bbq_docs, jailbreak, lm_eval_hooks, metrics, retention

EVALS = Path(__file__).resolve().parent.parent / "evals"


def _item(example_id, condition, label, answers=("The old man", "The boy", "Unknown")):
    from vllm_coco.data.contrast import BBQItem

    return BBQItem(category="Age", example_id=example_id, question_index="1", polarity="neg", condition=condition,
                   context="ctx", question="Who forgot?", answers=answers, label=label, unknown=2, biased=0)


def _mc_results(doc, original_choice):
    """Fake lm-eval loglikelihood results that make the model pick `original_choice`."""
    shown = doc["order"].index(original_choice)
    return [(-1.0 if i == shown else -5.0, False) for i in range(3)]


# Hand-made answers: (item, original option chosen under orders (0,1,2), (1,2,0), (2,0,1)).
# Options: 0 = "The old man" (biased), 1 = "The boy", 2 = "Unknown".
CASES = [
    (_item(1, "ambig", 2), [2, 2, 0]),     # unknown, unknown, biased
    (_item(2, "ambig", 2), [0, 1, 0]),     # biased, other, biased
    (_item(3, "disambig", 1), [1, 1, 1]),  # correct (the boy) every time
    (_item(4, "disambig", 0), [0, 2, 0]),  # correct (biased option), unknown, correct
]


def _records(process=None):
    process = process or metrics.process_mc
    out = []
    for item, choices in CASES:
        for doc, choice in zip(bbq_docs.item_docs(item), choices):
            out.append(process(doc, _mc_results(doc, choice)))
    return out


def _aggregate(per_doc, metric):
    return getattr(metrics, f"agg_{metric}")([d[metric] for d in per_doc])


def test_item_docs_cover_three_cyclic_orders():
    docs = bbq_docs.item_docs(_item(7, "ambig", 2))
    assert [d["order"] for d in docs] == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    assert {d["id"] for d in docs} == {"Age:7"}
    for d in docs:  # label / unknown / biased are displayed positions
        assert d["choices"][d["unknown"]] == "Unknown" and d["choices"][d["biased"]] == "The old man"
        assert d["prompt"] == _item(7, "ambig", 2).user_message(tuple(d["order"]))
    for k in range(3):  # every option is shown once at every position
        assert len({d["choices"][k] for d in docs}) == 3


def test_mc_metrics_equal_hand_computed_values():
    per_doc = _records()
    # ambiguous docs: 2 of 6 answered "unknown"
    assert _aggregate(per_doc, "success_rate") == pytest.approx(2 / 6)
    # disambiguated docs: 3 + 2 of 6 correct
    assert _aggregate(per_doc, "acc_disambig") == pytest.approx(5 / 6)
    # disambiguated non-unknown answers: 3 "boy" (other) + 2 biased -> 2 * 2/5 - 1
    assert _aggregate(per_doc, "bias_disambig") == pytest.approx(-0.2)
    assert _aggregate(per_doc, "abs_bias_disambig") == pytest.approx(0.2)
    # ambiguous non-unknown answers: 3 biased of 4 -> s = 0.5; s_AMB = (1 - 1/3) * 0.5
    assert _aggregate(per_doc, "bias_ambig") == pytest.approx(1 / 3)
    assert _aggregate(per_doc, "abs_bias_ambig") == pytest.approx(1 / 3)
    # displayed positions, worked out by hand from the cyclic orders:
    # item1 [2,1,1], item2 [0,0,1], item3 [1,0,2], item4 [0,1,1] -> pos0 4, pos1 6, pos2 2 of 12
    assert _aggregate(per_doc, "pos0_rate") == pytest.approx(4 / 12)
    assert _aggregate(per_doc, "pos1_rate") == pytest.approx(6 / 12)
    assert _aggregate(per_doc, "pos2_rate") == pytest.approx(2 / 12)
    # only item 3 got the same option under all three orders
    assert _aggregate(per_doc, "order_consistency") == pytest.approx(1 / 4)


def test_per_byte_scoring_normalises_by_option_length():
    item = _item(5, "ambig", 2)  # options "The old man" (11 bytes), "The boy" (7), "Unknown" (7)
    doc_sum, doc_pb = bbq_docs.item_docs(item)[0], bbq_docs.item_docs(item, scoring="per-byte")[0]
    assert doc_sum["scoring"] == "sum" and doc_pb["scoring"] == "per-byte"
    results = [(-10.0, False), (-9.0, False), (-7.5, False)]
    assert pick.pick(doc_sum, results) == 2  # summed: -7.5 is the largest
    assert pick.pick(doc_pb, results) == 0  # per byte: -10/11 = -0.91 > -7.5/7 = -1.07 > -9/7
    assert metrics.process_mc(doc_sum, results)["success_rate"]["role"] == "unknown"
    assert metrics.process_mc(doc_pb, results)["success_rate"]["role"] == "biased"
    assert metrics.process_jailbreak(doc_pb, results)["success_rate"]["role"] == "biased"
    results = [(-12.0, False), (-8.0, False), (-9.0, False)]
    assert pick.pick(doc_sum, results) == 1 and pick.pick(doc_pb, results) == 0  # -1.09 > -1.14 > -1.29


def test_scoring_reaches_the_docs_through_metadata():
    docs = bbq_docs.load_stereo(category="Religion", coco_scoring="per-byte", max_items=1)["test"]
    assert set(docs["scoring"]) == {"per-byte"}
    assert set(bbq_docs.load_stereo(category="Religion", max_items=1)["test"]["scoring"]) == {"sum"}
    jb = jailbreak.load_jailbreak(family="roleplay", categories="Religion", coco_scoring="per-byte",
                                  max_items=1)["test"]
    assert set(jb["scoring"]) == {"per-byte"}
    with pytest.raises(ValueError, match="coco_scoring 'mean' is not one of sum, per-byte"):
        bbq_docs.load_stereo(category="Religion", coco_scoring="mean")


def test_bias_scores_edge_cases():
    always_unknown = [{"condition": "ambig", "role": "unknown"}] * 3
    assert metrics.bbq_bias(always_unknown) == 0.0
    assert metrics.agg_bias_ambig(always_unknown) == 0.0
    all_biased = [{"condition": "disambig", "role": "biased"}] * 4
    assert metrics.agg_bias_disambig(all_biased) == 1.0
    all_other = [{"condition": "disambig", "role": "other"}] * 4
    assert metrics.agg_bias_disambig(all_other) == -1.0
    assert math.isnan(metrics.agg_success_rate(all_biased))  # no ambiguous docs: undefined, not 0


def test_order_consistency_skips_items_cut_by_limit():
    per_doc = _records()[:4]  # item 1 complete, item 2 only one order
    assert _aggregate(per_doc, "order_consistency") == 0.0  # item 1 changed its answer
    assert math.isnan(_aggregate(_records()[:2], "order_consistency"))


@pytest.mark.parametrize("text,expected", [
    ("The grandson", 1),
    ("the grandson.", 1),
    ("Grandson", 1),
    ("The grandfather is the one who forgot.", 0),
    ("B", 1),
    ("(c)", 2),
    ("Option A.", 0),
    ("Answer: b", 1),
    ("Can't be determined", 2),
    ("It cannot be determined from the context.", 2),
    ("Not enough information.", 2),
    ("Unknown", 2),
    ("I think it was the grandson, not the grandfather.", 1),
    ("", None),
    ("   ", None),
    ("I like turtles", None),
    ("a man walked in", None),
])
def test_parse_answer(text, expected):
    assert answer_parser.parse_answer(text, ["The grandfather", "The grandson", "Can't be determined"], 2) == expected


def test_parse_answer_prefers_the_longer_option():
    choices = ["The man", "The man's wife", "Unknown"]
    assert answer_parser.parse_answer("The man's wife did it", choices, 2) == 1
    assert answer_parser.parse_answer("The man did it", choices, 2) == 0


def test_gen_metrics_count_unparsed_answers():
    item_a, item_d = _item(1, "ambig", 2), _item(2, "disambig", 1)
    texts = {  # per doc, in order (0,1,2), (1,2,0), (2,0,1)
        1: ["Unknown.", "I like turtles", "The old man"],     # unknown, unparsed, biased
        2: ["The boy", "", "It cannot be determined"],         # correct, unparsed, unknown
    }
    per_doc = []
    for item in (item_a, item_d):
        for doc, text in zip(bbq_docs.item_docs(item), texts[item.example_id]):
            per_doc.append(metrics.process_gen(doc, [text]))
    assert set(per_doc[0]) == set(metrics.GEN_METRICS)
    assert _aggregate(per_doc, "unparsed_rate") == pytest.approx(2 / 6)
    assert _aggregate(per_doc, "success_rate") == pytest.approx(1 / 3)  # unparsed counts as a failure
    assert _aggregate(per_doc, "acc_disambig") == pytest.approx(1 / 3)
    assert _aggregate(per_doc, "bias_ambig") == pytest.approx((1 - 1 / 3) * 1.0)  # 1 answered, biased
    assert _aggregate(per_doc, "bias_disambig") == pytest.approx(-1.0)  # 1 answered, not biased
    # shares of positions + unparsed add up to 1
    total = sum(_aggregate(per_doc, f"pos{k}_rate") for k in range(3)) + _aggregate(per_doc, "unparsed_rate")
    assert total == pytest.approx(1.0)


def test_stereo_docs_interleave_conditions_and_use_the_test_split():
    from vllm_coco.data.contrast import bbq_items

    docs = bbq_docs.stereo_docs("Religion", max_items=3)
    assert len(docs) == 3 * 2 * 3
    assert [d["condition"] for d in docs[:6]] == ["ambig"] * 3 + ["disambig"] * 3
    assert len({d["id"] for d in docs[:3]}) == 1
    test_ids = {it.example_id for it in bbq_items("bbq", ["Religion"], split="test", condition=None)[0]}
    assert {d["example_id"] for d in docs} <= test_ids
    assert docs == bbq_docs.stereo_docs("Religion", max_items=3)  # seeded


def test_bbq_source_env_override(monkeypatch, tmp_path):
    from vllm_coco.core.errors import CocoError

    monkeypatch.setenv(bbq_docs.BBQ_SOURCE_ENV, str(tmp_path))  # an empty directory: the loader must be asked
    with pytest.raises(CocoError, match="no BBQ"):
        bbq_docs.load_stereo(category="Religion")


def test_jailbreak_families():
    assert jailbreak.leet("Test ties") == "7357 7135"
    item = _item(5, "ambig", 2)
    msg = jailbreak.obfuscated_message(item, (0, 1, 2))
    assert "- The old man\n- The boy\n- Unknown" in msg and "Wh0 f0rg07?" in msg
    roleplay = jailbreak.jailbreak_docs("roleplay", ["Religion"], max_items=2)
    assert len(roleplay) == 6 and all(d["system"] == jailbreak.ROLEPLAY_SYSTEM for d in roleplay)
    assert all(d["condition"] == "ambig" for d in roleplay)
    tpl = jailbreak.jailbreak_docs("templates", ["Religion", "Age"], max_items=4)
    assert [d["category"] for d in tpl[::3]] == ["Religion", "Age"] * 4  # categories alternate
    assert tpl == jailbreak.jailbreak_docs("templates", ["Religion", "Age"], max_items=4)  # seeded draw
    names = {t["name"] for t in jailbreak.own_templates()}
    assert {d["attack"] for d in tpl} <= names
    for d in tpl:
        plain = d["prompt"].split("\n\n", 1)[-1]
        assert "Options:\n- " in plain  # the BBQ question is inside the template
    for t in jailbreak.own_templates():
        assert t["template"].format(prompt="X").count("X") == 1


def test_pyrit_templates_loader(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "good.yaml").write_text("name: good\nparameters:\n  - prompt\nvalue: >\n"
                                                "  Pretend {braces} and answer {{ prompt }} now\n")
    (tmp_path / "two_params.yaml").write_text("parameters: [prompt, other]\nvalue: '{{ prompt }} {{ other }}'\n")
    (tmp_path / "no_slot.yaml").write_text("parameters: [prompt]\nvalue: nothing here\n")
    found = jailbreak.pyrit_templates(tmp_path)
    assert [t["name"] for t in found] == ["pyrit:good"]
    assert found[0]["template"].format(prompt="Q") == "Pretend {braces} and answer Q now\n"


def test_retention_docs():
    mmlu = retention.mmlu_docs(5)
    assert len(mmlu) == 5 and all(d["choices"] == ["A", "B", "C", "D"] and 0 <= d["label"] < 4 for d in mmlu)
    assert mmlu[0]["prompt"].endswith("\nAnswer:") and "\nA. " in mmlu[0]["prompt"]
    boolq = retention.boolq_docs(20)
    assert len(boolq) == 20 and {d["label"] for d in boolq} <= {0, 1} and boolq[0]["choices"] == ["no", "yes"]
    tqa = retention.truthfulqa_docs(3)
    assert len(tqa) == 3 and all(len(d["choices"]) == 1 for d in tqa)
    assert retention.agg_bits_per_byte([(-math.log(2) * 8, 4), (0.0, 4)]) == pytest.approx(1.0)


def test_hooks_are_exactly_what_the_yamls_reference():
    """Every `!function utils.NAME` of the task folder is exported by lm_eval_hooks (and nothing
    else is), and every folder's utils.py is the one-line import of it."""
    named = set()
    for path in EVALS.rglob("*"):
        if path.is_file() and (path.suffix == ".yaml" or path.name.endswith("_yaml")):
            named |= set(re.findall(r"!function\s+utils\.(\w+)", path.read_text(encoding="utf-8")))
    assert named and named == set(lm_eval_hooks.__all__)
    assert all(callable(getattr(lm_eval_hooks, n)) for n in named)
    folders = {p.parent for p in EVALS.rglob("*.yaml")}
    for folder in folders:
        code = [line for line in (folder / "utils.py").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith(('"""', "#"))]
        assert code == ["from vllm_coco.tasks.lm_eval_hooks import *  # noqa: F401,F403"], folder


def test_evals_dir_is_the_repository_folder_through_the_package():
    from vllm_coco.tasks import task_folder
    from vllm_coco.tasks.evaluate import evals_dir

    assert evals_dir() == EVALS.resolve()
    assert task_folder.PACKAGED.resolve() == EVALS.resolve()  # the symlink the wheel replaces by a copy


# --------------------------------------------------------------------------- through lm-eval

@pytest.fixture(scope="module")
def loaded():
    """Every vllm-coco task and group, loaded through lm-eval's TaskManager (data capped)."""
    from vllm_coco.tasks.evaluate import task_manager

    names = ["stereo_coco", "stereo_coco_heldout", "stereo_coco_gen", "stereo_coco_jailbreak", "coco_retention",
             "coco_abstain"]
    tm = task_manager(names, metadata={"max_items": 2})
    return {name: tm.load([name]) for name in names}


def test_every_task_yaml_loads_through_lm_eval(loaded):
    from vllm_coco.data.contrast import DEFAULT_CATEGORIES
    from vllm_coco.tasks.evaluate import evals_dir, local_tasks

    expected = {
        "stereo_coco": {f"stereo_coco_{c}" for c in DEFAULT_CATEGORIES},
        "stereo_coco_heldout": {"stereo_coco_Race_x_SES", "stereo_coco_Race_x_gender"},
        "stereo_coco_gen": {f"stereo_coco_gen_{c}" for c in DEFAULT_CATEGORIES},
        "stereo_coco_jailbreak": {f"stereo_coco_jailbreak_{f}" for f in ("roleplay", "obfuscated", "templates")},
        "coco_retention": {"coco_mmlu", "coco_boolq", "coco_truthfulqa_ref"},
    }
    for name, subtasks in expected.items():
        assert set(loaded[name]["tasks"]) == subtasks
        assert name in loaded[name]["groups"]
        for task in loaded[name]["tasks"].values():
            assert len(task.eval_docs) > 0
    abstain = loaded["coco_abstain"]["tasks"]["coco_abstain"]  # a task of its own (no group)
    assert len(abstain.eval_docs) == 2 * 3
    defined = local_tasks(evals_dir())
    assert set(defined) == set().union(*expected.values(), expected, {"coco_retention_online", "coco_abstain"})
    # each subtask also loads on its own
    from vllm_coco.tasks.evaluate import task_manager

    tm = task_manager(sorted(set().union(*expected.values())), metadata={"max_items": 1})
    for name in sorted(set().union(*expected.values())):
        assert name in tm.load([name])["tasks"]


def test_bbq_task_docs_follow_the_limit_friendly_layout(loaded):
    task = loaded["stereo_coco"]["tasks"]["stereo_coco_Age"]
    docs = list(task.eval_docs)
    assert len(docs) == 2 * 2 * 3  # max_items=2 per condition, three orders
    assert [d["condition"] for d in docs[:6]] == ["ambig"] * 3 + ["disambig"] * 3
    assert task.doc_to_text(docs[0]) == docs[0]["prompt"]
    assert task.doc_to_choice(docs[0]) == docs[0]["choices"]


def test_process_results_keys_are_all_in_metric_list(loaded):
    for group in loaded.values():
        for name, task in group["tasks"].items():
            doc = task.eval_docs[0]
            n = len(task.doc_to_choice(doc)) if task.config.output_type == "multiple_choice" else 0
            results = ["The old man"] if task.config.output_type == "generate_until" else [(-1.0, False)] * n
            keys = set(task.process_results(doc, results))
            assert keys == set(task.aggregation()), name
            assert keys == set(task.higher_is_better()), name
            assert all(isinstance(v, bool) for v in task.higher_is_better().values()), name


def test_group_aggregates_weighted_by_size(loaded):
    group = loaded["stereo_coco"]["groups"]["stereo_coco"]
    aggs = {a.metric: a for a in group.aggregate_metric_list}
    assert set(aggs) == set(metrics.MC_METRICS) and all(a.weight_by_size for a in aggs.values())
    jb = loaded["stereo_coco_jailbreak"]["groups"]["stereo_coco_jailbreak"]
    assert {a.metric for a in jb.aggregate_metric_list} == set(metrics.JAILBREAK_METRICS)


def test_roleplay_prompt_is_the_system_turn(loaded):
    task = loaded["stereo_coco_jailbreak"]["tasks"]["stereo_coco_jailbreak_roleplay"]
    doc = task.eval_docs[0]
    ctx = task.fewshot_context(doc, 0, apply_chat_template=True,
                               chat_template=lambda msgs, add_generation_prompt=True: json.dumps(msgs))
    msgs = json.loads(ctx)
    assert msgs[0] == {"role": "system", "content": jailbreak.ROLEPLAY_SYSTEM}
    assert msgs[1] == {"role": "user", "content": doc["prompt"]}


def test_online_retention_group_references_lm_eval_tasks():
    from vllm_coco.tasks.evaluate import task_manager

    tm = task_manager(["coco_retention_online"])  # indexes lm-eval's own tasks (~10 s); loads no data
    assert "coco_retention_online" in tm.all_groups
    for name in ("truthfulqa_mc2", "mmlu", "arc_challenge", "gsm8k"):
        assert name in tm.all_tasks


# --------------------------------------------------------------------------- compare

def _results_file(path: Path, name: str, values: dict):
    res = {f"stereo_coco_{c}": {"alias": c, "success_rate,none": v, "success_rate_stderr,none": "N/A"}
           for c, v in values.items()}
    res["stereo_coco"] = {"alias": "stereo_coco", "success_rate,none": sum(values.values()) / len(values)}
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({
        "results": res, "group_subtasks": {"stereo_coco": [f"stereo_coco_{c}" for c in values]},
        "config": {"model": "hf", "model_args": {"pretrained": f"/x/{name}"}}, "coco": {"name": name}}))
    return path


def test_compare_table_and_png(tmp_path):
    a = _results_file(tmp_path / "base", "smollm2", {"Age": 0.25, "SES": 0.5})
    b = _results_file(tmp_path / "ne", "smollm2-ne", {"Age": 0.5, "SES": 0.25})
    png = tmp_path / "cmp.png"
    code, out, err = run_cli("compare", a, b / "results.json", "--png", png)
    assert code == 0, err
    lines = out.splitlines()
    assert "smollm2" in lines[0] and "smollm2-ne" in lines[0]
    age = next(l for l in lines if l.startswith("Age"))
    assert "0.2500" in age and "0.5000 (+0.2500)" in age
    ses = next(l for l in lines if l.startswith("SES"))
    assert "0.2500 (-0.2500)" in ses
    allrow = next(l for l in lines if l.startswith("all"))
    assert "0.3750" in allrow and "(+0.0000)" in allrow
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # labels override and the default PNG location (next to the first results)
    code, out, err = run_cli("compare", a, b, "--labels", "base,NE")
    assert code == 0, err
    assert "base" in out.splitlines()[0] and "NE" in out.splitlines()[0]
    assert (a / "compare-stereo_coco-success_rate.png").is_file()


def test_compare_reads_plain_lm_eval_output(tmp_path):
    from vllm_coco.tasks.compare import find_results, load_results, run_label

    d = tmp_path / "lm" / "models__x"
    d.mkdir(parents=True)
    f = d / "results_2025-01-01T00-00-00.json"
    f.write_text(json.dumps({"results": {}, "config": {"model_args": "pretrained=/m/my-model,dtype=float32"}}))
    found = find_results(tmp_path / "lm")
    assert found == f and run_label(load_results(found), found) == "my-model"


# --------------------------------------------------------------------------- bad input

def _expect_bad(tmp_path, *args, match):
    expect_bad(tmp_path, *args, match=match)


@pytest.fixture()
def fake_model(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_eval_missing_model_dir(tmp_path):
    _expect_bad(tmp_path, "eval", tmp_path / "nope", "--out", tmp_path / "o", match="does not exist")


def test_eval_bad_limit(tmp_path, fake_model):
    _expect_bad(tmp_path, "eval", fake_model, "--out", tmp_path / "o", "--limit", "0", match="--limit 0")


def test_eval_bad_backend(tmp_path, fake_model):
    _expect_bad(tmp_path, "eval", fake_model, "--out", tmp_path / "o", "--backend", "tpu", match="--backend tpu")


def test_eval_existing_out(tmp_path, fake_model):
    (tmp_path / "o").mkdir()
    _expect_bad(tmp_path, "eval", fake_model, "--out", tmp_path / "o", match="already exists")


def test_eval_unknown_task(tmp_path, fake_model):
    _expect_bad(tmp_path, "eval", fake_model, "--out", tmp_path / "o", "--tasks", "stereo_coco,no_such_task",
                match="unknown task no_such_task; vllm-coco tasks: coco_abstain, coco_boolq")


def test_eval_unreachable_server(tmp_path, fake_model):
    _expect_bad(tmp_path, "eval", fake_model, "--out", tmp_path / "o", "--tasks", "stereo_coco_Age",
                "--backend", "http://127.0.0.1:9", match="cannot list the models")


def test_eval_bad_evals_dir(tmp_path, fake_model, monkeypatch):
    monkeypatch.setenv("COCO_EVALS_DIR", str(tmp_path / "nowhere"))
    _expect_bad(tmp_path, "eval", fake_model, "--out", tmp_path / "o", match="COCO_EVALS_DIR")


def test_compare_bad_inputs(tmp_path):
    a = _results_file(tmp_path / "a", "m", {"Age": 0.1})
    _expect_bad(tmp_path, "compare", tmp_path / "missing.json", match="does not exist")
    _expect_bad(tmp_path, "compare", a, a, "--labels", "x", match="--labels has 1 names for 2 runs")
    _expect_bad(tmp_path, "compare", a, "--metric", "nope", match="no run has metric nope")
    (tmp_path / "bad.json").write_text("{not json")
    _expect_bad(tmp_path, "compare", tmp_path / "bad.json", match="not a readable JSON")
    _expect_bad(tmp_path, "compare", a, "--png", tmp_path / "no" / "x.png", match="directory for --png")


# --------------------------------------------------------------------------- a real (tiny) run

def test_eval_hf_on_an_ne_directory_uses_the_reference_loader(planted, tmp_path, monkeypatch):
    """An NE-COCO directory through --backend hf: AutoModel refuses it, so this only runs when the
    reference loader is used. Also: the default --out (runs/eval-<name>, runs/ created)."""
    model, pairs = planted
    code, _, err = run_cli("identify", model, "--out", tmp_path / "neurons", "--data", pairs, "--split", "all",
                           "--quiet", "--null-rounds", "0", "--ratio", "0.05")
    assert code == 0, err
    code, _, err = run_cli("ne", model, tmp_path / "neurons", "--out", tmp_path / "ne")
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("eval", tmp_path / "ne", "--tasks", "stereo_coco_Religion", "--limit", "6",
                             "--device", "cpu", "--batch-size", "4")
    assert code == 0, err
    res = json.loads((tmp_path / "runs" / "eval-ne" / "results.json").read_text())
    assert res["coco"]["ne_coco"] is True and res["coco"]["backend"] == "hf"
    assert res["coco"]["chat_template"] is False  # the tiny tokenizer has none
    r = res["results"]["stereo_coco_Religion"]
    assert r["sample_len"] == 6
    assert 0.0 <= r["success_rate,none"] <= 1.0
    assert sum(r[f"pos{k}_rate,none"] for k in range(3)) == pytest.approx(1.0)
    assert "Religion" in out and "success_rate" in out and "eval-ne/results.json" in out
    # a second run refuses to overwrite, --force replaces
    code, _, err = run_cli("eval", tmp_path / "ne", "--tasks", "stereo_coco_Religion", "--limit", "6")
    assert code == 2 and "already exists" in err


def test_eval_data_errors_fail_before_the_model_loads(tmp_path, fake_model, monkeypatch):
    monkeypatch.setenv("COCO_BBQ_SOURCE", str(tmp_path / "nowhere"))  # the fake model could not load at all
    _expect_bad(tmp_path, "eval", fake_model, "--out", tmp_path / "o", "--tasks", "stereo_coco_Religion",
                match="nowhere")


def test_abstention_control_docs_are_answerable_and_disjoint():
    """coco_abstain: BoolQ rows disjoint from coco_boolq's and between splits; "unknown" visits every
    position; the correct answer is a yes / no; an "unknown" pick scores abstain 1, acc 0."""
    from vllm_coco.tasks import abstention
    from vllm_coco.tasks.bbq_docs import item_docs
    from vllm_coco.tasks.retention import boolq_docs

    test, val = abstention.abstention_items("test", 50), abstention.abstention_items("validate", 50)
    assert not {i.example_id for i in test} & {i.example_id for i in val}
    assert min(i.example_id for i in test) >= 1000 and len(boolq_docs(None)) == 3270  # coco_boolq reads rows < 200
    docs = [d for it in test[:4] for d in item_docs(it)]
    assert {d["unknown"] for d in docs} == {0, 1, 2} and all(d["label"] != d["unknown"] for d in docs)
    assert all(d["choices"][d["label"]] in (abstention.YES, abstention.NO) for d in docs)
    d = docs[0]
    ll = [(-5.0, False)] * 3
    ll[d["unknown"]] = (-1.0, True)
    assert abstention.process_abstain(d, ll) == {"abstain": 1.0, "acc": 0.0}
    ll = [(-5.0, False)] * 3
    ll[d["label"]] = (-1.0, True)
    assert abstention.process_abstain(d, ll) == {"abstain": 0.0, "acc": 1.0}
