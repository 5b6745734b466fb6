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


# ---- output column order: TorchRec orders a sharded lookup's columns by sharding type and,
# table-wise, by rank, not by config; the sharded collection must still answer in config order

ORDER_FEATURES = ["f0", "f1", "f2"]


def order_tables() -> list:
    """Two CAFE groups (dims 8 and 16, one MEAN) and a plain table of the first group's dim."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

    return [
        EmbeddingBagConfig(name="narrow", embedding_dim=8, num_embeddings=20_000, feature_names=["f0"]),
        EmbeddingBagConfig(
            name="wide", embedding_dim=16, num_embeddings=400_000, feature_names=["f1"], pooling=PoolingType.MEAN
        ),
        EmbeddingBagConfig(name="plain", embedding_dim=8, num_embeddings=30, feature_names=["f2"]),
    ]


def order_batch(rank: int, weighted: bool) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(rank)
    lengths = torch.randint(0, 3, (3 * 4,), generator=gen)
    values = torch.randint(0, 10**6, (int(lengths.sum()),), generator=gen)
    weights = torch.rand(values.numel(), generator=gen) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(ORDER_FEATURES, values, lengths, weights=weights)


def order_module() -> CafeEmbeddingBagCollection:
    torch.manual_seed(0)
    return CafeEmbeddingBagCollection(order_tables(), CafeConfig(compression_ratio=50))


def placed(rank: int, world: int, placement: str) -> Dict[str, object]:
    """Sharded forward against the unsharded collection with the same weights, eval; the input
    carries per-sample weights that this unweighted collection must ignore, sharded or not."""
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingPlan

    ebc = order_module()
    full = {name: bag.weight.detach().clone() for name, bag in ebc.physical.embedding_bags.items()}
    per_param = {
        # group of dim 16 first on rank 0: TorchRec's table-wise order is f1, then f0 and f2 on rank 1
        "table_wise": {"cafe_dim16": table_wise(rank=0), "cafe_dim8": table_wise(rank=1), "plain": table_wise(rank=1)},
        # and with a row-wise plain table (a row-wise group's blocks lay keys out otherwise than the
        # unsharded table, so only plain tables are compared row-wise here; see test_sharded.py)
        "mixed": {"cafe_dim16": table_wise(rank=1), "cafe_dim8": table_wise(rank=0), "plain": row_wise()},
    }[placement]
    _apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.1})
    sharder = CafeEmbeddingBagCollectionSharder()
    plan = construct_module_sharding_plan(
        ebc, per_param, local_size=world, world_size=world, device_type="cpu", sharder=sharder
    )
    dmp = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=ShardingPlan({"": plan}), sharders=[sharder])
    for name, sharding in plan.items():
        for meta in sharding.sharding_spec.shards:
            if meta.placement.rank() == rank:
                start, rows = meta.shard_offsets[0], meta.shard_sizes[0]
                row_store(dmp.module.physical, name).weight.copy_(full[name][start : start + rows])
    dmp.eval()
    with torch.no_grad():
        out = dmp(order_batch(rank, weighted=True))
    return {"keys": out.keys(), "values": out.values()}


@pytest.mark.parametrize("placement", ["table_wise", "mixed"])
def test_sharded_output_is_in_config_order_whatever_the_placement(placement: str) -> None:
    reference = order_module().eval()
    for rank, got in enumerate(run_ranks(placed, 2, placement)):
        with torch.no_grad():
            expected = reference(order_batch(rank, weighted=False))
        assert got["keys"] == ORDER_FEATURES
        torch.testing.assert_close(got["values"], expected.values(), rtol=0, atol=1e-6, msg=f"rank {rank}")
