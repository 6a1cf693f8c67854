"""Split-half stability of a neuron selection: is the set signal, or an accident of the sample?

The identify data of every category is split at random into two disjoint halves (a contrast pair
stays whole: both of its rows go to the same half, so response-mode scoring keeps its pairing),
each half is scored and selected on its own (`run.rescore`: the stored intensity matrix, no model
run), and the two selections are compared by their Jaccard overlap |A ∩ B| / |A ∪ B|. A selection
that is signal reappears from independent data; one that is sampling does not, and its overlap
sits near `chance_jaccard`, the overlap two random sets of the same size would have.

Smaller nested subsamples (a quarter of the data on each side, drawn from the halves) show the
trend: an overlap that still rises from a quarter to a half says more identify data would move
the selection further (docs/METHOD.md, "Stability").
"""

from __future__ import annotations

import numpy as np

from vllm_coco.core.names import ROW_BIASED, ROW_NAMED, ROW_UNBIASED, ROW_UNKNOWN

MIN_UNITS = 2  # a side of a category needs >= 2 rows for the COCO score's positives (a derangement)


def split_halves(row_cat: np.ndarray, row_label: np.ndarray, paired: bool, seed: int,
                 fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray] | None:
    """Two disjoint sets of matrix rows, each holding `fraction` (<= 0.5) of every category's
    contrast units, drawn with `seed`; None when a category would get fewer than MIN_UNITS.

    row_cat, row_label: [rows] category index and side (0 biased, 1 unbiased) of each captured row.
    paired (response, stereotype mode): the i-th biased and i-th unbiased row of a category are one
    pair, and pairs are split whole (with the i-th named and unknown row of the abstention control,
    labels 2 and 3, when a stereotype run recorded one: the same item's control pair). Unpaired
    (behavior mode): each side is split on its own. The same seed with a smaller fraction gives
    subsets of the halves (nested), so overlaps at two fractions are comparable."""
    if not 0 < fraction <= 0.5:
        raise ValueError(f"fraction {fraction} must be in (0, 0.5]")
    rng = np.random.default_rng(seed)
    halves: tuple[list, list] = ([], [])
    for c in np.unique(row_cat):
        ra = np.flatnonzero((row_cat == c) & (row_label == ROW_BIASED))  # [nA] biased rows, in pair order
        rb = np.flatnonzero((row_cat == c) & (row_label == ROW_UNBIASED))  # [nB]
        control = [np.flatnonzero((row_cat == c) & (row_label == label))  # [nA] each, or empty
                   for label in (ROW_NAMED, ROW_UNKNOWN)]
        with_control = paired and len(control[0]) == len(ra)
        sides = ([np.stack([ra, rb, *control] if with_control else [ra, rb], 1)] if paired
                 else [ra[:, None], rb[:, None]])  # [units, rows per unit]
        for units in sides:
            order = rng.permutation(len(units))
            half, take = len(units) // 2, int(len(units) * fraction)
            if take < MIN_UNITS:
                return None
            halves[0].append(units[order[:take]].ravel())
            halves[1].append(units[order[half:half + take]].ravel())
    # sorted rows keep each half's i-th biased / i-th unbiased row a pair (score_matrix reads them in order)
    return tuple(np.sort(np.concatenate(h)).astype(np.int64) for h in halves)


def units_per_category(rows: np.ndarray, row_cat: np.ndarray, row_label: np.ndarray) -> int:
    """The smallest number of biased rows (= pairs in response mode) any category has among `rows`."""
    cats, label = row_cat[rows], row_label[rows]
    return int(min(np.sum((cats == c) & (label == 0)) for c in np.unique(row_cat)))


def jaccard(a, b) -> float:
    """|a ∩ b| / |a ∪ b| of two sets of neuron ids (1.0 for two empty sets)."""
    a, b = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def chance_jaccard(k: int, n: int) -> float:
    """The Jaccard overlap two independent uniformly random k-subsets of n neurons have on average
    (to first order: E|A ∩ B| = k² / n, |A ∪ B| = 2k - |A ∩ B|)."""
    shared = k * k / n
    return shared / (2 * k - shared) if k else 1.0
