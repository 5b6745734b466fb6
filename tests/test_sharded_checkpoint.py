"""torch.distributed.checkpoint of sharded CAFE: exact resume on 2 ranks, 2 -> 1 rank for table-wise;
an unsharded state_dict() into a table-wise DMP."""

from __future__ import annotations

import os
import tempfile
from typing import Dict, List

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.optim import RowWiseAdagrad

from tests.dist_utils import run_ranks
from tests.helpers import zipf_kjt
from tests.test_sharded import FEATURES, GROUP, build, shard

STEPS = 8


def checkpoint_state(dmp) -> Dict[str, object]:
    """Model and fused optimizer state; a rank that holds no table has no optimizer state,
    and DCP refuses an empty entry, so it is left out there."""
    state: Dict[str, object] = {"model": dmp.state_dict()}
    optim = dmp.fused_optimizer.state_dict()
    if optim["state"]:
        state["optim"] = optim
    return state


def stream(rank: int) -> List:
    gen = torch.Generator().manual_seed(200 + rank)
    return [zipf_kjt(["f0", "f1", "f2"], 16, 300, gen, max_len=2) for _ in range(2 * STEPS)]


def run(rank: int, world: int, sharding_type: str, ckpt: str, mode: str) -> Dict[str, object]:
    """mode 'straight': 2*STEPS steps, saving after STEPS; 'resume': load (dcp.load, then
    load_state_dict, torch's flow), then the last STEPS; 'dcp_only': dcp.load alone, which a stock
    collection's in-place state dict allows."""
    ebc = build()
    _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.05})
    dmp, _, _ = shard(ebc, sharding_type, world)
    batches = stream(rank)
    probe = torch.randn(16, 24, generator=torch.Generator().manual_seed(rank))
    start = 0
    if mode in ("resume", "dcp_only"):
        state = checkpoint_state(dmp)
        dcp.load(state, checkpoint_id=ckpt)
        if mode == "resume":
            dmp.load_state_dict(state["model"])
        if "optim" in state:
            dmp.fused_optimizer.load_state_dict(state["optim"])
        start = STEPS
    outputs = []
    for step in range(start, 2 * STEPS):
        if mode == "straight" and step == STEPS:
            dcp.save(checkpoint_state(dmp), checkpoint_id=ckpt)
        out = dmp(batches[step]).values()
        outputs.append(out.detach().clone())
        (out * probe).sum().backward()
    local = {
        k: v.local_shards()[0].tensor.clone() if hasattr(v, "local_shards") and v.local_shards() else v
        for k, v in dmp.state_dict().items()
        if not hasattr(v, "local_shards") or v.local_shards()
    }
    return {"outputs": outputs[-STEPS:], "state": local}


@pytest.mark.parametrize("sharding_type", ["row_wise", "table_wise"])
def test_dcp_resume_on_two_ranks_is_exact(sharding_type: str) -> None:
    with tempfile.TemporaryDirectory() as ckpt:
        straight = run_ranks(run, 2, sharding_type, ckpt, "straight")
        resumed = {mode: run_ranks(run, 2, sharding_type, ckpt, mode) for mode in ("resume", "dcp_only")}
    for mode, runs in resumed.items():
        for rank in range(2):
            for a, b in zip(straight[rank]["outputs"], runs[rank]["outputs"]):
                assert torch.equal(a, b), f"{mode}, rank {rank}: outputs differ after resume"
            sa, sb = straight[rank]["state"], runs[rank]["state"]
            assert sa.keys() == sb.keys()
            for key in sa:
                assert torch.equal(sa[key], sb[key]), f"{mode}, rank {rank}: {key} differs after resume"
    assert any(f"groups.{GROUP}.sketch.slots" in k for k in straight[0]["state"])


def eval_one_rank(rank: int, world: int, ckpt: str, batch) -> torch.Tensor:
    ebc = build()
    _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.05})
    dmp, _, _ = shard(ebc, "table_wise", world)
    state = {"model": dmp.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    dmp.load_state_dict(state["model"])
    dmp.eval()
    with torch.no_grad():
        return dmp(batch).values()


def test_table_wise_checkpoint_from_two_ranks_loads_on_one() -> None:
    with tempfile.TemporaryDirectory() as ckpt:
        straight = run_ranks(run, 2, "table_wise", ckpt, "straight")
        batch = stream(0)[STEPS]
        one = run_ranks(eval_one_rank, 1, ckpt, batch)[0]
    # rank 0's first output after the save was computed in train mode from the same weights and sketch
    torch.testing.assert_close(one, straight[0]["outputs"][0], rtol=0, atol=0)


def probe(rank: int):
    return zipf_kjt(FEATURES, 8, 300, torch.Generator().manual_seed(50 + rank), max_len=2)


def load_sharded(rank: int, world: int, path: str) -> torch.Tensor:
    ebc = build()
    _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.05})
    dmp, _, _ = shard(ebc, "table_wise", world)
    dmp.load_state_dict(torch.load(path))
    dmp.eval()
    with torch.no_grad():
        return dmp(probe(rank)).values()


def test_unsharded_state_dict_loads_into_table_wise_on_two_ranks() -> None:
    ebc = build()
    _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.05})
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        ebc(zipf_kjt(FEATURES, 32, 300, gen, max_len=2)).values().pow(2).sum().backward()
    assert sum(s["promotions"] for s in ebc.stats().values()) > 0
    ebc.eval()
    with torch.no_grad():
        expected = [ebc(probe(r)).values() for r in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pt")
        torch.save(ebc.state_dict(), path)
        got = run_ranks(load_sharded, 2, path)
    for rank in range(2):
        torch.testing.assert_close(got[rank], expected[rank], rtol=0, atol=0)
