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
                              mean_diff, mean_diff.<cat>               float32 [N] (mean h unbiased - biased, steer)
                              abstention_loss[.<cat>]                  float64 [N] (stereotype runs: the filter)
                              mean_intensity, weight_norm              float32 [N] (MACT / NORM)
                              selected (int64 [k], best first), weight (float32 [k])
                              row_category (int32 [rows]), row_label (int32 [rows]; names.ROW_*)
DIR/intensities.safetensors the [rows, N] float16 intensity matrix (NE-COCO computes W_hat from it)
"""

from __future__ import annotations

# Lazy imports: safetensors, numpy are imported inside the functions that use them (directly or
# through the modules they import), so importing this module stays light.
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vllm_coco import METHOD_VERSION
from vllm_coco.core.checks import finite_array
from vllm_coco.core.errors import CocoError
from vllm_coco.core.json_file import read_config, read_json
from vllm_coco.core.names import WEIGHTINGS

JSON_NAME = "neurons.json"
ARRAYS_NAME = "neurons.safetensors"
MATRIX_FILE = "intensities.safetensors"


def save(out_dir: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out_dir / ARRAYS_NAME),
              metadata={"method": METHOD_VERSION})
    (out_dir / JSON_NAME).write_text(json.dumps(meta, indent=1) + "\n")


# Arrays every artifact has, and those only newer ones have (checked when present).
PER_NEURON = ("layer", "proj", "index", "loss", "score", "direction", "calib_mean", "calib_std")
PER_NEURON_OPTIONAL = ("act_mean", "mean_intensity", "weight_norm", "mean_diff", "abstention_loss")
# Infinity a per-neuron array may carry: a constant neuron has loss +inf and score -inf (docs/METHOD.md §9.2 D2).
MAY_BE_INF = {"loss": "+inf", "score": "-inf", "abstention_loss": "+inf"}
# The dtype of every array identify writes (per-category arrays: that of their prefix). A float32
# array read as float16 (or float64 as float32) would be silently rounded: any other dtype is refused.
ARRAY_DTYPES = {"layer": "int32", "proj": "int32", "index": "int32", "loss": "float64", "score": "float64",
                "direction": "float32", "calib_mean": "float32", "calib_std": "float32", "act_mean": "float32",
                "mean_diff": "float32", "mean_intensity": "float32", "weight_norm": "float32", "selected": "int64",
                "weight": "float32", "abstention_loss": "float64",
                "row_category": "int32", "row_label": "int32", "rows": "int64"}
# The range of the edit weights identify makes (selection.edit_weights: d/max|d| or |d|/max|d|).
WEIGHT_RANGE = {"magnitude": (0.0, 1.0), "signed": (-1.0, 1.0)}
_JSON_SCHEMA = {"model": dict, "selection": dict, "categories": list, "neurons": list, "per_category": dict,
                "significance": dict, "data": dict}
_MODEL_INTS = ("num_layers", "q_size", "kv_size")


def _fail(d: Path, name: str, problem: str) -> None:
    raise CocoError(f"{d / name}: {problem}; re-run `coco-tools identify` (or `coco-tools select`) to rewrite it")


def _read_json(d: Path) -> dict:
    meta = read_json(d / JSON_NAME, "re-run `coco-tools identify` (or `coco-tools select`) to rewrite it")
    if not isinstance(meta, dict):
        _fail(d, JSON_NAME, f"holds a {type(meta).__name__}, not a neuron artifact object")
    if meta.get("method") != METHOD_VERSION:
        raise CocoError(f"{d} follows method {meta.get('method')!r}, this version reads {METHOD_VERSION!r}; "
                        "re-run `coco-tools identify`")
    for key, kind in _JSON_SCHEMA.items():
        if not isinstance(meta.get(key), kind):
            _fail(d, JSON_NAME, f"lacks the {kind.__name__} `{key}`")
    for key in _MODEL_INTS:
        v = meta["model"].get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            _fail(d, JSON_NAME, f"model.{key} is {v!r}, not a positive integer")
    for key in ("weighting", "baseline"):
        if not isinstance(meta["selection"].get(key), str):
            _fail(d, JSON_NAME, f"lacks selection.{key}")
    if meta["selection"]["weighting"] not in WEIGHTINGS:
        _fail(d, JSON_NAME, f"selection.weighting {meta['selection']['weighting'][:40]!r} is not one of "
              f"{', '.join(WEIGHTINGS)}")
    ratio = meta["selection"].get("ratio")
    if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1):
        _fail(d, JSON_NAME, f"selection.ratio {ratio!r} is not in (0, 1]")
    if not meta["categories"] or not all(isinstance(c, str) for c in meta["categories"]):
        _fail(d, JSON_NAME, "categories is not a non-empty list of names")
    if not all(isinstance(meta["per_category"].get(c), dict) for c in meta["categories"]):
        _fail(d, JSON_NAME, "per_category lacks an entry for one of its categories")
    return meta


def _check_neuron_entries(d: Path, meta: dict) -> None:
    """Every neuron named in neurons.json sits inside the model's layout."""
    from vllm_coco.core.models import PROJS

    m = meta["model"]
    size = {"q": m["q_size"], "k": m["kv_size"], "v": m["kv_size"]}
    lists = [("neurons", meta["neurons"])] + [(f"per_category.{c}.neurons", meta["per_category"][c].get("neurons", []))
                                             for c in meta["categories"]]
    for where, neurons in lists:
        if not isinstance(neurons, list):
            _fail(d, JSON_NAME, f"{where} is not a list")
        for i, n in enumerate(neurons):
            ok = (isinstance(n, dict) and n.get("proj") in PROJS
                  and all(isinstance(n.get(k), int) and not isinstance(n.get(k), bool) for k in ("layer", "index"))
                  and 0 <= n["layer"] < m["num_layers"] and 0 <= n["index"] < size[n["proj"]])
            if not ok:
                _fail(d, JSON_NAME, f"{where}[{i}] = {n!r} is not a neuron of this layout "
                      f"({m['num_layers']} layers, q {m['q_size']}, k/v {m['kv_size']})")


def _read_arrays(d: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(d / ARRAYS_NAME))
    except Exception as exc:  # safetensors raises its own error types for truncated or garbage files
        _fail(d, ARRAYS_NAME, f"is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:80]})")


def _check_arrays(d: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    from vllm_coco.core.models import NeuronLayout

    m = meta["model"]
    layout = NeuronLayout(m["num_layers"], m["q_size"], m["kv_size"])
    n = layout.total
    fix = f"the artifact {d} is damaged: re-run `coco-tools identify`"
    names = list(PER_NEURON) + [k for k in PER_NEURON_OPTIONAL if k in arrays]
    for c in meta["categories"]:
        names += [f"{k}.{c}" for k in ("loss", "score", "direction")]
        names += [f"{k}.{c}" for k in ("mean_intensity", "mean_diff", "abstention_loss") if f"{k}.{c}" in arrays]
    for key in names + ["selected", "weight"]:
        if key not in arrays:
            _fail(d, ARRAYS_NAME, f"lacks the array `{key}`")
    for key, a in arrays.items():
        want = ARRAY_DTYPES.get(key.split(".")[0])
        if want is not None and a.dtype != np.dtype(want):
            _fail(d, ARRAYS_NAME, f"array `{key}` is {a.dtype}, not {want} (it would be misread)")
    for key in names:
        a = arrays[key]
        if a.shape != (n,):
            _fail(d, ARRAYS_NAME, f"array `{key}` has shape {a.shape}, expected ({n},) (one per q/k/v neuron)")
        finite_array(a, f"{d / ARRAYS_NAME} array `{key}`", fix, allow=MAY_BE_INF.get(key.split(".")[0], ""))
    la = layout.arrays()
    for key in ("layer", "proj", "index"):
        if not np.array_equal(arrays[key], la[key]):
            _fail(d, ARRAYS_NAME, f"array `{key}` does not match the model layout in {JSON_NAME} "
                  "(neuron addresses outside the layout)")
    sel, weight = arrays["selected"], arrays["weight"]
    if sel.ndim != 1 or sel.dtype.kind not in "iu":
        _fail(d, ARRAYS_NAME, f"array `selected` is {sel.dtype} {sel.shape}, not a list of neuron ids")
    if sel.size and (sel.min() < 0 or sel.max() >= n):
        _fail(d, ARRAYS_NAME, f"array `selected` names neurons outside 0..{n - 1}")
    if len(np.unique(sel)) != len(sel):
        _fail(d, ARRAYS_NAME, "array `selected` names a neuron twice")
    if weight.shape != sel.shape:
        _fail(d, ARRAYS_NAME, f"array `weight` has length {weight.shape}, but {len(sel)} neurons are selected")
    finite_array(weight, f"{d / ARRAYS_NAME} array `weight`", fix)
    lo, hi = WEIGHT_RANGE[meta["selection"]["weighting"]]
    if weight.size and (weight.min() < lo or weight.max() > hi):
        _fail(d, ARRAYS_NAME, f"array `weight` spans {weight.min():.4g}..{weight.max():.4g}, outside [{lo:g}, {hi:g}] "
              f"where {meta['selection']['weighting']} weights lie")
    finite_array(arrays["calib_std"], f"{d / ARRAYS_NAME} array `calib_std`", fix)
    if (arrays["calib_std"] < 0).any() or ("weight_norm" in arrays and (arrays["weight_norm"] < 0).any()):
        _fail(d, ARRAYS_NAME, "a standard deviation or norm is negative")
    _check_rows(d, meta, arrays)
    _check_json_matches(d, meta, layout, sel, weight)


def _check_rows(d: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """row_category / row_label (when present): one entry per matrix row, a category index and a label
    (names.ROW_*: 0 biased, 1 unbiased; 2 named, 3 unknown in a stereotype run's abstention control)."""
    if "row_category" not in arrays and "row_label" not in arrays:
        return
    cat, label = arrays.get("row_category"), arrays.get("row_label")
    if cat is None or label is None or cat.ndim != 1 or cat.shape != label.shape:
        _fail(d, ARRAYS_NAME, "arrays `row_category` and `row_label` are not one entry per row each")
    if cat.size and (cat.min() < 0 or cat.max() >= len(meta["categories"])):
        _fail(d, ARRAYS_NAME, f"array `row_category` holds values outside 0..{len(meta['categories']) - 1}")
    if not np.isin(label, (0, 1, 2, 3)).all():
        _fail(d, ARRAYS_NAME, "array `row_label` holds values other than 0 (biased), 1 (unbiased), 2 (named) "
                              "and 3 (unknown)")


def _check_json_matches(d: Path, meta: dict, layout, sel: np.ndarray, weight: np.ndarray) -> None:
    """neurons.json lists exactly the neurons `selected` holds, in order, with their weights: `report`
    (which reads the JSON) shows the set bake and ne (which read the arrays) edit."""
    listed = meta["neurons"]
    if len(listed) != len(sel):
        _fail(d, JSON_NAME, f"lists {len(listed)} neurons, but {ARRAYS_NAME} selects {len(sel)}")
    for i, (n, flat) in enumerate(zip(listed, sel.tolist())):
        layer, proj, index = layout.address(flat)
        w = n.get("weight")
        if (n["layer"], n["proj"], n["index"]) != (layer, proj, index) or (
                w is not None and not (isinstance(w, (int, float)) and np.isclose(w, weight[i], rtol=1e-6, atol=1e-7))):
            _fail(d, JSON_NAME, f"neurons[{i}] is layer {n['layer']} {n['proj']} {n['index']} (weight {w}), but "
                  f"{ARRAYS_NAME} selects layer {layer} {proj} {index} (weight {float(weight[i]):.6g})")


def is_artifact(d) -> bool:
    """Whether `d` holds the two files of a neuron artifact (not whether they are valid)."""
    d = Path(d)
    return str(d).strip() != "" and (d / JSON_NAME).is_file() and (d / ARRAYS_NAME).is_file()


@dataclass(frozen=True)
class Artifact:
    """A validated neuron artifact. Unpacks as `meta, arrays = Artifact.read(d)`."""

    path: Path
    meta: dict
    arrays: dict[str, np.ndarray]

    @classmethod
    def read(cls, neurons_dir) -> Artifact:
        """Read and validate (JSON + safetensors only: nothing is unpickled). Any problem (missing or
        unreadable files, bad JSON, missing keys, arrays of the wrong shape or dtype, non-finite
        numbers, weights outside their weighting's range, neurons outside the layout, a neurons.json
        that lists other neurons than `selected`) is a CocoError naming the file."""
        d = Path(neurons_dir)
        if not is_artifact(d):
            raise CocoError(f"{d} is not a neuron artifact (needs {JSON_NAME} and {ARRAYS_NAME}); "
                            "create one with `coco-tools identify`")
        meta = _read_json(d)
        _check_neuron_entries(d, meta)
        arrays = _read_arrays(d)
        _check_arrays(d, meta, arrays)
        return cls(d, meta, arrays)

    def __iter__(self):
        return iter((self.meta, self.arrays))

    @property
    def layout(self):
        from vllm_coco.core.models import NeuronLayout

        m = self.meta["model"]
        return NeuronLayout(m["num_layers"], m["q_size"], m["kv_size"])

    @property
    def categories(self) -> list[str]:
        return self.meta["categories"]

    def hash(self) -> str:
        return artifact_hash(self.path)


def load(neurons_dir: str | Path) -> Artifact:
    """`Artifact.read`: the validated artifact, which unpacks as (meta, arrays)."""
    return Artifact.read(neurons_dir)


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
    from vllm_coco.core.models import NeuronLayout, fingerprint

    if layout is None:
        layout = NeuronLayout.from_config(read_config(model_dir), Path(model_dir) / "config.json")
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
