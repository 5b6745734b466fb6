"""Data sources of the DLRM example: raw Criteo TSV, TorchRec's preprocessed npy days, a synthetic stream,
and the quality suite's named streams."""

from examples.dlrm.data.criteo_npy import (
    CriteoNpyConfig,
    CriteoNpyReader,
    NpyDayPaths,
    npy_day_paths,
    write_npy_day,
)
from examples.dlrm.data.criteo_tsv import (
    BatchConfig,
    CriteoFormatError,
    CriteoTsvConfig,
    CriteoTsvReader,
    dense_transform,
    make_batch,
)
from examples.dlrm.data.streams import StreamSpec, batch_at, batches, settings
from examples.dlrm.data.synthetic import (
    KAGGLE_CARDINALITIES,
    SyntheticCriteo,
    SyntheticCriteoConfig,
    default_zipf_exponents,
)

__all__ = [
    "KAGGLE_CARDINALITIES",
    "BatchConfig",
    "CriteoFormatError",
    "CriteoNpyConfig",
    "CriteoNpyReader",
    "CriteoTsvConfig",
    "CriteoTsvReader",
    "NpyDayPaths",
    "StreamSpec",
    "SyntheticCriteo",
    "SyntheticCriteoConfig",
    "batch_at",
    "batches",
    "default_zipf_exponents",
    "dense_transform",
    "make_batch",
    "npy_day_paths",
    "settings",
    "write_npy_day",
]
