"""Where a CAFE collection's physical tables go: their shards' bytes, row-wise or table-wise, and which rank.

A physical table bigger than ``rw_share`` (default 5%) of a rank's fair share (total / world
size) is sharded row-wise, so every rank holds an equal block of it (for a CAFE group, a block
with its own hot rows, hashed rows and sketch); the others are table-wise, placed largest first
on the rank with the most room left (LPT). Tables of at most 5% of a rank placed this way leave
ranks within about 5% of each other. Bytes are weights + HotSketch (slots + free list) +
optimizer state, as FBGEMM TBE allocates it (estimators.optimizer_state_bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torchrec.distributed.sharding_plan import calculate_shard_sizes_and_offsets
from torchrec.distributed.types import ShardingType

from cafe_torchrec.layout import BYTES_PER_VALUE, CafePlan, GroupLayout

from cafe_planner.estimators import OptimizerLike, ShardBytes, optimizer_state_bytes, resolve_optimizer

TW, RW = ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value


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
    out = [PhysicalTable(g.name, g.physical_rows, g.dim, BYTES_PER_VALUE[g.data_type], tuple(g.features), g) for g in plan.groups]
    for p in plan.plain:
        c = p.config
        out.append(PhysicalTable(c.name, c.num_embeddings, c.embedding_dim, BYTES_PER_VALUE[c.data_type], tuple(c.feature_names)))
    return out


def shard_rows(rows: int, dim: int, world_size: int, sharding_type: str) -> List[int]:
    """Rows of each shard as TorchRec's planner cuts them (row-wise: ceil(rows / W) per rank)."""
    if sharding_type == TW or world_size == 1:
        return [rows]
    sizes, _ = calculate_shard_sizes_and_offsets(torch.empty(rows, dim, device="meta"), world_size, world_size, sharding_type)
    return [s[0] for s in sizes]


def shard_bytes(table: PhysicalTable, rows: int, optimizer: OptimizerLike) -> ShardBytes:
    """Weights, optimizer state and sketch of a shard of `rows` rows (io not counted)."""
    opt = optimizer_state_bytes(resolve_optimizer(optimizer), rows, table.dim)
    weights = rows * table.dim * table.element_size
    if table.layout is None or rows == 0:
        return ShardBytes(weights, opt, 0, 0)
    block = table.layout.block(rows)
    return ShardBytes(weights, opt, block.sketch_bytes(), 0, block.hot_rows, block.physical_rows - block.hot_rows)


def row_wise_ok(table: PhysicalTable, world_size: int) -> bool:
    """Row-wise needs every block of a group to hold one hashed row per table region, and a
    plain table at least one row per rank."""
    sizes = shard_rows(table.rows, table.dim, world_size, RW)
    if table.layout is None:
        return min(sizes) >= 1
    try:
        for s in set(sizes):
            table.layout.block(s)
    except ValueError:
        return False
    return min(sizes) >= 1


def choose_sharding(tables: Sequence[PhysicalTable], world_size: int, optimizer: OptimizerLike,
                    rw_share: float = 0.05) -> Dict[str, str]:
    """Row-wise for tables above rw_share of a rank's fair share (when row-wise is valid), else
    table-wise. One rank: table-wise."""
    if world_size == 1:
        return {t.name: TW for t in tables}
    whole = {t.name: shard_bytes(t, t.rows, optimizer).state for t in tables}
    fair = sum(whole.values()) / world_size
    return {t.name: RW if whole[t.name] > rw_share * fair and row_wise_ok(t, world_size) else TW for t in tables}


@dataclass
class Assignment:
    """Where each physical table goes and what each rank then holds."""

    sharding: Dict[str, str]
    ranks: Dict[str, List[int]]
    shards: Dict[str, List[ShardBytes]]
    rank_bytes: List[int]
    rank_tables: List[List[str]]


def assign(tables: Sequence[PhysicalTable], world_size: int, optimizer: OptimizerLike, caps: Optional[Sequence[int]] = None,
           sharding: Optional[Mapping[str, str]] = None, rw_share: float = 0.05) -> Assignment:
    """Shard (``sharding`` or ``choose_sharding``) and place: row-wise blocks on ranks 0..W-1,
    table-wise tables largest first on the rank with the most room left under its cap."""
    chosen = dict(choose_sharding(tables, world_size, optimizer, rw_share))
    chosen.update(sharding or {})
    caps = list(caps) if caps is not None else [0] * world_size
    load = [0] * world_size
    ranks: Dict[str, List[int]] = {}
    shards: Dict[str, List[ShardBytes]] = {}
    rank_tables: List[List[str]] = [[] for _ in range(world_size)]
    for t in tables:
        if chosen[t.name] == RW:
            shards[t.name] = [shard_bytes(t, r, optimizer) for r in shard_rows(t.rows, t.dim, world_size, RW)]
            ranks[t.name] = list(range(len(shards[t.name])))
            for r, s in enumerate(shards[t.name]):
                load[r] += s.state
                rank_tables[r].append(t.name)
    tw = [t for t in tables if chosen[t.name] != RW]
    whole = {t.name: shard_bytes(t, t.rows, optimizer) for t in tw}
    for t in sorted(tw, key=lambda t: -whole[t.name].state):
        r = max(range(world_size), key=lambda r: (caps[r] - load[r], -r))
        load[r] += whole[t.name].state
        ranks[t.name], shards[t.name] = [r], [whole[t.name]]
        rank_tables[r].append(t.name)
    return Assignment(chosen, ranks, shards, load, rank_tables)


def shortfall_message(assignment: Assignment, caps: Sequence[int], where: str) -> Optional[str]:
    """None when every rank fits; else which rank (and tables) overflow and by how many bytes."""
    over = [(load - cap, r) for r, (load, cap) in enumerate(zip(assignment.rank_bytes, caps)) if load > cap]
    if not over:
        return None
    lines = []
    for short, r in sorted(over, reverse=True):
        parts = []
        for name in assignment.rank_tables[r]:
            idx = assignment.ranks[name].index(r)
            sb = assignment.shards[name][idx]
            kind = f"block {idx} of" if assignment.sharding[name] == RW else "table"
            parts.append(f"{kind} {name} {sb.state:,} B (weights {sb.weights:,}, optimizer {sb.optimizer:,}, sketch {sb.sketch:,})")
        lines.append(f"rank {r} needs {assignment.rank_bytes[r]:,} bytes but its cap is {caps[r]:,}: "
                     f"short by {short:,} bytes; it holds " + "; ".join(parts))
    return f"{where}: " + " | ".join(lines)
