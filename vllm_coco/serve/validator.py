"""Admission check of per-request NE-COCO settings, loaded by every vLLM engine in the environment
through the entry point `vllm.logits_processors` (so import-light: no torch work, no vLLM worker
modules). It never changes logits: `validate_params` refuses a bad setting at admission with one
line (HTTP 400 on the server, an error before queueing offline), and an engine not started by
`coco-tools serve` refuses any coco_* key instead of silently serving the directory's default.
"""

from __future__ import annotations

import os

from vllm.sampling_params import SamplingParams
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _V2LogitsProcessor

from vllm_coco.core.names import PER_REQUEST_ENV, XARGS
from vllm_coco.serve.request_settings import looks_coco, menu_of


class CocoRequestValidator(_V2LogitsProcessor):
    """Validates coco_* keys at admission and never changes logits. It subclasses the V2 interface
    (whose plugin loader checks the class) and has the V1 methods too (whose loader does not)."""

    def __init__(self, *args, **kwargs):  # V1: (vllm_config, device, pin_memory); V2: (vllm_config, req_states)
        pass

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        args = sampling_params.extra_args or {}
        if not any(looks_coco(k) for k in args):  # any spelling: refused, never silently ignored
            return
        ne_dir = os.environ.get(PER_REQUEST_ENV)
        if not ne_dir:
            raise ValueError(f"per-request NE-COCO settings ({', '.join(XARGS)}) need an engine started by "
                             "`coco-tools serve DIR` (or vllm_coco.serve.per_request.engine_kwargs); this one "
                             "serves the directory's own setting: drop the coco_* fields")
        menu_of(ne_dir).parse(args)

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:  # V1
        pass

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:  # V2
        return False

    def apply(self, logits, ctx=None):
        return logits
