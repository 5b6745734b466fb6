"""Small builders shared by the tests: tables, Zipf KJTs, dense features."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def tables(
    rows: Sequence[int], dim: int = 8, features_per_table: Sequence[int] = (), pooling: PoolingType = PoolingType.SUM
) -> List[EmbeddingBagConfig]:
    """Tables t0, t1, ... with features f0, f1, ... (features_per_table[i] features for table i)."""
    out, f = [], 0
    for i, n in enumerate(rows):
        k = features_per_table[i] if i < len(features_per_table) else 1
        out.append(
            EmbeddingBagConfig(
                name=f"t{i}",
                embedding_dim=dim,
                num_embeddings=n,
                feature_names=[f"f{f + j}" for j in range(k)],
                pooling=pooling,
            )
        )
        f += k
    return out


def zipf_kjt(
    features: Sequence[str],
    batch: int,
    vocab: int,
    gen: torch.Generator,
    z: float = 1.2,
    max_len: int = 1,
    offset: int = 0,
) -> KeyedJaggedTensor:
    """A KJT of Zipf ids (rank r has weight r^-z, ids scattered); bag lengths in [1, max_len]
    (or exactly 1), ids shifted by `offset` (to move the popular set)."""
    lengths = torch.randint(1 if max_len > 1 else 1, max_len + 1, (len(features) * batch,), generator=gen)
    weights = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-z)
    ranks = torch.multinomial(weights, int(lengths.sum()), replacement=True, generator=gen)
    ids = (ranks * 7919) % vocab + offset
    return KeyedJaggedTensor.from_lengths_sync(keys=list(features), values=ids, lengths=lengths)


def features_of(tables_: Sequence[EmbeddingBagConfig]) -> List[str]:
    return [f for t in tables_ for f in t.feature_names]
