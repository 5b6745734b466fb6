"""The one place where private TorchRec / FBGEMM / torch attributes are reached.

TorchRec's public API leaves out a few things a plugin needs (what its own storage estimator
counts, which optimizer a parameter will get, the lookups of a sharded collection, the
end-of-backward callback queue, building a ShardedTensor without a collective). Each such
access is a named function here with a docstring saying what it reads and why, grouped under a
comment naming the area that needs it, so a TorchRec upgrade has one file to check. Imports of
torchrec happen inside the functions: this module must import with torch alone.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

# planner


def in_backward_optimizer(param: torch.Tensor) -> Tuple[Optional[Type[torch.optim.Optimizer]], Dict[str, Any]]:
    """The optimizer class and kwargs `apply_optimizer_in_backward` recorded on `param`
    (`_optimizer_classes[0]`, `_optimizer_kwargs[0]`), or (None, {}) without one: TorchRec's
    sharders build the fused TBE optimizer from exactly these attributes."""
    classes = getattr(param, "_optimizer_classes", None) or [None]
    kwargs = getattr(param, "_optimizer_kwargs", None) or [{}]
    return classes[0], dict(kwargs[0] or {})


def stock_optimizer_multiplier(param: torch.Tensor) -> float:
    """The factor TorchRec's EmbeddingStorageEstimator multiplies a shard's weight bytes by to
    count its optimizer state (torchrec 1.8's private `_get_optimizer_multipler`, fed with the
    parameter's in-backward optimizer class): the planner subtracts it to put FBGEMM's real
    optimizer bytes in its place."""
    from torchrec.distributed.planner.shard_estimators import _get_optimizer_multipler

    return float(_get_optimizer_multipler(in_backward_optimizer(param)[0], param.shape))


def sharded_lookups(sharded: nn.Module) -> List[nn.Module]:
    """The lookup modules (FBGEMM TBEs inside) of a sharded TorchRec embedding collection: a
    plain list `_lookups` in torchrec 1.8, so `modules()` does not reach them; the planner's
    tests count the bytes they allocate."""
    return list(getattr(sharded, "_lookups", []))


# sharded collection (distributed/sharded.py): CAFE builds the stock module's input dists itself


def take_over_input_dist(sharded: Any) -> None:
    """Stop a ShardedEmbeddingBagCollection from building its input dists at its first
    `input_dist` (`_has_uninitialized_input_dist`): the CAFE module builds them from the prepared
    feature order and swaps in its row-wise dists (create_input_dists, replace_input_dist)."""
    sharded._has_uninitialized_input_dist = False


def embedding_shardings(sharded: Any) -> List[Any]:
    """The EmbeddingSharding objects of a ShardedEmbeddingBagCollection, one per sharding type,
    in the order of its input dists and lookups (`_embedding_shardings`)."""
    return list(sharded._embedding_shardings)


def local_embedding_tables(sharded: Any) -> List[Any]:
    """The ShardedEmbeddingTable configs this rank holds (name, local_rows, local_metadata), over
    all shardings (`_grouped_embedding_configs` of each): the public `embedding_tables()` lists
    every rank's tables for table-wise sharding."""
    return [
        table
        for sharding in embedding_shardings(sharded)
        for config in sharding._grouped_embedding_configs
        for table in config.embedding_tables
    ]


def sharding_process_group(sharding: Any) -> Any:
    """The process group an EmbeddingSharding's all-to-alls run on (`_pg`): a replacement input
    dist must use the same one."""
    return sharding._pg


def create_input_dists(sharded: Any, feature_names: List[str]) -> None:
    """Build the stock input dists of a ShardedEmbeddingBagCollection for input features in
    `feature_names` order (`_create_input_dist`, what its first `input_dist` would call)."""
    sharded._create_input_dist(feature_names)


def replace_input_dist(sharded: Any, index: int, dist: nn.Module) -> None:
    """Use `dist` as the input dist of the module's `index`-th sharding (`_input_dists[index]`)."""
    sharded._input_dists[index] = dist


# migration (migration.py): the rows and optimizer state a migration copies


def fused_table_kernel(sharded: Any, table: str) -> Optional[Tuple[Any, int]]:
    """The FBGEMM TBE that holds `table` in a sharded TorchRec collection and the table's index
    among its tables, or None: the lookups' kernels (`_lookups`, each lookup's `_emb_modules`;
    a data-parallel lookup is DDP-wrapped) are not reachable through public attributes."""
    for lookup in sharded_lookups(sharded):
        lookup = getattr(lookup, "module", lookup)
        for kernel in getattr(lookup, "_emb_modules", []):
            tables = [t.name for t in kernel.config.embedding_tables]
            if table in tables:
                return kernel.emb_module, tables.index(table)
    return None


def in_backward_optimizers(param: torch.Tensor) -> List[torch.optim.Optimizer]:
    """The optimizers `torch.distributed.optim._apply_optimizer_in_backward` attached to `param`
    (`_in_backward_optimizers`; empty without one): their per-parameter state is what a
    migration copies, and their presence says the update runs inside backward."""
    return list(getattr(param, "_in_backward_optimizers", []))


# backward (backward.py)


def queue_end_of_backward(callback: Callable[[], None]) -> None:
    """Run `callback` once the current backward pass has finished, i.e. after every hook and
    fused / in-backward optimizer update of the pass (`Variable._execution_engine.queue_callback`,
    which is how torch's own in-backward optimizers and DDP schedule end-of-backward work).
    Must be called from inside a backward hook."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


# sharded tensors: sketch state and checkpoints (distributed/sketch_state.py, distributed/checkpoint.py),
# the group table's init (layout.py)


def is_sharded_tensor(value: Any) -> bool:
    """Whether `value` is a torch ShardedTensor (the type TorchRec's sharded state_dict entries
    have), whose class lives in the private `torch.distributed._shard`."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(value, ShardedTensor)


def local_row_blocks(weight: torch.Tensor) -> List[torch.Tensor]:
    """The tensors of `weight` this process holds: itself, or a ShardedTensor's local shards
    (TorchRec's sharded reset_parameters hands a table's init_fn the ShardedTensor)."""
    if is_sharded_tensor(weight):
        return [shard.tensor for shard in weight.local_shards()]  # type: ignore[attr-defined]
    return [weight]


def row_sharded_tensor(
    local: Optional[torch.Tensor],
    shards: Sequence[Tuple[int, torch.Size]],
    rank: int,
    dtype: torch.dtype,
    process_group: Any,
) -> Any:
    """A ShardedTensor cut along dim 0 into `shards` ((owner rank, shard shape), in order, on
    CPU), holding `local` as this rank's shard where given. Built from this rank's shard and the
    global metadata without a collective (`ShardedTensor._init_from_local_shards_and_global_metadata`,
    the technique of TorchRec's managed-collision module), so a state_dict() call costs no
    communication."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata, TensorProperties

    metas, offset, local_shards = [], 0, []
    for owner, shape in shards:
        meta = ShardMetadata(
            shard_offsets=[offset] + [0] * (len(shape) - 1), shard_sizes=list(shape), placement=f"rank:{owner}/cpu"
        )
        metas.append(meta)
        if owner == rank and local is not None:
            local_shards.append(Shard(local, meta))
        offset += shape[0]
    size = torch.Size([offset] + list(shards[0][1][1:]))
    metadata = ShardedTensorMetadata(shards_metadata=metas, size=size, tensor_properties=TensorProperties(dtype=dtype))
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local_shards, metadata, process_group=process_group
    )


# baselines (baselines/base.py, baselines/managed_collision.py)


def sharded_embedding_bag_configs(sharded: Any) -> List[Any]:
    """The EmbeddingBagConfigs a ShardedEmbeddingBagCollection was built from
    (`_embedding_bag_configs`; the sharded module has no `embedding_bag_configs()`)."""
    return list(sharded._embedding_bag_configs)


def managed_collision_embedding_module(mc_ebc: Any) -> nn.Module:
    """The (sharded or not) EmbeddingBagCollection inside a ManagedCollisionEmbeddingBagCollection
    (`_embedding_module`)."""
    return mc_ebc._embedding_module


def managed_collision_modules(mc_ebc: Any) -> Dict[str, nn.Module]:
    """Table name -> managed-collision module of a (sharded or not) ManagedCollisionEmbeddingBagCollection
    (`_managed_collision_collection._managed_collision_modules`)."""
    return dict(mc_ebc._managed_collision_collection._managed_collision_modules.items())


def managed_collision_tbes(mc_ebc: Any) -> Dict[str, Any]:
    """Table name -> FBGEMM TBE of a sharded ManagedCollisionEmbeddingBagCollection
    (`_table_to_tbe_and_index`); empty for the unsharded module, which has none."""
    return {table: tbe for table, (tbe, _) in getattr(mc_ebc, "_table_to_tbe_and_index", {}).items()}


# serving (inference/): the frozen collection's ops under torch.export


def add_meta_kernel(namespace: str, op: str, kernel: Callable[..., Any]) -> Optional[Any]:
    """Register `kernel` as the Meta kernel of `namespace::op` unless the op has one
    (`torch._C._dispatch_has_kernel_for_dispatch_key`), so torch.export can trace it on fake
    tensors; returns the torch.library.Library that keeps the registration alive, or None."""
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{op}", "Meta"):
        return None
    library = torch.library.Library(namespace, "IMPL", "Meta")
    library.impl(op, kernel)
    return library


def module_with_children(root: nn.Module, replacements: Dict[str, nn.Module]) -> nn.Module:
    """A copy of `root` in which the submodule at each path of `replacements` is replaced:
    the modules on those paths are shallow copies with their own child dict (`_modules`),
    everything else is shared, and `root` itself is left as it was (a DMP model stays usable
    while its gathered serving copy exists)."""
    import copy

    if "" in replacements:
        return replacements[""]
    clone = copy.copy(root)
    clone._modules = dict(root._modules)
    children: Dict[str, Dict[str, nn.Module]] = {}
    for path, module in replacements.items():
        head, _, rest = path.partition(".")
        children.setdefault(head, {})[rest] = module
    for name, below in children.items():
        clone._modules[name] = module_with_children(root.get_submodule(name), below)
    return clone
