"""One CAFE group on one shard: raw ids -> keys -> physical rows, and the sketch behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn

from cafe_torchrec.hashing import mix64, mix64_int
from cafe_torchrec.layout import GroupLayout
from cafe_torchrec.sketch import HotSketch, InsertResult

SLOT_BITS = 15
SLOT_MASK = (1 << SLOT_BITS) - 1
_LEVEL1_SEED, _LEVEL2_SEED, _SKETCH_SEED = 101, 202, 303


@dataclass
class GroupLookup:
    """Rows for a batch of keys [N]: primary (hot row, else level-1 row), level-2 row, masks."""

    primary: torch.Tensor  # [N] int64
    level2: torch.Tensor  # [N] int64, meaningful where medium
    hot: torch.Tensor  # [N] bool
    medium: torch.Tensor  # [N] bool


class CafeGroupRemap(nn.Module):
    """Keys, rows and the HotSketch of one group (one physical table, or one row-wise block).

    A key is ((mix64(id, salt_t) >> 15) << 15) | t for the group's table slot t: 48 hash bits
    and the table in the low bits, so any key names its table and its hashed rows, and one
    sketch can serve every table of the group. The high bits are uniform, so ranges of keys
    spread evenly over ranks for row-wise sharding.
    """

    def __init__(self, layout: GroupLayout, device: torch.device, kernel: str = "auto") -> None:
        super().__init__()
        self.layout = layout
        cfg = layout.config
        self.sketch = HotSketch(
            hot_capacity=layout.hot_rows,
            threshold=cfg.threshold,
            num_buckets=max(1, layout.hot_rows),
            slots_per_bucket=cfg.slots_per_bucket,
            medium_threshold=cfg.threshold * cfg.medium_share if cfg.multi_level else None,
            decay=cfg.decay,
            decay_trigger=cfg.decay_trigger,
            seed=mix64_int(_SKETCH_SEED, cfg.seed),
            device=device,
            kernel=kernel,
        )
        offsets = layout.region_offsets()
        table_info = torch.tensor(
            [[mix64_int(i, cfg.seed), o1, t.level1_rows, o2, max(t.level2_rows, 1)]
             for i, (t, (o1, o2)) in enumerate(zip(layout.tables, offsets))],
            dtype=torch.int64,
        )
        # columns: salt, level-1 offset, level-1 rows, level-2 offset, level-2 rows
        self.register_buffer("table_info", table_info.to(device if device.type != "meta" else "cpu"), persistent=False)
        self.register_buffer("layout_signature", self._signature().to(device), persistent=True)
        n = len(layout.tables)
        for name in ("lookups", "hot_lookups", "medium_lookups", "promotions", "demotions"):
            self.register_buffer(f"stat_{name}", torch.zeros(n, dtype=torch.int64, device=device), persistent=False)

    def _signature(self) -> torch.Tensor:
        """Layout as numbers: a checkpoint of another layout is refused on load."""
        cfg = self.layout.config
        nums = [self.layout.hot_rows, self.layout.dim, cfg.slots_per_bucket, cfg.seed, int(cfg.multi_level)]
        for t in self.layout.tables:
            nums += [t.logical_rows, t.level1_rows, t.level2_rows]
        return torch.tensor(nums, dtype=torch.int64)

    def _info(self) -> torch.Tensor:
        if self.table_info.device != self.sketch.slots.device and self.sketch.slots.device.type != "meta":
            self.table_info = self.table_info.to(self.sketch.slots.device)
        return self.table_info

    def keys(self, ids: torch.Tensor, table_slots: torch.Tensor) -> torch.Tensor:
        """Keys of raw int64 ids; table_slots [N] gives each id's table slot in the group."""
        salts = self._info()[:, 0][table_slots]
        return ((mix64(ids, salts) >> SLOT_BITS) << SLOT_BITS) | table_slots

    def hashed_rows(self, keys: torch.Tensor, level: int) -> torch.Tensor:
        """Level-1 or level-2 physical row of each key."""
        info = self._info()[keys & SLOT_MASK]
        offset, rows = (info[:, 1], info[:, 2]) if level == 1 else (info[:, 3], info[:, 4])
        seed = _LEVEL1_SEED if level == 1 else _LEVEL2_SEED
        return offset + torch.remainder(mix64(keys, seed), rows)

    def lookup(self, keys: torch.Tensor, count: bool) -> GroupLookup:
        """Rows of each key; counts lookups per table for stats() when `count` (training)."""
        hot_row, medium = self.sketch.query(keys)
        hot = hot_row >= 0
        primary = torch.where(hot, hot_row, self.hashed_rows(keys, 1))
        level2 = self.hashed_rows(keys, 2) if self.layout.config.multi_level else primary
        if count:
            slots = keys & SLOT_MASK
            n = len(self.layout.tables)
            self.stat_lookups += torch.bincount(slots, minlength=n)
            self.stat_hot_lookups += torch.bincount(slots[hot], minlength=n)
            self.stat_medium_lookups += torch.bincount(slots[medium], minlength=n)
        return GroupLookup(primary, level2, hot, medium)

    def record(self, keys: torch.Tensor, scores: torch.Tensor) -> InsertResult:
        """Insert importance scores; count promotions and demotions per table."""
        result = self.sketch.insert(keys, scores)
        n = len(self.layout.tables)
        self.stat_promotions += torch.bincount(result.promoted_keys & SLOT_MASK, minlength=n).to(self.stat_promotions.device)
        self.stat_demotions += torch.bincount(result.demoted_keys & SLOT_MASK, minlength=n).to(self.stat_demotions.device)
        return result

    def take_stats(self) -> Dict[str, torch.Tensor]:
        """Per-table counters since the last call, then reset them."""
        out = {}
        for name in ("lookups", "hot_lookups", "medium_lookups", "promotions", "demotions"):
            buf = getattr(self, f"stat_{name}")
            out[name] = buf.clone()
            buf.zero_()
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:  # type: ignore[override]
        sig = state_dict.get(prefix + "layout_signature")
        if sig is not None and not torch.equal(sig.cpu(), self._signature()):
            raise ValueError(f"checkpoint for CAFE group {self.layout.name!r} has another layout "
                             f"(saved {sig.tolist()}, this module {self._signature().tolist()}); "
                             "it was saved from a different config")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
