"""Calls the C++ HotSketch kernel (cafe_torchrec/csrc/hot_sketch.cpp) on CPU tensors."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from cafe_torchrec.hashing import LEVEL_MULTIPLIERS, SLOT_BITS
from cafe_torchrec.sketch.policy import DECAY_STEPS, STALE_FACTOR, AdaptivePolicy
from cafe_torchrec.sketch.types import InsertParams, InsertResult, Lookup, SketchState

__all__ = ["insert_", "lookup", "query", "rebalance_"]


def insert_(
    state: SketchState,
    keys: torch.Tensor,
    scores: torch.Tensor,
    params: InsertParams,
    hints: Optional[torch.Tensor] = None,
) -> InsertResult:
    """Same contract as torch_kernel.insert_; `hints` (slots found by a query) skip re-probing."""
    pkeys, rows, drows, counts = torch.ops.cafe.sketch_insert(
        state.slots,
        state.free_bits,
        state.free_count,
        state.reserved,
        state.total_score,
        keys,
        scores,
        hints if hints is not None else keys.new_empty(0, dtype=torch.int32),
        state.slots_per_bucket,
        params.threshold,
        params.decay,
        params.decay_trigger,
        state.multiplier,
    )
    skipped, dropped, decayed = counts.tolist()
    return InsertResult(pkeys, rows, drows, skipped, dropped, bool(decayed))


def query(state: SketchState, keys: torch.Tensor, medium_threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same contract as torch_kernel.query."""
    return torch.ops.cafe.sketch_query(
        state.slots,
        keys,
        state.slots_per_bucket,
        medium_threshold,
        state.multiplier,
    )


def lookup(
    state: SketchState,
    keys: torch.Tensor,
    regions: torch.Tensor,
    medium_threshold: Optional[float],
    counts: Optional[torch.Tensor],
) -> Lookup:
    """Same contract as torch_kernel.lookup, in one fused pass that also returns hints."""
    multi_level = medium_threshold is not None
    primary, level2, medium, hints = torch.ops.cafe.remap_lookup(
        state.slots,
        keys,
        regions,
        state.slots_per_bucket,
        medium_threshold if multi_level else float("inf"),
        state.multiplier,
        SLOT_BITS,
        LEVEL_MULTIPLIERS[1],
        LEVEL_MULTIPLIERS[2],
        multi_level,
        counts if counts is not None else keys.new_empty(0),
    )
    return Lookup(primary, level2, medium, hints)


def rebalance_(
    state: SketchState,
    policy: AdaptivePolicy,
    capacity: int,
    decayed: torch.Tensor,
    since: torch.Tensor,
    marks: torch.Tensor,
    window: torch.Tensor,
) -> Tuple[InsertResult, float]:
    """Same contract as policy.rebalance_ (the torch-ops twin and spec), in one C++ pass."""
    drows, marginal, was_decayed = torch.ops.cafe.sketch_rebalance(
        state.slots,
        state.free_bits,
        state.free_count,
        state.reserved,
        marks,
        decayed,
        since,
        window,
        state.slots_per_bucket,
        capacity,
        policy.horizon,
        policy.stale_window_horizon,
        policy.hysteresis,
        policy.window_hysteresis,
        policy.entry_score,
        policy.stale_hits,
        policy.stale_burst,
        policy.stale_window,
        STALE_FACTOR,
        DECAY_STEPS,
    )
    empty = drows.new_empty(0)
    return InsertResult(empty, empty, drows, 0, 0, bool(was_decayed)), float(marginal)
