"""KeyedJaggedTensor helpers every collection here shares: variable-batch expansion, per-table
segments of a KJT, and a concatenation that does not copy a single piece."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Mapping, Optional, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def has_variable_batch(features: KeyedJaggedTensor) -> bool:
    """Whether the KJT is variable-batch (VBE: a stride per key) or carries non-empty inverse
    indices.

    The stock EmbeddingBagCollection expands its pooled output with the inverse indices in
    both cases, so both mean "the output batch is given by the inverse indices"; it ignores
    inverse indices with no entries (an [F, 0] tensor), and so does this."""
    return features.variable_stride_per_key() or _inverse_indices(features) is not None


def _inverse_indices(features: KeyedJaggedTensor) -> Optional[Tuple[List[str], torch.Tensor]]:
    """The KJT's inverse indices, None when it has none or they have no entries."""
    inverse = features.inverse_indices_or_none()
    if inverse is None or inverse[1].numel() == 0:
        return None
    return inverse


def expand_variable_batch(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The KJT whose bag i of key f is bag inverse_indices[f][i] of `features`: one stride,
    the output batch. Pooling the result equals the stock collection's VBE output (pooled
    per key, then expanded by the inverse indices), and training on it trains on the
    expanded batch, which is what the VBE input means.

    Without inverse indices (or with empty ones, which stock ignores) a VBE KJT whose keys all
    have one stride is that uniform batch, as stock pools it. Raises ValueError naming VBE and
    the feature when the inverse indices are missing where the strides differ, lack a key, have
    the wrong shape, or point outside the key's bags. TorchScript compiles it."""
    keys = features.keys()
    inverse = _inverse_indices(features)
    if inverse is None:
        strides = features.stride_per_key()
        if len(strides) > 0 and min(strides) == max(strides):  # stock pools it as a uniform batch
            return KeyedJaggedTensor(
                keys=keys,
                values=features.values(),
                lengths=features.lengths(),
                weights=features.weights_or_none(),
                stride=strides[0],
            )
        raise ValueError(
            f"variable-batch (VBE) KeyedJaggedTensor without inverse_indices (features {keys}, strides {strides}): "
            "the output batch is undefined; build it with inverse_indices=(keys, [F, B] indices)"
        )
    names, indices = inverse
    if indices.dim() != 2 or indices.shape[0] != len(names):
        raise ValueError(
            f"variable-batch (VBE) inverse_indices must be [len(keys)={len(names)}, batch], got shape {indices.shape}"
        )
    row_of = {name: i for i, name in enumerate(names)}
    strides = features.stride_per_key() if features.variable_stride_per_key() else [features.stride()] * len(keys)
    lengths = features.lengths()
    if lengths.numel() != sum(strides):
        raise ValueError(
            f"variable-batch (VBE) KeyedJaggedTensor: strides per key {strides} sum to {sum(strides)} "
            f"bags but there are {lengths.numel()} lengths (features {keys})"
        )
    bag_starts = 0
    rows: List[torch.Tensor] = []
    for key, stride in zip(keys, strides):
        if key not in row_of:
            raise ValueError(f"variable-batch (VBE) feature '{key}' has no inverse_indices (they name {names})")
        index = indices[row_of[key]].to(torch.int64)
        if index.numel() > 0 and (int(index.min()) < 0 or int(index.max()) >= stride):
            raise ValueError(
                f"variable-batch (VBE) feature '{key}': inverse_indices must lie in [0, {stride}) "
                f"(its {stride} bags), got [{int(index.min())}, {int(index.max())}]"
            )
        rows.append(index + bag_starts)
        bag_starts += stride
    batch = int(indices.shape[1])
    bags = torch.cat(rows) if len(rows) > 0 else lengths.new_zeros(0, dtype=torch.int64)
    offsets = _complete_cumsum(lengths)
    new_lengths = lengths[bags]
    new_offsets = _complete_cumsum(new_lengths)
    total = int(new_offsets[-1])
    shift = torch.repeat_interleave(offsets[bags] - new_offsets[:-1], new_lengths, output_size=total)
    positions = shift + torch.arange(total, device=shift.device)
    weights = features.weights_or_none()
    return KeyedJaggedTensor(
        keys=keys,
        values=features.values()[positions],
        lengths=new_lengths,
        weights=weights[positions] if weights is not None else None,
        stride=batch,
    )


def _complete_cumsum(lengths: torch.Tensor) -> torch.Tensor:
    """[0, l0, l0 + l1, ...] as int64: the offsets of bags of these lengths."""
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int64), (1, 0))


def _feature_runs(keys: List[str], table_of: Mapping[str, str]) -> List[Tuple[str, List[str]]]:
    """Consecutive features of one physical table: [(table, [features])]."""
    segments: List[Tuple[str, List[str]]] = []
    for f in keys:
        if segments and segments[-1][0] == table_of[f]:
            segments[-1][1].append(f)
        else:
            segments.append((table_of[f], [f]))
    return segments


@dataclass(frozen=True)
class TableSegment:
    """One run of consecutive features of a KJT that share a physical table, as views."""

    table: str
    features: List[str]
    counts: List[int]  # ids of each feature
    values: torch.Tensor  # [sum(counts)] the run's ids
    lengths: torch.Tensor  # [len(features) x stride] bag lengths, feature-major
    weights: Optional[torch.Tensor]  # [sum(counts)] or None


def table_segments(kjt: KeyedJaggedTensor, table_of: Mapping[str, str]) -> Iterator[TableSegment]:
    """The runs of a (fixed-stride) KJT's features by physical table (`table_of[feature]`), in
    key order: what a collection that handles a physical table's features together walks."""
    stride = kjt.stride()
    length_per_key = kjt.length_per_key()
    values, lengths, weights = kjt.values(), kjt.lengths(), kjt.weights_or_none()
    feature, start = 0, 0
    for table, names in _feature_runs(kjt.keys(), table_of):
        counts = length_per_key[feature : feature + len(names)]
        end = start + sum(counts)
        yield TableSegment(
            table,
            names,
            counts,
            values[start:end],
            lengths[feature * stride : (feature + len(names)) * stride],
            weights[start:end] if weights is not None else None,
        )
        feature += len(names)
        start = end


def concat(pieces: List[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """torch.cat that does not copy a single piece (the common one-group layout); `empty` if none.
    Pieces of int32 and int64 give int64 (torch.cat's type promotion)."""
    if not pieces:
        return empty
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
