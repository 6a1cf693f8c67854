"""Tensor-parallel sharding of the NE gate, checked against a simulated QKVParallelLinear for
tp = 1, 2, 4 with and without replicated KV heads (no GPUs needed)."""

import numpy as np
import pytest
import torch

from vllm_coco.core.sharding import HeadLayout, rank_channels, shard_plan
from vllm_coco.edit.gate import ne_gain


def rank_outputs(packed: np.ndarray, heads: HeadLayout, tp: int):
    """What vLLM's QKVParallelLinear gives each rank: [q heads of r | k heads | v heads]."""
    d = heads.head_dim
    q = packed[..., :heads.q_size].reshape(*packed.shape[:-1], heads.num_heads, d)
    k = packed[..., heads.q_size:heads.q_size + heads.kv_size].reshape(*packed.shape[:-1], heads.num_kv_heads, d)
    v = packed[..., heads.q_size + heads.kv_size:].reshape(*packed.shape[:-1], heads.num_kv_heads, d)
    q_per = heads.num_heads // tp
    kv_per = max(1, heads.num_kv_heads // tp)
    replicas = max(1, tp // heads.num_kv_heads)
    outs = []
    for r in range(tp):
        b = r // replicas
        parts = [q[..., r * q_per:(r + 1) * q_per, :], k[..., b * kv_per:(b + 1) * kv_per, :],
                 v[..., b * kv_per:(b + 1) * kv_per, :]]
        outs.append(np.concatenate([p.reshape(*p.shape[:-2], -1) for p in parts], -1))
    return outs


CASES = [(HeadLayout(8, 4, 4), tp) for tp in (1, 2, 4)] + [(HeadLayout(8, 2, 4), 4), (HeadLayout(4, 1, 8), 2),
                                                           (HeadLayout(8, 1, 2), 4)]


@pytest.mark.parametrize("heads,tp", CASES)
def test_each_rank_holds_exactly_its_own_channels(heads, tp):
    width = heads.q_size + 2 * heads.kv_size
    rng = np.random.default_rng(tp)
    channels = np.sort(rng.choice(width, size=min(12, width), replace=False))
    packed = rng.standard_normal((3, width))  # [tokens, width] with distinct values per channel
    outs = rank_outputs(packed, heads, tp)
    seen = np.zeros(len(channels), dtype=int)
    for r in range(tp):
        plan = shard_plan(channels, heads, tp, r)
        np.testing.assert_array_equal(outs[r][:, plan.local], packed[:, channels[plan.rows]])
        seen[plan.rows] += 1
        # nothing else on this rank is a gated channel
        others = np.setdiff1d(np.arange(outs[r].shape[1]), plan.local)
        for c in others:
            assert not any(np.array_equal(outs[r][:, c], packed[:, g]) for g in channels)
    replicas = max(1, tp // heads.num_kv_heads)
    is_kv = channels >= heads.q_size
    assert np.all(seen[~is_kv] == 1) and np.all(seen[is_kv] == replicas)


@pytest.mark.parametrize("heads,tp", CASES)
def test_sharded_gain_equals_the_single_device_gain(heads, tp):
    """Gathering padded engagements and using the rank's W_hat rows reproduces the tp=1 gain."""
    width = heads.q_size + 2 * heads.kv_size
    rng = np.random.default_rng(7 + tp)
    s = min(10, width)
    channels = np.sort(rng.choice(width, size=s, replace=False))
    packed = torch.from_numpy(rng.standard_normal((5, width)))
    mu, sigma = torch.rand(s, dtype=torch.float64), torch.rand(s, dtype=torch.float64) + 0.5
    w = torch.rand(s, dtype=torch.float64) * 2 - 1
    w_hat = np.abs(rng.standard_normal((s, s)))
    np.fill_diagonal(w_hat, 0)
    w_hat /= w_hat.sum(1, keepdims=True)
    want = ne_gain(packed[:, channels], mu, sigma, w, torch.from_numpy(w_hat), 0.8, 2.0, 0.5)

    outs = [torch.from_numpy(o) for o in rank_outputs(packed.numpy(), heads, tp)]
    plans = [shard_plan(channels, heads, tp, r) for r in range(tp)]

    def gather(es):  # the all-gather: every rank's e padded to P, concatenated
        return torch.cat([torch.nn.functional.pad(e, (0, p.pad - e.shape[1])) for e, p in zip(es, plans)], -1)

    # engagement of each rank's own channels, as the model computes it before the all-gather
    es = [torch.sign(w[p.rows]) * ((o[:, p.local].abs() - mu[p.rows]) / sigma[p.rows]) for o, p in zip(outs, plans)]
    gathered = gather(es)
    for o, p in zip(outs, plans):
        got = ne_gain(o[:, p.local], mu[p.rows], sigma[p.rows], w[p.rows],
                      torch.from_numpy(p.w_hat_rows(w_hat)), 0.8, 2.0, 0.5, gather=lambda e: gathered)
        torch.testing.assert_close(got, want[:, p.rows].float() if got.dtype == torch.float32 else want[:, p.rows])


@pytest.mark.parametrize("heads,tp", [c for c in CASES if c[1] in (2, 4)])
def test_sharded_gain_with_per_token_settings_equals_each_token_alone(heads, tp):
    """Per-request settings reach each rank as the same per-token rows ([tokens, 1] alpha, beta,
    lam): every rank's gain for token t equals the single-device gain at token t's own setting."""
    width = heads.q_size + 2 * heads.kv_size
    rng = np.random.default_rng(11 + tp)
    s = min(10, width)
    channels = np.sort(rng.choice(width, size=s, replace=False))
    packed = torch.from_numpy(rng.standard_normal((6, width)))  # [tokens, width]
    mu, sigma = torch.rand(s, dtype=torch.float64), torch.rand(s, dtype=torch.float64) + 0.5
    w = torch.rand(s, dtype=torch.float64) * 2 - 1
    w_hat = np.abs(rng.standard_normal((s, s)))
    np.fill_diagonal(w_hat, 0)
    w_hat /= w_hat.sum(1, keepdims=True)
    settings = [(0.8, 2.0, 0.5), (0.0, 2.0, 0.5), (2.0, 4.0, 0.0), (0.5, 1.0, 1.0), (0.8, 2.0, 0.5), (0.0, 1.0, 0.2)]
    alpha, beta, lam = (torch.tensor([[x[i]] for x in settings], dtype=torch.float64) for i in range(3))  # [t, 1]
    want = torch.cat([ne_gain(packed[t:t + 1, channels], mu, sigma, w, torch.from_numpy(w_hat), *settings[t])
                      for t in range(len(settings))])  # each token alone, at its own setting

    outs = [torch.from_numpy(o) for o in rank_outputs(packed.numpy(), heads, tp)]
    plans = [shard_plan(channels, heads, tp, r) for r in range(tp)]
    es = [torch.sign(w[p.rows]) * ((o[:, p.local].abs() - mu[p.rows]) / sigma[p.rows]) for o, p in zip(outs, plans)]
    gathered = torch.cat([torch.nn.functional.pad(e, (0, p.pad - e.shape[1])) for e, p in zip(es, plans)], -1)
    for o, p in zip(outs, plans):
        got = ne_gain(o[:, p.local], mu[p.rows], sigma[p.rows], w[p.rows], torch.from_numpy(p.w_hat_rows(w_hat)),
                      alpha, beta, lam, gather=lambda e: gathered)
        torch.testing.assert_close(got, want[:, p.rows])
    assert torch.equal(want[1], torch.ones_like(want[1]))  # strength 0: a gain of exactly 1


@pytest.mark.parametrize("heads,tp", CASES)
def test_rank_channels_lay_each_rank_output_into_the_global_order(heads, tp):
    """identify --backend vllm: every rank's recorded columns, placed at rank_channels, rebuild the
    unsharded packed output (replicated KV columns agree)."""
    width = heads.q_size + 2 * heads.kv_size
    packed = np.random.default_rng(tp).standard_normal((3, width))  # [tokens, width]
    rebuilt = np.full_like(packed, np.nan)
    for r, out in enumerate(rank_outputs(packed, heads, tp)):
        g = rank_channels(heads, tp, r)  # [rank width]
        assert len(g) == out.shape[1]
        held = ~np.isnan(rebuilt[:, g])
        np.testing.assert_array_equal(rebuilt[:, g][held], out[held])  # a replica equals its first copy
        rebuilt[:, g] = out
    np.testing.assert_array_equal(rebuilt, packed)
