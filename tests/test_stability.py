"""Split-half stability: the splits are disjoint and keep pairs whole, the overlap formulas are right,
and re-scoring each half of the planted model's data recovers the planted neurons (no model run)."""

import json

import numpy as np
import pytest
import tiny
from conftest import run_cli

from vllm_coco.identify import stability as st


def _rows(pairs_per_cat=(10, 9, 12)):
    """row_category / row_label as identify writes them in response mode: pair i -> rows 2i (biased), 2i + 1."""
    cats = np.repeat(np.arange(len(pairs_per_cat)), pairs_per_cat)
    return np.repeat(cats, 2).astype(np.int32), np.tile([0, 1], len(cats)).astype(np.int32)


def test_split_halves_disjoint_pairs_whole_and_nested():
    row_cat, row_label = _rows()
    a, b = st.split_halves(row_cat, row_label, paired=True, seed=3)
    assert not set(a) & set(b)
    for half in (a, b):
        assert np.all(np.diff(half) > 0)  # sorted: the i-th biased and i-th unbiased rows stay a pair
        assert set(half[row_label[half] == 0] + 1) == set(half[row_label[half] == 1])  # whole pairs only
    assert [st.units_per_category(h, row_cat, row_label) for h in (a, b)] == [4, 4]  # 9 pairs -> 4 each
    assert sum(row_cat[a] == 0) == 2 * 5 and sum(row_cat[a] == 2) == 2 * 6
    qa, qb = st.split_halves(row_cat, row_label, paired=True, seed=3, fraction=0.25)
    assert set(qa) <= set(a) and set(qb) <= set(b)  # same seed: the quarters are nested in the halves
    assert st.split_halves(row_cat, row_label, paired=True, seed=3, fraction=0.1) is None  # 0 or 1 pair
    other = st.split_halves(row_cat, row_label, paired=True, seed=4)
    assert not np.array_equal(other[0], a)
    with pytest.raises(ValueError):
        st.split_halves(row_cat, row_label, paired=True, seed=0, fraction=0.6)


def test_split_halves_unpaired_splits_each_side():
    row_cat = np.array([0] * 9 + [1] * 8)
    row_label = np.array([0] * 4 + [1] * 5 + [0, 1] * 4)
    a, b = st.split_halves(row_cat, row_label, paired=False, seed=0)
    assert not set(a) & set(b)
    for half in (a, b):  # every (category, side) gets floor(n / 2) rows
        assert [int(np.sum((row_cat[half] == c) & (row_label[half] == s))) for c in (0, 1) for s in (0, 1)] \
            == [2, 2, 2, 2]


def test_jaccard_and_its_chance_level():
    assert st.jaccard([1, 2, 3], [2, 3, 4]) == 0.5 and st.jaccard([], []) == 1.0 and st.jaccard([1], [2]) == 0.0
    rng = np.random.default_rng(0)
    k, n = 30, 1000
    sim = np.mean([st.jaccard(rng.choice(n, k, replace=False), rng.choice(n, k, replace=False)) for _ in range(4000)])
    assert st.chance_jaccard(k, n) == pytest.approx(sim, rel=0.08)
    assert st.chance_jaccard(n, n) == 1.0


def test_rescore_halves_recover_the_planted_neurons(planted, tmp_path):
    """Planted ground truth: each half of the contrast data, scored alone from the stored matrix,
    ranks the two planted neurons first; the halves are disjoint subsets of the full run's rows."""
    from vllm_coco.core.artifact import Artifact
    from vllm_coco.identify.run import rescore

    model, pairs = planted
    full = tmp_path / "full"
    code, _, err = run_cli("identify", model, "--out", full, "--data", pairs, "--split", "all", "--quiet",
                           "--ratio", "0.02", "--null-rounds", "0")
    assert code == 0, err
    meta, arrays = Artifact.read(full)
    halves = st.split_halves(arrays["row_category"], arrays["row_label"], paired=True, seed=0)
    sets = []
    for side, rows in zip("ab", halves):
        new = rescore(str(full), str(tmp_path / side), rows, note=f"half {side}")
        top = {(n["layer"], n["proj"], n["index"]) for n in new["neurons"][:2]}
        assert top == set(tiny.PLANTED), side
        assert new["data"]["rows"] == len(rows) and new["significance"]["null_best_score"] is None
        half = Artifact.read(tmp_path / side)
        assert np.array_equal(half.arrays["rows"], rows)
        assert len(half.arrays["selected"]) == len(arrays["selected"])
        sets.append(half.arrays["selected"])
    assert st.jaccard(*sets) > 10 * st.chance_jaccard(len(sets[0]), len(arrays["loss"]))
    # all rows: the same scores as identify itself (the same formula on the same rows)
    every = rescore(str(full), str(tmp_path / "all"), np.arange(len(arrays["row_label"])), note="all")
    assert [n["index"] for n in every["neurons"]] == [n["index"] for n in meta["neurons"]]
    np.testing.assert_allclose(Artifact.read(tmp_path / "all").arrays["loss"], arrays["loss"], rtol=1e-12)
    # the source artifact is read only, and an existing output is refused
    assert json.loads((full / "neurons.json").read_text()) == meta
    from vllm_coco.core.errors import CocoError

    with pytest.raises(CocoError):
        rescore(str(full), str(tmp_path / "a"), halves[0], note="again")
