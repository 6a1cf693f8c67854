"""The `coco-tools bake` job: write an edited copy of a model (LE-COCO or an ablation), or the
LE-COCO edit as a PEFT LoRA adapter (docs/METHOD.md §6).

Everything works on the safetensors files directly, one shard at a time; the model is
instantiated only for the finite forward (`finite_forward`: a probe of 8 tokens on the CPU, base
and edited, before anything is written). Only the rows of the selected neurons in
`...layers.{l}.self_attn.{q,k,v}_proj.weight` (and `.bias`) change; every other tensor, each
file's safetensors metadata and the shard layout are kept, and the non-weight files (config,
tokenizer, chat template, ...) are copied unchanged.

    any kind     W[n,:] <- gain_n W[n,:], b_n <- gain_n b_n + offset_n   (edit/kind.py's tables)
    le           gain 1 + alpha w_n; ablate-zero gain 0; ablate-mean gain 0, offset act_mean_n
    --lora       B = E_R diag(gain_R - 1), A = W_R per (layer, projection): W + B A is the edit
                 (kinds without offsets only)

The source directory is only read. Inputs are JSON and safetensors: nothing is unpickled.
"""

from __future__ import annotations

# Lazy imports: torch, safetensors are imported inside the functions that use them (directly or
# through the modules they import), so importing this module stays light.
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from vllm_coco import METHOD_VERSION, __version__
from vllm_coco.core import artifact
from vllm_coco.core.atomic import atomic_output_dir
from vllm_coco.core.checks import tensors_finite
from vllm_coco.core.errors import CocoError
from vllm_coco.core.models import PROJS, NeuronLayout
from vllm_coco.core.ne_format import INDEX_JSON
from vllm_coco.edit import model_card, registry
from vllm_coco.edit.conditions import linear_edit
from vllm_coco.edit.inputs import EditInputs
from vllm_coco.edit.kind import LinearKind, given
from vllm_coco.edit.plan import ModuleEdit, check_inputs, module_tables, planned_edits, shifts
from vllm_coco.edit.probe import finite_forward

EDIT_JSON = "coco_edit.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Weight formats other than safetensors: never read (they may be pickles) and never copied (an
# unedited copy of the weights beside the edited ones could be loaded instead of them).
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
_QKVO = re.compile(r"^(?P<prefix>.*)layers\.(?P<layer>\d+)\.self_attn\.(?P<proj>[qkvo])_proj\.(?P<kind>weight|bias)$")


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


def holds_offsets(model_dir: Path) -> bool:
    """Whether a checkpoint of this model can carry an edit that shifts q/k/v outputs (ablate-mean,
    steer): its config says its attention has biases, or it is a Llama, whose attention_bias the bake
    switches on (docs/METHOD.md §9.2 D6). A kind that shifts is refused by `bake` on any other."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return config.get("model_type") == "llama" or bool(config.get("attention_bias"))


def _bias_plan(kind: LinearKind, tables, edits, src: SourceTensors, config: dict) -> bool:
    """For an edit that shifts outputs (ablate-mean): True when zero q/k/v/o biases must be added
    (Llama's `attention_bias`). CocoError when the model has no biases and its architecture cannot
    switch them on."""
    if not shifts(kind, tables) or all(src.has_bias(key) for key in edits):
        return False
    any_bias = any(_QKVO.match(name) for name in src.file_of if name.endswith(".bias"))
    every_o = all((layer, "o") in src.modules for layer, _ in src.modules)
    if config.get("model_type") == "llama" and not any_bias and every_o:
        return True
    arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
    unshifted = [k for k in registry.names() if not registry.get(k).shifts]
    raise CocoError(f"--mode {kind.name} needs q/k/v biases, and {arch} has none and no config switch to add "
                    f"them (only Llama's attention_bias); use --mode {' or '.join(unshifted)}")


def _edit_record(kind, settings, neurons_dir, fp, meta, edits, fmt, extra=None) -> dict:
    rec = {"method": METHOD_VERSION, "mode": kind.name, "settings": settings,
           "neurons": artifact.artifact_hash(neurons_dir), "base_fingerprint": fp,
           "count": sum(len(e.rows) for e in edits.values()),
           "weighting": meta.get("selection", {}).get("weighting"), "format": fmt,
           "tool": f"vllm-coco {__version__}"}
    if fp != meta["model"].get("fingerprint"):  # --force past a mismatch: say so in the record
        rec["artifact_model_fingerprint"] = meta["model"].get("fingerprint")
    rec.update(extra or {})
    return rec


def bake(model: str, neurons_dir: str, out: str, mode: str = "le", alpha: float | None = None,
         lora: bool = False, force: bool = False, params: dict[str, float] | None = None) -> dict:
    """Write the edited checkpoint (or, with `lora`, the edit as a PEFT LoRA adapter) to `out`.

    `mode`: a registered edit kind (edit/registry.py); `alpha` and `params` its settings (defaults:
    the kind's). `force` replaces an existing `out` and accepts a model whose weight fingerprint
    differs from the artifact's (never one with a different layout). Returns the coco_edit.json
    record written beside the output.
    """
    kind = registry.get(mode, "--mode")
    settings = kind.settings(given(params, alpha), mode_word="--mode")
    if lora and kind.shifts:
        raise CocoError(f"--lora holds gain-only edits (W + B A), and --mode {mode} shifts its neurons' outputs; "
                        "drop --lora")

    inputs = EditInputs.open(model, neurons_dir, out, force)
    model_dir, config, sources = inputs.model_dir, inputs.config, inputs.sources
    meta, arrays = inputs.artifact
    src = scan_source(model_dir)
    fp = artifact.check_model_matches(meta, model_dir, force, layout=source_layout(src, model_dir))
    edits = planned_edits(meta, arrays)
    check_inputs(kind, arrays, neurons_dir)
    tables = module_tables(kind, settings, edits, arrays)  # refuses out-of-range settings before anything is written
    add_bias = _bias_plan(kind, tables, edits, src, config)
    if lora and shifts(kind, tables):
        raise CocoError(f"--lora holds gain-only edits (W + B A), and --mode {mode} gives these neurons offsets; "
                        "drop --lora")
    if lora:
        biased = [src.modules[key] for key in edits if src.has_bias(key)]
        if biased:
            raise CocoError(f"{model_dir} has q/k/v biases ({biased[0]}.bias ...), which a LoRA adapter cannot "
                            "scale; bake a full checkpoint (drop --lora)")
    probe_bake(model_dir, neurons_dir, kind, settings)

    with atomic_output_dir(out, force, sources) as tmp:
        label = kind.options(settings)
        if lora:
            rank = write_lora(tmp, model_dir, src, edits, tables, label)
            record = _edit_record(kind, settings, neurons_dir, fp, meta, edits, "lora", {"rank": rank})
        else:
            write_checkpoint(tmp, model_dir, src, edits, tables, add_bias, config, label)
            record = _edit_record(kind, settings, neurons_dir, fp, meta, edits, "checkpoint",
                                  {"added_attention_bias": True} if add_bias else None)
        (tmp / EDIT_JSON).write_text(json.dumps(record, indent=1) + "\n")
        model_card.write(tmp, model_dir, config, meta, record["neurons"], record["format"], kind.name, kind.summary,
                         settings)
    return record


def probe_bake(model_dir: Path, neurons_dir, kind: LinearKind, settings: dict) -> None:
    """The finite forward before baked weights are committed: the base model and the same edit
    applied to its q/k/v outputs (conditions.linear_edit, equal to the baked checkpoint and to the
    LoRA adapter) on a probe batch (probe.finite_forward). CocoError naming the base model's weight
    or the edit if a logit is not finite."""
    edit = linear_edit(neurons_dir, kind.name, params=settings)
    finite_forward(model_dir, {kind.options(settings): (edit, kind.fix())})


def _edit_rows(t, rows, gain, offset, bias: bool) -> None:
    """rows <- gain * rows (a bias: + offset) of one weight [out, in] or bias [out] tensor, in place;
    computed in float32 at least and rounded once to the checkpoint dtype."""
    import torch

    cdt = torch.promote_types(t.dtype, torch.float32)
    g = torch.tensor(gain, dtype=torch.float64).to(cdt)  # [r]
    if bias:
        t[rows] = (t[rows].to(cdt) * g + torch.tensor(offset, dtype=torch.float64).to(cdt)).to(t.dtype)
    else:
        t[rows] = (t[rows].to(cdt) * g[:, None] + 0.0).to(t.dtype)  # + 0.0: a zero gain writes 0, not -0


def _edit_module(tensors: dict, name: str, e: ModuleEdit, table) -> None:
    """Apply one module's row edit in place on `tensors` (name -> torch tensor) to whichever of its
    weight and bias this shard holds (a bias may sit in another shard than its weight)."""
    import torch

    rows = torch.tensor(e.rows, dtype=torch.long)  # [r]
    for kind in ("weight", "bias"):
        if f"{name}.{kind}" in tensors:
            _edit_rows(tensors[f"{name}.{kind}"], rows, *table, bias=kind == "bias")


def write_checkpoint(tmp: Path, model_dir: Path, src: SourceTensors, edits, tables, add_bias: bool,
                     config: dict, label: str) -> None:
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
    by_name = {src.modules[key]: (e, tables[key]) for key, e in edits.items()}

    added_bytes = 0
    for f in src.files:
        with safe_open(str(f), framework="pt") as fh:
            file_meta = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        for bias_name, shape in new_bias.get(f.name, {}).items():
            dtype = tensors[bias_name[: -len(".bias")] + ".weight"].dtype
            tensors[bias_name] = torch.zeros(shape, dtype=dtype)
            added_bytes += tensors[bias_name].numel() * tensors[bias_name].element_size()
        for name, (e, table) in by_name.items():
            _edit_module(tensors, name, e, table)
            tensors_finite({k: tensors[k] for k in (f"{name}.weight", f"{name}.bias") if k in tensors}, label)
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


def write_lora(tmp: Path, model_dir: Path, src: SourceTensors, edits, tables, label: str) -> int:
    """Write a gain-only edit as a PEFT LoRA adapter on q/k/v_proj into `tmp`; returns its rank.

    Per module with selected rows R (|R| <= r): A = W_R (zero-padded to [r, in]) and
    B = E_R diag(gain_R - 1) (zero-padded to [out, r]), so W + (lora_alpha / r) B A with
    lora_alpha = r scales row j by gain_j (LE: 1 + alpha * w_j) and leaves every other row alone. Every layer's
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
            gain = tables[(layer, proj)][0]  # [n] float64
            b[torch.tensor(e.rows, dtype=torch.long), torch.arange(n)] = torch.tensor(gain - 1.0, dtype=torch.float32)
        # PEFT's saved names: base_model.model.<module>.lora_{A,B}.weight
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    tensors_finite(tensors, f"--lora {label}")
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
