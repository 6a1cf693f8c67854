"""The vectorized COCO score against a direct, loop-by-loop transcription of the formula."""

import math

import numpy as np
import pytest
import torch

from vllm_coco.identify import scoring


def slow_loss(a, b, plan, tau):
    """Direct transcription of docs/METHOD.md §3 for one neuron: a, b are 1-D lists of floats."""
    both = np.concatenate([a, b])
    sigma = max(both.std(), 1e-6 * np.abs(both).mean() + 1e-12)

    def s(u, v):
        return -abs(u - v) / (tau * sigma)

    losses = []
    for anchors, pos, pool, neg in ((a, plan.pos_a, b, plan.neg_a), (b, plan.pos_b, a, plan.neg_b)):
        for i, x in enumerate(anchors):
            num = math.exp(s(x, anchors[pos[i]]))
            den = num + sum(math.exp(s(x, pool[j])) for j in neg[i])
            losses.append(-math.log(num / den))
    return float(np.mean(losses))


@pytest.mark.parametrize("n_a,n_b,k", [(7, 7, 256), (9, 5, 256), (12, 12, 4)])
def test_vectorized_equals_direct(n_a, n_b, k):
    rng = np.random.default_rng(1)
    n = 23
    a = rng.gamma(2.0, 1.0, size=(n_a, n))
    b = rng.gamma(2.0, 1.0, size=(n_b, n)) + np.linspace(0, 3, n)  # growing contrast across neurons
    plan = scoring.Plan.make(n_a, n_b, seed=3, k=k)
    fast = scoring.coco_loss(torch.from_numpy(a), torch.from_numpy(b), plan, tau=0.1).numpy()
    slow = np.array([slow_loss(a[:, j], b[:, j], plan, 0.1) for j in range(n)])
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)


def test_chunking_does_not_change_results(monkeypatch):
    rng = np.random.default_rng(2)
    a, b = torch.from_numpy(rng.random((10, 50))), torch.from_numpy(rng.random((10, 50)) + 0.3)
    plan = scoring.Plan.make(10, 10, seed=0)
    whole = scoring.coco_loss(a, b, plan)
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", 100 * 3)  # 3 neurons per chunk
    np.testing.assert_allclose(scoring.coco_loss(a, b, plan).numpy(), whole.numpy(), rtol=1e-13)


def test_separated_neuron_keeps_precision_near_zero():
    """Perfectly separated neurons have L near 0, where S = log(1+K) - L rounds to the same float:
    the loss must keep its digits, since ranking uses it."""
    a = torch.tensor([[1.0, 1.0], [1.0001, 1.0], [0.9999, 1.0]], dtype=torch.float64)
    b = torch.tensor([[9.0, 9.0], [9.0001, 9.0], [8.9999, 9.0]], dtype=torch.float64)
    plan = scoring.Plan.make(3, 3, seed=0)
    loss = scoring.coco_loss(a, b, plan, tau=0.02).numpy()
    assert np.all(loss > 0) and np.all(loss < 1e-30)
    assert loss[1] < loss[0]  # neuron 1 has no spread within a set: the tighter cluster ranks first
    score = plan.log1pk - loss
    assert score[0] == score[1]  # ... which the score alone could not tell


def test_no_contrast_scores_below_zero():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((60, 40)))
    plan = scoring.Plan.make(30, 30, seed=0)
    score = plan.log1pk - scoring.coco_loss(x[:30], x[30:], plan).numpy()
    assert np.all(score < 0)


def test_constant_neuron_ranks_last():
    """A neuron with one value on every row (all of layer 0 at a fixed last prompt token in
    behavior mode) would score exactly 0 by the bare formula, above every real neuron: it gets
    L = inf instead. A neuron constant within each set but different between them is the best."""
    rng = np.random.default_rng(0)
    a = rng.random((12, 4))
    b = rng.random((12, 4))
    a[:, 1] = b[:, 1] = 0.37  # constant everywhere
    a[:, 2], b[:, 2] = 1.0, 2.0  # constant per set: perfect contrast
    plan = scoring.Plan.make(12, 12, seed=0)
    loss = scoring.coco_loss(torch.from_numpy(a), torch.from_numpy(b), plan).numpy()
    assert math.isinf(loss[1]) and np.isfinite(loss[[0, 2, 3]]).all()
    assert list(np.argsort(loss, kind="stable"))[0] == 2 and list(np.argsort(loss, kind="stable"))[-1] == 1
    assert slow_loss(a[:, 1], b[:, 1], plan, 0.1) == pytest.approx(plan.log1pk)  # what the bare formula gives


def test_derangement_and_null_rounds():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10):
        p = scoring.derangement(n, rng)
        assert sorted(p) == list(range(n)) and not np.any(p == np.arange(n))
    rounds = scoring.null_rounds(5, 5, paired=True, rounds=2, seed=0)
    for ia, ib in rounds:
        assert sorted(np.concatenate([ia, ib])) == list(range(10))
        assert np.all(np.abs(ia - ib) == 5)  # each pair stays a pair, labels maybe swapped
    assert scoring.null_rounds(5, 5, True, 2, seed=0)[0][0].tolist() == rounds[0][0].tolist()


def test_direction_sign():
    a = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    b = torch.tensor([[5.0], [6.0]], dtype=torch.float64)
    assert scoring.direction(a, b).item() > 0


def _random_category(n_a=40, n_b=30, n=37, k=16, seed=5):
    """Random float64 intensities of one category (one constant neuron included) and its plan."""
    rng = np.random.default_rng(seed)
    a = rng.gamma(2.0, 1.0, size=(n_a, n))
    b = rng.gamma(2.0, 1.0, size=(n_b, n)) + np.linspace(0, 2, n)
    a[:, 4] = b[:, 4] = 0.5  # constant: L = inf on every device
    return torch.from_numpy(a), torch.from_numpy(b), scoring.Plan.make(n_a, n_b, seed=seed, k=k)


def test_chunk_elements_keyword():
    """A float64 run with another chunk size (3 neurons a chunk, the last one short) equals the default."""
    a, b, plan = _random_category()
    whole = scoring.coco_loss(a, b, plan).numpy()
    chunked = scoring.coco_loss(a, b, plan, chunk_elements=40 * 16 * 3).numpy()
    assert math.isinf(whole[4]) and math.isinf(chunked[4])
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    """On a GPU (indices, chunks and output on the device) the float64 loss, sigma and direction
    equal the CPU's within 1e-9."""
    a, b, plan = _random_category()
    ga, gb = a.cuda(), b.cuda()
    loss = scoring.coco_loss(ga, gb, plan, chunk_elements=1 << 28)
    assert loss.device.type == "cuda"
    np.testing.assert_allclose(loss.cpu().numpy(), scoring.coco_loss(a, b, plan).numpy(), rtol=0, atol=1e-9)
    for f in (scoring.sigma_of, scoring.direction):
        np.testing.assert_allclose(f(ga, gb).cpu().numpy(), f(a, b).numpy(), rtol=0, atol=1e-9)
