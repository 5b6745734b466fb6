"""The one place where private TorchRec / FBGEMM attributes are reached.

TorchRec's public API leaves out a few things a plugin needs (what its own storage estimator
counts, which optimizer a parameter will get, the lookups of a sharded collection). Each such
access is a named function here with a docstring saying what it reads and why, grouped under a
comment naming the area that needs it, so a TorchRec upgrade has one file to check. Imports of
torchrec happen inside the functions: this module must import with torch alone.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Type

import torch
from torch import nn

# planner


def in_backward_optimizer(param: torch.Tensor) -> Tuple[Optional[Type[torch.optim.Optimizer]], Dict[str, Any]]:
    """The optimizer class and kwargs `apply_optimizer_in_backward` recorded on `param`
    (`_optimizer_classes[0]`, `_optimizer_kwargs[0]`), or (None, {}) without one: TorchRec's
    sharders build the fused TBE optimizer from exactly these attributes."""
    classes = getattr(param, "_optimizer_classes", None) or [None]
    kwargs = getattr(param, "_optimizer_kwargs", None) or [{}]
    return classes[0], dict(kwargs[0] or {})


def stock_optimizer_multiplier(param: torch.Tensor) -> float:
    """The factor TorchRec's EmbeddingStorageEstimator multiplies a shard's weight bytes by to
    count its optimizer state (torchrec 1.8's private `_get_optimizer_multipler`, fed with the
    parameter's in-backward optimizer class): the planner subtracts it to put FBGEMM's real
    optimizer bytes in its place."""
    from torchrec.distributed.planner.shard_estimators import _get_optimizer_multipler

    return float(_get_optimizer_multipler(in_backward_optimizer(param)[0], param.shape))


def sharded_lookups(sharded: nn.Module) -> List[nn.Module]:
    """The lookup modules (FBGEMM TBEs inside) of a sharded TorchRec embedding collection: a
    plain list `_lookups` in torchrec 1.8, so `modules()` does not reach them; the planner's
    tests count the bytes they allocate."""
    return list(getattr(sharded, "_lookups", []))
