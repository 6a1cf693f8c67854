"""LE-COCO (docs/METHOD.md §6): scale each selected neuron by 1 + alpha * w_n.

Baked, W[n,:] <- (1 + alpha w_n) W[n,:] (and the bias likewise); as a LoRA adapter, B A adds
alpha w_n W[n,:] (a gain-only kind, edit/bake.write_lora).
"""

from __future__ import annotations

import math

import numpy as np

from vllm_coco.core.checks import GAIN_MAX
from vllm_coco.core.errors import CocoError
from vllm_coco.edit.kind import LinearKind, Neurons, Param

ALPHA = 1.0


def le_factors(weights: np.ndarray, alpha: float, option: str = "--alpha") -> np.ndarray:
    """The LE factors 1 + alpha * w; CocoError if alpha makes any of them negative (a negative factor
    would flip the neuron's sign instead of scaling it), above GAIN_MAX or not finite in float32.
    `option`: the name the user gave alpha by (`coco-tools ne --le-alpha`)."""
    weights = np.asarray(weights, dtype=np.float64)
    factors = 1.0 + alpha * weights
    with np.errstate(over="ignore"):
        in_range = np.isfinite(factors.astype(np.float32)).all()
    if not in_range:
        raise CocoError(f"{option} {alpha} makes the edit factor 1 + alpha*w overflow float32 (not finite); "
                        f"choose a smaller {option} (the factor scales weights, e.g. 0.25 to 2)")
    if np.any(factors > GAIN_MAX):
        raise CocoError(f"{option} {alpha:g} makes the edit factor 1 + alpha*w exceed {GAIN_MAX:g} (weights up to "
                        f"{weights.max():.3g}); choose a smaller {option} (the factor scales weights, e.g. 0.25 to 2)")
    if np.any(factors < 0):
        pos, neg = weights[weights > 0], weights[weights < 0]
        lo = -1.0 / pos.max() if len(pos) else -math.inf
        hi = 1.0 / -neg.min() if len(neg) else math.inf
        raise CocoError(f"{option} {alpha} makes the edit factor 1 + alpha*w negative for "
                        f"{int(np.sum(factors < 0))} neurons (weights range {weights.min():.3g}..{weights.max():.3g}); "
                        f"choose {option} in [{lo:.4g}, {hi:.4g}]")
    return factors


def _effect(n: Neurons, s, spelling):
    return le_factors(n.weights, s["alpha"], spelling["alpha"]), np.zeros(len(n.weights))


# alpha's range: the factor 1 + alpha w_n stays >= 0 for w_n in [0, 1] (magnitude weights) and at most
# GAIN_MAX (le_factors refuses the rest on the actual weights; the config refuses it before a run)
KIND = LinearKind("le", "LE-COCO", "h_n <- (1 + alpha * w_n) h_n", _effect, params=(
    Param("alpha", ALPHA, "LE strength: each selected neuron scales by 1 + alpha * w_n", lo=-1.0, hi=GAIN_MAX - 1),))
