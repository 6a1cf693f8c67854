"""Edit conditions applied in memory to a loaded transformers model, per batch row.

Every edit this project makes acts on the packed q/k/v projection outputs of an attention layer,
so a loaded base model can run any of them without a checkpoint copy:

    base         h <- h
    a linear     h_n <- gain_n * h_n + offset_n  (any kind of edit/registry.py: le, ablate-zero,
      kind                                       ablate-mean, ...; bake --mode KIND writes the same)
    ne           h_S <- h_S * g(h_S)             (coco-tools ne; the one gate formula, edit/gate.py)

A linear kind's tables come from its own module (edit/kinds/), base is gain 1, offset 0.
`install(model)` wraps each attention module once and returns the `Conditions` table; edits are
registered by name, and `Conditions.rows(index)` says which edit each row of the next forward uses,
so several conditions run in one batch and a row of the base condition is computed bit for bit as
the unwrapped model computes it (x * 1 + 0 and a gate of strength 0 are exact).

The factors come from the same functions `coco-tools bake` and `coco-tools ne` use
(`plan.module_tables`, `ne_gate.checked_gate`); tests/test_conditions.py
checks each condition against the directory those commands write.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vllm_coco.core import artifact
from vllm_coco.core.checks import finite
from vllm_coco.core.errors import CocoError
from vllm_coco.core.models import fingerprint
from vllm_coco.core.names import BASE_EDIT, NE_ALPHA, NE_BETA, NE_LAM, RATIO
from vllm_coco.core.ne_format import NEDirectory
from vllm_coco.edit import registry
from vllm_coco.edit.gate import apply_gate
from vllm_coco.edit.kind import given
from vllm_coco.edit.ne_gate import checked_gate
from vllm_coco.edit.plan import check_inputs, module_tables, planned_edits


@dataclass(frozen=True)
class LinearEdit:
    """h <- gain * h + offset on the packed [q | k | v] output of each listed layer."""

    mode: str  # the edit kind's name (a label: the tables are the whole edit)
    channels: dict[int, np.ndarray]  # layer -> [r] packed channel indices
    gain: dict[int, np.ndarray]  # layer -> [r] float64
    offset: dict[int, np.ndarray]  # layer -> [r] float64


@dataclass(frozen=True)
class NEEdit:
    """The NE-COCO gate: per-layer gate tensors (core/ne_format.GATE_KEYS) and its hyperparameters."""

    gates: dict[int, dict[str, np.ndarray | torch.Tensor]]
    alpha: float = NE_ALPHA
    beta: float = NE_BETA
    lam: float = NE_LAM


Edit = LinearEdit | NEEdit


# --------------------------------------------------------------------------- building edits

def _artifact_for(neurons_dir, model_dir: Path | None, layout) -> tuple[dict, dict]:
    meta, arrays = artifact.Artifact.read(neurons_dir)
    if model_dir is not None:
        artifact.check_model_matches(meta, Path(model_dir), force=False, layout=layout)
    return meta, arrays


def linear_edit(neurons_dir, mode: str, alpha: float | None = None, model_dir: Path | None = None,
                layout=None, option: str = "--alpha", params: dict[str, float] | None = None) -> LinearEdit:
    """A linear edit kind (edit/registry.py) of an identify artifact as per-channel gains and offsets;
    equals `coco-tools bake MODEL NEURONS --mode MODE [--alpha A]` on the q/k/v outputs. `alpha` and
    `params` are the kind's settings (defaults: its own); `model_dir` (the loaded base) is checked
    against the artifact's fingerprint and layout; `option` names alpha in errors as the user gave it."""
    kind = registry.get(mode)
    settings = kind.settings(given(params, alpha), {"alpha": option})
    meta, arrays = _artifact_for(neurons_dir, model_dir, layout)
    check_inputs(kind, arrays, neurons_dir)
    q, kv = meta["model"]["q_size"], meta["model"]["kv_size"]
    base_of = {"q": 0, "k": q, "v": q + kv}  # offsets of each projection in the packed output
    edits = planned_edits(meta, arrays)
    tables = module_tables(kind, settings, edits, arrays, {"alpha": option})
    channels, gain, offset = {}, {}, {}
    for (layer, proj), e in sorted(edits.items()):
        rows = np.asarray(e.rows, dtype=np.int64) + base_of[proj]
        g, o = tables[(layer, proj)]
        channels[layer] = np.concatenate([channels.get(layer, np.zeros(0, np.int64)), rows])
        gain[layer] = np.concatenate([gain.get(layer, np.zeros(0)), g])
        offset[layer] = np.concatenate([offset.get(layer, np.zeros(0)), o])
    return LinearEdit(mode, channels, gain, offset)


def ne_edit(neurons_dir, alpha: float = NE_ALPHA, beta: float = NE_BETA, lam: float = NE_LAM,
            ratio: float | None = None, model_dir: Path | None = None, layout=None) -> NEEdit:
    """The NE-COCO gate of an identify artifact; equals `coco-tools ne MODEL NEURONS --alpha ...`."""
    alpha, beta, lam = finite(alpha, "alpha"), finite(beta, "beta"), finite(lam, "lam")
    meta, arrays = _artifact_for(neurons_dir, model_dir, layout)
    ratio = ratio if ratio is not None else (meta["selection"]["ratio"] or RATIO)
    gates = checked_gate(meta, arrays, neurons_dir, finite(ratio, "ratio"), alpha, beta, lam)
    return NEEdit(gates, alpha, beta, lam)


def ne_dir_edit(ne_dir, model_dir: Path | None = None, alpha: float | None = None) -> NEEdit:
    """The gate of an NE-COCO directory (`alpha` overrides its strength). With `model_dir`, the
    directory must have been exported from that model (same weight fingerprint)."""
    ne = NEDirectory.read(ne_dir)
    if model_dir is not None and Path(model_dir).resolve() != ne.path.resolve():
        want = ne.coco.get("base_fingerprint")
        if want and want != fingerprint(Path(model_dir)):
            raise CocoError(f"{ne.path} was exported from another model than {model_dir} (weight fingerprint "
                            f"{want} differs); export it again with `coco-tools ne {model_dir} NEURONS`")
    gates = {layer: {k: v.numpy() for k, v in g.items()} for layer, g in ne.gates().items()}
    return NEEdit(gates, ne.coco["alpha"] if alpha is None else float(alpha), ne.coco["beta"], ne.coco["lam"])


# --------------------------------------------------------------------------- applying them

@dataclass
class _LayerTable:
    """One layer's view of every registered condition."""

    gain: torch.Tensor | None = None  # [C, width] float32 (row 0: base, all ones)
    offset: torch.Tensor | None = None  # [C, width] float32
    linear: set[int] = field(default_factory=set)  # condition ids with a linear edit here
    gates: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # condition id -> gate tensors


class Conditions:
    """Named edit conditions on one loaded model (made by `install`). Condition 0 is the base model."""

    def __init__(self, widths: list[int], device: torch.device):
        self.names: list[str] = [BASE_EDIT]
        self.edits: list[Edit | None] = [None]
        self.layers = [_LayerTable() for _ in widths]
        self.widths = widths
        self.device = device
        self.default = 0  # the condition of every row when no `rows` is set
        self._rows: torch.Tensor | None = None  # [batch] condition ids of the current forward
        self._active: set[int] = set()

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise CocoError(f"no edit condition named {name!r}; registered: {', '.join(self.names)}") from None

    def add(self, name: str, edit: Edit) -> int:
        """Register `edit` under `name` (replacing an edit of that name); returns its condition id.
        Every layer and channel is checked first: a refused edit changes nothing."""
        if name == BASE_EDIT:
            raise CocoError(f"{BASE_EDIT!r} names the unedited model; choose another condition name")
        linear = isinstance(edit, LinearEdit)
        parts = edit.channels if linear else {layer: g["channels"] for layer, g in edit.gates.items()}
        for layer, ch in parts.items():
            if not 0 <= layer < len(self.layers):
                raise CocoError(f"edit {name!r} names layer {layer}, and the model has {len(self.layers)}; "
                                "the neuron set was made for another model")
            ch = torch.as_tensor(ch)
            if len(ch) and (int(ch.min()) < 0 or int(ch.max()) >= self.widths[layer]):
                bad = int(ch.max()) if int(ch.max()) >= self.widths[layer] else int(ch.min())
                raise CocoError(f"edit {name!r} names channel {bad} of layer {layer}, outside its q/k/v width "
                                f"{self.widths[layer]}; the edit was made for another model")
        if name in self.names:
            cid = self.names.index(name)
            self._clear(cid)
        else:
            cid = len(self.names)
            self.names.append(name)
            self.edits.append(None)
        self.edits[cid] = edit
        self._grow()
        if linear:
            for layer, ch in edit.channels.items():
                t, width = self.layers[layer], self.widths[layer]
                if t.gain is None:
                    t.gain = torch.ones(len(self.names), width, dtype=torch.float32, device=self.device)  # [C, w]
                    t.offset = torch.zeros(len(self.names), width, dtype=torch.float32, device=self.device)
                idx = torch.as_tensor(ch, dtype=torch.long, device=self.device)  # [r]
                t.gain[cid, idx] = torch.as_tensor(edit.gain[layer], dtype=torch.float32, device=self.device)
                t.offset[cid, idx] = torch.as_tensor(edit.offset[layer], dtype=torch.float32, device=self.device)
                t.linear.add(cid)
        else:
            for layer, gate in edit.gates.items():
                self.layers[layer].gates[cid] = {k: torch.as_tensor(v).to(self.device)  # numpy or torch
                                                 for k, v in gate.items()}
        return cid

    def _grow(self) -> None:
        """Give every layer's gain/offset table one row per registered condition."""
        for t in self.layers:
            if t.gain is not None and t.gain.shape[0] < len(self.names):
                extra = len(self.names) - t.gain.shape[0]
                t.gain = torch.cat([t.gain, t.gain.new_ones(extra, t.gain.shape[1])])
                t.offset = torch.cat([t.offset, t.offset.new_zeros(extra, t.offset.shape[1])])

    def _clear(self, cid: int) -> None:
        for t in self.layers:
            t.gates.pop(cid, None)
            if cid in t.linear and t.gain is not None:
                t.gain[cid], t.offset[cid] = 1.0, 0.0
                t.linear.discard(cid)

    @contextlib.contextmanager
    def rows(self, conditions):
        """Within the block, row i of every forward runs condition `conditions[i]` (names or ids)."""
        ids = [c if isinstance(c, int) else self.index(c) for c in conditions]
        prev = self._rows, self._active
        self._rows = torch.tensor(ids, dtype=torch.long, device=self.device)  # [batch]
        self._active = set(ids)
        try:
            yield
        finally:
            self._rows, self._active = prev

    def use(self, name: str) -> None:
        """Make `name` the condition of every row outside a `rows` block."""
        self.default = self.index(name)

    # --------------------------------------------------------------- the per-layer transform
    def apply(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: [batch, tokens, width] packed projection outputs -> the edited ones."""
        t = self.layers[layer]
        rows, active = self._rows, self._active
        if rows is None:
            active = {self.default}
        if active == {0}:
            return qkv
        if rows is not None and rows.shape[0] != qkv.shape[0]:
            raise RuntimeError(f"condition rows has {rows.shape[0]} entries for a batch of {qkv.shape[0]}")
        lin = active & t.linear
        if lin:
            if rows is None:
                g, o = t.gain[self.default][None, None], t.offset[self.default][None, None]  # [1, 1, width]
            else:
                g = t.gain.index_select(0, rows)[:, None]  # [batch, 1, width]
                o = t.offset.index_select(0, rows)[:, None]  # [batch, 1, width]
            qkv = (qkv.float() * g + o).to(qkv.dtype)
        for cid in sorted(active & t.gates.keys()):
            gate, edit = t.gates[cid], self.edits[cid]
            if rows is None:
                alpha = edit.alpha
            else:  # strength 0 on the other rows: a gain of exactly 1 there
                alpha = ((rows == cid).float() * edit.alpha)[:, None, None].expand(qkv.shape[0], qkv.shape[1], 1)
                alpha = alpha.reshape(-1, 1)  # [batch * tokens, 1]
            qkv = apply_gate(qkv, gate["channels"], gate["mu"], gate["sigma"], gate["w"], gate["w_hat"],
                             alpha, edit.beta, edit.lam)
        return qkv


class _Stored(nn.Module):
    """Stands in for q_proj / k_proj / v_proj: returns the tensor the wrapper stored for this call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.out = None

    def forward(self, x):
        out, self.out = self.out, None
        if out is None:  # called outside the wrapper: behave like the plain projection
            return self.linear(x)
        return out


class EditedAttention(nn.Module):
    """Wraps one attention module: computes the packed [q | k | v] projections, lets the condition
    table edit them, and hands them to the unchanged attention forward through stand-in projections.
    (The NE gate needs q and v of a layer at once: W_hat mixes them.)

    The three projections run as one matmul on a fused [q+2kv, hidden] weight; q_proj / k_proj /
    v_proj keep their parameters as row views of it, so memory is unchanged and a load_state_dict
    that copies into them updates the fused weight too (one GEMM instead of three and a cat: 3-9 %
    of the projections' time on a 2-core CPU, the same numbers to the bit there). For inference: the
    fused weight is not a leaf autograd tracks, so no gradient reaches q/k/v through it."""

    def __init__(self, attn: nn.Module, layer: int, table: Conditions):
        super().__init__()
        self.inner = attn
        self.layer = layer
        self.table = table
        self.sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        for p in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, p, _Stored(getattr(attn, p)))
        # unregistered (no state_dict key): the [q+2kv, hidden] weight and [q+2kv] bias (or None)
        self._fused: tuple[torch.Tensor, torch.Tensor | None] = (torch.empty(0), None)
        self._views: tuple[int, ...] = ()
        # weights that accelerate loads on call (offload hooks, meta placeholders) must go through the
        # Linear modules themselves: those run unfused
        self._fusable = not any(hasattr(lin, "_hf_hook") or lin.weight.device.type == "meta" for lin in self._linears())
        if self._fusable:
            self._fuse()

    def _linears(self) -> list[nn.Linear]:
        return [self.inner.q_proj.linear, self.inner.k_proj.linear, self.inner.v_proj.linear]

    @torch.no_grad()
    def _fuse(self) -> None:
        """Make the fused weight (and bias) and re-point the three projections at row views of it."""
        lins = self._linears()
        weight = torch.cat([lin.weight for lin in lins])  # [q+2kv, hidden]
        bias = torch.cat([lin.bias for lin in lins]) if all(lin.bias is not None for lin in lins) else None
        if bias is None and any(lin.bias is not None for lin in lins):
            bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                              for lin in lins])
        start = 0
        for lin, size in zip(lins, self.sizes):
            lin.weight = nn.Parameter(weight[start: start + size], requires_grad=lin.weight.requires_grad)
            if lin.bias is not None:
                lin.bias = nn.Parameter(bias[start: start + size], requires_grad=lin.bias.requires_grad)
            start += size
        self._fused = (weight, bias)
        self._views = self._pointers()

    def _pointers(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for lin in self._linears() for t in (lin.weight, lin.bias) if t is not None)

    def forward(self, *args, **kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        a = self.inner
        if not self._fusable:
            qkv = torch.cat([lin(x) for lin in self._linears()], dim=-1)  # [b, t, q+2kv]
        else:
            if self._pointers() != self._views:  # a projection was moved, re-cast or replaced since: fuse again
                self._fuse()
            qkv = F.linear(x, *self._fused)  # [b, t, q+2kv]
        qkv = self.table.apply(self.layer, qkv)
        a.q_proj.out, a.k_proj.out, a.v_proj.out = qkv.split(self.sizes, dim=-1)
        return a(*args, **kwargs)


def install(model: nn.Module) -> Conditions:
    """Wrap every attention module of a transformers Llama/Mistral-style causal LM (once; a second
    call returns the same table). Returns the model's `Conditions`."""
    existing = getattr(model, "coco_conditions", None)
    if existing is not None:
        return existing
    layers = model.model.layers
    widths = [int(layer.self_attn.q_proj.out_features + layer.self_attn.k_proj.out_features
                  + layer.self_attn.v_proj.out_features) for layer in layers]
    table = Conditions(widths, next(model.parameters()).device)
    for i, layer in enumerate(layers):
        layer.self_attn = EditedAttention(layer.self_attn, i, table)
    model.coco_conditions = table
    return table
