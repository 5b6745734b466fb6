"""CafeEmbeddingBagCollectionSharder: lets DistributedModelParallel and the planner shard CAFE."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Type

import torch
from torch import nn
from torchrec.distributed.embedding_types import BaseEmbeddingSharder, EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import calculate_shard_sizes_and_offsets
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ShardingEnv, ShardingType

from cafe_torchrec.distributed.sharded import ShardedCafeEmbeddingBagCollection
from cafe_torchrec.modules import CafeEmbeddingBagCollection

SHARDING_TYPES = [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value]
# the TBE kernel whose rows and fused optimizer state a migration can write in place (a caching
# kernel's hot rows live in its cache, which split_embedding_weights() does not see)
GROUP_KERNELS = [EmbeddingComputeKernel.FUSED.value]


def row_wise_shard_rows(rows: int, world_size: int) -> List[int]:
    """Rows of each rank's block when TorchRec cuts a table of `rows` rows row-wise over
    `world_size` ranks (calculate_shard_sizes_and_offsets: ceil(rows / W) each, the last ranks
    fewer, possibly none)."""
    sizes, _ = calculate_shard_sizes_and_offsets(
        torch.empty(rows, 1, device="meta"), world_size, world_size, ShardingType.ROW_WISE.value
    )
    return [s[0] for s in sizes]


def every_rank_has_rows(shard_rows: Sequence[int]) -> bool:
    """The row-wise rule: no rank's block may be empty. FBGEMM's CPU exact backward on a 0-row
    table (get_hash_size in embedding_backward_split_cpu_template.cpp) scans hash_size_cumsum past
    its end for a non-zero size: undefined behaviour, seen as a spurious "tables with more than 2B
    rows" error on that rank now and then. The sharder refuses such plans; the planner and the
    example trainer shard such tables table-wise."""
    return min(shard_rows) >= 1


class PhysicalTablesSharder(EmbeddingBagCollectionSharder):
    """The stock EBC sharder, with row-wise offered on CPU too (it runs on gloo)."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        return types if ShardingType.ROW_WISE.value in types else types + [ShardingType.ROW_WISE.value]


class CafeEmbeddingBagCollectionSharder(BaseEmbeddingSharder[CafeEmbeddingBagCollection]):
    """Shards the physical tables table-wise or row-wise with fused TBE kernels.

    Plan keys are the physical table names (one per CAFE group, one per plain table). A
    table-wise group lives with its sketch on one rank; a row-wise group gives every rank a
    block with its own hot rows, hashed rows and sketch. Data-parallel is not offered: every
    rank would grow a different sketch for the same rows.
    """

    def __init__(self, fused_params: Optional[Dict[str, Any]] = None, qcomm_codecs_registry=None) -> None:
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        self._physical_sharder = PhysicalTablesSharder(
            fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry
        )

    def shard(
        self,
        module: CafeEmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedCafeEmbeddingBagCollection:
        groups = {g.name for g in module.plan.groups}
        for table, sharding in params.items():
            if sharding.sharding_type not in SHARDING_TYPES:
                raise ValueError(
                    f"CAFE table {table!r}: sharding type {sharding.sharding_type!r} is not supported; "
                    f"use one of {SHARDING_TYPES}"
                )
            if table in groups and sharding.compute_kernel not in GROUP_KERNELS:
                raise ValueError(
                    f"CAFE table {table!r}: compute kernel {sharding.compute_kernel!r} is not supported "
                    f"(migrations write its rows and fused optimizer state in place); use one of {GROUP_KERNELS}"
                )
            shards = sharding.sharding_spec.shards if sharding.sharding_spec is not None else []
            sizes = [m.shard_sizes[0] for m in shards]
            if sharding.sharding_type == ShardingType.ROW_WISE.value and sizes and not every_rank_has_rows(sizes):
                raise ValueError(
                    f"CAFE table {table!r}: a row-wise plan leaves a rank with no rows ({sizes}); shard it table-wise"
                )
        return ShardedCafeEmbeddingBagCollection(
            module, params, self._physical_sharder, env, device or torch.device("cpu")
        )

    def shardable_parameters(self, module: CafeEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        return self._physical_sharder.shardable_parameters(module.physical)

    @property
    def module_type(self) -> Type[CafeEmbeddingBagCollection]:
        return CafeEmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return list(SHARDING_TYPES)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return [EmbeddingComputeKernel.FUSED.value]
