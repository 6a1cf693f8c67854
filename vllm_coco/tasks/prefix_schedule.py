"""The schedule of one shared-prefix scoring call (`CocoHFLM.score`, tasks/prefix_lm.py).

The requests' model inputs go into a radix tree (tasks/prefix_tree.py); per edit condition, the
nodes some request of that condition passes through are run depth first. A node runs as its own
row on top of its parent's KV cache, or, when its needed subtree has at most `row_tokens` tokens,
as one packed row holding the whole subtree (tasks/packed_forward.py). The LM head runs only at
the continuation positions, in blocks (`flush`). Pure bookkeeping: the forwards are the caller's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vllm_coco.tasks.prefix_tree import Node, build_tree

TOKEN_BUDGET = 4096  # query tokens per forward (rows x longest segment), bounds activation memory

Item = tuple[int, Node]  # (condition id, node): one row of a forward


def _length_bucket(n: int) -> int:
    """Segments in one bucket differ in length by at most ~1.5x (padding stays under a third)."""
    return 0 if n <= 2 else int(math.log(n) / math.log(1.5))


class Schedule:
    """keys: [(model input tokens, continuation tokens)]; work: [(condition id, key index)]."""

    def __init__(self, keys: list[tuple[tuple, tuple]], work: list[tuple[int, int]], row_tokens: int):
        self.keys, self.work, self.row_tokens = keys, work, row_tokens
        seqs = sorted({keys[i][0] for _, i in work})
        self.tree = build_tree(seqs)
        seq_id = {s: n for n, s in enumerate(seqs)}
        # per sequence, the continuation positions whose logits are needed
        self.wants: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (seq id, position) -> [(work index, j)]
        for w, (_, i) in enumerate(work):
            inp, cont = keys[i]
            for j in range(len(cont)):
                self.wants.setdefault((seq_id[inp], len(inp) - len(cont) + j), []).append((w, j))
        for s, pos in self.wants:
            self.tree.want(s, pos)
        self.conds = sorted({c for c, _ in work})
        self.need = {c: {seq_id[keys[i][0]] for cc, i in work if cc == c} for c in self.conds}
        self.logprob = [[0.0] * len(keys[i][1]) for _, i in work]
        self.greedy = [[False] * len(keys[i][1]) for _, i in work]
        self.heads: list[torch.Tensor] = []  # hidden states [hidden] awaiting the LM head
        self.owners: list[tuple[int, Node, int]] = []  # (condition, node, position) of each
        self.size = self._subtree_sizes()
        self.kv: dict[tuple[int, int], list] = {}  # (cond, node id) -> per layer (k, v) of its path
        self.pending: dict[tuple[int, int], int] = {}  # (cond, node id) -> its children still to run

    def _subtree_sizes(self) -> dict[tuple[int, int], int]:
        """(cond, node id) -> tokens of the node's subtree needed for cond."""
        size: dict[tuple[int, int], int] = {}
        for n in reversed(self.tree.nodes):  # children come after their parent in tree.nodes
            for c in self.conds:
                if n.seqs & self.need[c]:
                    size[(c, n.id)] = len(n.tokens) + sum(size.get((c, ch.id), 0) for ch in n.children)
        return size

    def roots(self) -> list[Item]:
        """The first ready items (a stack: the last one runs first)."""
        return [(c, n) for c in self.conds for n in reversed(self.tree.roots) if n.seqs & self.need[c]]

    def total_tokens(self) -> int:
        return sum(len(n.tokens) for c in self.conds for n in self.tree.nodes if n.seqs & self.need[c])

    def row_len(self, item: Item) -> int:
        """Tokens in the row of item: its whole subtree when that is small, else its own."""
        c, node = item
        return s if (s := self.size[(c, node.id)]) <= self.row_tokens else len(node.tokens)

    def row_of(self, item: Item) -> list[Node]:
        """The row's nodes, depth first: the node alone, or its whole needed subtree (packed)."""
        c, node = item
        if self.size[(c, node.id)] > self.row_tokens:
            return [node]
        out, todo = [], [node]
        while todo:
            n = todo.pop()
            out.append(n)
            todo.extend(reversed(self._children(c, n)))
        return out

    def _children(self, c: int, node: Node) -> list[Node]:
        return [ch for ch in node.children if ch.seqs & self.need[c]]

    def next_batch(self, stack: list[Item], rows_per_forward: int) -> list[Item]:
        """Pop the next batch off the ready stack: the top item (depth first, so cached KV is freed
        soon) and the ready items nearest the top whose rows are about as long (little padding)."""
        lengths = [self.row_len(item) for item in stack]
        bucket = _length_bucket(lengths[-1])
        longest = max(n for n in lengths if _length_bucket(n) == bucket)
        rows = max(1, min(4 * rows_per_forward, TOKEN_BUDGET // longest))
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

    def done(self, item: Item, segment: list[Node], hidden: torch.Tensor, path_kv, stack: list[Item]) -> None:
        """A row ran: queue its wanted positions for the LM head (hidden: [L, hidden]), keep its
        path's KV for its children and push them (single-node rows), free its parent's KV once
        the parent's last child ran."""
        c, node = item
        offset = 0
        for n in segment:
            for p in sorted(n.wanted):
                self.heads.append(hidden[offset + p - n.start])
                self.owners.append((c, n, p))
            offset += len(n.tokens)
        kids = self._children(c, node) if len(segment) == 1 else []
        if kids:
            self.kv[(c, node.id)] = path_kv
            self.pending[(c, node.id)] = len(kids)
            stack.extend((c, ch) for ch in reversed(kids))
        if node.parent is not None:
            key = (c, node.parent.id)
            self.pending[key] -= 1
            if self.pending[key] == 0:
                del self.kv[key], self.pending[key]

    def flush(self, lm_head) -> None:
        """The LM head on every pending position at once (its weight is read once per flush)."""
        if not self.heads:
            return
        lp = F.log_softmax(lm_head(torch.stack(self.heads)).float(), dim=-1)  # [m, vocab]
        best = lp.argmax(dim=-1).tolist()  # [m]
        picks = []  # (row of lp, work index, j, target)
        for m, (c, node, pos) in enumerate(self.owners):
            for s in node.seqs_through(pos):
                for w, j in self.wants.get((s, pos), ()):
                    if self.work[w][0] == c:
                        picks.append((m, w, j, self.keys[self.work[w][1]][1][j]))
        vals = lp[[p[0] for p in picks], [p[3] for p in picks]].tolist()
        for (m, w, j, target), v in zip(picks, vals):
            self.logprob[w][j] = v
            self.greedy[w][j] = best[m] == target
        self.heads.clear()
        self.owners.clear()

    def results(self) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, all tokens greedy) per work item."""
        return [(sum(lp), all(g)) for lp, g in zip(self.logprob, self.greedy)]
