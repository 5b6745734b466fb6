"""FrozenCafeEmbeddingBagCollection: a trained CAFE collection as a compact inference module.

What the training module's eval forward computes from its sketches is frozen into tensors:
the sketch slots that held a hot row (with the row) or a medium key (multi-level) go into a
static open-addressing table, FBGEMM's pruned hash map, keyed as the sketch knows a key: by its
bucket (counted across the group's row-wise blocks) and its 32-bit tag (one region per CAFE
group); every block's bucket hash into a table, and its hashed regions into a table of
regions. The forward is pure tensor work: ids -> keys (the pre-hash), each key's
bucket and tag, one hash-map probe per key, the hashed row of the others (in the block TorchRec's block bucketization
routed the key to during training: key // block size), a plain table's first row + id mod
its rows, and
one lookup in TorchRec's quantized collection (FBGEMM's IntNBit TBE) over the physical
tables in FP32, FP16, INT8 or INT4. No sketch, no optimizer state. On CPU the id work (the
checks on the lengths, feature permute, pre-hash, probe, routing, rows, the inner KJT's
lengths) is one C++ op, `torch.ops.cafe.serving_rows`, reading the same tensors; its twin in
torch ops runs without the C++ build, or when chosen (cafe_torchrec.ops.resolve_kernel). It
serves on CPU: the quantized tables stay where TorchRec built them, so Module.to another device
is refused (a graph fx traced from it is not guarded that way: keep it on CPU too).

It runs eagerly, under torch.fx (TorchRec's tracer or torch's), TorchScript (of the fx
graph, as TorchRec's own quantized collection) and torch.export: the Python-level steps
(input checks, VBE expansion, the feature permute, building the inner KJT) are fx-wrapped,
scriptable calls, and the rest has no data-dependent shapes. A medium key reads two rows; so
that every id reads the same number, a collection with a multi-level group gives every id a
second row, the level-2 row of a medium key or an all-zero row appended to each physical
table (zero in every dtype), right after its first row as in training, so FP32 outputs
equal the training module's bit for bit.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import rounded_row_size_in_bytes
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType, data_type_to_sparse_type
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from cafe_torchrec._torchrec_compat import add_meta_kernel
from cafe_torchrec.hashing import _GOLDEN, _M1, _M2, _POSITIVE, LEVEL_MULTIPLIERS, SLOT_BITS
from cafe_torchrec.kjt import has_variable_batch
from cafe_torchrec.ops import resolve_kernel
from cafe_torchrec.output import mean_divided
from cafe_torchrec.validation import checked_input

ABSENT = -1  # what the hash map says for a key it does not hold
MEDIUM = -2  # the hash map's value for a medium key (multi-level: level-1 and level-2 rows)
KEY_BITS = _POSITIVE & ~((1 << SLOT_BITS) - 1)  # a key's 48 hash bits: (mix64 >> 15) << 15


@torch.fx.wrap
def serving_input(
    features: KeyedJaggedTensor, logical: List[str], inner: List[str], weighted: bool
) -> KeyedJaggedTensor:
    """A checked input KJT (ValueError naming the feature), VBE expanded to its output batch,
    with its keys in the physical tables' feature order."""
    features = checked_input(features, logical, weighted)
    keys = features.keys()
    order = [keys.index(f) for f in inner]
    if order == list(range(len(inner))):
        return features
    return features.permute(order)


@torch.fx.wrap
def physical_input(
    keys: List[str], rows: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor], stride: int
) -> KeyedJaggedTensor:
    """The quantized collection's input: physical rows per inner feature."""
    return KeyedJaggedTensor(keys=keys, values=rows, lengths=lengths, weights=weights, stride=stride)


@torch.fx.wrap
def serving_weights(features: KeyedJaggedTensor, weighted: bool, rows_per_id: int) -> Optional[torch.Tensor]:
    """The per-sample weights for FBGEMM's quantized lookup, which takes float32 ones only; a
    weighted FP16 table's come as float16 (the stock collection requires its table's dtype) and
    widen exactly. Each repeated `rows_per_id` times (2: a multi-level id reads two rows). None
    when the collection is not weighted (stock ignores them then). One wrapped call: torch.fx
    cannot branch on whether a traced value is None."""
    weights = features.weights_or_none()
    if not weighted or weights is None:
        return None
    weights = weights.to(torch.float32)
    return weights if rows_per_id == 1 else weights.repeat_interleave(rows_per_id)


@torch.fx.wrap
def fused_physical_input(
    features: KeyedJaggedTensor,
    logical: List[str],
    inner: List[str],
    weighted: bool,
    multi_level: bool,
    multipliers: Tuple[int, int, int],
    order: torch.Tensor,
    feature_info: torch.Tensor,
    group_bounds: torch.Tensor,
    hash_table: torch.Tensor,
    hash_offsets: torch.Tensor,
    regions: torch.Tensor,
    bucket_hashes: torch.Tensor,
) -> KeyedJaggedTensor:
    """The quantized collection's input from one C++ op (cafe::serving_rows, the twin of the
    torch ops of FrozenCafeEmbeddingBagCollection.physical_input). A KJT with the module's keys
    in config order and one batch size goes straight to the op, which checks its dtypes, weights
    and lengths (ValueError naming the feature) in its pass over them; any other is checked and
    VBE expanded by checked_input first, and `order` (inner feature -> input feature) looked up.
    multipliers: the key bits and the level-1 and level-2 row multipliers."""
    if features.keys() != logical or has_variable_batch(features):
        features = checked_input(features, logical, weighted)
        keys = features.keys()
        order = torch.tensor([keys.index(f) for f in inner], dtype=torch.int64)
    rows, lengths, weights = torch.ops.cafe.serving_rows(
        features.values(),
        features.lengths_or_none(),
        features.offsets_or_none(),
        serving_weights(features, weighted, 1),
        weighted,
        order,
        feature_info,
        group_bounds,
        hash_table,
        hash_offsets,
        regions,
        bucket_hashes,
        multipliers[0],
        multipliers[1],
        multipliers[2],
        multi_level,
        inner,
    )
    return KeyedJaggedTensor(
        keys=inner,
        values=rows,
        lengths=lengths,
        weights=weights if weighted else None,
        stride=features.stride(),
    )


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical shift right of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def serving_keys(
    ids: torch.Tensor, salt_offsets: torch.Tensor, slots: torch.Tensor, m1: int, m2: int, key_bits: int
) -> torch.Tensor:
    """hashing.make_keys in a form TorchScript compiles: ((mix64(id, salt) >> 15) << 15) | slot,
    with salt_offsets = salt * golden + golden (mix64's first step) per id."""
    z = ids + salt_offsets
    z = (z ^ _shift_right(z, 30)) * m1
    z = (z ^ _shift_right(z, 27)) * m2
    return ((z ^ _shift_right(z, 31)) & key_bits) | slots


def serving_hashed_rows(keys: torch.Tensor, multiplier: int, offsets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """hashing.hashed_rows with each key's region given: offset + bounded(fold(key, m), rows)."""
    return offsets + ((_shift_right(keys * multiplier, 1) >> 32) * rows >> 31)


def served_keys_of(keys: torch.Tensor, bucket_hashes: torch.Tensor) -> torch.Tensor:
    """The hash map's key for each key: (first bucket + bounded(fold(key, m), buckets)) << 32 |
    tag, with each key's block's bucket hash [multiplier, buckets, first bucket] given
    (types.tags_of: bits 31-62 of the key, 1 where 0)."""
    bucket = bucket_hashes[:, 2] + ((_shift_right(keys * bucket_hashes[:, 0], 1) >> 32) * bucket_hashes[:, 1] >> 31)
    return (bucket << 32) | torch.clamp(keys >> 31, min=1)


def salt_offsets(salts: torch.Tensor) -> torch.Tensor:
    """mix64's first step for each salt: salt * golden + golden (wrapping int64)."""
    return salts * _GOLDEN + _GOLDEN


def _hash_map_lookup_meta(
    indices: torch.Tensor, offsets: torch.Tensor, hash_table: torch.Tensor, hash_table_offsets: torch.Tensor
) -> torch.Tensor:
    return torch.empty_like(indices)


# torch.export traces ops on fake tensors; FBGEMM's CPU build has no fake or meta kernel for
# pruned_hashmap_lookup (its output is shaped like its indices)
_HASH_MAP_META = add_meta_kernel("fbgemm", "pruned_hashmap_lookup", _hash_map_lookup_meta)


# per inner feature, the columns of FrozenCafeEmbeddingBagCollection.feature_info
INFO_COLUMNS = (
    "salt_offset",
    "slot",
    "region",
    "num_tables",
    "block_size",
    "last_block",
    "plain_rows",
    "zero_row",
    "bucket_hash",
)


class FrozenCafeEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """A trained CafeEmbeddingBagCollection for inference (built by `freeze`):
    same KJT in, same KeyedTensor out.

    physical: TorchRec's QuantEmbeddingBagCollection over the physical tables: one table, the
    group's rows then each plain table's, features in config order, where the plan has one
    group and its plain tables match its dim and dtype (freeze.fits_one_table); else one per
    CAFE group and one per plain table, in plan order; with one zero row appended each when a
    group is multi-level. hash_table / hash_offsets: FBGEMM pruned hash map, one region per
    group then an empty one (key: served_keys_of; value: physical row, or MEDIUM).
    bucket_hashes [S, 3]: per group and block its sketch's bucket multiplier, buckets and first
    bucket in the group (row 0 a placeholder for plain features). regions [R, 4]: per group, block
    and table slot the level-1 offset and rows, level-2 offset and rows; per plain table in the
    one table its first row and rows (row 0: [0, 1, 0, 1], for plain tables of their own).
    feature_info [F, len(INFO_COLUMNS)] per inner feature; group_bounds: the inner features
    where each group's run of hash-map lookups ends (a plain feature inside a run skips it).
    kernel: 'auto', 'cpp' or 'torch' (cafe_torchrec.ops.resolve_kernel), resolved here for the
    device of the frozen tensors: the C++ op on CPU where it loads, else its torch-ops twin.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        inner: Sequence[str],
        feature_info: torch.Tensor,
        group_bounds: Sequence[int],
        hash_table: torch.Tensor,
        hash_offsets: torch.Tensor,
        regions: torch.Tensor,
        bucket_hashes: torch.Tensor,
        physical: nn.Module,
        is_weighted: bool,
        multi_level: bool,
        multi_block: bool,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        self._requested_kernel = kernel
        self._kernel = resolve_kernel(kernel, feature_info.device)
        self._tables = list(tables)
        self._is_weighted = is_weighted
        self._multi_level = multi_level
        self._multi_block = multi_block
        self._features: List[str] = [f for t in tables for f in t.feature_names]
        self._inner: List[str] = list(inner)
        self._dims: List[int] = [t.embedding_dim for t in tables for _ in t.feature_names]
        self._has_mean = any(t.pooling == PoolingType.MEAN for t in tables)
        self._has_plain = bool((feature_info[:, INFO_COLUMNS.index("plain_rows")] > 0).any())
        self._multipliers = (_M1, _M2, KEY_BITS, LEVEL_MULTIPLIERS[1], LEVEL_MULTIPLIERS[2])
        self.physical = physical
        self.register_buffer("feature_info", feature_info)
        for i, name in enumerate(INFO_COLUMNS):  # one contiguous column each: gathered per id
            self.register_buffer(name, feature_info[:, i].clone(), persistent=False)
        device = feature_info.device  # the buffers below live with the frozen tensors
        self._group_bounds: List[int] = list(group_bounds)
        self.register_buffer("group_bounds", torch.tensor(self._group_bounds, dtype=torch.int64, device=device))
        self.register_buffer("hash_table", hash_table)
        self.register_buffer("hash_offsets", hash_offsets)
        self.register_buffer("regions", regions)
        self.register_buffer("bucket_hashes", bucket_hashes)
        self._same_dims = len(set(self._dims)) == 1
        self._in_config_order = self._inner == self._features
        dims = dict(zip(self._features, self._dims))
        starts, start = {}, 0
        for f in self._inner:
            starts[f] = start
            start += dims[f]
        self.register_buffer(
            "columns",
            torch.tensor(
                [c for f in self._features for c in range(starts[f], starts[f] + dims[f])],
                dtype=torch.int64,
                device=device,
            ),
        )
        self.register_buffer(
            "config_order",
            torch.tensor([self._inner.index(f) for f in self._features], dtype=torch.int64, device=device),
        )
        self.register_buffer(  # the inverse: where each inner feature is in config order (the C++ op's input order)
            "input_order",
            torch.tensor([self._features.index(f) for f in self._inner], dtype=torch.int64, device=device),
            persistent=False,
        )
        self.register_buffer(
            "column_features",
            torch.tensor([i for i, d in enumerate(self._dims) for _ in range(d)], dtype=torch.int64, device=device),
        )
        self.register_buffer(
            "mean_mask",
            torch.tensor(
                [t.pooling == PoolingType.MEAN for t in self._tables for _ in t.feature_names],
                dtype=torch.bool,
                device=device,
            ),
        )

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        inner = self.physical_input(features)
        values = self.physical(inner).values()
        stride = inner.stride()
        num_features = len(self._inner)
        if not self._in_config_order:
            if self._same_dims:  # whole features move: cheaper than moving columns
                dim = self._dims[0]
                values = values.view(stride, num_features, dim).index_select(1, self.config_order).view(stride, -1)
            else:
                values = values.index_select(1, self.columns)
        if self._has_mean:
            lengths = inner.lengths().view(num_features, stride)
            if self._multi_level:
                lengths = torch.div(lengths, 2, rounding_mode="floor")
            values = mean_divided(
                values, lengths.index_select(0, self.config_order), self.column_features, self.mean_mask
            )
        return KeyedTensor(keys=self._features, length_per_key=self._dims, values=values)

    def physical_input(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The quantized collection's input for a KJT: per inner feature, the physical rows its
        ids read (two per id with a multi-level group)."""
        if self._kernel == "cpp":
            return fused_physical_input(
                features,
                self._features,
                self._inner,
                self._is_weighted,
                self._multi_level,
                self._multipliers[2:],
                self.input_order,
                self.feature_info,
                self.group_bounds,
                self.hash_table,
                self.hash_offsets,
                self.regions,
                self.bucket_hashes,
            )
        features = serving_input(features, self._features, self._inner, self._is_weighted)
        ids = features.values().to(torch.int64)
        lengths = features.lengths().to(torch.int64)
        stride = features.stride()
        num_features = len(self._inner)
        per_feature = lengths.view(num_features, stride).sum(1)
        feature = torch.repeat_interleave(
            torch.arange(num_features, device=ids.device), per_feature, output_size=ids.numel()
        )
        m1, m2, key_bits, level1, level2 = self._multipliers
        keys = serving_keys(
            ids, self.salt_offset.index_select(0, feature), self.slot.index_select(0, feature), m1, m2, key_bits
        )
        offsets = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0))
        region_index = self.region.index_select(0, feature)
        hash_index = self.bucket_hash.index_select(0, feature)
        if self._multi_block:
            block = torch.div(keys, self.block_size.index_select(0, feature), rounding_mode="floor")
            block = torch.minimum(block, self.last_block.index_select(0, feature))
            region_index = region_index + block * self.num_tables.index_select(0, feature)
            hash_index = hash_index + block
        held = torch.ops.fbgemm.pruned_hashmap_lookup(
            served_keys_of(keys, self.bucket_hashes.index_select(0, hash_index)),
            offsets.index_select(0, self.group_bounds * stride),
            self.hash_table,
            self.hash_offsets,
        )
        region = self.regions.index_select(0, region_index)
        rows = torch.where(held >= 0, held, serving_hashed_rows(keys, level1, region[:, 0], region[:, 1]))
        is_plain = torch.zeros_like(rows, dtype=torch.bool)
        if self._has_plain:  # a plain feature's first row (its region's) + id mod its rows
            plain_rows = self.plain_rows.index_select(0, feature)
            is_plain = plain_rows > 0
            rows = torch.where(is_plain, region[:, 0] + torch.remainder(ids, plain_rows.clamp(min=1)), rows)
        weights = serving_weights(features, self._is_weighted, 2 if self._multi_level else 1)
        bag_lengths = lengths
        if self._multi_level:
            second = torch.where(
                (held == MEDIUM) & ~is_plain,  # a plain feature's key may meet a medium one in the map
                serving_hashed_rows(keys, level2, region[:, 2], region[:, 3]),
                self.zero_row.index_select(0, feature),
            )
            rows = torch.stack([rows, second], dim=1).flatten()
            bag_lengths = lengths * 2
        return physical_input(self._inner, rows, bag_lengths, weights, stride)

    def with_kernel(self, kernel: str) -> "FrozenCafeEmbeddingBagCollection":
        """This collection with its id work on `kernel` ('auto', 'cpp' or 'torch'), sharing its
        tensors and physical tables: to serve one model both ways, or compare them."""
        return FrozenCafeEmbeddingBagCollection(
            self._tables,
            self._inner,
            self.feature_info,
            self._group_bounds,
            self.hash_table,
            self.hash_offsets,
            self.regions,
            self.bucket_hashes,
            self.physical,
            self._is_weighted,
            self._multi_level,
            self._multi_block,
            kernel,
        )

    @property
    def kernel(self) -> str:
        """Where the id work runs: 'cpp' (the C++ op) or 'torch' (its torch-ops twin)."""
        return self._kernel

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> "FrozenCafeEmbeddingBagCollection":
        """Module.to / cuda / cpu. A frozen collection serves on CPU: its quantized tables
        (FBGEMM's IntNBit TBE, which TorchRec keeps outside the module tree) do not move with
        Module.to, so a move to another device is refused before anything moves (ValueError);
        meta is allowed for shape work. The kernel is chosen again for the device the tensors
        moved to (the C++ op runs on CPU only: 'auto' takes the torch-ops twin, 'cpp' raises)."""
        target = fn(torch.empty(0, device=self.feature_info.device)).device
        if target.type not in ("cpu", "meta"):
            raise ValueError(
                f"a frozen CAFE collection serves on CPU: its quantized tables do not move to {target} with "
                "Module.to (FBGEMM's TBE is placed when TorchRec builds it); keep it on CPU"
            )
        resolve_kernel(self._requested_kernel, target)  # raises before anything moves
        super()._apply(fn, recurse)
        self._kernel = resolve_kernel(self._requested_kernel, self.feature_info.device)
        return self

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._tables

    def is_weighted(self) -> bool:
        return self._is_weighted

    def nbytes(self) -> Dict[str, int]:
        """Bytes held: the physical tables as FBGEMM's IntNBit TBE stores them ("weights": rows
        x the rounded row size of their dtype, INT8 and INT4 rows with their scale and bias) and
        the frozen maps ("maps": hash map, regions, per-feature tables)."""
        row_alignment = int(cast(Any, self.physical).row_alignment)
        weights = sum(
            c.num_embeddings
            * rounded_row_size_in_bytes(c.embedding_dim, data_type_to_sparse_type(c.data_type), row_alignment)
            for c in cast(Any, self.physical).embedding_bag_configs()
        )
        maps = sum(
            b.numel() * b.element_size() for name, b in self.state_dict().items() if not name.startswith("physical.")
        )
        return {"weights": weights, "maps": maps, "total": weights + maps}
