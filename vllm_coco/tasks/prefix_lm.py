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
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from vllm_coco.core.errors import CocoError
from vllm_coco.edit import conditions as cond
from vllm_coco.tasks.prefix_tree import Node, build_tree

MODEL_NAME = "coco-hf"  # the lm-eval registry name
TOKEN_BUDGET = 4096  # query tokens per forward (rows x longest segment), bounds activation memory
ROW_TOKENS = 512  # a subtree with at most this many tokens runs as one packed row (tree attention)
HEAD_ROWS = 512  # positions per LM-head call


def _length_bucket(n: int) -> int:
    """Segments in one bucket differ in length by at most ~1.5x (padding stays under a third)."""
    return 0 if n <= 2 else int(math.log(n) / math.log(1.5))


def _layer_kinds(config) -> set[str]:
    """The attention kinds of the model's layers: "full_attention" and/or "sliding_attention" (every
    layer windowed when the config has a window and no per-layer types, as Mistral's)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    kinds = set(types) if types else {"sliding_attention" if window is not None else "full_attention"}
    unknown = kinds - {"full_attention", "sliding_attention"}
    if unknown or ("sliding_attention" in kinds and window is None):
        what = ", ".join(sorted(unknown)) or "sliding_attention without a sliding_window"
        raise CocoError(f"the coco-hf scorer builds full and sliding-window attention masks only, and this model has "
                        f"{what} layers; evaluate it with --backend hf-stock (lm-eval's own hf model)")
    return kinds


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
            from vllm_coco.core import ne_format
            from vllm_coco.core.models import read_config

            if ne_format.is_ne(read_config(Path(pretrained))):
                from vllm_coco.serve.hf_reference import load_ne_model

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
        _layer_kinds(self.model.config)  # refuse attention kinds the tree mask cannot express, before any work
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
        Returns (sum of continuation log-probs, all tokens greedy) per work item."""
        seqs = sorted({keys[i][0] for _, i in work})
        tree = build_tree(seqs)
        seq_id = {s: n for n, s in enumerate(seqs)}
        # per sequence, the continuation positions whose logits are needed
        wants: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (seq id, position) -> [(work index, j)]
        for w, (_, i) in enumerate(work):
            inp, cont = keys[i]
            for j in range(len(cont)):
                wants.setdefault((seq_id[inp], len(inp) - len(cont) + j), []).append((w, j))
        for (s, pos) in wants:
            tree.want(s, pos)
        conds = sorted({c for c, _ in work})
        need = {c: {seq_id[keys[i][0]] for cc, i in work if cc == c} for c in conds}

        logprob = [[0.0] * len(keys[i][1]) for _, i in work]
        greedy = [[False] * len(keys[i][1]) for _, i in work]

        heads: list[torch.Tensor] = []  # hidden states [hidden] awaiting the LM head
        owners: list[tuple[int, Node, int]] = []  # (condition, node, position) of each

        def flush():  # the LM head on every pending position at once (its weight is read once per flush)
            if not heads:
                return
            lp = F.log_softmax(self.model.lm_head(torch.stack(heads)).float(), dim=-1)  # [m, vocab]
            best = lp.argmax(dim=-1).tolist()  # [m]
            picks = []  # (row of lp, work index, j, target)
            for m, (c, node, pos) in enumerate(owners):
                for s in node.seqs_through(pos):
                    for w, j in wants.get((s, pos), ()):
                        if work[w][0] == c:
                            picks.append((m, w, j, keys[work[w][1]][1][j]))
            vals = lp[[p[0] for p in picks], [p[3] for p in picks]].tolist()
            for (m, w, j, target), v in zip(picks, vals):
                logprob[w][j] = v
                greedy[w][j] = best[m] == target
            heads.clear()
            owners.clear()

        size: dict[tuple[int, int], int] = {}  # (cond, node id) -> tokens of its subtree needed for cond
        for n in reversed(tree.nodes):  # children come after their parent in tree.nodes
            for c in conds:
                if n.seqs & need[c]:
                    size[(c, n.id)] = len(n.tokens) + sum(size.get((c, ch.id), 0) for ch in n.children)

        def row_len(item) -> int:
            """Tokens in the row of item (cond, node): its whole subtree when that is small, else its own."""
            c, node = item
            return s if (s := size[(c, node.id)]) <= self.row_tokens else len(node.tokens)

        def row_of(c: int, node: Node) -> list[Node]:
            """The row's nodes, depth first: the node alone, or its whole needed subtree (packed)."""
            if size[(c, node.id)] > self.row_tokens:
                return [node]
            out, todo = [], [node]
            while todo:
                n = todo.pop()
                out.append(n)
                todo.extend(reversed([ch for ch in n.children if ch.seqs & need[c]]))
            return out

        items = [(c, n) for c in conds for n in reversed(tree.roots) if n.seqs & need[c]]
        kv: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}  # (cond, node id) -> per layer
        pending: dict[tuple[int, int], int] = {}  # parent's children still to run
        total = sum(len(n.tokens) for c in conds for n in tree.nodes if n.seqs & need[c])
        bar = tqdm(total=total, disable=disable_tqdm, desc="Scoring (shared prefixes)", unit="tok")
        stack = items
        while stack:
            batch = self._next_batch(stack, row_len)
            segments = [row_of(c, n) for c, n in batch]
            hidden, new_kv = self._forward(batch, segments, kv)
            self.stats["forwards"] += 1
            self.stats["tokens"] += sum(map(row_len, batch))
            self.stats["padded_tokens"] += hidden.shape[0] * hidden.shape[1]
            for r, ((c, node), seg) in enumerate(zip(batch, segments)):
                offset = 0
                for n in seg:
                    for p in sorted(n.wanted):
                        heads.append(hidden[r, offset + p - n.start])
                        owners.append((c, n, p))
                    offset += len(n.tokens)
                kids = [ch for ch in node.children if ch.seqs & need[c]] if len(seg) == 1 else []
                if kids:
                    kv[(c, node.id)] = new_kv[r]
                    pending[(c, node.id)] = len(kids)
                    stack.extend((c, ch) for ch in reversed(kids))
                if node.parent is not None:
                    key = (c, node.parent.id)
                    pending[key] -= 1
                    if pending[key] == 0:
                        del kv[key], pending[key]
                bar.update(row_len((c, node)))
            if len(heads) >= HEAD_ROWS:
                flush()
        flush()
        bar.close()
        return [(sum(lp), all(g)) for lp, g in zip(logprob, greedy)]

    def _next_batch(self, stack: list, length) -> list:
        """Pop the next batch off the ready stack: the top item (depth first, so cached KV is freed
        soon) and the ready items nearest the top whose rows are about as long (little padding);
        `length(item)` is the row's token count."""
        lengths = [length(item) for item in stack]
        bucket = _length_bucket(lengths[-1])
        longest = max(n for n in lengths if _length_bucket(n) == bucket)
        rows = max(1, min(4 * self.rows_per_forward, TOKEN_BUDGET // longest))
        picked = []
        for k in range(len(stack) - 1, -1, -1):
            if _length_bucket(lengths[k]) == bucket:
                picked.append(k)
                if len(picked) == rows:
                    break
        batch = [stack[k] for k in picked]
        for k in picked:  # descending indices: deleting keeps the others valid
            del stack[k]
        return batch

    def _forward(self, batch, segments, kv):
        """One forward of the batch's rows on top of their parents' KV. A row is its node alone, or
        the node's subtree laid out depth first (`segments[r]`), each token seeing the row's past,
        its own node's earlier tokens and its ancestors' inside the row (a tree mask).
        Returns (hidden [rows, L, hidden], per single-node row: per layer (k, v) over the whole
        path, [kvh, P+L, d]; None for packed rows, whose subtree is done)."""
        from transformers import DynamicCache

        dev = self.device
        nodes = [n for _, n in batch]
        past = [kv[(c, n.parent.id)] if n.parent is not None else None for c, n in batch]
        p_len = [n.start for n in nodes]
        lens = [sum(len(n.tokens) for n in seg) for seg in segments]
        p_max, l_max = max(p_len), max(lens)
        b = len(batch)
        ids = torch.zeros(b, l_max, dtype=torch.long)  # [rows, L]
        pos = torch.zeros(b, l_max, dtype=torch.long)  # [rows, L]
        see = torch.zeros(b, l_max, p_max + l_max, dtype=torch.bool)  # [rows, L, P + L]: query may attend key
        diag = torch.arange(l_max)
        see[:, diag, p_max + diag] = True  # every query sees itself (padding rows too: no empty softmax)
        for r, seg in enumerate(segments):
            see[r, : lens[r], : p_len[r]] = True
            ids[r, : lens[r]] = torch.tensor([t for n in seg for t in n.tokens])
            pos[r, : lens[r]] = torch.tensor([n.start + i for n in seg for i in range(len(n.tokens))])
            # which row segment each token is in, and which segments are ancestors-or-self of which
            index = {n.id: k for k, n in enumerate(seg)}
            anc = torch.eye(len(seg), dtype=torch.bool)  # [S, S]: anc[k, j] = segment j is k's ancestor or k
            for k, n in enumerate(seg[1:], 1):
                anc[k] = anc[index[n.parent.id]]
                anc[k, k] = True
            which = torch.repeat_interleave(torch.arange(len(seg)), torch.tensor([len(n.tokens) for n in seg]))
            causal = torch.ones(lens[r], lens[r], dtype=torch.bool).tril_()  # [L_r, L_r]
            see[r, : lens[r], p_max: p_max + lens[r]] = anc[which[:, None], which[None, :]] & causal
        kinds = _layer_kinds(self.model.config)
        window = getattr(self.model.config, "sliding_window", None)
        masks = {"full_attention": see}
        if "sliding_attention" in kinds:  # a key more than `window` positions back is out of a window layer
            windowed = see
            if p_max + l_max > window:
                keys = torch.cat([torch.arange(p_max).expand(b, p_max), pos], 1)  # [rows, P + L] sequence positions
                windowed = see & (keys[:, None, :] > pos[:, :, None] - window)
                windowed[:, diag, p_max + diag] = True
            masks["sliding_attention"] = windowed
        low = torch.finfo(self.model.dtype).min
        masks = {k: torch.zeros(m.shape, dtype=self.model.dtype).masked_fill_(~m, low)[:, None].to(dev)
                 for k, m in masks.items() if k in kinds}  # [rows, 1, L, P + L] each
        # one kind: the tensor itself; full and window layers mixed (Qwen2 max_window_layers, Gemma2): HF's
        # per-layer-type mapping, which it uses as given
        mask = next(iter(masks.values())) if len(masks) == 1 else masks
        cache = DynamicCache()
        if p_max > 0:
            layers = []
            for layer in range(len(self.conditions.widths)):
                k0 = next(p for p in past if p is not None)[layer][0]
                k = k0.new_zeros(b, k0.shape[0], p_max, k0.shape[2])  # [rows, kvh, P, d]
                v = k.clone()
                for r, p in enumerate(past):
                    if p is not None:
                        k[r, :, : p_len[r]], v[r, :, : p_len[r]] = p[layer]
                layers.append((k, v))
            cache = DynamicCache(ddp_cache_data=layers)
        with self.conditions.rows([c for c, _ in batch]):
            out = self.model.model(input_ids=ids.to(dev), attention_mask=mask,
                                   position_ids=pos.to(dev), past_key_values=cache, use_cache=True)
        new_kv = []
        for r, n in enumerate(nodes):
            if not n.children or len(segments[r]) > 1:
                new_kv.append(None)
                continue
            per_layer = []
            for layer, cl in enumerate(cache.layers):
                k = cl.keys[r, :, p_max: p_max + len(n.tokens)]  # [kvh, L_r, d]
                v = cl.values[r, :, p_max: p_max + len(n.tokens)]
                if past[r] is not None:
                    k, v = torch.cat([past[r][layer][0], k], 1), torch.cat([past[r][layer][1], v], 1)
                per_layer.append((k.clone(), v.clone()))
            new_kv.append(per_layer)
        return out.last_hidden_state, new_kv
