"""Feature bookkeeping shared by the unsharded and sharded collections.

Input ids are prepared on the sender before any all-to-all: ids of a CAFE group's features
become keys (pre-hashed with their table's salt, so they spread evenly over row-wise ranks);
ids of plain tables become id mod rows. The owner then remaps keys to rows (remap.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from cafe_torchrec.hashing import SLOT_BITS, make_keys, table_salts
from cafe_torchrec.kjt import concat, feature_segments
from cafe_torchrec.layout import CafePlan
from cafe_torchrec.ops import resolve_kernel


@dataclass(frozen=True)
class FeatureInfo:
    """Where one feature goes: its physical table and, in a CAFE group, its table slot."""

    table: str  # physical table name
    group: Optional[str]  # CAFE group name (= physical table) or None for a plain table
    slot: int  # table slot inside the group
    plain_rows: int  # rows of a plain table (0 for group features)
    dim: int


class FeatureMap:
    """Logical features (config order) vs the inner collection's features, and the way back."""

    def __init__(self, tables: List[EmbeddingBagConfig], plan: CafePlan, kernel: str = "auto") -> None:
        self.kernel = kernel  # the collection's kernel choice (ops.resolve_kernel), for the pre-hash
        self.logical = [f for t in tables for f in t.feature_names]
        self.dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        self._starts = [sum(self.dims[:i]) for i in range(len(self.dims))]  # output column of each feature
        self.info: Dict[str, FeatureInfo] = {}
        for g in plan.groups:
            for slot, t in enumerate(g.tables):
                for f in t.features:
                    self.info[f] = FeatureInfo(g.name, g.name, slot, 0, g.dim)
        for p in plan.plain:
            for f in p.config.feature_names:
                self.info[f] = FeatureInfo(p.config.name, None, 0, p.config.num_embeddings, p.config.embedding_dim)
        self.inner = [f for c in plan.physical_configs() for f in c.feature_names]
        self.salts = {g.name: table_salts(len(g.tables), g.config.seed) for g in plan.groups}
        starts, col = {}, 0
        for f in self.inner:
            starts[f] = col
            col += self.info[f].dim
        columns = [i for f in self.logical for i in range(starts[f], starts[f] + self.info[f].dim)]
        self.output_columns = None if columns == list(range(col)) else torch.tensor(columns)
        self.mean_features = [i for i, (t, _) in enumerate((t, f) for t in tables for f in t.feature_names)
                              if t.pooling == PoolingType.MEAN]

    def prepare(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Inner feature order; group ids -> keys, plain ids -> id mod rows (same lengths)."""
        if features.keys() != self.inner:
            features = features.permute([features.keys().index(f) for f in self.inner])
        values = features.values()
        length_per_key = features.length_per_key()
        pieces, start, feature = [], 0, 0
        for table, names in feature_segments(self.inner, self.info):
            counts = length_per_key[feature : feature + len(names)]
            ids = values[start : start + sum(counts)]
            first = self.info[names[0]]
            if first.group is None:
                pieces.append(torch.remainder(ids, first.plain_rows))
            else:
                pieces.append(self._keys(table, names, ids, counts))
            start += sum(counts)
            feature += len(names)
        prepared = concat(pieces, values)
        return KeyedJaggedTensor(keys=self.inner, values=prepared, lengths=features.lengths(),
                                 weights=features.weights_or_none(), stride=features.stride())

    def _keys(self, table: str, names: List[str], ids: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """Keys of a run of one group's features (C++ on CPU, torch ops elsewhere)."""
        slots = torch.tensor([self.info[f].slot for f in names], dtype=torch.int64)
        salts = self.salts[table][slots]
        if resolve_kernel(self.kernel, ids.device) == "cpp":  # int32 or int64 ids in, int64 keys out: no copy
            return torch.ops.cafe.make_keys(ids, torch.tensor(counts, dtype=torch.int64), salts, slots, SLOT_BITS)
        per_value = slots.to(ids.device).repeat_interleave(torch.tensor(counts, device=ids.device))
        return make_keys(ids.to(torch.int64), per_value, self.salts[table].to(ids.device))

    def to_output(self, values: torch.Tensor, lengths: Optional[torch.Tensor]) -> KeyedTensor:
        """Inner pooled values [B, D_inner] -> KeyedTensor in config order; MEAN features are
        divided by their original bag lengths (`lengths` [F, B] in logical feature order)."""
        if self.output_columns is not None:
            values = values.index_select(1, self.output_columns.to(values.device))
        if self.mean_features:
            scale = torch.ones_like(values)
            for i in self.mean_features:
                bag = lengths[i].clamp(min=1).to(values.dtype)
                scale[:, self._starts[i] : self._starts[i] + self.dims[i]] = (1.0 / bag)[:, None]
            values = values * scale
        return KeyedTensor(keys=self.logical, length_per_key=self.dims, values=values)

    def logical_lengths(self, features: KeyedJaggedTensor) -> Optional[torch.Tensor]:
        """Bag lengths [F, B] in logical order, kept only when some feature pools by MEAN."""
        if not self.mean_features:
            return None
        by_key = features.lengths().view(-1, features.stride())
        order = features.keys()
        return torch.stack([by_key[order.index(f)] for f in self.logical])
