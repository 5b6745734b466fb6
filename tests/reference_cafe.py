"""A pure-PyTorch CAFE for one group, written for clarity (loops, no kernels): the reference.

One weight matrix laid out like the module's physical table; every id is hashed, looked up in
the sequential ReferenceSketch and pooled one occurrence at a time. Importance is the L2
norm of each occurrence's own embedding gradient (retain_grad), normalised per feature to
mean 1. A step is: backward, insert scores, optimizer update, then copy promoted rows.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from cafe_torchrec.hashing import bounded_int, fold_int, mix64_int, odd_multiplier
from cafe_torchrec.layout import GroupLayout
from tests.reference_sketch import ReferenceSketch, f32


class ReferenceCafe(EmbeddingBagCollectionInterface):
    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        layout: GroupLayout,
        weight: torch.Tensor,
        optimizer: str,
        lr: float,
        eps: float = 1e-10,
    ) -> None:
        super().__init__()
        self.tables, self.layout = tables, layout
        cfg = layout.config
        self.weight = nn.Parameter(weight.clone())
        self.accumulator = torch.zeros(weight.shape[0])  # row-wise Adagrad
        self.optimizer, self.lr, self.eps = optimizer, lr, eps
        buckets = max(1, layout.hot_rows)
        self.sketch = ReferenceSketch(
            buckets,
            cfg.slots_per_bucket,
            layout.hot_rows,
            cfg.threshold,
            cfg.decay,
            cfg.decay_trigger * buckets * cfg.threshold,
            mix64_int(303, cfg.seed),
        )
        self.medium = f32(cfg.threshold * cfg.medium_share) if cfg.multi_level else float("inf")
        self.slot_of_feature = {f: i for i, t in enumerate(layout.tables) for f in t.features}
        self.offsets = layout.region_offsets()
        self.seed = cfg.seed
        self._occurrences: List[Tuple[str, int, torch.Tensor]] = []

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self.tables

    def is_weighted(self) -> bool:
        return False

    def key(self, raw_id: int, slot: int) -> int:
        return ((mix64_int(raw_id, mix64_int(slot, self.seed)) >> 15) << 15) | slot

    def rows(self, key: int) -> List[int]:
        slot = key & 0x7FFF
        t = self.layout.tables[slot]
        (o1, o2) = self.offsets[slot]
        row1 = o1 + bounded_int(fold_int(key, odd_multiplier(101)), t.level1_rows)
        hot_row, _ = self.sketch.query(key)
        if hot_row >= 0:
            return [hot_row]
        if self.layout.config.multi_level and self.sketch.is_medium(key, self.medium):
            return [row1, o2 + bounded_int(fold_int(key, odd_multiplier(202)), t.level2_rows)]
        return [row1]

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        outputs, self._occurrences = [], []
        d = self.layout.dim
        features = [f for t in self.tables for f in t.feature_names]
        for f in features:
            jt = kjt[f]
            bags = []
            for ids in jt.to_dense():
                pooled = torch.zeros(d)
                for raw in ids.tolist():
                    key = self.key(raw, self.slot_of_feature[f])
                    emb = self.weight[self.rows(key)].sum(0)
                    if emb.requires_grad:
                        emb.retain_grad()
                    self._occurrences.append((f, key, emb))
                    pooled = pooled + emb
                bags.append(pooled)
            outputs.append(torch.stack(bags))
        return KeyedTensor(keys=features, length_per_key=[d] * len(features), values=torch.cat(outputs, 1))

    @torch.no_grad()
    def step(self) -> Dict[str, List[int]]:
        """After backward: insert scores, update weights, migrate. Returns the promotions."""
        norms: Dict[str, List[float]] = {}
        for f, _, emb in self._occurrences:
            norms.setdefault(f, []).append(float(emb.grad.norm()))
        keys, scores = [], []
        seen = {f: 0 for f in norms}
        for f, key, _ in self._occurrences:
            mean = sum(norms[f]) / len(norms[f])
            keys.append(key)
            # mean not > 0 (all zero, or a NaN/inf gradient): 0, but NaN where the norm is not finite
            scores.append(norms[f][seen[f]] / mean if mean > 0 else norms[f][seen[f]] * 0.0)
            seen[f] += 1
        promoted_keys, promoted_rows, _ = self.sketch.insert_batch(keys, scores)
        grad = self.weight.grad
        if self.optimizer == "sgd":
            self.weight -= self.lr * grad
        else:
            touched = grad.abs().sum(1) > 0
            self.accumulator[touched] += grad[touched].pow(2).mean(1)
            self.weight -= self.lr * grad / (self.accumulator.sqrt() + self.eps)[:, None]
        self.weight.grad = None
        for key, row in zip(promoted_keys, promoted_rows):
            src = self.rows_if_not_hot(key)
            self.weight[row] = self.weight[src].sum(0)
            self.accumulator[row] = 0.0  # a fresh row of its own
        return {"keys": promoted_keys, "rows": promoted_rows}

    def rows_if_not_hot(self, key: int) -> List[int]:
        """The rows a promoted key's hot row starts from: level-1, plus level-2 with CAFE-ML."""
        slot = key & 0x7FFF
        t = self.layout.tables[slot]
        (o1, o2) = self.offsets[slot]
        rows = [o1 + bounded_int(fold_int(key, odd_multiplier(101)), t.level1_rows)]
        if self.layout.config.multi_level:
            rows.append(o2 + bounded_int(fold_int(key, odd_multiplier(202)), t.level2_rows))
        return rows
