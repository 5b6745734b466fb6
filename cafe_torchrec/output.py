"""A collection's pooled output from its inner collection's: columns in the collection's order
(config order unsharded, the sharded lookup's own order sharded, as stock TorchRec's) and MEAN
features divided by their original bag lengths, as the KeyedTensor TorchRec expects.

CAFE and AdaEmbed pool every physical table with SUM (their remap changes bag lengths: a
medium id adds a row, an id without a row is dropped) and group features of several logical
tables in one physical table, so their inner output is in another column order and MEAN
features still need their division. The other baselines keep stock tables in config order."""

from __future__ import annotations

import itertools
from typing import List, Optional, Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


class PooledOutput:
    """Maps inner pooled values [B, sum(dims)] to the collection's KeyedTensor.

    tables: the logical tables; inner: the inner collection's features in its output column
    order; mean_by_sum: whether the inner tables pool the logical MEAN features with SUM, so
    their columns are divided here by the original bag lengths; order: the output's feature
    order, config order unless given. The sharded collection gives its lookup's own order, as a
    stock ShardedEmbeddingBagCollection's KeyedTensor keeps it (by sharding type, then rank),
    so no column moves there; the unsharded collections return config order, as stock's does.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        inner: Sequence[str],
        mean_by_sum: bool,
        order: Optional[Sequence[str]] = None,
    ) -> None:
        config = [f for t in tables for f in t.feature_names]
        dim_of = {f: t.embedding_dim for t in tables for f in t.feature_names}
        self.features: List[str] = list(order) if order is not None else config
        if sorted(self.features) != sorted(config) or sorted(inner) != sorted(config):
            raise ValueError(f"output order {self.features} or inner order {list(inner)} is not the features {config}")
        self.dims: List[int] = [dim_of[f] for f in self.features]
        # FBGEMM's pooled-embedding permute (forward and backward each one copy of feature blocks,
        # where index_select over columns and its scatter-add backward cost 2-3x as much):
        # offsets of the inner features' columns, each output feature's inner position, and both inverted
        inner_dims = [dim_of[f] for f in inner]
        permute = [list(inner).index(f) for f in self.features]
        self.permute: Optional[List[torch.Tensor]] = None
        if permute != list(range(len(permute))):
            inverse = [permute.index(i) for i in range(len(permute))]
            self.permute = [
                torch.tensor([0, *itertools.accumulate(inner_dims)], dtype=torch.int64),
                torch.tensor(permute, dtype=torch.int64),
                torch.tensor([0, *itertools.accumulate(self.dims)], dtype=torch.int64),
                torch.tensor(inverse, dtype=torch.int64),
            ]
        # bag lengths come in config order whatever the output order (the sharded collection
        # takes them before its lookup has ordered the columns)
        self._config_features = config
        divided = {f for t in tables for f in t.feature_names if mean_by_sum and t.pooling == PoolingType.MEAN}
        self.divides = bool(divided)
        # per output column its feature's config index, and per config feature whether it is
        # divided (mean_divided's arguments)
        self.column_features = torch.tensor(
            [config.index(f) for f, d in zip(self.features, self.dims) for _ in range(d)], dtype=torch.int64
        )
        self.mean_mask = torch.tensor([f in divided for f in config], dtype=torch.bool)

    def bag_lengths(self, features: KeyedJaggedTensor) -> Optional[torch.Tensor]:
        """Bag lengths [F, B] in config order of a (fixed-stride) input KJT, kept only when some
        feature is divided; taken before any remap changes them."""
        if not self.divides:
            return None
        # one row per feature (a checked input holds exactly the config's); stride 0: a rank without samples
        by_key = features.lengths().view(len(self._config_features), features.stride())
        order = features.keys()
        return torch.stack([by_key[order.index(f)] for f in self._config_features])

    def __call__(self, values: torch.Tensor, lengths: Optional[torch.Tensor]) -> KeyedTensor:
        """Inner pooled values -> KeyedTensor keyed by feature in the output order; `lengths`
        is bag_lengths() of the input."""
        if self.permute is not None:
            offsets, permute, inverse_offsets, inverse = (t.to(values.device) for t in self.permute)
            values = torch.ops.fbgemm.permute_pooled_embs_auto_grad(values, offsets, permute, inverse_offsets, inverse)
        if self.divides:
            assert lengths is not None, "MEAN features need the input's bag_lengths()"
            values = mean_divided(
                values, lengths, self.column_features.to(values.device), self.mean_mask.to(values.device)
            )
        return KeyedTensor(keys=self.features, length_per_key=self.dims, values=values)


def mean_divided(
    values: torch.Tensor, lengths: torch.Tensor, column_features: torch.Tensor, mean_mask: torch.Tensor
) -> torch.Tensor:
    """Pooled values [B, C] with the columns of MEAN features divided by their bag lengths
    [F, B] (empty bags by 1); column_features [C] names each column's feature (its row of
    lengths) and mean_mask [F] the MEAN ones. TorchScript compiles it (frozen collections call it)."""
    bags = lengths.clamp(min=1).to(values.dtype)
    scale = torch.where(mean_mask[:, None], 1.0 / bags, torch.ones_like(bags))
    return values * scale.index_select(0, column_features).t()
