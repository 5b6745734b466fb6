"""CAFE <-> stock EmbeddingBagCollection.

- ``to_embedding_bag_collection``: a plain EmbeddingBagCollection whose row j of each table is
  the embedding the CAFE collection gives the table's j-th id of a given list (by default
  every id in [0, num_embeddings)): its hot row, its hashed row (plus its level-2 row when
  medium), or its plain row. Read through the collection's own eval forward, one id per bag.
- ``warm_start``: a fresh CafeEmbeddingBagCollection initialised from a stock collection's
  state_dict: a given or measured (``frequent_ids``) set of ids gets hot rows holding their
  stock rows, every hashed row starts at the mean of the stock rows of the ids that read it,
  level-2 rows at zero (a medium id then still reads that mean), plain tables as they are.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, data_type_to_dtype
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec.hashing import make_keys
from cafe_torchrec.inference.frozen import FrozenCafeEmbeddingBagCollection
from cafe_torchrec.layout import GroupLayout
from cafe_torchrec.modules import CafeEmbeddingBagCollection
from cafe_torchrec.remap import CafeGroupRemap, group_remaps

CHUNK = 1 << 16  # ids per forward or hashing pass, so memory stays bounded for large tables
SEED_ROUNDS = 4  # insert rounds a warm start gives ids that lose their sketch slot to a bucket neighbour


@torch.no_grad()
def to_embedding_bag_collection(
    collection: Union[CafeEmbeddingBagCollection, FrozenCafeEmbeddingBagCollection],
    ids: Optional[Mapping[str, torch.Tensor]] = None,
) -> EmbeddingBagCollection:
    """A stock EmbeddingBagCollection (FP32, same table names, features and pooling) whose
    table t has one row per id of ids[t] (default: every id in [0, num_embeddings)), holding
    what `collection` (a CafeEmbeddingBagCollection or its frozen form) gives that id now."""
    configs = collection.embedding_bag_configs()
    features = [f for c in configs for f in c.feature_names]
    unknown = sorted(set(ids or {}) - {c.name for c in configs})
    if unknown:
        raise ValueError(f"ids name tables {unknown} the collection does not have ({[c.name for c in configs]})")
    for name, table_ids in (ids or {}).items():
        if table_ids.dim() != 1 or table_ids.is_floating_point() or table_ids.is_complex():
            raise ValueError(
                f"ids of table {name!r} must be a 1-D integer tensor, got {table_ids.dtype} {tuple(table_ids.shape)}"
            )
    was_training = collection.training
    collection.eval()
    tables, weights = [], {}
    try:
        for config in configs:
            table_ids = (
                ids[config.name] if ids is not None and config.name in ids else torch.arange(config.num_embeddings)
            )
            weights[config.name] = _rows_of(
                collection,
                features,
                config.feature_names[0],
                table_ids.to(torch.int64),
                config.embedding_dim,
                data_type_to_dtype(config.data_type) if collection.is_weighted() else None,
            )
            tables.append(
                EmbeddingBagConfig(
                    name=config.name,
                    embedding_dim=config.embedding_dim,
                    num_embeddings=max(1, table_ids.numel()),
                    feature_names=list(config.feature_names),
                    pooling=config.pooling,
                )
            )
    finally:
        collection.train(was_training)
    ebc = EmbeddingBagCollection(tables, is_weighted=collection.is_weighted(), device=torch.device("meta"))
    for config in tables:
        ebc.embedding_bags[config.name].weight = nn.Parameter(weights[config.name])
    return ebc


def _rows_of(
    collection: nn.Module,
    features: List[str],
    feature: str,
    ids: torch.Tensor,
    dim: int,
    weights_dtype: Optional[torch.dtype],
) -> torch.Tensor:
    """The pooled output of one-id bags of `feature` (weight 1, in `weights_dtype`, the table's
    dtype as stock requires; None for an unweighted collection): each id's row, [len(ids), dim];
    one zero row for no ids (the exported table keeps one row, as its config says)."""
    if ids.numel() == 0:
        return torch.zeros(1, dim)
    rows = []
    for chunk in ids.split(CHUNK):
        n = chunk.numel()
        lengths = torch.cat(
            [torch.ones(n, dtype=torch.int64) if f == feature else torch.zeros(n, dtype=torch.int64) for f in features]
        )
        kjt = KeyedJaggedTensor(
            keys=features,
            values=chunk,
            lengths=lengths,
            stride=n,
            weights=torch.ones(n, dtype=weights_dtype) if weights_dtype is not None else None,
        )
        rows.append(collection(kjt)[feature].detach().float())
    return torch.cat(rows) if rows else torch.zeros(0, dim)


def frequent_ids(
    batches: Iterable[KeyedJaggedTensor], collection: CafeEmbeddingBagCollection
) -> Dict[str, torch.Tensor]:
    """The ids a warm start should make hot, measured on sample batches: per CAFE group, its
    hot-row capacity of the most frequent ids over its tables (ties by id), as {table: ids}.
    Only ids a stock table of the same config holds count (in [0, num_embeddings)): warm_start
    copies their stock rows; other ids (valid for CAFE, which hashes them) have none."""
    counts: Dict[str, Dict[int, int]] = {}
    configs = collection.embedding_bag_configs()
    table_of = {f: c.name for c in configs for f in c.feature_names}
    rows = {c.name: c.num_embeddings for c in configs}
    for kjt in batches:
        unknown = sorted(set(kjt.keys()) - set(table_of))
        if unknown:
            raise ValueError(f"sample batches have features {unknown} the collection does not have")
        for feature, jt in kjt.to_dict().items():
            values = jt.values().to(torch.int64)
            values = values[(values >= 0) & (values < rows[table_of[feature]])]
            ids, n = torch.unique(values, return_counts=True)
            table = counts.setdefault(table_of[feature], {})
            for i, c in zip(ids.tolist(), n.tolist()):
                table[i] = table.get(i, 0) + c
    out: Dict[str, torch.Tensor] = {}
    for layout in collection.plan.groups:
        ranked = sorted(
            ((c, -i, t.name) for t in layout.tables for i, c in counts.get(t.name, {}).items()), reverse=True
        )[: layout.hot_rows]
        for t in layout.tables:
            out[t.name] = torch.tensor([-i for _, i, name in ranked if name == t.name], dtype=torch.int64)
    return out


@torch.no_grad()
def warm_start(
    collection: CafeEmbeddingBagCollection,
    state_dict: Mapping[str, torch.Tensor],
    hot_ids: Mapping[str, torch.Tensor],
    prefix: str = "embedding_bags.",
) -> Dict[str, Dict[str, int]]:
    """Initialise a fresh, unsharded CAFE collection from a stock EmbeddingBagCollection's
    state_dict (keys `{prefix}{table}.weight`, the logical tables): hot_ids[t] (ids of table t,
    e.g. from frequent_ids) get hot rows holding their stock rows, hashed rows the mean of the
    stock rows of the ids that read them, level-2 rows zero, plain tables the stock weights.
    Returns per group the ids given, made hot and left cold (a sketch bucket holds at most
    slots_per_bucket keys). ValueError, before anything changes, when a table's weight is
    missing or misshaped or a group is given more ids than hot rows."""
    configs = {c.name: c for c in collection.embedding_bag_configs()}
    stock = {name: _stock_weight(state_dict, prefix, config) for name, config in configs.items()}
    for name, ids in hot_ids.items():
        if name not in configs:
            raise ValueError(f"warm start: hot ids for {name!r}, which is not a table of this collection")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= configs[name].num_embeddings):
            raise ValueError(
                f"warm start: hot ids of table {name!r} must lie in [0, {configs[name].num_embeddings}) "
                "(the stock rows they take)"
            )
    for layout in collection.plan.groups:
        given = sum(hot_ids[t.name].numel() for t in layout.tables if t.name in hot_ids)
        if given > layout.hot_rows:
            raise ValueError(
                f"warm start of CAFE group {layout.name!r}: {given} hot ids for {layout.hot_rows} hot rows"
            )
    report = {}
    for name, remap in group_remaps(collection.groups).items():
        report[name] = _warm_group(collection, remap, stock, hot_ids)
    for plain in collection.plan.plain:
        collection.physical.embedding_bags[plain.config.name].weight.copy_(stock[plain.config.name])
    return report


def _stock_weight(state_dict: Mapping[str, torch.Tensor], prefix: str, config: EmbeddingBagConfig) -> torch.Tensor:
    key = f"{prefix}{config.name}.weight"
    if key not in state_dict:
        raise ValueError(
            f"warm start: the state dict has no {key!r} for table {config.name!r} "
            f"(its keys start {sorted(state_dict)[:4]})"
        )
    weight = state_dict[key]
    if tuple(weight.shape) != (config.num_embeddings, config.embedding_dim):
        raise ValueError(
            f"warm start: {key!r} is {tuple(weight.shape)}, table {config.name!r} is "
            f"({config.num_embeddings}, {config.embedding_dim})"
        )
    return weight.detach().float().cpu()


def _warm_group(
    collection: CafeEmbeddingBagCollection,
    remap: CafeGroupRemap,
    stock: Dict[str, torch.Tensor],
    hot_ids: Mapping[str, torch.Tensor],
) -> Dict[str, int]:
    """Seed one group's sketch with its hot ids, then fill its physical table."""
    layout = remap.layout
    weight = collection.physical.embedding_bags[layout.name].weight
    salts = collection.feature_map.salts[layout.name]
    ids = [
        hot_ids[t.name].to(torch.int64).cpu() if t.name in hot_ids else torch.zeros(0, dtype=torch.int64)
        for t in layout.tables
    ]
    slots = torch.cat([torch.full_like(i, s) for s, i in enumerate(ids)])
    rows = _seed_hot(remap, make_keys(torch.cat(ids), slots, salts).to(weight.device)).cpu()
    hot = rows >= 0
    if bool(hot.any()):
        source = torch.cat([stock[t.name][i] for t, i in zip(layout.tables, ids)])
        weight[rows[hot].to(weight.device)] = source[hot].to(weight)
    for slot, table in enumerate(layout.tables):
        _mean_hashed_rows(remap, weight, stock[table.name], slot, salts, ids[slot][hot[slots == slot]])
    return {"given": int(rows.numel()), "hot": int(hot.sum()), "cold": int((~hot).sum())}


def _seed_hot(remap: CafeGroupRemap, keys: torch.Tensor) -> torch.Tensor:
    """Insert the keys into the group's sketch until they hold hot rows (a newcomer needs a
    second hit, a key evicted by a bucket neighbour a new round); each key's hot row, or -1."""
    if keys.numel() == 0:
        return keys
    score = torch.full(keys.shape, float(remap.sketch.threshold), device=keys.device)
    for _ in range(SEED_ROUNDS):
        rows = _hot_rows(remap, keys)
        pending = rows < 0
        if not bool(pending.any()):
            break
        remap.record(keys[pending], score[pending])
    return _hot_rows(remap, keys)


def _hot_rows(remap: CafeGroupRemap, keys: torch.Tensor) -> torch.Tensor:
    primary = remap.lookup(keys, count=False).primary
    return torch.where(primary < remap.layout.hot_rows, primary, -1)


def _mean_hashed_rows(
    remap: CafeGroupRemap, weight: torch.Tensor, stock: torch.Tensor, slot: int, salts: torch.Tensor, hot: torch.Tensor
) -> None:
    """Level-1 rows of table `slot` := the mean stock row of its non-hot ids; level-2 rows := 0."""
    layout: GroupLayout = remap.layout
    table = layout.tables[slot]
    level1, level2 = layout.region_offsets()[slot]
    sums = torch.zeros(table.level1_rows, stock.shape[1])
    counts = torch.zeros(table.level1_rows)
    hot_mask = torch.zeros(stock.shape[0], dtype=torch.bool)
    hot_mask[hot] = True
    for start in range(0, stock.shape[0], CHUNK):
        ids = torch.arange(start, min(start + CHUNK, stock.shape[0]))
        ids = ids[~hot_mask[ids]]
        keys = make_keys(ids, torch.full_like(ids, slot), salts)
        rows = remap.hashed_rows(keys.to(weight.device), 1).cpu() - level1
        sums.index_add_(0, rows, stock[ids])
        counts.index_add_(0, rows, torch.ones(ids.numel()))
    filled = counts > 0
    region = weight[level1 : level1 + table.level1_rows]
    region[filled.to(weight.device)] = (sums[filled] / counts[filled, None]).to(weight)
    if table.level2_rows:
        weight[level2 : level2 + table.level2_rows] = 0
