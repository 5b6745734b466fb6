"""freeze(): a trained CAFE collection (unsharded, or sharded under DMP) -> its frozen form.

What is frozen per CAFE group and block is what the training module's eval forward would
serve at this moment: the slots its sketch holds with a hot row or a medium key (a slot holds a
key's bucket and tag, which the frozen hash map is keyed by), the sketch's bucket hash, and the
block's regions. Sharded, every rank freezes the blocks it holds, and rank 0 gathers them with
the full physical tables (ShardedTensor.gather); the blocks are put in bucket order (the rank
a row-wise block lives on is the bucket TorchRec's block bucketization sends its keys to).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, QuantConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from cafe_torchrec.distributed.sharded import ShardedCafeEmbeddingBagCollection
from cafe_torchrec.hashing import KEY_SPACE, MAX_BOUND, table_salts
from cafe_torchrec.inference.frozen import ABSENT, MEDIUM, FrozenCafeEmbeddingBagCollection, salt_offsets
from cafe_torchrec.layout import CafePlan, GroupLayout
from cafe_torchrec.modules import CafeEmbeddingBagCollection
from cafe_torchrec.remap import CafeGroupRemap, group_remaps
from cafe_torchrec.sketch.types import EMPTY_TAG, estimates_of, hot_rows_of, newcomers_of

# torch dtypes of the physical tables TorchRec's quantized collection (FBGEMM IntNBit TBE) serves
SERVING_DTYPES = (torch.float32, torch.float16, torch.int8, torch.quint4x2)
ROW_ALIGNMENT = 1  # bytes; FBGEMM's CPU default (TorchRec's 16 pads an INT8 row of dim 16 from 20 to 32 bytes)


@dataclass
class ServedSlots:
    """What one block's sketch serves: its bucket multiplier and buckets, and the slots holding
    a hot row (rows: the row in the block) or a medium key (rows: -1), by bucket and tag
    (int64, the tag's 32 bits unsigned)."""

    multiplier: int
    num_buckets: int
    buckets: torch.Tensor
    tags: torch.Tensor
    rows: torch.Tensor


@dataclass
class FrozenBlock:
    """One block of a group as served: its first physical row, its layout, its served slots."""

    first_row: int
    layout: GroupLayout
    slots: ServedSlots


def served_slots(remap: CafeGroupRemap) -> ServedSlots:
    """The slots a group's (or block's) sketch holds with a hot row or a medium key, and each
    one's hot row in the block (-1 if medium): a query's rules (types: hot_rows_of, a confirmed
    slot without a row whose estimate reaches the medium level), as the eval forward's lookup."""
    sketch = remap.sketch
    sketch.prepare()
    state = sketch.state()
    words = state.words
    held = state.tags != EMPTY_TAG
    hot = held & (words >= 0)
    medium = torch.zeros_like(hot)
    if sketch.medium_threshold is not None:
        level = torch.tensor(sketch.medium_threshold, dtype=torch.float32, device=words.device)
        medium = held & (words < 0) & ~newcomers_of(words) & (estimates_of(state.scores, words) >= level)
    slots = (hot | medium).nonzero().flatten()
    return ServedSlots(
        sketch.multiplier,
        sketch.num_buckets,
        (slots // sketch.slots_per_bucket).cpu(),
        (state.tags[slots].long() & 0xFFFFFFFF).cpu(),
        hot_rows_of(words[slots]).long().cpu(),
    )


def quantized_tables(
    configs: Sequence[EmbeddingBagConfig], weights: Dict[str, torch.Tensor], is_weighted: bool, dtype: torch.dtype
) -> nn.Module:
    """TorchRec's QuantEmbeddingBagCollection (FBGEMM IntNBit TBE, row-wise quantized for INT8 and
    INT4) over the physical tables `configs`, from their FP32 weights (by table name); built by
    TorchRec's own from_float."""
    ebc = EmbeddingBagCollection(list(configs), is_weighted=is_weighted, device=torch.device("meta"))
    for c in configs:
        weight = weights[c.name].detach().float().cpu()
        ebc.embedding_bags[c.name].weight = nn.Parameter(weight, requires_grad=False)
    ebc.qconfig = QuantConfig(
        activation=torch.quantization.PlaceholderObserver.with_args(dtype=torch.float),
        weight=torch.quantization.PlaceholderObserver.with_args(dtype=dtype),
    )
    quant_prep_customize_row_alignment(ebc, [EmbeddingBagCollection], ROW_ALIGNMENT)
    return QuantEmbeddingBagCollection.from_float(ebc)


def fits_one_table(plan: CafePlan) -> bool:
    """Whether the frozen collection holds one physical table: one CAFE group, and every plain
    table of its dim and data type. The plain tables' rows then follow the group's and the
    table's features are in config order, so the quantized collection's output needs no
    reordering (a copy of the whole output per batch, the largest cost after the id work when
    plain features sit between compressed ones, as Criteo's small fields do)."""
    if len(plan.groups) != 1:
        return False
    group = plan.groups[0]
    return all(p.config.embedding_dim == group.dim and p.config.data_type == group.data_type for p in plan.plain)


def build_frozen(
    tables: Sequence[EmbeddingBagConfig],
    plan: CafePlan,
    blocks: Dict[str, List[FrozenBlock]],
    weights: Dict[str, torch.Tensor],
    is_weighted: bool,
    dtype: torch.dtype,
) -> FrozenCafeEmbeddingBagCollection:
    """The frozen collection of a plan from its groups' blocks (in bucket order) and its
    physical tables' FP32 weights: one physical table where the plan fits (fits_one_table),
    else the plan's tables; each table with an all-zero last row when a group is multi-level.
    The tables' weights are copied in, so their configs carry no init_fn of the training layout."""
    multi_level = any(g.config.multi_level for g in plan.groups)
    one_table = fits_one_table(plan)
    physical_configs = plan.physical_configs()
    if one_table:  # the group's rows, then each plain table's
        starts = [0, *itertools.accumulate(c.num_embeddings for c in physical_configs)]
        first_row = {c.name: start for c, start in zip(physical_configs, starts)}
        rows = starts[-1]
        features = [f for t in tables for f in t.feature_names]
        merged = replace(
            physical_configs[0], num_embeddings=rows + int(multi_level), feature_names=features, init_fn=None
        )
        table_of = {f: c for c in physical_configs for f in c.feature_names}
        inner_order = [(f, table_of[f]) for f in features]
        zero_row_of = {c.name: rows for c in physical_configs}
        tables_out = [merged]
        weights_out = {merged.name: torch.cat([weights[c.name].detach().float().cpu() for c in physical_configs])}
    else:
        inner_order = [(f, c) for c in physical_configs for f in c.feature_names]
        first_row = {c.name: 0 for c in physical_configs}
        zero_row_of = {c.name: c.num_embeddings for c in physical_configs}
        tables_out = [
            replace(c, num_embeddings=c.num_embeddings + int(multi_level), init_fn=None) for c in physical_configs
        ]
        weights_out = {c.name: weights[c.name].detach().float().cpu() for c in physical_configs}
    if multi_level:  # the all-zero row a non-medium id's second row points at
        weights_out = {n: torch.cat([w, w.new_zeros(1, w.shape[1])]) for n, w in weights_out.items()}
    layouts = {g.name: g for g in plan.groups}
    inner: List[str] = []
    info: List[List[int]] = []
    regions: List[List[int]] = [[0, 1, 0, 1]]  # row 0: plain features of a table of their own
    plain_region: Dict[str, int] = {}
    bounds: List[int] = [0]
    keys: List[torch.Tensor] = []  # per group, its blocks' served keys (frozen.served_keys_of)
    values: List[torch.Tensor] = []
    bucket_hashes: List[List[int]] = [[1, 1, 0]]  # row 0: a placeholder for plain features
    group_info: Dict[str, List[int]] = {}
    for config in physical_configs:
        layout = layouts.get(config.name)
        if layout is None:
            if first_row[config.name]:  # a region row holding its first row in the one table
                plain_region[config.name] = len(regions)
                regions.append([first_row[config.name], config.num_embeddings, 0, 1])
            continue
        group_blocks = blocks[layout.name]
        base = len(regions)
        for b in group_blocks:
            regions += [
                [o1 + b.first_row, t.level1_rows, o2 + b.first_row, max(t.level2_rows, 1)]
                for t, (o1, o2) in zip(b.layout.tables, b.layout.region_offsets())
            ]
        first_hash, first_bucket = len(bucket_hashes), 0
        served: List[torch.Tensor] = []
        for b in group_blocks:
            bucket_hashes.append([b.slots.multiplier, b.slots.num_buckets, first_bucket])
            served.append(((b.slots.buckets + first_bucket) << 32) | b.slots.tags)
            first_bucket += b.slots.num_buckets
        if first_bucket > MAX_BOUND:
            raise ValueError(f"freeze: CAFE group {layout.name!r} has more than 2^31 sketch buckets over its blocks")
        keys.append(torch.cat(served))
        values.append(
            torch.cat([torch.where(b.slots.rows >= 0, b.slots.rows + b.first_row, MEDIUM) for b in group_blocks])
        )
        offsets = salt_offsets(table_salts(len(layout.tables), layout.config.seed)).tolist()
        for f in config.feature_names:
            slot = next(i for i, t in enumerate(layout.tables) if f in t.features)
            group_info[f] = [
                offsets[slot],
                slot,
                base + slot,
                len(layout.tables),
                block_size(len(group_blocks)),
                len(group_blocks) - 1,
                0,
                zero_row_of[config.name],
                first_hash,
            ]
    for f, config in inner_order:
        inner.append(f)
        if config.name in layouts:
            info.append(group_info[f])
        else:
            info.append(
                [0, 0, plain_region.get(config.name, 0), 1, 1, 0, config.num_embeddings, zero_row_of[config.name], 0]
            )
        if config.name in layouts and f == config.feature_names[-1]:
            bounds.append(len(inner))  # the end of a group's run of features (plain ones inside it skip the map)
    bounds.append(len(inner))
    hash_table, hash_offsets = _hash_map(keys, values)
    physical = quantized_tables(tables_out, weights_out, is_weighted, dtype)
    multi_block = any(len(blocks[g.name]) > 1 for g in plan.groups)
    return FrozenCafeEmbeddingBagCollection(
        tables,
        inner,
        torch.tensor(info, dtype=torch.int64),
        bounds,
        hash_table,
        hash_offsets,
        torch.tensor(regions, dtype=torch.int64),
        torch.tensor(bucket_hashes, dtype=torch.int64),
        physical,
        is_weighted,
        multi_level,
        multi_block,
    )


def _hash_map(keys: List[torch.Tensor], values: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """FBGEMM's pruned hash map (linear probing) with one region per group (keys[g] -> values[g])
    and a last region of capacity 0 (FBGEMM passes its ids through); filled by FBGEMM's own
    insert. A region's capacity is the power of two at least twice its keys: at most half full,
    so probes stay short, and its first slot (FBGEMM's murmur mix mod the capacity) is the mix's
    low bits, which the C++ op takes with a mask instead of a division-free modulo (3-8% of the
    frozen collection's time at batch 512, benchmarks/serving.py). The price: 32-64 bytes per frozen key where a
    capacity of exactly twice the keys takes 32."""
    capacities = [1 << max(0, 2 * k.numel() - 1).bit_length() for k in keys] + [0]
    hash_offsets = torch.tensor([0] + list(itertools.accumulate(capacities)), dtype=torch.int64)
    hash_table = torch.full((int(hash_offsets[-1]), 2), ABSENT, dtype=torch.int64)
    counts = [k.numel() for k in keys] + [0]
    offsets = torch.tensor([0] + list(itertools.accumulate(counts)), dtype=torch.int64)
    empty = torch.empty(0, dtype=torch.int64)
    torch.ops.fbgemm.pruned_hashmap_insert(
        torch.cat(keys + [empty]), torch.cat(values + [empty]), offsets, hash_table, hash_offsets
    )
    return hash_table, hash_offsets


def freeze(collection: nn.Module, dtype: torch.dtype = torch.float32) -> Optional[FrozenCafeEmbeddingBagCollection]:
    """The frozen inference form of a trained CAFE collection, its physical tables in `dtype`
    (torch.float32, float16, int8 or quint4x2 for INT4). A CafeEmbeddingBagCollection freezes
    here; a ShardedCafeEmbeddingBagCollection (inside DMP) freezes collectively: call it on
    every rank; rank 0 gets the module, the other ranks None."""
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"freeze: dtype {dtype} is not served; use one of {SERVING_DTYPES}")
    if isinstance(collection, CafeEmbeddingBagCollection):
        return _freeze_unsharded(collection, dtype)
    if isinstance(collection, ShardedCafeEmbeddingBagCollection):
        return _freeze_sharded(collection, dtype)
    raise ValueError(f"freeze takes a CafeEmbeddingBagCollection or its sharded form, got {type(collection).__name__}")


def _freeze_unsharded(collection: CafeEmbeddingBagCollection, dtype: torch.dtype) -> FrozenCafeEmbeddingBagCollection:
    blocks = {}
    for name, remap in group_remaps(collection.groups).items():
        blocks[name] = [FrozenBlock(0, remap.layout, served_slots(remap))]
    weights = {name: cast(torch.Tensor, bag.weight) for name, bag in collection.physical.embedding_bags.items()}
    return build_frozen(
        collection.embedding_bag_configs(), collection.plan, blocks, weights, collection.is_weighted(), dtype
    )


def _freeze_sharded(
    collection: ShardedCafeEmbeddingBagCollection, dtype: torch.dtype
) -> Optional[FrozenCafeEmbeddingBagCollection]:
    """Every rank's blocks and the full physical tables, gathered to rank 0."""
    rank = dist.get_rank()
    plan = collection.plan
    state: Dict[str, Any] = collection.physical.state_dict()
    local: Dict[str, Tuple[int, ServedSlots]] = {}
    for name, remap in group_remaps(collection.groups).items():
        shard = state[f"embedding_bags.{name}.weight"].local_shards()[0]
        local[name] = (shard.metadata.shard_offsets[0], served_slots(remap))
    per_rank: List[Dict[str, Tuple[int, ServedSlots]]] = [{} for _ in range(dist.get_world_size())]
    dist.gather_object(local, per_rank if rank == 0 else None, dst=0)
    weights: Dict[str, torch.Tensor] = {}
    for config in plan.physical_configs():
        sharded = state[f"embedding_bags.{config.name}.weight"]
        full = torch.empty(tuple(sharded.size()), dtype=sharded.dtype) if rank == 0 else None
        sharded.gather(dst=0, out=full)
        if full is not None:
            weights[config.name] = full
    if rank != 0:
        return None
    blocks: Dict[str, List[FrozenBlock]] = {}
    for layout in plan.groups:
        shards = state[f"embedding_bags.{layout.name}.weight"].metadata().shards_metadata
        owners = sorted((m.placement.rank(), m.shard_sizes[0]) for m in shards if m.shard_sizes[0] > 0)
        blocks[layout.name] = []
        for owner, rows in owners:
            first_row, slots = per_rank[owner][layout.name]
            blocks[layout.name].append(FrozenBlock(first_row, layout.block(rows), slots))
    return build_frozen(collection.embedding_bag_configs(), plan, blocks, weights, collection.is_weighted(), dtype)


def block_size(num_blocks: int) -> int:
    """Keys per row-wise block: TorchRec's block bucketization over KEY_SPACE (see
    distributed/sharded.py `_row_wise_dist`), ceil(KEY_SPACE / blocks)."""
    return (KEY_SPACE + num_blocks - 1) // num_blocks


def served_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    """'fp32' | 'fp16' | 'int8' | 'int4' (or a torch dtype) -> the torch dtype freeze takes."""
    if isinstance(name, torch.dtype):
        return name
    names = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8, "int4": torch.quint4x2}
    if name not in names:
        raise ValueError(f"serving dtype {name!r} is not one of {sorted(names)}")
    return names[name]
