"""CAFE-aware sharding planner (installed as `cafe_planner`).

CafePlanner wraps TorchRec's EmbeddingShardingPlanner with CAFE's estimators, sharding defaults
and memory budget; solve_budget picks per-table ratios and sharding before the module exists.
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
from cafe_planner.report import PlanReport, format_report
from cafe_planner.budget import parse_bytes, rank_caps
from cafe_planner.solver import BudgetSolution, estimate_coverage, solve_budget

__all__ = [
    "BudgetSolution",
    "CafePerfEstimator",
    "CafePlanner",
    "CafeStorageEstimator",
    "DEFAULT_CALIBRATION",
    "PlanReport",
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
