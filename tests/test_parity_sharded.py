"""Parity under DistributedModelParallel on 2 gloo processes: a VBE KJT trains exactly as its
expansion, int32 ids and lengths exactly as int64, table-wise and row-wise."""

from __future__ import annotations

from typing import Dict

import pytest
import torch
import torch.distributed as dist
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection
from cafe_torchrec.distributed import CafeEmbeddingBagCollectionSharder
from cafe_torchrec.kjt import expand_variable_batch
from cafe_torchrec.migration import row_store
from tests.dist_utils import run_ranks
from tests.test_parity import FEATURES, tables, vbe_kjt

GROUP = "cafe_dim8"


def sharded(sharding_type: str, world: int) -> DistributedModelParallel:
    torch.manual_seed(0)
    ebc = CafeEmbeddingBagCollection(tables(), CafeConfig(compression_ratio=100, seed=3))
    sharders = [CafeEmbeddingBagCollectionSharder(fused_params={"learning_rate": 0.1})]
    constraints = {name: ParameterConstraints(sharding_types=[sharding_type]) for name in (GROUP, "small")}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints
    )
    plan = planner.collective_plan(ebc, sharders, dist.GroupMember.WORLD)
    _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.1})
    return DistributedModelParallel(ebc, device=torch.device("cpu"), plan=plan, sharders=sharders)


def same_weights(a: DistributedModelParallel, b: DistributedModelParallel) -> None:
    for table in (GROUP, "small"):
        try:
            source = row_store(a.module.physical, table).weight
        except KeyError:  # table-wise: the table lives on the other rank
            continue
        row_store(b.module.physical, table).weight.copy_(source)


def compare(rank: int, world: int, sharding_type: str) -> Dict[str, object]:
    vbe_model, expanded_model = sharded(sharding_type, world), sharded(sharding_type, world)
    narrow_model, wide_model = sharded(sharding_type, world), sharded(sharding_type, world)
    same_weights(vbe_model, expanded_model)
    same_weights(vbe_model, narrow_model)
    same_weights(vbe_model, wide_model)
    probe = torch.randn(6, 16, generator=torch.Generator().manual_seed(rank))
    vbe_equal, int_equal = [], []
    for step in range(5):
        kjt = vbe_kjt([3, 5], 6, seed=10 * step + rank)
        expanded = expand_variable_batch(kjt)
        narrow = KeyedJaggedTensor(keys=FEATURES, values=expanded.values().int(), lengths=expanded.lengths().int())
        outs = [
            m(x).values()
            for m, x in ((vbe_model, kjt), (expanded_model, expanded), (narrow_model, narrow), (wide_model, expanded))
        ]
        vbe_equal.append(torch.equal(outs[0], outs[1]) and outs[0].shape == (6, 16))
        int_equal.append(torch.equal(outs[2], outs[3]))
        for out in outs:
            (out * probe).sum().backward()
    state = [m.state_dict() for m in (vbe_model, expanded_model, narrow_model, wide_model)]
    keys = [k for k in state[0] if GROUP in k or "small" in k]

    def local(value):
        if hasattr(value, "local_shards"):
            return value.local_shards()[0].tensor if value.local_shards() else None
        return value

    def equal(x, y) -> bool:
        x, y = local(x), local(y)
        return not isinstance(x, torch.Tensor) or torch.equal(x, y)

    return {
        "vbe_outputs": vbe_equal,
        "int_outputs": int_equal,
        "vbe_state": all(equal(state[0][k], state[1][k]) for k in keys),
        "int_state": all(equal(state[2][k], state[3][k]) for k in keys),
        "promotions": vbe_model.module.stats().get(GROUP, {}).get("promotions", 0),
    }


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_vbe_and_int32_under_dmp(sharding_type: str) -> None:
    results = run_ranks(compare, 2, sharding_type)
    for rank, r in enumerate(results):
        assert all(r["vbe_outputs"]) and r["vbe_state"], (rank, r)
        assert all(r["int_outputs"]) and r["int_state"], (rank, r)
    assert sum(r["promotions"] for r in results) > 0
