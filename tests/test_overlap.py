"""The sketch update overlapped with the TBE backward: same results, errors surface once."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import features_of, zipf_kjt
from tests.test_cafe_module import make


def _train(steps: int, overlap: bool, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CAFE_SKETCH_THREAD", "1" if overlap else "0")
    ebc = make(multi_level=True)
    names = features_of(ebc.embedding_bag_configs())
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        ebc(zipf_kjt(names, 64, 4000, gen)).values().pow(2).sum().backward()
    return ebc


def test_overlapped_update_equals_the_caller_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    on, off = _train(30, True, monkeypatch), _train(30, False, monkeypatch)
    state_on, state_off = on.state_dict(), off.state_dict()
    assert state_on.keys() == state_off.keys()
    for name in state_on:
        assert torch.equal(state_on[name], state_off[name]), name
    stats_on = on.stats()
    assert stats_on == off.stats()
    assert stats_on[on.plan.groups[0].name]["promotions"] > 0


def test_failed_background_update_raises_in_backward_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAFE_SKETCH_THREAD", "1")
    ebc = make()
    group = ebc.groups[ebc.plan.groups[0].name]
    names = features_of(ebc.embedding_bag_configs())
    gen = torch.Generator().manual_seed(0)
    kjt = zipf_kjt(names, 16, 1000, gen)

    def broken(*args, **kwargs):
        raise RuntimeError("sketch update failed")

    monkeypatch.setattr(group, "record", broken)
    with pytest.raises(RuntimeError, match="sketch update failed"):
        ebc(kjt).values().sum().backward()
    monkeypatch.undo()
    ebc.stats()  # waits for the group's sketch update: nothing left pending raises the error again
    ebc(kjt).values().sum().backward()  # the next step runs normally
