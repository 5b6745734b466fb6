"""Checkpoints that do not fit: another world size, a truncated file. A clear error, and the
model is left exactly as it was."""

from __future__ import annotations

import glob
import os
import tempfile
from typing import Dict

import torch
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.optim import RowWiseAdagrad

from cafe_torchrec.distributed.checkpoint import load_checkpoint_atomically
from tests.dist_utils import run_ranks
from tests.test_sharded import build, shard
from tests.test_sharded_checkpoint import run


def local_tensors(dmp) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in dmp.state_dict().items():
        if hasattr(value, "local_shards"):
            if value.local_shards():
                out[key] = value.local_shards()[0].tensor.clone()
        elif torch.is_tensor(value):
            out[key] = value.clone()
    return out


def try_load(rank: int, world: int, ckpt: str) -> Dict[str, object]:
    ebc = build()
    _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.05})
    dmp, _, _ = shard(ebc, "row_wise", world)
    before = local_tensors(dmp)
    try:
        load_checkpoint_atomically(dmp, ckpt, optimizer=dmp.fused_optimizer)
        error = None
    except Exception as err:  # noqa: BLE001 - the test inspects it
        error = f"{type(err).__name__}: {err}"
    foreign = {"embedding_bags.t0.weight": torch.zeros(6000, 8)}  # a stock EmbeddingBagCollection's key
    try:
        dmp.module.load_state_dict(foreign, strict=False)  # strict or not: refused, not "loaded nothing"
        foreign_error = None
    except ValueError as err:
        foreign_error = str(err)
    after = local_tensors(dmp)
    return {
        "error": error,
        "foreign_error": foreign_error,
        "unchanged": all(torch.equal(before[k], after[k]) for k in before),
    }


def test_other_world_size_and_truncated_checkpoints_are_refused_untouched() -> None:
    with tempfile.TemporaryDirectory() as ckpt:
        run_ranks(run, 2, "row_wise", ckpt, "straight")
        (one,) = run_ranks(try_load, 1, ckpt)
        assert one["error"] and one["unchanged"], one
        assert one["foreign_error"] and "another layout" in one["foreign_error"], one
        shard_file = sorted(glob.glob(os.path.join(ckpt, "*.distcp")))[0]
        os.truncate(shard_file, os.path.getsize(shard_file) // 2)
        two = run_ranks(try_load, 2, ckpt)
        assert all(r["error"] and r["unchanged"] for r in two), two
