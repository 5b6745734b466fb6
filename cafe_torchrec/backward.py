"""The backward side shared by both collections: importance into the sketch, then migration.

A hook on a pooled lookup output sees its gradient [B, D]; it scores every occurrence of
each CAFE group's features and inserts the scores into that group's sketch. Promotions are
applied (migration.migrate) by a callback at the end of the backward pass, i.e. after the
fused (or in-backward) optimizer has updated the tables, so the copied rows carry this step's
update and nothing of the previous owner's gradient.

On CPU the scoring and the sketch insert run on one background thread while the TBE
backward runs on the caller's thread (they share nothing: the sketch is not read by the
backward, the gradient is only read by both). The end-of-backward callback waits for them
before migrating, and a group's next lookup, stats or state_dict waits too
(`wait_for_sketch_update`), so results equal the sequential order exactly.
CAFE_SKETCH_THREAD=0 turns the overlap off (everything on the caller's thread).
"""

from __future__ import annotations

import os
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Protocol, Tuple

import torch
from torch import nn
from torch.autograd.profiler import record_function

from cafe_torchrec._torchrec_compat import queue_end_of_backward
from cafe_torchrec.importance import occurrence_scores
from cafe_torchrec.layout import GroupLayout
from cafe_torchrec.migration import migrate
from cafe_torchrec.sketch import InsertResult


@dataclass
class GroupBatch:
    """What backward needs of one run of a group's features: keys and original bags."""

    group: str
    keys: torch.Tensor  # [N] per original occurrence
    lengths: torch.Tensor  # [F*B] original bag lengths, feature-major
    weights: Optional[torch.Tensor]  # [N]
    num_features: int
    columns: Tuple[int, int]  # the features' columns in the pooled lookup output
    hints: Optional[torch.Tensor]  # [N] from the forward lookup


class SketchGroup(Protocol):
    """What the backward side needs of a group (remap.CafeGroupRemap): its layout, the kernel it
    runs, and the insert of importance scores into its sketch."""

    layout: GroupLayout

    @property
    def kernel(self) -> str: ...

    def record(
        self, keys: torch.Tensor, scores: torch.Tensor, hints: Optional[torch.Tensor] = None
    ) -> InsertResult: ...

    def hashed_rows(self, keys: torch.Tensor, level: int) -> torch.Tensor: ...


_worker: Optional[ThreadPoolExecutor] = None
# the sketch update of each group still running in the background (at most one per group)
_pending: "weakref.WeakKeyDictionary[SketchGroup, Future[InsertResult]]" = weakref.WeakKeyDictionary()


def background_worker() -> Optional[ThreadPoolExecutor]:
    """The one sketch-update thread, started on first use; None when the overlap is off."""
    global _worker
    if os.environ.get("CAFE_SKETCH_THREAD", "1") == "0":
        return None
    if _worker is None:
        _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cafe-sketch")
    return _worker


def wait_for_sketch_update(group: SketchGroup) -> None:
    """Wait for the group's sketch update still running in the background, if any (re-raising
    its error once): anything that reads or writes the sketch calls this first."""
    pending = _pending.pop(group, None)
    if pending is not None:
        pending.result()


def _score_and_record(group: SketchGroup, batch: GroupBatch, grad: torch.Tensor) -> InsertResult:
    with record_function("## cafe: importance and sketch insert ##"):
        scores = occurrence_scores(
            grad,
            batch.columns,
            batch.lengths,
            batch.num_features,
            batch.weights,
            group.layout.config.importance,
            group.kernel,
        )
        return group.record(batch.keys, scores, batch.hints)


def _start_update(
    group: SketchGroup, batch: GroupBatch, grad: torch.Tensor, worker: Optional[ThreadPoolExecutor]
) -> "Future[InsertResult]":
    """Score and insert `batch` on the worker (or now, without one); the group's pending update."""
    wait_for_sketch_update(group)  # an earlier update of this group (another output of the same step)
    if worker is None:
        done: "Future[InsertResult]" = Future()
        done.set_result(_score_and_record(group, batch, grad))
    else:
        done = worker.submit(_score_and_record, group, batch, grad)
    _pending[group] = done
    return done


def importance_hook(
    batches: List[GroupBatch], groups: Mapping[str, SketchGroup], physical: Callable[[], nn.Module]
) -> Callable[[torch.Tensor], None]:
    """A tensor hook for the pooled output whose columns `batches` describe: starts each group's
    sketch update and queues the migration of its promotions for the end of backward."""

    def hook(grad: torch.Tensor) -> None:
        worker = background_worker() if grad.device.type == "cpu" else None
        started: List[Tuple[SketchGroup, "Future[InsertResult]"]] = [
            (groups[b.group], _start_update(groups[b.group], b, grad, worker)) for b in batches
        ]

        def finish() -> None:
            for group, done in started:
                if _pending.get(group) is done:
                    del _pending[group]
            with record_function("## cafe: migration ##"):
                migrate([(group, done.result()) for group, done in started], physical())

        queue_end_of_backward(finish)

    return hook
