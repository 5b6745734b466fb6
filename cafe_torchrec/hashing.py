"""The hashes: a 64-bit mix where raw ids enter, one multiplication from then on; the one
place that defines keys, hashed rows and their constants (the C++ ops take them as arguments).

A plain modulo is wrong for CAFE: raw ids are often dense per feature, so ``id % w`` puts
neighbouring ids in neighbouring buckets and correlates bucket and row choice. Raw ids are
therefore pre-hashed once with the splitmix64 finaliser (``mix64``) into keys whose bits are
uniform. Sketch buckets and hashed rows re-spread a key with one multiplication by an odd
per-use constant (``fold``, multiplicative hashing): the top bits of ``key * odd`` depend on
every bit of the key, and it costs a tenth of a second full mix in the remap's inner loop.
Both are written in int64 torch ops (multiplication wraps in two's complement, ``>>`` is
arithmetic, so shifts are masked to be logical) and run identically on CPU and CUDA.
"""

from __future__ import annotations

from typing import Union

import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB
_POSITIVE = 0x7FFFFFFFFFFFFFFF


def _logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor, seed: Union[int, torch.Tensor]) -> torch.Tensor:
    """splitmix64(x + seed * golden) for an int64 tensor, as non-negative int64 (63 bits).

    `seed` is an int or an int64 tensor broadcastable to x (one seed per element).
    """
    if x.dtype != torch.int64:
        raise TypeError(f"mix64 needs int64 ids, got {x.dtype}")
    offset = seed * _GOLDEN + _GOLDEN if isinstance(seed, torch.Tensor) else _wrap(seed * _GOLDEN + _GOLDEN)
    z = x + offset
    z = (z ^ _logical_shift_right(z, 30)) * _M1
    z = (z ^ _logical_shift_right(z, 27)) * _M2
    z = z ^ _logical_shift_right(z, 31)
    return z & _POSITIVE


def mix64_int(x: int, seed: int) -> int:
    """Pure-Python twin of :func:`mix64` for one value (used by references and tests)."""
    mask = (1 << 64) - 1
    z = (x + seed * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z = z ^ (z >> 31)
    return z & _POSITIVE


def odd_multiplier(seed: int) -> int:
    """The odd int64 multiplier a seed stands for (for :func:`fold`)."""
    return _wrap(mix64_int(seed, 0x5EED) | 1)


def fold(keys: torch.Tensor, multiplier: int) -> torch.Tensor:
    """Uniform keys re-spread by one multiplication: (key * multiplier mod 2^64) >> 1 (63 bits)."""
    return _logical_shift_right(keys * multiplier, 1)


def fold_int(key: int, multiplier: int) -> int:
    """Pure-Python twin of :func:`fold`."""
    return ((key * multiplier) & ((1 << 64) - 1)) >> 1


MAX_BOUND = 1 << 31


def bounded(h: torch.Tensor, n: Union[int, torch.Tensor]) -> torch.Tensor:
    """Map non-negative 63-bit hashes onto [0, n) for n <= 2^31 by multiply-shift (Lemire's
    range reduction on the top 31 bits): exact in int64 ops and ~10x cheaper than a 64-bit
    modulo in the C++ kernels, which compute the same formula."""
    return ((h >> 32) * n) >> 31


def bounded_int(h: int, n: int) -> int:
    """Pure-Python twin of :func:`bounded`."""
    return ((h >> 32) * n) >> 31


def _wrap(v: int) -> int:
    """Wrap a Python int into the int64 range (two's complement)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= (1 << 63) else v


# ---- keys: ((mix64(id, salt_t) >> 15) << 15) | t, the table slot t of a group in the low bits
SLOT_BITS = 15
SLOT_MASK = (1 << SLOT_BITS) - 1
KEY_SPACE = (1 << 63) - 1  # keys lie in [0, KEY_SPACE]: the row-wise routing range


def table_salts(num_tables: int, seed: int) -> torch.Tensor:
    """One salt per table slot of a group, from the group's seed."""
    return torch.tensor([mix64_int(i, seed) for i in range(num_tables)], dtype=torch.int64)


def make_keys(ids: torch.Tensor, table_slots: torch.Tensor, salts: torch.Tensor) -> torch.Tensor:
    """((mix64(id, salt_t) >> 15) << 15) | t: 48 uniform hash bits, the table slot in the low bits."""
    return ((mix64(ids, salts[table_slots]) >> SLOT_BITS) << SLOT_BITS) | table_slots


# ---- hashed rows: offset_t + bounded(fold(key, m_level), rows_t) in the level's region of table t
LEVEL_MULTIPLIERS = {1: odd_multiplier(101), 2: odd_multiplier(202)}
SKETCH_SEED = 303  # mixed with the group's seed into the sketch's bucket hash


def hashed_rows(keys: torch.Tensor, regions: torch.Tensor, level: int) -> torch.Tensor:
    """Level-1 or level-2 row of each key; regions [T, 4] int64 holds per table slot the
    level-1 offset and rows, then the level-2 offset and rows."""
    info = regions[keys & SLOT_MASK]
    offset, rows = (info[:, 0], info[:, 1]) if level == 1 else (info[:, 2], info[:, 3])
    return offset + bounded(fold(keys, LEVEL_MULTIPLIERS[level]), rows)
