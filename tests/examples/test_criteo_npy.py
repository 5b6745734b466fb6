"""Tests of the TorchRec npy day reader against the TSV reader, and of torchrec's own TSV -> npy conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.datasets.criteo import BinaryCriteoUtils
from torchrec.datasets.utils import Batch

from examples.dlrm.data import (
    CriteoNpyConfig,
    CriteoNpyReader,
    CriteoTsvConfig,
    CriteoTsvReader,
    npy_day_paths,
    write_npy_day,
)

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared/data/criteo_kaggle_train_head10k.txt"
pytestmark = pytest.mark.skipif(not SAMPLE.exists(), reason=f"Criteo sample not found at {SAMPLE}")


def assert_same_batches(left: list[Batch], right: list[Batch]) -> None:
    """Batch-by-batch equality of dense, ids, KJT layout and labels."""
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert torch.equal(a.dense_features, b.dense_features)
        assert a.sparse_features.keys() == b.sparse_features.keys()
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())
        assert torch.equal(a.labels, b.labels)


@pytest.fixture(scope="module")
def two_days(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """The sample split into two TSV days (6000 + 4000 rows) and their npy conversion."""
    root = tmp_path_factory.mktemp("criteo")
    lines = SAMPLE.read_text().splitlines(keepends=True)
    tsvs = [root / "day_0.tsv", root / "day_1.tsv"]
    tsvs[0].write_text("".join(lines[:6000]))
    tsvs[1].write_text("".join(lines[6000:]))
    for day, tsv in enumerate(tsvs):
        write_npy_day(tsv, root / "npy", day)
    return tsvs, root / "npy"


def test_written_files_have_torchrec_layout(two_days: tuple[list[Path], Path]) -> None:
    _, root = two_days
    paths = npy_day_paths(root, 0)
    dense, sparse, labels = (np.load(p, mmap_mode="r") for p in (paths.dense, paths.sparse, paths.labels))
    assert (dense.dtype, dense.shape) == (np.float32, (6000, 13))
    assert (sparse.dtype, sparse.shape) == (np.int64, (6000, 26))
    assert (labels.dtype, labels.shape) == (np.int32, (6000, 1))


@pytest.mark.parametrize(
    "batching",
    [
        dict(batch_size=1000),
        dict(batch_size=768),  # batches span the day boundary at row 6000
        dict(batch_size=700, world_size=3, rank=1),
        dict(batch_size=700, world_size=3, rank=2, drop_last=True),
        dict(batch_size=512, start_row=8000),
        dict(batch_size=512, stop_row=8000, world_size=2, rank=0),
    ],
)
def test_npy_reader_matches_tsv_reader(two_days: tuple[list[Path], Path], batching: dict) -> None:
    tsvs, root = two_days
    npy = CriteoNpyReader(CriteoNpyConfig(root=root, days=[0, 1], **batching))
    tsv = list(CriteoTsvReader(CriteoTsvConfig(paths=tsvs, **batching)))
    assert len(npy) == len(tsv) > 0
    assert_same_batches(list(npy), tsv)


def test_batches_do_not_alias_the_memory_map(two_days: tuple[list[Path], Path]) -> None:
    _, root = two_days
    batch = next(iter(CriteoNpyReader(CriteoNpyConfig(root=root, days=[1], batch_size=16))))
    assert batch.dense_features.numpy().flags.writeable and batch.labels.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:Local function is not supported by pickle")
def test_torchrec_tsv_to_npys_same_ids_and_labels_other_dense_transform(tmp_path: Path) -> None:
    """torchrec's converter keeps ids (int(hex, 16), empty -> 0) and labels but stores log(x - min + 2)."""
    paths = npy_day_paths(tmp_path, 0)
    BinaryCriteoUtils.tsv_to_npys(str(SAMPLE), str(paths.dense), str(paths.sparse), str(paths.labels))
    theirs = list(CriteoNpyReader(CriteoNpyConfig(root=tmp_path, days=[0], batch_size=10_000)))[0]
    ours = next(iter(CriteoTsvReader(CriteoTsvConfig(paths=[SAMPLE], batch_size=10_000))))
    assert torch.equal(theirs.sparse_features.values(), ours.sparse_features.values())
    assert torch.equal(theirs.labels, ours.labels)
    raw = np.array([[int(x or 0) for x in line.split("\t")[1:14]] for line in SAMPLE.read_text().splitlines()])
    assert raw.min() == -2
    np.testing.assert_allclose(theirs.dense_features.numpy(), np.log(raw - raw.min() + 2), rtol=1e-6)
    np.testing.assert_allclose(ours.dense_features.numpy(), np.log1p(np.maximum(raw, 0)), rtol=1e-6)
