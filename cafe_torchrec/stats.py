"""What a CAFE collection reports, one API for the unsharded and the sharded module.

- ``stats()``: per CAFE group (or this rank's block of it) and per plain table, the hot-row
  occupancy, monotonic counters (lookups, hot and medium lookups, promotions, demotions: reading
  never resets them) and bytes. ``stats_interval(now, before)`` turns two readings into the
  figures of the interval between them (counters subtracted, shares recomputed).
- ``memory()``: the whole collection's logical bytes (at each table's configured dtype),
  physical weight bytes (at the physical tables' real dtype), sketch bytes and the
  compression ratio logical / (weights + sketch), as the paper counts; plus ``local_*`` bytes,
  what this rank holds (everything, unsharded).
- ``describe()``: one line per group and plain table, then the ratio.

Sharded, ``stats()`` is this rank's view (the groups and blocks it holds); add the ranks'
counters for the whole collection. No collective runs inside these calls.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping

from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cafe_torchrec.layout import BYTES_PER_VALUE, CafePlan, GroupLayout
from cafe_torchrec.remap import STAT_COLUMNS, CafeGroupRemap, group_remaps, group_state_bytes

Stats = Dict[str, Dict[str, Any]]
_SHARES = {"hot_lookup_share": "hot_lookups", "medium_lookup_share": "medium_lookups"}


def _with_shares(counts: Dict[str, int]) -> Dict[str, Any]:
    out: Dict[str, Any] = dict(counts)
    for share, counter in _SHARES.items():
        out[share] = counts[counter] / counts["lookups"] if counts["lookups"] else 0.0
    return out


def group_stats(remap: CafeGroupRemap) -> Dict[str, Any]:
    """One group's (or block's) occupancy, counters and bytes."""
    layout = remap.layout
    per_table = remap.counters()
    totals = {name: sum(row[name] for row in per_table) for name in STAT_COLUMNS}
    used = remap.sketch.hot_rows_used()
    out = _with_shares(totals)
    out.update(
        rows=layout.physical_rows,
        hot_rows=layout.hot_rows,
        hot_rows_used=used,
        hot_rows_free=layout.hot_rows - used,
        bytes={"weights": layout.weight_bytes(), "sketch": group_state_bytes(layout)},
    )
    out["tables"] = {
        t.name: {
            "logical_rows": t.logical_rows,
            "level1_rows": t.level1_rows,
            "level2_rows": t.level2_rows,
            **_with_shares(counts),
        }
        for t, counts in zip(layout.tables, per_table)
    }
    return out


def plain_stats(config: EmbeddingBagConfig, rows: int) -> Dict[str, Any]:
    """A plain (uncompressed) table, or this rank's `rows` of it."""
    return {
        "uncompressed": True,
        "rows": rows,
        "bytes": {"weights": rows * config.embedding_dim * BYTES_PER_VALUE[config.data_type], "sketch": 0},
    }


def collection_stats(groups: Iterable[CafeGroupRemap], plain: Mapping[str, int], plan: CafePlan) -> Stats:
    """stats() of a collection holding `groups` and `plain` {table: rows held} of `plan`."""
    out: Stats = {remap.layout.name: group_stats(remap) for remap in groups}
    configs = {p.config.name: p.config for p in plan.plain}
    out.update({name: plain_stats(configs[name], rows) for name, rows in plain.items()})
    return out


def stats_interval(now: Stats, before: Stats) -> Stats:
    """The figures between two stats() readings of one collection: counters subtracted,
    shares recomputed; occupancy and bytes are `now`'s."""
    out: Stats = {}
    for name, entry in now.items():
        prev = before.get(name)
        if prev is None or entry.get("uncompressed"):
            out[name] = entry
            continue
        out[name] = _interval(entry, prev)
        out[name]["tables"] = {t: _interval(row, prev["tables"][t]) for t, row in entry["tables"].items()}
    return out


def _interval(now: Dict[str, Any], before: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(now)
    out.update(_with_shares({c: now[c] - before[c] for c in STAT_COLUMNS}))
    return out


def memory(
    tables: Iterable[EmbeddingBagConfig],
    plan: CafePlan,
    groups: Iterable[CafeGroupRemap],
    plain: Mapping[str, int],
    sketches: Iterable[GroupLayout],
) -> Dict[str, float]:
    """The collection's bytes (see the module docstring); `groups` and `plain` {table: rows}
    are what this rank holds, `sketches` the layouts of every sketch of the collection over all
    ranks (a row-wise group has one per block, each with its own rounded bucket count and fixed
    buffers). Reads no tensor, so it works on the meta device too."""
    logical = sum(t.num_embeddings * t.embedding_dim * BYTES_PER_VALUE[t.data_type] for t in tables)
    configs = {p.config.name: p.config for p in plan.plain}
    weights = sum(g.weight_bytes() for g in plan.groups) + sum(
        plain_stats(c, c.num_embeddings)["bytes"]["weights"] for c in configs.values()
    )
    sketch = sum(group_state_bytes(layout) for layout in sketches)
    held = list(groups)
    return {
        "logical_bytes": logical,
        "weight_bytes": weights,
        "sketch_bytes": sketch,
        "compression_ratio": logical / (weights + sketch),
        "local_weight_bytes": sum(r.layout.weight_bytes() for r in held)
        + sum(plain_stats(configs[name], rows)["bytes"]["weights"] for name, rows in plain.items()),
        "local_sketch_bytes": sum(group_state_bytes(r.layout) for r in held),
    }


def describe(plan: CafePlan, memory_figures: Mapping[str, float]) -> str:
    """One line per group and plain table, then the compression ratio."""
    lines = []
    for g in plan.groups:
        cfg = g.config
        lines.append(
            f"group {g.name}: dim {g.dim}, {g.physical_rows:,} rows ({g.hot_rows:,} hot), "
            f"{_policy(cfg)}, hot share {cfg.hot_share:.2f}, "
            f"{'multi-level' if cfg.multi_level else 'single-level'}, tables "
            + ", ".join(f"{t.name} {t.logical_rows:,}->{t.hashed_rows:,}" for t in g.tables)
        )
    for p in plan.plain:
        lines.append(f"table {p.config.name}: uncompressed ({p.config.num_embeddings:,} rows)")
    m = memory_figures
    lines.append(
        f"compression ratio {m['compression_ratio']:.1f}x "
        f"({m['logical_bytes']:,} -> {m['weight_bytes'] + m['sketch_bytes']:,} bytes)"
    )
    return "\n".join(lines)


def _policy(cfg: Any) -> str:
    if cfg.policy == "paper":
        return f"paper policy (threshold {cfg.threshold:g}, decay {cfg.decay:g})"
    return f"adaptive policy (horizon {cfg.horizon:g}, hysteresis {cfg.hysteresis:g})"


class CollectionReport:
    """stats(), memory() and describe() for the unsharded and the sharded CAFE collection alike:
    the class mixing it in has `plan` (CafePlan), `groups` (the CafeGroupRemaps it holds),
    `embedding_bag_configs()` and `plain_rows()` ({plain table: rows it holds})."""

    plan: CafePlan
    groups: nn.ModuleDict
    embedding_bag_configs: Callable[[], List[EmbeddingBagConfig]]
    plain_rows: Callable[[], Dict[str, int]]

    def stats(self) -> Stats:
        """Per group (or block held) and plain table: hot rows used/free, monotonic counters
        (lookups, hot and medium lookups, promotions, demotions), shares, bytes."""
        return collection_stats(group_remaps(self.groups).values(), self.plain_rows(), self.plan)

    def memory(self) -> Dict[str, float]:
        """Logical and physical bytes and the compression ratio (weights + sketch, as the paper)."""
        return memory(
            self.embedding_bag_configs(),
            self.plan,
            group_remaps(self.groups).values(),
            self.plain_rows(),
            self.sketch_layouts(),
        )

    def sketch_layouts(self) -> List[GroupLayout]:
        """The layout of every sketch of the collection, over all ranks (unsharded: one a group)."""
        return list(self.plan.groups)

    def describe(self) -> str:
        """What the collection chose, one line per group and plain table."""
        return describe(self.plan, self.memory())
