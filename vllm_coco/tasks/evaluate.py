"""`coco-tools eval`: the vllm-coco lm-eval tasks (evals/) on one model, through lm-eval's Python API.

Backends: `hf` (transformers through `prefix_lm.CocoHFLM`, lm-eval's hf model with shared-prefix
scoring; NE-COCO directories get their gate in the forward), `hf-stock` (lm-eval's own hf model,
the reference `hf` is tested against), `vllm` (lm-eval's in-process vLLM; the vllm-coco plugin
registers the NE-COCO architectures by entry point) and a URL of a running `vllm serve`
(`local-completions`). All run float32 (`hf` also bfloat16 where the hardware has it) and, unless
told otherwise (`chat=False`), with the model's chat template, so their numbers agree. `scoring`
chooses how the BBQ loglikelihood tasks pick an option (summed log-likelihood, lm-eval's rule, or
per byte of the option text; vllm_coco.core.pick).

Output: OUT/results.json (lm-eval's results dict plus a `coco` block naming the model, backend
and options), and with --log-samples OUT/samples_<task>.jsonl; written atomically.
"""

from __future__ import annotations

# Lazy imports: torch, transformers, lm-eval, numpy are imported inside the functions that use them
# (directly or through the modules they import), so importing this module stays light.
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vllm_coco.core import ne_format
from vllm_coco.core.atomic import atomic_output_dir, check_output_dir
from vllm_coco.core.engine import shutdown
from vllm_coco.core.errors import CocoError
from vllm_coco.core.json_file import read_config, read_json

RESULTS_FILE = "results.json"
# passed to the BBQ tasks as metadata `coco_split` / `coco_scoring`
from vllm_coco.core.names import (  # noqa: E402,F401 (re-exported)
    BATCH_SIZE,
    EVAL_BACKENDS,
    EVAL_SPLITS,
    EXECUTOR_BACKENDS,
    MAX_MODEL_LEN,
    PARALLEL_OPTIONS,
    SCORING,
    SCORINGS,
)

# --------------------------------------------------------------------------- the task folder
# evals_dir(): $COCO_EVALS_DIR, else the folder shipped with the package (vllm_coco/tasks/task_folder.py)
from vllm_coco.tasks.task_folder import EVALS_ENV, evals_dir, local_tasks  # noqa: E402,F401 (re-exported)


def _needs_builtin(names, ours: dict[str, list[str]]) -> bool:
    """Whether any requested name (or a child of a requested group) is one of lm-eval's own tasks."""
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in ours:
            return True
        todo.extend(ours[name])
    return False


class _DropNoise(logging.Filter):
    """lm-eval warns about `--metadata` once per custom-dataset task; it is noise here."""

    def filter(self, record):
        return "Custom kwargs can be passed" not in record.getMessage()


def task_manager(names, evals: Path | None = None, metadata: dict | None = None):
    """An lm-eval TaskManager over evals/ (plus the built-in tasks only when `names` needs them:
    indexing those costs ~10 s). Raises CocoError naming unknown tasks."""
    from lm_eval.tasks import TaskManager

    evals = evals or evals_dir()
    ours = local_tasks(evals)
    builtin = _needs_builtin(names, ours)
    tm = TaskManager(include_path=str(evals), include_defaults=builtin, metadata=metadata or None)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        valid = ", ".join(n for n in sorted(ours) if not n.startswith("_"))
        raise CocoError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                        f"vllm-coco tasks: {valid} (or any lm-eval task name)")
    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _DropNoise) for f in task_logger.filters):
        task_logger.addFilter(_DropNoise())
    return tm


def preload(tm, names) -> None:
    """Build the tasks and their data now, before any model loads, so a data problem fails in
    seconds rather than after a vLLM engine start; `simple_evaluate` then gets these same tasks
    (its `task_manager.load(names)` call is answered from here)."""
    names = list(names)
    try:
        loaded = tm.load(names)
    except CocoError:
        raise
    except Exception as exc:
        if not _needs_builtin(names, local_tasks(evals_dir())):
            raise  # our own tasks: a bug, keep the traceback
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CocoError(f"cannot load the data of {', '.join(names)} ({type(exc).__name__}: {first}); "
                        "lm-eval's own tasks (e.g. coco_retention_online) download from the Hugging Face hub: "
                        "run online, or use the offline coco_retention") from None
    load = tm.load
    tm.load = lambda task_list: loaded if list(task_list) == names else load(task_list)


# --------------------------------------------------------------------------- options

@dataclass
class EvalOptions:
    tasks: tuple[str, ...] = ("stereo_coco",)
    backend: str = "hf"  # hf | hf-stock | vllm | http(s)://host:port of `vllm serve`
    dtype: str = "float32"  # hf: float32 or bfloat16 (only where the hardware runs it natively)
    limit: int | None = None  # documents per task (lm-eval's --limit)
    max_items: int | None = None  # overrides the tasks' `max_items` metadata
    batch_size: int | None = None
    device: str | None = None
    max_model_len: int = MAX_MODEL_LEN
    served_model_name: str | None = None
    chat: bool = True
    scoring: str = SCORING  # BBQ loglikelihood tasks: "sum" or "per-byte" (vllm_coco.core.pick)
    log_samples: bool = False
    split: str = "test"  # BBQ split the stereo_coco* tasks read: test (held out) or validate (for sweeps)
    metadata: dict | None = None  # extra task metadata (e.g. {"categories": [...]} for the jailbreak tasks)
    # --backend vllm: names.PARALLEL_OPTIONS (sizes, 1 = none) and the executor (None: vLLM's choice)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    enforce_eager: bool = False  # --backend vllm: no torch.compile (vLLM's enforce_eager)

    def parallel(self) -> dict:
        """The vLLM engine's parallelism arguments this evaluation sets (the ones not at their default)."""
        out = {k: getattr(self, k) for k in PARALLEL_OPTIONS if getattr(self, k) != 1}
        if self.distributed_executor_backend is not None:
            out["distributed_executor_backend"] = self.distributed_executor_backend
        return out


def _is_url(backend: str) -> bool:
    return backend.startswith(("http://", "https://"))


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    cfg = model_dir / "tokenizer_config.json"
    if not cfg.is_file():
        return False
    tok_cfg = read_json(cfg, "fix or regenerate the model's tokenizer files")
    return isinstance(tok_cfg, dict) and bool(tok_cfg.get("chat_template"))


def _is_ne_dir(model_dir: Path) -> bool:
    return ne_format.is_ne(read_config(model_dir))


def _api_base(url: str) -> str:
    """http://host:port[/v1[/completions]] -> http://host:port/v1"""
    base = url.rstrip("/")
    for suffix in ("/completions", "/v1"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base + "/v1"


def served_model(url: str) -> str:
    """The first model id a server lists at /v1/models (CocoError when it cannot be reached)."""
    try:
        with urllib.request.urlopen(_api_base(url) + "/models", timeout=10) as resp:
            data = json.loads(resp.read().decode("utf-8"))
        return data["data"][0]["id"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
        raise CocoError(f"cannot list the models at {_api_base(url)}/models ({type(exc).__name__}); start "
                        "`vllm serve MODEL_DIR` there or pass --served-model-name") from None


def check_options(model: str, opts: EvalOptions, out: str | None, force: bool):
    """Validate everything before any model loads; returns (model_dir, out_path)."""
    from vllm_coco.core.models import resolve_model_dir

    if opts.limit is not None and opts.limit < 1:
        raise CocoError(f"--limit {opts.limit} must be a positive number of documents per task")
    if opts.max_items is not None and opts.max_items < 1:
        raise CocoError(f"--max-items {opts.max_items} must be a positive number of items")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise CocoError(f"--batch-size {opts.batch_size} must be positive")
    if opts.split not in EVAL_SPLITS:
        raise CocoError(f"split {opts.split} is not one of {', '.join(EVAL_SPLITS)} (the identify split is never "
                        "evaluated)")
    if opts.scoring not in SCORINGS:
        raise CocoError(f"scoring {opts.scoring} is not one of {', '.join(SCORINGS)}")
    if opts.backend not in EVAL_BACKENDS and not _is_url(opts.backend):
        raise CocoError(f"--backend {opts.backend} is not {', '.join(EVAL_BACKENDS)} or an http(s):// URL of "
                        "`vllm serve`")
    for key in PARALLEL_OPTIONS:
        if not isinstance(getattr(opts, key), int) or getattr(opts, key) < 1:
            raise CocoError(f"--{key.replace('_', '-')} {getattr(opts, key)!r} must be an integer >= 1")
    if opts.distributed_executor_backend not in (None, *EXECUTOR_BACKENDS):
        raise CocoError(f"--distributed-executor-backend {opts.distributed_executor_backend} is not one of "
                        f"{', '.join(EXECUTOR_BACKENDS)}")
    if opts.parallel() and opts.backend != "vllm":
        flag = "--" + next(iter(opts.parallel())).replace("_", "-")
        raise CocoError(f"{flag} applies to --backend vllm only (the hf backends run on one device: --device; a "
                        "server URL has its own parallelism: set it on `vllm serve`)")
    if opts.enforce_eager and opts.backend != "vllm":
        raise CocoError("--enforce-eager applies to --backend vllm only (a server URL compiles or not as `vllm serve` "
                        "was started; the hf backends never compile)")
    if opts.dtype != "float32" and opts.backend != "hf":
        raise CocoError(f"--dtype {opts.dtype} applies to --backend hf only; the others evaluate float32")
    if not opts.tasks:
        raise CocoError("--tasks is empty; name at least one task, e.g. --tasks stereo_coco")
    if opts.backend.startswith("hf"):
        from vllm_coco.core.models import check_device
        from vllm_coco.tasks.prefix_lm import check_dtype

        if opts.device is not None:
            check_device(opts.device)
        check_dtype(opts.dtype, opts.device or _default_device())
    model_dir = resolve_model_dir(model)
    out_path = Path(out) if out is not None else Path("runs") / f"eval-{model_dir.name}"
    check_output_dir(out_path, force, sources=(model_dir,))  # a missing parent (e.g. runs/) is made at the end
    return model_dir, out_path


def check_model_dir(model_dir: Path) -> None:
    """What every backend would trip over, found before lm-eval starts: config, weights (safetensors
    only), remote code, and for an NE-COCO directory its gate section."""
    from vllm_coco.core.models import auto_config, check_weights

    check_weights(model_dir)
    if _is_ne_dir(model_dir):
        ne_format.NEDirectory.read(model_dir)
    else:
        auto_config(model_dir)


# --------------------------------------------------------------------------- running

def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_lm(model_dir: Path, opts: EvalOptions):
    """The `hf` backend's model: a `prefix_lm.CocoHFLM` (reusable across evaluations and conditions)."""
    from vllm_coco.tasks.prefix_lm import CocoHFLM

    return CocoHFLM(str(model_dir), dtype=opts.dtype, device=opts.device or _default_device(),
                    batch_size=opts.batch_size or BATCH_SIZE)


def _lm_for(model_dir: Path, opts: EvalOptions):
    """(model, model_args, batch_size, device) for lm_eval.simple_evaluate."""
    if opts.backend == "hf":
        bs = opts.batch_size or BATCH_SIZE
        return load_lm(model_dir, opts), None, bs, opts.device or _default_device()
    if opts.backend == "hf-stock":
        device = opts.device or _default_device()
        bs = opts.batch_size or BATCH_SIZE
        if _is_ne_dir(model_dir):
            # AutoModel refuses NE directories on purpose; the reference loader applies the gate.
            import torch
            from lm_eval.models.huggingface import HFLM

            from vllm_coco.serve.hf_reference import load_ne_model

            model, tok = load_ne_model(model_dir, dtype=torch.float32, device=device)
            # lm-eval warns that an in-memory `pretrained` model ignores other model arguments: we pass none
            hf_log = logging.getLogger("lm_eval.models.huggingface")
            level = hf_log.level
            hf_log.setLevel(logging.ERROR)
            try:
                lm = HFLM(pretrained=model, tokenizer=tok, batch_size=bs, device=device)
            finally:
                hf_log.setLevel(level)
            return lm, None, bs, device
        args = {"pretrained": str(model_dir), "dtype": "float32", "trust_remote_code": False}
        return "hf", args, bs, device
    if opts.backend == "vllm":
        # CPU builds of vLLM reserve a KV cache that does not fit the NUMA node they see; GPU builds ignore it.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        args = {"pretrained": str(model_dir), "dtype": "float32", "max_model_len": opts.max_model_len,
                **opts.parallel()}  # lm-eval's vllm model passes these to vllm.LLM (data parallel: Ray replicas)
        if opts.enforce_eager:
            args["enforce_eager"] = True
        return "vllm", args, opts.batch_size or "auto", None
    name = opts.served_model_name or served_model(opts.backend)
    args = {"base_url": _api_base(opts.backend) + "/completions", "model": name, "tokenizer": str(model_dir),
            "tokenizer_backend": "huggingface", "tokenized_requests": False,
            "num_concurrent": opts.batch_size or 4, "max_retries": 3, "max_length": opts.max_model_len}
    return "local-completions", args, 1, None


def run_eval(model: str, opts: EvalOptions, out: str | None = None, force: bool = False,
             lm=None, condition: str | None = None) -> tuple[dict, Path]:
    """Evaluate MODEL on opts.tasks and write OUT/results.json atomically; returns (results, out).

    `lm`: an already loaded `CocoHFLM` of MODEL (backend hf) to evaluate with instead of loading one;
    `condition`: the edit condition registered on it to evaluate (recorded in the `coco` block)."""
    model_dir, out_path = check_options(model, opts, out, force)
    metadata = dict(opts.metadata or {})
    if opts.max_items:
        metadata["max_items"] = opts.max_items
    if opts.split != "test":  # the tasks' default is test; only say otherwise when asked
        metadata["coco_split"] = opts.split
    if opts.scoring != SCORING:
        metadata["coco_scoring"] = opts.scoring
    tm = task_manager(list(opts.tasks), metadata=metadata or None)
    preload(tm, opts.tasks)
    if _is_url(opts.backend) and not opts.served_model_name:
        opts.served_model_name = served_model(opts.backend)  # fail before loading anything else
    chat = opts.chat and _has_chat_template(model_dir)
    if not _is_url(opts.backend):  # a server's model directory only lends its tokenizer
        check_model_dir(model_dir)

    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    owned = lm is None
    if lm is not None:
        model_args, bs, device = None, opts.batch_size or BATCH_SIZE, str(lm.device)
        lm.use(condition or "base")
    else:
        lm, model_args, bs, device = _lm_for(model_dir, opts)
    if isinstance(lm, str) and lm == "vllm":
        # built here, not by simple_evaluate, so its engine is stopped before exit (core/engine.py)
        from lm_eval.api.registry import get_model

        lm = get_model("vllm").create_from_arg_obj(model_args, {"batch_size": bs})
    try:
        results = simple_evaluate(model=lm, model_args=None if not isinstance(lm, str) else model_args,
                                  tasks=list(opts.tasks), limit=opts.limit, batch_size=bs, device=device,
                                  apply_chat_template=chat, task_manager=tm, log_samples=opts.log_samples,
                                  bootstrap_iters=1000)
    finally:
        if owned and opts.backend == "vllm":
            shutdown(getattr(lm, "model", None))  # before exit, not in the interpreter's teardown
    if opts.backend == "vllm":  # as lm-eval records a model it builds from a name
        results.get("config", {}).update(model="vllm", model_args=model_args)
    samples = results.pop("samples", None) or {}
    results["coco"] = {"model": str(model_dir), "name": model_dir.name, "backend": opts.backend,
                       "ne_coco": _is_ne_dir(model_dir), "tasks": list(opts.tasks), "limit": opts.limit,
                       "max_items": opts.max_items, "split": opts.split, "chat_template": chat, "scoring": opts.scoring,
                       "dtype": opts.dtype, "condition": condition,
                       "evals_dir": str(evals_dir())}

    with atomic_output_dir(out_path, force) as tmp:
        (tmp / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=handle_non_serializable,
                                                   ensure_ascii=False), encoding="utf-8")
        for task, rows in samples.items():
            with open(tmp / f"samples_{task}.jsonl", "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return results, out_path


def summary(results: dict) -> str:
    """lm-eval's result tables (tasks, then groups)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text
