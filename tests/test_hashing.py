"""The hashes spread keys evenly: buckets, hashed rows and both together, also on one row-wise shard."""

from __future__ import annotations

import torch

from cafe_torchrec.hashing import bounded, fold, fold_int, make_keys, mix64, mix64_int, odd_multiplier


def shard_keys(n: int, world: int, rank: int) -> torch.Tensor:
    """Keys of dense raw ids (0..n-1, the worst case for a modulo) that a row-wise rank owns:
    the rank's 1/world of the key range, as TorchRec's range bucketing routes them."""
    ids = torch.arange(n * world, dtype=torch.int64)
    keys = make_keys(ids, torch.zeros_like(ids), torch.tensor([mix64_int(0, 7)]))
    span = ((1 << 63) - 1) // world + 1
    return keys[(keys // span) == rank]


def test_fold_twins_agree() -> None:
    keys = mix64(torch.arange(1000, dtype=torch.int64), 3)
    m = odd_multiplier(303)
    assert m % 2 == 1
    assert fold(keys, m).tolist() == [fold_int(k, m) for k in keys.tolist()]
    assert bool((fold(keys, m) >= 0).all())


def test_buckets_and_rows_are_even_and_independent_on_one_shard() -> None:
    keys = shard_keys(50_000, world=4, rank=2)
    assert 45_000 < keys.numel() < 55_000
    buckets = bounded(fold(keys, odd_multiplier(303)), 1000)
    rows = bounded(fold(keys, odd_multiplier(101)), 1000)
    for h in (buckets, rows):
        counts = torch.bincount(h, minlength=1000).double()
        chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
        assert chi2 < 1000 + 5 * (2 * 1000) ** 0.5, chi2  # chi-square, 999 degrees of freedom, ~5 sigma
    # keys that share a bucket must not share hashed rows more often than chance
    joint = torch.bincount((buckets % 32) * 32 + rows % 32, minlength=1024).double()
    chi2 = float(((joint - joint.mean()) ** 2 / joint.mean()).sum())
    assert chi2 < 1024 + 5 * (2 * 1024) ** 0.5, chi2
