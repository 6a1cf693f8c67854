"""NE-COCO (docs/METHOD.md §7): the runtime nonlinear gate on the selected q and v channels.

Its formula is edit/gate.py's, its tensors edit/ne_gate.py's; this module names it and its
settings for the places that treat every edit alike (the experiment's sweep and report).
"""

from __future__ import annotations

from vllm_coco.core.checks import BETA_MAX, GAIN_MAX
from vllm_coco.core.names import NE_ALPHA, NE_BETA, NE_EDIT, NE_LAM
from vllm_coco.edit.kind import GateKind, Param

# the ranges checks.ne_hyper enforces on the actual gate weights, as a sweep's config may ask for them
KIND = GateKind(NE_EDIT, "NE-COCO", "h_S <- h_S * (1 + alpha w sigmoid(beta m(h_S)))", params=(
    Param("alpha", NE_ALPHA, "gate strength (0: exactly the base model)", lo=-1.0, hi=GAIN_MAX - 1),
    Param("beta", NE_BETA, "gate sharpness", lo=0.0, hi=BETA_MAX, lo_open=True),
    Param("lam", NE_LAM, "weight of the networked engagement (W_hat)", lo=0.0, hi=1.0),
))
