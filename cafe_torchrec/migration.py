"""Migration: copy rows and their optimizer state inside a physical table when ids turn hot.

A promoted id's new hot row starts from what the id saw until now: its level-1 row, or in a
multi-level group the sum of its level-1 and level-2 rows (what a medium id saw; an id promoted
straight from cold starts from the sum too, as the sequential reference does: the migration
does not know which ids the last forward served as medium). Its optimizer state
starts fresh (zero), as a new row of its own: the hashed row's accumulator holds the summed
gradients of every id that shares it, so copying it would give the id a step size a fraction
of a fresh row's just when it starts to learn for itself. Measured against the official CAFE
artifact (whose new hot rows start fresh): copying the state cost 0.3-1.4 AUC points,
zeroing it closed the gap (docs/results.md, "Against the official CAFE artifact"). A
demoted id's row is simply freed: its content is overwritten at the row's next promotion,
weights and state alike.
Migrations run after the optimizer update of the step (end of backward), so the copy never
mixes in the previous owner's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from cafe_torchrec._torchrec_compat import fused_table_kernel, in_backward_optimizers
from cafe_torchrec.layout import GroupLayout
from cafe_torchrec.sketch import InsertResult


class PromotingGroup(Protocol):
    """What migration needs of a group (remap.CafeGroupRemap): its layout and its hashed rows."""

    layout: GroupLayout

    def hashed_rows(self, keys: torch.Tensor, level: int) -> torch.Tensor: ...


@dataclass
class RowStore:
    """Writable views of one physical table: weight [rows, D] and per-row optimizer state."""

    weight: torch.Tensor
    states: List[torch.Tensor]  # each [rows] or [rows, D] (or [rows, 1]); written in place


def row_store(ebc: nn.Module, table: str) -> RowStore:
    """The row store of `table` in a stock EBC or in a sharded EBC (fused TBE)."""
    if isinstance(ebc, EmbeddingBagCollection):
        weight = ebc.embedding_bags[table].weight
        return RowStore(weight.data, _in_backward_states(weight))
    found = fused_table_kernel(ebc, table)
    if found is not None:
        tbe, i = found
        states = tbe.split_optimizer_states()  # [] for SGD, else one list per table
        return RowStore(tbe.split_embedding_weights()[i], list(states[i]) if i < len(states) else [])
    raise KeyError(f"physical table {table!r} not found in {type(ebc).__name__}")


def has_in_backward_optimizer(ebc: nn.Module, table: str) -> bool:
    """Whether the table's updates happen inside backward (fused TBE, or apply_optimizer_in_backward)."""
    if isinstance(ebc, EmbeddingBagCollection):
        return bool(in_backward_optimizers(ebc.embedding_bags[table].weight))
    return True


def require_in_backward_optimizer(ebc: nn.Module, tables: Iterable[str], what: str, reason: str) -> None:
    """ValueError naming the first of `tables` (called `what`, e.g. "CAFE table") whose updates
    do not happen inside backward: rows that move at the end of backward (`reason`, e.g.
    "migrations must run") must move after the step's update, never before it."""
    for table in tables:
        if not has_in_backward_optimizer(ebc, table):
            raise ValueError(
                f"{what} {table!r} is trained without an in-backward optimizer: {reason} after the update. "
                "Shard with DistributedModelParallel (fused TBE), or call "
                "torch.distributed.optim._apply_optimizer_in_backward(SGD | Adagrad | RowWiseAdagrad, "
                "ebc.parameters(), {...}) before training; for inference use eval() or no_grad()."
            )


def migrate(results: Sequence[Tuple[PromotingGroup, InsertResult]], physical: nn.Module) -> None:
    """Copy each promoted key's current rows (and optimizer state) into its new hot row
    (`results`: each group's sketch insert of the step; `physical`: the tables' module)."""
    for group, result in results:
        if result.promoted_keys.numel() == 0:
            continue
        keys = result.promoted_keys
        src2 = group.hashed_rows(keys, 2) if group.layout.config.multi_level else None
        copy_rows(
            row_store(physical, group.layout.name),
            result.promoted_rows.to(keys.device),
            group.hashed_rows(keys, 1),
            src2,
        )


@torch.no_grad()
def copy_rows(store: RowStore, dst: torch.Tensor, src: torch.Tensor, src2: Optional[torch.Tensor]) -> None:
    """weight[dst] = weight[src] (+ weight[src2]); optimizer state[dst] = 0 (a fresh row)."""
    if dst.numel() == 0:
        return
    rows = store.weight.shape[0]
    weight = store.weight[src] if src2 is None else store.weight[src] + store.weight[src2]
    store.weight[dst] = weight
    for state in store.states:
        if state.dim() == 0 or state.shape[0] != rows:
            continue
        state[dst] = 0


def _in_backward_states(weight: torch.Tensor) -> List[torch.Tensor]:
    states = []
    for opt in in_backward_optimizers(weight):
        for value in opt.state.get(weight, {}).values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                states.append(value.view(value.shape[0], -1) if value.dim() > 1 else value)
    return states
