"""The `coco-tools bake` job: write an edited copy of a model (LE-COCO or an ablation), or the
LE-COCO edit as a PEFT LoRA adapter (docs/METHOD.md §6).

Everything works on the safetensors files directly, one shard at a time; the model is
instantiated only for the finite forward (`finite_forward`: a probe of 8 tokens on the CPU, base
and edited, before anything is written). Only the rows of the selected neurons in
`...layers.{l}.self_attn.{q,k,v}_proj.weight` (and `.bias`) change; every other tensor, each
file's safetensors metadata and the shard layout are kept, and the non-weight files (config,
tokenizer, chat template, ...) are copied unchanged.

    le           W[j,:] <- (1 + alpha * w_n) * W[j,:]   (bias likewise)
    ablate-zero  W[j,:] <- 0, b_j <- 0
    ablate-mean  W[j,:] <- 0, b_j <- act_mean_n         (the neuron outputs its calibration mean)
    le --lora    B = E_R diag(alpha * w_R), A = W_R per (layer, projection): W + B A is the LE edit

The source directory is only read. Inputs are JSON and safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vllm_coco import METHOD_VERSION, __version__
from vllm_coco.core import artifact
from vllm_coco.core.atomic import atomic_output_dir
from vllm_coco.core.checks import GAIN_MAX, finite, tensors_finite
from vllm_coco.core.errors import CocoError
from vllm_coco.core.models import PROJS, NeuronLayout
from vllm_coco.core.names import EDIT_MODES as MODES
from vllm_coco.core.names import LE_ALPHA
from vllm_coco.core.ne_format import INDEX_JSON
from vllm_coco.edit.inputs import EditInputs

EDIT_JSON = "coco_edit.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Weight formats other than safetensors: never read (they may be pickles) and never copied (an
# unedited copy of the weights beside the edited ones could be loaded instead of them).
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
_QKVO = re.compile(r"^(?P<prefix>.*)layers\.(?P<layer>\d+)\.self_attn\.(?P<proj>[qkvo])_proj\.(?P<kind>weight|bias)$")


@dataclass
class ModuleEdit:
    """The selected rows of one (layer, projection) module."""

    rows: list[int] = field(default_factory=list)  # output channels, best first
    weights: list[float] = field(default_factory=list)  # w_n of each row
    act_means: list[float] = field(default_factory=list)  # mean of h_n over calibration tokens


@dataclass
class SourceTensors:
    """Where the q/k/v/o tensors of a checkpoint live, read from the safetensors headers only."""

    files: list[Path]  # the *.safetensors weight files, sorted
    file_of: dict[str, str]  # tensor name -> file name
    shape_of: dict[str, tuple]  # tensor name -> shape
    modules: dict[tuple[int, str], str]  # (layer, "q"|"k"|"v"|"o") -> module name (without .weight)

    def has_bias(self, key: tuple[int, str]) -> bool:
        return f"{self.modules[key]}.bias" in self.file_of


def scan_source(model_dir: Path) -> SourceTensors:
    """Read the safetensors headers of `model_dir` (no tensor data) and find its attention modules."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise CocoError(f"{model_dir} has no *.safetensors weight files; bake reads safetensors only "
                        "(convert the model with save_pretrained(..., safe_serialization=True))")
    file_of, shape_of, modules = {}, {}, {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                file_of[name] = f.name
                shape_of[name] = tuple(fh.get_slice(name).get_shape())
                m = _QKVO.match(name)
                if m and m["kind"] == "weight":
                    modules[(int(m["layer"]), m["proj"])] = name[: -len(".weight")]
    return SourceTensors(files, file_of, shape_of, modules)


def source_layout(src: SourceTensors, model_dir: Path) -> NeuronLayout:
    """The q/k/v neuron layout read off the weight shapes (CocoError if there are no q/k/v projections)."""
    layers = sorted({layer for layer, _ in src.modules})
    complete = [layer for layer in layers if all((layer, p) in src.modules for p in PROJS)]
    if not complete or complete != list(range(len(complete))) or complete != layers:
        raise CocoError(f"{model_dir} has no complete layers.N.self_attn.q_proj/k_proj/v_proj weights; "
                        "COCO needs separate q/k/v projections (Llama, Mistral and similar models)")
    q_size = src.shape_of[src.modules[(0, "q")] + ".weight"][0]
    kv_size = src.shape_of[src.modules[(0, "k")] + ".weight"][0]
    return NeuronLayout(len(complete), int(q_size), int(kv_size))


def planned_edits(meta: dict, arrays: dict[str, np.ndarray]) -> dict[tuple[int, str], ModuleEdit]:
    """Group the artifact's selected neurons by (layer, projection)."""
    m = meta["model"]
    layout = NeuronLayout(m["num_layers"], m["q_size"], m["kv_size"])
    selected, weight = arrays["selected"], arrays["weight"]  # [k], [k]
    act_mean = arrays.get("act_mean", np.full(layout.total, np.nan))  # [N]; older artifacts lack it
    if len(selected) == 0:
        raise CocoError("the neuron artifact selects no neurons; re-run `coco-tools identify`")
    edits: dict[tuple[int, str], ModuleEdit] = {}
    for flat, w in zip(selected.tolist(), weight.tolist()):
        if not 0 <= flat < layout.total:
            raise CocoError(f"the neuron artifact selects neuron {flat} outside its own layout; re-run identify")
        layer, proj, index = layout.address(flat)
        e = edits.setdefault((layer, proj), ModuleEdit())
        e.rows.append(index)
        e.weights.append(float(w))
        e.act_means.append(float(act_mean[flat]))
    return edits


def le_factors(weights: np.ndarray, alpha: float, option: str = "--alpha") -> np.ndarray:
    """The LE factors 1 + alpha * w; CocoError if alpha makes any of them negative
    (a negative factor would flip the neuron's sign instead of scaling it). `option`: the name
    the user gave alpha by (`coco-tools ne --le-alpha`)."""
    weights = np.asarray(weights, dtype=np.float64)
    factors = 1.0 + alpha * weights
    with np.errstate(over="ignore"):
        in_range = np.isfinite(factors.astype(np.float32)).all()
    if not in_range:
        raise CocoError(f"{option} {alpha} makes the edit factor 1 + alpha*w overflow float32 (not finite); "
                        f"choose a smaller {option} (the factor scales weights, e.g. 0.25 to 2)")
    if np.any(factors > GAIN_MAX):
        raise CocoError(f"{option} {alpha:g} makes the edit factor 1 + alpha*w exceed {GAIN_MAX:g} (weights up to "
                        f"{weights.max():.3g}); choose a smaller {option} (the factor scales weights, e.g. 0.25 to 2)")
    if np.any(factors < 0):
        pos, neg = weights[weights > 0], weights[weights < 0]
        lo = -1.0 / pos.max() if len(pos) else -math.inf
        hi = 1.0 / -neg.min() if len(neg) else math.inf
        raise CocoError(f"{option} {alpha} makes the edit factor 1 + alpha*w negative for "
                        f"{int(np.sum(factors < 0))} neurons (weights range {weights.min():.3g}..{weights.max():.3g}); "
                        f"choose {option} in [{lo:.4g}, {hi:.4g}]")
    return factors


def _bias_plan(mode: str, edits, src: SourceTensors, config: dict) -> bool:
    """For ablate-mean: True when zero q/k/v/o biases must be added (Llama's `attention_bias`).
    CocoError when the model has no biases and its architecture cannot switch them on."""
    if mode != "ablate-mean" or all(src.has_bias(key) for key in edits):
        return False
    any_bias = any(_QKVO.match(name) for name in src.file_of if name.endswith(".bias"))
    every_o = all((layer, "o") in src.modules for layer, _ in src.modules)
    if config.get("model_type") == "llama" and not any_bias and every_o:
        return True
    arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
    raise CocoError(f"--mode ablate-mean needs q/k/v biases, and {arch} has none and no config switch to add "
                    "them (only Llama's attention_bias); use --mode ablate-zero")


def _edit_record(mode, alpha, neurons_dir, fp, meta, edits, fmt, extra=None) -> dict:
    rec = {"method": METHOD_VERSION, "mode": mode, "alpha": alpha if mode == "le" else None,
           "neurons": artifact.artifact_hash(neurons_dir), "base_fingerprint": fp,
           "count": sum(len(e.rows) for e in edits.values()),
           "weighting": meta.get("selection", {}).get("weighting"), "format": fmt,
           "tool": f"vllm-coco {__version__}"}
    if fp != meta["model"].get("fingerprint"):  # --force past a mismatch: say so in the record
        rec["artifact_model_fingerprint"] = meta["model"].get("fingerprint")
    rec.update(extra or {})
    return rec


def bake(model: str, neurons_dir: str, out: str, mode: str = "le", alpha: float | None = None,
         lora: bool = False, force: bool = False) -> dict:
    """Write the edited checkpoint (or, with `lora`, the LE edit as a PEFT LoRA adapter) to `out`.

    `alpha` applies to mode "le" only (default 1.0). `force` replaces an existing `out` and accepts a
    model whose weight fingerprint differs from the artifact's (never one with a different layout).
    Returns the coco_edit.json record written beside the output.
    """
    if mode not in MODES:
        raise CocoError(f"unknown --mode {mode}; choose one of {', '.join(MODES)}")
    if alpha is not None and mode != "le":
        raise CocoError(f"--alpha applies to --mode le only; drop it for --mode {mode}")
    if lora and mode != "le":
        raise CocoError(f"--lora writes the LE edit only; drop --lora for --mode {mode}")
    alpha = LE_ALPHA if alpha is None else finite(alpha, "--alpha")

    inputs = EditInputs.open(model, neurons_dir, out, force)
    model_dir, config, sources = inputs.model_dir, inputs.config, inputs.sources
    meta, arrays = inputs.artifact
    src = scan_source(model_dir)
    fp = artifact.check_model_matches(meta, model_dir, force, layout=source_layout(src, model_dir))
    edits = planned_edits(meta, arrays)
    if mode == "ablate-mean" and "act_mean" not in arrays:
        raise CocoError(f"{neurons_dir} predates the signed activation means ablate-mean needs; "
                        "re-run `coco-tools identify`")
    if mode == "le":
        le_factors(arrays["weight"], alpha)  # refuse before writing anything
    add_bias = _bias_plan(mode, edits, src, config)
    if lora:
        biased = [src.modules[key] for key in edits if src.has_bias(key)]
        if biased:
            raise CocoError(f"{model_dir} has q/k/v biases ({biased[0]}.bias ...), which a LoRA adapter cannot "
                            "scale; bake a full checkpoint (drop --lora)")
    probe_bake(model_dir, neurons_dir, mode, alpha)

    with atomic_output_dir(out, force, sources) as tmp:
        if lora:
            rank = write_lora(tmp, model_dir, src, edits, alpha)
            record = _edit_record(mode, alpha, neurons_dir, fp, meta, edits, "lora", {"rank": rank})
        else:
            write_checkpoint(tmp, model_dir, src, edits, mode, alpha, add_bias, config)
            record = _edit_record(mode, alpha, neurons_dir, fp, meta, edits, "checkpoint",
                                  {"added_attention_bias": True} if add_bias else None)
        (tmp / EDIT_JSON).write_text(json.dumps(record, indent=1) + "\n")
    return record


PROBE_TOKENS = 8  # the finite forward's probe: a handful of token ids spread over the vocabulary


def finite_forward(model_dir: Path, edits: dict) -> None:
    """The finite forward an edit passes before it is written: PROBE_TOKENS tokens through the base
    model and through each edit (`edits`: label -> (conditions.LinearEdit or NEEdit, fix)), one batch
    row per condition. CocoError naming the base model's weight when one is NaN or inf, the base
    model when its own logits are not finite, or else the first edit whose logits are not, with its fix."""
    import torch

    from vllm_coco.core.models import probe_base
    from vllm_coco.edit.conditions import BASE, install

    model, dtype = probe_base(model_dir)  # weights checked finite, loaded once per process
    table = install(model)
    for label, (edit, _) in edits.items():
        table.add(label, edit)
    rows = [BASE, *edits]
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.linspace(0, vocab - 1, PROBE_TOKENS).long().repeat(len(rows), 1)  # [conditions, tokens]
    with torch.no_grad(), table.rows(rows):
        logits = model(input_ids=ids).logits  # [conditions, tokens, vocab]
    finite = torch.isfinite(logits).flatten(1).all(1).tolist()  # [conditions]
    what = f"on a probe of {PROBE_TOKENS} tokens"
    if not finite[0]:
        raise CocoError(f"the base model {model_dir} gives non-finite logits {what} although its weights are finite "
                        f"(they overflow {str(dtype).removeprefix('torch.')}); the base model is broken: fix or "
                        "regenerate it")
    for ok, (label, (_, fix)) in zip(finite[1:], edits.items()):
        if not ok:
            raise CocoError(f"{label} gives non-finite logits {what} of {model_dir} (the base model's are finite); "
                            f"{fix}")


def probe_bake(model_dir: Path, neurons_dir, mode: str, alpha: float) -> None:
    """The finite forward before baked weights are committed: the base model and the same edit
    applied to its q/k/v outputs (conditions.linear_edit, equal to the baked checkpoint and to the
    LoRA adapter) on a probe batch (finite_forward). CocoError naming the base model's weight
    or the edit if a logit is not finite."""
    from vllm_coco.edit.conditions import linear_edit

    edit = linear_edit(neurons_dir, mode, alpha if mode == "le" else None)
    label = f"--mode {mode}" + (f" --alpha {alpha:g}" if mode == "le" else "")
    fix = "choose a smaller --alpha" if mode == "le" else "re-run `coco-tools identify` on this model"
    finite_forward(model_dir, {label: (edit, fix)})


def _edit_rows(t, rows, e: ModuleEdit, mode: str, alpha: float, bias: bool) -> None:
    """Edit the selected rows of one weight [out, in] or bias [out] tensor in place."""
    import torch

    if mode == "le":
        # compute in float32 at least, round once to the checkpoint dtype
        cdt = torch.promote_types(t.dtype, torch.float32)
        f = torch.tensor(le_factors(e.weights, alpha), dtype=torch.float64).to(cdt)  # [r]
        t[rows] = (t[rows].to(cdt) * (f if bias else f[:, None])).to(t.dtype)
    elif bias and mode == "ablate-mean":
        t[rows] = torch.tensor(e.act_means).to(t.dtype)  # the neuron outputs its calibration mean
    else:
        t[rows] = 0


def _edit_module(tensors: dict, name: str, e: ModuleEdit, mode: str, alpha: float) -> None:
    """Apply one module's row edit in place on `tensors` (name -> torch tensor) to whichever of its
    weight and bias this shard holds (a bias may sit in another shard than its weight)."""
    import torch

    rows = torch.tensor(e.rows, dtype=torch.long)  # [r]
    for kind in ("weight", "bias"):
        if f"{name}.{kind}" in tensors:
            _edit_rows(tensors[f"{name}.{kind}"], rows, e, mode, alpha, bias=kind == "bias")


def write_checkpoint(tmp: Path, model_dir: Path, src: SourceTensors, edits, mode: str, alpha: float,
                     add_bias: bool, config: dict) -> None:
    """Write the edited checkpoint into `tmp`: same shards and names, same per-file metadata."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    # Zero biases to add (ablate-mean on a bias-free Llama): attention_bias switches on q, k, v *and* o.
    new_bias: dict[str, dict[str, tuple]] = {}  # file -> {bias name: shape}
    if add_bias:
        for name in src.modules.values():
            weight = f"{name}.weight"
            new_bias.setdefault(src.file_of[weight], {})[f"{name}.bias"] = (src.shape_of[weight][0],)
    by_name = {src.modules[key]: e for key, e in edits.items()}

    added_bytes = 0
    for f in src.files:
        with safe_open(str(f), framework="pt") as fh:
            file_meta = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        for bias_name, shape in new_bias.get(f.name, {}).items():
            dtype = tensors[bias_name[: -len(".bias")] + ".weight"].dtype
            tensors[bias_name] = torch.zeros(shape, dtype=dtype)
            added_bytes += tensors[bias_name].numel() * tensors[bias_name].element_size()
        for name, e in by_name.items():
            _edit_module(tensors, name, e, mode, alpha)
            tensors_finite({k: tensors[k] for k in (f"{name}.weight", f"{name}.bias") if k in tensors},
                           f"--mode {mode}" + (f" --alpha {alpha}" if mode == "le" else ""))
        save_file(tensors, str(tmp / f.name), metadata=file_meta)
        del tensors

    _copy_other_files(model_dir, tmp, {f.name for f in src.files})
    if (model_dir / INDEX_JSON).is_file():
        index = json.loads((model_dir / INDEX_JSON).read_text())
        if add_bias:
            for fname, names in new_bias.items():
                for bias_name in names:
                    index.setdefault("weight_map", {})[bias_name] = fname
            if "total_size" in index.get("metadata", {}):
                index["metadata"]["total_size"] += added_bytes
        (tmp / INDEX_JSON).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if add_bias:
        cfg = dict(config, attention_bias=True)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _copy_other_files(model_dir: Path, tmp: Path, weight_names: set[str]) -> None:
    """Copy every top-level non-weight file (config, tokenizer, chat template, README, ...).

    Sub-directories are skipped: in hub repos they hold other formats of the same weights
    (e.g. `original/consolidated.pth`), which must not travel unedited with the edited ones.
    """
    for p in sorted(Path(model_dir).iterdir()):
        if not p.is_file() or p.name in weight_names or p.name == INDEX_JSON or p.name == EDIT_JSON:
            continue
        if p.name.endswith(_OTHER_WEIGHTS) or p.name.endswith((".bin.index.json", ".pt.index.json")):
            continue
        shutil.copy2(p, tmp / p.name)


def write_lora(tmp: Path, model_dir: Path, src: SourceTensors, edits, alpha: float) -> int:
    """Write the LE edit as a PEFT LoRA adapter on q/k/v_proj into `tmp`; returns its rank.

    Per module with selected rows R (|R| <= r): A = W_R (zero-padded to [r, in]) and
    B = E_R diag(alpha * w_R) (zero-padded to [out, r]), so W + (lora_alpha / r) B A with
    lora_alpha = r scales row j by 1 + alpha * w_j and leaves every other row alone. Every layer's
    q/k/v gets a (possibly all-zero) pair, so PEFT and vLLM see one uniform rank.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    rank = max(len(e.rows) for e in edits.values())
    # the base rows W_R of every edited module, read file by file
    base_rows = {}  # (layer, proj) -> [|R|, in]
    for f in src.files:
        with safe_open(str(f), framework="pt") as fh:
            for key, e in edits.items():
                weight = f"{src.modules[key]}.weight"
                if src.file_of[weight] == f.name:
                    base_rows[key] = fh.get_tensor(weight)[torch.tensor(e.rows, dtype=torch.long)].float()
    tensors = {}
    for (layer, proj), name in sorted(src.modules.items()):
        if proj == "o":
            continue
        out_features, in_features = src.shape_of[f"{name}.weight"]
        a = torch.zeros(rank, in_features, dtype=torch.float32)  # [r, in]
        b = torch.zeros(out_features, rank, dtype=torch.float32)  # [out, r]
        e = edits.get((layer, proj))
        if e is not None:
            n = len(e.rows)
            a[:n] = base_rows[(layer, proj)]
            b[torch.tensor(e.rows, dtype=torch.long), torch.arange(n)] = torch.tensor(
                [alpha * x for x in e.weights], dtype=torch.float32)
        # PEFT's saved names: base_model.model.<module>.lora_{A,B}.weight
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    tensors_finite(tensors, f"--lora --alpha {alpha}")
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir),
        "r": rank, "lora_alpha": rank,  # scaling lora_alpha / r = 1: B A is exactly the edit
        "target_modules": ["q_proj", "k_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return rank
