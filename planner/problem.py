"""The budget problem: which tables, on how many ranks, under which per-rank caps, counting which optimizer.

    problem = BudgetProblem.create(tables, world_size=4, budget="2GiB", optimizer="rowwise_adagrad")
    found = problem.fitting(configs)     # (CafePlan, Assignment) when every rank fits, else None

Memory is what the budget counts: weights + HotSketch (slots + free list) + optimizer state,
sized by cafe_torchrec.layout (the one place tables are sized) and, for the optimizer, by what
FBGEMM TBE allocates (estimators.optimizer_state_bytes). Both budget splits (solver.py: fixed
and uniform ratio; profiled.py) try candidate CafeConfigs against one BudgetProblem and search
with ``bisect_log``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cafe_planner.estimators import OptimizerLike, resolve_optimizer
from cafe_planner.placement import TW, Assignment, assign, over_budget_message, physical_tables
from cafe_torchrec.config import CafeConfig
from cafe_torchrec.layout import CafePlan, plan_tables

Budget = Union[int, float, str, Sequence[Union[int, float, str]]]
Fit = TypeVar("Fit")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


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
    assert isinstance(budget, (int, float, str))
    total = parse_bytes(budget)
    return [total // world_size + (1 if r < total % world_size else 0) for r in range(world_size)]


@dataclass(frozen=True)
class BudgetProblem:
    """Logical tables to fit on `world_size` ranks, each rank within its cap.

    caps: bytes per rank (weights + sketch + optimizer state); None when there is no budget
        (every layout fits; only the layout and the sharding are chosen).
    optimizer: the embedding optimizer whose TBE state is counted (None: SGD, no state).
    base: the CafeConfig every candidate starts from (its ratio is what the splits change).
    rw_share: a physical table above this share of a rank's fair share is sharded row-wise
        (placement.choose_sharding).
    """

    tables: Tuple[EmbeddingBagConfig, ...]
    world_size: int
    caps: Optional[Tuple[int, ...]] = None
    optimizer: Optional[EmbOptimType] = None
    base: CafeConfig = field(default_factory=CafeConfig)
    rw_share: float = 0.05

    @classmethod
    def create(
        cls,
        tables: Sequence[EmbeddingBagConfig],
        world_size: int,
        budget: Optional[Budget] = None,
        optimizer: OptimizerLike = None,
        base: Optional[CafeConfig] = None,
        rw_share: float = 0.05,
    ) -> "BudgetProblem":
        """From a budget as users write it (total bytes or '2GiB', split evenly, or one cap per
        rank) and an optimizer name or class."""
        caps = tuple(rank_caps(budget, world_size)) if budget is not None else None
        return cls(tuple(tables), world_size, caps, resolve_optimizer(optimizer), base or CafeConfig(), rw_share)

    @property
    def budget(self) -> Optional[int]:
        """The caps' total (None without a budget)."""
        return sum(self.caps) if self.caps is not None else None

    def place(self, configs: Dict[str, CafeConfig]) -> Tuple[CafePlan, Assignment]:
        """The layout `configs` give and where its physical tables go (ValueError: no such layout)."""
        plan = plan_tables(self.tables, configs)
        return plan, assign(
            physical_tables(plan), self.world_size, self.optimizer, caps=self.caps, rw_share=self.rw_share
        )

    def fits(self, assignment: Assignment) -> bool:
        """Every rank within its cap (always, without a budget)."""
        return self.caps is None or all(b <= c for b, c in zip(assignment.rank_bytes, self.caps))

    def fitting(self, configs: Dict[str, CafeConfig]) -> Optional[Tuple[CafePlan, Assignment]]:
        """place()'s (plan, assignment) when the layout exists and every rank fits; else None."""
        try:
            plan, a = self.place(configs)
        except ValueError:
            return None
        return (plan, a) if self.fits(a) else None

    def infeasible(self, configs: Dict[str, CafeConfig], what: str) -> ValueError:
        """The error for configs that do not fit: the table too big for any rank, or the ranks
        that overflow (with what they hold) and the shortfall in bytes."""
        assert self.caps is not None, "without a budget every layout fits"
        try:
            plan, a = self.place(configs)
        except ValueError as e:  # no such layout (e.g. tables of one group that disagree): its own error
            return e
        biggest = max(self.caps)
        # the ranks' shortfalls (a rank holds more than its largest table): what the budget lacks
        msg = over_budget_message(a.rank_bytes, self.caps, a.holdings())
        for t in physical_tables(plan):
            need = a.shards[t.name][0].state
            if a.sharding[t.name] == TW and need > biggest:
                return ValueError(
                    f"memory budget infeasible {what}: table {t.name} alone needs {need:,} bytes on one rank "
                    f"but the largest rank cap is {biggest:,}; {msg}"
                )
        return ValueError(f"memory budget of {self.budget:,} bytes is infeasible {what}: {msg}")


def bisect_log(
    attempt: Callable[[float], Optional[Fit]], lo: float, hi: float, best: Fit, tolerance: float
) -> Tuple[float, Fit]:
    """Bisect log(x) between lo (exp(lo) does not fit) and hi (exp(hi) fits, giving `best`):
    at most 60 halvings, until hi - lo < tolerance. Returns (hi, the fit at exp(hi))."""
    for _ in range(60):
        if hi - lo < tolerance:
            break
        mid = 0.5 * (lo + hi)
        got = attempt(math.exp(mid))
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
    return hi, best
