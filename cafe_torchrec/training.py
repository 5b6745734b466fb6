"""The backward side shared by both collections: importance into the sketch, then migration.

A hook on a pooled lookup output sees its gradient [B, D]; it scores every occurrence of
each CAFE group's features and inserts the scores into that group's sketch. Promotions are
applied by a callback at the end of the backward pass, i.e. after the fused (or in-backward)
optimizer has updated the tables, so the copied rows carry this step's update and nothing of
the previous owner's gradient.

On CPU the scoring and the sketch insert run on one background thread while the TBE
backward runs on the caller's thread (they share nothing: the sketch is not read by the
backward, the gradient is only read by both). The end-of-backward callback waits for them
before migrating, and a group's next lookup waits too, so results equal the sequential
order exactly. CAFE_SKETCH_THREAD=0 turns the overlap off (everything on the caller's thread).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from cafe_torchrec._torchrec_compat import queue_end_of_backward
from cafe_torchrec.importance import occurrence_scores
from cafe_torchrec.migration import copy_rows, row_store
from cafe_torchrec.remap import CafeGroupRemap, GroupBatch
from cafe_torchrec.sketch import InsertResult

_worker: Optional[ThreadPoolExecutor] = None


def background_worker() -> Optional[ThreadPoolExecutor]:
    """The one sketch-update thread, started on first use; None when the overlap is off."""
    global _worker
    if os.environ.get("CAFE_SKETCH_THREAD", "1") == "0":
        return None
    if _worker is None:
        _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cafe-sketch")
    return _worker


def _score_and_record(group: CafeGroupRemap, batch: GroupBatch, grad: torch.Tensor) -> InsertResult:
    scores = occurrence_scores(grad, batch.columns, batch.lengths, batch.num_features, batch.weights,
                               group.layout.config.importance, group.kernel)
    return group.record(batch.keys, scores, batch.hints)


def importance_hook(
    batches: List[GroupBatch], groups: Dict[str, CafeGroupRemap], physical: Callable[[], nn.Module]
) -> Callable[[torch.Tensor], None]:
    """A tensor hook for the pooled output whose columns `batches` describe."""

    def hook(grad: torch.Tensor) -> None:
        worker = background_worker() if grad.device.type == "cpu" else None
        pending: List[Tuple[CafeGroupRemap, "Future[InsertResult]"]] = []
        for b in batches:
            group = groups[b.group]
            group.settle()  # an earlier update of this group (another output of the same step)
            if worker is None:
                done: "Future[InsertResult]" = Future()
                done.set_result(_score_and_record(group, b, grad))
            else:
                done = worker.submit(_score_and_record, group, b, grad)
            group.pending = done
            pending.append((group, done))

        def finish() -> None:
            for group, done in pending:
                if group.pending is done:
                    group.pending = None
            migrate([(group, done.result()) for group, done in pending], physical())

        queue_end_of_backward(finish)

    return hook


def migrate(results: List[Tuple[CafeGroupRemap, InsertResult]], physical: nn.Module) -> None:
    """Copy each promoted key's current rows (and optimizer state) into its new hot row."""
    for group, result in results:
        if result.promoted_keys.numel() == 0:
            continue
        keys = result.promoted_keys.to(group.regions.device)
        src2 = group.hashed_rows(keys, 2) if group.layout.config.multi_level else None
        copy_rows(row_store(physical, group.layout.name), result.promoted_rows.to(keys.device),
                  group.hashed_rows(keys, 1), src2)
