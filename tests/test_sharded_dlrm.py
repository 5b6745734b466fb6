"""CAFE inside full models under DMP on 2 gloo ranks: DLRM with TrainPipelineSparseDist, mixed
dims beside a stock EmbeddingBagCollection, and row-wise load balance on Zipf ids."""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.datasets.utils import Batch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection
from cafe_torchrec.distributed import CafeEmbeddingBagCollectionSharder
from cafe_torchrec.stats import stats_interval
from tests.dist_utils import run_ranks
from tests.helpers import zipf_kjt

FEATURES = [f"f{i}" for i in range(4)]


def learnable_batches(rank: int, steps: int, batch: int) -> List[Batch]:
    """Labels depend on whether a feature-0 id is even: a DLRM can learn it from embeddings."""
    gen = torch.Generator().manual_seed(rank)
    out = []
    for _ in range(steps):
        kjt = zipf_kjt(FEATURES, batch, 2000, gen, z=1.1)
        labels = (kjt["f0"].values() % 2 == 0).float()
        out.append(Batch(dense_features=torch.randn(batch, 4, generator=gen), sparse_features=kjt, labels=labels))
    return out


def train_dlrm(rank: int, world: int) -> Dict[str, object]:
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=n, feature_names=[f])
        for i, (f, n) in enumerate(zip(FEATURES, [200_000, 50_000, 300, 80_000]))
    ]
    ebc = CafeEmbeddingBagCollection(tables, CafeConfig(compression_ratio=50))
    model = DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=4,
            dense_arch_layer_sizes=[16, 16],
            over_arch_layer_sizes=[16, 1],
        )
    )
    _apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": 0.1})
    sharders = [CafeEmbeddingBagCollectionSharder(), *get_default_sharders()]
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu")).collective_plan(
        model, sharders, dist.GroupMember.WORLD
    )
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda params: torch.optim.Adagrad(params, lr=0.05)
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, torch.device("cpu"))
    losses = []
    data = iter(learnable_batches(rank, 120, 64))
    while True:
        try:
            loss = pipeline.progress(data)[0]
        except StopIteration:
            break
        losses.append(float(loss))
    sharded = dmp.module.model.sparse_arch.embedding_bag_collection
    return {"losses": losses, "type": type(sharded).__name__, "stats": sharded.stats(), "plan": str(plan)}


def test_dlrm_trains_under_dmp_with_train_pipeline() -> None:
    results = run_ranks(train_dlrm, 2)
    for r in results:
        assert r["type"] == "ShardedCafeEmbeddingBagCollection"
        first, last = sum(r["losses"][:20]) / 20, sum(r["losses"][-20:]) / 20
        assert last < first - 0.05, (first, last)
    assert sum(s["promotions"] for r in results for s in r["stats"].values()) > 0


def mixed(rank: int, world: int) -> Dict[str, object]:
    torch.manual_seed(0)
    cafe_tables = [
        EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=100_000, feature_names=["f0"]),
        EmbeddingBagConfig(name="b", embedding_dim=16, num_embeddings=60_000, feature_names=["f1"]),
        EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=40_000, feature_names=["f2"]),
    ]
    stock_tables = [EmbeddingBagConfig(name="s", embedding_dim=8, num_embeddings=1_000_000, feature_names=["f3"])]

    class TwoCollections(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cafe = CafeEmbeddingBagCollection(cafe_tables, CafeConfig(compression_ratio=100))
            self.stock = EmbeddingBagCollection(stock_tables)

        def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
            cafe_features, stock_features = kjt.split([3, 1])  # CAFE refuses features it does not own
            return torch.cat([self.cafe(cafe_features).values(), self.stock(stock_features).values()], dim=1)

    model = TwoCollections()
    _apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
    sharders = [CafeEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]
    constraints = {n: ParameterConstraints(sharding_types=["row_wise"]) for n in ("cafe_dim8", "cafe_dim16")}
    plan = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints
    ).collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(5):
        out = dmp(zipf_kjt(FEATURES, 256, 1_000_000, gen, z=1.05))
        out.sum().backward()
    # row-wise balance: a large Zipf batch through the real routing of this rank's module
    kjt = zipf_kjt(FEATURES[:3], 4096, 1_000_000, torch.Generator().manual_seed(42), z=1.05)
    cafe = dmp.module.cafe
    before = cafe.stats()  # lookups are counted by training forwards (no backward needed)
    cafe(kjt)
    return {
        "shape": tuple(out.shape),
        "stats": stats_interval(cafe.stats(), before),
        "groups": sorted(cafe.groups.keys()),
    }


def test_mixed_dims_beside_a_stock_collection_and_row_wise_balance() -> None:
    results = run_ranks(mixed, 2)
    assert all(r["shape"] == (256, 8 + 16 + 8 + 8) for r in results)
    assert all(r["groups"] == ["cafe_dim16", "cafe_dim8"] for r in results)
    for group in ("cafe_dim8", "cafe_dim16"):
        rows = [r["stats"][group]["rows"] for r in results]
        lookups = [r["stats"][group]["lookups"] for r in results]
        assert max(rows) - min(rows) <= 1
        assert max(lookups) / min(lookups) < 1.10, (group, lookups)
