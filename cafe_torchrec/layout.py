"""Sizing and layout: which tables are compressed, into how many hot and hashed rows.

One CAFE group (tables of equal dim, see CafeConfig.group) becomes ONE physical table:

    [ hot rows | table 0 level-1 | table 0 level-2 | table 1 level-1 | ... ]

Tables too small to compress (logical rows <= 2000 / ratio, the paper's rule, or ratio 1)
become plain physical tables of their own and keep stock semantics (row = id mod rows).
The same functions serve the module, the planner and the benchmarks, so memory is counted
one way everywhere.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

from cafe_torchrec._torchrec_compat import local_row_blocks
from cafe_torchrec.config import CafeConfig
from cafe_torchrec.hashing import MAX_BOUND
from cafe_torchrec.sketch.hot_sketch import SLOT_BYTES, per_row_bytes
from cafe_torchrec.validation import check_tables

MAX_TABLES_PER_GROUP = 1 << 15  # the table slot lives in the low 15 bits of a key
BYTES_PER_VALUE = {DataType.FP32: 4, DataType.FP16: 2}
ROW_TABLE_BYTES = 2  # the int16 table slot of each hot row's owner (remap.CafeGroupRemap.row_tables)


@dataclass(frozen=True)
class TableLayout:
    """One compressed logical table inside its group's physical table."""

    name: str
    features: Tuple[str, ...]
    logical_rows: int
    ratio: float
    level1_rows: int
    level2_rows: int  # 0 unless the group is multi-level
    # the logical table's init_fn (EmbeddingBagConfig.init_fn, which its __post_init__ always
    # sets); None only for a layout built without a config: TorchRec's default then
    init_fn: Optional[Callable[[torch.Tensor], Any]] = field(default=None, compare=False, repr=False)

    @property
    def hashed_rows(self) -> int:
        return self.level1_rows + self.level2_rows

    def init_rows(self, rows: torch.Tensor) -> None:
        """Initialise this table's hashed rows with the table's init_fn, as a stock collection
        initialises the table's own rows. The init_fn gets the [hashed rows, dim] slice, not a
        [num_embeddings, dim] table: element-wise inits (TorchRec's uniform default, normal,
        constant) mean what they mean in stock; a shape-dependent one sees the slice's shape."""
        if self.init_fn is None:
            bound = math.sqrt(1.0 / self.logical_rows)
            rows.uniform_(-bound, bound)
            return
        try:
            self.init_fn(rows)
        except (RuntimeError, ValueError) as error:
            raise ValueError(
                f"table {self.name!r}: its init_fn failed on its {rows.shape[0]} x {rows.shape[1]} hashed rows "
                "(CAFE initialises each table's hashed rows, not a [num_embeddings, dim] table; pretrained "
                f"rows import with cafe_torchrec.inference.warm_start): {error}"
            ) from error


@dataclass(frozen=True)
class GroupLayout:
    """One CAFE group: its physical table name, hot rows and the regions of its tables."""

    name: str
    dim: int
    data_type: DataType
    config: CafeConfig  # resolved; the group-level fields hold for every table
    hot_rows: int
    tables: Tuple[TableLayout, ...]

    @property
    def physical_rows(self) -> int:
        return self.hot_rows + sum(t.hashed_rows for t in self.tables)

    @property
    def features(self) -> List[str]:
        return [f for t in self.tables for f in t.features]

    def region_offsets(self) -> List[Tuple[int, int]]:
        """(level-1 offset, level-2 offset) of each table's regions in the physical table."""
        out, offset = [], self.hot_rows
        for t in self.tables:
            out.append((offset, offset + t.level1_rows))
            offset += t.hashed_rows
        return out

    def init_weights(self, weight: torch.Tensor) -> torch.Tensor:
        """The physical table's init_fn, region by region: each table's hashed rows (both
        levels) start from that table's own init_fn, as the table's rows would in a stock
        EmbeddingBagCollection and as the official artifact starts its hashed rows; the hot rows
        from uniform +-sqrt(1 / largest table's rows), the official's hot-table init (a promoted
        id's hot row starts from its level-1 row anyway, see migration.py). One bound for the
        whole table (the largest table's) started a small table's hashed rows up to sqrt(rows
        ratio) narrower than stock. Takes the whole table or TorchRec's ShardedTensor of it (its
        sharded reset_parameters): each local row-wise shard is a block of this layout."""
        bound = math.sqrt(1.0 / max(t.logical_rows for t in self.tables))
        with torch.no_grad():
            for local in (b for b in local_row_blocks(weight) if b.shape[0] > 0):
                block = self.block(local.shape[0])
                local[: block.hot_rows].uniform_(-bound, bound)
                for t, (level1, _) in zip(block.tables, block.region_offsets()):
                    t.init_rows(local[level1 : level1 + t.hashed_rows])
        return weight

    def block(self, rows: int) -> "GroupLayout":
        """The layout of a row-wise block of `rows` rows: every region scaled in proportion
        (largest remainder), so each rank holds its own hot rows and a share of every table's
        hashed rows. The whole table is the block of physical_rows rows."""
        if rows == self.physical_rows:
            return self
        multi = self.config.multi_level
        sizes = [self.hot_rows] + [
            r for t in self.tables for r in ((t.level1_rows, t.level2_rows) if multi else (t.level1_rows,))
        ]
        minimum = [0] + [1] * (len(sizes) - 1)
        if rows < sum(minimum):
            raise ValueError(
                f"CAFE group {self.name!r}: a block of {rows} rows cannot hold one hashed row per table "
                f"region ({sum(minimum)} needed); use fewer row-wise shards or a lower compression ratio"
            )
        exact = [s * rows / self.physical_rows for s in sizes]
        out = [max(m, math.floor(e)) for e, m in zip(exact, minimum)]
        by_fraction = sorted(range(len(sizes)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
        i = 0
        while sum(out) != rows:
            j = (
                by_fraction[i % len(sizes)]
                if sum(out) < rows
                else max(range(len(sizes)), key=lambda k: out[k] - minimum[k])
            )
            out[j] += 1 if sum(out) < rows else -1
            i += 1
        hot, rest = out[0], iter(out[1:])
        tables = tuple(replace(t, level1_rows=next(rest), level2_rows=next(rest) if multi else 0) for t in self.tables)
        return replace(self, hot_rows=hot, tables=tables)

    @property
    def sketch_buckets(self) -> int:
        """Buckets of the group's HotSketch: slots_per_hot_row slots per hot row (at least one bucket)."""
        return sketch_buckets(self.hot_rows, self.config.slots_per_hot_row, self.config.slots_per_bucket)

    def weight_bytes(self) -> int:
        return self.physical_rows * self.dim * BYTES_PER_VALUE[self.data_type]

    def logical_bytes(self) -> int:
        """The group's tables uncompressed, at their configured dtype."""
        return sum(t.logical_rows for t in self.tables) * self.dim * BYTES_PER_VALUE[self.data_type]

    def budget_bytes(self) -> int:
        """What the group may hold: the bytes of its tables under the hashing trick at their
        ratios (ceil(rows / ratio) rows each, at least one), so CAFE and hashing compare at the
        same memory."""
        rows = sum(max(1, math.ceil(t.logical_rows / t.ratio)) for t in self.tables)
        return rows * self.dim * BYTES_PER_VALUE[self.data_type]


@dataclass(frozen=True)
class PlainTable:
    """A table left uncompressed: a physical table of its own, row = id mod rows."""

    config: EmbeddingBagConfig


@dataclass(frozen=True)
class CafePlan:
    """The physical side of a CAFE collection."""

    groups: Tuple[GroupLayout, ...]
    plain: Tuple[PlainTable, ...]

    def physical_configs(self) -> List[EmbeddingBagConfig]:
        """The inner EmbeddingBagCollection's tables: one per group, then the plain ones."""
        configs = []
        for g in self.groups:
            bound = math.sqrt(1.0 / max(t.logical_rows for t in g.tables))  # the hot rows' (TBE's first fill)
            configs.append(
                EmbeddingBagConfig(
                    name=g.name,
                    embedding_dim=g.dim,
                    num_embeddings=g.physical_rows,
                    feature_names=g.features,
                    pooling=PoolingType.SUM,
                    data_type=g.data_type,
                    weight_init_min=-bound,
                    weight_init_max=bound,
                    init_fn=g.init_weights,
                )
            )
        configs.extend(summing_table(p.config) for p in self.plain)
        return configs


# The paper's code (init_embed.py: compress_threshold = 2000 * compress_rate) leaves a field
# uncompressed when it has at most 2000 / ratio rows; CAFE and every baseline here do the same.
SMALL_TABLE_ROWS = 2000.0


def summing_table(config: EmbeddingBagConfig) -> EmbeddingBagConfig:
    """A logical table as an inner physical table that pools with SUM (the collection divides
    MEAN features itself, by the original bag lengths)."""
    return replace(config, pooling=PoolingType.SUM, feature_names=list(config.feature_names))


def keeps_plain(rows: int, ratio: float, small_table_rows: float = SMALL_TABLE_ROWS) -> bool:
    """Whether a table stays uncompressed (stock rows, row = id mod rows): ratio 1, or at most
    `small_table_rows / ratio` rows (the paper's rule; small_table_rows 0 compresses all)."""
    return ratio <= 1 or rows <= small_table_rows / ratio


def sketch_buckets(hot_rows: int, slots_per_hot_row: float, slots_per_bucket: int) -> int:
    """Buckets of a HotSketch giving `slots_per_hot_row` slots per hot row (at least one)."""
    return max(1, math.ceil(hot_rows * slots_per_hot_row / slots_per_bucket))


def hot_row_bytes(dim: int, config: CafeConfig, bytes_per_value: int = 4, tables: int = 1) -> float:
    """What one hot row costs under `config` (resolved) in a group of `tables` tables: its
    weights, its share of sketch slots, its bit of the free-row bitmap (and policy mark), and
    its owner's table slot where there are several (for the per-table demotion counts)."""
    sketch = config.slots_per_hot_row * SLOT_BYTES + per_row_bytes(config.policy == "adaptive")
    return dim * bytes_per_value + sketch + (ROW_TABLE_BYTES if tables > 1 else 0)


def size_group(name: str, tables: Sequence[EmbeddingBagConfig], configs: Dict[str, CafeConfig]) -> GroupLayout:
    """Hot rows and hashed rows of one group from each table's ratio (the paper's formulas),
    held to the group's budget (GroupLayout.budget_bytes: the bytes of the hashing trick at the
    same ratios):

    hashed rows_t = ceil(rows_t x (1 - hot_share) / ratio_t) (at least one), split
    1 - level2_share : level2_share between two regions when multi-level;
    hot rows = budget x hot_share / (dim x bytes per value + sketch bytes per hot row), then as
    many fewer as it takes for the group's rows to fit the budget (fit_budget: the hashed rows'
    rounding up and the sketch's real bytes come out of the hot rows). Where not one hot row
    fits, the group keeps hashing's rows (ceil(rows_t / ratio_t)) and no hot row; the
    collection warns that it runs as the hashing trick.
    """
    first = configs[tables[0].name].resolved()
    dim, dtype = tables[0].embedding_dim, tables[0].data_type
    width = BYTES_PER_VALUE[dtype]
    hot_share = first.hot_share if first.hot_share is not None else 0.0  # resolved: never None
    per_hot_row = hot_row_bytes(dim, first, width, len(tables))
    layout = GroupLayout(name, dim, dtype, first, 0, _hashed(tables, configs, hot_share))
    hot_rows = int(layout.budget_bytes() * hot_share // per_hot_row)
    layout = fit_budget(replace(layout, hot_rows=hot_rows), per_hot_row)
    if layout.hot_rows == 0:
        layout = replace(layout, tables=_hashed(tables, configs, 0.0))
    if max(layout.hot_rows, *(max(t.level1_rows, t.level2_rows) for t in layout.tables)) > MAX_BOUND:
        raise ValueError(
            f"CAFE group {name!r}: more than 2^31 rows in one region (hot rows or a table's hashed rows); "
            "raise its tables' compression_ratio or split the largest"
        )
    return layout


def _hashed(
    tables: Sequence[EmbeddingBagConfig], configs: Dict[str, CafeConfig], hot_share: float
) -> Tuple[TableLayout, ...]:
    """Each table's hashed rows when `hot_share` of the memory goes to hot rows."""
    out = []
    for t in tables:
        cfg = configs[t.name]
        hashed = max(1, math.ceil(t.num_embeddings * (1 - hot_share) / cfg.compression_ratio))
        level2 = max(1, round(hashed * cfg.level2_share)) if cfg.multi_level else 0
        level1 = max(1, hashed - level2)
        out.append(
            TableLayout(
                t.name, tuple(t.feature_names), t.num_embeddings, cfg.compression_ratio, level1, level2, t.init_fn
            )
        )
    return tuple(out)


def fit_budget(layout: GroupLayout, per_hot_row: float) -> GroupLayout:
    """`layout` with as many hot rows fewer as it takes for its rows (weights, and the sketch
    bytes that grow with the hot rows) to fit its budget_bytes(), down to none. The group's
    bookkeeping is left out of the fit: each table's regions, layout signature and stats
    counters and the sketch's scalars and first bucket (~100 bytes a table, whatever the ratio;
    remap.group_state_bytes of the layout without hot rows). memory() counts it all."""
    from cafe_torchrec.remap import group_state_bytes  # remap builds on this module

    budget = layout.budget_bytes()
    fixed = group_state_bytes(replace(layout, hot_rows=0))
    while layout.hot_rows > 0:
        over = layout.weight_bytes() + group_state_bytes(layout) - fixed - budget
        if over <= 0:
            break
        layout = replace(layout, hot_rows=max(0, layout.hot_rows - max(1, math.ceil(over / per_hot_row))))
    return layout


def plan_tables(tables: Sequence[EmbeddingBagConfig], configs: Dict[str, CafeConfig]) -> CafePlan:
    """Split tables into CAFE groups (by group name and dim) and plain tables; validate."""
    _check_tables(tables, configs)
    grouped: "OrderedDict[Tuple[Optional[str], int], List[EmbeddingBagConfig]]" = OrderedDict()
    plain = []
    for t in tables:
        cfg = configs[t.name]
        if not keeps_plain(t.num_embeddings, cfg.compression_ratio):
            grouped.setdefault((cfg.group, t.embedding_dim), []).append(t)
        else:
            plain.append(PlainTable(t))
    groups = []
    names = {t.name for t in tables}
    for (named, dim), members in grouped.items():
        group = named if named is not None else f"dim{dim}"
        physical = f"cafe_dim{dim}" if named is None else f"cafe_{named}_dim{dim}"
        # a table may share its group's name (it lives inside that physical table); any other
        # table of that name would be a second table so named in plans and constraints
        if physical in names and physical not in {t.name for t in members}:
            raise ValueError(
                f"table {physical!r} has the name of the physical table of CAFE group {group!r} (dim {dim}, "
                f"tables {[t.name for t in members]}); rename that table or give the group another name "
                "(CafeConfig.group)"
            )
        fields = {configs[t.name].group_fields() for t in members}
        if len(fields) > 1:
            raise ValueError(
                f"CAFE group {group!r} (dim {dim}): tables {[t.name for t in members]} differ in "
                "group-level settings (hot_share, threshold, multi_level, decay, sketch, importance, seed)"
            )
        if len({t.data_type for t in members}) > 1:
            raise ValueError(
                f"CAFE group {group!r} (dim {dim}): tables {[t.name for t in members]} differ in data_type"
            )
        if len(members) > MAX_TABLES_PER_GROUP:
            raise ValueError(f"CAFE group {group!r} has {len(members)} tables; at most {MAX_TABLES_PER_GROUP}")
        groups.append(size_group(physical, members, configs))
    return CafePlan(tuple(groups), tuple(plain))


def _check_tables(tables: Sequence[EmbeddingBagConfig], configs: Dict[str, CafeConfig]) -> None:
    check_tables(tables, is_weighted=False, owner="CafeEmbeddingBagCollection")
    for t in tables:
        configs[t.name].validate(f"table {t.name!r}")
