"""TorchRec's own managed collision (sorted ZCH, MCH) as a baseline, with an EBC-shaped interface."""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from cafe_torchrec._torchrec_compat import (
    managed_collision_embedding_module,
    managed_collision_modules,
    managed_collision_tbes,
)
from cafe_torchrec.baselines.base import BaselineCollection
from cafe_torchrec.hashing import mix64
from cafe_torchrec.layout import SMALL_TABLE_ROWS, keeps_plain

PREHASH_RANGE = 2**62
EVICTIONS = ("lfu", "distance_lfu")


def prehash(values: torch.Tensor, size: int) -> torch.Tensor:
    """MCH `input_hash_func`: raw int64 ids (any sign) -> [0, size) with the splitmix64 mix."""
    return torch.remainder(mix64(values, 0), size)


class ManagedCollisionEmbeddingBags(BaselineCollection):
    """TorchRec managed collision (MCH: sorted zero-collision hashing) with the baselines' interface.

    Built from TorchRec's own `ManagedCollisionEmbeddingBagCollection`,
    `ManagedCollisionCollection` and `MCHManagedCollisionModule`, used as shipped. Table t gets
    zch_t = max(2, floor(n_t / ratio)) rows (tables with at most `small_table_rows / ratio`
    rows get n_t + 1, room for every id): zch_t - 1 rows for ids admitted by the eviction
    policy and one shared row (the last) that every other id reads and trains. Admission
    happens only every `eviction_interval` training forwards, from the ids seen since
    ("lfu": `LFU_EvictionPolicy`, counts never decay; "distance_lfu":
    `DistanceLFU_EvictionPolicy(decay_exponent)`). Until the first eviction every id reads
    the shared row. Evicted rows are not reset unsharded (TorchRec's unsharded `evict` is a
    no-op): an admitted id inherits the previous owner's row.

    Ids: with `input_hash_size=None` (default) raw ids (any int64) are pre-hashed into
    [0, 2**62) with cafe_torchrec.hashing.mix64 (MCH's `input_hash_func`), so raw Criteo ids
    work and row-wise bucketing by id range would be balanced; pass the real id range to use
    ids in [0, input_hash_size) as they are.

    Memory: weights are zch rows x d (the same rows as hashing, nothing taken out of the
    budget for metadata); extra_bytes counts MCH's persistent per-row buffers (sorted raw ids,
    remapped-id mapping, counts, and last-access iteration for distance_lfu: 24 or 32 bytes
    per row), so `compression_ratio` in memory() is below the requested one. The training
    history buffer (1.25 x ids in the first batch x eviction_interval x 8 bytes, sized once
    from the FIRST training batch: later ids beyond it are dropped silently) is working
    memory, like optimizer state, and is not charged.

    `forward` returns only the KeyedTensor (MC-EBC returns a tuple). On CPU the MC-EBC
    sharder offers no sharding type (torchrec #2958) and, sharded, RowWiseAdagrad eviction
    fails (fbgemm reset_weight_momentum has no CPU kernel): the benchmark uses this module
    unsharded (apply_optimizer_in_backward or a plain optimizer); a sharded CPU module with
    EXACT_ROWWISE_ADAGRAD is refused with ValueError at the first forward.
    """

    method = "managed_collision"

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        compression_ratio: float,
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        eviction: str = "lfu",
        eviction_interval: int = 100,
        input_hash_size: Optional[int] = None,
        decay_exponent: float = 1.0,
        small_table_rows: float = SMALL_TABLE_ROWS,
    ) -> None:
        super().__init__(tables, compression_ratio, is_weighted, device)
        if eviction not in EVICTIONS:
            raise ValueError(f"ManagedCollisionEmbeddingBags: eviction must be one of {EVICTIONS}, got {eviction!r}")
        if eviction_interval < 1:
            raise ValueError(f"ManagedCollisionEmbeddingBags: eviction_interval must be >= 1, got {eviction_interval}")
        if input_hash_size is not None and input_hash_size < 1:
            raise ValueError(f"ManagedCollisionEmbeddingBags: input_hash_size must be >= 1, got {input_hash_size}")
        self.eviction, self.eviction_interval = eviction, eviction_interval
        self.input_hash_size = input_hash_size
        ratio = self.compression_ratio
        self.zch_sizes = [
            t.num_embeddings + 1
            if keeps_plain(t.num_embeddings, ratio, small_table_rows)
            else max(2, math.floor(t.num_embeddings / ratio))
            for t in self._tables
        ]
        configs = [dataclasses.replace(t, num_embeddings=z) for t, z in zip(self._tables, self.zch_sizes)]
        modules = {}
        for t, z in zip(self._tables, self.zch_sizes):
            policy = (
                LFU_EvictionPolicy() if eviction == "lfu" else DistanceLFU_EvictionPolicy(decay_exponent=decay_exponent)
            )
            modules[t.name] = MCHManagedCollisionModule(
                zch_size=z,
                device=self._device,
                eviction_policy=policy,
                eviction_interval=eviction_interval,
                input_hash_size=PREHASH_RANGE if input_hash_size is None else input_hash_size,
                input_hash_func=prehash if input_hash_size is None else None,
                name=t.name,
            )
        ebc = EmbeddingBagCollection(configs, is_weighted=is_weighted, device=self._device)
        self.mc_ebc = ManagedCollisionEmbeddingBagCollection(
            ebc, ManagedCollisionCollection(modules, configs), return_remapped_features=False
        )
        self._optimizer_checked = False

    @property
    def physical(self) -> EmbeddingBagCollection:
        """The inner stock EmbeddingBagCollection (owned by the MC-EBC)."""
        return managed_collision_embedding_module(self.mc_ebc)

    def _forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if not self._optimizer_checked:
            _refuse_sharded_cpu_rowwise_adagrad(self.mc_ebc)
            self._optimizer_checked = True
        out = self.mc_ebc(features)
        pooled = out[0]
        if isinstance(pooled, KeyedTensor) and pooled.keys() == self._feature_names:
            return pooled
        return self.output(self.in_order(pooled, self._feature_names))

    # ---- introspection
    def mc_modules(self) -> Dict[str, MCHManagedCollisionModule]:
        return managed_collision_modules(self.mc_ebc)

    @torch.no_grad()
    def rows_of(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """The physical row of each raw id of `table` now (the shared miss row is zch_size - 1)."""
        raw = prehash(ids, PREHASH_RANGE) if self.input_hash_size is None else ids
        remapped = self.mc_modules()[table].remap({table: JaggedTensor(values=raw, lengths=torch.ones_like(raw))})
        return remapped[table].values()

    def extra_bytes(self) -> int:
        total = 0
        for module in self.mc_modules().values():
            for name, value in module.state_dict().items():
                if name.startswith("_mch_"):
                    total += value.numel() * value.element_size()
        return total

    def describe_tables(self) -> List[str]:
        return [
            f"table {t.name}: managed collision ({self.eviction}, eviction every {self.eviction_interval} steps), "
            f"{t.num_embeddings:,} ids -> {z:,} rows ({z - 1:,} owned + 1 shared miss row)"
            for t, z in zip(self._tables, self.zch_sizes)
        ]


def _refuse_sharded_cpu_rowwise_adagrad(mc_ebc: torch.nn.Module) -> None:
    """A sharded MC-EBC on CPU with fused EXACT_ROWWISE_ADAGRAD fails at its first eviction
    (fbgemm reset_weight_momentum has no CPU kernel): refuse it before training starts."""
    tables = managed_collision_tbes(mc_ebc)
    if not tables:
        return
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    for table, tbe in tables.items():
        if getattr(tbe, "optimizer", None) == EmbOptimType.EXACT_ROWWISE_ADAGRAD and getattr(tbe, "use_cpu", False):
            raise ValueError(
                f"table {table!r}: managed collision sharded on CPU with fused RowWiseAdagrad fails at the first "
                "eviction (fbgemm reset_weight_momentum has no CPU kernel); use SGD/Adagrad, or run it unsharded"
            )
