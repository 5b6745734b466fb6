"""Parity under DistributedModelParallel on 2 gloo processes: a VBE KJT trains exactly as its
expansion, int32 ids and lengths exactly as int64, table-wise and row-wise."""

from __future__ import annotations

from typing import Dict, List

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
# table-wise, by rank, not by config, in stock's sharded collection and in CAFE's alike

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


def order_module(trainable: bool = False) -> CafeEmbeddingBagCollection:
    torch.manual_seed(0)
    config = (
        CafeConfig(compression_ratio=50, policy="paper", threshold=2.0, seed=5)
        if trainable
        else CafeConfig(compression_ratio=50)
    )
    ebc = CafeEmbeddingBagCollection(order_tables(), config)
    _apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.1})
    return ebc


PLACEMENTS = {
    # the group of dim 16 on rank 0: TorchRec's table-wise order is f1, then f0 and f2 on rank 1
    "table_wise": {"cafe_dim16": ("table_wise", 0), "cafe_dim8": ("table_wise", 1), "plain": ("table_wise", 1)},
    # and with a row-wise plain table (a row-wise group's blocks lay keys out otherwise than the
    # unsharded table, so only plain tables are compared row-wise here; see test_sharded.py)
    "mixed": {"cafe_dim16": ("table_wise", 1), "cafe_dim8": ("table_wise", 0), "plain": ("row_wise", None)},
}


def hand_sharded(module, sharder, world: int, placement: str):
    """`module` under DMP with the placement's hand plan (its tables named as CAFE's physical
    ones), and the plan."""
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingPlan

    per_param = {
        name: table_wise(rank=where) if kind == "table_wise" else row_wise()
        for name, (kind, where) in PLACEMENTS[placement].items()
    }
    plan = construct_module_sharding_plan(
        module, per_param, local_size=world, world_size=world, device_type="cpu", sharder=sharder
    )
    dmp = DistributedModelParallel(
        module, device=torch.device("cpu"), plan=ShardingPlan({"": plan}), sharders=[sharder]
    )
    return dmp, plan


def placed(ebc: CafeEmbeddingBagCollection, rank: int, world: int, placement: str) -> DistributedModelParallel:
    """ebc under DMP with the placement's hand plan, each shard holding the unsharded weights."""
    full = {name: bag.weight.detach().clone() for name, bag in ebc.physical.embedding_bags.items()}
    dmp, plan = hand_sharded(ebc, CafeEmbeddingBagCollectionSharder(), world, placement)
    for name, sharding in plan.items():
        for meta in sharding.sharding_spec.shards:
            if meta.placement.rank() == rank:
                start, rows = meta.shard_offsets[0], meta.shard_sizes[0]
                row_store(dmp.module.physical, name).weight.copy_(full[name][start : start + rows])
    return dmp


def stock_keys(ebc: CafeEmbeddingBagCollection, world: int, placement: str) -> List[str]:
    """The output keys of a stock sharded EmbeddingBagCollection over CAFE's physical tables
    under the same placement: the column order TorchRec gives a sharded collection."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    stock = EmbeddingBagCollection(ebc.physical.embedding_bag_configs(), device=torch.device("cpu"))
    dmp, _ = hand_sharded(stock, EmbeddingBagCollectionSharder(), world, placement)
    empty = KeyedJaggedTensor.from_lengths_sync(
        ORDER_FEATURES, torch.zeros(0, dtype=torch.int64), torch.zeros(12, dtype=torch.int64)
    )
    with torch.no_grad():
        return dmp(empty).keys()


def forward_placed(rank: int, world: int, placement: str) -> Dict[str, object]:
    """Sharded eval forward of a KJT carrying per-sample weights, which this unweighted
    collection must ignore, sharded or not; and a stock sharded collection's keys."""
    dmp = placed(order_module(), rank, world, placement)
    dmp.eval()
    empty = KeyedJaggedTensor(
        ORDER_FEATURES, torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(0, dtype=torch.int64), stride=0
    )
    with torch.no_grad():
        out = dmp(order_batch(rank, weighted=True))
        # a rank without samples beside one with: the MEAN feature's bag lengths [F, 0] once failed to reshape
        uneven = dmp(empty if rank == 1 else order_batch(rank, weighted=False))
    return {
        "keys": out.keys(),
        "features": out.to_dict(),
        "uneven": uneven.to_dict(),
        "stock_keys": stock_keys(order_module(), world, placement),
    }


@pytest.mark.parametrize("placement", ["table_wise", "mixed"])
def test_sharded_output_keeps_the_stock_sharded_order_with_each_feature_right(placement: str) -> None:
    """Each feature's columns (the MEAN one divided) equal the unsharded collection's; the keys
    come in the order a stock sharded EmbeddingBagCollection gives (not config order)."""
    reference = order_module().eval()
    for rank, got in enumerate(run_ranks(forward_placed, 2, placement)):
        with torch.no_grad():
            expected = reference(order_batch(rank, weighted=False)).to_dict()
        assert got["keys"] == got["stock_keys"], rank
        assert sorted(got["keys"]) == ORDER_FEATURES
        for f in ORDER_FEATURES:
            torch.testing.assert_close(got["features"][f], expected[f], rtol=0, atol=1e-6, msg=f"rank {rank} {f}")
            if rank == 0:
                torch.testing.assert_close(got["uneven"][f], expected[f], rtol=0, atol=1e-6, msg=f"uneven {f}")
            else:
                assert got["uneven"][f].shape == (0, expected[f].shape[1]), f
    if placement == "table_wise":  # the order this placement was chosen to give
        assert got["keys"] == ["f1", "f0", "f2"]


ORDER_STEPS = 8


def order_steps(rank: int) -> List[KeyedJaggedTensor]:
    from tests.helpers import zipf_kjt

    gen = torch.Generator().manual_seed(50 + rank)
    return [zipf_kjt(ORDER_FEATURES, 12, 300, gen, max_len=2) for _ in range(ORDER_STEPS)]


def train_placed(rank: int, world: int) -> Dict[str, object]:
    """Table-wise training with the groups on different ranks (TorchRec's column order is not the
    config order), two TBEs on rank 1 (dims 8 and 16 apart): outputs, then each owned group's
    sketch keys and weights."""
    dmp = placed(order_module(trainable=True), rank, world, "table_wise")
    probe = torch.Generator().manual_seed(9)
    outputs = []
    for kjt in order_steps(rank):
        features = dmp(kjt).to_dict()  # in the sharded order; by name into config order
        out = torch.cat([features[f] for f in ORDER_FEATURES], dim=1)
        outputs.append(out.detach().clone())
        weight = torch.randn(world, *out.shape, generator=probe)[rank]
        (out * weight).sum().backward()
    owned = {}
    for name, remap in dmp.module.groups.items():
        owned[name] = (remap.sketch.slots[:, 0].clone(), row_store(dmp.module.physical, name).weight.clone())
    return {"outputs": outputs, "owned": owned, "stats": dmp.module.stats()}


def test_table_wise_training_over_several_tables_equals_unsharded() -> None:
    """The columns TorchRec orders by rank carry their gradients back to the right rows and
    importance scores: training equals the unsharded collection on the global batch."""
    results = run_ranks(train_placed, 2)
    reference = order_module(trainable=True)
    probe = torch.Generator().manual_seed(9)
    per_rank = [order_steps(r) for r in range(2)]
    for step in range(ORDER_STEPS):
        kjts = [per_rank[r][step] for r in range(2)]
        values = torch.cat([k[f].values() for f in ORDER_FEATURES for k in kjts])
        lengths = torch.cat([k[f].lengths() for f in ORDER_FEATURES for k in kjts])
        out = reference(KeyedJaggedTensor.from_lengths_sync(ORDER_FEATURES, values, lengths)).values()
        weights = torch.randn(2, out.shape[0] // 2, out.shape[1], generator=probe)
        for r in range(2):
            torch.testing.assert_close(
                results[r]["outputs"][step], out[12 * r : 12 * (r + 1)].detach(), rtol=1e-5, atol=1e-6
            )
        # TorchRec's all-to-all divides gradients by the world size (as DDP averages)
        ((out * weights.reshape(out.shape)).sum() / 2).backward()
    promotions = 0
    for r in results:
        for name, (keys, weight) in r["owned"].items():
            group = reference.groups[name]
            assert torch.equal(keys, group.sketch.slots[:, 0]), name
            torch.testing.assert_close(
                weight, reference.physical.embedding_bags[name].weight.detach(), rtol=1e-4, atol=1e-5
            )
            promotions += r["stats"][name]["promotions"]
    assert promotions > 5


def stock_sharded(rank: int, world: int) -> str:
    """DMP given only TorchRec's sharder shards the CAFE collection's inner tables by themselves."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    ebc = order_module()
    dmp = DistributedModelParallel(ebc, device=torch.device("cpu"), sharders=[EmbeddingBagCollectionSharder()])
    try:
        dmp(order_batch(rank, weighted=False))
    except ValueError as err:
        return str(err)
    return "no error"


def test_inner_tables_sharded_without_the_cafe_sharder_are_refused() -> None:
    """Without CafeEmbeddingBagCollectionSharder, DMP shards the inner stock collection alone:
    its output columns and rows would not be CAFE's (no remap on the owner), so the forward
    refuses, naming the sharder to use."""
    (message,) = run_ranks(stock_sharded, 1)
    assert "CafeEmbeddingBagCollectionSharder" in message, message
