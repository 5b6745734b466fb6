"""Whether a set of per-table CafeConfigs fits the per-rank caps, why not, and the log-space
bisection both solvers search with (uniform: on the ratio; profiled: on the price per byte)."""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple, TypeVar

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cafe_torchrec.config import CafeConfig
from cafe_torchrec.layout import CafePlan, plan_tables

from cafe_planner.estimators import OptimizerLike
from cafe_planner.placement import TW, Assignment, assign, physical_tables, shortfall_message

Fit = TypeVar("Fit")


def plan_and_place(tables: Sequence[EmbeddingBagConfig], configs: Dict[str, CafeConfig], world_size: int,
                   optimizer: OptimizerLike, caps: Sequence[int], rw_share: float) -> Tuple[CafePlan, Assignment]:
    """The layout `configs` give and where its physical tables go (ValueError: no such layout)."""
    plan = plan_tables(tables, configs)
    return plan, assign(physical_tables(plan), world_size, optimizer, caps, rw_share=rw_share)


def fits(assignment: Assignment, caps: Sequence[int]) -> bool:
    """Every rank within its cap."""
    return all(b <= c for b, c in zip(assignment.rank_bytes, caps))


def fitting_plan(tables: Sequence[EmbeddingBagConfig], configs: Dict[str, CafeConfig], world_size: int,
                 optimizer: OptimizerLike, caps: Sequence[int], rw_share: float) -> Optional[Tuple[CafePlan, Assignment]]:
    """plan_and_place's (plan, assignment) when the layout exists and every rank fits; else None."""
    try:
        plan, a = plan_and_place(tables, configs, world_size, optimizer, caps, rw_share)
    except ValueError:
        return None
    return (plan, a) if fits(a, caps) else None


def infeasible_error(tables: Sequence[EmbeddingBagConfig], configs: Dict[str, CafeConfig], world_size: int,
                     optimizer: OptimizerLike, caps: Sequence[int], rw_share: float, what: str) -> ValueError:
    """The error for configs that do not fit: the table too big for any rank, or the ranks that
    overflow (and their tables) with the shortfall in bytes."""
    try:
        plan, a = plan_and_place(tables, configs, world_size, optimizer, caps, rw_share)
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


def bisect_log(attempt: Callable[[float], Optional[Fit]], lo: float, hi: float, best: Fit,
               tolerance: float) -> Tuple[float, Fit]:
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
