"""Data sources of the DLRM example: raw Criteo TSV, TorchRec's preprocessed npy days, and a synthetic stream."""

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
    "SyntheticCriteo",
    "SyntheticCriteoConfig",
    "default_zipf_exponents",
    "dense_transform",
    "make_batch",
    "npy_day_paths",
    "write_npy_day",
]
