"""Streaming reader of raw Criteo Kaggle/Terabyte TSV click logs into TorchRec batches.

Also home of the batch layout and the batching/sharding rule shared by every reader
in this package, so that all of them yield interchangeable ``Batch`` streams.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_COLUMNS = 1 + NUM_DENSE + NUM_SPARSE
MAX_HEX_ID = 2**32 - 1
MAX_SKIP_MESSAGES = 10
_GZIP_MAGIC = b"\x1f\x8b"


class CriteoFormatError(ValueError):
    """A malformed TSV line; the message names the file, the 1-based line number and the fault."""


class _LineError(ValueError):
    """What is wrong with one line, before the file and line number are known."""


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """How rows become batches: size, last-batch policy, rank sharding and a [start_row, stop_row) range.

    Batch k (0-based, counted over the rows of the range in order) belongs to rank
    ``k % world_size``, as in torchrec's InMemoryBinaryCriteoIterDataPipe. With
    ``drop_last`` the partial last batch and an incomplete last round of
    ``world_size`` batches are dropped, so every rank yields the same number of
    full batches; without it every row is yielded exactly once and ranks may differ
    by one batch.
    """

    batch_size: int
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1
    start_row: int = 0
    stop_row: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {self.rank}, {self.world_size}")
        if self.start_row < 0 or (self.stop_row is not None and self.stop_row < self.start_row):
            raise ValueError(f"bad row range [{self.start_row}, {self.stop_row})")

    def owned_row_ranges(self, total_rows: int) -> list[tuple[int, int]]:
        """Global [lo, hi) row ranges of this rank's batches when the total row count is known."""
        start = min(self.start_row, total_rows)
        stop = total_rows if self.stop_row is None else min(self.stop_row, total_rows)
        num_rows = stop - start
        if self.drop_last:
            num_batches = num_rows // self.batch_size // self.world_size * self.world_size
        else:
            num_batches = -(-num_rows // self.batch_size)
        return [
            (start + k * self.batch_size, min(start + (k + 1) * self.batch_size, stop))
            for k in range(self.rank, num_batches, self.world_size)
        ]


@dataclass(frozen=True, kw_only=True)
class CriteoTsvConfig(BatchConfig):
    """Raw TSV files (plain or gzip, read in the given order) plus batching and malformed-line policy.

    Rows are the files' lines counted from 0 across all files, malformed ones included,
    so a row range is a stable chronological split whatever ``on_error`` is.
    """

    paths: Sequence[str | Path]
    on_error: Literal["raise", "skip"] = "raise"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if not self.paths:
            raise ValueError("paths is empty")


@functools.lru_cache(maxsize=8)
def _ones(num_ids: int) -> torch.Tensor:
    """All-ones KJT lengths, shared by batches of one shape (read-only; allocating them costs ms)."""
    return torch.ones(num_ids, dtype=torch.int32)


def make_batch(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray) -> Batch:
    """Wrap dense [B, D] floats, ids [B, F] and labels [B] (fresh arrays) as a Batch with one id per feature."""
    batch_size, num_sparse = sparse.shape
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=KeyedJaggedTensor(
            keys=[f"cat_{i}" for i in range(num_sparse)],
            values=torch.from_numpy(np.ascontiguousarray(sparse.T, dtype=np.int64).reshape(-1)),
            lengths=_ones(batch_size * num_sparse),
            stride=batch_size,
            length_per_key=[batch_size] * num_sparse,
            offset_per_key=[batch_size * i for i in range(num_sparse + 1)],
        ),
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32).reshape(-1)),
    )


def dense_transform(raw: np.ndarray) -> np.ndarray:
    """Criteo integer counts -> float32 log(1 + max(x, 0)); negatives are rare noise, so clamp them."""
    return np.log1p(np.maximum(raw, 0), dtype=np.float32)


def _open_text(path: str | Path) -> IO[str]:
    """Open a plain or gzip text file (gzip detected by .gz suffix or magic bytes) for exact line reading."""
    path = Path(path)
    with path.open("rb") as probe:
        is_gzip = path.suffix == ".gz" or probe.read(2) == _GZIP_MAGIC
    # newline="\n": only LF ends a line, so line numbers match `wc -l`; bad bytes fail parsing, not decoding.
    if is_gzip:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="\n")
    return path.open("r", encoding="utf-8", errors="replace", newline="\n")


def _field_ok(value: str, base: int) -> bool:
    """Whether one field is empty or a valid integer (base 10) / 32-bit hex id (base 16)."""
    try:
        parsed = int(value, base) if value else 0
    except ValueError:
        return False
    return base == 10 or 0 <= parsed <= MAX_HEX_ID


def _bad_column(fields: list[str], base: int) -> str:
    """Describe the first bad dense (base 10) or categorical (base 16) field, using Criteo's names I1.., C1.."""
    first, prefix, kind = (1, "I", "integer") if base == 10 else (1 + NUM_DENSE, "C", "32-bit hex id")
    count = NUM_DENSE if base == 10 else NUM_SPARSE
    for offset, value in enumerate(fields[first : first + count]):
        if not _field_ok(value, base):
            return f"bad {kind} {value!r} in column {prefix}{offset + 1}"
    raise AssertionError("no bad field found")  # only called after a parse failure


def _parse_fields(fields: list[str]) -> tuple[float, list[int], list[int]]:
    """Parse one split line into (label, 13 raw integers, 26 raw ids); empty fields -> 0, else _LineError."""
    if len(fields) != NUM_COLUMNS:
        raise _LineError(f"expected {NUM_COLUMNS} tab-separated fields, got {len(fields)}")
    label = fields[0]
    if label != "0" and label != "1":
        raise _LineError(f"bad label {label!r} (expected 0 or 1)")
    try:
        dense = [int(x) if x else 0 for x in fields[1 : 1 + NUM_DENSE]]
    except ValueError:
        raise _LineError(_bad_column(fields, 10)) from None
    try:
        sparse = [int(x, 16) if x else 0 for x in fields[1 + NUM_DENSE :]]
    except ValueError:
        raise _LineError(_bad_column(fields, 16)) from None
    if min(sparse) < 0 or max(sparse) > MAX_HEX_ID:
        raise _LineError(_bad_column(fields, 16))
    return float(label == "1"), dense, sparse


class _BatchBuffer:
    """Preallocated numpy arrays that one batch's parsed rows are written into."""

    def __init__(self, batch_size: int) -> None:
        self.dense = np.empty((batch_size, NUM_DENSE), dtype=np.int64)
        self.sparse = np.empty((batch_size, NUM_SPARSE), dtype=np.int64)
        self.labels = np.empty(batch_size, dtype=np.float32)
        self.size = 0

    def append(self, label: float, dense: list[int], sparse: list[int]) -> None:
        """Store one parsed row."""
        self.labels[self.size] = label
        self.dense[self.size] = dense
        self.sparse[self.size] = sparse
        self.size += 1

    def to_batch(self) -> Batch:
        """Turn the rows stored so far into a Batch (the buffer must not be reused)."""
        n = self.size
        return make_batch(dense_transform(self.dense[:n]), self.sparse[:n], self.labels[:n])


def _numbered_lines(paths: Sequence[str | Path]) -> Iterator[tuple[Path, int, str]]:
    """Every line of the files in order, with its file and 1-based line number."""
    for path in map(Path, paths):
        with _open_text(path) as handle:
            for lineno, line in enumerate(handle, 1):
                yield path, lineno, line


class CriteoTsvReader(IterableDataset[Batch]):
    """Streams raw Criteo TSV rows as Batches in file (time) order, sharded by batch over ranks.

    Dense: log(1 + max(x, 0)), empty -> 0. Ids: raw int64 int(hex, 16), no modulo (the
    embedding module hashes); an empty categorical -> id 0, TorchRec's learned
    "missing" row. With ``on_error="skip"`` every rank parses every line of the range
    (a skipped line moves later batch boundaries) and ``num_skipped`` and
    ``skip_messages`` (the first few) report all skipped lines, updated as it streams;
    with "raise" a rank parses only its own batches' lines.
    """

    def __init__(self, config: CriteoTsvConfig) -> None:
        super().__init__()
        self.config = config
        self.num_skipped = 0
        self.skip_messages: list[str] = []

    def __iter__(self) -> Iterator[Batch]:
        cfg = self.config
        skip = cfg.on_error == "skip"
        self.num_skipped, self.skip_messages = 0, []
        lines = islice(_numbered_lines(cfg.paths), cfg.start_row, cfg.stop_row)
        batch_index, filled = 0, 0
        buffer = _BatchBuffer(cfg.batch_size)
        pending: Batch | None = None  # with drop_last, held until its round of world_size batches completes
        for path, lineno, line in lines:
            owned = batch_index % cfg.world_size == cfg.rank
            # Other ranks' lines only need parsing when a skipped line would move batch boundaries.
            if owned or skip:
                try:
                    row = _parse_fields(line.rstrip("\r\n").split("\t"))
                except _LineError as err:
                    message = f"{path}:{lineno}: {err}"
                    if not skip:
                        raise CriteoFormatError(message) from None
                    self.num_skipped += 1
                    if len(self.skip_messages) < MAX_SKIP_MESSAGES:
                        self.skip_messages.append(message)
                    continue
                if owned:
                    buffer.append(*row)
            filled += 1
            if filled < cfg.batch_size:
                continue
            if owned:
                batch = buffer.to_batch()
                buffer = _BatchBuffer(cfg.batch_size)
                if cfg.drop_last and cfg.world_size > 1:
                    pending = batch
                else:
                    yield batch
            if pending is not None and batch_index % cfg.world_size == cfg.world_size - 1:
                yield pending
                pending = None
            batch_index, filled = batch_index + 1, 0
        if filled and not cfg.drop_last and batch_index % cfg.world_size == cfg.rank:
            yield buffer.to_batch()
