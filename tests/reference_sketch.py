"""A plain sequential HotSketch, written for clarity: the reference the kernels must equal.

Per batch, in the documented order: decay check; present keys add each occurrence's score;
candidates (present keys holding a reservation, or whose estimate reached the threshold) get
free rows in slot order, the lowest free row first; absent keys, summed, take an empty or the
minimum non-hot slot in first-occurrence order. A slot's estimate is its score less half its
error (the evicted key's score it inherited). A slot holds a key's 32-bit tag, not the key.

With `adaptive` (cafe_torchrec/sketch/policy.py, written again here from its docstring): the
insert's threshold is the entry score and it never decays; before an insert, when the
occurrences since the last rebalance reach 1/rebalances_per_horizon of the decayed count,
a rebalance decays every score by a quantised factor, re-ranks hot and candidate slots, frees
the losers' rows and reserves a row for each winner, which takes it at its next hit.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

from cafe_torchrec.hashing import bounded_int, fold_int, odd_multiplier

EMPTY = 0  # the tag of an empty slot
NO_ROW = -1
FLT_MAX = 3.4028234663852886e38


def f32(x: float) -> float:
    """Round to float32 like the kernels do."""
    return struct.unpack("f", struct.pack("f", min(x, FLT_MAX)))[0]


def f16(x: float) -> float:
    """Round a float32 value of at most 65504 (float16's largest) to float16 (nearest, ties to even)."""
    return struct.unpack("e", struct.pack("e", x))[0]


def error32(x: float) -> float:
    """A float32 error as the slot stores it: its three low mantissa bits hold flags."""
    return struct.unpack("f", struct.pack("I", struct.unpack("I", struct.pack("f", x))[0] & 0x7FFFFFF8))[0]


def tag(key: int) -> int:
    """A key's tag as a signed int32: bits 31-62 of the key, 1 where they are 0."""
    t = max(key >> 31, 1) & 0xFFFFFFFF
    return t - (1 << 32) if t >= 1 << 31 else t


@dataclass
class ReferenceSketch:
    num_buckets: int
    slots: int
    capacity: int
    threshold: float
    decay: float
    trigger: float
    seed: int
    tags: List[int] = field(default_factory=list)
    scores: List[float] = field(default_factory=list)
    rows: List[int] = field(default_factory=list)  # hot row or NO_ROW
    errors: List[float] = field(default_factory=list)  # Space-Saving error (0 for hot slots)
    newcomer: List[bool] = field(default_factory=list)  # placed, not hit by a later batch: never medium
    hit: List[bool] = field(default_factory=list)  # hot, and hit since the last rebalance
    reserved: List[bool] = field(default_factory=list)  # a free row is kept for its next hit
    free: Set[int] = field(default_factory=set)
    total: float = 0.0
    adaptive: Optional[Any] = None  # an AdaptivePolicy (its fields and stale-window properties are read)
    decayed: float = 0.0  # adaptive: decayed occurrence count before the current interval
    window: int = 0  # adaptive: rebalances left in the stale rule's window after a burst
    since: int = 0  # adaptive: occurrences since the last rebalance
    medium: float = float("inf")  # adaptive: the medium level the last rebalance set
    marks: Dict[int, float] = field(default_factory=dict)  # adaptive: hot row -> occurrences due (float16)

    def __post_init__(self) -> None:
        self.threshold = f32(self.threshold)  # the kernels compare against float32 settings
        n = self.num_buckets * self.slots
        self.tags, self.scores, self.rows = [EMPTY] * n, [0.0] * n, [NO_ROW] * n
        self.errors, self.newcomer, self.hit, self.reserved = [0.0] * n, [False] * n, [False] * n, [False] * n
        self.free = set(range(self.capacity))

    @property
    def reservations(self) -> int:
        return sum(self.reserved)

    @property
    def free_list(self) -> List[int]:
        return sorted(self.free)

    def bucket(self, key: int) -> int:
        return bounded_int(fold_int(key, odd_multiplier(self.seed)), self.num_buckets)

    def insert_batch(self, keys: List[int], scores: List[float]) -> Tuple[List[int], List[int], List[int]]:
        """Returns (promoted keys, promoted rows, demoted rows)."""
        demoted: List[int] = []
        if self.adaptive is not None:
            self.threshold, self.trigger = self.adaptive.entry_score, float("inf")
            if self.since > 0 and self.since * self.adaptive.rebalances_per_horizon >= self.decayed:
                demoted = self._rebalance()
        elif self.total > self.trigger:
            demoted = self._decay()
        valid = [(k, s) for k, s in zip(keys, scores) if s == s and abs(s) != float("inf") and s >= 0]
        self.since += len(valid)
        present = {k for k, _ in valid if self._slot_of(k) is not None}
        for _, s in valid:
            self.total += s
        # phase A: present keys, occurrence by occurrence
        touched: Dict[int, int] = {}  # slot -> the first key that hit it
        for k, s in valid:
            if k in present:
                j = self._slot_of(k)
                assert j is not None
                if self.rows[j] >= 0:
                    self.hit[j] = True
                self.newcomer[j] = False  # a hit confirms a newcomer
                self.scores[j] = f32(self.scores[j] + s)
                touched.setdefault(j, k)
        # candidates get free rows in slot order, before phase B can replace their slots: every
        # reservation, then the free rows beyond the reservations
        promoted_keys, promoted_rows = [], []
        surplus, taken = len(self.free) - self.reservations, 0
        for j in sorted(touched):
            if self.rows[j] != NO_ROW or not (self.reserved[j] or self.estimate(j) >= self.threshold):
                continue
            if not (self.free if self.reserved[j] else taken < surplus):
                continue
            taken += not self.reserved[j]
            self.scores[j], self.errors[j] = self.estimate(j), 0.0  # a hot slot keeps its estimate
            self.rows[j] = min(self.free)
            self.free.remove(self.rows[j])
            self.hit[j], self.reserved[j] = True, False
            promoted_keys.append(touched[j])
            promoted_rows.append(self.rows[j])
        # phase B: absent keys, summed, in first-occurrence order
        sums: Dict[int, float] = {}
        for k, s in valid:
            if k not in present:
                sums[k] = f32(sums.get(k, 0.0) + s)
        for k, s in sums.items():
            self._place(k, s)
        return promoted_keys, promoted_rows, demoted

    def _rebalance(self) -> List[int]:
        """The adaptive policy's decay, re-ranking and reservations; returns the demoted rows."""
        policy = self.adaptive
        held = [j for j in range(len(self.tags)) if self.tags[j] != EMPTY]
        ranked = sorted((self.estimate(j) for j in held), reverse=True)
        k = min(self.capacity, len(held))
        q = ranked[k - 1] if k else 0.0
        total = self.decayed + self.since
        steps = 0
        if q > 0 and total > 0 and self.since > 0:
            # clamped before rounding, as the kernels do: a huge rate must not overflow
            horizon = policy.stale_window_horizon if self.window > 0 else policy.horizon  # a drift's window
            steps = int(round(min(16.0, 16 * (self.since * q / (total * horizon)) / math.log(2))))
        f = f32(2.0 ** (-steps / 16))
        due: Dict[int, float] = {}  # hot row -> occurrences due since its last hit, as stored (float16)
        hits = f32(policy.stale_hits)  # the kernels compare in float32
        newly_stale, hot_mass, stale_mass = 0, 0.0, 0.0  # scores before the decay, summed in float64
        hot_ids = [j for j in range(len(self.tags)) if self.rows[j] >= 0]
        for j in hot_ids:
            owed = self.marks.get(self.rows[j], 0.0)
            missed = not self.hit[j]
            due[self.rows[j]] = f16(min(f32(owed + f32(self.scores[j] * f32(1.0 - f))), 65504.0)) if missed else 0.0
            now_stale = missed and due[self.rows[j]] >= hits and owed < hits
            newly_stale += now_stale
            hot_mass += self.scores[j]
            stale_mass += self.scores[j] if now_stale else 0.0
            self.hit[j] = False
        self.reserved = [False] * len(self.tags)  # reservations are made afresh below
        burst = newly_stale > 0 and stale_mass >= policy.stale_burst * hot_mass  # an abrupt drift
        act = burst or self.window > 0
        self.window = policy.stale_window if burst else max(self.window - 1, 0)
        stale = [j for j in hot_ids if due[self.rows[j]] >= hits] if act else []
        if f < 1.0:
            for j in range(len(self.tags)):
                self.scores[j] = f32(self.scores[j] * f)
                self.errors[j] = error32(f32(self.errors[j] * f))
        for j in stale:  # a stale hot id's score drops to zero
            self.scores[j] = f32(self.scores[j] * 0.0)
            due[self.rows[j]] = 0.0
        self.marks = dict(due)
        self.decayed, self.since = total * f, 0
        candidates = sorted(
            (
                j
                for j in held
                if self.rows[j] == NO_ROW and not self.newcomer[j] and self.estimate(j) >= f32(policy.entry_score)
            ),
            key=lambda j: (-self.estimate(j), j),
        )
        hot = sorted(hot_ids, key=lambda j: (self.estimate(j), j))
        fill = min(len(candidates), len(self.free))
        winners = candidates[:fill]
        demoted = []
        hysteresis = policy.window_hysteresis if act else policy.hysteresis  # less margin after a drift
        for c, h in zip(candidates[fill:], hot):
            if not self.estimate(c) >= f32(f32(hysteresis) * self.estimate(h)):
                break
            winners.append(c)
            demoted.append(self.rows[h])
            self.free.add(self.rows[h])
            self.rows[h], self.errors[h], self.newcomer[h] = NO_ROW, 0.0, False
        for c in winners:
            self.reserved[c] = True
        if policy.medium_share is not None:
            self.medium = f32(policy.medium_share * max(q * f, policy.entry_score))
        return demoted

    def _slot_of(self, key: int) -> Optional[int]:
        base = self.bucket(key) * self.slots
        for j in range(base, base + self.slots):
            if self.tags[j] == tag(key):
                return j
        return None

    def _place(self, key: int, score: float) -> None:
        base = self.bucket(key) * self.slots
        slots = range(base, base + self.slots)
        for j in slots:
            if self.tags[j] == EMPTY:
                self.tags[j], self.scores[j], self.errors[j], self.newcomer[j] = tag(key), score, 0.0, True
                return
        victims = [j for j in slots if self.rows[j] < 0]  # any slot without a hot row
        if victims:
            j = min(victims, key=lambda v: (self.scores[v], v))
            evicted = self.scores[j]
            self.tags[j], self.scores[j], self.errors[j], self.newcomer[j] = (
                tag(key),
                f32(evicted + score),
                error32(evicted),
                True,
            )
            self.reserved[j] = False  # the replaced key's reservation is given up

    def _decay(self) -> List[int]:
        demoted = []
        for j in range(len(self.tags)):
            d = f32(self.scores[j] * f32(self.decay))
            if self.rows[j] >= 0 and d < self.threshold:
                demoted.append(self.rows[j])
                self.free.add(self.rows[j])
                self.rows[j], self.newcomer[j] = NO_ROW, False
            self.scores[j] = d
            self.errors[j] = error32(f32(self.errors[j] * f32(self.decay)))
            self.reserved[j] = False
        self.total = 0.0
        return demoted

    def query(self, key: int) -> Tuple[int, float]:
        """(hot row or -1, score or 0.0)"""
        j = self._slot_of(key)
        return (max(self.rows[j], NO_ROW), self.scores[j]) if j is not None else (NO_ROW, 0.0)

    def estimate(self, j: int) -> float:
        """Slot j's score less half its error."""
        return f32(self.scores[j] - 0.5 * self.errors[j])

    def is_medium(self, key: int, medium_threshold: float) -> bool:
        """Held, confirmed, without a hot row, and estimated at least the medium threshold."""
        j = self._slot_of(key)
        return (
            j is not None and self.rows[j] == NO_ROW and not self.newcomer[j] and self.estimate(j) >= medium_threshold
        )
