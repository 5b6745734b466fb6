"""Input checks with errors that name the feature: raised before any state changes."""

from __future__ import annotations

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
            raise ValueError(
                f"table {t.name!r}: embedding_dim {t.embedding_dim} is not a positive multiple of 4 (FBGEMM TBE)"
            )
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
                raise ValueError(
                    f"feature {f!r} is in tables {features[f]!r} and {t.name!r}; "
                    f"{owner} needs each feature in one table"
                )
            features[f] = t.name


def checked_input(features: KeyedJaggedTensor, expected: List[str], weighted: bool) -> KeyedJaggedTensor:
    """The KJT a collection computes on: checked (ValueError naming the feature, raised before
    any state changes), a variable-batch (VBE) KJT expanded to its output batch, so the
    output equals the stock collection's and training sees the batch the VBE input stands for,
    and per-sample weights dropped unless the collection is weighted: stock ignores them then,
    where TorchRec's sharded lookup (and the importance scores) would use them.

    TorchScript compiles it (a frozen collection calls it in its scripted forward) and
    torch.fx keeps it as one call (the collections wrap it), so it runs in traced graphs too."""
    check_features(features, expected, weighted)
    if has_variable_batch(features):
        features = expand_variable_batch(features)
    if not weighted and features.weights_or_none() is not None:
        features = KeyedJaggedTensor(
            keys=features.keys(),
            values=features.values(),
            lengths=features.lengths(),
            offsets=features.offsets_or_none(),
            stride=features.stride(),
        )
    return features


def check_features(features: KeyedJaggedTensor, expected: List[str], weighted: bool) -> None:
    """Keys, dtypes and lengths of an input KJT (variable-batch or not); raises ValueError
    naming what is wrong. int32 and int64 ids, lengths and offsets are accepted, as stock.
    Under torch.export the checks that read tensor values are left out (an exported graph
    cannot branch on them); the key and dtype checks stay."""
    keys = features.keys()
    dup = _duplicates(keys)
    if len(dup) > 0:
        raise ValueError(f"KeyedJaggedTensor has duplicated feature keys {dup}")
    unknown = _not_in(keys, expected)
    if len(unknown) > 0:
        raise ValueError(f"KeyedJaggedTensor has unknown features {unknown}; expected {expected}")
    missing = _not_in(expected, keys)
    if len(missing) > 0:
        raise ValueError(f"KeyedJaggedTensor lacks features {missing}")
    values, lengths = features.values(), features.lengths()
    if values.dtype != torch.int32 and values.dtype != torch.int64:
        raise ValueError(f"feature ids must be int32 or int64, got {values.dtype} (features {keys})")
    if values.dim() != 1:
        raise ValueError(f"feature ids must be 1-D, got {values.dim()} dims (features {keys})")
    if lengths.dtype != torch.int32 and lengths.dtype != torch.int64:
        raise ValueError(f"lengths must be int32 or int64, got {lengths.dtype} (features {keys})")
    weights = features.weights_or_none()
    if weighted:
        if weights is None:
            raise ValueError("this collection is weighted but the KeyedJaggedTensor has no weights")
        # one weight per id: a permute of the KJT would read past shorter weights, not fail
        if weights.dim() != 1 or not weights.is_floating_point():
            raise ValueError(
                f"per-sample weights must be 1-D floating point, got {weights.dtype} with {weights.dim()} dims "
                f"(features {keys})"
            )
        if weights.numel() != values.numel():
            raise ValueError(f"{weights.numel()} per-sample weights for {values.numel()} ids (features {keys})")
    if _exporting():
        return
    # min() reads the lengths once; (lengths < 0).any() wrote a mask first (4x the time at 26 x 4096)
    if lengths.numel() > 0 and int(lengths.min()) < 0:
        key = keys[_key_of_bag(features, int((lengths < 0).nonzero()[0]))]
        raise ValueError(f"feature '{key}' has negative lengths")
    if int(lengths.sum()) != values.numel():
        raise ValueError(f"lengths sum to {int(lengths.sum())} but there are {values.numel()} ids (features {keys})")


def _exporting() -> bool:
    """Whether torch.export / torch.compile is tracing (never under TorchScript)."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_compiling()


def _duplicates(keys: List[str]) -> List[str]:
    """Keys listed more than once, sorted."""
    dup: List[str] = []
    for i, k in enumerate(keys):
        if k in keys[:i] and k not in dup:
            dup.append(k)
    return sorted(dup)


def _not_in(names: List[str], others: List[str]) -> List[str]:
    """The names that are not among `others`, in order."""
    out: List[str] = []
    for name in names:
        if name not in others:
            out.append(name)
    return out


def _key_of_bag(features: KeyedJaggedTensor, bag: int) -> int:
    """Index of the key whose bags hold flat bag index `bag` (per-key strides for VBE)."""
    strides = (
        features.stride_per_key() if features.variable_stride_per_key() else [features.stride()] * len(features.keys())
    )
    end = 0
    for i, stride in enumerate(strides):
        end += stride
        if bag < end:
            return i
    return len(strides) - 1
