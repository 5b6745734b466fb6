"""Sharding for CafeEmbeddingBagCollection (TorchRec's distributed/ counterpart)."""

from cafe_torchrec.distributed.sharded import ShardedCafeEmbeddingBagCollection
from cafe_torchrec.distributed.sharder import CafeEmbeddingBagCollectionSharder

__all__ = ["CafeEmbeddingBagCollectionSharder", "ShardedCafeEmbeddingBagCollection"]
