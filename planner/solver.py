"""Budget solving: which tables to compress, how hard, and how to shard them so every rank fits.

Memory is what the budget counts: weights + HotSketch (slots + free list) + optimizer state,
sized by cafe_torchrec.layout (the one place tables are sized) and, for the optimizer, by what
FBGEMM TBE allocates (estimators.optimizer_state_bytes). Per-step input/output buffers are not
part of the budget (the planner reports them apart).

solve_budget takes a fixed ratio (only checked against the budget), else the uniform split (one
ratio for every table, uniform.py), refined by the profiled split when a profile ({feature:
int64 tensor of sampled ids}, e.g. a few batches of the training stream) is given (profiled.py,
value_curves.py). Every candidate is placed on the ranks as placement.py describes (row-wise
for big tables, the others table-wise, largest first) and checked per rank (fitting.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cafe_torchrec.config import CafeConfig
from cafe_torchrec.layout import BYTES_PER_VALUE, CafePlan

from cafe_planner.budget import Budget, rank_caps
from cafe_planner.estimators import OptimizerLike, resolve_optimizer
from cafe_planner.fitting import fits, infeasible_error, plan_and_place
from cafe_planner.placement import Assignment, physical_tables
from cafe_planner.profiled import solve_profiled
from cafe_planner.uniform import bisect_ratio, uniform_configs
from cafe_planner.value_curves import coverage_of, value_curves


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
        """One line for the split, then one per rank: its bytes against its cap, and its tables."""
        r = self.effective_ratio()
        lines = [f"{self.method} split: {self.used:,} of {self.budget:,} bytes ({100 * self.usage:.1f}%), "
                 f"overall ratio {r:.1f}x, optimizer {self.optimizer}, world size {self.world_size}"]
        for rank, (b, c) in enumerate(zip(self.rank_bytes, self.caps)):
            lines.append(f"  rank {rank}: {b:,} / {c:,} bytes: {', '.join(self.assignment.rank_tables[rank])}")
        return "\n".join(lines)


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
        configs = uniform_configs(tables, base, ratio)
        plan, a = plan_and_place(tables, configs, world_size, opt, caps, rw_share)
        if not fits(a, caps):
            raise infeasible_error(tables, configs, world_size, opt, caps, rw_share, f"at the fixed ratio {ratio:g}x")
        return BudgetSolution(configs, plan, world_size, caps, a, opt_name, "fixed", float(ratio))

    ratio_u, plan, a = bisect_ratio(tables, base, world_size, opt, caps, rw_share, max_ratio)
    configs = uniform_configs(tables, base, ratio_u)
    uniform = BudgetSolution(configs, plan, world_size, caps, a, opt_name, "uniform", ratio_u)
    if profile is None:
        return uniform
    curves = value_curves(tables, profile)
    uniform.coverage = coverage_of(uniform.plan, curves)
    solved = solve_profiled(tables, base, world_size, opt, caps, rw_share, ratio_u, curves, spread)
    if solved is None:
        return uniform
    configs, plan, a = solved
    out = BudgetSolution(configs, plan, world_size, caps, a, opt_name, "profile", ratio_u)
    out.coverage = coverage_of(plan, curves)
    return out


def estimate_coverage(plan: Union[CafePlan, "BudgetSolution"], tables: Sequence[EmbeddingBagConfig],
                      profile: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Per logical table, the estimated share of its importance mass (by the profile) that
    gets a row of its own under `plan` (or a solution's plan): plain tables all of it; a group's
    hot rows its most valuable ids across tables, then each table's hashed rows its next ones."""
    plan = plan.plan if isinstance(plan, BudgetSolution) else plan
    return coverage_of(plan, value_curves(tables, profile))
