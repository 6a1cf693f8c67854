"""Which neurons to keep: top ratio (or threshold) by COCO score, the RAND / NORM / MACT baselines
with the same count, the DIFFMEAN steering layer, and the per-neuron edit weights (docs/METHOD.md §5)."""

from __future__ import annotations

import numpy as np

from vllm_coco.core.errors import CocoError
from vllm_coco.core.names import BASELINES, WEIGHTINGS, Proj


def count_for(total: int, ratio: float) -> int:
    if not 0 < ratio <= 1:
        raise CocoError(f"--ratio {ratio} is outside (0, 1]; pass e.g. --ratio 0.01 for 1% of neurons")
    return max(1, round(ratio * total))


def top_by_loss(loss: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k lowest losses, best first (ties by index: deterministic)."""
    return np.lexsort((np.arange(len(loss)), loss))[:k]


def above_threshold(score: np.ndarray, loss: np.ndarray, threshold: float) -> np.ndarray:
    """Neurons whose score is at least `threshold`, best (lowest loss) first."""
    keep = np.flatnonzero(score >= threshold)
    return keep[np.lexsort((keep, loss[keep]))]


def rand_like(selected: np.ndarray, proj: np.ndarray, seed: int) -> np.ndarray:
    """RAND: random neurons with the same per-projection counts as `selected` (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for p in Proj:
        k = int(np.sum(proj[selected] == p))
        if k:
            out.append(rng.choice(np.flatnonzero(proj == p), size=k, replace=False))
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def top_by_value(values: np.ndarray, k: int) -> np.ndarray:
    """NORM / MACT: the k largest values, largest first."""
    return np.lexsort((np.arange(len(values)), -values))[:k]


def steering_layer(arrays: dict[str, np.ndarray], suffix: str = "") -> np.ndarray:
    """DIFFMEAN: every v channel of the layer whose mean difference is largest relative to its
    activations, ||mean_diff_v(l)|| / ||calib_mean_v(l)|| (docs/METHOD.md §5.4), by channel."""
    if "mean_diff" + suffix not in arrays:
        raise CocoError("this artifact predates the signed mean differences --baseline diffmean reads; "
                        "re-run `coco-tools identify`")
    diff, scale = arrays["mean_diff" + suffix].astype(np.float64), arrays["calib_mean"].astype(np.float64)
    v = arrays["proj"] == Proj.v
    by_layer = [v & (arrays["layer"] == layer) for layer in np.unique(arrays["layer"][v])]  # [N] masks
    ratio = [np.linalg.norm(diff[m]) / max(np.linalg.norm(scale[m]), 1e-12) for m in by_layer]
    return np.flatnonzero(by_layer[int(np.argmax(ratio))])


def baseline(kind: str, coco_selected: np.ndarray, arrays: dict[str, np.ndarray], seed: int, suffix: str = ""):
    """The neuron set of a baseline: RAND / NORM / MACT with the same count as the COCO selection,
    DIFFMEAN one layer's v channels. `suffix` (".<category>") picks a category's own statistics."""
    k = len(coco_selected)
    if kind == "coco":
        return coco_selected
    if kind == "rand":
        return rand_like(coco_selected, arrays["proj"], seed)
    if kind == "norm":
        return top_by_value(arrays["weight_norm"], k)
    if kind == "mact":
        return top_by_value(arrays["mean_intensity" + suffix], k)
    if kind == "diffmean":
        return steering_layer(arrays, suffix)
    raise CocoError(f"unknown --baseline {kind}; choose one of {', '.join(BASELINES)}")


def edit_weights(directions: np.ndarray, weighting: str = "magnitude") -> np.ndarray:
    """w_n from the directions of a set: |d|/max|d| in [0, 1] (magnitude) or d/max|d| in [-1, 1] (signed)."""
    if weighting not in WEIGHTINGS:
        raise CocoError(f"unknown --weighting {weighting}; choose {' or '.join(WEIGHTINGS)}")
    if len(directions) == 0:
        return np.zeros(0)
    peak = np.max(np.abs(directions))
    if peak == 0:
        return np.zeros_like(directions)
    return (np.abs(directions) if weighting == "magnitude" else directions) / peak
