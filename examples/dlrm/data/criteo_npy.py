"""Reader (and a small writer) for TorchRec's preprocessed Criteo day files ``day_{i}_{dense,sparse,labels}.npy``.

Layout as in ``torchrec.datasets.criteo.BinaryCriteoUtils``: dense float32 [N, 13]
(already transformed), sparse int64 [N, 26] raw ids, labels int32 [N, 1]. Dense values
are used as stored. Files made by ``write_npy_day`` hold this package's
log(1 + max(x, 0)); files made by torchrec's ``BinaryCriteoUtils.tsv_to_npys`` hold
log(x - m + 2) with m the minimum raw dense value of the whole file (log(x + 2) when
m = 0), so their dense features differ while ids and labels are the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset
from torchrec.datasets.utils import Batch

from examples.dlrm.data.criteo_tsv import (
    NUM_DENSE,
    NUM_SPARSE,
    BatchConfig,
    CriteoTsvConfig,
    CriteoTsvReader,
    make_batch,
)

_WRITE_BATCH_ROWS = 65536


@dataclass(frozen=True)
class NpyDayPaths:
    """The three files of one preprocessed day."""

    dense: Path
    sparse: Path
    labels: Path


def npy_day_paths(root: str | Path, day: int) -> NpyDayPaths:
    """Paths of day ``day`` under ``root`` in TorchRec's naming."""
    root = Path(root)
    return NpyDayPaths(
        dense=root / f"day_{day}_dense.npy",
        sparse=root / f"day_{day}_sparse.npy",
        labels=root / f"day_{day}_labels.npy",
    )


def write_npy_day(tsv_path: str | Path, root: str | Path, day: int) -> NpyDayPaths:
    """Convert one raw TSV file to day ``day`` npy files with this package's transforms (for tests, small data)."""
    reader = CriteoTsvReader(CriteoTsvConfig(paths=[tsv_path], batch_size=_WRITE_BATCH_ROWS))
    dense, sparse, labels = [], [], []
    for batch in reader:
        dense.append(batch.dense_features.numpy())
        sparse.append(batch.sparse_features.values().numpy().reshape(NUM_SPARSE, -1).T)
        labels.append(batch.labels.numpy())
    paths = npy_day_paths(root, day)
    Path(root).mkdir(parents=True, exist_ok=True)
    np.save(paths.dense, np.concatenate(dense).astype(np.float32))
    np.save(paths.sparse, np.concatenate(sparse).astype(np.int64))
    np.save(paths.labels, np.concatenate(labels).astype(np.int32).reshape(-1, 1))
    return paths


@dataclass(frozen=True, kw_only=True)
class CriteoNpyConfig(BatchConfig):
    """Which preprocessed days to read (in order, rows counted across them) plus batching."""

    root: str | Path
    days: Sequence[int]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.days:
            raise ValueError("days is empty")


class CriteoNpyReader(IterableDataset[Batch]):
    """Yields the same Batches as CriteoTsvReader over the days' rows, reading memory-mapped files.

    The files are opened (mmap) per iteration, not held, so the reader pickles cheaply
    into DataLoader workers.
    """

    def __init__(self, config: CriteoNpyConfig) -> None:
        super().__init__()
        self.config = config
        self._paths = [npy_day_paths(config.root, day) for day in config.days]
        rows = [len(self._open_day(paths)[2]) for paths in self._paths]
        self._day_starts = np.cumsum([0] + rows)

    @staticmethod
    def _open_day(paths: NpyDayPaths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Memory-map one day's dense, sparse and labels (flattened), checking their shapes agree."""
        dense, sparse, labels = (np.load(p, mmap_mode="r") for p in (paths.dense, paths.sparse, paths.labels))
        n = len(labels)
        if dense.shape != (n, NUM_DENSE) or sparse.shape != (n, NUM_SPARSE) or labels.size != n:
            raise ValueError(
                f"{paths.dense.parent}: inconsistent shapes dense {dense.shape}, "
                f"sparse {sparse.shape}, labels {labels.shape}"
            )
        return dense, sparse, labels.reshape(n)

    @property
    def num_rows(self) -> int:
        """Total rows over the configured days (before the row range)."""
        return int(self._day_starts[-1])

    def __len__(self) -> int:
        return len(self.config.owned_row_ranges(self.num_rows))

    def __iter__(self) -> Iterator[Batch]:
        days = [self._open_day(paths) for paths in self._paths]
        for lo, hi in self.config.owned_row_ranges(self.num_rows):
            # Gather global rows [lo, hi), which may span days; concatenate copies out of the mmap.
            pieces = []
            day = int(np.searchsorted(self._day_starts, lo, side="right")) - 1
            while lo < hi:
                start, end = int(self._day_starts[day]), min(hi, int(self._day_starts[day + 1]))
                pieces.append([array[lo - start : end - start] for array in days[day]])
                lo, day = end, day + 1
            yield make_batch(*(np.concatenate(parts) for parts in zip(*pieces)))
