"""CafeEmbeddingBagCollection: a drop-in EmbeddingBagCollection with CAFE compression."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from cafe_torchrec.config import CafeConfig, config_per_table
from cafe_torchrec.importance import occurrence_scores
from cafe_torchrec.layout import CafePlan, plan_tables
from cafe_torchrec.migration import copy_rows, has_in_backward_optimizer, row_store
from cafe_torchrec.remap import SLOT_MASK, CafeGroupRemap
from cafe_torchrec.validation import check_features


@dataclass
class _GroupBatch:
    """What backward needs of one group's forward: keys and original bags."""

    group: str
    keys: torch.Tensor  # [N] per original occurrence
    lengths: torch.Tensor  # [F*B] original bag lengths, feature-major
    weights: Optional[torch.Tensor]  # [N]
    num_features: int
    columns: Tuple[int, int]  # the group's columns in the inner pooled output


class CafeEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """EmbeddingBagCollection whose tables are compressed with CAFE (SIGMOD'24).

    Same configs in, `KeyedTensor` out (keyed by feature name, in config order). Tables of
    equal dim form a CAFE group (see CafeConfig.group) stored as ONE physical table of an
    inner stock `EmbeddingBagCollection` (`self.physical`), so TorchRec's sharders, planner
    and fused optimizers see real parameters. Ids may be any int64 (they are hashed; negative
    and out-of-range ids are valid ids, not errors); tables too small to compress keep stock
    semantics (row = id mod num_embeddings).

    Training: importance (gradient norms) is read from the pooled-output gradient in backward
    and fed to each group's HotSketch; ids that turn hot get a hot row at the end of backward,
    after the optimizer update. So the physical tables must be updated inside backward: under
    DistributedModelParallel (fused TBE, the normal way) or, unsharded, after
    `apply_optimizer_in_backward(SGD | Adagrad | RowWiseAdagrad, ebc.parameters(), ...)`.
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        cafe: Union[CafeConfig, Dict[str, CafeConfig]] = CafeConfig(),
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        sketch_kernel: str = "auto",
    ) -> None:
        super().__init__()
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._device = device
        self._tables = list(tables)
        self._is_weighted = is_weighted
        configs = config_per_table(cafe, [t.name for t in tables])
        self.plan: CafePlan = plan_tables(self._tables, configs)
        _check_weighted_mean(self._tables, is_weighted)
        self.physical = EmbeddingBagCollection(self.plan.physical_configs(), is_weighted=is_weighted, device=device)
        self.groups = nn.ModuleDict({g.name: CafeGroupRemap(g, device, sketch_kernel) for g in self.plan.groups})
        self._build_feature_maps()

    # ---- what DLRM and the sharders read
    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._tables

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._device

    def _build_feature_maps(self) -> None:
        """Feature order of the inner collection and how to map its output back."""
        self._feature_names = [f for t in self._tables for f in t.feature_names]
        self._dims = [t.embedding_dim for t in self._tables for _ in t.feature_names]
        self._inner_features = [f for c in self.plan.physical_configs() for f in c.feature_names]
        inner_dims = {f: c.embedding_dim for c in self.plan.physical_configs() for f in c.feature_names}
        start, inner_start = 0, {}
        for f in self._inner_features:
            inner_start[f] = start
            start += inner_dims[f]
        columns = [i for f in self._feature_names for i in range(inner_start[f], inner_start[f] + inner_dims[f])]
        self._output_columns = None if columns == list(range(start)) else torch.tensor(columns)
        self._mean_features = [i for i, (t, f) in enumerate((t, f) for t in self._tables for f in t.feature_names)
                               if t.pooling == PoolingType.MEAN]
        self._segments: List[Tuple[str, object, List[int]]] = []  # (kind, group or rows, feature indices)
        position = 0
        for g in self.plan.groups:
            slots = [i for i, t in enumerate(g.tables) for _ in t.features]
            self._segments.append(("group", g.name, slots))
            position += len(slots)
        for p in self.plan.plain:
            self._segments.append(("plain", p.config.num_embeddings, [0] * len(p.config.feature_names)))

    # ---- forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        check_features(features, self._feature_names, self._is_weighted)
        if features.keys() != self._inner_features:
            features = features.permute([features.keys().index(f) for f in self._inner_features])
        training = self.training and torch.is_grad_enabled()
        inner, batches = self.remap(features, training)
        pooled = self.physical(inner)
        values = pooled.values()
        if training and batches and values.requires_grad:
            self._check_in_backward_optimizers()
            values.register_hook(self._backward_hook(batches))
        return self._to_output(values, features)

    def remap(self, features: KeyedJaggedTensor, training: bool) -> Tuple[KeyedJaggedTensor, List[_GroupBatch]]:
        """Raw ids (in inner feature order) -> physical rows; medium ids become two rows."""
        stride = features.stride()
        length_per_key = features.length_per_key()
        values, lengths, weights = features.values(), features.lengths(), features.weights_or_none()
        out_values, out_lengths, out_weights, batches = [], [], [], []
        feature, value_start, column = 0, 0, 0
        for kind, what, slots in self._segments:
            n_feat = len(slots)
            n_values = sum(length_per_key[feature : feature + n_feat])
            seg_values = values[value_start : value_start + n_values]
            seg_lengths = lengths[feature * stride : (feature + n_feat) * stride]
            seg_weights = weights[value_start : value_start + n_values] if weights is not None else None
            per_feature = torch.tensor(length_per_key[feature : feature + n_feat], device=values.device)
            if kind == "group":
                group: CafeGroupRemap = self.groups[what]
                table_slots = torch.tensor(slots, device=values.device).repeat_interleave(per_feature)
                keys = group.keys(seg_values, table_slots)
                seg_values, seg_lengths, seg_weights = _expand_medium(group, keys, seg_lengths, seg_weights, training)
                width = group.layout.dim * n_feat
                if training:
                    batches.append(_GroupBatch(what, keys, lengths[feature * stride : (feature + n_feat) * stride],
                                               weights[value_start : value_start + n_values] if weights is not None else None,
                                               n_feat, (column, column + width)))
                column += width
            else:
                seg_values = torch.remainder(seg_values, what)
            out_values.append(seg_values)
            out_lengths.append(seg_lengths)
            if seg_weights is not None:
                out_weights.append(seg_weights)
            feature += n_feat
            value_start += n_values
        inner = KeyedJaggedTensor(
            keys=self._inner_features,
            values=torch.cat(out_values) if out_values else values,
            lengths=torch.cat(out_lengths) if out_lengths else lengths,
            weights=torch.cat(out_weights) if out_weights else None,
            stride=stride,
        )
        return inner, batches

    def _to_output(self, values: torch.Tensor, features: KeyedJaggedTensor) -> KeyedTensor:
        if self._output_columns is not None:
            values = values.index_select(1, self._output_columns.to(values.device))
        if self._mean_features:
            values = _divide_mean(values, features, self._feature_names, self._dims, self._mean_features)
        return KeyedTensor(keys=self._feature_names, length_per_key=self._dims, values=values)

    # ---- backward: importance, then migration after the optimizer update
    def _backward_hook(self, batches: List[_GroupBatch]):
        def hook(grad: torch.Tensor) -> None:
            results = []
            for b in batches:
                group: CafeGroupRemap = self.groups[b.group]
                scores = occurrence_scores(grad[:, b.columns[0] : b.columns[1]], b.lengths, b.num_features,
                                           b.weights, group.layout.config.importance)
                results.append((group, group.record(b.keys, scores)))
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._migrate(results))

        return hook

    def _migrate(self, results) -> None:
        for group, result in results:
            if result.promoted_keys.numel() == 0:
                continue
            keys = result.promoted_keys.to(group.sketch.slots.device)
            src2 = group.hashed_rows(keys, 2) if group.layout.config.multi_level else None
            copy_rows(row_store(self.physical, group.layout.name), result.promoted_rows.to(keys.device),
                      group.hashed_rows(keys, 1), src2)

    def _check_in_backward_optimizers(self) -> None:
        for g in self.plan.groups:
            if not has_in_backward_optimizer(self.physical, g.name):
                raise ValueError(
                    f"CAFE table {g.name!r} is trained without an in-backward optimizer: migrations must run "
                    "after the update. Shard with DistributedModelParallel (fused TBE), or call "
                    "torch.distributed.optim._apply_optimizer_in_backward(SGD | Adagrad | RowWiseAdagrad, "
                    "ebc.parameters(), {...}) before training; for inference use eval() or no_grad()."
                )

    # ---- introspection
    def stats(self) -> Dict[str, Dict[str, object]]:
        """Per group and table: hot rows used/free, migrations since the last call, hot share, bytes."""
        out: Dict[str, Dict[str, object]] = {}
        for g in self.plan.groups:
            remap: CafeGroupRemap = self.groups[g.name]
            counters = {k: v.tolist() for k, v in remap.take_stats().items()}
            used = remap.sketch.hot_rows_used()
            lookups = sum(counters["lookups"])
            out[g.name] = {
                "hot_rows_used": used,
                "hot_rows_free": g.hot_rows - used,
                "promotions": sum(counters["promotions"]),
                "demotions": sum(counters["demotions"]),
                "hot_lookup_share": sum(counters["hot_lookups"]) / lookups if lookups else 0.0,
                "bytes": {"weights": g.weight_bytes(), "sketch": g.sketch_bytes()},
                "tables": {
                    t.name: {
                        "logical_rows": t.logical_rows, "level1_rows": t.level1_rows, "level2_rows": t.level2_rows,
                        "lookups": counters["lookups"][i],
                        "hot_lookup_share": counters["hot_lookups"][i] / max(counters["lookups"][i], 1),
                        "medium_lookup_share": counters["medium_lookups"][i] / max(counters["lookups"][i], 1),
                        "promotions": counters["promotions"][i], "demotions": counters["demotions"][i],
                    }
                    for i, t in enumerate(g.tables)
                },
            }
        for p in self.plan.plain:
            c = p.config
            out[c.name] = {"uncompressed": True, "bytes": {"weights": c.num_embeddings * c.embedding_dim * 4, "sketch": 0}}
        return out

    def memory(self) -> Dict[str, float]:
        """Logical and physical bytes and the compression ratio (weights + sketch, as the paper)."""
        logical = sum(t.num_embeddings * t.embedding_dim * 4 for t in self._tables)
        weights = sum(g.weight_bytes() for g in self.plan.groups) + sum(
            p.config.num_embeddings * p.config.embedding_dim * 4 for p in self.plan.plain)
        sketch = sum(g.sketch_bytes() for g in self.plan.groups)
        return {"logical_bytes": logical, "weight_bytes": weights, "sketch_bytes": sketch,
                "compression_ratio": logical / (weights + sketch)}

    def describe(self) -> str:
        """What the module chose, one line per group and plain table."""
        lines = []
        for g in self.plan.groups:
            cfg = g.config
            lines.append(f"group {g.name}: dim {g.dim}, {g.physical_rows:,} rows ({g.hot_rows:,} hot), "
                         f"threshold {cfg.threshold:g}, hot share {cfg.hot_share:.2f}, "
                         f"{'multi-level' if cfg.multi_level else 'single-level'}, tables "
                         + ", ".join(f"{t.name} {t.logical_rows:,}->{t.hashed_rows:,}" for t in g.tables))
        for p in self.plan.plain:
            lines.append(f"table {p.config.name}: uncompressed ({p.config.num_embeddings:,} rows)")
        m = self.memory()
        lines.append(f"compression ratio {m['compression_ratio']:.1f}x "
                     f"({m['logical_bytes']:,} -> {m['weight_bytes'] + m['sketch_bytes']:,} bytes)")
        return "\n".join(lines)


def _expand_medium(group: CafeGroupRemap, keys: torch.Tensor, lengths: torch.Tensor,
                   weights: Optional[torch.Tensor], training: bool):
    """Rows for one group's occurrences; a medium occurrence contributes two rows to its bag."""
    lookup = group.lookup(keys, count=training)
    if not group.layout.config.multi_level or not bool(lookup.medium.any()):
        return lookup.primary, lengths, weights
    counts = 1 + lookup.medium.long()
    values = lookup.primary.repeat_interleave(counts)
    second = torch.cumsum(counts, 0)[lookup.medium] - 1
    values[second] = lookup.level2[lookup.medium]
    bag = torch.arange(lengths.numel(), device=keys.device).repeat_interleave(lengths)
    lengths = lengths + torch.zeros_like(lengths).index_add_(0, bag, lookup.medium.to(lengths.dtype))
    if weights is not None:
        weights = weights.repeat_interleave(counts)
    return values, lengths, weights


def _divide_mean(values: torch.Tensor, features: KeyedJaggedTensor, names: List[str], dims: List[int],
                 mean_features: List[int]) -> torch.Tensor:
    """MEAN pooling: the physical tables pool with SUM; divide by the original bag lengths."""
    stride = features.stride()
    lengths = features.lengths().view(-1, stride)  # [F, B] in the (permuted) feature order
    order = features.keys()
    scale = torch.ones_like(values)
    starts = [sum(dims[:i]) for i in range(len(dims))]
    for i in mean_features:
        bag = lengths[order.index(names[i])].clamp(min=1).to(values.dtype)
        scale[:, starts[i] : starts[i] + dims[i]] = (1.0 / bag)[:, None]
    return values * scale


def _check_weighted_mean(tables: List[EmbeddingBagConfig], is_weighted: bool) -> None:
    if is_weighted:
        for t in tables:
            if t.pooling == PoolingType.MEAN:
                raise ValueError(f"table {t.name!r}: MEAN pooling with per-sample weights is not supported")


__all__ = ["CafeEmbeddingBagCollection", "SLOT_MASK"]
