"""The budget solver: which tables to compress, how hard, and how to shard them so every rank fits.

    solution = solve_budget(tables, "2GiB", world_size=4, optimizer="rowwise_adagrad")
    ebc = CafeEmbeddingBagCollection(tables, solution.configs)

solve_budget takes a fixed ratio (only checked against the budget), else the uniform split: one
compression ratio for every table, the smallest that fits every rank, found by bisection in
log(ratio), with the paper's hot share and threshold for that ratio (CafeConfig). A profile
({feature: int64 tensor of sampled ids}, e.g. a few batches of the training stream) refines it
with the profiled split (profiled.py, value_curves.py). Every candidate is a BudgetProblem's
(problem.py): placed on the ranks as placement.py describes and checked per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cafe_planner.estimators import OptimizerLike
from cafe_planner.placement import Assignment, physical_tables
from cafe_planner.problem import Budget, BudgetProblem, bisect_log
from cafe_planner.profiled import solve_profiled
from cafe_planner.value_curves import coverage_of, value_curves
from cafe_torchrec.config import CafeConfig
from cafe_torchrec.layout import BYTES_PER_VALUE, CafePlan
from cafe_torchrec.remap import group_state_bytes


@dataclass
class BudgetSolution:
    """What solve_budget chose for its problem: per-table CafeConfigs, the layout they give, the
    sharding and per-rank bytes (weights + optimizer state + sketch)."""

    problem: BudgetProblem
    configs: Dict[str, CafeConfig]
    plan: CafePlan
    assignment: Assignment
    method: str  # "uniform", "profile" or "fixed"
    uniform_ratio: float
    coverage: Dict[str, float] = field(default_factory=dict)  # profile: estimated importance mass covered

    @property
    def world_size(self) -> int:
        return self.problem.world_size

    @property
    def caps(self) -> Optional[List[int]]:
        return list(self.problem.caps) if self.problem.caps is not None else None

    @property
    def budget(self) -> Optional[int]:
        return self.problem.budget

    @property
    def optimizer(self) -> str:
        return self.problem.optimizer.value if self.problem.optimizer is not None else "sgd"

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
        """Logical bytes / (weights + sketch) over all tables, as the paper counts it, each
        table at its configured dtype on both sides (as the collection's memory() counts)."""
        plain = sum(
            p.config.num_embeddings * p.config.embedding_dim * BYTES_PER_VALUE[p.config.data_type]
            for p in self.plan.plain
        )
        logical = sum(g.logical_bytes() for g in self.plan.groups) + plain
        physical = sum(g.weight_bytes() + group_state_bytes(g) for g in self.plan.groups) + plain
        return logical / physical

    def constraints(self, pooling_factors: Optional[Mapping[str, float]] = None) -> Dict[str, ParameterConstraints]:
        """ParameterConstraints per physical table pinning this solution's sharding type, with
        one pooling factor per feature (default 1.0, or `pooling_factors[feature]`)."""
        pf = pooling_factors or {}
        return {
            t.name: ParameterConstraints(
                sharding_types=[self.sharding[t.name]], pooling_factors=[float(pf.get(f, 1.0)) for f in t.features]
            )
            for t in physical_tables(self.plan)
        }

    def describe(self) -> str:
        """One line for the split, then one per rank: its bytes against its cap, and its tables."""
        budget = (
            f"{self.used:,} of {self.budget:,} bytes ({100 * self.usage:.1f}%)"
            if self.budget
            else f"{self.used:,} bytes"
        )
        lines = [
            f"{self.method} split: {budget}, overall ratio {self.effective_ratio():.1f}x, "
            f"optimizer {self.optimizer}, world size {self.world_size}"
        ]
        caps: Sequence[Optional[int]] = self.caps or [None] * self.world_size
        for rank, (b, c) in enumerate(zip(self.rank_bytes, caps)):
            cap = f" / {c:,}" if c is not None else ""
            lines.append(f"  rank {rank}: {b:,}{cap} bytes: {', '.join(self.assignment.rank_tables[rank])}")
        return "\n".join(lines)


def solve_budget(
    tables: Sequence[EmbeddingBagConfig],
    budget: Optional[Budget],
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
    cap per rank; None: no budget, with a fixed `ratio`) on `world_size` ranks, counting
    weights + sketch + `optimizer` state.

    ratio: a fixed common ratio (no search; the budget is only checked). Otherwise the uniform
    split (bisection on one ratio), refined by `profile` when given (see the module docstring).
    Raises ValueError naming the rank (and its tables) or the table that does not fit and the
    shortfall in bytes when even `max_ratio` (or the fixed ratio) does not fit.
    """
    problem = BudgetProblem.create(tables, world_size, budget, optimizer, base, rw_share)
    problem.base.validate("base config")  # a config error is the config's, not the budget's
    if ratio is not None:
        configs = uniform_configs(problem, ratio)
        plan, a = problem.place(configs)
        if not problem.fits(a):
            raise problem.infeasible(configs, f"at the fixed ratio {ratio:g}x")
        return BudgetSolution(problem, configs, plan, a, "fixed", float(ratio))
    if problem.caps is None:
        raise ValueError("solve_budget needs a budget or a fixed ratio")

    ratio_u, plan, a = bisect_ratio(problem, max_ratio)
    uniform = BudgetSolution(problem, uniform_configs(problem, ratio_u), plan, a, "uniform", ratio_u)
    if profile is None:
        return uniform
    curves = value_curves(problem.tables, profile)
    uniform.coverage = coverage_of(uniform.plan, curves)
    solved = solve_profiled(problem, ratio_u, curves, spread)
    if solved is None:
        return uniform
    configs, plan, a = solved
    return BudgetSolution(problem, configs, plan, a, "profile", ratio_u, coverage_of(plan, curves))


def uniform_configs(problem: BudgetProblem, ratio: float) -> Dict[str, CafeConfig]:
    """The problem's base config at `ratio` for every table."""
    return {t.name: replace(problem.base, compression_ratio=float(ratio)) for t in problem.tables}


def bisect_ratio(problem: BudgetProblem, max_ratio: float) -> Tuple[float, CafePlan, Assignment]:
    """The smallest common ratio in [1, max_ratio] whose plan fits every rank."""

    def attempt(r: float) -> Optional[Tuple[CafePlan, Assignment]]:
        return problem.fitting(uniform_configs(problem, r))

    found = attempt(1.0)
    if found is not None:
        return 1.0, found[0], found[1]
    best = attempt(max_ratio)
    if best is None:
        raise problem.infeasible(
            uniform_configs(problem, max_ratio), f"even at the highest ratio tried ({max_ratio:g}x)"
        )
    # log(ratio): 0 (ratio 1) does not fit, log(max_ratio) fits
    hi, fits = bisect_log(attempt, 0.0, math.log(max_ratio), best, 1e-5)
    assert fits is not None  # bisect_log keeps the last plan that fits, and max_ratio fits
    return math.exp(hi), fits[0], fits[1]


def estimate_coverage(
    plan: Union[CafePlan, BudgetSolution], tables: Sequence[EmbeddingBagConfig], profile: Mapping[str, torch.Tensor]
) -> Dict[str, float]:
    """Per logical table, the estimated share of its importance mass (by the profile) that
    gets a row of its own under `plan` (or a solution's plan): plain tables all of it; a group's
    hot rows its most valuable ids across tables, then each table's hashed rows its next ones."""
    plan = plan.plan if isinstance(plan, BudgetSolution) else plan
    return coverage_of(plan, value_curves(tables, profile))
