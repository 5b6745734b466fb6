"""The hashing trick: each table shrinks to ceil(rows / ratio) rows, indexed by id mod rows."""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from cafe_torchrec.baselines.base import BaselineCollection
from cafe_torchrec.layout import SMALL_TABLE_ROWS, keeps_plain


class HashingEmbeddingBagCollection(BaselineCollection):
    """EmbeddingBagCollection compressed with the hashing trick (the CAFE paper's "Hash").

    Table t keeps rows_t = max(1, ceil(n_t / ratio)) rows and id x reads row
    torch.remainder(x, rows_t) (Python-style, so negative ids are valid). Tables with at most
    `small_table_rows / ratio` rows stay uncompressed (the paper's rule; 0 compresses all).
    Init is uniform in +-sqrt(1 / n_t) with the logical n_t (the paper's code). No side
    structure: memory is the weights alone.
    """

    method = "hash"

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        compression_ratio: float,
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        small_table_rows: float = SMALL_TABLE_ROWS,
    ) -> None:
        super().__init__(tables, compression_ratio, is_weighted, device)
        self.rows = [
            t.num_embeddings
            if keeps_plain(t.num_embeddings, self.compression_ratio, small_table_rows)
            else max(1, math.ceil(t.num_embeddings / self.compression_ratio))
            for t in self._tables
        ]
        configs = [dataclasses.replace(t, num_embeddings=r) for t, r in zip(self._tables, self.rows)]
        self.physical = EmbeddingBagCollection(configs, is_weighted=is_weighted, device=self._device)
        self.register_buffer(
            "_modulus",
            torch.tensor([self.rows[i] for i in self._feature_table], dtype=torch.int64, device=self._device),
            persistent=False,
        )

    def _forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        values = torch.remainder(features.values(), self.per_feature(features, self._modulus))
        inner = KeyedJaggedTensor(
            keys=self._feature_names,
            values=values,
            lengths=features.lengths(),
            weights=features.weights_or_none(),
            stride=features.stride(),
        )
        return self.output(self.in_order(self.physical(inner), self._feature_names))

    def describe_tables(self) -> List[str]:
        return [
            f"table {t.name}: "
            + (
                f"uncompressed ({r:,} rows)"
                if r == t.num_embeddings
                else f"hashing {t.num_embeddings:,} -> {r:,} rows (id mod {r:,})"
            )
            for t, r in zip(self._tables, self.rows)
        ]
