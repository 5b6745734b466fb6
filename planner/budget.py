"""A memory budget as the solver and the planner read it: byte sizes with units, split into per-rank caps."""

from __future__ import annotations

import re
from typing import List, Sequence, Union

Budget = Union[int, float, str, Sequence[Union[int, float, str]]]
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Union[int, float, str]) -> int:
    """Bytes from 123, 1.5e9, '512MiB', '2GiB', '1.5GB', '64k' (binary units with 'i')."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a byte size from {value!r} (e.g. 2GiB, 512MiB, 1.5GB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def rank_caps(budget: Budget, world_size: int) -> List[int]:
    """Per-rank caps: a total budget is split evenly; a sequence gives one cap per rank."""
    if isinstance(budget, (list, tuple)):
        if len(budget) != world_size:
            raise ValueError(f"{len(budget)} per-rank caps for a world size of {world_size}")
        return [parse_bytes(b) for b in budget]
    total = parse_bytes(budget)
    return [total // world_size + (1 if r < total % world_size else 0) for r in range(world_size)]
