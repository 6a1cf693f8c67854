"""Per-request NE-COCO settings in a vLLM engine: which request gets which edit, token by token.

Three pieces, each at an official vLLM injection point (nothing of vLLM is patched):

* `CocoWorker` (`--worker-cls`) gives its model runner `_CocoRunner`, which after vLLM has laid
  out a step (`_prepare_inputs`: requests in batch order, contiguous token runs) writes every
  token's setting into the model's `CocoStep` buffers in place. The model reads them as tensors,
  so compiled graphs and CUDA graphs need no Python inside them (the pattern of vLLM's per-token
  LoRA index mapping).
* `CocoScheduler` (`--scheduler-cls`) salts the prefix-cache hashes of every request whose setting
  is not the directory's default with a namespaced key ("coco:" + hash), before the scheduler
  looks them up: the KV of a prompt depends on the setting (v channels are gated), so requests
  with different settings never share blocks, while equal settings still do.
* `serve/validator.py` refuses a bad setting at admission (HTTP 400 on the server).

serve/launch.py starts engines with these classes (offline `LLM(...)`, `coco-tools serve DIR`).
Settings are parsed and named in serve/request_settings.py.
"""

from __future__ import annotations

# Lazy imports: the worker class of the platform in use (vLLM's cpu_worker or gpu_worker) loads inside
# the function that picks it; the other platform's module is never imported.
from functools import cache

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_coco.core.names import SALT_PREFIX
from vllm_coco.serve.request_settings import Setting
from vllm_coco.serve.request_settings import menu_of as _menu

logger = init_logger(__name__)


# --------------------------------------------------------------------------- prefix-cache salt
class _Salted:
    """Scheduler mixin: every request runs under the salt its setting and its client's salt give
    (request_settings.Menu.salt), its block hashes recomputed before the scheduler uses them.

    Admission (serve/validator.py) refuses every setting `Menu.parse` refuses, so a failure here is
    a bug or an engine used without the validator: that request alone finishes with an error (at
    the scheduler's next update, vLLM's own path for requests it cannot serve), and it runs
    meanwhile under a salt of its own, so it shares no KV with anything."""

    def add_request(self, request) -> None:
        if request.request_id not in self.requests:
            salt = self._coco_salt(request)
            if salt != request.cache_salt:
                request.cache_salt = salt
                request.block_hashes.clear()
                request.update_block_hashes()
        super().add_request(request)

    def _coco_salt(self, request) -> str | None:
        menu = _menu(self.vllm_config.model_config.model)
        try:
            setting = menu.parse(request.sampling_params.extra_args if request.sampling_params else None)
        except Exception as exc:  # noqa: BLE001 (whatever it is, it must not stop the engine)
            logger.error("NE-COCO: request %s has an unusable setting (%s); failing it", request.request_id, exc)
            self.grammar_compile_error_reqs.add(request.request_id)  # vLLM finishes these with FINISHED_ERROR
            return f"{SALT_PREFIX}invalid:{request.request_id}"
        return menu.salt(setting, request.cache_salt)


class CocoScheduler(_Salted, Scheduler):
    pass


class CocoAsyncScheduler(_Salted, AsyncScheduler):
    pass


# --------------------------------------------------------------------------- per-token buffers
class _CocoRunner:
    """Model-runner mixin (V1 runner: CPU, and GPU with VLLM_USE_V2_MODEL_RUNNER=0): after vLLM
    lays out a step, write each token's setting into the model's CocoStep."""

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self._coco_fill(scheduler_output, num_scheduled_tokens)
        return out

    def _coco_fill(self, scheduler_output, num_scheduled_tokens: np.ndarray) -> None:
        state = self.__dict__.setdefault("_coco", {"settings": {}, "dirty": False})
        step = getattr(self.get_model(), "coco_step", None)
        if step is None:
            raise RuntimeError("CocoWorker serves NE-COCO directories only; serve a plain model with `vllm serve`")
        menu = _menu(self.model_config.model)
        settings: dict[str, Setting] = state["settings"]
        for req_id in scheduler_output.finished_req_ids:
            settings.pop(req_id, None)
        req_ids = self.input_batch.req_ids[: len(num_scheduled_tokens)]  # [reqs], the step's order
        rows = []
        for r in req_ids:
            if r not in settings:
                settings[r] = _parse_or_default(menu, self.requests[r].sampling_params.extra_args)
            rows.append(settings[r])
        if all(s == menu.default for s in rows):
            if state["dirty"]:  # a default-only step after a mixed one: restore the defaults once
                step.reset()
                state["dirty"] = False
            return
        cols = np.array([menu.columns(s) for s in rows], dtype=np.float64)  # [reqs, 5]
        per_token = np.repeat(cols, num_scheduled_tokens, axis=0)  # [tokens, 5]
        on = np.zeros((len(per_token), len(menu.edits)), dtype=np.float32)  # [tokens, K]
        named = per_token[:, 3] >= 0
        # a named edit multiplies its deviation from identity by `on`: the request's coco_scale (1 by default)
        on[named, per_token[named, 3].astype(np.int64)] = per_token[named, 4]
        f32 = per_token[:, :3].astype(np.float32)
        step.fill(*(torch.from_numpy(f32[:, i:i + 1].copy()) for i in range(3)), torch.from_numpy(on))
        state["dirty"] = True


def _parse_or_default(menu, extra_args) -> Setting:
    """A request's setting; the default for one the scheduler is failing (see _Salted), so a step
    that still carries it computes, and its output is discarded with the request."""
    try:
        return menu.parse(extra_args)
    except Exception:  # noqa: BLE001 (the scheduler logs and fails that request)
        return menu.default


@cache
def _runner_class(base: type) -> type:
    return type(f"Coco{base.__name__}", (_CocoRunner, base), {})


def _worker_base() -> type:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


class CocoWorker(_worker_base()):
    """The platform's worker whose model runner fills the per-token settings (`--worker-cls`)."""

    def init_device(self):
        super().init_device()
        runner = self.model_runner
        if not isinstance(runner, GPUModelRunner):
            raise RuntimeError(f"per-request NE-COCO settings need vLLM's V1 model runner, and this engine built "
                               f"{type(runner).__name__}: set VLLM_USE_V2_MODEL_RUNNER=0")
        if not isinstance(runner, _CocoRunner):
            # The platform worker builds its runner inline; this instance becomes the same class plus the mixin
            # (which holds no state of its own until its first step).
            runner.__class__ = _runner_class(type(runner))
