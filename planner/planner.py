"""CafePlanner: the planner's TorchRec side, EmbeddingShardingPlanner with CAFE's estimators, sharding and budget.

    planner = CafePlanner(Topology(world_size=16, local_world_size=8, compute_device="cuda"),
                          memory_budget="64GiB", optimizer="rowwise_adagrad")
    configs = planner.configure(tables)              # before the module exists: what fits
    ebc = CafeEmbeddingBagCollection(tables, configs, device=torch.device("meta"))
    sharder = CafeEmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01})
    plan = planner.collective_plan(ebc, [sharder], pg)  # or .plan(...)
    model = DistributedModelParallel(ebc, plan=plan, sharders=[sharder])
    print(planner.report())

The planner's ``optimizer`` is what it counts; the tables train with what the sharder's
fused_params (or apply_optimizer_in_backward on the parameters) name, so name the same one
there (the estimator warns where nothing does: TorchRec would build SGD).

It wraps the stock planner through its extension points (it does not fork it):
- enumerator: EmbeddingPerfEstimator, EmbeddingStorageEstimator, then CafeStorageEstimator
  (sketch per block, TBE optimizer state) and CafePerfEstimator (remap + sketch work), see
  estimators.py;
- constraints, per CAFE physical table the caller does not constrain: one pooling factor (1.0)
  per feature (the stock default is a single input per table, which undercounts a group of
  many features) and the sharding type the budget solver would choose (placement.py: row-wise
  above ``rw_share`` of a rank's fair share, so one big CAFE group does not sit on one rank;
  after ``configure``, the solution's);
- callbacks: table-wise shards re-placed by placement.place_largest_first (the budget solver's
  placement, by the estimators' weights + optimizer + sketch), so ranks hold balanced memory
  and a configured module lands where the budget was checked;
- stats: report.ReportStats turns the chosen plan into the PlanReport that ``report()`` returns;
- with a memory budget, every rank's weights + optimizer + sketch are checked against its cap
  after planning: ValueError names the rank, its tables and the shortfall in bytes.
The budget solver itself (solver.py) knows nothing of TorchRec's planner.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    ShardingOption,
    Storage,
    StorageReservation,
    Topology,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from cafe_planner.estimators import (
    CafePerfEstimator,
    CafeStorageEstimator,
    OptimizerLike,
    effective_optimizer,
    option_key,
    physical_modules,
    resolve_optimizer,
    sharder_fused_params,
)
from cafe_planner.placement import (
    TW,
    choose_sharding,
    over_budget_message,
    oversized_table_wise,
    physical_tables,
    place_largest_first,
)
from cafe_planner.problem import Budget, rank_caps
from cafe_planner.report import PlanReport, ReportStats
from cafe_planner.solver import BudgetSolution, solve_budget
from cafe_torchrec.config import CafeConfig
from cafe_torchrec.modules import CafeEmbeddingBagCollection

DEFAULT_BATCH_SIZE = 512
MAX_LOCAL_DEVICES = 127  # torch.device indices are int8: "cuda:128" wraps to "cuda:-128"


class CafePlanner:
    """Plans a model holding CafeEmbeddingBagCollections (module docstring).

    topology: TorchRec Topology (world size, ranks per host as ``local_world_size``, compute
        device, capacities). On cuda, ranks per host must be at most 127.
    memory_budget: total bytes (int or '2GiB', split evenly across ranks) or one cap per rank,
        counting weights + sketch + optimizer state; applied by ``configure`` (before the
        module exists) and checked by ``plan``.
    compression_ratio: a fixed ratio for ``configure`` (the budget, if any, is then checked only).
    constraints: ParameterConstraints keyed by physical table name (``cafe_dim16``, plain table
        names); they replace this planner's defaults for that table.
    batch_size: per-rank batch size for the perf and buffer estimates.
    profile: {feature: int64 ids} sampled from the data, for the profiled budget split.
    optimizer: the embedding optimizer to count where neither the parameters
        (apply_optimizer_in_backward) nor the sharder's fused_params name one (a warning then says
        that TorchRec will build SGD there); also used by ``configure``. Default: SGD.
    calibration: path or dict for CafePerfEstimator (default: the calibrate.py file, else the
        shipped constants).
    rw_share: tables above this share of a rank's fair share of memory are sharded row-wise.
    Other keyword arguments go to EmbeddingShardingPlanner (proposer, partitioner, stats, ...).
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
        storage_reservation: Optional[StorageReservation] = None,
        callbacks: Optional[List[Callable[[List[ShardingOption]], List[ShardingOption]]]] = None,
        **planner_kwargs: Any,
    ) -> None:
        check_topology(topology)
        self.topology = topology
        self.world_size = topology.world_size
        self.memory_budget = memory_budget
        self.caps: Optional[List[int]] = (
            rank_caps(memory_budget, self.world_size) if memory_budget is not None else None
        )
        self.compression_ratio = compression_ratio
        self.user_constraints = dict(constraints or {})
        self.batch_size = batch_size
        self.profile = profile
        self.optimizer = resolve_optimizer(optimizer)
        self.calibration = calibration
        self.rw_share = rw_share
        self.storage_reservation = storage_reservation or FixedPercentageStorageReservation(percentage=0.15)
        self.callbacks = list(callbacks or [])
        self.planner_kwargs = planner_kwargs
        self.solution: Optional[BudgetSolution] = None
        self.last_constraints: Dict[str, ParameterConstraints] = {}
        self._report: Optional[PlanReport] = None

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
        or the fixed compression_ratio. The next plan() shards the tables as the solver did."""
        if self.memory_budget is None and self.compression_ratio is None:
            raise ValueError("configure() needs a memory_budget or a compression_ratio")
        self.solution = solve_budget(
            tables,
            self.memory_budget,
            world_size or self.world_size,
            resolve_optimizer(optimizer) or self.optimizer,
            base,
            profile if profile is not None else self.profile,
            ratio=self.compression_ratio,
            rw_share=self.rw_share,
        )
        return dict(self.solution.configs)

    # ------------------------------------------------------------------ planning
    def plan(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]) -> ShardingPlan:
        """Same contract as EmbeddingShardingPlanner.plan; then report() describes the plan.
        Raises ValueError when a rank exceeds its memory cap or its device's storage."""
        plan, report, error = self._plan(module, sharders)
        self._report = report
        if error is not None:
            raise ValueError(error)
        return plan

    def collective_plan(
        self,
        module: nn.Module,
        sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
        pg: Optional[dist.ProcessGroup] = None,
    ) -> ShardingPlan:
        """Plan on rank 0 and broadcast the plan and its report to every rank of `pg`."""
        if pg is None:
            assert dist.is_initialized(), "collective_plan needs an initialised process group; use plan() otherwise"
            pg = dist.GroupMember.WORLD
        if sharders is None:
            from torchrec.distributed.sharding_plan import get_default_sharders

            from cafe_torchrec.distributed import CafeEmbeddingBagCollectionSharder

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

    def _plan_safely(self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]):
        try:
            return (*self._plan(module, sharders), None)
        except Exception as e:  # every rank must get an answer, or the others hang in the broadcast
            return None, None, None, f"{type(e).__name__}: {e}"

    def _plan(
        self, module: nn.Module, sharders: List[ModuleSharder[nn.Module]]
    ) -> Tuple[ShardingPlan, PlanReport, Optional[str]]:
        """(plan, report, why it does not fit or None)."""
        topology = self.topology
        warn_unknown_constraints(self.user_constraints, module)
        constraints = self._constraints(physical_modules(module), sharder_fused_params(sharders))
        self.last_constraints = constraints
        storage = CafeStorageEstimator(topology, constraints, optimizer=self.optimizer)
        perf = CafePerfEstimator(topology, constraints, calibration=self.calibration)
        enumerator = EmbeddingEnumerator(
            topology=topology,
            batch_size=self.batch_size,
            constraints=constraints,
            estimator=[
                EmbeddingPerfEstimator(topology, constraints),
                EmbeddingStorageEstimator(topology, constraints),
                storage,
                perf,
            ],
        )
        solution = self.solution
        notes = []
        if solution is not None and solution.method != "fixed":
            notes.append(
                f"budget split: {solution.method} (uniform ratio {solution.uniform_ratio:.4g}x, "
                f"overall {solution.effective_ratio():.4g}x)"
            )
        stats = ReportStats(
            storage, perf, self.optimizer, self.caps, solution.coverage if solution is not None else None, notes
        )
        placement = TableWisePlacement(storage, self.caps, self.storage_reservation, topology)
        kwargs = dict(self.planner_kwargs)
        kwargs.setdefault("debug", False)
        extra_stats = kwargs.pop("stats", None) or []
        planner = EmbeddingShardingPlanner(
            topology=topology,
            batch_size=self.batch_size,
            enumerator=enumerator,
            constraints=constraints,
            storage_reservation=self.storage_reservation,
            callbacks=[placement] + self.callbacks,
            stats=[stats] + (extra_stats if isinstance(extra_stats, list) else [extra_stats]),
            **kwargs,
        )
        plan = planner.plan(module, sharders)
        report = stats.report or stats.build([], topology, self.batch_size, sharders, 0.0)  # nothing to shard
        errors = [placement.overflow] if placement.overflow else []
        if self.caps is not None:
            over = over_budget_message(
                [r.state_bytes for r in report.ranks], self.caps, [_holding(r) for r in report.ranks]
            )
            if over:
                errors.append("plan does not fit the memory budget: " + over)
        return plan, report, " | ".join(errors) or None

    def _constraints(
        self, cafe: List[Tuple[str, CafeEmbeddingBagCollection]], fused: Dict[str, Any]
    ) -> Dict[str, ParameterConstraints]:
        """The caller's constraints, and for every other CAFE physical table its sharding type
        (the solution's after configure(), else choose_sharding's) and a pooling factor per feature."""
        out = dict(self.user_constraints)
        for _, m in cafe:
            tables = physical_tables(m.plan)
            params = list(m.physical.parameters())
            opt = effective_optimizer(params[0], fused, self.optimizer) if params else self.optimizer
            if (
                self.solution is not None
                and self.solution.world_size == self.world_size
                and _same_tables(self.solution, m)
            ):
                chosen = self.solution.sharding
            else:
                chosen = choose_sharding(tables, self.world_size, opt, self.rw_share)
            for name, refusal in oversized_table_wise(tables, self.world_size, opt, self.rw_share).items():
                warnings.warn(
                    f"CAFE physical table {name!r} goes table-wise onto one rank, unbalancing the plan: "
                    f"row-wise over {self.world_size} ranks is not possible ({refusal}); split its group "
                    "(CafeConfig.group) or shard over fewer ranks",
                    stacklevel=2,
                )
            for t in tables:
                if t.name not in out:
                    out[t.name] = ParameterConstraints(
                        sharding_types=[chosen[t.name]], pooling_factors=[1.0] * len(t.features)
                    )
        return out


class TableWisePlacement:
    """TorchRec callback: places the plan's table-wise shards with placement.place_largest_first.

    Sizes are each shard's weights + optimizer + sketch as the storage estimator counted them
    (the stock estimate for tables that are not CAFE's); ranks start from what the other shards
    (row-wise blocks) put there, and `caps`, when given, are the memory budget per rank. The
    result must fit each device's storage after TorchRec's reservation (hbm and ddr, as the
    estimators count them; the whole device if the reservation keeps no reserved topology);
    ``overflow`` says which rank does not, else stays None.
    """

    def __init__(
        self,
        storage: CafeStorageEstimator,
        caps: Optional[Sequence[int]],
        reservation: StorageReservation,
        topology: Topology,
    ) -> None:
        self.storage = storage
        self.caps = caps
        self.reservation = reservation
        self.topology = topology
        self.overflow: Optional[str] = None

    def __call__(self, best: List[ShardingOption]) -> List[ShardingOption]:
        reserved = self.reservation.last_reserved_topology or self.topology
        world = len(reserved.devices)
        movable = [o for o in best if o.sharding_type == TW and len(o.shards) == 1]
        moving = {id(o) for o in movable}
        load = [0] * world
        for o in best:
            if id(o) not in moving:
                for s, b in zip(o.shards, self._state(o)):
                    load[s.rank] += b
        ranks = place_largest_first({i: self._state(o)[0] for i, o in enumerate(movable)}, load, self.caps)
        for i, o in enumerate(movable):
            o.shards[0].rank = ranks[i]
        used = [Storage(hbm=0, ddr=0) for _ in range(world)]
        for o in best:
            for s in o.shards:
                used[s.rank] += s.storage
        for r, (u, device) in enumerate(zip(used, reserved.devices)):
            if not u.fits_in(device.storage):
                self.overflow = (
                    f"rank {r} needs hbm {u.hbm:,} / ddr {u.ddr:,} bytes (the planner's estimate) but its "
                    f"device holds hbm {device.storage.hbm:,} / ddr {device.storage.ddr:,} after TorchRec's "
                    "storage reservation; raise the device capacity or the world size"
                )
                break
        return best

    def _state(self, option: ShardingOption) -> List[int]:
        got = self.storage.breakdown.get(option_key(option))
        if got is not None:
            return [s.state for s in got]
        return [(s.storage.hbm + s.storage.ddr) if s.storage else 0 for s in option.shards]


def check_topology(topology: Topology) -> None:
    """ValueError when TorchRec could plan for `topology` but not name its devices: on cuda,
    rank r's device is cuda:(r % local_world_size), and an index above 127 does not exist
    (TorchRec defaults local_world_size to the world size)."""
    if topology.compute_device in ("cuda", "mtia") and topology.local_world_size > MAX_LOCAL_DEVICES:
        raise ValueError(
            f"Topology(world_size={topology.world_size}, compute_device={topology.compute_device!r}) has "
            f"local_world_size {topology.local_world_size} (ranks per host; TorchRec's default is the world size), "
            f"but a host's device indices stop at {MAX_LOCAL_DEVICES}: pass local_world_size=<GPUs per host>, e.g. 8"
        )


def _holding(rank: Any) -> str:
    return (
        f"{', '.join(rank.tables) or 'nothing'} (weights {rank.weight_bytes:,}, optimizer {rank.optimizer_bytes:,}, "
        f"sketch {rank.sketch_bytes:,})"
    )


def warn_unknown_constraints(constraints: Mapping[str, ParameterConstraints], module: nn.Module) -> None:
    """Warn for each constraint that names no table the planner sees (TorchRec ignores it): the
    tables of the stock collections, and of a CAFE collection its physical tables (one per group,
    `cafe_dim16`, and its plain ones), not the logical ones its configs name."""
    tables: set = set()
    logical: Dict[str, List[str]] = {}
    for m in module.modules():
        if isinstance(m, CafeEmbeddingBagCollection):
            physical = [t.name for t in physical_tables(m.plan)]
            logical.update({t.name: physical for t in m.embedding_bag_configs()})
        elif isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)):
            configs = m.embedding_bag_configs() if isinstance(m, EmbeddingBagCollection) else m.embedding_configs()
            tables.update(t.name for t in configs)
    for key in sorted(set(constraints) - tables):
        hint = (
            f": {key!r} is a logical table of a CAFE collection, whose physical tables are {logical[key]}"
            if key in logical and key not in logical[key]
            else ""
        )
        warnings.warn(
            f"ParameterConstraints for {key!r} name no table the planner shards, so they do nothing{hint}",
            stacklevel=4,
        )


def _same_tables(solution: BudgetSolution, m: CafeEmbeddingBagCollection) -> bool:
    return {t.name: (t.rows, t.dim) for t in physical_tables(solution.plan)} == {
        t.name: (t.rows, t.dim) for t in physical_tables(m.plan)
    }
