"""The COCO score (docs/METHOD.md §3): an InfoNCE loss over intensities, per neuron, vectorized.

For neuron n, with A = intensities on biased examples and B = on unbiased ones:
    sigma      = std(A ∪ B), floored at 1e-6·mean|A ∪ B| + 1e-12
    s(u, v)    = -|u - v| / (tau · sigma)
    l(x)       = -log( e^{s(x,x+)} / (e^{s(x,x+)} + Σ_y e^{s(x,y)}) )   x+ = derangement of X,
                 y over all of B (or K seeded samples when |B| > K); symmetric for anchors in B
    L          = mean of all anchor losses;  S = log(1 + K) - L
Ranks use L (float64): near the top S = log(1+K) - L loses the digits L keeps.
"""

from __future__ import annotations

# Lazy imports: torch is imported inside the functions that use it (directly or through the modules
# they import), so importing this module stays light.
import math
from dataclasses import dataclass

import numpy as np

from vllm_coco.core.names import K_NEGATIVES, TAU  # noqa: F401 (re-exported: scoring.TAU)

# Elements of the [anchors, negatives, neurons] tensor per chunk: bounds scoring memory (~64 MB in float64).
# A chunk makes a handful of such temporaries; a GPU with tens of GB free can take 1 << 28 (2 GB each),
# which keeps its kernels long enough to be worth launching.
CHUNK_ELEMENTS = 1 << 23
CHUNK_ELEMENTS_GPU = 1 << 28


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of range(n) with no fixed point (n >= 2)."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 elements")
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def _negatives(n_anchors: int, n_pool: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[anchors, negatives] indices into the negative pool: all of it, or k samples per anchor."""
    if n_pool <= k:
        return np.broadcast_to(np.arange(n_pool), (n_anchors, n_pool))
    return np.stack([rng.choice(n_pool, size=k, replace=False) for _ in range(n_anchors)])


@dataclass(frozen=True)
class Plan:
    """The seeded sampling of one category: positives and negatives for each anchor side."""

    pos_a: np.ndarray  # [nA] derangement of A
    neg_a: np.ndarray  # [nA, kA] indices into B
    pos_b: np.ndarray  # [nB]
    neg_b: np.ndarray  # [nB, kB] indices into A

    @classmethod
    def make(cls, n_a: int, n_b: int, seed: int = 0, k: int = K_NEGATIVES) -> Plan:
        rng = np.random.default_rng(seed)
        return cls(derangement(n_a, rng), _negatives(n_a, n_b, k, rng),
                   derangement(n_b, rng), _negatives(n_b, n_a, k, rng))

    @property
    def log1pk(self) -> float:
        """Mean over anchors of log(1 + K): the loss of a neuron with no contrast at all is about this."""
        n_a, n_b = len(self.pos_a), len(self.pos_b)
        return (n_a * math.log1p(self.neg_a.shape[1]) + n_b * math.log1p(self.neg_b.shape[1])) / (n_a + n_b)


def sigma_of(a, b):
    """Per-neuron std of A ∪ B with its floor (docs/METHOD.md §3). a: [nA, n], b: [nB, n] -> [n], on their device."""
    import torch

    both = torch.cat([a, b])  # [nA + nB, n]
    floor = 1e-6 * both.abs().mean(0) + 1e-12
    return torch.maximum(both.std(0, unbiased=False), floor)


def _side_loss(anchor, pos_idx, neg_pool, neg_idx, scale):
    """Summed InfoNCE loss of one anchor side. anchor: [n_anchor, n]; neg_pool: [n_pool, n] -> [n]."""
    import torch

    s_pos = -(anchor - anchor[pos_idx]).abs() * scale  # [n_anchor, n]
    s_neg = -(anchor[:, None, :] - neg_pool[neg_idx]).abs() * scale  # [n_anchor, k, n]
    d = s_neg - s_pos[:, None, :]  # log-odds of each negative against the positive
    # l = log(1 + Σ e^d). With m = max(0, max d): l = m + log1p(expm1(-m) + Σ e^(d-m)), exact near 0.
    m = d.amax(1).clamp_min(0)  # [n_anchor, n]
    l = m + torch.log1p(torch.expm1(-m) + torch.exp(d - m[:, None, :]).sum(1))
    return l.sum(0)


def coco_loss(a, b, plan: Plan, tau: float = TAU, chunk_elements: int | None = None):
    """Per-neuron COCO loss L. a: [nA, n], b: [nB, n] torch tensors (float64 recommended) -> [n].
    A neuron constant over A ∪ B gets L = inf (score -inf): it has no contrast to rank by.

    Runs on the device of `a` and `b` (one device): the plan's indices go there and so does the result.
    `chunk_elements` bounds the [anchors, negatives, neurons] temporaries (default CHUNK_ELEMENTS);
    neurons are independent, so the chunking changes no result beyond rounding in the last digits."""
    import torch

    dev = a.device

    def idx(x):  # a plan array as an int64 tensor on the data's device
        return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.int64, device=dev)

    pos_a, neg_a, pos_b, neg_b = idx(plan.pos_a), idx(plan.neg_a), idx(plan.pos_b), idx(plan.neg_b)
    n_a, n_b = a.shape[0], b.shape[0]
    per_neuron = max(n_a * neg_a.shape[1], n_b * neg_b.shape[1])
    step = max(1, (CHUNK_ELEMENTS if chunk_elements is None else chunk_elements) // per_neuron)
    out = torch.empty(a.shape[1], dtype=a.dtype, device=dev)  # [n]
    for c0 in range(0, a.shape[1], step):
        ac, bc = a[:, c0:c0 + step], b[:, c0:c0 + step]
        scale = 1.0 / (tau * sigma_of(ac, bc))  # [step]
        total = _side_loss(ac, pos_a, bc, neg_a, scale) + _side_loss(bc, pos_b, ac, neg_b, scale)
        loss = total / (n_a + n_b)  # [step]
        # A neuron with one value on every row carries no contrast, yet every similarity is then 0
        # and the formula gives L = log(1 + K) (S = 0), above every real neuron (they score < 0):
        # e.g. all of layer 0 at a fixed last prompt token in behavior mode. It ranks last instead.
        # (torch.where, not a boolean-mask store: no host synchronisation on a GPU.)
        both = torch.cat([ac, bc])  # [nA + nB, step]
        out[c0:c0 + step] = torch.where(both.amax(0) == both.amin(0), math.inf, loss)
    return out


def direction(a, b):
    """Inter-contrast d = (mean B - mean A) / sigma: > 0 when more active on unbiased responses.
    a: [nA, n], b: [nB, n] -> [n], on their device."""
    return (b.mean(0) - a.mean(0)) / sigma_of(a, b)


def null_rounds(n_a: int, n_b: int, paired: bool, rounds: int, seed: int = 0):
    """Label-permutation null: per round, (idx_a, idx_b) into the stacked rows [A; B] (length nA + nB).

    Paired data (response mode, row i of A and B from one item): swap X/Y within each pair with
    probability 1/2. Unpaired (behavior mode): shuffle the union and re-split at the same sizes.
    The same index arrays are used for every block of neurons, so a round is one relabelling.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rounds):
        if paired:
            swap = rng.random(n_a) < 0.5
            base = np.arange(n_a)
            out.append((np.where(swap, base + n_a, base), np.where(swap, base, base + n_a)))
        else:
            perm = rng.permutation(n_a + n_b)
            out.append((perm[:n_a], perm[n_a:]))
    return out
