"""Baselines of the quality benchmark, each an EmbeddingBagCollection-shaped module.

All share CafeEmbeddingBagCollection's constructor shape
``Cls(tables, compression_ratio, is_weighted=False, device=None, **method_specific)``, return a
KeyedTensor keyed by feature name in config order, keep their physical tables in an inner stock
EmbeddingBagCollection (``.physical``), and report ``memory()`` the way the CAFE paper counts it.
"""

from cafe_torchrec.baselines.adaembed import AdaEmbedEmbeddingBagCollection, ada_hot_rows
from cafe_torchrec.baselines.base import BaselineCollection
from cafe_torchrec.baselines.hashing import HashingEmbeddingBagCollection
from cafe_torchrec.baselines.managed_collision import ManagedCollisionEmbeddingBags
from cafe_torchrec.baselines.qr import QREmbeddingBagCollection, paper_collisions

BASELINES = {
    "hash": HashingEmbeddingBagCollection,
    "qr": QREmbeddingBagCollection,
    "adaembed": AdaEmbedEmbeddingBagCollection,
    "managed_collision": ManagedCollisionEmbeddingBags,
}

__all__ = [
    "AdaEmbedEmbeddingBagCollection",
    "BASELINES",
    "BaselineCollection",
    "HashingEmbeddingBagCollection",
    "ManagedCollisionEmbeddingBags",
    "QREmbeddingBagCollection",
    "ada_hot_rows",
    "paper_collisions",
]
