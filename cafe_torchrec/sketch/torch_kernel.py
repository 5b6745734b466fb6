"""HotSketch insert and query in plain torch ops: the CUDA path, and the spec of the semantics.

A slot holds a key's 32-bit tag (types.tags_of: a key is known by its bucket and tag), its
Space-Saving score (an upper bound) and a row word: its hot row and a hit flag, or, without
one, its error (the evicted key's score it inherited; 0 if it took an empty slot), a newcomer
flag and a reservation flag (see types.COLD_WORD). Its *estimate* is score - error / 2, the middle of
Space-Saving's bounds [score - error, score]: promotion and the medium level use the estimate,
so a key is not made hot by the score of the key it evicted.

Query: a key's hot row if it holds one (else -1), and medium = held, confirmed (not a
newcomer), no hot row, estimate >= medium_threshold.

Batched semantics (the C++ kernel implements exactly the same):
1. Inputs whose score is NaN, inf or negative are skipped (counted, never stored).
2. If total_score > decay_trigger, decay first: every hot slot whose decayed score falls below
   the threshold frees its row and becomes a confirmed slot with error 0 (and no reservation);
   all scores and errors *= decay; total_score = 0. A freed row may be reassigned in this call;
   that is safe because rows are copied after the optimizer update (see migration.py).
3. total_score += the batch's valid scores.
4. Phase A, keys present at the start of the batch: every occurrence adds its score to its
   slot, in input order (saturating at FLT_MAX); a hit confirms a newcomer's slot and sets a hot
   slot's hit flag. A slot without a row is a promotion candidate if it holds a reservation
   (the adaptive policy's rebalance, sketch/policy.py) or ends the phase with estimate >=
   threshold.
5. Every candidate holding a reservation takes a free row (one is kept free for each); the
   others take the free rows beyond the reservations, in slot order. Rows are handed out
   lowest first, in slot order; a promoted slot's score becomes its estimate (a hot slot keeps
   no error) and its hit flag is set. The others stay candidates for their next hit.
   This comes before phase B, so a key that earned its row keeps it: were rows handed out after
   it, a newcomer of the same batch could replace the candidate's slot (the minimum of its
   bucket) and inherit its score (recall of the top-10k on benchmarks.sketch_vs_official's
   DLRM step, threshold 4: 0.826 -> 0.847).
6. Phase B, keys absent at the start: their scores are summed per key and the keys are placed
   in order of first occurrence (bucket = bounded(fold(key, multiplier), W)): the first empty
   slot takes (key, s, error 0), else the minimum-score non-hot slot (lowest index on ties)
   takes (key, min + s, error min) (Space-Saving; its reservation, if any, is given up), else
   (every slot hot) the newcomer is dropped. Hot slots are never replaced and a newcomer is
   never hot on entry. A placed slot is a newcomer until a later batch hits it: until then the
   key is never medium. A slot stores the key's tag: keys of one bucket are told apart by their
   tags, and two of them share a tag with probability 2^-32 (read as one key).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from cafe_torchrec.hashing import SLOT_MASK, bounded, fold, hashed_rows
from cafe_torchrec.sketch.types import (
    COLD_WORD,
    EMPTY_TAG,
    FLOAT_MAX,
    HIT_BIT,
    NEWCOMER_BIT,
    NO_ROW,
    ROW_MASK,
    InsertParams,
    InsertResult,
    Lookup,
    SketchState,
    cold_words,
    errors_of,
    estimates_of,
    free_rows_,
    hit_words,
    hot_rows_of,
    newcomers_of,
    reserved_of,
    tags_of,
    take_rows_,
)


def decay_(state: SketchState, params: InsertParams) -> torch.Tensor:
    """Decay all scores and errors, free the rows of hot slots that fall below the threshold."""
    words = state.words
    decayed = state.scores * params.decay
    cold = (words < 0).nonzero().flatten()
    leaving = ((words >= 0) & (decayed < params.threshold)).nonzero().flatten()
    demoted_rows = (words[leaving] & ROW_MASK).long()
    cold_words_now = words[cold]
    words[cold] = cold_words(errors_of(cold_words_now) * params.decay, cold_words_now & NEWCOMER_BIT)
    if leaving.numel():
        free_rows_(state, demoted_rows)
        words[leaving] = COLD_WORD
    state.scores.copy_(decayed)
    state.total_score.zero_()
    state.reserved.zero_()  # the cold words above were rebuilt without their flags
    return demoted_rows


def find_slots(state: SketchState, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per key: its bucket's first slot index, and the slot holding its tag (-1 if absent)."""
    c = state.slots_per_bucket
    base = bounded(fold(keys, state.multiplier), state.num_buckets) * c
    cand = base[:, None] + torch.arange(c, device=keys.device)
    match = state.tags[cand] == tags_of(keys)[:, None]
    slot = torch.where(match.any(1), cand.gather(1, match.int().argmax(1, keepdim=True)).squeeze(1), -1)
    return base, slot


def insert_(
    state: SketchState,
    keys: torch.Tensor,
    scores: torch.Tensor,
    params: InsertParams,
    hints: Optional[torch.Tensor] = None,
) -> InsertResult:
    """Insert a batch of (key, score) pairs; see the module docstring for the semantics.
    `hints` are accepted for the C++ kernel's contract and not needed here."""
    device = keys.device
    empty = torch.empty(0, dtype=torch.int64, device=device)
    valid = torch.isfinite(scores) & (scores >= 0)
    skipped = int(keys.numel() - int(valid.sum()))
    demoted_rows, decayed = empty, False
    if float(state.total_score[0]) > params.decay_trigger:
        demoted_rows = decay_(state, params)
        decayed = True
    keys, scores = keys[valid], scores[valid]
    state.total_score += scores.double().sum()
    base, slot = find_slots(state, keys)
    hit = slot >= 0
    # phase A: present keys add their scores
    touched, inverse = torch.unique(slot[hit], return_inverse=True)
    added = torch.zeros(touched.numel(), dtype=torch.float32, device=device).index_add_(0, inverse, scores[hit])
    state.scores[touched] = torch.clamp(state.scores[touched] + added, max=FLOAT_MAX)
    words = state.words
    touched_words = hit_words(words[touched])
    words[touched] = touched_words
    # the key of each touched slot (the slot holds only its tag): that of any occurrence that hit it
    positions = torch.arange(int(inverse.numel()), device=device)
    first_hit = torch.full_like(touched, int(inverse.numel())).scatter_reduce_(0, inverse, positions, reduce="amin")
    touched_keys = keys[hit][first_hit]
    reserved = reserved_of(touched_words)
    ready = estimates_of(state.scores[touched], touched_words) >= params.threshold
    is_cand = (touched_words < 0) & (reserved | ready)
    cand, cand_keys, cand_reserved = touched[is_cand], touched_keys[is_cand], reserved[is_cand]
    # promotions, in slot order: before phase B, so that no newcomer of this batch replaces a slot
    # that earned its row. Every reservation is served; the other candidates share the surplus.
    surplus = int(state.free_count[0]) - int(state.reserved[0])
    others = torch.cumsum((~cand_reserved).to(torch.int64), 0)
    take = cand_reserved | (others <= surplus)
    promoted, promoted_keys = cand[take], cand_keys[take]
    rows = take_rows_(state, int(promoted.numel())) if promoted.numel() else empty
    state.reserved -= int((cand_reserved & take).sum())
    state.scores[promoted] = estimates_of(state.scores[promoted], words[promoted])
    words[promoted] = rows.to(torch.int32) | HIT_BIT
    # phase B: absent keys, coalesced, in first-occurrence order
    dropped = _place_newcomers(state, keys[~hit], scores[~hit], base[~hit])
    return InsertResult(promoted_keys, rows, demoted_rows, skipped, dropped, decayed)


def _place_newcomers(state: SketchState, keys: torch.Tensor, scores: torch.Tensor, base: torch.Tensor) -> int:
    """Phase B: bucket by bucket, round by round (one newcomer per bucket per round)."""
    if keys.numel() == 0:
        return 0
    device = keys.device
    uniq, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((uniq.numel(),), keys.numel(), dtype=torch.int64, device=device)
    first.scatter_reduce_(0, inverse, torch.arange(keys.numel(), device=device), reduce="amin")
    sums = torch.zeros(uniq.numel(), dtype=torch.float32, device=device).index_add_(0, inverse, scores)
    sums = torch.clamp(sums, max=FLOAT_MAX)  # a sum of huge scores saturates, as every score does
    order = torch.argsort(first)
    ukeys, usums, ubase = uniq[order], sums[order], base[first[order]]
    by_bucket = torch.argsort(ubase, stable=True)
    sorted_base = ubase[by_bucket]
    starts = torch.ones_like(sorted_base, dtype=torch.bool)
    starts[1:] = sorted_base[1:] != sorted_base[:-1]
    positions = torch.arange(len(by_bucket), device=device)
    group_start = torch.cummax(torch.where(starts, positions, 0), 0).values
    rank = torch.empty_like(by_bucket)
    rank[by_bucket] = positions - group_start
    # round r places the r-th newcomer of every bucket (distinct buckets: no write meets another);
    # a stable sort by round makes each round a slice, so a round costs no host sync
    by_round = torch.argsort(rank, stable=True)
    bounds = [0, *torch.cumsum(torch.bincount(rank), 0).tolist()]
    offsets = torch.arange(state.slots_per_bucket, device=device)
    dropped = torch.zeros((), dtype=torch.int64, device=device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        idx = by_round[start:end]
        k, s, slots = ukeys[idx], usums[idx], ubase[idx, None] + offsets
        kb, sb, rb = state.tags[slots], state.scores[slots], state.words[slots]
        is_empty = kb == EMPTY_TAG
        has_empty = is_empty.any(1)
        non_hot = rb < 0
        placed = has_empty | non_hot.any(1)  # else every slot is hot: dropped
        victim = torch.where(non_hot, sb, torch.inf).argmin(1)  # the minimum non-hot slot
        col = torch.where(has_empty, is_empty.int().argmax(1), victim)  # else its first empty slot
        entry = torch.arange(idx.numel(), device=device)
        evicted = sb[entry, victim]
        # a dropped newcomer's row writes its bucket's slot 0 back unchanged
        keep_tag, keep_score, keep_word = kb[entry, col], sb[entry, col], rb[entry, col]
        target = slots[entry, col]
        state.reserved -= int((placed & ~has_empty & reserved_of(rb[entry, victim])).sum())
        state.tags[target] = torch.where(placed, tags_of(k), keep_tag)
        state.scores[target] = torch.where(
            has_empty, s, torch.where(placed, torch.clamp(evicted + s, max=FLOAT_MAX), keep_score)
        )
        state.words[target] = torch.where(
            has_empty,
            torch.full_like(keep_word, COLD_WORD | NEWCOMER_BIT),
            torch.where(placed, cold_words(evicted, NEWCOMER_BIT), keep_word),
        )
        dropped += (~placed).sum()
    return int(dropped)


def query(state: SketchState, keys: torch.Tensor, medium_threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hot row per key (int64, -1 if none) and whether a non-hot key is medium (confirmed,
    estimate >= medium)."""
    _, slot = find_slots(state, keys)
    found = slot >= 0
    safe = slot.clamp(min=0)
    word = state.words[safe]
    rows = torch.where(found, hot_rows_of(word), NO_ROW).long()
    medium = found & (word < 0) & ~newcomers_of(word) & (estimates_of(state.scores[safe], word) >= medium_threshold)
    return rows, medium


def lookup(
    state: SketchState,
    keys: torch.Tensor,
    regions: torch.Tensor,
    medium_threshold: Optional[float],
    counts: Optional[torch.Tensor],
) -> Lookup:
    """Rows of each key (see types.Lookup; no hints); `counts` [T, 3] += lookups, hot and medium
    lookups per table slot. Without a medium threshold there is no level 2."""
    multi_level = medium_threshold is not None
    hot_row, medium = query(state, keys, float("inf") if medium_threshold is None else medium_threshold)
    hot = hot_row >= 0
    primary = torch.where(hot, hot_row, hashed_rows(keys, regions, 1))
    level2 = hashed_rows(keys, regions, 2) if multi_level else keys.new_empty(0)
    if counts is not None:
        slots, n = keys & SLOT_MASK, counts.shape[0]
        for column, mask in enumerate((None, hot, medium)):
            counts[:, column] += torch.bincount(slots if mask is None else slots[mask], minlength=n)
    return Lookup(primary, level2, medium if multi_level else keys.new_empty(0, dtype=torch.bool), None)
