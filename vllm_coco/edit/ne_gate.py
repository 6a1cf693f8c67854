"""The NE-COCO gate's tensors, built from an identify artifact (docs/METHOD.md §7.1-§7.2).

Neuron set (§7.1): the top `ratio` of all q and v neurons by inter-contrast |d_n| (combined
direction), relaxing intra-consistency. Per layer, the gate's tensors (§7.2): the channels, their
calibration mean and std of |h| (mu, sigma floored), the edit weights w, and W_hat, the |Pearson|
correlation of the channels' intensities with a zero diagonal and rows summing to 1. What
`coco-tools ne` exports (edit/ne.py) and the in-memory NE condition runs (edit/conditions.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vllm_coco.core import artifact
from vllm_coco.core.checks import finite_array, ne_gate, ne_hyper
from vllm_coco.core.errors import CocoError
from vllm_coco.core.models import NeuronLayout
from vllm_coco.core.names import Proj
from vllm_coco.identify.capture import open_matrix
from vllm_coco.identify.selection import count_for, edit_weights, top_by_value

SIGMA_FLOOR = 1e-6


def select_ne(arrays: dict, ratio: float) -> np.ndarray:
    """Flat ids of the top `ratio` of q and v neurons by |direction|, best first."""
    qv = np.flatnonzero(arrays["proj"] != Proj.k)
    k = count_for(len(qv), ratio)
    return qv[top_by_value(np.abs(arrays["direction"][qv].astype(np.float64)), k)]


def w_hat_of(x: np.ndarray) -> np.ndarray:
    """x: [examples, S] intensities -> [S, S] |Pearson r|, zero diagonal, rows scaled to sum 1."""
    x = x.astype(np.float64)
    x = x - x.mean(0)
    norm = np.sqrt((x * x).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.abs((x.T @ x) / np.outer(norm, norm))
    r = np.nan_to_num(r, nan=0.0)  # a constant channel correlates with nothing
    np.fill_diagonal(r, 0.0)
    sums = r.sum(1, keepdims=True)
    return np.divide(r, sums, out=np.zeros_like(r), where=sums > 0)


def build_gate(meta: dict, arrays: dict, neurons_dir: Path, ratio: float) -> dict[int, dict[str, np.ndarray]]:
    """Per-layer gate tensors for the NE neuron set (layers without a selected channel are absent)."""
    layout = NeuronLayout(meta["model"]["num_layers"], meta["model"]["q_size"], meta["model"]["kv_size"])
    sel = select_ne(arrays, ratio)
    w_all = edit_weights(arrays["direction"][sel].astype(np.float64), meta["selection"]["weighting"])
    matrix_path = Path(neurons_dir) / artifact.MATRIX_FILE
    if not matrix_path.is_file():
        raise CocoError(f"{neurons_dir} lacks {artifact.MATRIX_FILE} (NE needs the calibration intensities); "
                        "re-run `coco-tools identify`")
    try:
        matrix = open_matrix(matrix_path)  # CocoError naming the file for a header that is not ours
    except CocoError:
        raise
    except Exception as exc:  # unreadable
        raise CocoError(f"{matrix_path} is not a readable intensity matrix ({type(exc).__name__}); "
                        "re-run `coco-tools identify`") from None
    rows = len(arrays["row_label"]) if "row_label" in arrays else matrix.shape[0]
    if matrix.ndim != 2 or matrix.shape[1] != layout.total or matrix.shape[0] != rows:
        raise CocoError(f"{matrix_path} has shape {matrix.shape}, not [rows, {layout.total}] for this artifact; "
                        "re-run `coco-tools identify`")
    gate = {}
    for layer in range(layout.num_layers):
        mine = np.flatnonzero(sel // layout.per_layer == layer)
        if len(mine) == 0:
            continue
        ids = sel[mine][np.argsort(sel[mine])]  # ascending channel order
        w = w_all[mine][np.argsort(sel[mine])]
        x = np.asarray(matrix[:, ids], dtype=np.float32)  # [rows, S]
        # a NaN or inf here would silently make W_hat zero (nan_to_num): refuse it
        finite_array(x, f"{matrix_path}: the column block of layer {layer}'s NE channels",
                     "the matrix is damaged: re-run `coco-tools identify`")
        gate[layer] = {
            "channels": (ids - layer * layout.per_layer).astype(np.int64),
            "mu": arrays["calib_mean"][ids].astype(np.float32),
            "sigma": np.maximum(arrays["calib_std"][ids], SIGMA_FLOOR).astype(np.float32),
            "w": w.astype(np.float32),
            "w_hat": w_hat_of(x).astype(np.float32),
        }
    return gate


def check_gate(gate: dict[int, dict], neurons_dir) -> None:
    """The gate built from an artifact holds numbers the gate can compute with (checks.ne_gate)."""
    for layer, g in gate.items():
        ne_gate(g, f"the NE gate of layer {layer}",
                f"the artifact {neurons_dir} holds calibration statistics out of range: re-run `coco-tools identify`")


def checked_gate(meta: dict, arrays: dict, neurons_dir, ratio: float, alpha: float, beta: float,
                 lam: float) -> dict[int, dict[str, np.ndarray]]:
    """build_gate, its tensors checked (check_gate) and the hyperparameters bounded over its weights'
    range (checks.ne_hyper): what `coco-tools ne` exports and the in-memory condition runs, checked alike."""
    gate = build_gate(meta, arrays, Path(neurons_dir), ratio)
    check_gate(gate, neurons_dir)
    w_min, w_max = gate_weight_range(gate)
    ne_hyper(alpha, beta, lam, w_min, w_max=w_max)
    return gate


def gate_weight_range(gate: dict[int, dict]) -> tuple[float, float]:
    """(w_min, w_max) over every layer's gate weights: what bounds the strengths it may take."""
    return min(float(g["w"].min()) for g in gate.values()), max(float(g["w"].max()) for g in gate.values())
