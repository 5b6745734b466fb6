"""The plan report, built by TorchRec's Stats hook: per physical and logical table, and per rank.

    stats = ReportStats(storage_estimator, perf_estimator, optimizer=..., caps=...)
    EmbeddingShardingPlanner(..., stats=[stats]).plan(module, sharders)
    print(stats.report)          # a PlanReport; .to_dict() for JSON

TorchRec calls ``Stats.log`` with the plan it chose (after the planner's callbacks, so with the
final ranks); ReportStats reads each shard's bytes from CafeStorageEstimator's breakdown (for
tables that are not CAFE's, the stock estimate split into weights, optimizer and buffers) and
the CAFE part of its cost from CafePerfEstimator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints, ShardingOption, Stats, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan

from cafe_planner.estimators import (
    CafePerfEstimator,
    CafeStorageEstimator,
    ShardBytes,
    cafe_module_of,
    effective_optimizer,
    group_layout,
    option_key,
    sharder_fused_params,
)
from cafe_torchrec._torchrec_compat import stock_optimizer_multiplier
from cafe_torchrec.remap import group_state_bytes


class _HoldsState:
    """A row that holds weights, optimizer state and a sketch: a physical table or a rank."""

    weight_bytes: int
    optimizer_bytes: int
    sketch_bytes: int

    @property
    def state_bytes(self) -> int:
        """Weights + optimizer state + sketch: what the memory budget counts."""
        return self.weight_bytes + self.optimizer_bytes + self.sketch_bytes


@dataclass
class LogicalRow:
    """One logical table inside a CAFE group."""

    name: str
    features: List[str]
    logical_rows: int
    hashed_rows: int
    ratio: float
    coverage: Optional[float] = None  # profiled plans: estimated importance mass served


@dataclass
class TableRow(_HoldsState):
    """One physical table: a CAFE group or a plain table, with its sharding and estimates."""

    name: str
    kind: str  # "group" or "plain"
    logical_rows: int
    physical_rows: int
    hot_rows: int
    hashed_rows: int
    dim: int
    weight_bytes: int
    sketch_bytes: int
    optimizer_bytes: int
    io_bytes: int
    ratio: float  # logical bytes / (weights + sketch)
    sharding_type: str
    compute_kernel: str
    ranks: List[int]
    perf_ms: float  # the planner's perf model, summed over shards (CAFE work included)
    cafe_perf_ms: float  # of which CAFE's remap + sketch
    logical: List[LogicalRow] = field(default_factory=list)


@dataclass
class RankRow(_HoldsState):
    """What one rank holds."""

    rank: int
    weight_bytes: int = 0
    optimizer_bytes: int = 0
    sketch_bytes: int = 0
    io_bytes: int = 0
    perf_ms: float = 0.0
    cap: Optional[int] = None
    tables: List[str] = field(default_factory=list)


@dataclass
class PlanReport:
    """The planner's choice, as estimated. Printing it gives the plain-text table."""

    world_size: int
    local_world_size: int  # ranks per host
    compute_device: str
    batch_size: int
    optimizer: str
    calibration: str
    tables: List[TableRow]
    ranks: List[RankRow]
    budget: Optional[int] = None
    notes: List[str] = field(default_factory=list)

    def balance(self) -> float:
        """(max - min) / max of the per-rank state bytes; 0 is perfectly balanced."""
        states = [r.state_bytes for r in self.ranks]
        return (max(states) - min(states)) / max(states) if states and max(states) > 0 else 0.0

    def total_state_bytes(self) -> int:
        return sum(r.state_bytes for r in self.ranks)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        for r, rank_row in zip(out["ranks"], self.ranks):
            r["state_bytes"] = rank_row.state_bytes
        for t, table_row in zip(out["tables"], self.tables):
            t["state_bytes"] = table_row.state_bytes
        out["balance"] = self.balance()
        out["total_state_bytes"] = self.total_state_bytes()
        return out

    def __str__(self) -> str:
        return format_report(self)


def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 1000 else f"{n / size:,.0f} {unit}"
    return f"{int(n)} B"


def grid_lines(headers: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> List[str]:
    """A plain-text table: headers, a rule, one line per row; columns in `left` left-aligned, others right."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def format_report(report: PlanReport) -> str:
    """The plan as plain text: one line per physical table (logical tables of a group indented
    under it), then one line per rank with its bytes and the balance."""
    head = (
        f"CAFE plan: {report.world_size} rank(s) ({report.compute_device}, {report.local_world_size} per host), "
        f"batch {report.batch_size} per rank, "
        f"optimizer {report.optimizer}, perf calibration {report.calibration}"
    )
    headers = [
        "table",
        "logical rows",
        "physical rows",
        "hot rows",
        "hash rows",
        "ratio",
        "weights",
        "sketch",
        "optimizer",
        "sharding",
        "ranks",
        "step cost (ms)",
    ]
    rows: List[Sequence[str]] = []
    for t in report.tables:
        ranks = _ranks(t.ranks)
        cost = f"{t.perf_ms:.4g}" + (f" (cafe {t.cafe_perf_ms:.3g})" if t.cafe_perf_ms else "")
        rows.append(
            [
                t.name,
                f"{t.logical_rows:,}",
                f"{t.physical_rows:,}",
                f"{t.hot_rows:,}" if t.kind == "group" else "-",
                f"{t.hashed_rows:,}" if t.kind == "group" else "-",
                f"{t.ratio:.1f}x",
                human_bytes(t.weight_bytes),
                human_bytes(t.sketch_bytes) if t.kind == "group" else "-",
                human_bytes(t.optimizer_bytes),
                t.sharding_type,
                ranks,
                cost,
            ]
        )
        for lt in t.logical:
            cov = f"  covers {100 * lt.coverage:.0f}%" if lt.coverage is not None else ""
            rows.append(
                [
                    f"  {lt.name}",
                    f"{lt.logical_rows:,}",
                    "",
                    "shared",
                    f"{lt.hashed_rows:,}",
                    f"{lt.ratio:.1f}x",
                    "",
                    "",
                    "",
                    "",
                    "",
                    cov.strip(),
                ]
            )
    lines = [head, ""] + grid_lines(headers, rows)
    rank_headers = [
        "rank",
        "state (w+opt+sketch)",
        "weights",
        "optimizer",
        "sketch",
        "step buffers",
        "cap",
        "step cost (ms)",
        "tables",
    ]
    rank_rows = []
    for r in report.ranks:
        rank_rows.append(
            [
                str(r.rank),
                f"{r.state_bytes:,} B",
                human_bytes(r.weight_bytes),
                human_bytes(r.optimizer_bytes),
                human_bytes(r.sketch_bytes),
                human_bytes(r.io_bytes),
                human_bytes(r.cap),
                f"{r.perf_ms:.4g}",
                ", ".join(r.tables),
            ]
        )
    lines += [""] + grid_lines(rank_headers, rank_rows, left=(0, 8))
    total = report.total_state_bytes()
    tail = f"total {total:,} B ({human_bytes(total)}); per-rank balance (max-min)/max = {100 * report.balance():.2f}%"
    if report.budget is not None:
        tail += f"; budget {report.budget:,} B ({100 * total / report.budget:.1f}% used)"
    lines += ["", tail] + list(report.notes)
    return "\n".join(lines)


def _ranks(ranks: Sequence[int]) -> str:
    ranks = sorted(set(ranks))
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(str(r) for r in ranks)


class ReportStats(Stats):
    """TorchRec's Stats hook that keeps the chosen plan as a PlanReport (module docstring).

    storage / perf: the estimators the planner's enumerator ran (their per-shard records).
    optimizer: the fallback optimizer the storage estimator was given.
    caps: per-rank memory caps, shown beside each rank's bytes.
    coverage: per logical table, the profiled solution's estimated importance mass covered.
    notes: lines printed under the report (the budget split).
    """

    def __init__(
        self,
        storage: CafeStorageEstimator,
        perf: CafePerfEstimator,
        optimizer: Optional[EmbOptimType] = None,
        caps: Optional[Sequence[int]] = None,
        coverage: Optional[Mapping[str, float]] = None,
        notes: Sequence[str] = (),
    ) -> None:
        self.storage = storage
        self.perf = perf
        self.optimizer = optimizer
        self.caps = list(caps) if caps is not None else None
        self.coverage = dict(coverage or {})
        self.notes = list(notes)
        self.report: Optional[PlanReport] = None

    def log(
        self,
        sharding_plan: ShardingPlan,
        topology: Topology,
        batch_size: int,
        storage_reservation: Any,
        num_proposals: int,
        num_plans: int,
        run_time: float,
        best_plan: List[ShardingOption],
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
        sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
        enumerator: Any = None,
        debug: bool = False,
        debug_stats: Any = None,
    ) -> None:
        """Called by EmbeddingShardingPlanner.plan; an empty plan means it found none (and raises next)."""
        if sharding_plan.plan:
            self.report = self.build(best_plan, topology, batch_size, sharders or [], run_time)

    def build(
        self,
        best_plan: Sequence[ShardingOption],
        topology: Topology,
        batch_size: int,
        sharders: Sequence[ModuleSharder[nn.Module]],
        run_time: float,
    ) -> "PlanReport":
        """The PlanReport of `best_plan` (ranks set)."""
        fused = sharder_fused_params(sharders)
        ranks = [RankRow(rank=r, cap=self.caps[r] if self.caps else None) for r in range(topology.world_size)]
        tables: List[TableRow] = []
        optimizers = set()
        for o in best_plan:
            shards = self.storage.breakdown.get(option_key(o)) or [_stock_bytes(o, s) for s in o.shards]
            added = self.perf.added.get(option_key(o)) or [0.0] * len(o.shards)
            if cafe_module_of(o) is not None:
                optimizers.add(effective_optimizer(o.tensor, fused, self.optimizer).value)
            tables.append(_table_row(o, shards, sum(added), self.coverage))
            for s, b in zip(o.shards, shards):
                rr = ranks[s.rank]
                rr.weight_bytes += b.weights
                rr.optimizer_bytes += b.optimizer
                rr.sketch_bytes += b.sketch
                rr.io_bytes += b.io
                rr.perf_ms += s.perf.total if s.perf is not None else 0.0
                if o.name not in rr.tables:
                    rr.tables.append(o.name)
        notes = self.notes + [
            f"TorchRec planning took {run_time:.2f} s; step cost from the TorchRec perf model (ms), "
            "CAFE remap + sketch included"
        ]
        return PlanReport(
            world_size=topology.world_size,
            local_world_size=topology.local_world_size,
            compute_device=topology.compute_device,
            batch_size=batch_size,
            optimizer=", ".join(sorted(optimizers)) or "-",
            calibration=str(self.perf.calibration.get("source", "default")),
            tables=tables,
            ranks=ranks,
            budget=sum(self.caps) if self.caps else None,
            notes=notes,
        )


def _stock_bytes(o: ShardingOption, shard: Any) -> ShardBytes:
    """A table that is not CAFE's: the stock storage estimate split into weights, the stock
    optimizer state and the step buffers."""
    weights = shard.size[0] * shard.size[1] * o.tensor.element_size()
    opt = math.ceil(weights * stock_optimizer_multiplier(o.tensor))
    total = (shard.storage.hbm + shard.storage.ddr) if shard.storage else 0
    return ShardBytes(weights, opt, 0, max(0, total - weights - opt))


def _table_row(
    o: ShardingOption, shards: List[ShardBytes], cafe_perf: float, coverage: Mapping[str, float]
) -> TableRow:
    """One physical table's row: a CAFE group with its logical tables, or a plain table."""
    rows, dim = o.tensor.shape[0], o.tensor.shape[1]
    module = cafe_module_of(o)
    layout = group_layout(module, o.name) if module is not None else None
    common = dict(
        name=o.name,
        physical_rows=rows,
        dim=dim,
        weight_bytes=sum(s.weights for s in shards),
        sketch_bytes=sum(s.sketch for s in shards),
        optimizer_bytes=sum(s.optimizer for s in shards),
        io_bytes=sum(s.io for s in shards),
        sharding_type=o.sharding_type,
        compute_kernel=o.compute_kernel,
        ranks=[s.rank for s in o.shards],
        perf_ms=sum(s.perf.total for s in o.shards if s.perf is not None),
        cafe_perf_ms=cafe_perf,
    )
    if layout is None:
        return TableRow(kind="plain", logical_rows=rows, hot_rows=0, hashed_rows=0, ratio=1.0, **common)
    logical = [
        LogicalRow(t.name, list(t.features), t.logical_rows, t.hashed_rows, t.ratio, coverage.get(t.name))
        for t in layout.tables
    ]
    return TableRow(
        kind="group",
        logical_rows=sum(t.logical_rows for t in layout.tables),
        hot_rows=layout.hot_rows,
        hashed_rows=layout.physical_rows - layout.hot_rows,
        ratio=layout.logical_bytes() / max(1, layout.weight_bytes() + group_state_bytes(layout)),
        logical=logical,
        **common,
    )
