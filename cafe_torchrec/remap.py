"""Owner-side remap: keys -> physical rows of one group (one physical table or one row-wise
block), with the HotSketch behind it; and the KJT-level remap both collections use."""

from __future__ import annotations

import functools
import zlib
from typing import Dict, List, Optional, Tuple, cast

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec.backward import GroupBatch, wait_for_sketch_update
from cafe_torchrec.config import POLICIES
from cafe_torchrec.feature_map import FeatureMap
from cafe_torchrec.hashing import SKETCH_SEED, SLOT_MASK, hashed_rows, mix64_int
from cafe_torchrec.kjt import concat, table_segments
from cafe_torchrec.layout import GroupLayout
from cafe_torchrec.sketch import HotSketch, InsertResult
from cafe_torchrec.sketch.types import Lookup

# in the layout signature: 1 = buckets and rows by mix64, 2 = by hashing.fold, 3 = sketch slots
# without a hot row carry their Space-Saving error in the row word, 4 = the policy's state,
# 5 = each table's name (its slot, salt and regions follow its place in the group: two tables of
# equal rows listed in another order would otherwise load each other's rows and hot rows), 6 = the
# stale rule's window in the policy's state, 7 = 12-byte sketch slots (key tags), a free-row
# bitmap, reservations, float16 marks and each hot row's table
_FORMAT = 7
LOOKUP_COLUMNS = ("lookups", "hot_lookups", "medium_lookups")  # columns of `lookup_counts`
MIGRATION_COLUMNS = ("promotions", "demotions")  # columns of `migration_counts`
STAT_COLUMNS = LOOKUP_COLUMNS + MIGRATION_COLUMNS


@functools.lru_cache(maxsize=4096)
def group_state_bytes(layout: GroupLayout) -> int:
    """Bytes of every buffer a CafeGroupRemap of this (block) layout holds, sketch included."""
    remap = CafeGroupRemap(layout, torch.device("meta"))
    derived = (remap.regions, remap.lookup_counts, remap.migration_counts)  # plain attributes, not buffers
    return sum(t.numel() * t.element_size() for t in (*remap.buffers(), *derived))


def layout_signature(layout: GroupLayout) -> torch.Tensor:
    """A group's layout as numbers: a checkpoint of another layout is refused on load."""
    cfg = layout.config
    nums = [
        _FORMAT,
        layout.hot_rows,
        layout.sketch_buckets,
        layout.dim,
        cfg.slots_per_bucket,
        cfg.seed,
        int(cfg.multi_level),
        POLICIES.index(cfg.policy),
    ]
    for t in layout.tables:
        nums += [t.logical_rows, t.level1_rows, t.level2_rows, zlib.crc32(t.name.encode())]
    return torch.tensor(nums, dtype=torch.int64)


def check_layout(layout: GroupLayout, saved: object) -> None:
    """ValueError if a checkpoint's layout signature (None: absent) is not `layout`'s."""
    mine = layout_signature(layout)
    if isinstance(saved, torch.Tensor) and not torch.equal(saved.cpu(), mine):
        raise ValueError(
            f"checkpoint for CAFE group {layout.name!r} has another layout: {_signature_difference(saved, mine)}; "
            "it was saved from a different config, world size or version"
        )


_SIGNATURE_FIELDS = ("format", "hot rows", "sketch buckets", "dim", "slots_per_bucket", "seed", "multi_level", "policy")
_TABLE_FIELDS = ("logical rows", "level-1 rows", "level-2 rows", "name")


def _signature_difference(saved: torch.Tensor, mine: torch.Tensor) -> str:
    """What differs between two layout signatures, by name (saved, then this module's)."""
    a, b = saved.tolist(), mine.tolist()
    if a[:1] != b[:1]:  # another format lays its numbers out otherwise
        return f"format {a[0] if a else None} saved, {b[0]} here"
    if len(a) != len(b):
        n = len(_SIGNATURE_FIELDS)
        return f"{(len(a) - n) // len(_TABLE_FIELDS)} tables saved, {(len(b) - n) // len(_TABLE_FIELDS)} here"
    names = list(_SIGNATURE_FIELDS)
    for i in range((len(b) - len(names)) // len(_TABLE_FIELDS)):
        names += [f"table {i} {field}" for field in _TABLE_FIELDS]
    return ", ".join(f"{name} {x} saved, {y} here" for name, x, y in zip(names, a, b) if x != y)


class CafeGroupRemap(nn.Module):
    """Rows and HotSketch of one group on one shard; `layout` is this shard's block layout.

    Rows are local to the block: [hot rows | table 0 level-1 | table 0 level-2 | ...].
    `kernel` ('auto', 'cpp', 'torch') is the group's kernel choice, resolved once by its sketch
    for the device it lives on; lookup, insert and importance scoring all follow it.
    """

    # buffers (registered in __init__)
    layout_signature: torch.Tensor
    row_tables: torch.Tensor

    def __init__(self, layout: GroupLayout, device: torch.device, kernel: str = "auto") -> None:
        super().__init__()
        self.layout = layout
        cfg = layout.config
        adaptive = cfg.adaptive_policy()
        paper_medium = (
            cfg.threshold * cfg.medium_share
            if cfg.multi_level and adaptive is None and cfg.threshold is not None
            else None
        )
        self.sketch = HotSketch(
            hot_capacity=layout.hot_rows,
            threshold=cfg.threshold,
            num_buckets=layout.sketch_buckets,
            slots_per_bucket=cfg.slots_per_bucket,
            medium_threshold=paper_medium,
            decay=cfg.decay if cfg.decay is not None else 0.98,
            decay_trigger=cfg.decay_trigger if cfg.decay_trigger is not None else 10.0,
            seed=mix64_int(SKETCH_SEED, cfg.seed),
            device=device,
            kernel=kernel,
            adaptive=adaptive,
        )
        regions = torch.tensor(
            [
                [o1, t.level1_rows, o2, max(t.level2_rows, 1)]
                for t, (o1, o2) in zip(layout.tables, layout.region_offsets())
            ],
            dtype=torch.int64,
        )  # per table slot: level-1 offset, level-1 rows, level-2 offset, level-2 rows
        # Derived from the layout, and counters that are never checkpointed: plain attributes, not
        # buffers, so that materialising a meta module (to_empty: uninitialised memory) or a dtype
        # cast cannot touch them; they follow the keys' device (_on).
        self.regions = regions.to("cpu" if device.type == "meta" else device)
        tables = len(layout.tables)
        self.lookup_counts = torch.zeros(tables, len(LOOKUP_COLUMNS), dtype=torch.int64, device=self.regions.device)
        self.migration_counts = torch.zeros(
            tables, len(MIGRATION_COLUMNS), dtype=torch.int64, device=self.regions.device
        )
        self.register_buffer("layout_signature", layout_signature(layout).to(device), persistent=True)
        self._check_layout_at_lookup = False
        # the table slot of each hot row's owner, so that a demotion (which frees a row: a sketch
        # slot holds a tag, not the key naming the table) is counted for its table; none with one table
        self.register_buffer(
            "row_tables",
            torch.zeros(layout.hot_rows if tables > 1 else 0, dtype=torch.int16, device=device),
            persistent=True,
        )

    @property
    def kernel(self) -> str:
        """'cpp' or 'torch': the kernel the group runs (its sketch's, for its device)."""
        return self.sketch.kernel

    def _on(self, device: torch.device) -> torch.Tensor:
        """The regions on `device`, the counters moved along with them."""
        if self.regions.device != device:
            self.regions = self.regions.to(device)
            self.lookup_counts = self.lookup_counts.to(device)
            self.migration_counts = self.migration_counts.to(device)
        return self.regions

    def hashed_rows(self, keys: torch.Tensor, level: int) -> torch.Tensor:
        """Level-1 or level-2 row of each key in this block."""
        return hashed_rows(keys, self._on(keys.device), level)

    def lookup(self, keys: torch.Tensor, count: bool) -> Lookup:
        """Rows of each key (the sketch's fused lookup); counts lookups per table for stats()
        when `count` (training)."""
        wait_for_sketch_update(self)
        if self._check_layout_at_lookup:
            self.check_layout(self.layout_signature)
            self._check_layout_at_lookup = False
        regions = self._on(keys.device)
        return self.sketch.lookup(keys, regions, self.lookup_counts if count else None)

    def reset_state(self) -> None:
        """The constructor's state: an empty sketch, every hot row free, counters at zero, the
        layout's signature."""
        wait_for_sketch_update(self)
        self.sketch.reset_state()
        with torch.no_grad():
            self.layout_signature.copy_(layout_signature(self.layout))
            self.row_tables.zero_()
        self.lookup_counts.zero_()
        self.migration_counts.zero_()

    def record(self, keys: torch.Tensor, scores: torch.Tensor, hints: Optional[torch.Tensor] = None) -> InsertResult:
        """Insert importance scores; count promotions and demotions per table."""
        result = self.sketch.insert(keys, scores, hints)
        n, counts, owners = len(self.layout.tables), self.migration_counts, self.row_tables
        promoted = result.promoted_keys & SLOT_MASK
        demoted_rows = result.demoted_rows.to(owners.device)
        if owners.numel():  # the demotions of a call come before its promotions, which may take the same rows
            demoted = owners[demoted_rows].long()
            owners[result.promoted_rows.to(owners.device)] = promoted.to(owners.device, torch.int16)
        else:  # one table: every row is its
            demoted = torch.zeros_like(demoted_rows)
        counts[:, 0] += torch.bincount(promoted, minlength=n).to(counts.device)
        counts[:, 1] += torch.bincount(demoted, minlength=n).to(counts.device)
        return result

    def counters(self) -> List[Dict[str, int]]:
        """Per table slot, the monotonic counters (STAT_COLUMNS) since construction: reading
        does not reset them (stats.stats_interval gives per-interval figures)."""
        wait_for_sketch_update(self)
        rows = torch.cat([self.lookup_counts, self.migration_counts], dim=1).tolist()
        return [dict(zip(STAT_COLUMNS, row)) for row in rows]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        wait_for_sketch_update(self)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # the state dict holds the buffers themselves: a dcp.load without load_state_dict writes
        # them in place, unchecked; the next lookup checks the layout signature it left
        self._check_layout_at_lookup = True

    def check_layout(self, saved: object) -> None:
        """ValueError if a checkpoint's layout signature (None: absent) is not this group's."""
        check_layout(self.layout, saved)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        wait_for_sketch_update(self)
        self.check_layout(state_dict.get(prefix + "layout_signature"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


def group_remaps(groups: nn.ModuleDict) -> Dict[str, CafeGroupRemap]:
    """A collection's `groups` (a ModuleDict of CafeGroupRemap) as the dict the remap and the
    backward hook take."""
    return {name: cast(CafeGroupRemap, group) for name, group in groups.items()}


def remap_kjt(
    kjt: KeyedJaggedTensor,
    feature_map: FeatureMap,
    groups: Dict[str, CafeGroupRemap],
    plain_offsets: Dict[str, int],
    training: bool,
) -> Tuple[KeyedJaggedTensor, List[GroupBatch]]:
    """Prepared ids (keys / id mod rows) of a KJT -> local physical rows; medium keys give two
    rows to their bag. Returns the remapped KJT and, when training, what backward needs.
    `plain_offsets[table]` is the first row a row-wise shard of a plain table holds."""
    info = feature_map.info
    out_values: List[torch.Tensor] = []
    out_lengths: List[torch.Tensor] = []
    out_weights: List[torch.Tensor] = []
    batches: List[GroupBatch] = []
    column = 0
    for seg in table_segments(kjt, feature_map.table_of):
        if info[seg.features[0]].group is None:
            out_values.append(seg.values - plain_offsets.get(seg.table, 0))
            out_lengths.append(seg.lengths)
            if seg.weights is not None:
                out_weights.append(seg.weights)
        else:
            group = groups[seg.table]
            rows, new_lengths, new_weights, hints = _rows_with_medium(
                group, seg.values, seg.lengths, seg.weights, training
            )
            out_values.append(rows)
            out_lengths.append(new_lengths)
            if new_weights is not None:
                out_weights.append(new_weights)
            if training:
                batches.append(
                    GroupBatch(
                        seg.table,
                        seg.values,
                        seg.lengths,
                        seg.weights,
                        len(seg.features),
                        (column, column + group.layout.dim * len(seg.features)),
                        hints,
                    )
                )
        column += sum(info[f].dim for f in seg.features)
    weights = kjt.weights_or_none()
    remapped = KeyedJaggedTensor(
        keys=kjt.keys(),
        values=concat(out_values, kjt.values()),
        lengths=concat(out_lengths, kjt.lengths()),
        weights=concat(out_weights, weights) if weights is not None else None,
        stride=kjt.stride(),
    )
    return remapped, batches


def _rows_with_medium(
    group: CafeGroupRemap, keys: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor], training: bool
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Rows for one group's occurrences; a medium occurrence contributes two rows to its bag.
    Returns rows, bag lengths, weights and the lookup's slot hints."""
    lookup = group.lookup(keys, count=training)
    if not group.layout.config.multi_level or not bool(lookup.medium.any()):
        return lookup.primary, lengths, weights, lookup.hints
    counts = 1 + lookup.medium.long()
    values = lookup.primary.repeat_interleave(counts)
    values[torch.cumsum(counts, 0)[lookup.medium] - 1] = lookup.level2[lookup.medium]
    bag = torch.arange(lengths.numel(), device=keys.device).repeat_interleave(lengths)
    lengths = lengths + torch.zeros_like(lengths).index_add_(0, bag, lookup.medium.to(lengths.dtype))
    if weights is not None:
        weights = weights.repeat_interleave(counts)
    return values, lengths, weights, lookup.hints
