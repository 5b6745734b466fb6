"""Per-rank sketch state as ShardedTensors, so torch.distributed.checkpoint saves every rank's.

A group's persistent remap buffers (sketch slots, free rows, counters, seed, layout signature)
differ per rank: a row-wise group has one sketch per block, a table-wise group one sketch on
its owner. In state_dict() each buffer becomes a 1-D-sharded ShardedTensor whose shards are the
owners' buffers in shard order (the technique of TorchRec's managed-collision module), built on
every call (no collective). A shard is the buffer itself, as a stock collection's state dict
holds its weights: `dcp.load` into `model.state_dict()` restores the sketch in place as it
restores the weights, with or without the `load_state_dict` after it (which checks the layout).
`load_checkpoint_atomically` reads into copies and checks before anything changes.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn
from torchrec.distributed.types import ParameterSharding

from cafe_torchrec._torchrec_compat import is_sharded_tensor, row_sharded_tensor
from cafe_torchrec.layout import GroupLayout
from cafe_torchrec.remap import CafeGroupRemap, check_layout


def owner_blocks(layout: GroupLayout, sharding: ParameterSharding) -> List[Tuple[int, GroupLayout]]:
    """(rank, block layout) of every rank holding rows of the group's table, in shard order."""
    shards = sorted(sharding.sharding_spec.shards, key=lambda m: m.shard_offsets[0])
    return [(m.placement.rank(), layout.block(m.shard_sizes[0])) for m in shards if m.shard_sizes[0] > 0]


def _buffer_shapes(block: GroupLayout) -> Dict[str, Tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of each persistent buffer of a CafeGroupRemap for this block (dim 0 is sharded)."""
    remap = CafeGroupRemap(block, torch.device("meta"))
    return {name: (buf.shape, buf.dtype) for name, buf in remap.state_dict().items()}


class ShardedSketchState:
    """state_dict hooks that turn the local remap buffers into ShardedTensors and back."""

    def __init__(
        self, owners: Dict[str, List[Tuple[int, GroupLayout]]], groups: nn.ModuleDict, process_group: Any, rank: int
    ) -> None:
        self._owners = owners
        self._groups = groups
        self._pg = process_group
        self._rank = rank
        self._shapes = {g: [(r, _buffer_shapes(b)) for r, b in blocks] for g, blocks in owners.items()}

    def blocks(self) -> List[GroupLayout]:
        """The layout of every block's sketch, over all ranks (one per table-wise group)."""
        return [block for owners in self._owners.values() for _, block in owners]

    def post_state_dict(self, module: nn.Module, destination: Dict[str, Any], prefix: str, _meta: Any) -> None:
        for group, owners in self._shapes.items():
            names = owners[0][1].keys()
            local = self._groups[group].state_dict() if group in self._groups else {}
            for name in names:
                key = f"{prefix}groups.{group}.{name}"
                destination[key] = self._sharded(local.get(name), [(r, shapes[name]) for r, shapes in owners])

    def pre_load(self, module: nn.Module, state_dict: Dict[str, Any], prefix: str, *_: Any) -> None:
        for group in self._shapes:
            for key in [k for k in state_dict if k.startswith(f"{prefix}groups.{group}.")]:
                value = state_dict[key]
                if group not in self._groups:
                    # this rank holds no block of the group: its entries (sharded, or an unsharded
                    # collection's plain tensors, which the owner checks and loads) are not for it;
                    # a plain layout is checked here too, so that every rank refuses what the owner does
                    if key.endswith(".layout_signature") and not is_sharded_tensor(value):
                        self._check_plain(group, value)
                    del state_dict[key]
                elif is_sharded_tensor(value):
                    shards = value.local_shards()
                    if shards:
                        state_dict[key] = shards[0].tensor
                    else:
                        del state_dict[key]

    def _check_plain(self, group: str, saved: Any) -> None:
        """ValueError unless an unsharded collection's layout signature of `group` fits its only
        owner's block (a group of several blocks takes no unsharded state: each owner refuses it)."""
        blocks = self._owners[group]
        if len(blocks) != 1:
            raise ValueError(
                f"unsharded state of CAFE group {group!r} does not fit its {len(blocks)} row-wise blocks "
                f"(ranks {[rank for rank, _ in blocks]})"
            )
        check_layout(blocks[0][1], saved)

    def _sharded(self, tensor: Any, owners: List[Tuple[int, Tuple[torch.Size, torch.dtype]]]) -> Any:
        """This rank's buffer (not a copy) as its shard of the ShardedTensor of all owners' buffers."""
        local = tensor.detach() if tensor is not None else None
        shards = [(rank, shape) for rank, (shape, _) in owners]
        return row_sharded_tensor(local, shards, self._rank, owners[0][1][1], self._pg)
