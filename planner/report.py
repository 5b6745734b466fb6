"""The plan report: per physical and logical table, and per rank, as plain text or a dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence


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
        for r, row in zip(out["ranks"], self.ranks):
            r["state_bytes"] = row.state_bytes
        for t, row in zip(out["tables"], self.tables):
            t["state_bytes"] = row.state_bytes
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


def _grid(headers: Sequence[str], rows: List[Sequence[str]], left: Sequence[int] = (0,)) -> List[str]:
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def format_report(report: PlanReport) -> str:
    """The plan as plain text: one line per physical table (logical tables of a group indented
    under it), then one line per rank with its bytes and the balance."""
    head = (f"CAFE plan: {report.world_size} rank(s) ({report.compute_device}), batch {report.batch_size} per rank, "
            f"optimizer {report.optimizer}, perf calibration {report.calibration}")
    headers = ["table", "logical rows", "physical rows", "hot rows", "hash rows", "ratio", "weights", "sketch",
               "optimizer", "sharding", "ranks", "step cost (ms)"]
    rows: List[Sequence[str]] = []
    for t in report.tables:
        ranks = _ranks(t.ranks)
        cost = f"{t.perf_ms:.4g}" + (f" (cafe {t.cafe_perf_ms:.3g})" if t.cafe_perf_ms else "")
        rows.append([t.name, f"{t.logical_rows:,}", f"{t.physical_rows:,}", f"{t.hot_rows:,}" if t.kind == "group" else "-",
                     f"{t.hashed_rows:,}" if t.kind == "group" else "-", f"{t.ratio:.1f}x", human_bytes(t.weight_bytes),
                     human_bytes(t.sketch_bytes) if t.kind == "group" else "-", human_bytes(t.optimizer_bytes),
                     t.sharding_type, ranks, cost])
        for lt in t.logical:
            cov = f"  covers {100 * lt.coverage:.0f}%" if lt.coverage is not None else ""
            rows.append([f"  {lt.name}", f"{lt.logical_rows:,}", "", "shared", f"{lt.hashed_rows:,}", f"{lt.ratio:.1f}x",
                         "", "", "", "", "", cov.strip()])
    lines = [head, ""] + _grid(headers, rows)
    rank_headers = ["rank", "state (w+opt+sketch)", "weights", "optimizer", "sketch", "step buffers", "cap", "step cost (ms)", "tables"]
    rank_rows = []
    for r in report.ranks:
        rank_rows.append([str(r.rank), f"{r.state_bytes:,} B", human_bytes(r.weight_bytes), human_bytes(r.optimizer_bytes),
                          human_bytes(r.sketch_bytes), human_bytes(r.io_bytes), human_bytes(r.cap), f"{r.perf_ms:.4g}",
                          ", ".join(r.tables)])
    lines += [""] + _grid(rank_headers, rank_rows, left=(0, 8))
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
