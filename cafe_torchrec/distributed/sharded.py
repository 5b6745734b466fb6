"""ShardedCafeEmbeddingBagCollection: CAFE's remap between TorchRec's input dist and lookup.

A step on rank r, following one id:
1. input_dist: ids are prepared on the sender (group ids -> 63-bit keys pre-hashed with their
   table's salt; plain ids -> id mod rows), then the stock all-to-all routes them. Row-wise
   dists route a key by its range (uniform, since the high bits are hashed) and keep it
   unchanged (keep_original_indices), so the owner sees keys, not local rows.
2. compute (on the owner): keys -> rows of the local block via the local sketch (hot row,
   or hashed row(s)); plain ids -> id minus the shard's first row. Then the stock fused TBE
   lookup runs on the remapped KJT.
3. output_dist as stock: the KeyedTensor keeps the column order TorchRec gives it (by sharding
   type, and by rank within table-wise), as a stock sharded collection's; MEAN features are
   divided by their original bag lengths.
4. backward: a hook on each lookup output feeds the local sketch; promotions are copied at
   the end of backward, after TBE's fused update. No collective beyond TorchRec's own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torchrec.distributed.embedding_sharding import EmbeddingSharding
from torchrec.distributed.embedding_types import KJTList, ShardedEmbeddingModule
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.sharding.rw_sharding import BaseRwEmbeddingSharding, RwSparseFeaturesDist
from torchrec.distributed.types import (
    Awaitable,
    EmbeddingModuleShardingPlan,
    LazyAwaitable,
    ShardingEnv,
)
from torchrec.distributed.utils import append_prefix
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.sparse.tensor_dict import maybe_td_to_kjt

from cafe_torchrec._torchrec_compat import (
    create_input_dists,
    embedding_shardings,
    local_embedding_tables,
    replace_input_dist,
    sharding_process_group,
    take_over_input_dist,
)
from cafe_torchrec.backward import importance_hook
from cafe_torchrec.distributed.sketch_state import ShardedSketchState, owner_blocks
from cafe_torchrec.feature_map import FeatureMap
from cafe_torchrec.hashing import KEY_SPACE
from cafe_torchrec.layout import GroupLayout
from cafe_torchrec.modules import CafeEmbeddingBagCollection, refuse_foreign_state
from cafe_torchrec.output import PooledOutput
from cafe_torchrec.remap import CafeGroupRemap, group_remaps, remap_kjt
from cafe_torchrec.stats import CollectionReport
from cafe_torchrec.validation import checked_input


@dataclass
class CafeContext(EmbeddingBagCollectionContext):
    """The stock context plus the local batch's bag lengths for MEAN features."""

    logical_lengths: Optional[torch.Tensor] = None


class ShardedCafeEmbeddingBagCollection(
    CollectionReport, ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, CafeContext]
):
    """The sharded twin of CafeEmbeddingBagCollection (built by CafeEmbeddingBagCollectionSharder)."""

    def __init__(
        self,
        module: CafeEmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        physical_sharder: EmbeddingBagCollectionSharder,
        env: ShardingEnv,
        device: torch.device,
    ) -> None:
        super().__init__()
        self._env, self._device = env, device
        self._tables = module.embedding_bag_configs()
        self._is_weighted = module.is_weighted()
        self.plan = module.plan
        self.feature_map: FeatureMap = module.feature_map
        self.physical: ShardedEmbeddingBagCollection = physical_sharder.shard(
            module.physical, params, env=env, device=device
        )
        take_over_input_dist(self.physical)  # this module builds the input dists
        self._input_dists_ready = False
        self._outputs: Dict[Tuple[str, ...], PooledOutput] = {}
        layouts = {g.name: g for g in self.plan.groups}
        self._plain_offsets: Dict[str, int] = {}  # first row of this rank's shard of each plain table
        self._plain_rows: Dict[str, int] = {}  # rows of it this rank holds
        local: Dict[str, CafeGroupRemap] = {}
        kernel = module.feature_map.kernel
        for table in local_embedding_tables(self.physical):
            rows, offset = table.local_rows, table.local_metadata.shard_offsets[0] if table.local_metadata else 0
            if table.name in layouts and rows > 0:
                local[table.name] = CafeGroupRemap(layouts[table.name].block(rows), device, kernel)
            elif table.name not in layouts:
                self._plain_offsets[table.name] = offset
                self._plain_rows[table.name] = rows
        self.groups = nn.ModuleDict(local)
        owners = {name: owner_blocks(layout, params[name]) for name, layout in layouts.items() if name in params}
        self._sketch_state = ShardedSketchState(owners, self.groups, env.process_group, env.rank)
        # partial: torch marks its public hooks with an attribute, which a bound method cannot take
        self.register_state_dict_post_hook(functools.partial(self._sketch_state.post_state_dict))
        self.register_load_state_dict_pre_hook(functools.partial(self._sketch_state.pre_load))
        self.register_load_state_dict_pre_hook(refuse_foreign_state)  # after pre_load made its entries local

    # ---- the ShardedModule contract
    def create_context(self) -> CafeContext:
        return CafeContext()

    def input_dist(self, ctx: CafeContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        with record_function("## cafe: input check and pre-hash ##"):
            features = checked_input(maybe_td_to_kjt(features, None), self.feature_map.logical, self._is_weighted)
            ctx.logical_lengths = self.feature_map.output.bag_lengths(features)
            prepared = self.feature_map.prepare(features)
        if not self._input_dists_ready:
            self._create_input_dists(prepared.keys())
        return self.physical.input_dist(ctx, prepared)

    def compute(self, ctx: CafeContext, dist_input: KJTList) -> List[torch.Tensor]:
        training = self.training and torch.is_grad_enabled()
        groups = group_remaps(self.groups)
        remapped, per_sharding = [], []
        with record_function("## cafe: remap ##"):
            for kjt in dist_input:
                kjt_out, batches = remap_kjt(kjt, self.feature_map, groups, self._plain_offsets, training)
                remapped.append(kjt_out)
                per_sharding.append(batches)
        outputs = self.physical.compute(ctx, KJTList(remapped))
        for output, batches in zip(outputs, per_sharding):
            if batches and output.requires_grad:
                output.register_hook(importance_hook(batches, groups, lambda: self.physical))
        return outputs

    def output_dist(self, ctx: CafeContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        awaitable = self.physical.output_dist(ctx, output)
        lengths = ctx.logical_lengths
        if lengths is not None:  # some MEAN feature pooled with SUM: divided here
            awaitable.callbacks.append(lambda kt: self._pooled_output(kt.keys())(kt.values(), lengths))
        return awaitable

    def _pooled_output(self, keys: List[str]) -> PooledOutput:
        """The division of MEAN features in the sharded lookup's column order, which TorchRec
        sets by sharding type and, table-wise, by rank. The output keeps that order, as a stock
        ShardedEmbeddingBagCollection's does (moving the columns back to config order cost a
        copy forward and one backward, ~1.7 ms a DLRM step at 26 x 4096); built once per order."""
        order = tuple(keys)
        if order not in self._outputs:
            self._outputs[order] = PooledOutput(self._tables, keys, mean_by_sum=True, order=keys)
        return self._outputs[order]

    def compute_and_output_dist(self, ctx: CafeContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self.physical.fused_optimizer

    @property
    def unsharded_module_type(self) -> type:
        return CafeEmbeddingBagCollection

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        for name in self.physical.sharded_parameter_names(append_prefix(prefix, "physical")):
            yield name
        for name, _ in self.groups.named_buffers():
            yield append_prefix(prefix, f"groups.{name}")

    # ---- input dists: row-wise routes raw keys by range and keeps them
    def _create_input_dists(self, feature_names: List[str]) -> None:
        create_input_dists(self.physical, feature_names)
        for i, sharding in enumerate(embedding_shardings(self.physical)):
            if isinstance(sharding, BaseRwEmbeddingSharding):
                replace_input_dist(self.physical, i, self._row_wise_dist(sharding))
        self._input_dists_ready = True

    def _row_wise_dist(self, sharding: EmbeddingSharding) -> RwSparseFeaturesDist:
        hash_sizes = []
        for f in sharding.feature_names():
            info = self.feature_map.info[f]
            hash_sizes.append(KEY_SPACE if info.group is not None else info.plain_rows)
        return RwSparseFeaturesDist(
            pg=sharding_process_group(sharding),
            num_features=len(hash_sizes),
            feature_hash_sizes=hash_sizes,
            device=self._device,
            is_sequence=False,
            has_feature_processor=False,
            need_pos=False,
            keep_original_indices=True,
        )

    # ---- introspection (stats, memory, describe: cafe_torchrec.stats.CollectionReport)
    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._tables

    def is_weighted(self) -> bool:
        return self._is_weighted

    def plain_rows(self) -> Dict[str, int]:
        return dict(self._plain_rows)

    def sketch_layouts(self) -> List[GroupLayout]:
        return self._sketch_state.blocks()
