"""Checkpoints that do not fit: another world size, a truncated file, tables in another order, a
group refused on one rank only. A clear error, and the model is left exactly as it was."""

from __future__ import annotations

import glob
import os
import tempfile
from typing import Dict

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection
from cafe_torchrec.distributed import CafeEmbeddingBagCollectionSharder
from cafe_torchrec.distributed.checkpoint import load_checkpoint_atomically
from tests.dist_utils import run_ranks
from tests.helpers import zipf_kjt
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


def test_tables_of_equal_rows_in_another_order_are_refused_untouched() -> None:
    a = EmbeddingBagConfig(name="user", embedding_dim=8, num_embeddings=5000, feature_names=["fu"])
    b = EmbeddingBagConfig(name="item", embedding_dim=8, num_embeddings=5000, feature_names=["fi"])
    cfg = CafeConfig(compression_ratio=20, seed=3)
    torch.manual_seed(0)
    saved = CafeEmbeddingBagCollection([a, b], cfg)
    _apply_optimizer_in_backward(torch.optim.SGD, saved.parameters(), {"lr": 0.5})
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        ids = torch.randint(0, 300, (64,), generator=gen)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["fu", "fi"], values=ids, lengths=torch.ones(64, dtype=torch.int64)
        )
        saved(kjt).values().pow(2).sum().backward()
    state = saved.state_dict()
    swapped = CafeEmbeddingBagCollection([b, a], cfg)
    before = {k: v.clone() for k, v in swapped.state_dict().items()}
    with pytest.raises(ValueError, match="another layout"):
        swapped.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in swapped.state_dict().items())
    same = CafeEmbeddingBagCollection([a, b], cfg)
    same.load_state_dict(state)  # the same order still loads


TWO_GROUPS = ["f0", "f1", "f2", "f3"]


def unsharded_two_groups(seed16: int) -> CafeEmbeddingBagCollection:
    """Two dims, so two CAFE groups (cafe_dim8 seeded 5, cafe_dim16 seeded `seed16`)."""
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=d, num_embeddings=4000, feature_names=[f"f{i}"])
        for i, d in enumerate([8, 8, 16, 16])
    ]
    seeds = {"t0": 5, "t1": 5, "t2": seed16, "t3": seed16}
    return CafeEmbeddingBagCollection(tables, {t: CafeConfig(compression_ratio=20, seed=s) for t, s in seeds.items()})


def table_wise(ebc: CafeEmbeddingBagCollection) -> DistributedModelParallel:
    """The collection under DMP with each group table-wise (on 2 ranks: one group per rank)."""
    _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.05})
    sharders = [CafeEmbeddingBagCollectionSharder()]
    constraints = {g: ParameterConstraints(sharding_types=["table_wise"]) for g in ("cafe_dim8", "cafe_dim16")}
    plan = EmbeddingShardingPlanner(
        topology=Topology(world_size=dist.get_world_size(), compute_device="cpu"), constraints=constraints
    ).collective_plan(ebc, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(ebc, device=torch.device("cpu"), plan=plan, sharders=sharders)


def build_two_groups(seed16: int) -> DistributedModelParallel:
    dmp = table_wise(unsharded_two_groups(seed16))
    gen = torch.Generator().manual_seed(10 + dist.get_rank())
    for _ in range(3):
        dmp(zipf_kjt(TWO_GROUPS, 16, 300, gen)).values().pow(2).sum().backward()
    return dmp


def save_two_groups(rank: int, world: int, ckpt: str) -> None:
    dmp = build_two_groups(seed16=5)
    dcp.save({"model": dmp.state_dict(), "optim": dmp.fused_optimizer.state_dict()}, checkpoint_id=ckpt)


def load_two_groups(rank: int, world: int, ckpt: str) -> Dict[str, object]:
    dmp = build_two_groups(seed16=6)
    groups = sorted(dmp.module.groups.keys())
    before = local_tensors(dmp)
    try:
        load_checkpoint_atomically(dmp, ckpt, optimizer=dmp.fused_optimizer)
        error = None
    except ValueError as err:
        error = str(err)
    after = local_tensors(dmp)
    return {"groups": groups, "error": error, "unchanged": all(torch.equal(before[k], after[k]) for k in before)}


def test_a_group_refused_on_one_rank_is_refused_on_every_rank() -> None:
    with tempfile.TemporaryDirectory() as ckpt:
        run_ranks(save_two_groups, 2, ckpt)
        results = run_ranks(load_two_groups, 2, ckpt)
    assert sorted(g for r in results for g in r["groups"]) == ["cafe_dim16", "cafe_dim8"], results
    assert all(len(r["groups"]) == 1 for r in results), results  # each group on its own rank
    for r in results:
        assert r["error"] and "cafe_dim16" in r["error"] and r["unchanged"], r


def load_unsharded_two_groups(rank: int, world: int, path: str) -> Dict[str, object]:
    dmp = table_wise(unsharded_two_groups(seed16=6))
    before = local_tensors(dmp)
    try:
        dmp.load_state_dict(torch.load(path))
        error = None
    except ValueError as err:
        error = str(err)
    after = local_tensors(dmp)
    return {
        "groups": sorted(dmp.module.groups.keys()),
        "error": error,
        "unchanged": all(torch.equal(before[k], after[k]) for k in before),
    }


def test_an_unsharded_group_of_another_layout_is_refused_on_every_rank() -> None:
    """A table-wise group lives on one rank; the rank without it must not drop its plain entries
    unchecked and load the rest of a state dict the owner refuses."""
    saved = unsharded_two_groups(seed16=5)
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(1.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pt")
        torch.save(saved.state_dict(), path)
        results = run_ranks(load_unsharded_two_groups, 2, path)
    assert all(len(r["groups"]) == 1 for r in results), results
    for r in results:
        assert r["error"] and "cafe_dim16" in r["error"] and r["unchanged"], r


class LoaderState:
    """A Stateful `extra` entry (e.g. a data loader's position) whose load fails on rank 1 only."""

    def __init__(self, fail: bool) -> None:
        self.fail, self.step = fail, 0

    def state_dict(self) -> Dict[str, object]:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if self.fail:
            raise RuntimeError("this rank's loader state does not fit")
        self.step = int(state["step"])  # type: ignore[call-overload]


def load_with_failing_extra(rank: int, world: int, ckpt: str) -> Dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    saver = LoaderState(False)
    saver.step = 7
    dcp.save({"model": model.state_dict(), "loader": saver}, checkpoint_id=ckpt)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = LoaderState(fail=rank == 1)
    try:
        got = load_checkpoint_atomically(model, ckpt, extra={"loader": loader})
        error = None
    except Exception as err:  # noqa: BLE001 - the test inspects it
        got, error = None, f"{type(err).__name__}: {err}"
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return {"error": error, "unchanged": unchanged, "returned": got is not None}


def test_an_extra_entry_failing_on_one_rank_is_refused_on_every_rank() -> None:
    """A Stateful extra's load_state_dict is rank-local: its error must reach the other ranks
    (which otherwise wait in the agreement's collective, or apply the checkpoint)."""
    with tempfile.TemporaryDirectory() as ckpt:
        results = run_ranks(load_with_failing_extra, 2, ckpt)
    for r in results:
        assert r["error"] and r["error"].startswith("ValueError") and "loader state" in r["error"], r
        assert r["unchanged"] and not r["returned"], r


def test_a_stateful_extra_loads_and_is_returned() -> None:
    with tempfile.TemporaryDirectory() as ckpt:
        (one,) = run_ranks(load_with_failing_extra, 1, ckpt)
    assert one == {"error": None, "unchanged": False, "returned": True}, one
