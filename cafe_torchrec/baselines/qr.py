"""The quotient-remainder trick (Shi et al., KDD'20; facebookresearch/dlrm tricks/qr_embedding_bag.py)."""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Union

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from cafe_torchrec.baselines.base import BaselineCollection, check_unique
from cafe_torchrec.layout import SMALL_TABLE_ROWS, keeps_plain

OPERATIONS = ("mult", "add")


def paper_collisions(rows: int, ratio: float) -> Optional[int]:
    """The CAFE paper's choice (init_embed.py): the smallest c with rows / c + c <= rows / ratio,
    c = ceil((N cr - sqrt((N cr)^2 - 4N)) / 2) with cr = 1 / ratio; None when (N cr)^2 < 4N."""
    budget = rows / ratio
    disc = budget * budget - 4 * rows
    if disc < 0:
        return None
    return max(1, math.ceil((budget - math.sqrt(disc)) / 2))


class QREmbeddingBagCollection(BaselineCollection):
    """EmbeddingBagCollection compressed with the quotient-remainder trick (the paper's "Q-R").

    Table t (n rows) becomes two physical tables, `{t}_q` with ceil(n / c) rows and `{t}_r`
    with c rows; id x (made non-negative first: x = torch.remainder(x, n)) reads
    E_q[x // c] (op) E_r[x mod c], op = "mult" (element-wise product, the dlrm default) or
    "add". Both halves are pooled by the inner EmbeddingBagCollection, so the result is
    exact: "add" pools both halves and adds them (sum/mean of sums); "mult" is exact only
    for bags of at most one id (the product of two pooled sums is not the sum of products),
    so it raises ValueError naming the feature when a bag of a compressed table holds more
    than one id. Criteo is one-hot. With per-sample weights, "mult" weights the quotient half
    only (w * E_q * E_r), "add" weights both.

    collisions: "per_table" (default) picks c_t from each table's own budget n_t / ratio with
    the paper's formula, raising ValueError naming the table when (n_t / ratio)^2 < 4 n_t
    (QR cannot fit: it needs at least 2 sqrt(n_t) rows); "global" uses one c for all
    compressed tables from their total N, as the paper's code does (tables where that c
    saves nothing stay uncompressed); an int fixes c (dlrm's --qr-collisions). Tables with
    at most `small_table_rows / ratio` rows stay uncompressed (the paper's rule).
    Init: "mult" follows dlrm (uniform in [sqrt(1/n), 1): nn.init.uniform_(w, sqrt(1/n))
    sets the lower bound, which keeps products away from 0); "add" follows the CAFE
    artifact's QR (uniform in +-sqrt(1/n)). No side structure: memory is the weights alone.
    """

    method = "qr"

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        compression_ratio: float,
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        operation: str = "mult",
        collisions: Union[str, int] = "per_table",
        small_table_rows: float = SMALL_TABLE_ROWS,
    ) -> None:
        super().__init__(tables, compression_ratio, is_weighted, device)
        if operation not in OPERATIONS:
            raise ValueError(f"QREmbeddingBagCollection: operation must be one of {OPERATIONS}, got {operation!r}")
        self.operation = operation
        self.collisions = self._choose_collisions(collisions, small_table_rows)  # per table; 0 = uncompressed
        configs = []
        for t, c in zip(self._tables, self.collisions):
            if c == 0:
                configs.append(_copy(t, t.name, t.num_embeddings, list(t.feature_names), t.pooling, None))
                continue
            n = t.num_embeddings
            lo, hi = (math.sqrt(1.0 / n), 1.0) if operation == "mult" else (-math.sqrt(1.0 / n), math.sqrt(1.0 / n))
            configs.append(
                _copy(t, f"{t.name}_q", math.ceil(n / c), [f"{f}_q" for f in t.feature_names], t.pooling, (lo, hi))
            )
            configs.append(_copy(t, f"{t.name}_r", c, [f"{f}_r" for f in t.feature_names], t.pooling, (lo, hi)))
        check_unique([c.name for c in configs], "table")
        self.physical = EmbeddingBagCollection(configs, is_weighted=is_weighted, device=self._device)

        compressed = [self.collisions[i] > 0 for i in self._feature_table]
        self._compressed = compressed
        self._quotient_names = [f"{f}_q" if c else f for f, c in zip(self._feature_names, compressed)]
        self._remainder_names = [f"{f}_r" for f, c in zip(self._feature_names, compressed) if c]
        check_unique(self._quotient_names + self._remainder_names, "feature")
        dev = self._device
        self.register_buffer(
            "_rows",
            torch.tensor([self._tables[i].num_embeddings for i in self._feature_table], dtype=torch.int64, device=dev),
            persistent=False,
        )
        self.register_buffer(
            "_c",
            torch.tensor([max(1, self.collisions[i]) for i in self._feature_table], dtype=torch.int64, device=dev),
            persistent=False,
        )
        self.register_buffer(
            "_compressed_features",
            torch.tensor([i for i, c in enumerate(compressed) if c], dtype=torch.int64, device=dev),
            persistent=False,
        )
        self.register_buffer(
            "_compressed_mask", torch.tensor(compressed, dtype=torch.bool, device=dev), persistent=False
        )

    def _choose_collisions(self, collisions: Union[str, int], small_table_rows: float) -> List[int]:
        ratio = self.compression_ratio
        small = [keeps_plain(t.num_embeddings, ratio, small_table_rows) for t in self._tables]
        if collisions == "per_table":
            out = []
            for t, plain in zip(self._tables, small):
                if plain:
                    out.append(0)
                    continue
                c = paper_collisions(t.num_embeddings, ratio)
                if c is None:
                    raise ValueError(
                        f"table {t.name!r}: QR cannot compress {t.num_embeddings:,} rows {ratio:g}x: its budget of "
                        f"{t.num_embeddings / ratio:,.1f} rows is below 2 sqrt(n) = "
                        f"{2 * math.sqrt(t.num_embeddings):,.1f} "
                        "((n/ratio)^2 < 4n); use a lower ratio, collisions='global' or a fixed int"
                    )
                out.append(c)
            return out
        if collisions == "global":
            total = sum(t.num_embeddings for t, plain in zip(self._tables, small) if not plain)
            if total == 0:
                return [0] * len(self._tables)
            c = paper_collisions(total, ratio)
            if c is None:
                names = [t.name for t, plain in zip(self._tables, small) if not plain]
                raise ValueError(
                    f"tables {names}: QR cannot compress their {total:,} rows {ratio:g}x "
                    "((N/ratio)^2 < 4N, the paper's limit)"
                )
        elif isinstance(collisions, int) and not isinstance(collisions, bool) and collisions >= 1:
            c = collisions
        else:
            raise ValueError(
                f"QREmbeddingBagCollection: collisions must be 'per_table', 'global' or an int >= 1, got {collisions!r}"
            )
        # a shared c: a table where QR would not save rows stays uncompressed
        return [
            0 if plain or math.ceil(t.num_embeddings / c) + c >= t.num_embeddings else c
            for t, plain in zip(self._tables, small)
        ]

    def _forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        lengths, stride = features.lengths(), features.stride()
        per_bag = lengths.view(len(self._feature_names), stride)
        if self.operation == "mult" and per_bag.numel():
            longest = per_bag.max(dim=1).values
            bad = ((longest > 1) & self._compressed_mask).nonzero()
            if bad.numel():
                f = self._feature_names[int(bad[0])]
                raise ValueError(
                    f"feature {f!r} has a bag of {int(longest[int(bad[0])])} ids: QR 'mult' is exact "
                    "only for bags of at most one id (use operation='add' for multi-hot features)"
                )
        x = torch.remainder(features.values(), self.per_feature(features, self._rows))
        c = self.per_feature(features, self._c)
        values, weights = [torch.div(x, c, rounding_mode="floor")], features.weights_or_none()
        all_weights = [weights] if weights is not None else []
        all_lengths = [lengths]
        if self._remainder_names:
            in_compressed = self.per_feature(features, self._compressed_mask)
            values.append(torch.remainder(x, c)[in_compressed])
            all_lengths.append(per_bag.index_select(0, self._compressed_features).reshape(-1))
            if weights is not None:
                r_weights = weights[in_compressed]
                all_weights.append(r_weights if self.operation == "add" else torch.ones_like(r_weights))
        inner = KeyedJaggedTensor(
            keys=self._quotient_names + self._remainder_names,
            values=torch.cat(values),
            lengths=torch.cat(all_lengths),
            weights=torch.cat(all_weights) if all_weights else None,
            stride=stride,
        )
        pooled = self.physical(inner).to_dict()
        out = []
        for f, q, compressed in zip(self._feature_names, self._quotient_names, self._compressed):
            if not compressed:
                out.append(pooled[q])
            elif self.operation == "mult":
                out.append(pooled[q] * pooled[f"{f}_r"])
            else:
                out.append(pooled[q] + pooled[f"{f}_r"])
        return self.output(torch.cat(out, dim=1))

    def describe_tables(self) -> List[str]:
        lines = []
        for t, c in zip(self._tables, self.collisions):
            if c == 0:
                lines.append(f"table {t.name}: uncompressed ({t.num_embeddings:,} rows)")
            else:
                q = math.ceil(t.num_embeddings / c)
                lines.append(
                    f"table {t.name}: QR {self.operation}, {t.num_embeddings:,} -> {q + c:,} rows "
                    f"({q:,} quotient + {c:,} remainder, {c:,} collisions)"
                )
        return lines


def _copy(
    t: EmbeddingBagConfig, name: str, rows: int, features: Sequence[str], pooling: PoolingType, bounds: Optional[tuple]
) -> EmbeddingBagConfig:
    kwargs = dict(
        name=name,
        embedding_dim=t.embedding_dim,
        num_embeddings=rows,
        feature_names=list(features),
        pooling=pooling,
        data_type=t.data_type,
    )
    if bounds is None:
        kwargs.update(weight_init_min=t.weight_init_min, weight_init_max=t.weight_init_max, init_fn=t.init_fn)
    else:
        kwargs.update(
            weight_init_min=bounds[0],
            weight_init_max=bounds[1],
            init_fn=functools.partial(torch.nn.init.uniform_, a=bounds[0], b=bounds[1]),
        )
    return EmbeddingBagConfig(**kwargs)
