"""Plain containers shared by the sketch kernels."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

EMPTY_TAG = 0  # tag of an unused slot (a key's tag is never 0: see tags_of)
NO_ROW = -1  # what a query and slot_rows say for a key without a hot row
FLOAT_MAX = 3.4028234663852886e38

# The row word of a slot is, with a hot row, the row (bits 0-29) and HIT_BIT (hit since the last
# rebalance): a non-negative word. Without one it is negative: the sign bit, the float32 bits of
# the slot's Space-Saving error (the evicted key's score it inherited, three low mantissa bits
# cleared) and three flags in those bits (bit 1 is the C++ insert's transient
# promotion-candidate mark).
ROW_MASK = 0x3FFFFFFF
HIT_BIT = 0x40000000
MAX_HOT_ROWS = 1 << 30
COLD_WORD = -(2**31)  # no hot row, error 0, confirmed (also an empty slot's word)
NEWCOMER_BIT = 1  # placed by Space-Saving and no later batch has hit it: never medium
RESERVED_BIT = 4  # a rebalance reserved a free row for it: it takes one at its next hit
ERROR_BITS = 0x7FFFFFF8
ERROR_DISCOUNT = 0.5  # estimate = score - ERROR_DISCOUNT x error (the middle of Space-Saving's bounds)


def tags_of(keys: torch.Tensor) -> torch.Tensor:
    """Tags [N] int32 of keys [N] int64 (non-negative 63-bit): bits 31-62, read as 1 where 0 (0
    marks an empty slot). The low 15 bits of a key name its table slot and the bucket hash mixes
    every bit, so two keys of one bucket share a tag with probability 2^-32."""
    tags = (keys >> 31).clamp(min=1)
    return (tags - ((tags >> 31) << 32)).to(torch.int32)  # the low 32 bits as a signed int32


def cold_words(errors: torch.Tensor, newcomer: torch.Tensor | int) -> torch.Tensor:
    """Row words [N] int32 of slots without a hot row, from float32 errors [N] and newcomer flags."""
    return (errors.view(torch.int32) & ERROR_BITS) | COLD_WORD | newcomer


def errors_of(words: torch.Tensor) -> torch.Tensor:
    """Space-Saving errors [N] float32 of row words [N] int32 (0 for hot slots)."""
    return torch.where(words < 0, (words & ERROR_BITS).view(torch.float32), 0.0)


def hot_rows_of(words: torch.Tensor) -> torch.Tensor:
    """Hot row [N] int32 of row words [N] int32 (NO_ROW without one)."""
    return torch.where(words >= 0, words & ROW_MASK, NO_ROW)


def newcomers_of(words: torch.Tensor) -> torch.Tensor:
    """[N] bool: the row word is a newcomer's (no hot row, not hit since it was placed)."""
    return (words < 0) & ((words & NEWCOMER_BIT) != 0)


def reserved_of(words: torch.Tensor) -> torch.Tensor:
    """[N] bool: the row word holds a reservation (no hot row yet; one is kept free for it)."""
    return (words < 0) & ((words & RESERVED_BIT) != 0)


def hit_words(words: torch.Tensor) -> torch.Tensor:
    """Row words [N] after a hit: a hot row's hit flag set, a newcomer confirmed."""
    return torch.where(words < 0, words & ~NEWCOMER_BIT, words | HIT_BIT)


def estimates_of(scores: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Estimated scores [N] float32: a slot's score less half its error, the score it would have
    had with the evicted key's share split evenly (Space-Saving only bounds it: [score - error, score])."""
    return scores - ERROR_DISCOUNT * errors_of(words)


def free_row_list(bits: torch.Tensor, capacity: int) -> torch.Tensor:
    """The free hot rows [F] int64, ascending, of a free-row bitmap [ceil(H/64)] int64."""
    shifts = torch.arange(64, device=bits.device)
    return ((bits[:, None] >> shifts) & 1).flatten()[:capacity].nonzero().flatten()


def free_row_bits(free: torch.Tensor, capacity: int) -> torch.Tensor:
    """The bitmap [ceil(H/64)] int64 whose set bits are the rows `free` [F] (distinct; bit r of
    word r // 64)."""
    bits = torch.zeros(free_words(capacity), dtype=torch.int64, device=free.device)
    return _add_row_bits_(bits, free)


def _add_row_bits_(bits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Set the bits of `rows` [R] (distinct int64, clear in `bits`) in the bitmap `bits`, in place,
    with one scatter: distinct clear bits, so adding them sets them (bit 63 too: 0 + INT64_MIN)."""
    return bits.index_add_(0, rows >> 6, torch.ones_like(rows) << (rows & 63))


def free_words(capacity: int) -> int:
    """int64 words of a free-row bitmap of `capacity` rows."""
    return (capacity + 63) // 64


@dataclass
class SketchState:
    """The mutable tensors of one HotSketch; kernels update them in place.

    slots [W*C, 3] int32 is an array of 12-byte slots: the key's tag (tags_of), the float32
    score, the int32 row word (the hot row and hit flag, or the error and flags of a slot
    without one). free_bits [ceil(H/64)] int64 is a bitmap of the free hot rows (the lowest is
    handed out first) and free_count [1] int64 their number; reserved [1] int64 counts the
    slots holding a reservation (RESERVED_BIT), each with a free row kept for it;
    total_score [1] float64 is the score inserted since the last decay.
    """

    slots: torch.Tensor
    free_bits: torch.Tensor
    free_count: torch.Tensor
    reserved: torch.Tensor
    total_score: torch.Tensor
    slots_per_bucket: int
    multiplier: int  # the bucket hash: bucket = bounded(fold(key, multiplier), W)

    @property
    def num_buckets(self) -> int:
        return self.slots.shape[0] // self.slots_per_bucket

    @property
    def tags(self) -> torch.Tensor:
        return self.slots[:, 0]

    @property
    def scores(self) -> torch.Tensor:
        return self.slots.view(torch.float32)[:, 1]

    @property
    def words(self) -> torch.Tensor:
        """[W*C] int32 row words (see COLD_WORD)."""
        return self.slots[:, 2]


def free_rows_(state: SketchState, rows: torch.Tensor) -> None:
    """Mark `rows` [R] (distinct, held: not free) free in the state's bitmap: one scatter, O(R)."""
    if rows.numel() == 0:
        return
    _add_row_bits_(state.free_bits, rows.to(state.free_bits.device, torch.int64))
    state.free_count += rows.numel()


def take_rows_(state: SketchState, n: int) -> torch.Tensor:
    """The n lowest free rows [n] int64 (n <= the free count), taken from the state's bitmap.
    Per-word popcounts find the words that hold them (O(H / 64) vector work and two host syncs:
    their count, and the nonzero words), and only those words are unpacked, so the cost does
    not grow with H / 64 x 64 when the free rows are few and scattered."""
    bits = state.free_bits
    counts = _popcounts(bits)
    words = min(int(torch.searchsorted(counts.cumsum(0), n)) + 1, bits.numel())
    held = counts[:words].nonzero().flatten()  # the words up to the n-th free row that hold any
    shifts = torch.arange(64, device=bits.device)
    set_bits = ((bits[held, None] >> shifts) & 1).bool()
    taken = (held[:, None] * 64 + shifts)[set_bits][:n]  # ascending: words, then bits, in order
    state.free_bits[:words] &= ~free_row_bits(taken, words * 64)
    state.free_count -= n
    return taken


@lru_cache(maxsize=None)
def _byte_popcounts(device: torch.device) -> torch.Tensor:
    """[256] int64: the set bits of each byte value."""
    return torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int64, device=device)


def _popcounts(bits: torch.Tensor) -> torch.Tensor:
    """Set bits [W] int64 of each word of a bitmap [W] int64."""
    return _byte_popcounts(bits.device)[bits.view(torch.uint8).long()].view(-1, 8).sum(1)


@dataclass(frozen=True)
class InsertParams:
    """Scalars that steer one insert: hot threshold, decay factor and when decay fires."""

    threshold: float
    decay: float
    decay_trigger: float  # decay when total_score exceeds this (paper: 10 x buckets x threshold)


@dataclass
class InsertResult:
    """What one insert changed, for migration and stats.

    promoted_keys / promoted_rows [P] int64: keys that got a hot row (every promotion happens in
    an insert, which has the key), in slot order; demoted_rows [D] int64: rows freed by a decay
    (in slot order) or a rebalance (weakest first), named by row: a slot holds no key.
    skipped: inputs rejected (score NaN, inf or negative); dropped: newcomers lost because every
    slot of their bucket was hot; decayed: whether a decay ran.
    """

    promoted_keys: torch.Tensor
    promoted_rows: torch.Tensor
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
