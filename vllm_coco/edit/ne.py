"""`coco-tools ne`: export an NE-COCO model directory (base weights unchanged + a runtime gate).

The gate's tensors are edit/ne_gate.py's (docs/METHOD.md §7.1-§7.2); named constant edits of the
same neurons (`--with KIND`, any linear kind of edit/registry.py) travel as gain/offset tables that
a request picks by name. The directory format (file, tensor and config names) is core/ne_format.py's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from vllm_coco import METHOD_VERSION, __version__
from vllm_coco.core import artifact, ne_format
from vllm_coco.core.atomic import atomic_output_dir
from vllm_coco.core.checks import finite
from vllm_coco.core.errors import CocoError
from vllm_coco.core.names import NE_ALPHA, NE_BETA, NE_LAM, RATIO
from vllm_coco.core.ne_format import BASE_TO_NE_ARCH
from vllm_coco.edit import model_card, registry
from vllm_coco.edit.conditions import NEEdit, linear_edit
from vllm_coco.edit.inputs import EditInputs
from vllm_coco.edit.ne_gate import checked_gate, gate_weight_range
from vllm_coco.edit.probe import finite_forward
from vllm_coco.identify.selection import count_for

LE_OPTION = "--le-alpha"  # the named edit le's strength is given by this option (its gate has --alpha)


def named_edits(neurons_dir, kinds, le_alpha: float | None) -> tuple[list[dict], dict, dict]:
    """The constant edits `--with KIND` adds to an NE directory, named by their kind (their default
    settings; `le_alpha` the le edit's strength): their config entries, their tables per layer (the
    same factors `coco-tools bake` writes) and the edits themselves (conditions.LinearEdit, by name:
    what the export's probe runs)."""
    entries, tables, edits = [], {}, {}
    for name in dict.fromkeys(kinds):  # once each, in the order given
        kind = registry.get(name, "--with")
        given = {"alpha": le_alpha} if name == "le" else {}
        settings = kind.settings(given, {"alpha": LE_OPTION})
        # the artifact was checked against the model by the caller
        e = edits[name] = linear_edit(neurons_dir, name, params=settings, option=LE_OPTION)
        layers = max(e.channels, default=-1) + 1
        tables[name] = {l: {"channels": e.channels[l].astype(np.int64), "gain": e.gain[l].astype(np.float32),
                            "offset": e.offset[l].astype(np.float32)} for l in e.channels}
        entries.append({"name": name, "mode": name, "settings": settings,
                        "channels": [e.channels[l].tolist() if l in e.channels else [] for l in range(layers)]})
    return entries, tables, edits


def write_ne(model: str, neurons_dir: str, out: str, alpha: float = NE_ALPHA, beta: float = NE_BETA,
             lam: float = NE_LAM, ratio: float | None = None, force: bool = False,
             with_edits: tuple[str, ...] = (), le_alpha: float | None = None) -> dict:
    """Write an NE-COCO directory; returns its `coco` config section. `with_edits` adds named
    constant edits (modes of `coco-tools bake`) that a request can pick instead of the gate."""
    alpha, beta, lam = finite(alpha, "--alpha"), finite(beta, "--beta"), finite(lam, "--lam")
    if le_alpha is not None and "le" not in with_edits:
        raise CocoError(f"{LE_OPTION} sets the strength of the named edit 'le'; add --with le or drop it")
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
        gate_kind = registry.gate()
        model_card.write(tmp, model_dir, config, meta, coco["neurons"], "ne", gate_kind.name, gate_kind.summary,
                         {"alpha": alpha, "beta": beta, "lam": lam, "ratio": ratio})
    return coco


def probe_export(model_dir: Path, gate: dict, alpha: float, beta: float, lam: float, edits: dict) -> None:
    """The finite forward before an NE directory is committed: the base model, the gate and every
    named edit on a probe batch (probe.finite_forward); CocoError naming what gave a non-finite logit."""
    probe = {"the NE gate": (NEEdit(gate, alpha, beta, lam),
                             f"--alpha {alpha:g} --beta {beta:g} --lam {lam:g} overflows this model: choose a smaller "
                             "--alpha")}
    for name, e in edits.items():
        # only le's strength is an option of `ne` (--le-alpha); any other named edit runs at its defaults
        fix = f"choose a smaller {LE_OPTION}" if name == "le" else f"drop --with {name} (its defaults overflow it)"
        probe[f"the named edit {name} (--with {name})"] = (e, fix)
    finite_forward(model_dir, probe)
