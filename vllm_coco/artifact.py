"""The neuron artifact written by `coco-tools identify`.

DIR/neurons.json            what was selected and how (human-readable, versioned "coco-v1")
DIR/neurons.safetensors     per-neuron arrays for every q/k/v neuron, in the global order of
                            models.NeuronLayout (layer-major, each layer [q | k | v]):
                              layer, proj (0=q 1=k 2=v), index        int32 [N]
                              loss, score                              float64 [N] (combined)
                              direction                                float32 [N] (combined)
                              loss.<cat>, score.<cat>, direction.<cat> per category
                              calib_mean, calib_std                    float32 [N] (|h| statistics, NE)
                              act_mean                                 float32 [N] (mean of h, ablate-mean)
                              mean_intensity, weight_norm              float32 [N] (MACT / NORM)
                              selected (int64 [k], best first), weight (float32 [k])
                              row_category (int32 [rows]), row_label (int32 [rows]; 0 biased, 1 unbiased)
DIR/intensities.safetensors the [rows, N] float16 intensity matrix (NE-COCO computes W_hat from it)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from . import METHOD_VERSION
from .errors import CocoError

JSON_NAME = "neurons.json"
ARRAYS_NAME = "neurons.safetensors"
MATRIX_FILE = "intensities.safetensors"


def save(out_dir: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out_dir / ARRAYS_NAME),
              metadata={"method": METHOD_VERSION})
    (out_dir / JSON_NAME).write_text(json.dumps(meta, indent=1) + "\n")


def load(neurons_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read an artifact directory (JSON + safetensors only: nothing is unpickled)."""
    from safetensors.numpy import load_file

    d = Path(neurons_dir)
    if not (d / JSON_NAME).is_file() or not (d / ARRAYS_NAME).is_file():
        raise CocoError(f"{d} is not a neuron artifact (needs {JSON_NAME} and {ARRAYS_NAME}); "
                        "create one with `coco-tools identify`")
    meta = json.loads((d / JSON_NAME).read_text())
    if meta.get("method") != METHOD_VERSION:
        raise CocoError(f"{d} follows method {meta.get('method')!r}, this version reads {METHOD_VERSION!r}; "
                        "re-run `coco-tools identify`")
    return meta, load_file(str(d / ARRAYS_NAME))


def artifact_hash(neurons_dir: str | Path) -> str:
    """sha256 of the artifact's JSON and arrays: what edits record as their provenance."""
    h = hashlib.sha256()
    for name in (JSON_NAME, ARRAYS_NAME):
        h.update((Path(neurons_dir) / name).read_bytes())
    return "sha256:" + h.hexdigest()


def check_model_matches(meta: dict, model_dir, force: bool = False, layout=None) -> str:
    """The artifact must come from exactly these weights (fingerprint) and this layout.

    `layout` is the model's NeuronLayout when the caller has read it off the weights; otherwise it
    is derived from config.json. Returns the model's fingerprint. A fingerprint mismatch is refused
    unless `force`; a layout mismatch always is (neuron addresses would point at other channels).
    """
    from .models import NeuronLayout, fingerprint, read_config

    if layout is None:
        cfg = read_config(model_dir)
        heads = cfg.get("num_attention_heads") or 0
        head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads else 0)
        kv_heads = cfg.get("num_key_value_heads") or heads
        layout = NeuronLayout(cfg.get("num_hidden_layers", 0), heads * head_dim, kv_heads * head_dim)
    m = meta.get("model", {})
    want = {k: m.get(k) for k in ("num_layers", "q_size", "kv_size")}
    if want != layout.to_json():
        raise CocoError(f"the neuron artifact was made for a model with {want}, but {model_dir} has "
                        f"{layout.to_json()}; pass the model the artifact was identified on")
    fp = fingerprint(model_dir)
    if fp != m.get("fingerprint") and not force:
        raise CocoError(f"{model_dir} does not hold the weights the neurons were identified on (fingerprint "
                        f"{fp[:19]}... vs the artifact's {str(m.get('fingerprint'))[:19]}...); pass that model, "
                        "or --force to edit anyway")
    return fp
