"""Starting a vLLM engine that takes per-request NE-COCO settings: the offline `LLM(...)` arguments
and the `coco-tools serve` command line. Import-light (the classes themselves live in
serve/per_request.py and are named here by their dotted paths, which vLLM imports in its workers).
"""

from __future__ import annotations

# Lazy imports: vLLM, numpy are imported inside the functions that use them (directly or through the
# modules they import), so importing this module stays light.
import os
import sys
from pathlib import Path

from vllm_coco.core.errors import CocoError
from vllm_coco.core.names import PER_REQUEST_ENV
from vllm_coco.serve import request_settings

_CLASSES = "vllm_coco.serve.per_request"
WORKER_CLS = f"{_CLASSES}.CocoWorker"
# Reads settings as the client sent them, before the OpenAI schema coerces them (serve/strict_settings.py).
MIDDLEWARE = "vllm_coco.serve.strict_settings.StrictSettings"
# Engine flags that per-request settings cannot work with (the hooked model runner does not see them).
REFUSED_FLAGS = ("--speculative-config", "--worker-cls", "--scheduler-cls")


def _platform_env() -> dict[str, str]:
    from vllm.platforms import current_platform

    # Only vLLM's V1 model runner is hooked (CPU always runs it); on GPUs it must be asked for.
    return {} if current_platform.is_cpu() else {"VLLM_USE_V2_MODEL_RUNNER": "0"}


def scheduler_cls() -> str:
    """The scheduler class matching vLLM's default for this platform (async scheduling on GPUs)."""
    from vllm.platforms import current_platform

    return f"{_CLASSES}.{'CocoScheduler' if current_platform.is_cpu() else 'CocoAsyncScheduler'}"


def _check(ne_dir) -> str:
    from vllm_coco.core.ne_format import NEDirectory

    path = os.path.abspath(ne_dir)
    ne = NEDirectory.read(path)  # CocoError unless it is an NE directory whose tensors read back whole
    ne.gates()
    ne.named_edits()
    request_settings.menu_of(path)
    return path


def engine_kwargs(ne_dir) -> dict:
    """`LLM(**engine_kwargs(DIR), ...)`: an offline engine whose requests pick their own edit
    (`SamplingParams(extra_args={"coco_alpha": 0.5})`). Sets the environment the validator and the
    workers read (in this process; vLLM's processes inherit it)."""
    path = _check(ne_dir)
    os.environ[PER_REQUEST_ENV] = path
    for k, v in _platform_env().items():
        os.environ.setdefault(k, v)
    return {"model": str(ne_dir), "worker_cls": WORKER_CLS, "scheduler_cls": scheduler_cls()}


def serve_command(ne_dir, extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) of `vllm serve NE_DIR` with per-request settings."""
    for flag in REFUSED_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise CocoError(f"coco-tools serve sets its own worker and scheduler and cannot serve with {flag}; "
                            "drop it (or run plain `vllm serve`, which serves the directory's own setting)")
    path = _check(ne_dir)
    vllm = Path(sys.executable).with_name("vllm")
    if not vllm.exists():
        raise CocoError(f"no vllm executable beside {sys.executable}; install vLLM into this environment")
    argv = [str(vllm), "serve", str(ne_dir), "--worker-cls", WORKER_CLS, "--scheduler-cls", scheduler_cls(),
            "--middleware", MIDDLEWARE, *extra]
    return argv, {PER_REQUEST_ENV: path, **_platform_env()}
