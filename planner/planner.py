"""CafePlanner: TorchRec's EmbeddingShardingPlanner with CAFE-aware estimators, defaults and budget.

    planner = CafePlanner(Topology(world_size=4, compute_device="cpu"), memory_budget="2GiB",
                          optimizer="rowwise_adagrad")
    configs = planner.configure(tables)              # before the module exists: what fits
    ebc = CafeEmbeddingBagCollection(tables, configs, device=torch.device("meta"))
    plan = planner.collective_plan(ebc, [CafeEmbeddingBagCollectionSharder()], pg)  # or .plan(...)
    print(planner.report())

What it adds to the stock planner (which it wraps, not forks):
- the enumerator runs EmbeddingPerfEstimator, EmbeddingStorageEstimator, then
  CafeStorageEstimator (sketch per block, TBE optimizer state) and CafePerfEstimator (remap +
  sketch work), see estimators.py;
- default constraints per physical table, unless the caller constrains that table: one pooling
  factor (1.0) per feature (the stock default is a single input per table, which undercounts a
  group of many features), and row-wise for tables above ``rw_share`` of a rank's fair share
  (placement.choose_sharding), so that one big CAFE group does not sit on one rank; after
  ``configure``, the solver's sharding is pinned;
- a callback that re-places table-wise tables largest first on the least-loaded rank (by
  weights + optimizer + sketch) when the stock placement leaves ranks more than
  ``balance_tolerance`` apart, if the devices' storage allows it;
- with a memory budget, every rank's weights + optimizer + sketch are checked against its cap
  after planning: ValueError names the rank, its tables and the shortfall in bytes.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints, ShardingOption, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cafe_torchrec.config import CafeConfig
from cafe_torchrec.modules import CafeEmbeddingBagCollection

from cafe_planner.estimators import (
    CafePerfEstimator,
    CafeStorageEstimator,
    OptimizerLike,
    ShardBytes,
    stock_optimizer_multiplier,
    effective_optimizer,
    option_key,
    physical_modules,
    resolve_optimizer,
)
from cafe_planner.report import LogicalRow, PlanReport, RankRow, TableRow
from cafe_planner.budget import Budget, rank_caps
from cafe_planner.placement import RW, choose_sharding, physical_tables
from cafe_planner.solver import BudgetSolution, solve_budget

logger = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 512


class CafePlanner:
    """Plans a model holding CafeEmbeddingBagCollections (module docstring).

    topology: TorchRec Topology (world size, compute device, capacities).
    memory_budget: total bytes (int or '2GiB', split evenly across ranks) or one cap per rank,
        counting weights + sketch + optimizer state; applied by ``configure`` (before the
        module exists) and checked by ``plan``.
    compression_ratio: a fixed ratio for ``configure`` (the budget, if any, is then checked only).
    constraints: ParameterConstraints keyed by physical table name (``cafe_dim16``, plain table
        names); they replace this planner's defaults for that table.
    batch_size: per-rank batch size for the perf and buffer estimates.
    profile: {feature: int64 ids} sampled from the data, for the profiled budget split.
    optimizer: the embedding optimizer when neither the parameters (apply_optimizer_in_backward)
        nor the sharder's fused_params say; also used by ``configure``. Default: SGD.
    calibration: path or dict for CafePerfEstimator (default: the calibrate.py file, else the
        shipped constants).
    Other keyword arguments go to EmbeddingShardingPlanner (proposer, partitioner, ...).
    """

    def __init__(
        self,
        topology: Topology,
        memory_budget: Optional[Budget] = None,
        compression_ratio: Optional[float] = None,
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        profile: Optional[Mapping[str, torch.Tensor]] = None,
        optimizer: OptimizerLike = None,
        calibration: Any = None,
        rw_share: float = 0.05,
        balance_tolerance: float = 0.05,
        storage_reservation: Any = None,
        callbacks: Optional[List[Callable[[List[ShardingOption]], List[ShardingOption]]]] = None,
        **planner_kwargs: Any,
    ) -> None:
        self.topology = topology
        self.world_size = topology.world_size
        self.memory_budget = memory_budget
        self.caps: Optional[List[int]] = rank_caps(memory_budget, self.world_size) if memory_budget is not None else None
        self.compression_ratio = compression_ratio
        self.user_constraints = dict(constraints or {})
        self.batch_size = batch_size
        self.profile = profile
        self.optimizer = resolve_optimizer(optimizer)
        self.calibration = calibration
        self.rw_share = rw_share
        self.balance_tolerance = balance_tolerance
        self.storage_reservation = storage_reservation or FixedPercentageStorageReservation(percentage=0.15)
        self.callbacks = list(callbacks or [])
        self.planner_kwargs = planner_kwargs
        self.solution: Optional[BudgetSolution] = None
        self._report: Optional[PlanReport] = None
        self._storage_estimator: Optional[CafeStorageEstimator] = None
        self._perf_estimator: Optional[CafePerfEstimator] = None
        self._pinned_ranks: Dict[Tuple[str, str], int] = {}
        self.last_constraints: Dict[str, ParameterConstraints] = {}
        self.planning_seconds: float = 0.0

    # ------------------------------------------------------------------ before the module
    def configure(
        self,
        tables: Sequence[EmbeddingBagConfig],
        world_size: Optional[int] = None,
        base: Optional[CafeConfig] = None,
        optimizer: OptimizerLike = None,
        profile: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> Dict[str, CafeConfig]:
        """Per-table CafeConfigs for CafeEmbeddingBagCollection(tables, configs) that fit the
        memory budget (solver.solve_budget: uniform ratio by bisection, or the profiled split),
        or the fixed compression_ratio. The chosen sharding is pinned for the next plan()."""
        world_size = world_size or self.world_size
        opt = resolve_optimizer(optimizer) or self.optimizer
        base = base or CafeConfig()
        profile = profile if profile is not None else self.profile
        if self.memory_budget is None:
            if self.compression_ratio is None:
                raise ValueError("configure() needs a memory_budget or a compression_ratio")
            budget: Budget = 1 << 62  # unconstrained: only the layout and the sharding are chosen
            self.solution = solve_budget(tables, budget, world_size, opt, base, None, ratio=self.compression_ratio,
                                         rw_share=self.rw_share)
            self.solution.caps = [0] * world_size
        else:
            self.solution = solve_budget(tables, self.memory_budget, world_size, opt, base, profile,
                                         ratio=self.compression_ratio, rw_share=self.rw_share)
        return dict(self.solution.configs)

    # ------------------------------------------------------------------ planning
    def plan(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> ShardingPlan:
        """Same contract as EmbeddingShardingPlanner.plan; then report() describes the plan.
        Raises ValueError when a memory budget was given and a rank exceeds its cap."""
        plan, report, error = self._plan(module, sharders)
        self._report = report
        if error is not None:
            raise ValueError(error)
        return plan

    def collective_plan(self, module: nn.Module, sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
                        pg: Optional[dist.ProcessGroup] = None) -> ShardingPlan:
        """Plan on rank 0 and broadcast the plan and its report to every rank of `pg`."""
        if pg is None:
            assert dist.is_initialized(), "collective_plan needs an initialised process group; use plan() otherwise"
            pg = dist.GroupMember.WORLD
        if sharders is None:
            from cafe_torchrec.distributed import CafeEmbeddingBagCollectionSharder
            from torchrec.distributed.sharding_plan import get_default_sharders

            sharders = [CafeEmbeddingBagCollectionSharder()] + get_default_sharders()
        plan, report, error, failure = invoke_on_rank_and_broadcast_result(pg, 0, self._plan_safely, module, sharders)
        self._report = report
        if failure is not None:  # planning itself failed on rank 0 (e.g. PlannerError): same on every rank
            raise RuntimeError(f"planning failed on rank 0: {failure}")
        if error is not None:
            raise ValueError(error)
        return plan

    def report(self) -> PlanReport:
        """The last plan as a PlanReport (print it for the text table)."""
        if self._report is None:
            raise RuntimeError("no plan yet: call plan() or collective_plan() first")
        return self._report

    def _plan_safely(self, module, sharders):
        try:
            return (*self._plan(module, sharders), None)
        except Exception as e:  # every rank must get an answer, or the others hang in the broadcast
            return None, None, None, f"{type(e).__name__}: {e}"

    def _plan(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]):
        start = time.perf_counter()
        cafe = physical_modules(module)
        fused = _sharder_fused_params(sharders)
        constraints = self._constraints(cafe, fused)
        self.last_constraints = constraints
        topology = self.topology
        self._storage_estimator = CafeStorageEstimator(topology, constraints, optimizer=self.optimizer)
        self._perf_estimator = CafePerfEstimator(topology, constraints, calibration=self.calibration)
        enumerator = EmbeddingEnumerator(
            topology=topology, batch_size=self.batch_size, constraints=constraints,
            estimator=[EmbeddingPerfEstimator(topology, constraints), EmbeddingStorageEstimator(topology, constraints),
                       self._storage_estimator, self._perf_estimator],
        )
        kwargs = dict(self.planner_kwargs)
        kwargs.setdefault("debug", False)
        planner = EmbeddingShardingPlanner(
            topology=topology, batch_size=self.batch_size, enumerator=enumerator, constraints=constraints,
            storage_reservation=self.storage_reservation, callbacks=[self._balance] + self.callbacks, **kwargs,
        )
        plan = planner.plan(module, sharders)
        best = planner._best_plan or []
        self.planning_seconds = time.perf_counter() - start
        report = self._make_report(best, cafe, fused)
        error = None
        if self.caps is not None:
            error = self._check_caps(report)
        return plan, report, error

    # ------------------------------------------------------------------ defaults
    def _constraints(self, cafe: List[Tuple[str, CafeEmbeddingBagCollection]], fused: Dict[str, Any]) -> Dict[str, ParameterConstraints]:
        out = dict(self.user_constraints)
        self._pinned_ranks = {}
        for path, m in cafe:
            tables = physical_tables(m.plan)
            pinned = (self.solution.sharding if self.solution is not None and self.solution.world_size == self.world_size
                      and _same_tables(self.solution, m) else None)
            if pinned:
                for name, ranks in self.solution.assignment.ranks.items():
                    if pinned[name] != RW and name not in self.user_constraints:
                        self._pinned_ranks[(path, name)] = ranks[0]
            opt = self._module_optimizer(m, fused)
            chosen = pinned or choose_sharding(tables, self.world_size, opt, self.rw_share)
            for t in tables:
                if t.name in out:
                    continue
                types = [chosen[t.name]] if chosen[t.name] == RW or pinned else None
                out[t.name] = ParameterConstraints(sharding_types=types, pooling_factors=[1.0] * len(t.features))
        return out

    def _module_optimizer(self, m: CafeEmbeddingBagCollection, fused: Dict[str, Any]):
        params = list(m.physical.parameters())
        return effective_optimizer(params[0], fused, self.optimizer) if params else self.optimizer

    # ------------------------------------------------------------------ callback: memory balance
    def _state_of(self, option: ShardingOption) -> List[int]:
        got = self._storage_estimator.breakdown.get(option_key(option)) if self._storage_estimator else None
        if got is not None:
            return [s.state for s in got]
        return [(s.storage.hbm + s.storage.ddr) if s.storage else 0 for s in option.shards]

    def _balance(self, best: List[ShardingOption]) -> List[ShardingOption]:
        """Table-wise tables of a configure()d module go where the solver put them (so the
        budget holds); others are re-placed largest first on the least-loaded rank when the
        stock placement leaves ranks more than balance_tolerance apart (and storage allows)."""
        w = self.world_size
        if w == 1:
            return best
        for o in best:
            rank = self._pinned_ranks.get((o.path, o.name))
            if rank is not None and len(o.shards) == 1:
                o.shards[0].rank = rank

        def loads(options) -> List[int]:
            out = [0] * w
            for o in options:
                for s, b in zip(o.shards, self._state_of(o)):
                    out[s.rank] += b
            return out

        before = loads(best)
        if max(before) == 0 or (max(before) - min(before)) / max(before) <= self.balance_tolerance:
            return best
        movable = [o for o in best if o.sharding_type == ShardingType.TABLE_WISE.value and len(o.shards) == 1
                   and (o.path, o.name) not in self._pinned_ranks]
        moving = {id(o) for o in movable}
        fixed = [o for o in best if id(o) not in moving]
        load = loads(fixed)
        storage = [0] * w
        for o in fixed:
            for s in o.shards:
                storage[s.rank] += (s.storage.hbm + s.storage.ddr) if s.storage else 0
        capacity = [d.storage.hbm + d.storage.ddr for d in self.topology.devices]
        new_ranks = {}
        for o in sorted(movable, key=lambda o: -self._state_of(o)[0]):
            need = self._state_of(o)[0]
            size = (o.shards[0].storage.hbm + o.shards[0].storage.ddr) if o.shards[0].storage else 0
            r = min((r for r in range(w) if storage[r] + size <= capacity[r]), key=lambda r: (load[r], r), default=None)
            if r is None:
                return best
            new_ranks[id(o)] = r
            load[r] += need
            storage[r] += size
        if max(load) >= max(before):
            return best
        for o in movable:
            o.shards[0].rank = new_ranks[id(o)]
        return best

    # ------------------------------------------------------------------ report and budget
    def _make_report(self, best: List[ShardingOption], cafe, fused) -> PlanReport:
        ranks = [RankRow(rank=r, cap=self.caps[r] if self.caps else None) for r in range(self.world_size)]
        tables: List[TableRow] = []
        modules = {path: m for path, m in cafe}
        coverage = self.solution.coverage if self.solution is not None else {}
        optimizers = set()
        for o in best:
            breakdown = self._storage_estimator.breakdown.get(option_key(o)) if self._storage_estimator else None
            added = self._perf_estimator.added.get(option_key(o), []) if self._perf_estimator else []
            m = modules.get(o.path)
            if breakdown is None:  # not a CAFE table: the stock estimate, split the stock way
                breakdown = [_stock_bytes(o, s) for s in o.shards]
            if m is not None:
                optimizers.add(effective_optimizer(o.tensor, fused, self.optimizer).value)
            perf = sum(s.perf.total for s in o.shards if s.perf is not None)
            row = _table_row(o, m, breakdown, perf, sum(added), coverage)
            tables.append(row)
            for s, b, a in zip(o.shards, breakdown, added or [0.0] * len(o.shards)):
                rr = ranks[s.rank]
                rr.weight_bytes += b.weights
                rr.optimizer_bytes += b.optimizer
                rr.sketch_bytes += b.sketch
                rr.io_bytes += b.io
                rr.perf_ms += s.perf.total if s.perf is not None else 0.0
                if o.name not in rr.tables:
                    rr.tables.append(o.name)
        source = self._perf_estimator.calibration.get("source", "default") if self._perf_estimator else "-"
        notes = []
        if self.solution is not None and self.solution.method != "fixed":
            notes.append(f"budget split: {self.solution.method} (uniform ratio {self.solution.uniform_ratio:.4g}x, "
                         f"overall {self.solution.effective_ratio():.4g}x)")
        notes.append(f"planning took {self.planning_seconds:.2f} s; step cost from the TorchRec perf model (ms), "
                     "CAFE remap + sketch included")
        return PlanReport(
            world_size=self.world_size, compute_device=self.topology.compute_device, batch_size=self.batch_size,
            optimizer=", ".join(sorted(optimizers)) or "-", calibration=str(source), tables=tables, ranks=ranks,
            budget=sum(self.caps) if self.caps else None, notes=notes,
        )

    def _check_caps(self, report: PlanReport) -> Optional[str]:
        over = [r for r in report.ranks if r.cap is not None and r.state_bytes > r.cap]
        if not over:
            return None
        parts = []
        for r in sorted(over, key=lambda r: r.cap - r.state_bytes):
            parts.append(f"rank {r.rank} needs {r.state_bytes:,} bytes (weights {r.weight_bytes:,}, optimizer "
                         f"{r.optimizer_bytes:,}, sketch {r.sketch_bytes:,}) for tables {', '.join(r.tables)} but its cap "
                         f"is {r.cap:,}: short by {r.state_bytes - r.cap:,} bytes")
        return "plan does not fit the memory budget: " + "; ".join(parts)


def _stock_bytes(o: ShardingOption, shard) -> ShardBytes:
    weights = shard.size[0] * shard.size[1] * o.tensor.element_size()
    opt = math.ceil(weights * stock_optimizer_multiplier(getattr(o.tensor, "_optimizer_classes", [None])[0], o.tensor.shape))
    total = (shard.storage.hbm + shard.storage.ddr) if shard.storage else 0
    return ShardBytes(weights, opt, 0, max(0, total - weights - opt))


def _sharder_fused_params(sharders: Sequence[ModuleSharder[nn.Module]]) -> Dict[str, Any]:
    for s in sharders:
        if getattr(s, "module_type", None) is CafeEmbeddingBagCollection:
            return dict(getattr(s, "fused_params", None) or {})
    return {}


def _same_tables(solution: BudgetSolution, m: CafeEmbeddingBagCollection) -> bool:
    return {t.name: (t.rows, t.dim) for t in physical_tables(solution.plan)} == {
        t.name: (t.rows, t.dim) for t in physical_tables(m.plan)}


def _table_row(o: ShardingOption, m: Optional[CafeEmbeddingBagCollection], shards: List[ShardBytes],
               perf: float, cafe_perf: float, coverage: Mapping[str, float]) -> TableRow:
    rows, dim = o.tensor.shape[0], o.tensor.shape[1]
    weights = sum(s.weights for s in shards)
    sketch = sum(s.sketch for s in shards)
    layout = next((g for g in m.plan.groups if g.name == o.name), None) if m is not None else None
    common = dict(name=o.name, physical_rows=rows, dim=dim, weight_bytes=weights, sketch_bytes=sketch,
                  optimizer_bytes=sum(s.optimizer for s in shards), io_bytes=sum(s.io for s in shards),
                  sharding_type=o.sharding_type, compute_kernel=o.compute_kernel,
                  ranks=[s.rank for s in o.shards], perf_ms=perf, cafe_perf_ms=cafe_perf)
    if layout is None:
        return TableRow(kind="plain", logical_rows=rows, hot_rows=0, hashed_rows=0, ratio=1.0, **common)
    logical = [LogicalRow(t.name, list(t.features), t.logical_rows, t.hashed_rows, t.ratio, coverage.get(t.name))
               for t in layout.tables]
    return TableRow(kind="group", logical_rows=sum(t.logical_rows for t in layout.tables), hot_rows=layout.hot_rows,
                    hashed_rows=layout.physical_rows - layout.hot_rows,
                    ratio=layout.logical_bytes() / max(1, layout.weight_bytes() + layout.sketch_bytes()),
                    logical=logical, **common)
