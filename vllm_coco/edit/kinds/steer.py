"""The steering-vector baseline (docs/METHOD.md §6.5): add alpha times the mean difference of each
neuron's activation between the unbiased and the biased rows of identify's contrast pairs
(diff-in-means, as CAA / ActAdd steer), h_n <- h_n + alpha * (mean_unbiased h_n - mean_biased h_n).

It acts on whatever neurons an artifact selects; the baseline users would pick is the set
`coco-tools select --baseline diffmean` makes (every v channel of one layer: an offset on v is a
constant added to that layer's attention output, i.e. a residual-stream steering vector in the
span of its o_proj). Baked, the offset goes into the projection's bias (edit/bake.py adds a zero
bias first where the model has none and its architecture can switch biases on); served, it is a
named edit whose strength a request scales (`coco_scale`).
"""

from __future__ import annotations

import numpy as np

from vllm_coco.edit.kind import LinearKind, Neurons, Param

ALPHA = 1.0


def _effect(n: Neurons, s, spelling):
    return np.ones(len(n.weights)), s["alpha"] * n.mean_diffs


# alpha's range: a steering multiplier (CAA sweeps roughly -10..10 times a normalised vector; ours
# is the raw mean difference, so a few units already move a small model's answers)
KIND = LinearKind("steer", "steering vector", "h_n <- h_n + alpha * (mean_unbiased h_n - mean_biased h_n)", _effect,
                  params=(Param("alpha", ALPHA, "steering strength: multiples of the mean difference added",
                                lo=-16.0, hi=16.0),),
                  reads=("mean_diff",), shifts=True)
