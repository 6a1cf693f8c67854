"""Which NE gate channels a tensor-parallel rank holds, and how its gate sees the other ranks'.

vLLM packs q/k/v into one `qkv_proj` and shards it by heads: rank r's output is
[q heads of r | kv heads of r | kv heads of r]. When tp > num_kv_heads the KV heads are
replicated: rank r holds KV head r // (tp / num_kv_heads). A rank gates exactly the channels of
its own shards; the networked term W_hat·e needs every channel's engagement, so each rank pads
its e to a common width P, the ranks all-gather [tokens, tp·P], and the rank's W_hat rows are laid
out over those gathered columns (a replicated KV channel counts once: from its lowest rank).
Pure numpy: tested for any tp without GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def local_index(channel: int, heads: HeadLayout, tp: int, rank: int) -> int | None:
    """Index of a global packed [q|k|v] channel in rank's packed output, or None if not held."""
    d = heads.head_dim
    if tp == 1:
        return channel
    if heads.num_heads % tp:
        raise ValueError(f"num_heads {heads.num_heads} is not divisible by tp {tp}")
    q_per = heads.num_heads // tp
    kv_per = max(1, heads.num_kv_heads // tp)
    replicas = max(1, tp // heads.num_kv_heads)
    kv_block = rank // replicas  # which block of kv heads this rank holds
    if channel < heads.q_size:
        head, off = divmod(channel, d)
        return head % q_per * d + off if head // q_per == rank else None
    rest = channel - heads.q_size
    part, within = divmod(rest, heads.kv_size)  # part 0 = k, 1 = v
    head, off = divmod(within, d)
    if head // kv_per != kv_block:
        return None
    return q_per * d + part * kv_per * d + head % kv_per * d + off


@dataclass(frozen=True)
class ShardPlan:
    rows: np.ndarray  # [S_r] positions in the layer's global channel list that this rank gates
    local: np.ndarray  # [S_r] their indices in this rank's packed [q|k|v] output
    pad: int  # P: every rank's engagement is padded to this width before the all-gather
    gather_cols: np.ndarray  # [S] column of each global channel in the gathered [tp·P] engagement
    tp: int

    def w_hat_rows(self, w_hat: np.ndarray) -> np.ndarray:
        """[S, S] global W_hat -> [S_r, tp·P] rows of this rank over the gathered columns."""
        out = np.zeros((len(self.rows), self.tp * self.pad), dtype=w_hat.dtype)
        out[:, self.gather_cols] = w_hat[self.rows]
        return out


def shard_plan(channels, heads: HeadLayout, tp: int, rank: int) -> ShardPlan:
    """The gate's share for `rank` of a layer whose gated global channels are `channels`."""
    channels = [int(c) for c in channels]
    held = [[(i, li) for i, c in enumerate(channels) if (li := local_index(c, heads, tp, r)) is not None]
            for r in range(tp)]
    pad = max(1, max(len(h) for h in held))
    gather_cols = np.full(len(channels), -1, dtype=np.int64)
    for r in range(tp):
        for pos, (i, _) in enumerate(held[r]):
            if gather_cols[i] < 0:  # owner: the lowest rank holding the channel
                gather_cols[i] = r * pad + pos
    assert np.all(gather_cols >= 0), "every channel is held by some rank"
    mine = held[rank]
    return ShardPlan(rows=np.array([i for i, _ in mine], dtype=np.int64),
                     local=np.array([li for _, li in mine], dtype=np.int64), pad=pad, gather_cols=gather_cols,
                     tp=tp)


def rank_channels(heads: HeadLayout, tp: int, rank: int) -> np.ndarray:
    """The global packed [q|k|v] channel of each of rank's packed output columns, in the rank's
    order: [local width]. Inverse of `local_index`: what identification inside the engine uses to
    lay a rank's recorded columns into the global neuron numbering (a replicated KV channel is
    held, with the same values, by every rank of its block)."""
    width = heads.q_size + 2 * heads.kv_size
    local = [local_index(c, heads, tp, rank) for c in range(width)]
    out = np.full(sum(li is not None for li in local), -1, dtype=np.int64)
    for c, li in enumerate(local):
        if li is not None:
            out[li] = c
    assert np.all(out >= 0), "a rank's columns are contiguous"
    return out
