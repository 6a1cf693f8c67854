"""Mean ablation (docs/METHOD.md §6, the causal check): each selected neuron outputs its calibration
mean, so the ablation removes what the neuron varies with, not its average level.

Baked, W[n,:] <- 0 and b_n <- act_mean_n (a zero bias is added first where the model has none and
its architecture can switch biases on: edit/bake.py).
"""

from __future__ import annotations

import numpy as np

from vllm_coco.edit.kind import LinearKind, Neurons


def _effect(n: Neurons, s, spelling):
    return np.zeros(len(n.weights)), n.act_means


KIND = LinearKind("ablate-mean", "ablation (mean)", "h_n <- act_mean_n", _effect, ablation=True,
                  reads=("act_mean",), shifts=True)
