"""HotSketch: one-pass importance tracking with a bitmap of free hot rows (CAFE, SIGMOD'24 §3.2)."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from cafe_torchrec.hashing import MAX_BOUND, odd_multiplier
from cafe_torchrec.ops import KERNELS, resolve_kernel
from cafe_torchrec.sketch import cpp_kernel, torch_kernel
from cafe_torchrec.sketch.policy import AdaptivePolicy, rebalance_
from cafe_torchrec.sketch.types import (
    COLD_WORD,
    EMPTY_TAG,
    MAX_HOT_ROWS,
    InsertParams,
    InsertResult,
    Lookup,
    SketchState,
    errors_of,
    estimates_of,
    free_row_bits,
    free_row_list,
    free_words,
    hot_rows_of,
    newcomers_of,
    reserved_of,
)

SLOT_BYTES = 12  # int32 tag + float32 score + int32 row word (hot row and hit flag, or error and flags)
FREE_ROW_BYTES = 1 / 8  # a bit of the free-row bitmap
ROW_MARK_BYTES = 2  # the adaptive policy's float16 per hot row: occurrences due since its last hit


# floating bookkeeping buffers whose dtype the kernels fix (a module-wide cast must not change it)
_KEPT_DTYPES = ("total_score", "medium_level", "decayed_occurrences", "row_marks")


class HotSketch(nn.Module):
    """W buckets of C slots (key tag, score, hot row) plus a bitmap of free hot rows.

    Keys are non-negative 63-bit hashes (see ``hashing.mix64``); a slot holds a key's 32-bit tag
    (types.tags_of: bits 31-62), so a key is known by its bucket and tag: 12 bytes a slot,
    where the key itself would take 16. Keys must be uniform hashes: raw ids below 2^31 all
    share tag 1 and would be one key per bucket. ``insert`` adds a batch of
    importance scores and hands out hot rows to keys whose score reaches ``threshold``;
    ``query`` tells, per key, its hot row (or -1) and whether it is medium (score at least
    ``medium_threshold`` without a row, and hit again since it entered: see torch_kernel, for
    multi-level hashing); ``lookup`` turns keys into the rows of a group's block (hot row, or
    hashed rows). All state is in buffers, so ``state_dict`` round-trips it exactly.

    ``kernel`` ('auto', 'cpp', 'torch'; see ops.resolve_kernel) is resolved once for the device
    the sketch lives on: the C++ kernel on CPU when it loads, else the torch-ops kernel; both
    implement the semantics in ``torch_kernel``.
    """

    slots: torch.Tensor
    free_bits: torch.Tensor
    free_count: torch.Tensor
    reserved: torch.Tensor
    total_score: torch.Tensor
    seed: torch.Tensor
    medium_level: torch.Tensor
    decayed_occurrences: torch.Tensor
    occurrences_since: torch.Tensor
    stale_window: torch.Tensor
    row_marks: torch.Tensor
    initialized: torch.Tensor

    def __init__(
        self,
        hot_capacity: int,
        threshold: Optional[float] = None,
        num_buckets: Optional[int] = None,
        slots_per_bucket: int = 4,
        medium_threshold: Optional[float] = None,
        decay: float = 0.98,
        decay_trigger: float = 10.0,
        seed: int = 0,
        device: Optional[torch.device] = None,
        kernel: str = "auto",
        adaptive: Optional[AdaptivePolicy] = None,
    ) -> None:
        super().__init__()
        num_buckets = hot_capacity if num_buckets is None else num_buckets
        if adaptive is not None:  # the policy replaces the fixed threshold, decay and medium level
            if threshold is not None or medium_threshold is not None:
                raise ValueError("an adaptive HotSketch takes no threshold or medium_threshold (see AdaptivePolicy)")
            adaptive.validate()
            threshold, decay_trigger = adaptive.entry_score, math.inf
        elif threshold is None:
            raise ValueError("HotSketch needs a threshold, or an AdaptivePolicy")
        _check_config(
            hot_capacity, threshold, num_buckets, slots_per_bucket, medium_threshold, decay, decay_trigger, kernel
        )
        self.hot_capacity = hot_capacity
        assert threshold is not None  # set above for both policies
        self.threshold = float(threshold)
        self.adaptive = adaptive
        self._has_medium = medium_threshold is not None or (adaptive is not None and adaptive.medium_share is not None)
        first_medium = medium_threshold if adaptive is None else (adaptive.medium_share or 1.0) * adaptive.entry_score
        self._first_medium = float(first_medium) if self._has_medium and first_medium is not None else math.inf
        self.decay = float(decay)
        self.slots_per_bucket = slots_per_bucket
        self.requested_kernel = kernel
        self._resolved: Optional[Tuple[torch.device, str]] = None  # (device, kernel)
        self._decay_trigger_factor = float(decay_trigger)
        slots = num_buckets * slots_per_bucket
        self.register_buffer("slots", _empty_slots(slots, device))
        self.register_buffer("free_bits", _all_free(hot_capacity, device))
        self.register_buffer("free_count", torch.tensor([hot_capacity], dtype=torch.int64, device=device))
        # slots holding a reservation (the adaptive policy's rebalance), one free row kept for each
        self.register_buffer("reserved", torch.zeros(1, dtype=torch.int64, device=device))
        self.register_buffer("total_score", torch.zeros(1, dtype=torch.float64, device=device))
        self.register_buffer("seed", torch.tensor([seed], dtype=torch.int64, device=device))
        # the medium level (inf without one): fixed, or set by the adaptive policy at each rebalance
        self.register_buffer("medium_level", torch.tensor([self._first_medium], dtype=torch.float32, device=device))
        # adaptive policy: the decayed occurrence count before the current interval, occurrences since
        self.register_buffer("decayed_occurrences", torch.zeros(1, dtype=torch.float64, device=device))
        self.register_buffer("occurrences_since", torch.zeros(1, dtype=torch.int64, device=device))
        # adaptive policy: rebalances left in the stale rule's window after a burst (sketch/policy.py)
        self.register_buffer("stale_window", torch.zeros(1, dtype=torch.int64, device=device))
        # adaptive policy: each hot row's occurrences due since its last hit (sketch/policy.py)
        self.register_buffer(
            "row_marks",
            torch.zeros(hot_capacity if adaptive is not None else 0, dtype=torch.float16, device=device),
        )
        # 0 after DistributedModelParallel materialises meta buffers as zeros: re-initialise lazily
        self.register_buffer("initialized", torch.ones(1, dtype=torch.int64, device=device))
        self._seed = seed
        self._configured_seed = seed
        self._ready = False

    @property
    def num_buckets(self) -> int:
        return self.slots.shape[0] // self.slots_per_bucket

    @property
    def slot_tags(self) -> torch.Tensor:
        """[W*C] int32 view of the slot tags (0 = empty; types.tags_of)."""
        return self.state().tags

    @property
    def slot_scores(self) -> torch.Tensor:
        """[W*C] float32 view of the slot scores."""
        return self.state().scores

    @property
    def slot_rows(self) -> torch.Tensor:
        """[W*C] int32 hot row per slot (-1 = none), decoded from the row words (a copy)."""
        return hot_rows_of(self.state().words)

    @property
    def slot_errors(self) -> torch.Tensor:
        """[W*C] float32 Space-Saving error per slot: the evicted key's score it inherited (0 if hot)."""
        return errors_of(self.state().words)

    @property
    def slot_newcomers(self) -> torch.Tensor:
        """[W*C] bool: the slot was placed by Space-Saving and no later batch has hit it."""
        return newcomers_of(self.state().words)

    @property
    def slot_reserved(self) -> torch.Tensor:
        """[W*C] bool: the slot holds a reservation (a free row is kept for its next hit)."""
        return reserved_of(self.state().words)

    @torch.no_grad()
    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """The slot holding each key [N] int64 (-1 if absent)."""
        _check_keys(keys, signs=True)
        self._ensure_ready()
        return torch_kernel.find_slots(self.state(), keys)[1]

    @torch.no_grad()
    def top_k(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The k held slots ranked highest, and their estimated scores: confirmed slots by
        estimate, then newcomers (most of a newcomer's score is the evicted key's); empty slots
        never. A slot holds a tag, not a key: `find` names the slot of a key."""
        self._ensure_ready()
        state = self.state()
        held = (state.tags != EMPTY_TAG).nonzero().flatten()
        words = state.words[held]
        estimates = estimates_of(state.scores[held], words)
        newcomer = newcomers_of(words)
        order = torch.argsort(estimates, descending=True, stable=True)
        order = order[torch.argsort(newcomer[order].to(torch.int8), stable=True)][:k]
        return held[order], estimates[order]

    @property
    def medium_threshold(self) -> Optional[float]:
        """The medium level (CAFE-ML), None without one: the adaptive policy moves it (in the
        `medium_level` buffer); the paper's is this config's threshold x medium_share, whatever
        a checkpoint held."""
        if not self._has_medium:
            return None
        return float(self.medium_level[0]) if self.adaptive is not None else self._first_medium

    @property
    def decay_trigger(self) -> float:
        return self._decay_trigger_factor * self.num_buckets * self.threshold

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "HotSketch":
        """As nn.Module's, but a dtype cast of the module (`.half()`, `.double()`, `.to(dtype)`)
        leaves the policy's bookkeeping at its own dtypes and values: the kernels need them so,
        and a float16 round trip would change a score or the medium level. Device moves and
        `to_empty` apply as usual."""
        before: Dict[str, torch.Tensor] = {name: getattr(self, name) for name in _KEPT_DTYPES}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new: torch.Tensor = getattr(self, name)
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def reset_state(self) -> None:
        """Empty the sketch and free every hot row (the constructor's state)."""
        with torch.no_grad():
            self.slots.copy_(_empty_slots(self.slots.shape[0], self.slots.device))
            self.free_bits.copy_(_all_free(self.hot_capacity, self.slots.device))
            self.free_count.fill_(self.hot_capacity)
            self.reserved.zero_()
            self.total_score.zero_()
            self.medium_level.fill_(self._first_medium)
            self.decayed_occurrences.zero_()
            self.occurrences_since.zero_()
            self.stale_window.zero_()
            self.row_marks.zero_()
            self.seed.fill_(self._configured_seed)
            self.initialized.fill_(1)
        self._seed = self._configured_seed

    @property
    def multiplier(self) -> int:
        """The bucket hash's multiplier (from the `seed` buffer): bucket = bounded(fold(key, m), W)."""
        return odd_multiplier(self._seed)

    def prepare(self) -> None:
        """Initialise lazily if DistributedModelParallel zero-filled the buffers; call before
        handing the raw buffers to a kernel."""
        self._ensure_ready()

    def _ensure_ready(self) -> None:
        if not self._ready:
            if self.slots.device.type == "meta":
                raise RuntimeError("HotSketch is on the meta device; materialise it before use")
            if int(self.initialized[0]) == 0:
                self.reset_state()
            self._seed = int(self.seed[0])  # the buffer may have been loaded in place (dcp.load)
            self._ready = True

    def state(self) -> SketchState:
        """The buffers as a kernel argument."""
        return SketchState(
            self.slots,
            self.free_bits,
            self.free_count,
            self.reserved,
            self.total_score,
            self.slots_per_bucket,
            self.multiplier,
        )

    @property
    def kernel(self) -> str:
        """'cpp' or 'torch': the kernel this sketch runs on its device (resolved once per device)."""
        device = self.slots.device
        if self._resolved is None or self._resolved[0] != device:
            self._resolved = (device, resolve_kernel(self.requested_kernel, device))
        return self._resolved[1]

    def _kernel_for(self, keys: torch.Tensor):
        if keys.device != self.slots.device:
            raise ValueError(f"keys are on {keys.device}, the sketch on {self.slots.device}")
        return cpp_kernel if self.kernel == "cpp" else torch_kernel

    @torch.no_grad()
    def insert(self, keys: torch.Tensor, scores: torch.Tensor, hints: Optional[torch.Tensor] = None) -> InsertResult:
        """Add a batch of (key, score) pairs; scores NaN, inf or negative are skipped and counted.

        `hints` [N] int32 (optional): the slot a lookup found each key in (-1 if absent), the
        same for every occurrence of a key, as a lookup gives them; the C++ kernel verifies and
        uses them to skip re-probing. Results do not depend on them.
        Every input is checked before the sketch's state changes, a due rebalance included (a
        fresh sketch's lazy initialisation aside). The decay
        trigger (paper policy) compares a float64 running total whose last bits depend on the
        kernel's summation order: a total within an ulp of the trigger may decay a batch apart.
        """
        kernel = self._kernel_for(keys)
        self._ensure_ready()
        due = self._rebalance_due()
        # the C++ insert checks signs in its first pass, but a due rebalance runs before it
        _check_keys(keys, signs=kernel is torch_kernel or due)
        if scores.shape != keys.shape or not scores.is_floating_point() or scores.device != keys.device:
            raise ValueError(
                f"scores must be a float tensor shaped like keys {tuple(keys.shape)} on {keys.device}, "
                f"got {scores.dtype} {tuple(scores.shape)} on {scores.device}"
            )
        if (
            hints is not None
            and hints.numel() > 0
            and (hints.dtype != torch.int32 or hints.shape != keys.shape or hints.device != keys.device)
        ):
            raise ValueError(
                f"hints must be an int32 tensor shaped like keys {tuple(keys.shape)} on {keys.device}, "
                f"got {hints.dtype} {tuple(hints.shape)} on {hints.device}"
            )
        params = InsertParams(self.threshold, self.decay, self.decay_trigger)
        rebalanced = self._rebalance() if due else None
        result = kernel.insert_(self.state(), keys, scores.to(torch.float32), params, hints)
        if self.adaptive is not None:
            self.occurrences_since += keys.numel() - result.skipped
        return result if rebalanced is None else _merged(rebalanced, result)

    def _rebalance_due(self) -> bool:
        """Whether the adaptive policy's rebalance (sketch/policy.py) is due before the next insert."""
        policy = self.adaptive
        return policy is not None and policy.due(int(self.occurrences_since[0]), float(self.decayed_occurrences[0]))

    def _rebalance(self) -> InsertResult:
        """The adaptive policy's rebalance (sketch/policy.py)."""
        policy = self.adaptive
        assert policy is not None
        rebalance = cpp_kernel.rebalance_ if self.kernel == "cpp" else rebalance_
        result, marginal = rebalance(
            self.state(),
            policy,
            self.hot_capacity,
            self.decayed_occurrences,
            self.occurrences_since,
            self.row_marks,
            self.stale_window,
        )
        if policy.medium_share is not None:
            self.medium_level.fill_(policy.medium_share * max(marginal, policy.entry_score))
        return result

    @torch.no_grad()
    def lookup(self, keys: torch.Tensor, regions: torch.Tensor, counts: Optional[torch.Tensor] = None) -> Lookup:
        """Rows of each key in a group's block: its hot row, else its level-1 row, and with a
        medium level (medium_threshold set) the level-2 row and the medium mask; regions [T, 4]
        as hashing.hashed_rows. `counts` [T, 3] int64 (optional) += lookups, hot and medium
        lookups per table slot."""
        kernel = self._kernel_for(keys)
        _check_keys(keys, signs=kernel is torch_kernel)
        self._ensure_ready()
        return kernel.lookup(self.state(), keys, regions, self.medium_threshold, counts)

    @torch.no_grad()
    def query(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per key: hot row (int64, -1 if not hot) and a medium mask (False if no medium level)."""
        kernel = self._kernel_for(keys)
        _check_keys(keys, signs=kernel is torch_kernel)
        self._ensure_ready()
        medium = self.medium_threshold if self.medium_threshold is not None else float("inf")
        return kernel.query(self.state(), keys, medium)

    def free_rows(self) -> torch.Tensor:
        """The free hot rows [F] int64, ascending (the order they are handed out in)."""
        self._ensure_ready()
        return free_row_list(self.free_bits, self.hot_capacity)

    def hot_rows_used(self) -> int:
        self._ensure_ready()
        return self.hot_capacity - int(self.free_count[0])

    def nbytes(self) -> int:
        """Bytes of every buffer of the sketch: its slots, free-row bitmap, policy marks and
        scalars (the paper counts the sketch in the compressed size)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        self._ready = False  # the state dict holds the buffers themselves: dcp.load may write them in place

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        names = ("slots", "free_bits", "free_count", "reserved", "initialized")
        saved = [state_dict.get(prefix + name) for name in names]
        tensors = [t for t in saved if isinstance(t, torch.Tensor) and t.device.type != "meta"]
        if len(tensors) == len(names):
            _check_saved_state(tensors, self.hot_capacity, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.seed.device.type != "meta":
            self._seed = int(self.seed[0])
            self._ready = False

    def extra_repr(self) -> str:
        return (
            f"buckets={self.num_buckets}, slots_per_bucket={self.slots_per_bucket}, "
            f"hot_capacity={self.hot_capacity}, threshold={self.threshold}, "
            f"medium_threshold={self.medium_threshold}, decay={self.decay}"
        )


def _merged(first: InsertResult, second: InsertResult) -> InsertResult:
    """Two results of one insert call (a rebalance, then the insert), in that order."""
    return InsertResult(
        torch.cat([first.promoted_keys, second.promoted_keys]),
        torch.cat([first.promoted_rows, second.promoted_rows]),
        torch.cat([first.demoted_rows, second.demoted_rows]),
        first.skipped + second.skipped,
        first.dropped + second.dropped,
        first.decayed or second.decayed,
    )


def per_row_bytes(adaptive: bool) -> float:
    """Sketch bytes per hot row besides its slots: a bit of the free-row bitmap, and a mark if adaptive."""
    return FREE_ROW_BYTES + (ROW_MARK_BYTES if adaptive else 0)


def _check_saved_state(saved: List[torch.Tensor], capacity: int, prefix: str) -> None:
    """ValueError, before anything is loaded, unless a saved sketch's rows add up (`saved`: its
    slots, free_bits, free_count, reserved, initialized): every row free
    (in the bitmap, which free_count counts) or held by one slot, and as many reservations as
    slots holding one, with a free row for each. The kernels trust these (a free row is popped
    where the count says there is one). A zero-filled state (DMP's materialised buffers, set up
    lazily) is skipped. Shapes and dtypes are torch's own checks."""
    slots, free_bits, free_count, reserved, initialized = saved
    if (
        slots.dim() != 2
        or slots.shape[1] != 3
        or free_bits.numel() != free_words(capacity)
        or not bool(initialized.all())
    ):
        return
    slots, free_bits = slots.cpu(), free_bits.cpu()
    free = free_row_list(free_bits, free_bits.numel() * 64)
    words = slots[:, 2].to(torch.int32)
    held = hot_rows_of(words)
    held = held[held >= 0].long()
    rows = torch.cat([held, free])
    where = f"HotSketch state {prefix!r}" if prefix else "HotSketch state"
    if free.numel() != int(free_count[0]) or rows.numel() != capacity or rows.unique().numel() != capacity:
        raise ValueError(
            f"{where}: {held.numel()} held and {free.numel()} free hot rows (free_count {int(free_count[0])}) "
            f"are not each of its {capacity} rows once: a corrupt or foreign checkpoint"
        )
    if bool((rows >= capacity).any()):
        raise ValueError(f"{where}: a hot row at or past its capacity {capacity}: a corrupt or foreign checkpoint")
    flagged = int(reserved_of(words).sum())
    if flagged != int(reserved[0]) or flagged > free.numel():
        raise ValueError(
            f"{where}: {flagged} slots hold a reservation, reserved says {int(reserved[0])}, "
            f"{free.numel()} rows are free: a corrupt or foreign checkpoint"
        )


def _empty_slots(n: int, device: Optional[torch.device]) -> torch.Tensor:
    """n empty slots: tag 0, score 0.0, no row, error 0."""
    slots = torch.zeros((n, 3), dtype=torch.int32, device=device)
    slots[:, 2] = COLD_WORD
    return slots


def _all_free(capacity: int, device: Optional[torch.device]) -> torch.Tensor:
    """The free-row bitmap with every one of `capacity` rows free."""
    return free_row_bits(torch.arange(capacity, device=device), capacity)


def _check_keys(keys: torch.Tensor, signs: bool) -> None:
    if keys.dtype != torch.int64 or keys.dim() != 1:
        raise ValueError(f"keys must be a 1-D int64 tensor, got {keys.dtype} with shape {tuple(keys.shape)}")
    if signs and keys.numel() and int(keys.min()) < 0:  # one pass, no mask
        raise ValueError("keys must be non-negative 63-bit hashes (use cafe_torchrec.hashing.mix64)")


def _check_config(
    hot_capacity: int,
    threshold: float,
    num_buckets: int,
    slots: int,
    medium: Optional[float],
    decay: float,
    trigger: float,
    kernel: str,
) -> None:
    if num_buckets > MAX_BOUND:
        raise ValueError(f"num_buckets must be <= 2^31, got {num_buckets}")
    if hot_capacity > MAX_HOT_ROWS:
        raise ValueError(f"hot_capacity must be <= 2^30 (a row word's row bits), got {hot_capacity}")
    if hot_capacity < 0 or num_buckets < 1 or slots < 1:
        raise ValueError(
            "need hot_capacity >= 0, num_buckets >= 1, slots_per_bucket >= 1; "
            f"got {hot_capacity}, {num_buckets}, {slots}"
        )
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if medium is not None and not 0 < medium <= threshold:
        raise ValueError(f"medium_threshold must be in (0, threshold={threshold}], got {medium}")
    if not 0 < decay < 1:
        raise ValueError(f"decay must be in (0, 1), got {decay}")
    if not trigger > 0:
        raise ValueError(f"decay_trigger must be > 0, got {trigger}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
