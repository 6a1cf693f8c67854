"""The `behavior` contrast mode of identify: the model answers the ambiguous items itself.

docs/METHOD.md §2.4: no teacher forcing. The model answers each ambiguous item of the identify
split with its highest-likelihood option; X_c = the items of category c it answered with the
biased option, Y_c = those it answered "unknown" (answers naming the other group are in
neither). Intensities are |h_n| at the decision point, the last prompt token, so both sets see
the same kind of text - unlike `response` mode, where the unbiased side is always an
"unknown"-type phrase and the top neurons can track wording. The sets are unpaired; a category
with fewer than MIN_PER_SET items in either set is refused.

The option is chosen the way the stereo_coco evaluation scores it (`scoring`: summed
log-likelihood of the option's tokens, or per UTF-8 byte of its text), on the same prompt
(`BBQItem.user_message()`, options in BBQ's order, chat template or plain).
"""

from __future__ import annotations

# Lazy imports: torch is imported inside the functions that use it (directly or through the modules
# they import), so importing this module stays light.
from collections import Counter

import numpy as np
from tqdm.auto import tqdm

from vllm_coco.core.errors import CocoError
from vllm_coco.core.names import SCORING, SCORINGS
from vllm_coco.core.pick import best_option
from vllm_coco.data.contrast import encode_example
from vllm_coco.identify.capture import Span, _batches, _collate

MIN_PER_SET = 10  # docs/METHOD.md §2.4: refuse a category with fewer biased or fewer "unknown" answers


def option_spans(tokenizer, items, chat: bool = True) -> list[Span]:
    """Three spans per item (its options in BBQ order): prompt + option, pooled over the option."""
    spans = []
    for it in items:
        for option in it.answers:
            ids, start = encode_example(tokenizer, it.user_message(), option, chat=chat)
            spans.append(Span(ids, start, len(ids)))
    return spans


def option_logliks(model, spans: list[Span], batch_size: int = 8, pad_id: int = 0,
                   progress: bool = False) -> np.ndarray:
    """Summed log-likelihood of each span's tokens given what precedes them: [spans] float64."""
    import torch

    device = next(model.parameters()).device
    out = np.zeros(len(spans), dtype=np.float64)
    with torch.inference_mode():
        for idx in tqdm(_batches(spans, batch_size), desc="answer", unit="batch", disable=not progress):
            ids, attn, span = _collate(spans, idx, pad_id, device)  # [batch, tokens] each
            logits = model(input_ids=ids, attention_mask=attn).logits  # [batch, tokens, vocab]
            # token t is predicted by the logits at t - 1; normalise only those rows (a 128k
            # vocabulary makes a full [batch, tokens, vocab] log_softmax copy large)
            mask = span[:, 1:] > 0  # [batch, tokens - 1]
            rows = logits[:, :-1][mask].float()  # [span tokens, vocab]
            tok = rows.log_softmax(-1).gather(-1, ids[:, 1:][mask][:, None])[:, 0]  # [span tokens]
            sums = torch.zeros(len(idx), dtype=torch.float64, device=device)
            sums.index_add_(0, mask.nonzero()[:, 0], tok.double())  # [batch]
            out[idx] = sums.cpu().numpy()
    return out


def choose(items, logliks: np.ndarray, scoring: str = SCORING) -> list[int]:
    """The option each item's answer is (original index), from its three log-likelihoods
    (logliks: [items * 3], item-major), by the evaluation's rule (`vllm_coco.core.pick`: summed
    or per UTF-8 byte of the option text; ties go to the first option)."""
    if scoring not in SCORINGS:
        raise CocoError(f"scoring {scoring} is not one of {', '.join(SCORINGS)}")
    ll = np.asarray(logliks, dtype=np.float64).reshape(len(items), 3)  # [items, options]
    return [best_option(row, it.answers, scoring) for it, row in zip(items, ll)]


def contrast_sets(items, answers: list[int]) -> tuple[list, list, dict]:
    """(X, Y, counts): X the items answered with the biased option, Y those answered "unknown";
    counts[category] = {"answered", "biased", "unknown", "other"}."""
    xs, ys = [], []
    counts: dict[str, Counter] = {}
    for it, ans in zip(items, answers):
        c = counts.setdefault(it.category, Counter())
        c["answered"] += 1
        if ans == it.biased:
            xs.append(it)
            c["biased"] += 1
        elif ans == it.unknown:
            ys.append(it)
            c["unknown"] += 1
        else:
            c["other"] += 1
    return xs, ys, {cat: {k: int(c[k]) for k in ("answered", "biased", "unknown", "other")}
                    for cat, c in counts.items()}


def check_sets(counts: dict, split: str, minimum: int | None = None, chat: bool = True,
               scoring: str = SCORING) -> None:
    """CocoError naming the first category whose biased or "unknown" set is smaller than
    `minimum` (default MIN_PER_SET); the fixes offered leave out the settings already in use."""
    minimum = MIN_PER_SET if minimum is None else minimum
    fixes = ["raise the items per category (--limit; pipeline: identify.limit)"]
    if chat:
        fixes.append("use plain prompts (--no-chat; data.chat_template: false)")
    if scoring != "per-byte":
        fixes.append("score options per byte (--scoring per-byte; eval.scoring: per-byte)")
    fixes.append("or use --contrast response (identify.contrast: response)")
    for cat, c in counts.items():
        if c["biased"] < minimum or c["unknown"] < minimum:
            raise CocoError(
                f"category {cat}: the model answered {c['biased']} of {c['answered']} ambiguous {split} items "
                f"with the biased option and {c['unknown']} with \"unknown\"; behavior mode needs at least "
                f"{minimum} of each: " + ", ".join(fixes))


def decision_spans(tokenizer, items, chat: bool = True) -> list[Span]:
    """One span per item: its prompt, pooled over the last prompt token only (the decision point)."""
    spans = []
    for it in items:
        ids, start = encode_example(tokenizer, it.user_message(), it.answers[it.unknown], chat=chat)
        spans.append(Span(ids[:start], start - 1, start))
    return spans
