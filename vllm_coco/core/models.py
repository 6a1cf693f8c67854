"""Model directories: validation, loading, weight fingerprints, the q/k/v neuron layout."""

from __future__ import annotations

# Lazy imports: torch, transformers, safetensors, huggingface_hub are imported inside the functions
# that use them (directly or through the modules they import), so importing this module stays light.
import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vllm_coco.core import ne_format
from vllm_coco.core.errors import CocoError, held_stderr
from vllm_coco.core.json_file import read_config, read_json
from vllm_coco.core.names import DTYPES, PROJS  # noqa: F401 (re-exported)

_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def resolve_model_dir(model: str) -> Path:
    """A local model directory (must hold config.json), or a hub id downloaded to the local cache.

    Hub ids ("org/name") are only tried when no such local path exists; offline this fails
    with a CocoError naming the problem.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CocoError(f"model {model} is a file, not a model directory; pass the directory holding config.json")
        if not (path / "config.json").is_file():
            raise CocoError(f"{model} is not a Hugging Face model directory (no config.json); "
                            "pass a directory written by save_pretrained or `coco-tools demo-model`")
        return path.absolute()
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as exc:  # offline, gated, missing: all the same to the user
            raise CocoError(f"model directory {model} does not exist and could not be fetched from the hub "
                            f"({type(exc).__name__}); pass a local model directory") from None
    raise CocoError(f"model directory {model} does not exist; pass a Hugging Face model directory "
                    "(e.g. one made by `coco-tools demo-model`)")


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files vllm-coco loads: *.safetensors only (other formats, pickles, are never read)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise CocoError(f"{model_dir} has no weight files (*.safetensors); pass a complete model directory")
    return files


def check_weights(model_dir: Path) -> list[Path]:
    """The *.safetensors files of a model directory, each with a readable header that covers the
    file. Other formats (.bin, .pt: pickles) are never loaded: CocoError naming the fix."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        others = sorted(p.name for g in _WEIGHT_GLOBS[1:] for p in Path(model_dir).glob(g))
        if others:
            raise CocoError(f"{model_dir} has no *.safetensors weights, only {others[0]}: vllm-coco loads "
                            "safetensors only (never pickles); convert with "
                            "save_pretrained(..., safe_serialization=True)")
        raise CocoError(f"{model_dir} has no weight files (*.safetensors); pass a complete model directory")
    index = Path(model_dir) / ne_format.INDEX_JSON
    if index.exists():  # a sharded checkpoint: bake and ne rewrite its index
        idx = read_json(index, "re-download or regenerate the model")
        if not isinstance(idx, dict) or not isinstance(idx.get("weight_map"), dict):
            raise CocoError(f"{index} has no weight_map; re-download or regenerate the model")
    headers = {}  # tensor name -> (shape, safetensors dtype)
    for f in files:
        try:
            with safe_open(str(f), framework="np") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)  # reads each tensor's header entry: a truncated file fails here
                    headers[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as exc:  # truncated, garbage, or not safetensors at all
            raise CocoError(f"{f} is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:80]}); "
                            "re-download or regenerate the model") from None
    check_config_shapes(model_dir, headers)
    return files


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _config_int(cfg: dict, key: str) -> int | None:
    v = cfg.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def check_config_shapes(model_dir: Path, headers: dict[str, tuple]) -> None:
    """config.json agrees with the weights' shapes (safetensors headers: name -> (shape, dtype)), so
    transformers never fills a layer the weights lack with random numbers, nor drops one they hold:
    num_hidden_layers against the decoder layers present, hidden_size, num_attention_heads,
    num_key_value_heads and head_dim against the embedding and q/k/v projections. Checks only what
    the config states and the (unquantized) weights show; CocoError naming config.json if not."""
    path = Path(model_dir) / "config.json"
    cfg = read_config(model_dir)
    layers = {int(m[1]) for name in headers if (m := _LAYER.match(name))}
    n = _config_int(cfg, "num_hidden_layers")
    extra = _config_int(cfg, "num_nextn_predict_layers") or 0  # GLM/DeepSeek store their MTP layers after the rest
    if n is not None and layers and max(layers) + 1 not in (n, n + extra):
        raise CocoError(f"{path}: num_hidden_layers is {n}, but the weights hold {max(layers) + 1} layers "
                        f"(model.layers.0 to model.layers.{max(layers)}); make config.json match the weights")
    hidden, heads = _config_int(cfg, "hidden_size"), _config_int(cfg, "num_attention_heads")
    if hidden is None or heads is None:
        return
    head_dim = _config_int(cfg, "head_dim") or hidden // heads
    kv = _config_int(cfg, "num_key_value_heads") or heads
    want = {"model.embed_tokens.weight": (_config_int(cfg, "vocab_size"), hidden)}
    for layer in sorted(layers):
        pre = f"model.layers.{layer}.self_attn"
        want.update({f"{pre}.q_proj.weight": (heads * head_dim, hidden),
                     f"{pre}.k_proj.weight": (kv * head_dim, hidden), f"{pre}.v_proj.weight": (kv * head_dim, hidden)})
    for name, shape in want.items():
        got, dtype = headers.get(name, (None, None))
        if got is None or dtype not in _FLOAT_DTYPES or len(got) != 2:
            continue
        if any(w is not None and w != g for w, g in zip(shape, got)):
            expected = ", ".join("*" if w is None else str(w) for w in shape)
            raise CocoError(f"{path}: vocab_size {cfg.get('vocab_size')}, hidden_size {hidden}, num_attention_heads "
                            f"{heads}, num_key_value_heads {kv} and head_dim {head_dim} make {name} [{expected}], but "
                            f"the weights hold [{', '.join(map(str, got))}]; make config.json match the weights")


def check_finite_weights(model_dir: Path) -> None:
    """Every floating weight of the model's safetensors files is finite, read one tensor at a time:
    a NaN or inf weight is the base model's problem, named as such before anything runs."""
    import torch
    from safetensors import safe_open

    for f in weight_files(model_dir):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                t = fh.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise CocoError(f"{f}: the base model's weight {name} holds {bad} non-finite value(s) (NaN or "
                                    "inf); the model is damaged: re-download or regenerate it")


def fingerprint(model_dir: Path) -> str:
    """sha256 over the weight files' names and bytes: identifies exactly these weights. Only the
    files that are loaded (*.safetensors) count: a stray *.bin or README beside them changes nothing."""
    h = hashlib.sha256()
    for f in weight_files(model_dir):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class NeuronLayout:
    """Global neuron numbering: layer-major, each layer packed [q | k | v] as vLLM's qkv_proj output.

    Flat id of (layer, proj, index) = layer * per_layer + offset(proj) + index.
    """

    num_layers: int
    q_size: int
    kv_size: int

    @property
    def per_layer(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def total(self) -> int:
        return self.num_layers * self.per_layer

    def proj_size(self, proj: str) -> int:
        return self.q_size if proj == "q" else self.kv_size

    def proj_offset(self, proj: str) -> int:
        return {"q": 0, "k": self.q_size, "v": self.q_size + self.kv_size}[proj]

    def flat(self, layer: int, proj: str, index: int) -> int:
        return layer * self.per_layer + self.proj_offset(proj) + index

    def address(self, flat: int) -> tuple[int, str, int]:
        layer, rest = divmod(int(flat), self.per_layer)
        if rest < self.q_size:
            return layer, "q", rest
        if rest < self.q_size + self.kv_size:
            return layer, "k", rest - self.q_size
        return layer, "v", rest - self.q_size - self.kv_size

    def arrays(self) -> dict[str, np.ndarray]:
        """Per-neuron `layer`, `proj` (0=q, 1=k, 2=v) and `index`, each [total]."""
        within = np.arange(self.per_layer)
        proj = np.where(within < self.q_size, 0, np.where(within < self.q_size + self.kv_size, 1, 2))
        index = within - np.array([0, self.q_size, self.q_size + self.kv_size])[proj]
        return {
            "layer": np.repeat(np.arange(self.num_layers), self.per_layer),
            "proj": np.tile(proj, self.num_layers),
            "index": np.tile(index, self.num_layers),
        }

    def to_json(self) -> dict:
        return {"num_layers": self.num_layers, "q_size": self.q_size, "kv_size": self.kv_size}

    @classmethod
    def from_config(cls, cfg: dict, path) -> NeuronLayout:
        """The layout config.json states: layers, heads and a head size (head_dim, or hidden_size /
        heads). CocoError naming the file when it does not state them as positive integers."""
        layers, heads = _config_int(cfg, "num_hidden_layers"), _config_int(cfg, "num_attention_heads")
        hidden = _config_int(cfg, "hidden_size")
        head_dim = _config_int(cfg, "head_dim") or (hidden // heads if hidden and heads else None)
        if layers is None or heads is None or not head_dim:
            raise CocoError(f"{path}: config.json needs positive integers num_hidden_layers, num_attention_heads and "
                            "hidden_size (or head_dim) to place q/k/v neurons; restore them from the model's source")
        kv = _config_int(cfg, "num_key_value_heads") or heads
        return cls(layers, heads * head_dim, kv * head_dim)


def attention_layers(model) -> list:
    """The `self_attn` modules of every decoder layer, in order; CocoError if there are none
    with separate q_proj / k_proj / v_proj."""
    found = []
    for name, module in model.named_modules():
        if name.endswith("self_attn") and all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj")):
            found.append(module)
    if not found:
        arch = ",".join(getattr(model.config, "architectures", None) or [type(model).__name__])
        raise CocoError(f"architecture {arch} has no self_attn.q_proj/k_proj/v_proj modules; "
                        "COCO needs separate q/k/v projections (Llama, Mistral and similar models)")
    return found


def auto_config(model_dir: Path):
    """transformers' config of a model directory, never running code shipped with it."""
    from transformers import AutoConfig

    cfg = read_config(model_dir)
    if "auto_map" in cfg:
        raise CocoError(f"{model_dir}/config.json asks for remote code (auto_map), which vllm-coco never runs; "
                        "use a model whose architecture transformers ships")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CocoError(f"{model_dir}/config.json is not a config transformers understands ({first}); "
                        "pass a Llama- or Mistral-style model directory") from None


def check_architecture(config) -> None:
    """Fail fast, before loading any weight, on an architecture without separate q/k/v projections."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CocoError(f"cannot build a causal LM from this config: {first}") from None
    attention_layers(skeleton)


def layout_of(model) -> NeuronLayout:
    layers = attention_layers(model)
    a = layers[0]
    return NeuronLayout(len(layers), a.q_proj.out_features, a.k_proj.out_features)


def check_device(name, what: str = "--device", here: bool = True) -> str:
    """A torch device name (CocoError naming `what` if not); with `here`, one this machine has."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise CocoError(f"{what} {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if here and dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise CocoError(f"{what} {name}: no such CUDA device on this machine; use cpu")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise CocoError(f"{what} {name!r} is not a device vllm-coco runs on; use cpu or cuda")
    return name


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise CocoError(f"unknown dtype {name}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_tokenizer(model_dir: Path):
    """The tokenizer of a model directory (a pad token set: the eos token when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CocoError(f"cannot load a tokenizer from {model_dir} ({type(exc).__name__}: {first}); "
                        "the model directory needs tokenizer files") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_base_model(model_dir: Path) -> None:
    """Refuse, before the model is loaded, what no identify or edit can take: an NE directory,
    missing or damaged weights, a config.json that disagrees with them, an architecture without
    separate q/k/v projections, a NaN or inf weight."""
    ne_format.refuse_ne(read_config(model_dir), model_dir)
    check_weights(model_dir)
    check_architecture(auto_config(model_dir))
    check_finite_weights(model_dir)


def load_model(model_dir: Path, dtype: str = "float32", device: str = "cpu", device_map: str | None = None):
    """Load a causal LM and its tokenizer from a local directory with plain transformers. device_map
    (names.DEVICE_MAPS, accelerate): spread the layers over every visible device (and the CPU) instead
    of putting the model on `device`, for a model larger than one device."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening
    check_base_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    placement = {} if device_map is None else {"device_map": device_map}
    with held_stderr():  # transformers' load report (7+ lines) is dropped when the load is refused
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch_dtype(dtype), trust_remote_code=False, use_safetensors=True,
                output_loading_info=True, ignore_mismatched_sizes=True, **placement)  # reported, then refused
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CocoError(f"cannot load {model_dir} as a causal LM: {first}") from None
        _check_loaded(model_dir, info)
    try:
        if device_map is None:  # with a device map accelerate has placed (and hooked) every layer
            model.to(torch.device(device))
    except (RuntimeError, AssertionError) as exc:
        raise CocoError(f"device {device} is not usable here ({exc}); pass --device cpu") from None
    model.eval()
    return model, tokenizer


def _check_loaded(model_dir: Path, info: dict) -> None:
    """Every weight the architecture expects came from the checkpoint at its shape: transformers would
    otherwise initialise the rest at random and only log it."""
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        key, stored, expected = mismatched[0]
        raise CocoError(f"{model_dir}: weight {key} has shape {tuple(stored)} but config.json implies "
                        f"{tuple(expected)}; the weights do not belong to this config.json")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise CocoError(f"{model_dir}: the weights lack {missing[0]} ({len(missing)} missing) that config.json's "
                        "architecture needs; the checkpoint is incomplete or belongs to another model")


def probe_base(model_dir: Path):
    """(model, dtype) of `probe_model`, its weights checked finite first, loaded once per process for
    the same weights (files' names, sizes and mtimes): the pipeline's sweep bakes and exports many
    candidates of one base, and each must pass the probe without loading it again."""
    files = weight_files(model_dir)
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _probe_base(str(Path(model_dir).resolve()), stamp)


@functools.lru_cache(maxsize=1)
def _probe_base(path: str, stamp: tuple):
    check_finite_weights(Path(path))
    return probe_model(Path(path))


def probe_model(model_dir: Path):
    """(model, dtype): the base model for edit.probe.finite_forward, on the CPU, in the dtype its
    weights are stored in (float32; float16 when any weight is float16, whose range is what an edit
    must fit; else bfloat16)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    stored = set()
    for f in weight_files(model_dir):
        with safe_open(str(f), framework="np") as fh:
            stored |= {fh.get_slice(k).get_dtype() for k in fh.keys()}
    floats = stored & set(_FLOAT_DTYPES)
    dtype = torch.float32 if floats <= {"F32", "F64"} else torch.float16 if "F16" in floats else torch.bfloat16
    hf_logging.disable_progress_bar()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the exit-2 contract: our one line, not transformers' load report
    try:
        with held_stderr():  # transformers' load report is dropped when the load fails: one line stays
            try:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False,
                                                             use_safetensors=True)
            except (ValueError, OSError, KeyError, RuntimeError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if "ignore_mismatched_sizes" in first:  # its report, which names the weight, is not shown
                    first = "a weight's shape differs from the one its config.json makes"
                raise CocoError(f"cannot load {model_dir} as a causal LM: {first}") from None
    finally:
        hf_logging.set_verbosity(level)
    return model.eval(), dtype
