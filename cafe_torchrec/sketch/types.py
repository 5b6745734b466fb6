"""Plain containers shared by the sketch kernels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

EMPTY_KEY = -1  # key of an unused slot (real keys are non-negative 63-bit hashes)
NO_ROW = -1  # what a query and slot_rows say for a key without a hot row
FLOAT_MAX = 3.4028234663852886e38

# The row word of a slot is its hot row (>= 0) or, without one, a negative word: the sign bit,
# the float32 bits of the slot's Space-Saving error (the evicted key's score it inherited, two
# low mantissa bits cleared) and two flags in those bits (bit 1 is the C++ insert's transient
# promotion-candidate mark).
COLD_WORD = -(2**31)  # no hot row, error 0, confirmed (also an empty slot's word)
NEWCOMER_BIT = 1  # placed by Space-Saving and no later batch has hit it: never medium
ERROR_BITS = 0x7FFFFFFC
ERROR_DISCOUNT = 0.5  # estimate = score - ERROR_DISCOUNT x error (the middle of Space-Saving's bounds)


def cold_words(errors: torch.Tensor, newcomer: torch.Tensor | int) -> torch.Tensor:
    """Row words [N] int32 of slots without a hot row, from float32 errors [N] and newcomer flags."""
    return (errors.view(torch.int32) & ERROR_BITS) | COLD_WORD | newcomer


def errors_of(words: torch.Tensor) -> torch.Tensor:
    """Space-Saving errors [N] float32 of row words [N] int32 (0 for hot slots)."""
    return torch.where(words < 0, (words & ERROR_BITS).view(torch.float32), 0.0)


def hot_rows_of(words: torch.Tensor) -> torch.Tensor:
    """Hot row [N] int32 of row words [N] int32 (NO_ROW without one)."""
    return torch.where(words >= 0, words, NO_ROW)


def newcomers_of(words: torch.Tensor) -> torch.Tensor:
    """[N] bool: the row word is a newcomer's (no hot row, not hit since it was placed)."""
    return (words < 0) & ((words & NEWCOMER_BIT) != 0)


def estimates_of(scores: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Estimated scores [N] float32: a slot's score less half its error, the score it would have
    had with the evicted key's share split evenly (Space-Saving only bounds it: [score - error, score])."""
    return scores - ERROR_DISCOUNT * errors_of(words)


@dataclass
class SketchState:
    """The mutable tensors of one HotSketch; kernels update them in place.

    slots [W*C, 2] int64 is an array of 16-byte slots, so a bucket of 4 is one 64-byte cache
    line: word 0 is the key, word 1 packs the float32 score (low half) and the int32 row word
    (high half; little-endian): the hot row, or the error and flags of a slot without one.
    free_rows [H] int32 is a stack whose first free_count[0] entries are free hot rows;
    total_score [1] float64 is the score inserted since the last decay.
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
    def words(self) -> torch.Tensor:
        """[W*C] int32 row words (see COLD_WORD)."""
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


@dataclass
class Lookup:
    """Rows of a batch of keys [N] in a group's block: primary (hot row, else level-1 row),
    level-2 row and medium mask (both empty without a medium level), and, from the C++
    kernel, the slot holding each key (int32, -1 absent): a hint for the insert in backward."""

    primary: torch.Tensor
    level2: torch.Tensor
    medium: torch.Tensor
    hints: Optional[torch.Tensor]
