"""`coco-tools ne`: export an NE-COCO model directory (base weights unchanged + a runtime gate).

Neuron set (docs/METHOD.md §7.1): the top `ratio` of all q and v neurons by inter-contrast |d_n|
(combined direction), relaxing intra-consistency. Per layer, the gate's tensors (§7.2): the
channels, their calibration mean and std of |h| (mu, sigma floored), the edit weights w, and
W_hat, the |Pearson| correlation of the channels' intensities with a zero diagonal and rows
summing to 1. The directory format (file, tensor and config names) is core/ne_format.py's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from vllm_coco import METHOD_VERSION, __version__
from vllm_coco.core import artifact, ne_format
from vllm_coco.core.atomic import atomic_output_dir
from vllm_coco.core.checks import finite, finite_array, ne_gate
from vllm_coco.core.errors import CocoError
from vllm_coco.core.models import NeuronLayout
from vllm_coco.core.names import NE_ALPHA, NE_BETA, NE_LAM, RATIO, Proj
from vllm_coco.core.ne_format import BASE_TO_NE_ARCH
from vllm_coco.edit.inputs import EditInputs
from vllm_coco.identify.selection import edit_weights

SIGMA_FLOOR = 1e-6


def select_ne(arrays: dict, ratio: float) -> np.ndarray:
    """Flat ids of the top `ratio` of q and v neurons by |direction|, best first."""
    from vllm_coco.identify.selection import count_for, top_by_value

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
    from vllm_coco.identify.capture import open_matrix

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


def check_hyper(alpha: float, beta: float, lam: float, w_min: float, w_max: float | None = None) -> None:
    from vllm_coco.core.checks import ne_hyper

    ne_hyper(alpha, beta, lam, w_min, w_max=w_max)


def check_gate(gate: dict[int, dict], neurons_dir) -> None:
    """The gate built from an artifact holds numbers the gate can compute with (checks.ne_gate)."""
    for layer, g in gate.items():
        ne_gate(g, f"the NE gate of layer {layer}",
                f"the artifact {neurons_dir} holds calibration statistics out of range: re-run `coco-tools identify`")


def checked_gate(meta: dict, arrays: dict, neurons_dir, ratio: float, alpha: float, beta: float,
                 lam: float) -> dict[int, dict[str, np.ndarray]]:
    """build_gate, its tensors checked (check_gate) and the hyperparameters bounded over its weights'
    range (check_hyper): what `coco-tools ne` exports and the in-memory condition runs, checked alike."""
    gate = build_gate(meta, arrays, Path(neurons_dir), ratio)
    check_gate(gate, neurons_dir)
    check_hyper(alpha, beta, lam, *gate_weight_range(gate))
    return gate


def gate_weight_range(gate: dict[int, dict]) -> tuple[float, float]:
    """(w_min, w_max) over every layer's gate weights: what bounds the strengths it may take."""
    return min(float(g["w"].min()) for g in gate.values()), max(float(g["w"].max()) for g in gate.values())


def named_edits(neurons_dir, modes, le_alpha: float | None) -> tuple[list[dict], dict, dict]:
    """The constant edits `--with MODE` adds to an NE directory, named by their mode: their
    config entries, their tables per layer (the same factors `coco-tools bake` writes) and the
    edits themselves (conditions.LinearEdit, by name: what the export's probe runs)."""
    from vllm_coco.core.names import LE_ALPHA
    from vllm_coco.edit.conditions import linear_edit

    entries, tables, edits = [], {}, {}
    for mode in dict.fromkeys(modes):  # once each, in the order given
        a = (LE_ALPHA if le_alpha is None else le_alpha) if mode == "le" else None
        # the artifact was checked against the model by the caller
        e = edits[mode] = linear_edit(neurons_dir, mode, a, option="--le-alpha")
        layers = max(e.channels, default=-1) + 1
        tables[mode] = {l: {"channels": e.channels[l].astype(np.int64), "gain": e.gain[l].astype(np.float32),
                            "offset": e.offset[l].astype(np.float32)} for l in e.channels}
        entries.append({"name": mode, "mode": mode, "alpha": a,
                        "channels": [e.channels[l].tolist() if l in e.channels else [] for l in range(layers)]})
    return entries, tables, edits


def write_ne(model: str, neurons_dir: str, out: str, alpha: float = NE_ALPHA, beta: float = NE_BETA,
             lam: float = NE_LAM, ratio: float | None = None, force: bool = False,
             with_edits: tuple[str, ...] = (), le_alpha: float | None = None) -> dict:
    """Write an NE-COCO directory; returns its `coco` config section. `with_edits` adds named
    constant edits (modes of `coco-tools bake`) that a request can pick instead of the gate."""
    from vllm_coco.identify.selection import count_for

    alpha, beta, lam = finite(alpha, "--alpha"), finite(beta, "--beta"), finite(lam, "--lam")
    if le_alpha is not None and "le" not in with_edits:
        raise CocoError("--le-alpha sets the strength of the named edit 'le'; add --with le or drop it")
    if le_alpha is not None:
        le_alpha = finite(le_alpha, "--le-alpha")

    inputs = EditInputs.open(model, neurons_dir, out, force)
    model_dir, config, sources = inputs.model_dir, inputs.config, inputs.sources
    meta, arrays = inputs.artifact
    base_arch = (config.get("architectures") or ["?"])[0]
    if base_arch not in BASE_TO_NE_ARCH:
        raise CocoError(f"NE-COCO supports {', '.join(BASE_TO_NE_ARCH)}; {model_dir} is {base_arch}")
    if ratio is None:  # default: the ratio the artifact was selected with
        ratio = meta["selection"]["ratio"] or RATIO
    count_for(1000, finite(ratio, "--ratio"))
    fp = artifact.check_model_matches(meta, model_dir, force)
    gate = checked_gate(meta, arrays, neurons_dir, ratio, alpha, beta, lam)
    w_min, w_max = gate_weight_range(gate)

    coco = {"method": METHOD_VERSION, "edit": "ne", "tool": f"vllm-coco {__version__}",
            "alpha": alpha, "beta": beta, "lam": lam, "ratio": ratio,
            "weighting": meta["selection"]["weighting"], "base_architecture": base_arch,
            "channels": [gate[l]["channels"].tolist() if l in gate else []
                         for l in range(meta["model"]["num_layers"])],
            "neurons": artifact.artifact_hash(neurons_dir), "base_fingerprint": fp, "w_min": w_min,
            "w_max": w_max}
    coco["count"] = sum(len(c) for c in coco["channels"])
    entries, tables, edits = named_edits(neurons_dir, with_edits, le_alpha)
    for entry in entries:  # pad to every layer
        entry["channels"] += [[] for _ in range(meta["model"]["num_layers"] - len(entry["channels"]))]
    coco["edits"] = entries
    probe_export(model_dir, gate, alpha, beta, lam, edits)
    with atomic_output_dir(out, force, sources) as tmp:
        for f in model_dir.iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy2(f, tmp / f.name)  # base weights and tokenizer: byte-identical
        ne_format.write(tmp, config, coco, gate, tables)
    return coco


def probe_export(model_dir: Path, gate: dict, alpha: float, beta: float, lam: float, edits: dict) -> None:
    """The finite forward before an NE directory is committed: the base model, the gate and every
    named edit on a probe batch (finite_forward); CocoError naming what gave a non-finite logit."""
    from vllm_coco.edit.bake import finite_forward
    from vllm_coco.edit.conditions import NEEdit

    probe = {"the NE gate": (NEEdit(gate, alpha, beta, lam),
                             f"--alpha {alpha:g} --beta {beta:g} --lam {lam:g} overflows this model: choose a smaller "
                             "--alpha")}
    for mode, e in edits.items():
        fix = "choose a smaller --le-alpha" if mode == "le" else "re-run `coco-tools identify` on this model"
        probe[f"the named edit {mode} (--with {mode})"] = (e, fix)
    finite_forward(model_dir, probe)
