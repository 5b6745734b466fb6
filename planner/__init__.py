"""CAFE-aware sharding planner (installed as `cafe_planner`).

Its parts, one job per file:
    planner.py       CafePlanner: the TorchRec side (EmbeddingShardingPlanner with the parts below)
    estimators.py    CafeStorageEstimator / CafePerfEstimator: what TorchRec's estimators miss
    report.py        PlanReport, built by TorchRec's Stats hook (ReportStats)
    problem.py       BudgetProblem: tables, ranks, per-rank caps, optimizer; does a layout fit?
    solver.py        solve_budget: fixed or uniform ratio (bisection), BudgetSolution
    profiled.py      the profiled split: rows where skew buys the most importance mass
    value_curves.py  what a profile says each table's ids are worth
    placement.py     the one placement engine: row-wise or table-wise, and which rank
    calibrate.py     python -m cafe_planner.calibrate: CAFE's per-id cost next to a TBE
    __main__.py      python -m cafe_planner: plans (and sweeps) Criteo-sized DLRMs
"""

from cafe_planner.estimators import (
    DEFAULT_CALIBRATION,
    CafePerfEstimator,
    CafeStorageEstimator,
    ShardBytes,
    load_calibration,
    optimizer_state_bytes,
    resolve_optimizer,
)
from cafe_planner.planner import CafePlanner
from cafe_planner.problem import BudgetProblem, parse_bytes, rank_caps
from cafe_planner.report import PlanReport, ReportStats, format_report
from cafe_planner.solver import BudgetSolution, estimate_coverage, solve_budget

__all__ = [
    "BudgetProblem",
    "BudgetSolution",
    "CafePerfEstimator",
    "CafePlanner",
    "CafeStorageEstimator",
    "DEFAULT_CALIBRATION",
    "PlanReport",
    "ReportStats",
    "ShardBytes",
    "estimate_coverage",
    "format_report",
    "load_calibration",
    "optimizer_state_bytes",
    "parse_bytes",
    "rank_caps",
    "resolve_optimizer",
    "solve_budget",
]
