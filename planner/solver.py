"""Budget solving: which tables to compress, how hard, and how to shard them so every rank fits.

Memory is what the budget counts: weights + HotSketch (slots + free list) + optimizer state,
sized by cafe_torchrec.layout (the one place tables are sized) and, for the optimizer, by what
FBGEMM TBE allocates (estimators.optimizer_state_bytes). Per-step input/output buffers are not
part of the budget (the planner reports them apart).

Sharding (``assign``): a physical table bigger than ``rw_share`` (default 5%) of a rank's fair
share (total / world size) is sharded row-wise, so every rank holds an equal block of it (for a
CAFE group, a block with its own hot rows, hashed rows and sketch); the others are table-wise,
placed largest first on the rank with the most room left (LPT). Tables of at most 5% of a rank
placed this way leave ranks within about 5% of each other.

Without a profile (``solve_budget(..., profile=None)``): one compression ratio for every table,
the smallest that fits every rank, found by bisection in log(ratio); hot share and threshold
are the paper's defaults for that ratio (CafeConfig).

With a profile ({feature: int64 tensor of sampled ids}, e.g. a few batches of the training
stream): rows go where skew buys the most importance mass. Importance is normalised per feature
to mean 1 per occurrence (as CAFE scores it), so an id's value is its share of its table's
occurrences times the table's occurrences per sample (all features are assumed sampled over the
same samples). Per table the sampled counts give a decreasing value curve v_t(k) of the k-th
most frequent id; ids not seen in the sample share the Good-Turing unseen mass (singletons /
sample size), spread over the remaining rows as a power law fitted to the sampled rank-frequency
slope, so the curve stays continuous. Given a price lambda per byte, table t wants the ids worth
covering, r_t = #{k : v_t(k) >= lambda x bytes per row_t} (greedy marginal allocation: with
concave coverage curves, taking rows in order of value per byte is optimal for the relaxation).
A CAFE group's shared hot pool of H rows serves the group's H most valuable ids across its tables
(h_t of them from table t), so table t gets x_t = r_t - h_t hashed rows, and H is what the
group's hot share funds from those hashed rows (H = hot_share / (1 - hot_share) x hashed bytes /
bytes per hot row, solved by bisection). A table that wants nearly all its ids stays plain. lambda
is bisected until the plan fills the tightest rank. No table is compressed more than ``spread``
(default 10) times harder than the uniform ratio, so every table keeps a usable hashed region.
The per-table ratios are set so that layout.size_group gives exactly x_t hashed rows, with the
group's hot share and threshold fixed to the uniform solution's (the paper's defaults for the
overall ratio).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import calculate_shard_sizes_and_offsets
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cafe_torchrec.config import CafeConfig, default_hot_share, default_threshold
from cafe_torchrec.layout import BYTES_PER_VALUE, CafePlan, GroupLayout, hot_row_bytes, plan_tables

from cafe_planner.estimators import OptimizerLike, ShardBytes, optimizer_state_bytes, resolve_optimizer

TW, RW = ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value
Budget = Union[int, float, str, Sequence[Union[int, float, str]]]
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Union[int, float, str]) -> int:
    """Bytes from 123, 1.5e9, '512MiB', '2GiB', '1.5GB', '64k' (binary units with 'i')."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a byte size from {value!r} (e.g. 2GiB, 512MiB, 1.5GB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def rank_caps(budget: Budget, world_size: int) -> List[int]:
    """Per-rank caps: a total budget is split evenly; a sequence gives one cap per rank."""
    if isinstance(budget, (list, tuple)):
        if len(budget) != world_size:
            raise ValueError(f"{len(budget)} per-rank caps for a world size of {world_size}")
        return [parse_bytes(b) for b in budget]
    total = parse_bytes(budget)
    return [total // world_size + (1 if r < total % world_size else 0) for r in range(world_size)]


# ---------------------------------------------------------------- physical tables and shards
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


# ---------------------------------------------------------------- solutions
@dataclass
class BudgetSolution:
    """What solve_budget chose: per-table CafeConfigs, the layout they give, the sharding and
    per-rank bytes (weights + optimizer state + sketch)."""

    configs: Dict[str, CafeConfig]
    plan: CafePlan
    world_size: int
    caps: List[int]
    assignment: Assignment
    optimizer: str
    method: str  # "uniform", "profile" or "fixed"
    uniform_ratio: float
    coverage: Dict[str, float] = field(default_factory=dict)  # profile: estimated importance mass covered

    @property
    def budget(self) -> int:
        return sum(self.caps)

    @property
    def rank_bytes(self) -> List[int]:
        return self.assignment.rank_bytes

    @property
    def used(self) -> int:
        return sum(self.assignment.rank_bytes)

    @property
    def usage(self) -> float:
        return self.used / self.budget if self.budget else float("nan")

    @property
    def sharding(self) -> Dict[str, str]:
        return self.assignment.sharding

    def ratios(self) -> Dict[str, float]:
        """Each logical table's compression ratio (1 for tables left plain)."""
        compressed = {t.name: t.ratio for g in self.plan.groups for t in g.tables}
        return {name: compressed.get(name, 1.0) for name in self.configs}

    def effective_ratio(self) -> float:
        """Logical bytes / (weights + sketch) over all tables, as the paper counts it."""
        logical = sum(t.logical_rows * g.dim * 4 for g in self.plan.groups for t in g.tables)
        logical += sum(p.config.num_embeddings * p.config.embedding_dim * 4 for p in self.plan.plain)
        physical = sum(g.weight_bytes() + g.sketch_bytes() for g in self.plan.groups)
        physical += sum(p.config.num_embeddings * p.config.embedding_dim * BYTES_PER_VALUE[p.config.data_type] for p in self.plan.plain)
        return logical / physical

    def constraints(self, pooling_factors: Optional[Mapping[str, float]] = None) -> Dict[str, ParameterConstraints]:
        """ParameterConstraints per physical table pinning this solution's sharding type, with
        one pooling factor per feature (default 1.0, or `pooling_factors[feature]`)."""
        pf = pooling_factors or {}
        out = {}
        for t in physical_tables(self.plan):
            out[t.name] = ParameterConstraints(sharding_types=[self.sharding[t.name]],
                                               pooling_factors=[float(pf.get(f, 1.0)) for f in t.features])
        return out

    def describe(self) -> str:
        r = self.effective_ratio()
        lines = [f"{self.method} split: {self.used:,} of {self.budget:,} bytes ({100 * self.usage:.1f}%), "
                 f"overall ratio {r:.1f}x, optimizer {self.optimizer}, world size {self.world_size}"]
        for rank, (b, c) in enumerate(zip(self.rank_bytes, self.caps)):
            lines.append(f"  rank {rank}: {b:,} / {c:,} bytes: {', '.join(self.assignment.rank_tables[rank])}")
        return "\n".join(lines)


def _uniform_configs(tables: Sequence[EmbeddingBagConfig], base: CafeConfig, ratio: float) -> Dict[str, CafeConfig]:
    return {t.name: replace(base, compression_ratio=float(ratio)) for t in tables}


def _evaluate(tables, configs, world_size, optimizer, caps, rw_share) -> Tuple[CafePlan, Assignment]:
    plan = plan_tables(tables, configs)
    return plan, assign(physical_tables(plan), world_size, optimizer, caps, rw_share=rw_share)


def _fits(assignment: Assignment, caps: Sequence[int]) -> bool:
    return all(b <= c for b, c in zip(assignment.rank_bytes, caps))


def _infeasible(tables, configs, world_size, optimizer, caps, rw_share, what: str) -> ValueError:
    try:
        plan, a = _evaluate(tables, configs, world_size, optimizer, caps, rw_share)
    except ValueError as e:  # a layout that cannot even be built (e.g. row-wise blocks too small)
        return ValueError(f"memory budget of {sum(caps):,} bytes is infeasible {what}: {e}")
    biggest = max(caps)
    for t in physical_tables(plan):
        if a.sharding[t.name] == TW:
            need = a.shards[t.name][0].state
            if need > biggest:
                return ValueError(f"memory budget infeasible {what}: table {t.name} needs {need:,} bytes on one rank "
                                  f"but the largest rank cap is {biggest:,}: short by {need - biggest:,} bytes")
    msg = shortfall_message(a, caps, f"memory budget of {sum(caps):,} bytes is infeasible {what}")
    return ValueError(msg or f"memory budget infeasible {what}")


def solve_budget(
    tables: Sequence[EmbeddingBagConfig],
    budget: Budget,
    world_size: int,
    optimizer: OptimizerLike = "sgd",
    base: Optional[CafeConfig] = None,
    profile: Optional[Mapping[str, torch.Tensor]] = None,
    ratio: Optional[float] = None,
    max_ratio: float = 1e5,
    rw_share: float = 0.05,
    spread: float = 10.0,
) -> BudgetSolution:
    """Per-table CafeConfigs and sharding that fit `budget` (total bytes, split evenly, or one
    cap per rank) on `world_size` ranks, counting weights + sketch + `optimizer` state.

    ratio: a fixed common ratio (no search; the budget is only checked). Otherwise the uniform
    split (bisection on one ratio), refined by `profile` when given (see the module docstring).
    Raises ValueError naming the rank (and its tables) or the table that does not fit and the
    shortfall in bytes when even `max_ratio` (or the fixed ratio) does not fit.
    """
    base = base or CafeConfig()
    caps = rank_caps(budget, world_size)
    opt = resolve_optimizer(optimizer)
    opt_name = opt.value if opt is not None else "sgd"
    tables = list(tables)
    if ratio is not None:
        configs = _uniform_configs(tables, base, ratio)
        plan, a = _evaluate(tables, configs, world_size, opt, caps, rw_share)
        if not _fits(a, caps):
            raise _infeasible(tables, configs, world_size, opt, caps, rw_share, f"at the fixed ratio {ratio:g}x")
        return BudgetSolution(configs, plan, world_size, caps, a, opt_name, "fixed", float(ratio))

    ratio_u, plan, a = _bisect_ratio(tables, base, world_size, opt, caps, rw_share, max_ratio)
    configs = _uniform_configs(tables, base, ratio_u)
    uniform = BudgetSolution(configs, plan, world_size, caps, a, opt_name, "uniform", ratio_u)
    if profile is None:
        return uniform
    curves = _value_curves(tables, profile)
    uniform.coverage = _coverage_of(uniform.plan, curves)
    solved = _solve_profiled(tables, base, world_size, opt, caps, rw_share, ratio_u, curves, spread)
    if solved is None:
        return uniform
    configs, plan, a = solved
    out = BudgetSolution(configs, plan, world_size, caps, a, opt_name, "profile", ratio_u)
    out.coverage = _coverage_of(plan, curves)
    return out


def _bisect_ratio(tables, base, world_size, opt, caps, rw_share, max_ratio):
    """The smallest common ratio in [1, max_ratio] whose plan fits every rank."""

    def attempt(r: float):
        try:
            plan, a = _evaluate(tables, _uniform_configs(tables, base, r), world_size, opt, caps, rw_share)
        except ValueError:
            return None
        return (plan, a) if _fits(a, caps) else None

    found = attempt(1.0)
    if found is not None:
        return 1.0, found[0], found[1]
    best = attempt(max_ratio)
    if best is None:
        raise _infeasible(tables, _uniform_configs(tables, base, max_ratio), world_size, opt, caps, rw_share,
                          f"even at the highest ratio tried ({max_ratio:g}x)")
    lo, hi = 0.0, math.log(max_ratio)  # log(ratio): lo does not fit, hi fits
    for _ in range(60):
        if hi - lo < 1e-5:
            break
        mid = 0.5 * (lo + hi)
        got = attempt(math.exp(mid))
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
    return math.exp(hi), best[0], best[1]


# ---------------------------------------------------------------- profile-driven split
@dataclass
class _Curve:
    """Decreasing value of a table's k-th most valuable id: sampled head, power-law tail."""

    rows: int
    head: np.ndarray  # values of the seen ids, descending
    tail_coef: float  # tail value at rank k (k > len(head)): tail_coef * k^-tail_exp
    tail_exp: float
    total: float  # value of all the table's ids

    def count_at_least(self, tau: float) -> float:
        """How many ids are worth at least tau (fractional in the tail)."""
        if tau <= 0:
            return float(self.rows)
        d = len(self.head)
        seen = int(np.searchsorted(-self.head, -tau, side="right"))
        if self.tail_coef <= 0 or d >= self.rows:
            return float(min(seen, self.rows))
        k = (self.tail_coef / tau) ** (1.0 / self.tail_exp)  # tail ranks d+1..k are worth >= tau
        return float(min(seen + max(0.0, min(k, self.rows) - d), self.rows))

    def mass_of_top(self, k: float) -> float:
        """Value covered by the k most valuable ids."""
        d = len(self.head)
        k = max(0.0, min(k, float(self.rows)))
        if k <= d:
            whole = int(k)
            return float(self._head_cum[whole - 1] if whole else 0.0) + (k - whole) * (self.head[whole] if whole < d else 0.0)
        return float(self._head_cum[-1] if d else 0.0) + self._tail_mass(d, k)

    def _tail_mass(self, a: float, b: float) -> float:
        s, c = self.tail_exp, self.tail_coef
        if c <= 0 or b <= a:
            return 0.0
        lo, hi = a + 0.5, b + 0.5  # midpoint rule for sum_{k=a+1}^{b} c k^-s
        return c * (math.log(hi / lo) if abs(s - 1) < 1e-9 else (hi ** (1 - s) - lo ** (1 - s)) / (1 - s))

    def __post_init__(self) -> None:
        self._head_cum = np.cumsum(self.head) if len(self.head) else np.zeros(0)


def _value_curves(tables: Sequence[EmbeddingBagConfig], profile: Mapping[str, torch.Tensor]) -> Dict[str, _Curve]:
    sizes = {f: int(torch.as_tensor(ids).numel()) for f, ids in profile.items()}
    known = [n for n in sizes.values() if n > 0]
    per_feature = float(np.mean(known)) if known else 1.0
    curves = {}
    for t in tables:
        ids = [torch.as_tensor(profile[f]).reshape(-1).to(torch.int64) for f in t.feature_names if f in profile]
        ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
        n = ids.numel()
        mass = n / per_feature if n else float(len(t.feature_names))  # occurrences per sample, relative
        rows = t.num_embeddings
        if n == 0:  # nothing known: every id equally valuable
            curves[t.name] = _Curve(rows, np.zeros(0), mass / rows, 1e-6, mass)
            continue
        counts = torch.unique(torch.remainder(ids, rows), return_counts=True)[1].sort(descending=True).values.double().numpy()
        d = len(counts)
        unseen_rows = rows - d
        singletons = float((counts == 1).sum())
        unseen = min(singletons / n, 0.5) if unseen_rows > 0 else 0.0
        head = _smooth(counts) / n * (1.0 - unseen) * mass
        tail_exp = _fit_exponent(counts)
        tail_coef = 0.0
        if unseen > 0:
            probe = _Curve(rows, np.zeros(d), 1.0, tail_exp, 0.0)
            z = probe._tail_mass(d, rows)
            tail_coef = unseen * mass / z if z > 0 else 0.0
        curves[t.name] = _Curve(rows, head, tail_coef, tail_exp, mass)
    return curves


def _smooth(counts: np.ndarray) -> np.ndarray:
    """Descending counts with ties spread evenly over [c - 1/2, c + 1/2): a run of ids seen
    equally often (thousands of singletons) then fills row by row instead of all at once, so
    the allocation is continuous in the price."""
    values = counts.astype(np.float64)
    if len(values) == 0:
        return values
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    sizes = np.diff(np.r_[starts, len(values)])
    position = np.arange(len(values)) - np.repeat(starts, sizes)
    return values + 0.5 - (position + 0.5) / np.repeat(sizes, sizes)


def estimate_coverage(plan: Union[CafePlan, "BudgetSolution"], tables: Sequence[EmbeddingBagConfig],
                      profile: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Per logical table, the estimated share of its importance mass (by the profile) that
    gets a row of its own under `plan` (or a solution's plan): plain tables all of it; a group's
    hot rows its most valuable ids across tables, then each table's hashed rows its next ones."""
    plan = plan.plan if isinstance(plan, BudgetSolution) else plan
    return _coverage_of(plan, _value_curves(tables, profile))


def _fit_exponent(counts: np.ndarray) -> float:
    """Zipf exponent from the reliable part (count >= 3) of a rank-frequency list; 1.0 if too short."""
    m = int((counts >= 3).sum())
    if m < 5:
        return 1.0
    ranks = np.log(np.arange(1, m + 1))
    slope = np.polyfit(ranks, np.log(counts[:m]), 1)[0]
    return float(min(max(-slope, 0.05), 3.0))


def _coverage_of(plan: CafePlan, curves: Mapping[str, _Curve]) -> Dict[str, float]:
    """Estimated share of each table's importance mass served by its own row: plain tables all;
    a group's hot rows serve its most valuable ids across tables, then each table's hashed rows
    its next ones."""
    out = {p.config.name: 1.0 for p in plan.plain}
    for g in plan.groups:
        members = [curves[t.name] for t in g.tables]
        hot = _hot_split(members, g.hot_rows)
        for t, c, h in zip(g.tables, members, hot):
            out[t.name] = c.mass_of_top(h + t.hashed_rows) / c.total if c.total > 0 else 0.0
    return out


def _top_value(curves: Sequence[_Curve]) -> float:
    return max(max((c.head[0] if len(c.head) else c.tail_coef * (len(c.head) + 1) ** -c.tail_exp) for c in curves), 1e-300)


def _hot_split(curves: Sequence[_Curve], hot_rows: float) -> List[float]:
    """How many of the group's hot rows each table's ids take: the hot_rows most valuable ids."""
    if hot_rows <= 0:
        return [0.0] * len(curves)
    if hot_rows >= sum(c.rows for c in curves):
        return [float(c.rows) for c in curves]
    lo, hi = math.log(_top_value(curves)) - 80.0, math.log(_top_value(curves))  # count(e^lo) >= hot_rows
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if sum(c.count_at_least(math.exp(mid)) for c in curves) >= hot_rows:
            lo = mid
        else:
            hi = mid
    counts = [c.count_at_least(math.exp(lo)) for c in curves]
    scale = hot_rows / sum(counts) if sum(counts) > 0 else 0.0
    return [n * scale for n in counts]


def _hot_and_hashed(curves: Sequence[_Curve], want: Sequence[float], floor: Sequence[float], kappa: float) -> List[float]:
    """Hashed rows per table when the group's hot pool H holds its most valuable ids and is
    funded by the hashed rows: H = kappa * sum_t max(floor_t, want_t - hot_t(H)). Bisection on
    the hot pool's value threshold (the pool grows as the threshold falls)."""
    top = _top_value(curves)
    lo, hi = math.log(top) - 80.0, math.log(top) + 1.0

    def hashed_at(log_tau: float) -> Tuple[float, List[float]]:
        tau = math.exp(log_tau)
        hot = [c.count_at_least(tau) for c in curves]
        return sum(hot), [max(f, w - h) for w, f, h in zip(want, floor, hot)]

    for _ in range(50):
        mid = 0.5 * (lo + hi)
        pool, hashed = hashed_at(mid)
        if pool > kappa * sum(hashed):
            lo = mid  # pool too big for what the hashed rows fund: raise the threshold
        else:
            hi = mid
    return hashed_at(hi)[1]


def _solve_profiled(tables, base, world_size, opt, caps, rw_share, ratio_u, curves, spread):
    """Bisect the price per byte until the profiled allocation fills the tightest rank."""
    hot_share = base.hot_share if base.hot_share is not None else default_hot_share(ratio_u)
    threshold = base.threshold if base.threshold is not None else default_threshold(ratio_u)
    fixed = replace(base, hot_share=hot_share, threshold=threshold)
    groups: Dict[Tuple[str, int], List[EmbeddingBagConfig]] = {}
    for t in tables:
        groups.setdefault((base.group or f"dim{t.embedding_dim}", t.embedding_dim), []).append(t)
    opt_row = {t.name: optimizer_state_bytes(opt, 1, t.embedding_dim) for t in tables}
    row_bytes = {t.name: t.embedding_dim * BYTES_PER_VALUE[t.data_type] + opt_row[t.name] for t in tables}
    floor_ratio = spread * ratio_u

    def configs_at(price: float) -> Dict[str, CafeConfig]:
        configs: Dict[str, CafeConfig] = {}
        for (_, dim), members in groups.items():
            width = BYTES_PER_VALUE[members[0].data_type]
            kappa = hot_share / (1 - hot_share) * dim * width / hot_row_bytes(dim, base.slots_per_bucket, width)
            want = [curves[t.name].count_at_least(price * row_bytes[t.name]) for t in members]
            floor = [max(1.0, t.num_embeddings * (1 - hot_share) / floor_ratio) for t in members]
            hashed = dict(zip((t.name for t in members), _hot_and_hashed([curves[t.name] for t in members], want, floor, kappa)))
            want = dict(zip((t.name for t in members), want))
            for t in members:
                rows = t.num_embeddings
                x = hashed[t.name]
                if x >= rows * (1 - hot_share):
                    configs[t.name] = replace(fixed, compression_ratio=1.0)  # wants (nearly) every id: plain
                else:
                    configs[t.name] = replace(fixed, compression_ratio=max(1.0, rows * (1 - hot_share) / x))
        return configs

    def evaluate(configs: Dict[str, CafeConfig]):
        try:
            plan, a = _evaluate(tables, configs, world_size, opt, caps, rw_share)
        except ValueError:
            return None
        return (configs, plan, a) if _fits(a, caps) else None

    top = _top_value(list(curves.values()))
    hi_price = top / min(row_bytes.values()) * 2  # nothing is worth this: every table at its floor

    def bisect(frozen: Dict[str, CafeConfig]):
        """(best fitting solution, configs of the cheapest failing price) for the price bisection."""
        failed: List[Dict[str, CafeConfig]] = []

        def attempt(price: float):
            configs = {**configs_at(price), **frozen}
            got = evaluate(configs)
            if got is None:
                failed[:] = [configs]
            return got

        best = attempt(hi_price)
        if best is None:
            return None, None
        lo, hi = math.log(hi_price) - 80.0, math.log(hi_price)  # log(price): hi fits
        got = attempt(math.exp(lo))
        if got is not None:
            return got, None
        for _ in range(60):
            if hi - lo < 1e-6:
                break
            mid = 0.5 * (lo + hi)
            got = attempt(math.exp(mid))
            if got is None:
                lo = mid
            else:
                hi, best = mid, got
        return best, failed[0] if failed else None

    # Tables whose size jumps at the final price (a small table turning plain: the paper's rule
    # keeps tables of <= 2000 / ratio rows uncompressed) differ between the last plan that fits
    # and the first that does not. Take their larger setting if it fits; else freeze them at the
    # smaller one and bisect again, so the other tables use the bytes left.
    frozen: Dict[str, CafeConfig] = {}
    overall = None
    for _ in range(4):
        best, over = bisect(frozen)
        if best is None:
            break
        jumping = [t.name for t in tables if over is not None and over[t.name] != best[0][t.name] and t.name not in frozen]
        for name in jumping:
            got = evaluate({**best[0], name: over[name]})
            if got is not None:
                best = got
        if overall is None or sum(best[2].rank_bytes) > sum(overall[2].rank_bytes):
            overall = best
        if not jumping:
            break
        frozen.update({name: best[0][name] for name in jumping})
    return overall
