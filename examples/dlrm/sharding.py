"""How the embedding tables are sharded: the sharders, per-table constraints, the plan, and its summary."""

from __future__ import annotations

import argparse
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from examples.dlrm.process_group import Dist


def make_sharders(args: argparse.Namespace, spec: Any, device: torch.device) -> List[Any]:
    """CAFE's sharder first, then TorchRec's defaults, less (or patched for) what CPU cannot shard."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import get_default_sharders

    from cafe_torchrec.distributed import CafeEmbeddingBagCollectionSharder

    defaults = get_default_sharders()
    if args.embedding.startswith("mc-") and device.type == "cpu":
        # TorchRec's MC-EBC sharder offers no sharding type on CPU (torchrec #2958): leave the managed
        # collision module unsharded and let DMP shard the stock EBC inside it.
        from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder

        defaults = [s for s in defaults if not isinstance(s, ManagedCollisionEmbeddingBagCollectionSharder)]
    if args.sharding == "row_wise" and device.type == "cpu" and not spec.is_cafe:
        # TorchRec's EBC sharder offers no row-wise on CPU; CAFE's physical-table sharder adds it (gloo runs it)
        from cafe_torchrec.distributed.sharder import PhysicalTablesSharder

        defaults = [PhysicalTablesSharder() if type(s) is EmbeddingBagCollectionSharder else s for s in defaults]
    return [CafeEmbeddingBagCollectionSharder(), *defaults]


def sharding_constraints(args: argparse.Namespace, spec: Any, world: int) -> Dict[str, Any]:
    """ParameterConstraints per physical table: --sharding on the tables it fits, table-wise for
    tiny ones; with --sharding auto the planner's choice (CAFE's sharder offers table-wise and
    row-wise only; a baseline's tables are held to the types that keep whole rows on a rank, as a
    row-wise optimizer needs). Never data-parallel: a data-parallel table is a dense parameter,
    trained by the dense optimizer (--dense-optimizer, --dense-lr) instead of the embedding one
    every method is compared with."""
    from torchrec.distributed.planner import ParameterConstraints
    from torchrec.distributed.types import ShardingType

    from cafe_torchrec.distributed.sharder import every_rank_has_rows, row_wise_shard_rows

    # whole rows on a rank: a row-wise optimizer (row-wise Adagrad) keeps one statistic per row,
    # which column-wise shards would split; and never data-parallel
    model_parallel = [t.value for t in (ShardingType.TABLE_WISE, ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE)]
    constraints = {}
    for name, rows in spec.physical_tables().items():
        if world > 1 and not every_rank_has_rows(row_wise_shard_rows(rows, world)):
            constraints[name] = ParameterConstraints(sharding_types=["table_wise"])
        elif args.sharding != "auto":
            constraints[name] = ParameterConstraints(sharding_types=[args.sharding])
        elif not spec.is_cafe:  # a CAFE table keeps CafePlanner's own defaults (pooling per feature)
            constraints[name] = ParameterConstraints(sharding_types=model_parallel)
    return constraints


def plan_sharding(args: argparse.Namespace, spec: Any, model: torch.nn.Module, sharders: List[Any], d: Dist) -> Any:
    """CafePlanner.collective_plan over the world (rank 0 plans, every rank gets its plan): TorchRec's
    planner with CAFE's sketch and optimizer bytes counted and table-wise tables balanced by memory."""
    from torchrec.distributed.planner import Topology

    from cafe_planner import CafePlanner

    planner = CafePlanner(
        Topology(world_size=d.world_size, local_world_size=d.local_world_size, compute_device=d.device.type),
        batch_size=args.batch_size,
        constraints=sharding_constraints(args, spec, d.world_size),
    )
    return planner.collective_plan(model, sharders, dist.GroupMember.WORLD)


def plan_summary(plan: Any) -> List[str]:
    """One line per module and (sharding type, kernel, ranks): the tables placed that way."""
    lines = []
    for module_path, module_plan in plan.plan.items():
        placed: Dict[tuple, List[str]] = {}
        for table, ps in module_plan.items():
            placed.setdefault((ps.sharding_type, ps.compute_kernel, tuple(ps.ranks or ())), []).append(table)
        for (sharding, kernel, ranks), tables in placed.items():
            lines.append(f"{module_path}: {sharding}/{kernel} on ranks {list(ranks)}: {', '.join(tables)}")
    return lines
