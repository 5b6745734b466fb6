"""The adaptive hot-row policy: hot rows follow the ids with the most recent importance, with no
threshold to set per dataset.

The paper's policy (the sketch's own insert, torch_kernel.py) promotes an id when its score
reaches a fixed threshold and demotes it only when a decay, fired after a fixed score mass,
brings it below. Both constants are absolute scores tuned on Criteo: on shorter, smaller or
less skewed streams the threshold is rarely reached, decays rarely fire, and yesterday's hot
ids keep their rows. The adaptive policy counts time in occurrences (scores are normalised to
mean 1 per occurrence, so an occurrence is one unit of mass) and, before an insert, once the
occurrences since the last rebalance reach 1/`rebalances_per_horizon` of the decayed count
(every insert while that count is 0), rebalances:

1. Decays. Let q be the estimate of the k-th highest held slot (k = min(hot rows, held
   slots)): the marginal hot id. Every slot's score is multiplied by f so that, in steady
   state, q stays near `horizon` occurrences: with S the decayed occurrence count before the
   interval plus the n occurrences during it, the decay rate per occurrence is
   q / (S x horizon), and f = 2^(-j / 16) with j = round(16 n q / (S horizon ln 2)), capped at
   16 (f >= 1/2 per rebalance); the decayed count becomes S f. Counts are integers and f is
   quantised, so kernels and the reference stay bit-equal. The memory horizon is "the time
   in which the marginal hot id sees `horizon` occurrences", whatever the batch size, stream
   length, feature count or skew.
   A hot id is stale when it has not been hit over the rebalances since its last hit although
   its scores said it should have seen `stale_hits` (8) occurrences in that time (each
   rebalance adds score x (1 - f), the occurrences the decay took from it, to its count of
   occurrences due, a float16 per hot row; a hit resets it, and a hot slot's hit flag, which
   every rebalance clears, says whether one came): yesterday's popular ids after an abrupt
   drift. The stale
   rule acts in a burst, a rebalance where the hot ids that went stale in it held at least
   `stale_burst` (a tenth) of the hot score (before this decay, summed in float64), and in the
   quarter horizon after one (`stale_window` rebalances): an abrupt drift silences much of the
   hot score at once, gradual churn a trickle. There every stale hot id's score drops to 0 and
   its count restarts, so the re-ranking below gives its row to the first candidate left (a
   challenger beats 0 by any hysteresis), where its decayed score would take many horizons.
   In that window the decay also runs STALE_WINDOW_DECAY (4) times faster (its horizon is
   `stale_window_horizon`, horizon / 4): after an abrupt drift yesterday's scores say little,
   and the ids that lost popularity but still see a hit now and then (never stale) give way to
   today's. Elsewhere stale ids keep their rows, scores and counts, and lose their rows as any
   hot id does, to a challenger that beats them by the hysteresis. A live id misses 8 expected
   occurrences with probability e^-8, and then only has to earn a row again.
   Measured (docs/results.md): halving instead of zeroing took 29-42 steps to get abrupt8's hot
   share back to 90% at 1000x, zeroing 19-26. Acting on every stale id, as before the burst
   condition, made 7,875 stale demotions in 300 steps of fastflat26 at 100x, and 3,099 later
   promotions of ids it had demoted; waiting for a burst gained 1.79 AUC points there. The ids
   going stale in one rebalance held at most 4% of the hot score there (gradual26: 3.5%); in
   the first rebalance after an abrupt drift 64-73% (abrupt8 and its dim-64 twin at 1000x),
   37-42% (abrupt8 at 100x), 18% (tiny32). The faster decay in the window took
   abrupt8-dim64's recovery at 1000x from 24-44 steps of 293 to 19-24 and abrupt8's from
   22-26 to 14-21 at the same AUC (2x faster: 22-31 and 17-22).
2. Re-ranks with hysteresis. Candidates are held, confirmed (hit since placed), non-hot slots
   with estimate >= entry_score, by estimate descending (ties: lower slot first); hot slots by
   estimate ascending (ties: lower slot first). The first candidates win the free rows; then
   the next candidate c_i wins the weakest remaining hot slot h_i's row while estimate(c_i) >=
   h x estimate(h_i): h_i becomes cold (error 0, confirmed) and its row is freed. Every winner
   gets a reservation (the reservations of the last rebalance are dropped first): a row is
   kept free for it, and it takes one at its next hit, in the insert, whatever its estimate
   then. A slot holds a key's tag, not the key, and the key is what locates the id's hashed
   rows, which its new row starts from (migration.py); the insert has it. Until then the id is
   served from its hashed rows, as it was. A promoted slot keeps its estimate as its score and
   no error, as in the insert. h is `hysteresis` (3), and `window_hysteresis` (hysteresis / 2, at least 1) where
   the stale rule acts (a burst and its window). A swap throws away a trained row, so in steady
   state a challenger must be clearly ahead: at the margin of a stationary stream the
   estimates of ids of close popularity cross back and forth with sampling noise. After a
   drift today's ids are clearly ahead and should not wait. Measured (docs/results.md): on the
   flat, stationary dev stream at 1000x, 3 instead of 1.5 gained 0.32 validation AUC points;
   3 everywhere slowed abrupt8's recovery to 0.11 day, 3 only outside a burst kept it at
   14-21 steps of 293.
3. Sets the medium level (CAFE-ML): medium_share x max(q f, entry_score).

Between rebalances the insert runs with threshold = entry_score (an id takes a free row beyond
the reservations on a later batch's hit once its estimate reaches it) and never decays by score
mass. Demotion
happens only here, so a hot id keeps its row until a challenger beats it by the hysteresis
factor, and an abrupt drift is caught within a few horizons of the marginal id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from cafe_torchrec.sketch.types import (
    COLD_WORD,
    EMPTY_TAG,
    HIT_BIT,
    NEWCOMER_BIT,
    RESERVED_BIT,
    ROW_MASK,
    InsertResult,
    SketchState,
    cold_words,
    errors_of,
    estimates_of,
    free_rows_,
    newcomers_of,
)

MARK_MAX = 65504.0  # the largest finite float16: a stale mark's ceiling
MAX_STALE_HITS = 2048.0  # float16 counts exactly in steps of 1 below it
DECAY_STEPS = 16  # f = 2^(-j / DECAY_STEPS), j in [0, DECAY_STEPS]
STALE_HITS = 8.0  # default stale_hits: a hot id expected to see this many occurrences and seeing none is stale
STALE_BURST = 0.1  # default stale_burst: the share of the hot score going stale in one rebalance that marks a drift
STALE_FACTOR = 0.0  # a stale hot id's score is multiplied by this: it loses its row at once
STALE_WINDOW_DECAY = 4.0  # in the window after a burst, the decay runs this many times faster
STALE_WINDOW_MARGIN = 2.0  # in a burst and its window, a challenger needs this many times less margin


@dataclass(frozen=True)
class AdaptivePolicy:
    """Constants of the adaptive policy (see the module docstring); scale-free by design."""

    horizon: float = 32.0
    hysteresis: float = 3.0
    entry_score: float = 2.0
    rebalances_per_horizon: int = 16
    medium_share: Optional[float] = None  # None: no medium level
    # inf turns the stale rule off: it frees yesterday's rows at once after an abrupt drift
    stale_hits: float = STALE_HITS
    # 0: the stale rule acts on any stale id (and each time opens the window of faster decay)
    stale_burst: float = STALE_BURST

    def validate(self, where: str = "AdaptivePolicy") -> None:
        if not self.horizon > 0:
            raise ValueError(f"{where}: horizon must be > 0, got {self.horizon}")
        if not self.hysteresis >= 1:
            raise ValueError(f"{where}: hysteresis must be >= 1, got {self.hysteresis}")
        if not self.entry_score > 0:
            raise ValueError(f"{where}: entry_score must be > 0, got {self.entry_score}")
        if self.rebalances_per_horizon < 1:
            raise ValueError(f"{where}: rebalances_per_horizon must be >= 1, got {self.rebalances_per_horizon}")
        if self.medium_share is not None and not 0 < self.medium_share <= 1:
            raise ValueError(f"{where}: medium_share must be in (0, 1], got {self.medium_share}")
        if not (0 < self.stale_hits <= MAX_STALE_HITS or self.stale_hits == math.inf):  # NaN fails too
            raise ValueError(
                f"{where}: stale_hits must be in (0, {MAX_STALE_HITS:g}] (a float16 count; inf: no stale rule), "
                f"got {self.stale_hits}"
            )
        if not 0 <= self.stale_burst <= 1:  # NaN fails too
            raise ValueError(f"{where}: stale_burst must be in [0, 1], got {self.stale_burst}")

    @property
    def stale_window(self) -> int:
        """Rebalances after a burst in which the stale rule still acts: a quarter horizon."""
        return max(1, self.rebalances_per_horizon // 4)

    @property
    def stale_window_horizon(self) -> float:
        """The memory horizon in those rebalances: scores decay STALE_WINDOW_DECAY times faster."""
        return self.horizon / STALE_WINDOW_DECAY

    @property
    def window_hysteresis(self) -> float:
        """The hysteresis in a burst and its window: STALE_WINDOW_MARGIN times less, at least 1."""
        return max(1.0, self.hysteresis / STALE_WINDOW_MARGIN)

    def due(self, occurrences_since: int, decayed_occurrences: float) -> bool:
        """Whether a rebalance runs before the next insert."""
        return occurrences_since > 0 and occurrences_since * self.rebalances_per_horizon >= decayed_occurrences


def decay_exponent(since: float, before: float, marginal: float, horizon: float) -> int:
    """j of the decay factor 2^(-j / 16) (module docstring, step 1)."""
    total = before + since
    if not (marginal > 0 and total > 0 and since > 0):
        return 0
    rate = since * marginal / (total * horizon)
    # clamped to DECAY_STEPS before the int (the C++ op clamps the rounded double: the same): a
    # huge rate (scores near FLT_MAX) must not overflow
    return int(round(min(float(DECAY_STEPS), DECAY_STEPS * rate / math.log(2))))


def decay_factor(exponent: int) -> float:
    """2^(-exponent / 16) rounded to float32, the factor the scores are multiplied by."""
    return float(torch.tensor(2.0 ** (-exponent / DECAY_STEPS), dtype=torch.float32))


def marginal_estimate(estimates: torch.Tensor, held: torch.Tensor, capacity: int) -> float:
    """The k-th highest estimate of the held slots, k = min(capacity, held); 0 if none."""
    values = estimates[held]
    k = min(capacity, int(values.numel()))
    if k == 0:
        return 0.0
    return float(torch.topk(values, k, sorted=False).values.min())


def rebalance_(
    state: SketchState,
    policy: AdaptivePolicy,
    capacity: int,
    decayed: torch.Tensor,
    since: torch.Tensor,
    marks: torch.Tensor,
    window: torch.Tensor,
) -> Tuple[InsertResult, float]:
    """Steps 1 and 2 of the module docstring on `state` in place. `decayed` (float64 [1]: the
    decayed occurrence count before this interval) becomes (before + since) f, `since` (int64
    [1]: occurrences during it) becomes 0, `marks` (float16 [hot rows]: each hot row's
    occurrences due since its last hit) takes the values after this one, `window` (int64 [1]:
    rebalances left in the stale rule's window) too. Returns the demotions (a rebalance
    promotes nothing itself: it reserves rows, see reserve_) and the marginal estimate after
    the decay (for the medium level)."""
    tags, words, scores = state.tags, state.words, state.scores
    held = tags != EMPTY_TAG
    q = marginal_estimate(estimates_of(scores, words), held, capacity)
    before, count = float(decayed[0]), int(since[0])
    horizon = policy.stale_window_horizon if int(window[0]) > 0 else policy.horizon
    f = decay_factor(decay_exponent(count, before, q, horizon))
    hot_now = (words >= 0).nonzero().flatten()
    hot_words = words[hot_now]
    hot_rows = (hot_words & ROW_MASK).long()
    missed = (hot_words & HIT_BIT) == 0  # no hit since the last rebalance
    owed = marks[hot_rows].float()
    # every rule reads the stored float16 count, capped at float16's largest finite value (an
    # infinite count would reach stale_hits = inf)
    due = torch.where(missed, owed + scores[hot_now] * (1.0 - f), torch.zeros_like(owed))
    due = due.clamp(max=MARK_MAX).half().float()
    newly_stale = missed & (due >= policy.stale_hits) & (owed < policy.stale_hits)
    # the masses (a host loop) only where an id went stale, as in few rebalances
    burst = bool(newly_stale.any()) and _sequential_sum(
        scores[hot_now][newly_stale]
    ) >= policy.stale_burst * _sequential_sum(scores[hot_now])
    act = burst or int(window[0]) > 0
    stale = due >= policy.stale_hits if act else torch.zeros_like(missed)
    window.fill_(policy.stale_window if burst else max(int(window[0]) - 1, 0))
    words[hot_now] = hot_words & ROW_MASK  # hit flags restart
    cold = (words < 0).nonzero().flatten()
    words[cold] = words[cold] & ~RESERVED_BIT  # reservations are made afresh below
    if f < 1.0:
        scale_(state, f)
    scores[hot_now[stale]] = scores[hot_now[stale]] * STALE_FACTOR
    due = torch.where(stale, torch.zeros_like(due), due)
    marks[hot_rows] = due.half()
    decayed.fill_((before + count) * f)
    since.zero_()
    estimates = estimates_of(state.scores, words)
    hot = words >= 0
    candidates = (held & ~hot & ~newcomers_of(words) & (estimates >= policy.entry_score)).nonzero().flatten()
    candidates = candidates[_order(estimates[candidates], descending=True)]
    hot_slots = hot.nonzero().flatten()
    hot_slots = hot_slots[_order(estimates[hot_slots], descending=False)]
    fill = min(int(candidates.numel()), int(state.free_count[0]))
    challengers = candidates[fill:]
    pairs = min(int(challengers.numel()), int(hot_slots.numel()))
    hysteresis = policy.window_hysteresis if act else policy.hysteresis
    wins = estimates[challengers[:pairs]] >= hysteresis * estimates[hot_slots[:pairs]]
    swaps = int(torch.cumprod(wins.to(torch.int64), 0).sum()) if pairs else 0
    result = reserve_(state, hot_slots[:swaps], candidates[: fill + swaps])
    result.decayed = f < 1.0
    return result, q * f


def scale_(state: SketchState, factor: float) -> None:
    """Every score, and the Space-Saving error of every slot without a hot row, times `factor`."""
    words = state.words
    cold = (words < 0).nonzero().flatten()
    cold_now = words[cold]
    words[cold] = cold_words(errors_of(cold_now) * factor, cold_now & NEWCOMER_BIT)
    state.scores.mul_(factor)


def reserve_(state: SketchState, demote: torch.Tensor, reserve: torch.Tensor) -> InsertResult:
    """Demote the hot slots `demote` (each turns cold, confirmed, error 0; its row is freed) and
    reserve a free row for each slot of `reserve`: it takes one at its next hit, in the insert,
    which has the key that a promotion needs (to copy the id's hashed rows) and a slot does not
    hold. Returns the demotions."""
    words = state.words
    demoted_rows = (words[demote] & ROW_MASK).long()
    words[demote] = COLD_WORD
    free_rows_(state, demoted_rows)
    words[reserve] = words[reserve] | RESERVED_BIT
    state.reserved.fill_(int(reserve.numel()))
    empty = torch.empty(0, dtype=torch.int64, device=words.device)
    return InsertResult(empty, empty, demoted_rows, 0, 0, False)


def _sequential_sum(values: torch.Tensor) -> float:
    """The float64 sum of `values` added one at a time in order, as the C++ op and the reference
    add them (a reduction's order would differ in the last bits, and a burst can hinge on them)."""
    total = 0.0
    for value in values.double().tolist():
        total += value
    return total


def _order(values: torch.Tensor, descending: bool) -> torch.Tensor:
    """A stable sort order of `values` (ties keep slot order)."""
    return torch.sort(values, descending=descending, stable=True).indices
