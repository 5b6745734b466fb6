"""Builds (once, cached by torch) and calls the C++ HotSketch kernel on CPU tensors."""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Tuple

import torch

from cafe_torchrec.sketch.types import InsertParams, InsertResult, SketchState

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).parent / "csrc" / "hot_sketch.cpp"


@lru_cache(maxsize=1)
def available() -> bool:
    """True once the op is registered; the first call compiles it (about a minute, then cached).

    Set CAFE_SKETCH_KERNEL=torch to skip the build and use the torch-ops kernel everywhere.
    """
    if os.environ.get("CAFE_SKETCH_KERNEL", "auto") == "torch":
        return False
    if hasattr(torch.ops, "cafe") and hasattr(torch.ops.cafe, "sketch_insert"):
        return True
    try:
        from torch.utils.cpp_extension import load

        load(
            name="cafe_sketch_ops",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as err:  # a missing compiler must not stop training: fall back, loudly
        logger.warning("C++ HotSketch kernel unavailable (%s); using the torch-ops kernel", err)
        return False
    return True


def insert_(
    state: SketchState, keys: torch.Tensor, scores: torch.Tensor, params: InsertParams
) -> InsertResult:
    """Same contract as torch_kernel.insert_."""
    pkeys, rows, dkeys, drows, counts = torch.ops.cafe.sketch_insert(
        state.slots,
        state.free_rows,
        state.free_count,
        state.total_score,
        keys,
        scores,
        state.slots_per_bucket,
        params.threshold,
        params.decay,
        params.decay_trigger,
        state.seed,
    )
    skipped, dropped, decayed = counts.tolist()
    return InsertResult(pkeys, rows, dkeys, drows, skipped, dropped, bool(decayed))


def query(
    state: SketchState, keys: torch.Tensor, medium_threshold: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same contract as torch_kernel.query."""
    return torch.ops.cafe.sketch_query(
        state.slots,
        keys,
        state.slots_per_bucket,
        medium_threshold,
        state.seed,
    )
