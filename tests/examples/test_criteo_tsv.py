"""Tests of the raw Criteo TSV reader on the real 10k-row Kaggle sample and on crafted malformed files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES
from torchrec.datasets.utils import Batch

from examples.dlrm.data import CriteoFormatError, CriteoTsvConfig, CriteoTsvReader

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared/data/criteo_kaggle_train_head10k.txt"
needs_sample = pytest.mark.skipif(not SAMPLE.exists(), reason=f"Criteo sample not found at {SAMPLE}")


def read(paths: list[Path], batch_size: int = 1000, **kwargs: object) -> list[Batch]:
    """All batches of a reader over paths."""
    return list(CriteoTsvReader(CriteoTsvConfig(paths=paths, batch_size=batch_size, **kwargs)))


def columns(batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenated dense [N, 13], ids [N, 26] and labels [N] of batches."""
    dense = torch.cat([b.dense_features for b in batches])
    ids = torch.cat([b.sparse_features.values().reshape(26, -1).T for b in batches])
    labels = torch.cat([b.labels for b in batches])
    return dense, ids, labels


def assert_same_batches(left: list[Batch], right: list[Batch]) -> None:
    """Batch-by-batch equality of dense, ids and labels."""
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert torch.equal(a.dense_features, b.dense_features)
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.labels, b.labels)


def expected_row(line: str) -> tuple[float, list[float], list[int]]:
    """Independent parse of one raw line: label, transformed dense, raw ids (empty -> 0)."""
    fields = line.rstrip("\n").split("\t")
    dense = [float(np.log1p(max(int(x or 0), 0))) for x in fields[1:14]]
    return float(fields[0]), dense, [int(x or "0", 16) for x in fields[14:]]


@pytest.fixture(scope="module")
def sample_batches() -> list[Batch]:
    return read([SAMPLE])


@needs_sample
def test_sample_shapes_dtypes_and_label_rate(sample_batches: list[Batch]) -> None:
    assert len(sample_batches) == 10
    batch = sample_batches[0]
    assert batch.dense_features.shape == (1000, 13) and batch.dense_features.dtype == torch.float32
    assert batch.labels.shape == (1000,) and batch.labels.dtype == torch.float32
    kjt = batch.sparse_features
    assert kjt.keys() == DEFAULT_CAT_NAMES
    assert kjt.values().dtype == torch.int64 and kjt.values().shape == (26 * 1000,)
    assert torch.all(kjt.lengths() == 1) and kjt.stride() == 1000
    dense, ids, labels = columns(sample_batches)
    assert len(labels) == 10_000
    assert round(labels.mean().item(), 4) == 0.2182
    assert torch.all(dense >= 0)
    assert ids.min() >= 0 and ids.max() < 2**32


@needs_sample
def test_first_row_matches_the_file(sample_batches: list[Batch]) -> None:
    dense, ids, labels = columns(sample_batches)
    assert labels[0] == 0
    raw = [1, 1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2]  # I12 is empty -> 0
    assert torch.allclose(dense[0], torch.log1p(torch.tensor(raw, dtype=torch.float32)))
    assert ids[0, :3].tolist() == [0x68FD1E64, 0x80E26C9B, 0xFB936136]
    assert ids[0, 21] == 0  # C22 is empty: the "missing" id


@needs_sample
def test_spot_checked_rows_and_empty_categoricals(sample_batches: list[Batch]) -> None:
    lines = SAMPLE.read_text().splitlines()
    dense, ids, labels = columns(sample_batches)
    for row in (1, 2, 4242, 9999):
        label, row_dense, row_ids = expected_row(lines[row])
        assert labels[row] == label
        assert torch.allclose(dense[row], torch.tensor(row_dense, dtype=torch.float32))
        assert ids[row].tolist() == row_ids
    empty = sum(f == "" for line in lines for f in line.split("\t")[14:])
    assert empty > 0 and int((ids == 0).sum()) == empty


def write_malformed(tmp_path: Path, name: str = "bad.tsv") -> tuple[Path, list[str]]:
    """A copy of the sample's first 8 lines with a wrong column count (line 3), bad hex (5), bad integer (7)."""
    lines = SAMPLE.read_text().splitlines(keepends=True)[:8]
    fields = [line.rstrip("\n").split("\t") for line in lines]
    del fields[2][5]  # line 3: 39 fields
    fields[4][16] = "zzzz"  # line 5: C3
    fields[6][2] = "x1"  # line 7: I2
    path = tmp_path / name
    path.write_text("".join("\t".join(f) + "\n" for f in fields))
    return path, lines


@needs_sample
def test_malformed_line_raises_naming_file_and_line(tmp_path: Path) -> None:
    path, _ = write_malformed(tmp_path)
    with pytest.raises(CriteoFormatError, match=rf"{path}:3: expected 40 tab-separated fields, got 39"):
        read([path], batch_size=4)


@needs_sample
@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        (0, "2", "bad label '2'"),
        (0, "", "bad label ''"),
        (3, "1.5", "bad integer '1.5' in column I3"),
        (14, "68fd1e6g", "bad 32-bit hex id '68fd1e6g' in column C1"),
        (39, "123456789", "bad 32-bit hex id '123456789' in column C26"),
        (20, "-1", "bad 32-bit hex id '-1' in column C7"),
    ],
)
def test_each_kind_of_bad_field_is_named(tmp_path: Path, column: int, value: str, message: str) -> None:
    fields = SAMPLE.read_text().splitlines()[0].split("\t")
    fields[column] = value
    path = tmp_path / "one.tsv"
    path.write_text("\t".join(fields) + "\n")
    with pytest.raises(CriteoFormatError, match=rf"{path}:1: {message}"):
        read([path])


@needs_sample
def test_skip_mode_skips_and_counts_exactly_the_bad_lines(tmp_path: Path) -> None:
    path, lines = write_malformed(tmp_path)
    reader = CriteoTsvReader(CriteoTsvConfig(paths=[path], batch_size=4, on_error="skip"))
    batches = list(reader)
    assert reader.num_skipped == 3
    assert [m.split(": ")[0] for m in reader.skip_messages] == [f"{path}:{n}" for n in (3, 5, 7)]
    assert "C3" in reader.skip_messages[1] and "I2" in reader.skip_messages[2]
    good = tmp_path / "good.tsv"
    good.write_text("".join(lines[i - 1] for i in (1, 2, 4, 6, 8)))
    assert [len(b.labels) for b in batches] == [4, 1]
    assert_same_batches(batches, read([good], batch_size=4))


@needs_sample
def test_gzip_gives_identical_batches(tmp_path: Path, sample_batches: list[Batch]) -> None:
    data = gzip.compress(SAMPLE.read_bytes(), compresslevel=1)
    (tmp_path / "sample.txt.gz").write_bytes(data)
    (tmp_path / "sample_no_suffix.txt").write_bytes(data)  # detected by magic bytes
    assert_same_batches(read([tmp_path / "sample.txt.gz"]), sample_batches)
    assert_same_batches(read([tmp_path / "sample_no_suffix.txt"]), sample_batches)


@needs_sample
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_cover_every_batch_once(drop_last: bool) -> None:
    world_size, batch_size = 3, 700  # 14 full batches + 200 rows
    everything = read([SAMPLE], batch_size=batch_size)
    per_rank = [
        read([SAMPLE], batch_size=batch_size, rank=r, world_size=world_size, drop_last=drop_last)
        for r in range(world_size)
    ]
    if drop_last:  # the partial batch and the incomplete last round (batches 12, 13) are dropped
        assert [len(b) for b in per_rank] == [4, 4, 4]
        everything = everything[:12]
    else:
        assert [len(b) for b in per_rank] == [5, 5, 5]
    interleaved = [per_rank[k % world_size][k // world_size] for k in range(len(everything))]
    assert_same_batches(interleaved, everything)


@needs_sample
def test_row_range_makes_a_chronological_split(sample_batches: list[Batch]) -> None:
    train = read([SAMPLE], stop_row=8000)
    test = read([SAMPLE], start_row=8000)
    assert sum(len(b.labels) for b in train) == 8000
    assert sum(len(b.labels) for b in test) == 2000
    for got, want in zip(columns(train + test), columns(sample_batches)):
        assert torch.equal(got, want)


@needs_sample
def test_several_files_are_read_in_order(tmp_path: Path, sample_batches: list[Batch]) -> None:
    lines = SAMPLE.read_text().splitlines(keepends=True)
    (tmp_path / "a.tsv").write_text("".join(lines[:3500]))
    (tmp_path / "b.tsv").write_text("".join(lines[3500:]))
    assert_same_batches(read([tmp_path / "a.tsv", tmp_path / "b.tsv"]), sample_batches)
