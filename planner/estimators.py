"""Shard estimators for CAFE physical tables, placed after TorchRec's own.

    EmbeddingEnumerator(topology, batch_size, constraints, estimator=[
        EmbeddingPerfEstimator(topology, constraints),
        EmbeddingStorageEstimator(topology, constraints),
        CafeStorageEstimator(topology, constraints, optimizer=...),
        CafePerfEstimator(topology, constraints),
    ])

What the stock storage estimator already counts for a CAFE physical table (a real parameter
of the inner EmbeddingBagCollection): the shard's weights (rows x dim x element size), the
optimizer state as ``weights x multiplier`` with the multiplier read from
the parameter's in-backward optimizer class (SGD 0, Adam 2, RowWiseAdagrad 1/dim, anything
else 1, and 0 when the tensor has no in-backward optimizer; _torchrec_compat reads both), and on
CPU the input/output buffers of a step.

What it misses, and ``CafeStorageEstimator`` adds per shard:
1. the HotSketch of the shard's block: ``group_state_bytes(layout.block(shard_rows))`` (slots +
   free list), for CAFE groups only (a row-wise block keeps its own hot rows and sketch);
2. the difference between what FBGEMM TBE really allocates for the optimizer and the stock
   multiplier. TBE keeps optimizer state in fp32 whatever the weights' precision, so the stock
   figure is low for fp16 tables (RowWiseAdagrad: 4 B per row, the stock 1/dim of 2 B x dim
   gives 2 B); and when the optimizer comes from the sharder's ``fused_params["optimizer"]``
   (or from the planner's ``optimizer`` argument) rather than from the parameter, the stock
   estimator counts none. The optimizer counted is the one TorchRec's sharder will build: the
   parameter's in-backward optimizer class, else ``fused_params["optimizer"]``, else EXACT_SGD
   (TBE's default). Where neither names one, the ``optimizer`` given to the estimator (the
   planner's) is counted instead, as what the caller means to train with, and a warning says
   that TorchRec will build SGD unless the sharder or the parameters are given that optimizer.
A block too small to hold one hashed row per table region (``GroupLayout.block`` raises) gets
an unplaceable storage, so the partitioner never picks it.

``CafePerfEstimator`` adds the remap and sketch work of a CAFE group's shard to its perf:
forward ``fwd_compute x fwd_overhead`` (key hashing, HotSketch query, hashed rows, per id) and
backward ``bwd_compute x bwd_overhead`` (importance, HotSketch insert, migration, per id). The stock
model's compute terms are proportional to the ids the shard looks up, so scaling them by the
measured ratio (CAFE ns per id) / (TBE ns per id) adds the per-id CAFE cost in the model's own
time base. The ratios come from ``python -m cafe_planner.calibrate`` (a JSON file; see
calibrate.py) or, if none was written, from DEFAULT_CALIBRATION below.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.planner.constants import MAX_SIZE
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    Perf,
    ShardEstimator,
    ShardingOption,
    Storage,
    Topology,
)
from torchrec.distributed.types import ModuleSharder

from cafe_torchrec._torchrec_compat import in_backward_optimizer, stock_optimizer_multiplier
from cafe_torchrec.layout import GroupLayout
from cafe_torchrec.modules import CafeEmbeddingBagCollection
from cafe_torchrec.remap import group_state_bytes

CALIBRATION_ENV = "CAFE_PLANNER_CALIBRATION"


def default_path() -> Path:
    """Where calibrate.py writes and the estimator looks: $CAFE_PLANNER_CALIBRATION or the user cache."""
    env = os.environ.get(CALIBRATION_ENV)
    return Path(env) if env else Path.home() / ".cache" / "cafe_planner" / "calibration.json"


# Measured with `python -m cafe_planner.calibrate` (defaults: one thread, dim 16, 128 K Zipf(1.1)
# ids over 4 tables of 1 M rows at 100x, medians of 7 interleaved rounds) on an AMD EPYC with
# 2 cores, torch 2.13 CPU, fbgemm-gpu-cpu 1.8, a shared machine: three runs gave fwd_overhead
# 1.6-2.1 and bwd_overhead 1.4-3.1; the third (most typical) run is shipped.
DEFAULT_CALIBRATION: Dict[str, Any] = {
    "sketch_query_ns": 19.9,
    "sketch_insert_ns": 17.8,
    "remap_fwd_ns": 39.7,
    "remap_bwd_ns": 98.0,
    "tbe_fwd_ns": 18.9,
    "tbe_bwd_ns": 33.9,
    "fwd_overhead": 2.10,
    "bwd_overhead": 2.89,
    "machine": "AMD EPYC, 2 cores (shipped default)",
}

_FP32 = 4
_OPTIMIZER_NAMES = {
    "sgd": EmbOptimType.EXACT_SGD,
    "exact_sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "exact_adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "exact_rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "row_wise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
    "partial_rowwise_adam": EmbOptimType.PARTIAL_ROWWISE_ADAM,
    "lamb": EmbOptimType.LAMB,
    "partial_rowwise_lamb": EmbOptimType.PARTIAL_ROWWISE_LAMB,
    "lars_sgd": EmbOptimType.LARS_SGD,
}
OptimizerLike = Union[None, str, EmbOptimType, Type[torch.optim.Optimizer]]


def resolve_optimizer(optimizer: OptimizerLike) -> Optional[EmbOptimType]:
    """An EmbOptimType from a name ('rowwise_adagrad', 'adagrad', 'sgd', 'adam', ...), an
    EmbOptimType, or an optimizer class (torch.optim.* or torchrec.optim.*); None stays None."""
    if optimizer is None or isinstance(optimizer, EmbOptimType):
        return optimizer
    if isinstance(optimizer, str):
        key = optimizer.lower().replace("-", "_")
        if key in _OPTIMIZER_NAMES:
            return _OPTIMIZER_NAMES[key]
        try:
            return EmbOptimType(key)
        except ValueError:
            raise ValueError(f"unknown optimizer {optimizer!r}; use one of {sorted(_OPTIMIZER_NAMES)}") from None
    if isinstance(optimizer, type):
        from torchrec.distributed.utils import optimizer_type_to_emb_opt_type

        return optimizer_type_to_emb_opt_type(optimizer)
    raise ValueError(f"cannot read an optimizer from {optimizer!r}")


def optimizer_state_bytes(optimizer: Optional[EmbOptimType], rows: int, dim: int) -> int:
    """Bytes FBGEMM TBE allocates for the optimizer state of `rows` x `dim` (always fp32):
    SGD none; Adagrad and LARS one value per weight; row-wise Adagrad one per row; Adam and LAMB
    two per weight; the partial row-wise variants one per weight plus one per row. Other
    optimizers are counted like Adagrad (the stock estimator's 'anything else')."""
    if optimizer is None or optimizer == EmbOptimType.EXACT_SGD:
        return 0
    if optimizer == EmbOptimType.EXACT_ROWWISE_ADAGRAD:
        return rows * _FP32
    if optimizer in (EmbOptimType.ADAM, EmbOptimType.LAMB):
        return 2 * rows * dim * _FP32
    if optimizer in (EmbOptimType.PARTIAL_ROWWISE_ADAM, EmbOptimType.PARTIAL_ROWWISE_LAMB):
        return rows * dim * _FP32 + rows * _FP32
    return rows * dim * _FP32


def built_optimizer(tensor: torch.Tensor, fused_params: Optional[Dict[str, Any]]) -> Optional[EmbOptimType]:
    """The optimizer the parameter or the sharder's fused_params name for this table's TBE
    (None where neither does: TorchRec then builds EXACT_SGD)."""
    optimizer_class, kwargs = in_backward_optimizer(tensor)
    if "optimizer" in kwargs:
        return resolve_optimizer(kwargs["optimizer"]) or EmbOptimType.EXACT_SGD
    if optimizer_class is not None:
        return resolve_optimizer(optimizer_class) or EmbOptimType.EXACT_SGD
    if fused_params and fused_params.get("optimizer") is not None:
        return resolve_optimizer(fused_params["optimizer"]) or EmbOptimType.EXACT_SGD
    return None


def counted_optimizer(built: Optional[EmbOptimType], fallback: Optional[EmbOptimType]) -> EmbOptimType:
    """The optimizer counted for a table's TBE (see the module docstring): the one TorchRec will
    build (`built`, from built_optimizer), else the planner's `fallback`, else SGD."""
    return built or fallback or EmbOptimType.EXACT_SGD


def effective_optimizer(
    tensor: torch.Tensor, fused_params: Optional[Dict[str, Any]], fallback: Optional[EmbOptimType]
) -> EmbOptimType:
    """The optimizer counted for this table's TBE (counted_optimizer of built_optimizer)."""
    return counted_optimizer(built_optimizer(tensor, fused_params), fallback)


def warn_unapplied_optimizer(tables: Sequence[str], planned: Optional[EmbOptimType]) -> None:
    """One warning for the tables where the planner counts an optimizer that nothing gives them
    (TorchRec then trains them with SGD, and the plan holds state they never get)."""
    if tables and planned not in (None, EmbOptimType.EXACT_SGD):
        assert planned is not None
        warnings.warn(
            f"tables {sorted(set(tables))}: the planner counts {planned.name} optimizer state, but neither the "
            "parameters (apply_optimizer_in_backward) nor the sharder's fused_params name an optimizer, so TorchRec "
            f"will build EXACT_SGD; give the sharder fused_params={{'optimizer': EmbOptimType.{planned.name}}} (or the "
            "parameters that optimizer) so that the plan and the training agree",
            UserWarning,
            stacklevel=2,
        )


def sharder_fused_params(sharders: Sequence[ModuleSharder[nn.Module]]) -> Dict[str, Any]:
    """The fused_params of the CafeEmbeddingBagCollection sharder among `sharders` ({} if none):
    where its tables' optimizer comes from when the parameters carry none."""
    for s in sharders:
        if getattr(s, "module_type", None) is CafeEmbeddingBagCollection:
            return dict(getattr(s, "fused_params", None) or {})
    return {}


@dataclass(frozen=True)
class ShardBytes:
    """One shard's estimated bytes: persistent state (weights, optimizer, sketch) and the stock
    estimator's per-step input/output buffers (io; on CPU it sits in DDR with the state)."""

    weights: int
    optimizer: int
    sketch: int
    io: int
    hot_rows: int = 0
    hashed_rows: int = 0

    @property
    def state(self) -> int:
        """What the memory budget counts: weights + optimizer state + sketch."""
        return self.weights + self.optimizer + self.sketch


def cafe_module_of(option: ShardingOption) -> Optional[CafeEmbeddingBagCollection]:
    module = option.module[1]
    return module if isinstance(module, CafeEmbeddingBagCollection) else None


def group_layout(module: CafeEmbeddingBagCollection, table: str) -> Optional[GroupLayout]:
    for g in module.plan.groups:
        if g.name == table:
            return g
    return None


def option_key(option: ShardingOption) -> Tuple[str, str, str, str]:
    return (option.path, option.name, option.sharding_type, option.compute_kernel)


class CafeStorageEstimator(ShardEstimator):
    """Adds each CAFE shard's sketch and the TBE optimizer-state correction (module docstring).

    Must run after EmbeddingStorageEstimator. ``breakdown`` keeps, per sharding option (path,
    table, sharding type, kernel), the ShardBytes of every shard, for reports and budget checks.
    """

    def __init__(
        self,
        topology: Topology,
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
        optimizer: OptimizerLike = None,
    ) -> None:
        self._topology = topology
        self._constraints = constraints
        self._optimizer = resolve_optimizer(optimizer)
        self.breakdown: Dict[Tuple[str, str, str, str], List[ShardBytes]] = {}

    def estimate(
        self, sharding_options: List[ShardingOption], sharder_data_map: Optional[Dict[str, Any]] = None
    ) -> None:
        unapplied: List[str] = []
        for option in sharding_options:
            module = cafe_module_of(option)
            if module is None:
                continue
            sharder_data = (sharder_data_map or {}).get(option.module_type_key)
            fused = getattr(sharder_data, "fused_params", None) or {}
            built = built_optimizer(option.tensor, fused)
            if built is None:
                unapplied.append(option.name)
            optimizer = counted_optimizer(built, self._optimizer)
            multiplier = stock_optimizer_multiplier(option.tensor)
            layout = group_layout(module, option.name)
            element = option.tensor.element_size()
            on_device = self._topology.compute_device in ("cuda", "mtia")
            shards = []
            for shard in option.shards:
                rows, cols = shard.size
                weights = rows * cols * element
                stock_opt = math.ceil(weights * multiplier)
                opt = optimizer_state_bytes(optimizer, rows, cols)
                sketch, hot, hashed, placeable = 0, 0, 0, True
                if layout is not None and rows > 0:
                    try:
                        block = layout.block(rows)
                        sketch, hot = group_state_bytes(block), block.hot_rows
                        hashed = block.physical_rows - block.hot_rows
                    except ValueError:
                        placeable = False
                storage = shard.storage or Storage(hbm=0, ddr=0)
                io = max(0, storage.hbm + storage.ddr - weights - stock_opt)
                extra = sketch + opt - stock_opt
                if not placeable:
                    shard.storage = Storage(hbm=MAX_SIZE, ddr=MAX_SIZE, ssd=storage.ssd)
                elif on_device and option.compute_kernel in ("fused", "dense"):
                    shard.storage = Storage(hbm=storage.hbm + extra, ddr=storage.ddr, ssd=storage.ssd)
                elif on_device:  # UVM kernels: weights and optimizer state in DDR, the sketch on the device
                    shard.storage = Storage(
                        hbm=storage.hbm + sketch, ddr=storage.ddr + opt - stock_opt, ssd=storage.ssd
                    )
                else:
                    shard.storage = Storage(hbm=storage.hbm, ddr=storage.ddr + extra, ssd=storage.ssd)
                shards.append(ShardBytes(weights, opt, sketch, io, hot, hashed))
            self.breakdown[option_key(option)] = shards
        warn_unapplied_optimizer(unapplied, self._optimizer)


def load_calibration(path: Union[None, str, Path] = None) -> Dict[str, Any]:
    """The calibration record: `path`, else $CAFE_PLANNER_CALIBRATION or the user-cache file if
    it exists, else DEFAULT_CALIBRATION. Missing keys are taken from the default."""
    candidate = Path(path) if path is not None else default_path()
    record = dict(DEFAULT_CALIBRATION)
    if candidate.is_file():
        loaded = json.loads(candidate.read_text())
        record.update(loaded)
        record["source"] = str(candidate)
    elif path is not None:
        raise FileNotFoundError(
            f"calibration file {candidate} does not exist; run `python -m cafe_planner.calibrate --out {candidate}`"
        )
    else:
        record["source"] = "default"
    return record


class CafePerfEstimator(ShardEstimator):
    """Adds the CAFE remap + sketch work to each CAFE group shard's perf (module docstring).

    Must run after EmbeddingPerfEstimator. ``added`` keeps, per sharding option, the perf
    (model ms) added to each shard.
    """

    def __init__(
        self,
        topology: Topology,
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
        calibration: Union[None, str, Path, Dict[str, Any]] = None,
    ) -> None:
        self._topology = topology
        self._constraints = constraints
        self.calibration = calibration if isinstance(calibration, dict) else load_calibration(calibration)
        self._fwd = float(self.calibration["fwd_overhead"])
        self._bwd = float(self.calibration["bwd_overhead"])
        self.added: Dict[Tuple[str, str, str, str], List[float]] = {}

    def estimate(
        self, sharding_options: List[ShardingOption], sharder_data_map: Optional[Dict[str, Any]] = None
    ) -> None:
        for option in sharding_options:
            module = cafe_module_of(option)
            if module is None or group_layout(module, option.name) is None:
                continue
            added = []
            for shard in option.shards:
                perf = shard.perf
                if perf is None:
                    added.append(0.0)
                    continue
                fwd, bwd = perf.fwd_compute * self._fwd, perf.bwd_compute * self._bwd
                shard.perf = Perf(
                    fwd_compute=perf.fwd_compute + fwd,
                    fwd_comms=perf.fwd_comms,
                    bwd_compute=perf.bwd_compute + bwd,
                    bwd_comms=perf.bwd_comms,
                    input_dist_comms=perf.input_dist_comms,
                    prefetch_compute=perf.prefetch_compute,
                )
                added.append(fwd + bwd)
            self.added[option_key(option)] = added


def physical_modules(module: nn.Module) -> List[Tuple[str, CafeEmbeddingBagCollection]]:
    """The CafeEmbeddingBagCollections inside `module` with their paths ('' for the root)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, CafeEmbeddingBagCollection)]
