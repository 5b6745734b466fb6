"""What the baseline collections share: checks, output building, memory.

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
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from cafe_torchrec._torchrec_compat import sharded_embedding_bag_configs
from cafe_torchrec.collection import ConfiguredCollection
from cafe_torchrec.layout import BYTES_PER_VALUE
from cafe_torchrec.output import PooledOutput
from cafe_torchrec.validation import checked_input


def bytes_per_value(config: EmbeddingBagConfig) -> int:
    return BYTES_PER_VALUE[config.data_type]


def check_ratio(compression_ratio: float, method: str) -> None:
    """A finite compression ratio >= 1, or ValueError naming the method."""
    is_number = isinstance(compression_ratio, (int, float))
    if not (is_number and compression_ratio >= 1 and math.isfinite(compression_ratio)):
        raise ValueError(f"{method}: compression_ratio must be a finite number >= 1, got {compression_ratio!r}")


def check_unique(names: Sequence[str], what: str) -> None:
    """Generated inner table / feature names must not collide with user names."""
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(
                f"inner {what} name {n!r} is generated twice (it collides with a user {what} name); "
                "rename the table or feature"
            )
        seen.add(n)


class BaselineCollection(ConfiguredCollection):
    """Shared base: configs, feature order, input checks, KeyedTensor output, memory().

    Subclasses set `self.physical` (a stock EmbeddingBagCollection, or expose it as a
    property), implement `_forward(features)` (features already checked and permuted to
    config order) and `extra_bytes()`, and may override `weight_bytes()`.
    """

    method = "baseline"

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        compression_ratio: float,
        is_weighted: bool,
        device: Optional[torch.device],
    ) -> None:
        check_ratio(compression_ratio, type(self).__name__)
        super().__init__(tables, is_weighted, device)
        self.compression_ratio = float(compression_ratio)
        self._feature_names = [f for t in self._tables for f in t.feature_names]
        self._feature_table = [i for i, t in enumerate(self._tables) for _ in t.feature_names]
        # stock inner tables in config order by default; AdaEmbed replaces it with its own
        self.pooled_output = PooledOutput(self._tables, self._feature_names, mean_by_sum=False)

    # ---- forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        features = checked_input(features, self._feature_names, self._is_weighted)
        if features.keys() != self._feature_names:
            features = features.permute([features.keys().index(f) for f in self._feature_names])
        return self._forward(features)

    def _forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        raise NotImplementedError

    @staticmethod
    def in_order(pooled: KeyedTensor, order: List[str]) -> torch.Tensor:
        """The inner collection's pooled values with its columns in `order` (its config order):
        sharded by DistributedModelParallel it answers in TorchRec's column order (by sharding
        type, then by rank); one copy then, none unsharded."""
        if pooled.keys() == order:
            return pooled.values()
        by_key = pooled.to_dict()
        return torch.cat([by_key[f] for f in order], dim=1)

    def output(self, values: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> KeyedTensor:
        """The inner pooled values as the collection's KeyedTensor (`lengths`:
        pooled_output.bag_lengths() of the input where MEAN features are divided)."""
        return self.pooled_output(values, lengths)

    def per_feature(self, features: KeyedJaggedTensor, per_feature: torch.Tensor) -> torch.Tensor:
        """Expand one value per feature (config order) to one value per id of `features`."""
        counts = features.lengths().view(len(self._feature_names), features.stride()).sum(1)
        return torch.repeat_interleave(per_feature.to(counts.device), counts, output_size=features.values().numel())

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
        return {
            "logical_bytes": logical,
            "weight_bytes": weights,
            "extra_bytes": extra,
            "compression_ratio": logical / (weights + extra),
        }

    def describe_tables(self) -> List[str]:
        raise NotImplementedError

    def describe(self) -> str:
        """One line per table, then the memory summary."""
        m = self.memory()
        return "\n".join(
            self.describe_tables()
            + [
                f"compression ratio {m['compression_ratio']:.1f}x (requested {self.compression_ratio:g}x; "
                f"{m['logical_bytes']:,} -> {m['weight_bytes']:,} weight + {m['extra_bytes']:,} extra bytes)"
            ]
        )
