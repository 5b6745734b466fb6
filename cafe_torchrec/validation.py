"""Input checks with errors that name the feature: raised before any state changes."""

from __future__ import annotations

import itertools
from typing import Dict, List, Sequence

import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec.kjt import expand_variable_batch, has_variable_batch

SUPPORTED_DATA_TYPES = (DataType.FP32, DataType.FP16)


def check_tables(tables: Sequence[EmbeddingBagConfig], is_weighted: bool, owner: str) -> None:
    """Logical tables any collection here can hold (FBGEMM TBE on CPU and CUDA): ValueError
    naming the table or feature at fault."""
    if not tables:
        raise ValueError(f"{owner} needs at least one table")
    names: set = set()
    features: Dict[str, str] = {}
    for t in tables:
        if t.name in names:
            raise ValueError(f"table {t.name!r} is listed twice")
        names.add(t.name)
        if t.num_embeddings < 1:
            raise ValueError(f"table {t.name!r}: num_embeddings must be >= 1, got {t.num_embeddings}")
        if t.embedding_dim < 1 or t.embedding_dim % 4:
            raise ValueError(f"table {t.name!r}: embedding_dim {t.embedding_dim} is not a positive multiple of 4 (FBGEMM TBE)")
        if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
            raise ValueError(f"table {t.name!r}: pooling {t.pooling} is not supported (SUM or MEAN)")
        if t.data_type not in SUPPORTED_DATA_TYPES:
            raise ValueError(f"table {t.name!r}: data_type {t.data_type} is not supported (FP32 or FP16)")
        if not t.feature_names:
            raise ValueError(f"table {t.name!r} has no feature_names")
        if is_weighted and t.pooling == PoolingType.MEAN:
            raise ValueError(f"table {t.name!r}: MEAN pooling with per-sample weights is not supported")
        for f in t.feature_names:
            if f in features:
                raise ValueError(f"feature {f!r} is in tables {features[f]!r} and {t.name!r}; {owner} needs each feature in one table")
            features[f] = t.name


ID_DTYPES = (torch.int32, torch.int64)


def checked_input(features: KeyedJaggedTensor, expected: List[str], weighted: bool) -> KeyedJaggedTensor:
    """The KJT a collection computes on: checked (ValueError naming the feature, raised before
    any state changes), and a variable-batch (VBE) KJT expanded to its output batch, so the
    output equals the stock collection's and training sees the batch the VBE input stands for."""
    check_features(features, expected, weighted)
    return expand_variable_batch(features) if has_variable_batch(features) else features


def check_features(features: KeyedJaggedTensor, expected: List[str], weighted: bool) -> None:
    """Keys, dtypes and lengths of an input KJT (variable-batch or not); raises ValueError
    naming what is wrong. int32 and int64 ids, lengths and offsets are accepted, as stock."""
    keys = features.keys()
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"KeyedJaggedTensor has duplicated feature keys {dup}")
    unknown = [k for k in keys if k not in expected]
    if unknown:
        raise ValueError(f"KeyedJaggedTensor has unknown features {unknown}; expected {expected}")
    missing = [k for k in expected if k not in keys]
    if missing:
        raise ValueError(f"KeyedJaggedTensor lacks features {missing}")
    values, lengths = features.values(), features.lengths()
    if values.dtype not in ID_DTYPES:
        raise ValueError(f"feature ids must be int32 or int64, got {values.dtype} (features {keys})")
    if lengths.dtype not in ID_DTYPES:
        raise ValueError(f"lengths must be int32 or int64, got {lengths.dtype} (features {keys})")
    if lengths.numel() and bool((lengths < 0).any()):
        raise ValueError(f"feature {keys[_key_of_bag(features, int((lengths < 0).nonzero()[0]))]!r} has negative lengths")
    if int(lengths.sum()) != values.numel():
        raise ValueError(f"lengths sum to {int(lengths.sum())} but there are {values.numel()} ids (features {keys})")
    if weighted and features.weights_or_none() is None:
        raise ValueError("this collection is weighted but the KeyedJaggedTensor has no weights")


def _key_of_bag(features: KeyedJaggedTensor, bag: int) -> int:
    """Index of the key whose bags hold flat bag index `bag` (per-key strides for VBE)."""
    strides = features.stride_per_key() if features.variable_stride_per_key() else [features.stride()] * len(features.keys())
    for i, end in enumerate(itertools.accumulate(strides)):
        if bag < end:
            return i
    return len(strides) - 1
