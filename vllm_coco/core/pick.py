"""Which option a multiple-choice answer is, from the options' log-likelihoods: the one rule.

Used by the stereo_coco / stereo_coco_jailbreak tasks (`pick`, through process_results), by
identify's behavior mode (`vllm_coco.identify.behavior.choose`) and by tools/paired_compare.py,
so a model "answers" an item the same way everywhere.

Scorings (`vllm_coco.core.names.SCORINGS`):
  "sum"       the largest summed log-likelihood of the option's tokens (lm-eval's `acc` rule);
  "per-byte"  the largest log-likelihood per UTF-8 byte of the option text (lm-eval's `acc_norm`
              idea), so a long option such as "Cannot be determined" is not handicapped against a
              one-word name; the divisor is at least 1.
Ties go to the first option.
"""

from __future__ import annotations

from vllm_coco.core.names import SCORING, SCORINGS


def option_scores(logliks, choices, scoring: str = SCORING) -> list[float]:
    """The score of each option under `scoring` (logliks and choices: one entry per option)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring {scoring!r} is not one of {', '.join(SCORINGS)}")
    logliks = [float(x) for x in logliks]
    if len(logliks) != len(choices):
        raise ValueError(f"{len(logliks)} log-likelihoods for {len(choices)} options")
    if scoring == "per-byte":
        return [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(logliks, choices)]
    return logliks


def best_option(logliks, choices, scoring: str = SCORING) -> int:
    """Index of the best-scoring option (ties: the first)."""
    scores = option_scores(logliks, choices, scoring)
    return max(range(len(scores)), key=lambda i: scores[i])


def pick(doc: dict, results) -> int:
    """The displayed position a loglikelihood doc's answer is.

    results: lm-eval's loglikelihood results, one (loglik, is_greedy) per option in displayed
    order; doc["choices"] are the options as displayed, doc["scoring"] the rule (default "sum").
    """
    return best_option([r[0] for r in results], doc["choices"], doc.get("scoring", SCORING))
