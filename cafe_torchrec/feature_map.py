"""Feature bookkeeping shared by the unsharded and sharded collections.

Input ids are prepared on the sender before any all-to-all: ids of a CAFE group's features
become keys (pre-hashed with their table's salt, so they spread evenly over row-wise ranks);
ids of plain tables become id mod rows. The owner then remaps keys to rows (remap.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec.hashing import SLOT_BITS, make_keys, table_salts
from cafe_torchrec.kjt import concat, table_segments
from cafe_torchrec.layout import CafePlan
from cafe_torchrec.ops import resolve_kernel
from cafe_torchrec.output import PooledOutput


@dataclass(frozen=True)
class FeatureInfo:
    """Where one feature goes: its physical table and, in a CAFE group, its table slot."""

    table: str  # physical table name
    group: Optional[str]  # CAFE group name (= physical table) or None for a plain table
    slot: int  # table slot inside the group
    plain_rows: int  # rows of a plain table (0 for group features)
    dim: int


class FeatureMap(nn.Module):
    """Logical features (config order) vs the inner collection's features, and the way back.

    A module without state, so a torch.fx graph can hand it to the collections' wrapped
    lookup call (fx refers to modules by their path)."""

    def __init__(self, tables: List[EmbeddingBagConfig], plan: CafePlan, kernel: str = "auto") -> None:
        super().__init__()
        self.kernel = kernel  # the collection's kernel choice (ops.resolve_kernel), for the pre-hash
        self.logical = [f for t in tables for f in t.feature_names]
        self.info: Dict[str, FeatureInfo] = {}
        for g in plan.groups:
            for slot, t in enumerate(g.tables):
                for f in t.features:
                    self.info[f] = FeatureInfo(g.name, g.name, slot, 0, g.dim)
        for p in plan.plain:
            for f in p.config.feature_names:
                self.info[f] = FeatureInfo(p.config.name, None, 0, p.config.num_embeddings, p.config.embedding_dim)
        self.table_of = {f: i.table for f, i in self.info.items()}  # feature -> physical table
        self.inner = [f for c in plan.physical_configs() for f in c.feature_names]
        self.salts = {g.name: table_salts(len(g.tables), g.config.seed) for g in plan.groups}
        self.output = PooledOutput(tables, self.inner, mean_by_sum=True)  # physical tables pool with SUM

    def prepare(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Inner feature order; group ids -> keys, plain ids -> id mod rows (same lengths)."""
        if features.keys() != self.inner:
            features = features.permute([features.keys().index(f) for f in self.inner])
        pieces = []
        for seg in table_segments(features, self.table_of):
            first = self.info[seg.features[0]]
            if first.group is None:
                pieces.append(torch.remainder(seg.values, first.plain_rows))
            else:
                pieces.append(self._keys(seg.table, seg.features, seg.values, seg.counts))
        prepared = concat(pieces, features.values())
        return KeyedJaggedTensor(
            keys=self.inner,
            values=prepared,
            lengths=features.lengths(),
            weights=features.weights_or_none(),
            stride=features.stride(),
        )

    def _keys(self, table: str, names: List[str], ids: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """Keys of a run of one group's features (C++ on CPU, torch ops elsewhere)."""
        slots = torch.tensor([self.info[f].slot for f in names], dtype=torch.int64)
        salts = self.salts[table][slots]
        if resolve_kernel(self.kernel, ids.device) == "cpp":  # int32 or int64 ids in, int64 keys out: no copy
            return torch.ops.cafe.make_keys(ids, torch.tensor(counts, dtype=torch.int64), salts, slots, SLOT_BITS)
        per_value = slots.to(ids.device).repeat_interleave(torch.tensor(counts, device=ids.device))
        return make_keys(ids.to(torch.int64), per_value, self.salts[table].to(ids.device))
