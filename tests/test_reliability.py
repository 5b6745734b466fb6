"""Bad input and long life: clear errors, documented behaviour, state never half updated."""

from __future__ import annotations

import copy

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from benchmarks.soak import SoakConfig, soak
from tests.test_cafe_module import make


def state_of(ebc) -> dict:
    return copy.deepcopy(ebc.state_dict())


def unchanged(ebc, before: dict) -> bool:
    return all(torch.equal(before[k], v) for k, v in ebc.state_dict().items())


def test_negative_lengths_and_float_ids_are_refused_untouched() -> None:
    ebc = make()
    before = state_of(ebc)
    bad_lengths = KeyedJaggedTensor(keys=["f0", "f1"], values=torch.tensor([1, 2]), lengths=torch.tensor([2, -1, 1, 0]))
    with pytest.raises(ValueError, match="negative lengths"):
        ebc(bad_lengths)
    floats = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=torch.tensor([1.0, 2.0]), lengths=torch.tensor([1, 1])
    )
    with pytest.raises(ValueError, match="int64"):
        ebc(floats)
    assert unchanged(ebc, before)


def test_negative_and_out_of_range_ids_are_hashed_like_any_id() -> None:
    ebc = make().eval()
    ids = torch.tensor([-5, 2**62, 7, -(2**63)])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=torch.cat([ids, ids]), lengths=torch.ones(8, dtype=torch.int64)
    )
    out = ebc(kjt)
    assert torch.isfinite(out.values()).all()
    keys = ebc.keys("f0", ids)
    assert (keys >= 0).all() and keys.unique().numel() == 4  # distinct ids, distinct keys


def test_huge_bag() -> None:
    ebc = make()
    values = torch.randint(0, 10**12, (200_000,))
    kjt = KeyedJaggedTensor(keys=["f0", "f1"], values=values, lengths=torch.tensor([199_999, 1, 0, 0]))
    out = ebc(kjt)
    out.values().sum().backward()
    assert out.values().shape == (2, 16) and torch.isfinite(out.values()).all()


def test_nan_gradients_never_reach_the_sketch_as_nan() -> None:
    ebc = make()
    group = ebc.groups[ebc.plan.groups[0].name]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.ones(4, dtype=torch.int64)
    )
    (ebc(kjt).values() * float("nan")).sum().backward()
    (ebc(kjt).values() * float("inf")).sum().backward()
    assert torch.isfinite(group.sketch.slot_scores).all()
    assert torch.isfinite(group.sketch.total_score).all()


def test_long_drifting_stream_keeps_the_sketch_invariants() -> None:
    """A shortened soak (benchmarks/soak.py runs 1M steps): every check inside soak() asserts
    rows assigned + free == capacity, no row owned twice, finite bounded scores, bounded
    migrations per step."""
    report = soak(SoakConfig(steps=4_000, batch=256, check_every=100))
    assert report["promotions"] > 500 and report["demotions"] > 300  # it really churned
    assert report["max_migrations_per_step"] <= report["capacity"]
