"""What the baseline collections share: checks, the small-table rule, output building, memory.

Every baseline is an `EmbeddingBagCollectionInterface` with the constructor shape of
`CafeEmbeddingBagCollection` (tables, compression_ratio, is_weighted, device, **method
specific) whose physical tables live in an inner stock `EmbeddingBagCollection` (`physical`).
Memory is counted as the CAFE paper counts it (§5.1.4): embedding weights plus any side
structure the method keeps per id or per row, never the optimizer state; logical bytes are
rows x dim x 4 (FP32), as in `CafeEmbeddingBagCollection.memory()`.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from cafe_torchrec._torchrec_compat import sharded_embedding_bag_configs
from cafe_torchrec.collection import ConfiguredCollection
from cafe_torchrec.layout import BYTES_PER_VALUE
from cafe_torchrec.validation import checked_input


# The paper's code (init_embed.py: compress_threshold = 2000 * compress_rate) leaves a field
# uncompressed when it has at most 2000 / ratio rows; CafeEmbeddingBagCollection does the same.
SMALL_TABLE_ROWS = 2000.0


def keeps_plain(rows: int, ratio: float, small_table_rows: float) -> bool:
    """Whether a table stays uncompressed (stock rows, row = id mod rows): the paper's rule."""
    return ratio <= 1 or rows <= small_table_rows / ratio


def bytes_per_value(config: EmbeddingBagConfig) -> int:
    return BYTES_PER_VALUE[config.data_type]


def check_ratio(compression_ratio: float, method: str) -> None:
    """A finite compression ratio >= 1, or ValueError naming the method."""
    if not (isinstance(compression_ratio, (int, float)) and compression_ratio >= 1 and math.isfinite(compression_ratio)):
        raise ValueError(f"{method}: compression_ratio must be a finite number >= 1, got {compression_ratio!r}")


def check_unique(names: Sequence[str], what: str) -> None:
    """Generated inner table / feature names must not collide with user names."""
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"inner {what} name {n!r} is generated twice (it collides with a user {what} name); "
                             "rename the table or feature")
        seen.add(n)


class BaselineCollection(ConfiguredCollection):
    """Shared base: configs, feature order, input checks, KeyedTensor output, memory().

    Subclasses set `self.physical` (a stock EmbeddingBagCollection, or expose it as a
    property), implement `_forward(features)` (features already checked and permuted to
    config order) and `extra_bytes()`, and may override `weight_bytes()`.
    """

    method = "baseline"

    def __init__(self, tables: List[EmbeddingBagConfig], compression_ratio: float, is_weighted: bool,
                 device: Optional[torch.device]) -> None:
        check_ratio(compression_ratio, type(self).__name__)
        super().__init__(tables, is_weighted, device)
        self.compression_ratio = float(compression_ratio)
        self._feature_names = [f for t in self._tables for f in t.feature_names]
        self._dims = [t.embedding_dim for t in self._tables for _ in t.feature_names]
        self._feature_table = [i for i, t in enumerate(self._tables) for _ in t.feature_names]

    # ---- forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        features = checked_input(features, self._feature_names, self._is_weighted)
        if features.keys() != self._feature_names:
            features = features.permute([features.keys().index(f) for f in self._feature_names])
        return self._forward(features)

    def _forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        raise NotImplementedError

    def output(self, values: torch.Tensor) -> KeyedTensor:
        """The pooled values [B, sum(dims)] (config order) as the collection's KeyedTensor."""
        return KeyedTensor(keys=self._feature_names, length_per_key=self._dims, values=values)

    def per_feature(self, features: KeyedJaggedTensor, per_feature: torch.Tensor) -> torch.Tensor:
        """Expand one value per feature (config order) to one value per id of `features`."""
        counts = features.lengths().view(len(self._feature_names), features.stride()).sum(1)
        return torch.repeat_interleave(per_feature.to(counts.device), counts, output_size=features.values().numel())

    def divide_mean(self, values: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        """MEAN features pooled with SUM (config-order columns): divide by the original bag lengths."""
        lengths = features.lengths().view(-1, features.stride())
        keys = features.keys()
        scale = torch.ones(values.shape[0], len(self._feature_names), dtype=values.dtype, device=values.device)
        for i, t in enumerate(self._feature_table):
            if self._tables[t].pooling == PoolingType.MEAN:
                scale[:, i] = 1.0 / lengths[keys.index(self._feature_names[i])].clamp(min=1).to(values.dtype)
        dims = torch.tensor(self._dims, device=values.device)
        return values * torch.repeat_interleave(scale, dims, dim=1, output_size=values.shape[1])

    # ---- memory, as the paper counts it
    def physical_configs(self) -> List[EmbeddingBagConfig]:
        """The inner collection's tables, also after DistributedModelParallel sharded it."""
        physical = self.physical
        if hasattr(physical, "embedding_bag_configs"):
            return physical.embedding_bag_configs()
        return sharded_embedding_bag_configs(physical)

    def weight_bytes(self) -> int:
        return sum(c.num_embeddings * c.embedding_dim * bytes_per_value(c) for c in self.physical_configs())

    def extra_bytes(self) -> int:
        return 0

    def memory(self) -> Dict[str, float]:
        """logical_bytes (rows x dim x 4), weight_bytes, extra_bytes (side structures) and
        compression_ratio = logical / (weights + extra). Optimizer state is not counted."""
        logical = sum(t.num_embeddings * t.embedding_dim * 4 for t in self._tables)
        weights, extra = self.weight_bytes(), self.extra_bytes()
        return {"logical_bytes": logical, "weight_bytes": weights, "extra_bytes": extra,
                "compression_ratio": logical / (weights + extra)}

    def describe_tables(self) -> List[str]:
        raise NotImplementedError

    def describe(self) -> str:
        """One line per table, then the memory summary."""
        m = self.memory()
        return "\n".join(self.describe_tables() + [
            f"compression ratio {m['compression_ratio']:.1f}x (requested {self.compression_ratio:g}x; "
            f"{m['logical_bytes']:,} -> {m['weight_bytes']:,} weight + {m['extra_bytes']:,} extra bytes)"])
