"""Tests of the synthetic Criteo-like stream: determinism, sharding, skew, drift, labels, oracle AUC
(its speed: benchmarks/data_speed.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torchmetrics.functional import auroc
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES
from torchrec.datasets.utils import Batch

from examples.dlrm.data import KAGGLE_CARDINALITIES, SyntheticCriteo, SyntheticCriteoConfig

SMALL = SyntheticCriteoConfig(num_days=3, samples_per_day=4 * 1024, cardinality_scale=0.01)


def same(a: Batch, b: Batch) -> bool:
    """Whether two batches hold identical features and labels."""
    return (
        torch.equal(a.dense_features, b.dense_features)
        and torch.equal(a.sparse_features.values(), b.sparse_features.values())
        and torch.equal(a.labels, b.labels)
    )


def test_batch_layout_and_id_range() -> None:
    stream = SyntheticCriteo(SMALL, 1024)
    batch = next(iter(stream))
    assert batch.dense_features.shape == (1024, 13) and batch.dense_features.dtype == torch.float32
    assert batch.labels.shape == (1024,) and batch.labels.dtype == torch.float32
    kjt = batch.sparse_features
    assert kjt.keys() == DEFAULT_CAT_NAMES and torch.all(kjt.lengths() == 1)
    assert stream.cardinalities == [max(1, round(c * 0.01)) for c in KAGGLE_CARDINALITIES]
    for batch in stream:
        for key, cardinality in zip(DEFAULT_CAT_NAMES, stream.cardinalities):
            ids = batch.sparse_features[key].values()
            assert ids.dtype == torch.int64 and ids.min() >= 0 and ids.max() < cardinality


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    first, again = list(SyntheticCriteo(SMALL, 1024)), list(SyntheticCriteo(SMALL, 1024))
    assert len(first) == 12 and all(same(a, b) for a, b in zip(first, again))
    other = next(iter(SyntheticCriteo(replace(SMALL, seed=1), 1024)))
    assert not torch.equal(other.sparse_features.values(), first[0].sparse_features.values())


def test_ranks_are_disjoint_and_cover_the_stream() -> None:
    everything = list(SyntheticCriteo(SMALL, 1024))
    ranks = [SyntheticCriteo(SMALL, 1024, rank=r, world_size=2) for r in range(2)]
    per_rank = [list(r) for r in ranks]
    assert [len(b) for b in per_rank] == [len(r) for r in ranks] == [6, 6]
    assert not any(same(a, b) for a in per_rank[0] for b in per_rank[1])
    assert all(same(per_rank[k % 2][k // 2], batch) for k, batch in enumerate(everything))
    assert [ranks[1].day_of_batch(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]


def test_days_selection_gives_that_days_batches() -> None:
    full, last = SyntheticCriteo(SMALL, 1024), SyntheticCriteo(SMALL, 1024, days=[2])
    assert len(last) == full.batches_per_day == 4
    assert all(same(b, full.batch(2, i)) for i, b in enumerate(last))
    assert {last.day_of_batch(i) for i in range(len(last))} == {2}


def zipf_share(exponent: float, cardinality: int, top: int) -> float:
    """Share of the top ranks under a discrete Zipf(exponent) over cardinality ranks."""
    weights = np.arange(1, cardinality + 1, dtype=np.float64) ** -exponent
    return float(weights[:top].sum() / weights.sum())


def test_top_one_percent_share_follows_zipf() -> None:
    cardinality = 100_000
    config = SyntheticCriteoConfig(
        cardinalities=(cardinality, cardinality), zipf_exponents=(1.05, 1.3), num_days=1, samples_per_day=1 << 18
    )
    batches = list(SyntheticCriteo(config, 1 << 15))
    shares = []
    for key, exponent in zip(("cat_0", "cat_1"), (1.05, 1.3)):
        ids = torch.cat([b.sparse_features[key].values() for b in batches]).numpy()
        counts = np.sort(np.bincount(ids, minlength=cardinality))[::-1]
        shares.append(counts[: cardinality // 100].sum() / counts.sum())
        assert shares[-1] == pytest.approx(zipf_share(exponent, cardinality, cardinality // 100), abs=0.02)
    assert shares[1] > shares[0] + 0.1


def top_ids(stream: SyntheticCriteo, day: int, count: int = 100) -> set[int]:
    """The count most frequent ids of feature 0 in a day of the stream."""
    ids = torch.cat([stream.batch(day, i).sparse_features["cat_0"].values() for i in range(stream.batches_per_day)])
    values, counts = np.unique(ids.numpy(), return_counts=True)
    return set(values[np.argsort(-counts, kind="stable")[:count]].tolist())


@pytest.mark.parametrize(("drift", "overlap"), [(0.0, (90, 100)), (0.5, (35, 65))])
def test_drift_changes_that_fraction_of_the_popular_ids(drift: float, overlap: tuple[int, int]) -> None:
    config = SyntheticCriteoConfig(
        cardinalities=(1_000_000, 10), zipf_exponents=(1.2, 1.2), num_days=2, samples_per_day=1 << 18, drift=drift
    )
    stream = SyntheticCriteo(config, 1 << 15)
    changed = np.mean(stream.hot_ids(0, 1000, day=0) != stream.hot_ids(0, 1000, day=1))
    assert changed == pytest.approx(drift, abs=0.1)
    if drift == 0:
        assert changed == 0
    measured = len(top_ids(stream, 0) & top_ids(stream, 1))  # noisy at the rank-100 boundary
    assert overlap[0] <= measured <= overlap[1]


def test_label_rate_and_oracle_auc() -> None:
    config = SyntheticCriteoConfig(num_days=4, samples_per_day=8 * 4096)
    stream = SyntheticCriteo(config, 4096)
    for day in (0, 3):
        batches = [stream.batch(day, i) for i in range(8)]
        labels = torch.cat([b.labels for b in batches])
        oracle = torch.cat([stream.teacher_probability(b, day) for b in batches])
        assert labels.mean().item() == pytest.approx(config.target_ctr, abs=0.02)
        assert oracle.mean().item() == pytest.approx(config.target_ctr, abs=0.02)
        assert 0.6 < auroc(oracle, labels.long(), task="binary").item() < 0.95
