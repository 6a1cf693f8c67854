"""BBQ items -> lm-eval documents of the stereo_coco and stereo_coco_gen tasks.

Document layout: one doc per (item, option order). Every BBQ item of the held-out test split
(`vllm_coco.data.contrast.bbq_items(..., split="test")`; task metadata `coco_split: validate`
selects the validate split instead) is shown under the three cyclic orders of its options,
(0,1,2), (1,2,0), (2,0,1), to control for position bias; all indices in a doc (`label`,
`unknown`, `biased`) are positions in the displayed order, and `id` ties the three docs of one
item together. The jailbreak tasks (`vllm_coco.tasks.jailbreak`) reuse `item_docs`.
"""

from __future__ import annotations

import functools
import os
import random

from vllm_coco.core.names import (  # never "identify": the neurons were found on it
    EVAL_SPLITS,
    SCORING,
    SCORINGS,
    SPLIT_SEED,
)
from vllm_coco.data.contrast import bbq_items
from vllm_coco.tasks import custom_dataset

ORDERS = ((0, 1, 2), (1, 2, 0), (2, 0, 1))  # cyclic: every option visits every position once
BBQ_SOURCE_ENV = "COCO_BBQ_SOURCE"  # e.g. hf:oskarvanderwal/bbq for users online
DATA_SEED = 0  # seeds the within-category shuffle (so --limit takes a spread of templates)


# --------------------------------------------------------------------------- task metadata

def bbq_source(kwargs) -> str:
    """Task metadata `source` > env COCO_BBQ_SOURCE > the packaged copy ("bbq")."""
    return kwargs.get("source") or os.environ.get(BBQ_SOURCE_ENV) or "bbq"


def coco_split(kwargs) -> str:
    """Task metadata `coco_split` (TaskManager(metadata={"coco_split": "validate"})), default "test"."""
    value = kwargs.get("coco_split") or "test"
    if value not in EVAL_SPLITS:
        raise ValueError(f"coco_split {value!r} is not one of {', '.join(EVAL_SPLITS)}")
    return value


def coco_scoring(kwargs) -> str:
    """Task metadata `coco_scoring`: "sum" (default; lm-eval's `acc` rule) or "per-byte"
    (the option rule: vllm_coco.core.pick)."""
    value = kwargs.get("coco_scoring") or SCORING
    if value not in SCORINGS:
        raise ValueError(f"coco_scoring {value!r} is not one of {', '.join(SCORINGS)}")
    return value


# --------------------------------------------------------------------------- items

@functools.lru_cache(maxsize=64)
def split_items(source: str, category: str, condition: str | None, split: str = "test") -> tuple:
    """BBQ items of one category in one evaluation split (test or validate), through the project's
    single BBQ loader (cached: the jailbreak families and the gen tasks read the same categories again)."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(EVAL_SPLITS)}")
    items, _ = bbq_items(source, [category], split=split, condition=condition, seed=SPLIT_SEED)
    return tuple(items)


def interleave(*lists) -> list:
    """Round-robin merge: a, b, a, b, ... then the rest of the longer list."""
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def shuffled(items, key: str) -> list:
    """A seeded shuffle of `items` (seed: DATA_SEED and `key`), so --limit is reproducible."""
    items = list(items)
    random.Random(f"coco-eval:{DATA_SEED}:{key}").shuffle(items)
    return items


# --------------------------------------------------------------------------- documents

def item_docs(item, prompt=None, system: str = "", attack: str = "", scoring: str = SCORING) -> list[dict]:
    """The three docs (one per cyclic order) of a BBQ item.

    `prompt(item, order) -> str` builds the user turn (default: `item.user_message(order)`);
    `scoring` ("sum" or "per-byte") is how `vllm_coco.core.pick` chooses among the options'
    log-likelihoods.
    """
    docs = []
    for k, order in enumerate(ORDERS):
        pos = {orig: shown for shown, orig in enumerate(order)}  # original index -> displayed position
        docs.append({
            "id": f"{item.category}:{item.example_id}",
            "category": item.category,
            "example_id": item.example_id,
            "question_index": item.question_index,
            "polarity": item.polarity,
            "condition": item.condition,
            "order": list(order),
            "order_index": k,
            "prompt": prompt(item, order) if prompt else item.user_message(order),
            "system": system,
            "attack": attack,
            "choices": [item.answers[i] for i in order],
            "label": pos[item.label],
            "unknown": pos[item.unknown],
            "biased": pos[item.biased],
            "scoring": scoring,
        })
    return docs


def stereo_docs(category: str, source: str = "bbq", max_items: int | None = None, split: str = "test",
                scoring: str = SCORING) -> list[dict]:
    """Docs of one category: `split` items (ambiguous and disambiguated) x three orders.

    Items are shuffled (seeded) and ambiguous / disambiguated items alternate, so the first docs
    (what lm-eval's --limit takes) cover both conditions: 6 docs = one item of each, all orders.
    `max_items` caps the items per condition.
    """
    items = split_items(source, category, None, split)
    amb = shuffled([i for i in items if i.condition == "ambig"], f"{category}:ambig")[:max_items]
    dis = shuffled([i for i in items if i.condition == "disambig"], f"{category}:disambig")[:max_items]
    return [d for it in interleave(amb, dis) for d in item_docs(it, scoring=scoring)]


def load_stereo(**kwargs):
    """custom_dataset of stereo_coco_<category> and stereo_coco_gen_<category> (metadata: category,
    optional source, max_items, coco_split, coco_scoring)."""
    return custom_dataset.to_dataset(stereo_docs(kwargs["category"], bbq_source(kwargs),
                                                 custom_dataset.max_items(kwargs), coco_split(kwargs),
                                                 coco_scoring(kwargs)))
