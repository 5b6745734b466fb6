"""Input checks with errors that name the feature: raised before any state changes."""

from __future__ import annotations

from typing import List

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def check_features(features: KeyedJaggedTensor, expected: List[str], weighted: bool) -> None:
    """Keys, dtypes and lengths of an input KJT; raises ValueError naming what is wrong."""
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
    if values.dtype != torch.int64:
        raise ValueError(f"feature ids must be int64, got {values.dtype} (features {keys})")
    if lengths.numel() and bool((lengths < 0).any()):
        bad = (lengths < 0).nonzero()[0].item() // max(features.stride(), 1)
        raise ValueError(f"feature {keys[bad]!r} has negative lengths")
    if int(lengths.sum()) != values.numel():
        raise ValueError(f"lengths sum to {int(lengths.sum())} but there are {values.numel()} ids (features {keys})")
    if weighted and features.weights_or_none() is None:
        raise ValueError("this collection is weighted but the KeyedJaggedTensor has no weights")
