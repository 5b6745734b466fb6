"""The backward side shared by both collections: importance into the sketch, then migration.

A hook on a pooled lookup output sees its gradient [B, D]; it scores every occurrence of
each CAFE group's features and inserts the scores into that group's sketch. Promotions are
applied by a callback at the end of the backward pass, i.e. after the fused (or in-backward)
optimizer has updated the tables, so the copied rows carry this step's update and nothing of
the previous owner's gradient.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from cafe_torchrec.importance import occurrence_scores
from cafe_torchrec.migration import copy_rows, row_store
from cafe_torchrec.remap import CafeGroupRemap, GroupBatch
from cafe_torchrec.sketch import InsertResult


def importance_hook(
    batches: List[GroupBatch], groups: Dict[str, CafeGroupRemap], physical: Callable[[], nn.Module]
) -> Callable[[torch.Tensor], None]:
    """A tensor hook for the pooled output whose columns `batches` describe."""

    def hook(grad: torch.Tensor) -> None:
        results: List[Tuple[CafeGroupRemap, InsertResult]] = []
        for b in batches:
            group = groups[b.group]
            scores = occurrence_scores(grad, b.columns, b.lengths, b.num_features, b.weights,
                                       group.layout.config.importance)
            results.append((group, group.record(b.keys, scores, b.hints)))
        torch.autograd.Variable._execution_engine.queue_callback(lambda: migrate(results, physical()))

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
