"""Zero ablation (docs/METHOD.md §6, the causal check): the selected neurons output 0.

Baked, W[n,:] <- 0 and b_n <- 0.
"""

from __future__ import annotations

import numpy as np

from vllm_coco.edit.kind import LinearKind, Neurons


def _effect(n: Neurons, s, spelling):
    return np.zeros(len(n.weights)), np.zeros(len(n.weights))


KIND = LinearKind("ablate-zero", "ablation (zero)", "h_n <- 0", _effect, ablation=True)
