"""benchmarks/official.py: the official CAFE artifact built from ../shared/peers/cafe-official, its
sketch through ctypes, and train_official on a tiny stream. Skipped (with the reason) when the
artifact's folder is absent or cannot be built; the build is cached in the temp dir by source hash."""

from __future__ import annotations

import math
from typing import Iterator, List

import numpy as np
import pytest
import torch

from benchmarks import official
from benchmarks.official import OfficialSketch, OfficialUnavailable, build_official, train_official

CARDINALITIES = [1000, 50_000, 10, 200_000, 3000]


@pytest.fixture(scope="module")
def artifact() -> official.OfficialArtifact:
    try:
        return build_official()
    except OfficialUnavailable as e:
        pytest.skip(f"official CAFE artifact unavailable: {e}")


@pytest.fixture
def one_thread():
    """Its sketch query is an OpenMP loop: on a shared 2-core host a second thread stalls it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stream(steps: int, seed: int, batch: int = 256) -> Iterator[official.Batch]:
    """Skewed ids; the label depends on field 1's id (a 50k-id field CAFE compresses) and a dense value."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(CARDINALITIES[1], generator=torch.Generator().manual_seed(7)) * 2
    for _ in range(steps):
        ids = torch.stack([(torch.rand(batch, generator=gen) ** 4 * c).long() for c in CARDINALITIES], dim=1)
        dense = torch.randn(batch, official.NUM_DENSE, generator=gen)
        logit = weights[ids[:, 1]] + dense[:, 0]
        labels = (torch.rand(batch, generator=gen) < torch.sigmoid(logit)).float()
        yield dense, ids, labels


def test_unavailable_names_the_missing_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(official.PEER_ENV, str(tmp_path / "absent"))
    with pytest.raises(OfficialUnavailable, match="absent"):
        build_official()


def test_sketch_promotes_through_ctypes(artifact: official.OfficialArtifact) -> None:
    """20,000 ids (two C calls each way): the second insert makes ids hot, and query agrees with
    insert's mask, with distinct rows in [1, hot_rows) (its row 0 is never handed out)."""
    hot_rows = 6000
    sketch = OfficialSketch(artifact, hot_rows=hot_rows, threshold=10)
    ids = np.arange(20_000, dtype=np.int32) * 7 + 3
    scores = np.full(len(ids), 6.0, dtype=np.float32)
    assert not sketch.insert(ids, scores).any()  # never hot on its first insert
    assert (sketch.query(ids) == ids).all()
    became_hot = sketch.insert(ids, scores).astype(bool)
    answer = sketch.query(ids)
    assert became_hot.sum() == hot_rows - 1  # every free row taken, first come first served
    np.testing.assert_array_equal(answer < 0, became_hot)
    rows = -answer[became_hot]
    assert len(np.unique(rows)) == len(rows) and rows.min() >= 1 and rows.max() < hot_rows


def test_train_official_tiny_stream(artifact: official.OfficialArtifact, one_thread) -> None:
    result = train_official(CARDINALITIES, _stream(30, 0), _stream(4, 1), _stream(4, 2), compression_ratio=100, seed=0)
    for key in ("val_auc", "test_auc", "test_log_loss", "online_train_loss", "samples_per_sec", "memory_bytes"):
        assert math.isfinite(result[key]), key
    assert result["test_auc"] > 0.6 and result["val_auc"] > 0.6  # it learns field 1 (the teacher's AUC is ~0.85)
    assert result["hot_lookup_share"] > 0  # insert_grad fed the sketch and ids were promoted
    # init_embed.py's sizing at 100x (tasks/criteo.json: hash rate 0.3): a shared hot table with
    # 48 B of sketch per row, a hash table per field above 2000 x rate ids, the rest plain
    rate, hash_rate, row = 0.01, 0.3, 4 * 16
    hot = int(sum(CARDINALITIES) * rate * (1 - hash_rate) * (row / (row + 48)))
    tables = sum(math.ceil(rate * hash_rate * n) if n > 2000 * rate else n for n in CARDINALITIES)
    assert result["hot_rows"] == hot and result["threshold"] == 100
    assert result["memory_bytes"] == hot * (row + 48) + tables * row


def test_train_official_full_baseline(artifact: official.OfficialArtifact, one_thread) -> None:
    """method="full": its uncompressed tables (one per field) in the same loop, no sketch."""
    result = train_official(
        CARDINALITIES, _stream(30, 0), [], _stream(4, 2), compression_ratio=100, seed=0, method="full"
    )
    assert result["memory_bytes"] == sum(CARDINALITIES) * 4 * 16 and result["hot_rows"] == 0
    assert math.isnan(result["hot_lookup_share"]) and math.isnan(result["val_auc"])
    assert result["test_auc"] > 0.6


def test_train_official_hash_baseline(artifact: official.OfficialArtifact, one_thread) -> None:
    """method="hash": its HashEmbeddingBag (ceil(n / ratio) rows per field above 2000 / ratio ids,
    the rest plain) in the same loop, no sketch; other layers are refused."""
    result = train_official(
        CARDINALITIES, _stream(30, 0), [], _stream(4, 2), compression_ratio=100, seed=0, method="hash"
    )
    rows = sum(math.ceil(n / 100) if n > 2000 / 100 else n for n in CARDINALITIES)
    assert result["memory_bytes"] == rows * 4 * 16 and result["hot_rows"] == 0
    assert math.isnan(result["hot_lookup_share"]) and math.isnan(result["threshold"])
    assert 0.5 < result["test_auc"]
    with pytest.raises(ValueError, match="method"):
        train_official(CARDINALITIES, _stream(1, 0), [], [], compression_ratio=100, seed=0, method="qr")


def test_train_official_rejects_bad_input(artifact: official.OfficialArtifact, one_thread) -> None:
    with pytest.raises(ValueError, match="grid"):
        train_official(CARDINALITIES, _stream(1, 0), [], [], compression_ratio=7, seed=0)
    dense, ids, labels = next(_stream(1, 0))
    ids[5, 3] = CARDINALITIES[3]
    with pytest.raises(ValueError, match="feature 3"):
        train_official(CARDINALITIES, [(dense, ids, labels)], [], [], compression_ratio=100, seed=0)
    big: List[official.Batch] = list(_stream(1, 0, batch=official.MAX_IDS_PER_CALL + 1))
    with pytest.raises(ValueError, match="16384"):
        train_official(CARDINALITIES, big, [], [], compression_ratio=100, seed=0)
