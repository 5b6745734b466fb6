"""Plain containers shared by the sketch kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY_KEY = -1  # key of an unused slot (real keys are non-negative 63-bit hashes)
NO_ROW = -1  # row of a confirmed slot without a hot row
NEWCOMER = -3  # row of a slot Space-Saving placed and no later batch has hit: never medium
FLOAT_MAX = 3.4028234663852886e38


@dataclass
class SketchState:
    """The mutable tensors of one HotSketch; kernels update them in place.

    slots [W*C, 2] int64 is an array of 16-byte slots, so a bucket of 4 is one 64-byte cache
    line: word 0 is the key, word 1 packs the float32 score (low half) and the int32 hot row
    (high half; little-endian). free_rows [H] int32 is a stack whose first free_count[0]
    entries are free hot rows; total_score [1] float64 is the score inserted since the last decay.
    """

    slots: torch.Tensor
    free_rows: torch.Tensor
    free_count: torch.Tensor
    total_score: torch.Tensor
    slots_per_bucket: int
    multiplier: int  # the bucket hash: bucket = bounded(fold(key, multiplier), W)

    @property
    def num_buckets(self) -> int:
        return self.slots.shape[0] // self.slots_per_bucket

    @property
    def keys(self) -> torch.Tensor:
        return self.slots[:, 0]

    @property
    def scores(self) -> torch.Tensor:
        return self.slots.view(torch.float32)[:, 2]

    @property
    def rows(self) -> torch.Tensor:
        return self.slots.view(torch.int32)[:, 3]


@dataclass(frozen=True)
class InsertParams:
    """Scalars that steer one insert: hot threshold, decay factor and when decay fires."""

    threshold: float
    decay: float
    decay_trigger: float  # decay when total_score exceeds this (paper: 10 x buckets x threshold)


@dataclass
class InsertResult:
    """What one insert changed, for migration and stats.

    promoted_keys / promoted_rows [P] int64: keys that got a hot row, in the order rows were
    popped (slot order); demoted_keys / demoted_rows [D] int64: keys that lost their row at a
    decay, in slot order. skipped: inputs rejected (score NaN, inf or negative); dropped:
    newcomers lost because every slot of their bucket was hot; decayed: whether a decay ran.
    """

    promoted_keys: torch.Tensor
    promoted_rows: torch.Tensor
    demoted_keys: torch.Tensor
    demoted_rows: torch.Tensor
    skipped: int
    dropped: int
    decayed: bool
