"""AdaEmbed (Lai et al., OSDI'23) as the CAFE paper runs it as a baseline.

AdaEmbed has no public code; the CAFE authors' re-implementation (HugoZHL/CAFE,
ArtifactEvaluation/embeddings/{ada_embedding_bag,init_embed}.py) is the reference here. What it
does, and what this module does the same way:

* one pool of rows shared by all compressed fields (here: by all compressed tables of one dim
  and data type), a per-id importance score and a per-id row (or none) over the whole
  vocabulary: 2 words per logical id, charged to the budget, so the pool has
  (N d / ratio - 2N) / d rows and the ratio must stay below d / 2;
* importance: the L2 norm of each occurrence's embedding gradient, normalised per field and
  batch to mean 1, accumulated per id (or 1 per occurrence: importance="frequency");
* ids without a row read a zero embedding (the reference keeps a row 0 forced to zero;
  here they are dropped from the bag, which pools the same sum);
* at step 1 and every `interval` steps (4096 in the reference) the scores are normalised per
  table by their 95th percentile (when non-zero) and the top `pool rows` ids are selected; if
  more than `min_change` (5%) of the rows would change owner, admitted ids take the evicted
  ids' rows and those rows are zeroed (the reference zeroes them; no weight is copied, the
  optimizer state of the row is left as it is, as in the reference); the first allocation
  hands all rows out without zeroing;
* every `decay_interval` steps (16384) all scores are multiplied by `decay` (0.8).

Differences, on purpose: reallocation runs after the optimizer update (end of backward), where
the reference runs it between backward and optimizer.step, so a zeroed row there still receives
the old owner's gradient; the reference decides whether to reallocate on a random sample of
1M ids, here the decision is exact over the whole vocabulary; the reference's per-field
normalisation divides its stored scores in place (a numpy view), here only a copy is
normalised; the reference leaves the pool uninitialised (torch.Tensor), here it is uniform in
+-sqrt(1 / largest n_t), like CAFE's hot rows.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, cast

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from cafe_torchrec._torchrec_compat import queue_end_of_backward
from cafe_torchrec.baselines.base import BaselineCollection, bytes_per_value, check_unique
from cafe_torchrec.importance import occurrence_scores
from cafe_torchrec.kjt import table_segments
from cafe_torchrec.layout import SMALL_TABLE_ROWS, keeps_plain, summing_table
from cafe_torchrec.migration import require_in_backward_optimizer, row_store
from cafe_torchrec.output import PooledOutput

BYTES_PER_ID = 8  # importance (float32) + row (int32): the paper's "2 words per feature"


def ada_hot_rows(total_rows: int, dim: int, ratio: float, value_bytes: int = 4) -> int:
    """Rows of a pool: (N d 4 / ratio - 8 N) / (d x bytes per value); (N d cr - 2N) / d for FP32."""
    budget = total_rows * dim * 4 / ratio - BYTES_PER_ID * total_rows
    return int(math.floor(budget / (dim * value_bytes) + 1e-9))


class _AdaPool(nn.Module):
    """Per-id state of one pool: importance and row (-1: none) for every id of its tables."""

    # buffers (registered in __init__)
    importance: torch.Tensor
    row_of: torch.Tensor
    _rows: torch.Tensor
    _offsets: torch.Tensor
    _feature_slots: torch.Tensor

    def __init__(self, name: str, tables: List[EmbeddingBagConfig], hot_rows: int, device: torch.device) -> None:
        super().__init__()
        self.name = name
        self.tables = tables
        self.hot_rows = hot_rows
        self.dim = tables[0].embedding_dim
        rows = [t.num_embeddings for t in tables]
        self.bounds = []  # (start, end) of each table's ids
        start = 0
        for n in rows:
            self.bounds.append((start, start + n))
            start += n
        self.total_rows = start
        self.features = [f for t in tables for f in t.feature_names]
        self.feature_slots = [i for i, t in enumerate(tables) for _ in t.feature_names]
        self.register_buffer("importance", torch.zeros(start, dtype=torch.float32, device=device))
        self.register_buffer("row_of", torch.full((start,), -1, dtype=torch.int32, device=device))
        self.register_buffer("_rows", torch.tensor(rows, dtype=torch.int64, device=device), persistent=False)
        self.register_buffer(
            "_offsets", torch.tensor([b[0] for b in self.bounds], dtype=torch.int64, device=device), persistent=False
        )
        self.register_buffer(
            "_feature_slots", torch.tensor(self.feature_slots, dtype=torch.int64, device=device), persistent=False
        )
        self.reallocations = 0
        self.last_admitted = 0

    def keys(self, values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Pool-wide id of each occurrence: table offset + (id mod table rows)."""
        slot = torch.repeat_interleave(self._feature_slots, counts, output_size=values.numel())
        return self._offsets[slot] + torch.remainder(values, self._rows[slot])


class AdaEmbedEmbeddingBagCollection(BaselineCollection):
    """EmbeddingBagCollection compressed with AdaEmbed (OSDI'23), as the CAFE paper runs it.

    Compressed tables of equal dim and data type share one pool of rows (one physical table
    `ada_dim{d}` of the inner EmbeddingBagCollection); only the ids with the highest
    accumulated importance own a row, the others read zeros. See the module docstring for
    the algorithm and the reference. Memory: pool rows x d x 4 plus 8 bytes per logical id
    (importance float32 + row int32, the paper's 2 words), so ratio < d / 2; infeasible ratios
    raise ValueError naming the tables. Tables with at most `small_table_rows / ratio` rows
    stay uncompressed (the paper's rule).

    Training: importance is read from the pooled-output gradient in backward and rows are
    reassigned at the end of backward, after the optimizer update, so the physical tables
    must be updated inside backward: DistributedModelParallel (fused TBE) or, unsharded,
    `apply_optimizer_in_backward(...)` (as for CafeEmbeddingBagCollection). Per-id state is
    in buffers (`pools.<name>.importance`, `.row_of`, `steps`), so state_dict round-trips.
    """

    method = "adaembed"
    steps: torch.Tensor  # a buffer (registered in __init__)

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        compression_ratio: float,
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        interval: int = 4096,
        importance: str = "gradient",
        decay: float = 0.8,
        decay_interval: int = 16384,
        min_change: float = 0.05,
        small_table_rows: float = SMALL_TABLE_ROWS,
    ) -> None:
        super().__init__(tables, compression_ratio, is_weighted, device)
        if importance not in ("gradient", "frequency"):
            raise ValueError(f"AdaEmbed: importance must be 'gradient' or 'frequency', got {importance!r}")
        if interval < 1 or decay_interval < 1:
            raise ValueError(f"AdaEmbed: interval and decay_interval must be >= 1, got {interval}, {decay_interval}")
        if not 0 < decay <= 1:
            raise ValueError(f"AdaEmbed: decay must be in (0, 1], got {decay}")
        if not 0 <= min_change < 1:
            raise ValueError(f"AdaEmbed: min_change must be in [0, 1), got {min_change}")
        self.interval, self.importance_mode, self.decay = interval, importance, decay
        self.decay_interval, self.min_change = decay_interval, min_change

        grouped: "OrderedDict[Tuple[int, DataType], List[EmbeddingBagConfig]]" = OrderedDict()
        plain = []
        for t in self._tables:
            if keeps_plain(t.num_embeddings, self.compression_ratio, small_table_rows):
                plain.append(t)
            else:
                grouped.setdefault((t.embedding_dim, t.data_type), []).append(t)
        pools = OrderedDict()
        for (dim, dtype), members in grouped.items():
            name = f"ada_dim{dim}" + ("" if dtype == DataType.FP32 else f"_{dtype.value.lower()}")
            total = sum(t.num_embeddings for t in members)
            hot = ada_hot_rows(total, dim, self.compression_ratio, bytes_per_value(members[0]))
            if hot < 1:
                raise ValueError(
                    f"tables {[t.name for t in members]} (dim {dim}): AdaEmbed cannot reach "
                    f"{self.compression_ratio:g}x: "
                    f"its 2 words (score, row) per id alone cost 2/{dim} of the table, so the ratio must stay below "
                    f"dim / 2 = {dim / 2:g}"
                )
            pools[name] = _AdaPool(name, members, hot, self._device)
        self.pools = nn.ModuleDict(pools)
        self._plain = plain

        configs = []
        for p in pools.values():
            bound = math.sqrt(1.0 / max(t.num_embeddings for t in p.tables))
            configs.append(
                EmbeddingBagConfig(
                    name=p.name,
                    embedding_dim=p.dim,
                    num_embeddings=p.hot_rows,
                    feature_names=list(p.features),
                    pooling=PoolingType.SUM,
                    data_type=p.tables[0].data_type,
                    weight_init_min=-bound,
                    weight_init_max=bound,
                )
            )
        configs.extend(summing_table(t) for t in plain)
        check_unique([c.name for c in configs], "table")
        self.physical = EmbeddingBagCollection(configs, is_weighted=is_weighted, device=self._device)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=self._device))
        self._build_feature_maps(configs)

    def _build_feature_maps(self, configs: List[EmbeddingBagConfig]) -> None:
        inner = [f for c in configs for f in c.feature_names]
        self._inner_features = inner
        self._inner_perm = None if inner == self._feature_names else [self._feature_names.index(f) for f in inner]
        self._table_of = {f: c.name for c in configs for f in c.feature_names}  # feature -> pool or plain table
        self._plain_rows = {t.name: t.num_embeddings for t in self._plain}
        self.pooled_output = PooledOutput(self._tables, inner, mean_by_sum=True)  # every inner table pools with SUM

    # ---- forward
    def _forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self._inner_perm is not None:
            features = features.permute(self._inner_perm)
        training = self.training and torch.is_grad_enabled()
        out_values, out_lengths, out_weights, batches = [], [], [], []
        column = 0
        for seg in table_segments(features, self._table_of):
            seg_values, seg_lengths, seg_weights = seg.values, seg.lengths, seg.weights
            if seg.table in self.pools:
                pool = self._pools()[seg.table]
                n_feat, n_values = len(seg.features), seg_values.numel()
                keys = pool.keys(seg_values, torch.tensor(seg.counts, dtype=torch.int64, device=seg_values.device))
                rows = pool.row_of[keys].long()
                keep = rows >= 0
                bag = torch.repeat_interleave(
                    torch.arange(seg_lengths.numel(), device=seg_values.device), seg_lengths, output_size=n_values
                )
                kept_lengths = torch.zeros_like(seg_lengths).index_add_(
                    0, bag[keep], torch.ones(bag[keep].shape, dtype=seg_lengths.dtype, device=bag.device)
                )
                width = pool.dim * n_feat
                if training:
                    batches.append((pool, keys, seg_lengths, seg_weights, n_feat, column, column + width))
                column += width
                seg_values, seg_lengths = rows[keep], kept_lengths
                seg_weights = seg_weights[keep] if seg_weights is not None else None
            else:
                seg_values = torch.remainder(seg_values, self._plain_rows[seg.table])
            out_values.append(seg_values)
            out_lengths.append(seg_lengths)
            if seg_weights is not None:
                out_weights.append(seg_weights)
        inner = KeyedJaggedTensor(
            keys=self._inner_features,
            values=torch.cat(out_values),
            lengths=torch.cat(out_lengths),
            weights=torch.cat(out_weights) if out_weights else None,
            stride=features.stride(),
        )
        pooled = self.in_order(self.physical(inner), self._inner_features)  # the hook's columns are in inner order
        if training and batches and pooled.requires_grad:
            require_in_backward_optimizer(self.physical, list(self.pools), "AdaEmbed pool", "rows are reassigned")
            pooled.register_hook(self._backward_hook(batches))
        return self.output(pooled, self.pooled_output.bag_lengths(features))

    # ---- backward: importance, then reallocation after the optimizer update
    def _backward_hook(self, batches):
        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                for pool, keys, lengths, weights, n_feat, a, b in batches:
                    scores = occurrence_scores(grad, (a, b), lengths, n_feat, weights, self.importance_mode)
                    pool.importance.index_add_(0, keys, scores.to(pool.importance.dtype))
                self.steps += 1
            step = int(self.steps)
            if step == 1 or step % self.interval == 0 or step % self.decay_interval == 0:
                queue_end_of_backward(lambda: self._end_of_step(step))

        return hook

    @torch.no_grad()
    def _end_of_step(self, step: int) -> None:
        for pool in self._pools().values():
            if step == 1 or step % self.interval == 0:
                self.reallocate(pool.name)
            if step % self.decay_interval == 0:
                pool.importance.mul_(self.decay)

    @torch.no_grad()
    def reallocate(self, pool_name: str) -> int:
        """Give the pool's rows to the ids of highest (per-table normalised) importance; returns
        how many ids were admitted (0 when fewer than min_change x rows would change owner)."""
        pool = self._pools()[pool_name]
        score = pool.importance.clone()
        for a, b in pool.bounds:
            p95 = _percentile(score[a:b], 0.95)
            if p95 > 0:
                score[a:b] /= p95
        current = pool.row_of >= 0
        selected = _select_top(score, pool.hot_rows, current)
        if not bool(current.any()):
            ids = selected.nonzero().squeeze(1)
            pool.row_of[ids] = torch.arange(ids.numel(), dtype=torch.int32, device=ids.device)
            admitted = ids.numel()
        else:
            admit = (selected & ~current).nonzero().squeeze(1)
            evict = (current & ~selected).nonzero().squeeze(1)
            if admit.numel() == 0 or admit.numel() <= self.min_change * pool.hot_rows:
                return 0
            rows = pool.row_of[evict].clone()
            pool.row_of[evict] = -1
            pool.row_of[admit] = rows
            row_store(self.physical, pool.name).weight[rows.long().to(pool.row_of.device)] = 0
            admitted = admit.numel()
        pool.reallocations += 1
        pool.last_admitted = admitted
        return admitted

    # ---- introspection
    def _pools(self) -> Dict[str, _AdaPool]:
        """The pools by name (`pools` is a ModuleDict of _AdaPool)."""
        return {name: cast(_AdaPool, pool) for name, pool in self.pools.items()}

    def rows_of(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """The pool row of each id of `table` (-1: none, reads zeros); for plain tables, id mod rows."""
        for pool in self._pools().values():
            names = [t.name for t in pool.tables]
            if table in names:
                i = names.index(table)
                key = pool.bounds[i][0] + torch.remainder(ids, pool.tables[i].num_embeddings)
                return pool.row_of[key].long()
        t = next(t for t in self._plain if t.name == table)
        return torch.remainder(ids, t.num_embeddings)

    def extra_bytes(self) -> int:
        return sum(
            p.importance.numel() * p.importance.element_size() + p.row_of.numel() * p.row_of.element_size()
            for p in self._pools().values()
        )

    def stats(self) -> Dict[str, Dict[str, int]]:
        """Per pool: rows, ids covered, rows in use, reallocations and ids admitted by the last one."""
        return {
            name: {
                "hot_rows": p.hot_rows,
                "ids": p.total_rows,
                "rows_used": int((p.row_of >= 0).sum()),
                "reallocations": p.reallocations,
                "last_admitted": p.last_admitted,
                "steps": int(self.steps),
            }
            for name, p in self._pools().items()
        }

    def describe_tables(self) -> List[str]:
        lines = []
        for t in self._tables:
            pool = next((p for p in self._pools().values() if t in p.tables), None)
            if pool is None:
                lines.append(f"table {t.name}: uncompressed ({t.num_embeddings:,} rows)")
            else:
                lines.append(
                    f"table {t.name}: AdaEmbed, {t.num_embeddings:,} ids in pool {pool.name} "
                    f"({pool.hot_rows:,} rows shared by {len(pool.tables)} table(s), {pool.total_rows:,} ids; "
                    f"reallocation every {self.interval} steps, importance {self.importance_mode})"
                )
        return lines


def _percentile(values: torch.Tensor, q: float) -> float:
    """numpy.percentile(values, 100 q) (linear interpolation) without torch.quantile's size limit."""
    n = values.numel()
    if n == 0:
        return 0.0
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    a = torch.kthvalue(values, lo + 1).values.item()
    b = torch.kthvalue(values, hi + 1).values.item() if hi != lo else a
    return a + (b - a) * (pos - lo)


def _select_top(score: torch.Tensor, k: int, current: torch.Tensor) -> torch.Tensor:
    """Mask of the k highest scores; ties at the boundary prefer ids that own a row, then low ids."""
    n = score.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=score.device)
    threshold = torch.kthvalue(score, n - k + 1).values
    selected = score > threshold
    need = k - int(selected.sum())
    if need > 0:
        tied = (score == threshold).nonzero().squeeze(1)
        order = torch.argsort((~current[tied]).to(torch.int8), stable=True)
        selected[tied[order[:need]]] = True
    return selected
