"""Feature bookkeeping shared by the unsharded and sharded collections.

Input ids are prepared on the sender before any all-to-all: ids of a CAFE group's features
become keys (pre-hashed with their table's salt, so they spread evenly over row-wise ranks);
ids of plain tables become id mod rows. The owner then remaps keys to rows (remap.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

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
        # the C++ prepare's per inner feature salt and table slot (a group's) or modulus (a plain table's)
        inner_info = [self.info[f] for f in self.inner]
        self._prepare_args = (
            torch.tensor([int(self.salts[i.group][i.slot]) if i.group is not None else 0 for i in inner_info]),
            torch.tensor([i.slot if i.group is not None else 0 for i in inner_info], dtype=torch.int64),
            torch.tensor([i.plain_rows for i in inner_info], dtype=torch.int64),
        )
        self._orders: Dict[Tuple[str, ...], Optional[List[int]]] = {}  # input key order -> inner order (None: same)

    def prepare(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Inner feature order; group ids -> keys, plain ids -> id mod rows (same lengths). On
        CPU one C++ pass (reorder, pre-hash, id mod rows); elsewhere torch ops, segment by segment."""
        order = self._inner_order(features.keys())
        if resolve_kernel(self.kernel, features.values().device) != "cpp":
            return self._prepare_torch(features if order is None else features.permute(order))
        if order is not None and features.weights_or_none() is not None:
            features, order = features.permute(order), None  # the weights move with their ids
        lengths = features.lengths()
        index = torch.arange(len(self.inner)) if order is None else torch.tensor(order)
        if order is not None:
            lengths = lengths.view(len(self.inner), -1).index_select(0, index.to(lengths.device)).view(-1)
        values = torch.ops.cafe.prepare_ids(
            features.values(),
            torch.tensor(features.length_per_key(), dtype=torch.int64),
            index,
            *self._prepare_args,
            SLOT_BITS,
        )
        return self._inner_kjt(values, lengths, features)

    def _inner_order(self, keys: List[str]) -> Optional[List[int]]:
        """Each inner feature's position in an input of these keys; None when they are the same."""
        if tuple(keys) not in self._orders:
            order = [keys.index(f) for f in self.inner]
            self._orders[tuple(keys)] = None if order == list(range(len(keys))) else order
        return self._orders[tuple(keys)]

    def _prepare_torch(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """prepare() of an input already in inner order, with torch ops (the C++ pass's twin)."""
        pieces = []
        for seg in table_segments(features, self.table_of):
            first = self.info[seg.features[0]]
            if first.group is None:
                pieces.append(torch.remainder(seg.values, first.plain_rows))
            else:
                slots = torch.tensor(
                    [self.info[f].slot for f in seg.features], dtype=torch.int64, device=seg.values.device
                )
                per_value = slots.repeat_interleave(torch.tensor(seg.counts, device=seg.values.device))
                pieces.append(
                    make_keys(seg.values.to(torch.int64), per_value, self.salts[seg.table].to(seg.values.device))
                )
        return self._inner_kjt(concat(pieces, features.values()), features.lengths(), features)

    def _inner_kjt(self, values: torch.Tensor, lengths: torch.Tensor, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return KeyedJaggedTensor(
            keys=self.inner,
            values=values,
            lengths=lengths,
            weights=features.weights_or_none(),
            stride=features.stride(),
        )
