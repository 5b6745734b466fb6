"""CafeEmbeddingBagCollection: a drop-in EmbeddingBagCollection with CAFE compression."""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple, TypeGuard, Union, cast

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.sparse.tensor_dict import maybe_td_to_kjt

from cafe_torchrec.backward import importance_hook
from cafe_torchrec.collection import ConfiguredCollection
from cafe_torchrec.config import CafeConfig, config_per_table
from cafe_torchrec.feature_map import FeatureMap
from cafe_torchrec.hashing import make_keys
from cafe_torchrec.layout import CafePlan, plan_tables
from cafe_torchrec.migration import require_in_backward_optimizer
from cafe_torchrec.remap import CafeGroupRemap, GroupBatch, group_remaps, remap_kjt
from cafe_torchrec.stats import CollectionReport
from cafe_torchrec.validation import checked_input

logger = logging.getLogger(__name__)

# torch.fx keeps these as single calls: they read tensor values (checks, sketch lookups)
torch.fx.wrap("checked_input")


@torch.fx.wrap
def _check_weight_dtype(features: KeyedJaggedTensor, physical: nn.Module) -> None:
    """ValueError unless per-sample weights have every physical table's dtype (read now: a
    module-wide cast changes it). The unsharded inner collection hands them to each table's
    embedding_bag, which needs its own dtype (the stock collection raises there too), and would
    raise only after the remap counted the batch; sharded, the TBE takes any floating dtype."""
    weights = features.weights_or_none()
    if weights is None:
        return
    bags = cast(EmbeddingBagCollection, physical).embedding_bags
    table_dtypes = {name: bag.weight.dtype for name, bag in bags.items()}
    other = sorted(name for name, dtype in table_dtypes.items() if dtype != weights.dtype)
    if other:
        held = sorted({str(table_dtypes[name]).replace("torch.", "") for name in other})
        raise ValueError(
            f"per-sample weights are {str(weights.dtype).replace('torch.', '')} but tables {other} hold "
            f"{', '.join(held)}: the unsharded collection (as the stock one) needs weights of its tables' dtype"
        )


@torch.fx.wrap
def _physical_input(
    features: KeyedJaggedTensor, feature_map: FeatureMap, groups: nn.ModuleDict, training: bool
) -> Tuple[KeyedJaggedTensor, List[GroupBatch]]:
    """The inner collection's input (ids -> keys -> rows) of a checked KJT and, when training,
    what backward needs."""
    return remap_kjt(feature_map.prepare(features), feature_map, group_remaps(groups), {}, training)


class CafeEmbeddingBagCollection(CollectionReport, ConfiguredCollection):
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

    kernel: how the id work runs (pre-hash, sketch lookup and insert, importance), decided once
    for the device: "auto" (default; the C++ ops on CPU when they load, else their torch-ops
    twins; the CAFE_KERNEL environment variable can set it), "cpp" (an error where the C++ ops
    cannot run) or "torch".
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        cafe: Union[CafeConfig, Dict[str, CafeConfig]] = CafeConfig(),
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        kernel: str = "auto",
    ) -> None:
        super().__init__(tables, is_weighted, device)
        device = self._device
        configs = config_per_table(cafe, [t.name for t in tables])
        self.plan: CafePlan = plan_tables(self._tables, configs)
        self.physical = EmbeddingBagCollection(self.plan.physical_configs(), is_weighted=is_weighted, device=device)
        self.groups = nn.ModuleDict({g.name: CafeGroupRemap(g, device, kernel) for g in self.plan.groups})
        self.feature_map = FeatureMap(self._tables, self.plan, kernel)
        self.register_load_state_dict_pre_hook(refuse_foreign_state)
        for g in self.plan.groups:
            if g.hot_rows == 0:
                logger.warning(
                    "CAFE group %r: its budget (%d bytes, the hashing trick's at these compression ratios) holds "
                    "no hot row beside its hashed rows, so it keeps hashing's %d rows and runs as the hashing "
                    "trick; a lower compression_ratio gives it hot rows",
                    g.name,
                    g.budget_bytes(),
                    g.physical_rows,
                )

    # ---- forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if not isinstance(self.physical, EmbeddingBagCollection):
            raise ValueError(
                "the CAFE collection's inner tables were sharded by another sharder "
                f"({type(self.physical).__name__}): shard it with "
                "cafe_torchrec.distributed.CafeEmbeddingBagCollectionSharder (pass it to DistributedModelParallel's "
                "sharders), which remaps ids on the owning rank and keeps the sketch beside its rows"
            )
        features = checked_input(maybe_td_to_kjt(features, None), self.feature_map.logical, self._is_weighted)
        _check_weight_dtype(features, self.physical)
        training = self.training and torch.is_grad_enabled()
        if training and any(p.requires_grad for p in self.physical.parameters()):
            # before anything (sketch, stats) is touched
            require_in_backward_optimizer(
                self.physical, [g.name for g in self.plan.groups], "CAFE table", "migrations must run"
            )
        inner = _physical_input(features, self.feature_map, self.groups, training)
        values = self.physical(inner[0]).values()
        if training and inner[1] and values.requires_grad:
            values.register_hook(importance_hook(inner[1], group_remaps(self.groups), lambda: self.physical))
        return self.feature_map.output(values, self.feature_map.output.bag_lengths(features))

    def reset_parameters(self) -> None:
        """Every physical table's rows from its init_fn (each table's hashed rows from that table's
        own, as at construction) and every group's sketch, hot rows and counters as constructed.
        For a module built on the meta device, after `to_empty` (TorchRec's `init_parameters` calls
        it); the inner stock collection's own reset skips its tables, as it was built on meta."""
        with torch.no_grad():
            for config in self.plan.physical_configs():
                weight = self.physical.embedding_bags[config.name].weight
                if weight.device.type != "meta" and config.init_fn is not None:
                    config.init_fn(weight)
        for group in group_remaps(self.groups).values():
            group.reset_state()

    # ---- introspection
    def keys(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """The sketch keys of raw ids of a compressed feature (what stats and queries use)."""
        info = self.feature_map.info.get(feature)
        if info is None or info.group is None:
            raise ValueError(f"feature {feature!r} is not in a CAFE group")
        slots = torch.full_like(ids, info.slot)
        return make_keys(ids, slots, self.feature_map.salts[info.group].to(ids.device))

    def plain_rows(self) -> Dict[str, int]:
        return {p.config.name: p.config.num_embeddings for p in self.plan.plain}


def refuse_foreign_state(module: nn.Module, state_dict: Dict[str, object], prefix: str, *_: object) -> None:
    """load_state_dict pre-hook: a state dict with keys under this collection's prefix that are
    not its own (another layout, e.g. a stock EmbeddingBagCollection's) raises ValueError naming
    them, strict or not, instead of loading nothing; keys it simply lacks load as torch does.
    Every group's layout signature is compared here too, before any child loads: a checkpoint
    of another config with the same shapes (another seed) would otherwise have replaced the
    physical tables, loaded first, before the group refused it."""
    for name, remap in group_remaps(cast(nn.ModuleDict, module.groups)).items():
        remap.check_layout(state_dict.get(f"{prefix}groups.{name}.layout_signature"))
    own_state = {prefix + name: value for name, value in module.state_dict(keep_vars=True).items()}
    own = set(own_state)
    unexpected = sorted(k for k in state_dict if k.startswith(prefix) and k not in own)
    if unexpected:
        missing = sorted(own - set(state_dict))
        raise ValueError(
            f"state dict for the CAFE collection at {prefix or 'the root'!r} has another layout: "
            f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}, missing keys "
            f"{missing[:6]}{' ...' if len(missing) > 6 else ''}; a stock EmbeddingBagCollection's state "
            "dict loads with cafe_torchrec.inference.warm_start"
        )
    # plain tables are in no layout signature; torch checks sizes entry by entry, as it loads them
    resized = []
    for k, v in own_state.items():
        saved = state_dict.get(k)
        if _dense(v) and _dense(saved) and saved.shape != v.shape:
            resized.append(f"{k}: {list(saved.shape)} saved, {list(v.shape)} here")
    if resized:
        raise ValueError(
            f"state dict for the CAFE collection at {prefix or 'the root'!r} has tensors of other sizes: "
            f"{'; '.join(resized[:6])}{' ...' if len(resized) > 6 else ''} (another table config)"
        )


def _dense(value: object) -> TypeGuard[torch.Tensor]:
    """A plain tensor or parameter (sharded ones are checked by TorchRec's own loading)."""
    return type(value) in (torch.Tensor, nn.Parameter)
