"""Where a CAFE collection's physical tables go: their shards' bytes, row-wise or table-wise, and which rank.

A physical table bigger than ``rw_share`` (default 5%) of a rank's fair share (total / world
size) is sharded row-wise, so every rank holds an equal block of it (for a CAFE group, a block
with its own hot rows, hashed rows and sketch); the others are table-wise, placed largest first
on the rank with the most room left (LPT, ``place_largest_first``). Tables of at most 5% of a
rank placed this way leave ranks within about 5% of each other. Bytes are weights + HotSketch
(slots + free list) + optimizer state, as FBGEMM TBE allocates it
(estimators.optimizer_state_bytes).

This is the planner's one placement engine: the budget solver places candidate layouts with
``assign``, and CafePlanner's TorchRec callback re-places the table-wise shards of TorchRec's
chosen plan with the same ``place_largest_first`` (by the estimators' bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, TypeVar

import torch
from torchrec.distributed.sharding_plan import calculate_shard_sizes_and_offsets
from torchrec.distributed.types import ShardingType

from cafe_planner.estimators import OptimizerLike, ShardBytes, optimizer_state_bytes, resolve_optimizer
from cafe_torchrec.distributed.sharder import every_rank_has_rows
from cafe_torchrec.layout import BYTES_PER_VALUE, CafePlan, GroupLayout
from cafe_torchrec.remap import group_state_bytes

TW, RW = ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class PhysicalTable:
    """One physical table of a CAFE collection: a group (layout set) or a plain table."""

    name: str
    rows: int
    dim: int
    element_size: int
    features: Tuple[str, ...]
    layout: Optional[GroupLayout] = None


def physical_tables(plan: CafePlan) -> List[PhysicalTable]:
    """The plan's physical tables: its CAFE groups, then its plain tables."""
    out = [
        PhysicalTable(g.name, g.physical_rows, g.dim, BYTES_PER_VALUE[g.data_type], tuple(g.features), g)
        for g in plan.groups
    ]
    for p in plan.plain:
        c = p.config
        out.append(
            PhysicalTable(
                c.name, c.num_embeddings, c.embedding_dim, BYTES_PER_VALUE[c.data_type], tuple(c.feature_names)
            )
        )
    return out


def shard_rows(rows: int, dim: int, world_size: int, sharding_type: str) -> List[int]:
    """Rows of each shard as TorchRec's planner cuts them (row-wise: ceil(rows / W) per rank)."""
    if sharding_type == TW or world_size == 1:
        return [rows]
    sizes, _ = calculate_shard_sizes_and_offsets(
        torch.empty(rows, dim, device="meta"), world_size, world_size, sharding_type
    )
    return [s[0] for s in sizes]


def shard_bytes(table: PhysicalTable, rows: int, optimizer: OptimizerLike) -> ShardBytes:
    """Weights, optimizer state and sketch of a shard of `rows` rows (io not counted)."""
    opt = optimizer_state_bytes(resolve_optimizer(optimizer), rows, table.dim)
    weights = rows * table.dim * table.element_size
    if table.layout is None or rows == 0:
        return ShardBytes(weights, opt, 0, 0)
    block = table.layout.block(rows)
    return ShardBytes(weights, opt, group_state_bytes(block), 0, block.hot_rows, block.physical_rows - block.hot_rows)


def row_wise_refusal(table: PhysicalTable, world_size: int) -> Optional[str]:
    """Why `table` cannot be sharded row-wise over `world_size` ranks, or None when it can:
    TorchRec cuts ceil(rows / W) rows per rank, so trailing ranks may get none (refused, see
    sharder.every_rank_has_rows), and every block of a group must hold one hashed row per table
    region."""
    sizes = shard_rows(table.rows, table.dim, world_size, RW)
    if not every_rank_has_rows(sizes):
        return (
            f"TorchRec's row-wise cut gives {sizes[0]} rows per rank and leaves {sizes.count(0)} of "
            f"{world_size} ranks without rows"
        )
    if table.layout is not None:
        try:
            for s in set(sizes):
                table.layout.block(s)
        except ValueError as err:
            return str(err)
    return None


def row_wise_ok(table: PhysicalTable, world_size: int) -> bool:
    """Whether `table` can be sharded row-wise over `world_size` ranks (row_wise_refusal)."""
    return row_wise_refusal(table, world_size) is None


def row_wise_by_size(
    tables: Sequence[PhysicalTable], world_size: int, optimizer: OptimizerLike, rw_share: float = 0.05
) -> List[PhysicalTable]:
    """The tables whose size calls for row-wise: above rw_share of a rank's fair share (total
    bytes / world size). None on one rank."""
    if world_size == 1:
        return []
    whole = {t.name: shard_bytes(t, t.rows, optimizer).state for t in tables}
    fair = sum(whole.values()) / world_size
    return [t for t in tables if whole[t.name] > rw_share * fair]


def oversized_table_wise(
    tables: Sequence[PhysicalTable], world_size: int, optimizer: OptimizerLike, rw_share: float = 0.05
) -> Dict[str, str]:
    """The tables that their size would shard row-wise but that row-wise cannot take, each
    with the reason: they go table-wise onto one rank, and the plan is unbalanced."""
    refusals = {
        t.name: row_wise_refusal(t, world_size) for t in row_wise_by_size(tables, world_size, optimizer, rw_share)
    }
    return {name: why for name, why in refusals.items() if why is not None}


def choose_sharding(
    tables: Sequence[PhysicalTable], world_size: int, optimizer: OptimizerLike, rw_share: float = 0.05
) -> Dict[str, str]:
    """Row-wise for the tables row_wise_by_size names, where row-wise is valid; else table-wise."""
    by_size = {t.name for t in row_wise_by_size(tables, world_size, optimizer, rw_share)}
    return {t.name: RW if t.name in by_size and row_wise_ok(t, world_size) else TW for t in tables}


def place_largest_first(
    sizes: Mapping[K, int], load: Sequence[int], caps: Optional[Sequence[int]] = None
) -> Dict[K, int]:
    """The rank of each whole (table-wise) table: largest first (ties by key), each on the rank
    with the most room left under its cap, or without caps the least loaded one (lowest rank on
    ties). `load` is what each rank holds already (its row-wise blocks). The solver and the
    planner's TorchRec callback both place with this, so a configured module lands where the
    budget was checked."""
    load = list(load)
    room = list(caps) if caps is not None else [0] * len(load)
    out: Dict[K, int] = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], str(k))):
        r = max(range(len(load)), key=lambda r: (room[r] - load[r], -r))
        out[key] = r
        load[r] += sizes[key]
    return out


@dataclass
class Assignment:
    """Where each physical table goes and what each rank then holds."""

    sharding: Dict[str, str]
    ranks: Dict[str, List[int]]
    shards: Dict[str, List[ShardBytes]]
    rank_bytes: List[int]
    rank_tables: List[List[str]]

    def holdings(self) -> List[str]:
        """Per rank, what it holds: each table or row-wise block with its bytes."""
        out = []
        for r, names in enumerate(self.rank_tables):
            parts = []
            for name in names:
                idx = self.ranks[name].index(r)
                sb = self.shards[name][idx]
                kind = f"block {idx} of" if self.sharding[name] == RW else "table"
                parts.append(
                    f"{kind} {name} {sb.state:,} B (weights {sb.weights:,}, optimizer {sb.optimizer:,}, "
                    f"sketch {sb.sketch:,})"
                )
            out.append("; ".join(parts))
        return out


def assign(
    tables: Sequence[PhysicalTable],
    world_size: int,
    optimizer: OptimizerLike,
    *,
    caps: Optional[Sequence[int]] = None,
    rw_share: float = 0.05,
) -> Assignment:
    """Shard (choose_sharding) and place: row-wise blocks on ranks 0..W-1 (as TorchRec's
    partitioner places them), table-wise tables by place_largest_first."""
    chosen = choose_sharding(tables, world_size, optimizer, rw_share)
    load = [0] * world_size
    ranks: Dict[str, List[int]] = {}
    shards: Dict[str, List[ShardBytes]] = {}
    for t in tables:
        if chosen[t.name] == RW:
            sizes = shard_rows(t.rows, t.dim, world_size, RW)
            block = {rows: shard_bytes(t, rows, optimizer) for rows in set(sizes)}  # blocks come in two sizes
            shards[t.name] = [block[rows] for rows in sizes]
            ranks[t.name] = list(range(len(sizes)))
        else:
            shards[t.name] = [shard_bytes(t, t.rows, optimizer)]
    for t in tables:
        for r, s in zip(ranks.get(t.name, ()), shards[t.name]):
            load[r] += s.state
    whole = {t.name: shards[t.name][0].state for t in tables if chosen[t.name] == TW}
    for name, r in place_largest_first(whole, load, caps).items():
        ranks[name] = [r]
    rank_bytes = [0] * world_size
    rank_tables: List[List[str]] = [[] for _ in range(world_size)]
    for t in tables:
        for r, s in zip(ranks[t.name], shards[t.name]):
            rank_bytes[r] += s.state
            rank_tables[r].append(t.name)
    return Assignment(chosen, ranks, shards, rank_bytes, rank_tables)


def over_budget_message(needs: Sequence[int], caps: Sequence[int], holdings: Sequence[str]) -> Optional[str]:
    """None when every rank fits its cap; else, largest shortfall first, each rank over its cap,
    by how many bytes, and what it holds. The solver and the planner's final check both say it so."""
    over = sorted(((need - cap, r) for r, (need, cap) in enumerate(zip(needs, caps)) if need > cap), reverse=True)
    if not over:
        return None
    return " | ".join(
        f"rank {r} needs {needs[r]:,} bytes but its cap is {caps[r]:,}: short by {short:,} bytes; "
        f"it holds {holdings[r]}"
        for short, r in over
    )
