"""The NE-COCO directory format: the one place that knows its file names, tensor names, config
keys and architecture names. `coco-tools ne` writes it, the Hugging Face reference and the vLLM
plugin read it, and every "is this an NE directory?" question asks `is_ne`.

An NE directory is the base model's files, byte-identical, plus

    coco_gate.safetensors   per layer l with S_l gated channels (layers without one are absent):
        model.layers.{l}.self_attn.coco_gate.channels  int64   [S_l]  indices into the packed [q | k | v] output
        model.layers.{l}.self_attn.coco_gate.mu        float32 [S_l]  calibration mean of |h|
        model.layers.{l}.self_attn.coco_gate.sigma     float32 [S_l]  calibration std of |h| (floored)
        model.layers.{l}.self_attn.coco_gate.w         float32 [S_l]  edit weights
        model.layers.{l}.self_attn.coco_gate.w_hat     float32 [S_l, S_l]  networked-engagement mixing
    config.json             the base config with `architectures: [CocoLlamaForCausalLM]` (or Mistral),
                            `model_type: coco_llama` (or coco_mistral), and a `coco` section: method,
                            alpha, beta, lam, ratio, weighting, base_architecture, `channels` (per layer,
                            the gated indices, so a tensor-parallel rank can size its share before any
                            weight loads), count, neurons (artifact hash), base_fingerprint,
                            w_min and w_max (the gate weights' range, which bounds per-request strengths).

Reading validates it all (`NEDirectory.read`): the section, the gate tensors' dtypes, shapes and
ranges (checks.ne_gate), and the gate factors the hyperparameters make with them (checks.ne_hyper).

The tensor names avoid ".q_proj"/".v_proj", which vLLM's weight loader rewrites. The model types
are unknown to plain transformers on purpose: the gate can never be silently dropped.
"""

from __future__ import annotations

# Lazy imports: safetensors is imported inside the functions that use it (directly or through the
# modules they import), so importing this module stays light.
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vllm_coco import METHOD_VERSION
from vllm_coco.core.architectures import ARCHITECTURES
from vllm_coco.core.checks import finite, ne_gate, ne_hyper, tensors_finite
from vllm_coco.core.errors import CocoError
from vllm_coco.core.json_file import read_config
from vllm_coco.core.names import BASE_EDIT, NE_EDIT

GATE_FILE = "coco_gate.safetensors"
GATE_KEYS = ("channels", "mu", "sigma", "w", "w_hat")
EDIT_KEYS = ("channels", "gain", "offset")
SECTION = "coco"  # the config.json key holding the gate's hyperparameters
BASE_TO_NE_ARCH = {a.base: a.ne_class for a in ARCHITECTURES}  # core/architectures.py's table
NE_TO_BASE_TYPE = {a.ne_model_type: a.model_type for a in ARCHITECTURES}
LOADER = "vllm_coco.serve.hf_reference.load_ne_model"  # named in errors that refuse an NE directory
INDEX_JSON = "model.safetensors.index.json"
_FIX = "re-export the directory with `coco-tools ne`"


def gate_prefix(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.coco_gate"


def edit_prefix(layer: int, name: str) -> str:
    return f"model.layers.{layer}.self_attn.coco_edits.{name}"


def is_ne(config: dict) -> bool:
    """Whether a config.json (as a dict) is an NE-COCO directory's."""
    return SECTION in config


def refuse_ne(config: dict, model_dir) -> None:
    """Commands that need a plain base model (identify, bake, ne) refuse an NE directory."""
    if is_ne(config):
        raise CocoError(f"{model_dir} is an NE-COCO directory; pass its base model directory instead")


def check_section(config: dict, path: Path) -> dict:
    """The `coco` section of an NE config.json: finite hyperparameters in range and one list of
    channel indices per layer. Returns it (CocoError naming the file if not)."""
    coco = config.get(SECTION)
    if not isinstance(coco, dict) or config.get("model_type") not in NE_TO_BASE_TYPE:
        raise CocoError(f"{path.parent} is not an NE-COCO directory (no coco section); create one with `coco-tools ne`")
    try:
        finite(coco.get("alpha"), f"{path}: coco.alpha")
        finite(coco.get("beta"), f"{path}: coco.beta", lo=0, lo_open=True)
        finite(coco.get("lam"), f"{path}: coco.lam", lo=0, hi=1)
        ends = [finite(coco[k], f"{path}: coco.{k}", lo=-1, hi=1) if k in coco else None for k in ("w_min", "w_max")]
        # the effective gate numbers (the tensors' own weights are checked against these in gates())
        ne_hyper(coco["alpha"], coco["beta"], coco["lam"], 0.0 if ends[0] is None else ends[0],
                 tuple(f"{path}: coco.{k}" for k in ("alpha", "beta", "lam")), w_max=ends[1])
    except CocoError as exc:
        raise CocoError(f"{exc}; {_FIX}") from None
    if coco.get("base_architecture") not in BASE_TO_NE_ARCH:
        raise CocoError(f"{path}: coco.base_architecture {coco.get('base_architecture')!r} is not one of "
                        f"{', '.join(BASE_TO_NE_ARCH)}; {_FIX}")
    channels = coco.get("channels")
    if (not isinstance(channels, list) or len(channels) != config.get("num_hidden_layers")
            or not all(isinstance(c, list) and all(isinstance(i, int) and i >= 0 for i in c) for c in channels)):
        raise CocoError(f"{path}: coco.channels is not one list of channel indices per layer; {_FIX}")
    edits = coco.get("edits", [])
    if not isinstance(edits, list):
        raise CocoError(f"{path}: coco.edits is a {type(edits).__name__}, not a list of named edits; {_FIX}")
    for e in edits:
        ch = e.get("channels") if isinstance(e, dict) else None
        if (not isinstance(e, dict) or not isinstance(e.get("name"), str) or e.get("name") in (NE_EDIT, BASE_EDIT)
                or not isinstance(e.get("mode"), str) or not isinstance(ch, list) or len(ch) != len(channels)):
            # the mode is the entry's label (an edit kind's name): its tables carry the whole edit
            raise CocoError(f"{path}: coco.edits holds an entry that is not a named edit "
                            f"(a name, its edit kind, channels per layer); {_FIX}")
    return coco


@dataclass(frozen=True)
class NEDirectory:
    """A validated NE-COCO directory: its path and config.json (with the `coco` section)."""

    path: Path
    config: dict

    @classmethod
    def read(cls, ne_dir) -> NEDirectory:
        path = Path(ne_dir)
        if not (path / "config.json").is_file():
            raise CocoError(f"{ne_dir} is not a model directory (no config.json)")
        config = read_config(path)
        check_section(config, path / "config.json")
        ne = cls(path, config)
        ne.gates()  # the gate tensors and the numbers they make with the hyperparameters: every reader's check
        return ne

    @property
    def coco(self) -> dict:
        return self.config[SECTION]

    @property
    def edit_names(self) -> list[str]:
        """The named constant edits the directory carries (beside "ne" and "base")."""
        return [e["name"] for e in self.coco.get("edits", [])]

    def _tensors(self) -> dict:
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(self.path / GATE_FILE))
        except Exception as exc:  # missing, truncated or garbage
            raise CocoError(f"{self.path / GATE_FILE} is not a readable safetensors file ({type(exc).__name__}); "
                            f"{_FIX}") from None
        tensors_finite(tensors, str(self.path / GATE_FILE), _FIX)
        return tensors

    def w_min(self) -> float:
        """The smallest gate weight (config.json's w_min; read from the tensors for older directories)."""
        if "w_min" in self.coco:
            return float(self.coco["w_min"])
        return min(float(g["w"].min()) for g in self.gates().values())

    def w_max(self) -> float:
        """The largest gate weight (config.json's w_max; read from the tensors for older directories)."""
        if "w_max" in self.coco:
            return float(self.coco["w_max"])
        return max(float(g["w"].max()) for g in self.gates().values())

    def named_edits(self) -> dict[str, dict[int, dict]]:
        """Per named edit, per layer with channels, its tensors (torch, CPU) by EDIT_KEYS name."""
        tensors = self._tensors() if self.edit_names else {}
        out = {}
        for e in self.coco.get("edits", []):
            out[e["name"]] = {}
            for layer, channels in enumerate(e["channels"]):
                if not channels:
                    continue
                names = [f"{edit_prefix(layer, e['name'])}.{k}" for k in EDIT_KEYS]
                if not all(n in tensors for n in names) or tensors[names[0]].tolist() != channels:
                    raise CocoError(f"{self.path / GATE_FILE} lacks or disagrees on edit {e['name']!r} of "
                                    f"layer {layer}; {_FIX}")
                out[e["name"]][layer] = {k: tensors[n] for k, n in zip(EDIT_KEYS, names)}
        return out

    def base_config(self) -> tuple[str, dict]:
        """(base model_type, config kwargs) of the model under the gate."""
        kwargs = {k: v for k, v in self.config.items() if k not in (SECTION, "architectures", "model_type")}
        return NE_TO_BASE_TYPE[self.config["model_type"]], kwargs

    def gates(self) -> dict[int, dict]:
        """Per gated layer, its tensors (torch, CPU) by GATE_KEYS name; every one finite."""
        tensors = self._tensors()
        out = {}
        for layer, channels in enumerate(self.coco["channels"]):
            if channels:
                names = [f"{gate_prefix(layer)}.{k}" for k in GATE_KEYS]
                if not all(n in tensors for n in names):
                    raise CocoError(f"{self.path / GATE_FILE} lacks layer {layer}'s gate tensors; {_FIX}")
                gate = {k: tensors[n] for k, n in zip(GATE_KEYS, names)}
                s = len(channels)
                shapes = {k: tuple(gate[k].shape) for k in GATE_KEYS}
                if shapes != {"channels": (s,), "mu": (s,), "sigma": (s,), "w": (s,), "w_hat": (s, s)} \
                        or gate["channels"].tolist() != channels:
                    raise CocoError(f"{self.path / GATE_FILE}: layer {layer}'s gate tensors do not match the "
                                    f"{s} channels config.json names for it; {_FIX}")
                ne_gate(gate, f"{self.path / GATE_FILE}: layer {layer}'s gate", _FIX)
                out[layer] = gate
        self._check_numbers(out)
        return out

    def _check_numbers(self, gates: dict[int, dict]) -> None:
        """config.json's w_min / w_max are the tensors' (requests are bounded by them), and the
        hyperparameters with the tensors' weights keep every gate factor in range."""
        if not gates:
            return
        w = np.concatenate([np.asarray(g["w"], dtype=np.float64) for g in gates.values()])
        config = self.path / "config.json"
        for key, value in (("w_min", w.min()), ("w_max", w.max())):
            if key in self.coco and not np.isclose(float(self.coco[key]), value, rtol=1e-6, atol=1e-7):
                raise CocoError(f"{config}: coco.{key} {self.coco[key]} disagrees with the gate tensors' "
                                f"{value:.6g}; {_FIX}")
        try:
            ne_hyper(self.coco["alpha"], self.coco["beta"], self.coco["lam"], float(w.min()),
                     tuple(f"{config}: coco.{k}" for k in ("alpha", "beta", "lam")), w_max=float(w.max()))
        except CocoError as exc:
            raise CocoError(f"{exc}; {_FIX}") from None


def write(tmp: Path, base_config: dict, coco: dict, gate: dict[int, dict],
          edits: dict[str, dict[int, dict]] | None = None) -> None:
    """Write the NE parts into `tmp`, which already holds the base model's files: the gate
    tensors (and the named edits' tables, per name and layer), the sharded index entries (if the
    base is sharded) and the NE config.json."""
    from safetensors.numpy import save_file


    tensors = {f"{gate_prefix(l)}.{k}": np.ascontiguousarray(g[k]) for l, g in gate.items() for k in GATE_KEYS}
    for name, layers in (edits or {}).items():
        tensors.update({f"{edit_prefix(l, name)}.{k}": np.ascontiguousarray(t[k])
                        for l, t in layers.items() for k in EDIT_KEYS})
    save_file(tensors, str(tmp / GATE_FILE), metadata={"format": "pt", "method": METHOD_VERSION})
    index = tmp / INDEX_JSON
    if index.exists():  # sharded base: the index must list the gate tensors too
        idx = json.loads(index.read_text())
        idx["weight_map"].update({name: GATE_FILE for name in tensors})
        index.write_text(json.dumps(idx, indent=2) + "\n")
    config = dict(base_config)
    config["architectures"] = [BASE_TO_NE_ARCH[coco["base_architecture"]]]
    config["model_type"] = "coco_" + base_config["model_type"]
    config[SECTION] = coco
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
