"""A radix tree over token sequences: each node is a run of tokens shared by every sequence below it.

`prefix_lm` runs a node once, on top of its parent's KV cache, for all the sequences that pass
through it. Pure Python, no torch: built from sorted sequences in O(total node tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class Node:
    id: int
    tokens: list[int]  # never empty
    start: int  # position of tokens[0] in every sequence through this node
    parent: Node | None
    children: list[Node] = field(default_factory=list)
    seqs: set[int] = field(default_factory=set)  # ids of the sequences through this node
    wanted: set[int] = field(default_factory=set)  # positions (in sequence coordinates) whose logits are needed

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def seqs_through(self, pos: int) -> set[int]:
        """The sequences whose token at `pos` is this node's (all of them, for pos in [start, end))."""
        return self.seqs


@dataclass
class Tree:
    roots: list[Node]
    nodes: list[Node]
    last: list[Node]  # per sequence id, the node holding its last token

    def node_at(self, seq: int, pos: int) -> Node:
        """The node holding token `pos` of sequence `seq`."""
        node = self.last[seq]
        while node.start > pos:
            node = node.parent
        if not node.start <= pos < node.end:
            raise IndexError(f"position {pos} is outside sequence {seq}")
        return node

    def want(self, seq: int, pos: int) -> None:
        self.node_at(seq, pos).wanted.add(pos)


def build_tree(seqs: list[tuple[int, ...]]) -> Tree:
    """The radix tree of `seqs` (sorted, distinct, non-empty); sequence ids are list positions."""
    if any(a >= b for a, b in zip(seqs, seqs[1:])):
        raise ValueError("build_tree needs sorted, distinct sequences")
    if any(len(s) == 0 for s in seqs):
        raise ValueError("build_tree needs non-empty sequences")
    roots: list[Node] = []
    nodes: list[Node] = []
    last: list[Node | None] = [None] * len(seqs)
    work = [(None, 0, 0, len(seqs))] if seqs else []  # (parent, start, lo, hi): seqs[lo:hi] share [:start]
    while work:
        parent, start, lo, hi = work.pop()
        first, final = seqs[lo], seqs[hi - 1]
        end, limit = start, min(len(first), len(final))
        while end < limit and first[end] == final[end]:  # sorted: the LCP of all is the LCP of the two ends
            end += 1
        node = parent
        if end > start:
            node = Node(len(nodes), list(first[start:end]), start, parent)
            node.seqs = set(range(lo, hi))
            nodes.append(node)
            (parent.children if parent is not None else roots).append(node)
        i = lo
        while i < hi and len(seqs[i]) == end:  # sequences ending here sort first
            last[i] = node
            i += 1
        runs = []
        while i < hi:  # the rest, in runs sharing the next token
            j = i
            while j < hi and seqs[j][end] == seqs[i][end]:
                j += 1
            runs.append((node, end, i, j))
            i = j
        work.extend(reversed(runs))
    for n in nodes:  # children in sequence order (the work stack pops them reversed)
        n.children.sort(key=lambda ch: min(ch.seqs))
    roots.sort(key=lambda n: min(n.seqs))
    return Tree(roots, nodes, last)
