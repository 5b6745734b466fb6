"""Embedding collections of the DLRM example: method name -> an EmbeddingBagCollection-shaped module.

`build_embedding(method, cardinalities, ...)` builds one table per categorical feature
(`t_cat_i` over feature `cat_i`, TorchRec's DEFAULT_CAT_NAMES) with the *logical*
cardinalities and wraps them in the chosen method:

- ``cafe`` / ``cafe-ml``: CafeEmbeddingBagCollection (single / multi-level CAFE);
- ``full``: TorchRec's stock EmbeddingBagCollection, uncompressed (ids must lie in
  [0, cardinality): see `needs_id_modulo`);
- ``hash``, ``qr``, ``ada``, ``mc-lfu``, ``mc-dlfu``: the baselines of
  `cafe_torchrec.baselines`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

METHODS = ("cafe", "cafe-ml", "full", "hash", "qr", "ada", "mc-lfu", "mc-dlfu")
CAFE_METHODS = ("cafe", "cafe-ml")

# method -> (class name in cafe_torchrec.baselines, fixed keyword arguments)
_BASELINES: Dict[str, tuple] = {
    "hash": ("HashingEmbeddingBagCollection", {}),
    "qr": ("QREmbeddingBagCollection", {}),
    "ada": ("AdaEmbedEmbeddingBagCollection", {}),
    "mc-lfu": ("ManagedCollisionEmbeddingBags", {"eviction": "lfu"}),
    "mc-dlfu": ("ManagedCollisionEmbeddingBags", {"eviction": "distance_lfu"}),
}


def table_configs(
    cardinalities: Sequence[int], embedding_dim: int = 16, feature_names: Optional[Sequence[str]] = None
) -> List[EmbeddingBagConfig]:
    """One table `t_<feature>` per feature with the given logical cardinality."""
    names = list(feature_names) if feature_names is not None else list(DEFAULT_CAT_NAMES[: len(cardinalities)])
    if len(names) != len(cardinalities):
        raise ValueError(f"{len(cardinalities)} cardinalities for {len(names)} features")
    if embedding_dim <= 0 or embedding_dim % 4:
        raise ValueError(f"embedding_dim must be a positive multiple of 4 (FBGEMM TBE), got {embedding_dim}")
    return [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=embedding_dim, num_embeddings=max(1, int(n)), feature_names=[f])
        for f, n in zip(names, cardinalities)
    ]


def available_methods() -> List[str]:
    """Every method (all import with the library; examples/demo.py asks for its defaults)."""
    return list(METHODS)


@dataclass
class EmbeddingSpec:
    """What the training script needs to know about a built collection."""

    method: str
    module: nn.Module
    tables: List[EmbeddingBagConfig]
    compression_ratio: float  # requested (1 for full)
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_cafe(self) -> bool:
        return self.method in CAFE_METHODS

    @property
    def needs_id_modulo(self) -> bool:
        """Stock tables index rows by id: ids must be taken modulo the cardinality first."""
        return self.method == "full"

    def physical_tables(self) -> Dict[str, int]:
        """Planner-visible table name -> rows."""
        return physical_tables(self.module)

    def memory(self) -> Dict[str, float]:
        return memory_of(self.module)

    def describe(self) -> str:
        if hasattr(self.module, "describe"):
            return self.module.describe()
        m = self.memory()
        return (
            f"{len(self.tables)} uncompressed tables, {sum(t.num_embeddings for t in self.tables):,} rows, "
            f"{m['logical_bytes']:,} bytes"
        )


def cafe_config(method: str, compression_ratio: float, seed: int, options: Dict[str, Any]) -> Any:
    """The CafeConfig of a CAFE method: its flags' fields, then any --cafe-option ones (not
    validated here: the collection, or the argument parser, does it)."""
    from cafe_torchrec import CafeConfig

    return CafeConfig(compression_ratio=compression_ratio, multi_level=method == "cafe-ml", seed=seed, **options)


def build_embedding(
    method: str,
    cardinalities: Sequence[int],
    *,
    embedding_dim: int = 16,
    compression_ratio: float = 100.0,
    device: Optional[torch.device] = None,
    feature_names: Optional[Sequence[str]] = None,
    seed: int = 0,
    cafe_options: Optional[Dict[str, Any]] = None,
    baseline_options: Optional[Dict[str, Any]] = None,
) -> EmbeddingSpec:
    """Build the collection of `method` over one table per feature.

    cafe_options: extra CafeConfig fields (threshold, hot_share, decay, importance, ...);
    baseline_options: extra keyword arguments of the baseline's constructor.
    """
    if method not in METHODS:
        raise ValueError(f"unknown embedding method {method!r}; choose one of {', '.join(METHODS)}")
    tables = table_configs(cardinalities, embedding_dim, feature_names)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if method == "full":
        return EmbeddingSpec(method, EmbeddingBagCollection(tables=tables, device=device), tables, 1.0)
    if method in CAFE_METHODS:
        from cafe_torchrec import CafeEmbeddingBagCollection

        options = dict(cafe_options or {})
        config = cafe_config(method, compression_ratio, seed, options)
        module = CafeEmbeddingBagCollection(tables, cafe=config, device=device)
        return EmbeddingSpec(method, module, tables, compression_ratio, options)
    from cafe_torchrec import baselines

    class_name, fixed = _BASELINES[method]
    options = {**fixed, **(baseline_options or {})}
    cls = getattr(baselines, class_name)
    module = cls(tables, compression_ratio, is_weighted=False, device=device, **options)
    return EmbeddingSpec(method, module, tables, compression_ratio, options)


def physical_tables(module: nn.Module) -> Dict[str, int]:
    """Name -> rows of the tables of the stock collection(s) TorchRec shards for this module."""
    plan = getattr(module, "plan", None)
    if plan is not None and hasattr(plan, "physical_configs"):  # CAFE: one table per group + plain tables
        configs = plan.physical_configs()
    else:
        physical = getattr(module, "physical", None)
        if physical is not None and hasattr(physical, "embedding_bag_configs"):
            configs = physical.embedding_bag_configs()
        else:
            configs = module.embedding_bag_configs()
    return {c.name: c.num_embeddings for c in configs}


def memory_of(module: nn.Module) -> Dict[str, float]:
    """logical_bytes, physical_bytes (weights + sketch / side structures) and compression_ratio."""
    if hasattr(module, "memory"):
        m = dict(module.memory())
    else:  # stock EBC: uncompressed
        logical = sum(t.num_embeddings * t.embedding_dim * 4 for t in module.embedding_bag_configs())
        m = {"logical_bytes": logical, "weight_bytes": logical, "compression_ratio": 1.0}
    m["physical_bytes"] = m.get("weight_bytes", 0) + m.get("sketch_bytes", 0) + m.get("extra_bytes", 0)
    return m
