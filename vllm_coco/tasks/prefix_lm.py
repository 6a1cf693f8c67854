"""`coco-hf`: lm-eval's hf model with shared-prefix loglikelihood and in-memory edit conditions.

lm-eval's hf backend runs every (context, continuation) request as a full forward, although the
options of a multiple-choice document share its prompt and the three option orders of a BBQ item
share its context and question (and, under a chat template, every document shares the system
turn). `CocoHFLM` subclasses lm-eval's `HFLM` and replaces only `_loglikelihood_tokens`:

1. the model inputs of all requests, `(context + continuation)[:-1]` exactly as HFLM truncates
   them, go into a radix tree (`prefix_tree`): each node is a run of tokens shared by every
   request below it;
2. nodes are run depth first in batches: a node's tokens are one forward on top of its parent's
   KV cache, which is kept only until the node's children have run;
3. a subtree of at most `ROW_TOKENS` tokens (typically one BBQ item: its context and question,
   its three orders, their options) runs as one packed row instead: its nodes laid out depth
   first, each token attending to its parent's KV and to its own ancestors inside the row (a tree
   attention mask), so the many few-token leaves cost no forwards and no KV copies of their own;
4. the log-probabilities are read at the continuation positions only (the LM head runs there).

Tokenization, chat templates, truncation, request caching and the tasks (evals/) are HFLM's and
lm-eval's, so `lm_eval --model hf` stays the reference this class is tested against
(tests/test_prefix_lm.py).

Edit conditions: the loaded model carries `edit.conditions` (ablations, LE and NE applied to the
q/k/v outputs in memory). `lm.use(name)` switches the condition of the next evaluations;
`lm.prefetch([names])` makes the next loglikelihood call score every listed condition in the same
batches (mixed rows) and memoize them, so later evaluations of those conditions on the same
requests are answered without a forward.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from vllm_coco.core import ne_format
from vllm_coco.core.errors import CocoError
from vllm_coco.core.json_file import read_config
from vllm_coco.edit import conditions as cond
from vllm_coco.serve.hf_reference import load_ne_model
from vllm_coco.tasks.packed_forward import layer_kinds, packed_forward
from vllm_coco.tasks.prefix_schedule import Schedule

MODEL_NAME = "coco-hf"  # the lm-eval registry name
ROW_TOKENS = 512  # a subtree with at most this many tokens runs as one packed row (tree attention)
HEAD_ROWS = 512  # positions per LM-head call


def bf16_supported(device: str) -> bool:
    """Whether `device` runs bfloat16 matmuls natively (CUDA with bf16, or a CPU with AVX-512 BF16 / AMX)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype for `--dtype` on `device`; CocoError for bfloat16 where it would be emulated."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise CocoError(f"dtype {dtype} is not one of {', '.join(table)} for the coco-hf evaluation")
    if dtype == "bfloat16" and not bf16_supported(device):
        raise CocoError(f"bfloat16 needs native support on {device} (a CPU with AVX-512 BF16 or AMX, or a CUDA GPU "
                        "with bf16), and this one has none; use --dtype float32")
    return table[dtype]


@register_model(MODEL_NAME)
class CocoHFLM(HFLM):
    """lm-eval's HFLM with shared-prefix loglikelihood scoring and switchable in-memory edits.

    `pretrained`: a model directory (an NE-COCO directory loads its base weights and makes its gate
    the "ne" condition, used by default) or an already loaded transformers model. Everything else
    is HFLM's (`batch_size` is the number of rows per forward).
    """

    def __init__(self, pretrained, dtype: str | torch.dtype = "float32", device: str = "cpu",
                 batch_size: int | str = 16, tokenizer=None, **kwargs):
        torch_dtype = dtype if isinstance(dtype, torch.dtype) else check_dtype(str(dtype), str(device))
        self._ne_dir = None
        if isinstance(pretrained, (str, Path)):
            if ne_format.is_ne(read_config(Path(pretrained))):
                self._ne_dir = Path(pretrained)
                pretrained, tokenizer = load_ne_model(pretrained, dtype=torch_dtype, device=str(device))
        quiet = logging.getLogger("lm_eval.models.huggingface")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # it warns that an in-memory model ignores model arguments: we pass none
        try:
            if isinstance(pretrained, (str, Path)):
                super().__init__(pretrained=str(pretrained), dtype=torch_dtype, device=str(device),
                                 batch_size=batch_size, trust_remote_code=False, **kwargs)
            else:
                super().__init__(pretrained=pretrained, tokenizer=tokenizer, device=str(device),
                                 batch_size=batch_size, **kwargs)
        finally:
            quiet.setLevel(level)
        if self.backend != "causal":
            raise CocoError(f"{MODEL_NAME} scores causal language models only")
        layer_kinds(self.model.config)  # refuse attention kinds the tree mask cannot express, before any work
        self.conditions = cond.install(self.model)
        self._prefetch: list[int] = []
        self._memo: dict[tuple[int, tuple, tuple], tuple[float, bool]] = {}
        self.stats = {"forwards": 0, "tokens": 0, "padded_tokens": 0}  # what score() ran, for benchmarks
        self.rows_per_forward = int(batch_size) if str(batch_size).isdigit() else 16
        self.row_tokens = ROW_TOKENS  # 0: every node its own row (no packing)

    # --------------------------------------------------------------- conditions
    def add_condition(self, name: str, edit: cond.Edit) -> None:
        """Register an edit (see `edit.conditions`) under `name`."""
        self.conditions.add(name, edit)
        self._memo = {k: v for k, v in self._memo.items() if k[0] != self.conditions.index(name)}

    def use(self, name: str) -> None:
        """Evaluate the following requests under condition `name` ("base" is the unedited model)."""
        self.conditions.use(name)

    def prefetch(self, names) -> None:
        """Score these conditions too, in the same batches, at the next loglikelihood call."""
        self._prefetch = [self.conditions.index(n) for n in names]

    # --------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """requests: [((context, continuation), context_enc, continuation_enc)] -> [(logprob, is_greedy)]."""
        current = self.conditions.default
        keys = []
        for _, ctx, cont in requests:
            assert len(ctx) > 0 and 0 < len(cont) <= self.max_length
            keys.append((tuple((ctx + cont)[-(self.max_length + 1):][:-1]), tuple(cont)))
        todo = [current] + [c for c in self._prefetch if c != current]
        self._prefetch = []
        missing = {c: sorted({i for i, k in enumerate(keys) if (c, *k) not in self._memo}) for c in todo}
        work = [(c, i) for c, idx in missing.items() for i in idx]
        if work:
            scored = self.score(keys, work, disable_tqdm=disable_tqdm or self.rank != 0)
            for (c, i), answer in zip(work, scored):
                self._memo[(c, *keys[i])] = answer
        res = []
        for (request_str, _, _), key in zip(requests, keys):
            answer = self._memo[(current, *key)]
            res.append(answer)
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return res

    @torch.no_grad()
    def score(self, keys: list[tuple[tuple, tuple]], work: list[tuple[int, int]],
              disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """keys: [(model input tokens, continuation tokens)]; work: [(condition id, key index)].
        Returns (sum of continuation log-probs, all tokens greedy) per work item (the schedule:
        tasks/prefix_schedule.py; one forward: tasks/packed_forward.py)."""
        plan = Schedule(keys, work, self.row_tokens)
        bar = tqdm(total=plan.total_tokens(), disable=disable_tqdm, desc="Scoring (shared prefixes)", unit="tok")
        stack = plan.roots()
        while stack:
            batch = plan.next_batch(stack, self.rows_per_forward)
            segments = [plan.row_of(item) for item in batch]
            hidden, kvs = packed_forward(self.model, self.conditions, batch, segments, plan.kv, self.device)
            self.stats["forwards"] += 1
            self.stats["tokens"] += sum(map(plan.row_len, batch))
            self.stats["padded_tokens"] += hidden.shape[0] * hidden.shape[1]
            for r, (item, seg) in enumerate(zip(batch, segments)):
                plan.done(item, seg, hidden[r], kvs[r], stack)
                bar.update(plan.row_len(item))
            if len(plan.heads) >= HEAD_ROWS:
                plan.flush(self.model.lm_head)
        plan.flush(self.model.lm_head)
        bar.close()
        return plan.results()
