"""The README's example, complete: CAFE in a TorchRec DLRM, sharded, trained, served.

    python -m examples.quickstart                          # one process (gloo)
    torchrun --nproc-per-node 2 -m examples.quickstart     # two ranks: the planner places the tables

Three Criteo-sized tables of 1M ids compressed 100x, a DLRM, the planner and
DistributedModelParallel with CAFE's sharder, a few hundred steps on a synthetic stream whose
labels depend on a few popular ids (so the embeddings must learn), then what CAFE chose
(`describe`, `stats`, `memory`) and an INT8 serving model whose predictions are checked
against the trained model's. Every call is public TorchRec / cafe_torchrec API; the script
exits non-zero if training did not learn or serving disagrees with training.
"""

from __future__ import annotations

import argparse
import os
from typing import Tuple

import torch
import torch.distributed as dist
import torchmetrics
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection
from cafe_torchrec.distributed import CafeEmbeddingBagCollectionSharder
from cafe_torchrec.inference import quantize_inference_model

FEATURES = ["user", "item", "context"]
IDS = 1_000_000
DENSE = 4


def batch(generator: torch.Generator, size: int) -> Tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    """Dense features, one Zipf-like id per feature and sample, and a label that is 1 for ids
    whose hash puts them in a "liked" third (so only learnt embeddings predict it)."""
    ranks = torch.exp(torch.rand(len(FEATURES) * size, generator=generator) * torch.log(torch.tensor(IDS / 10.0)))
    ids = (ranks.long() * 2_654_435_761) % IDS  # popular ranks scattered over the id space
    liked = (ids.view(len(FEATURES), size) % 3 == 0).float().mean(0)
    dense = torch.randn(size, DENSE, generator=generator)
    labels = (liked + 0.1 * dense[:, 0] + 0.3 * torch.rand(size, generator=generator) > 0.55).float()
    kjt = KeyedJaggedTensor.from_lengths_sync(FEATURES, ids, torch.ones(len(FEATURES) * size, dtype=torch.int32))
    return dense, kjt, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=100.0, help="compression ratio against the full tables")
    args = parser.parse_args()

    for name, default in (("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29511"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, default)  # torchrun sets them; one plain process needs them too
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same dense weights on every rank

    # 1. The stock configs, a CAFE collection in place of EmbeddingBagCollection, the stock DLRM.
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=16, num_embeddings=IDS, feature_names=[f]) for f in FEATURES
    ]
    ebc = CafeEmbeddingBagCollection(tables, CafeConfig(compression_ratio=args.ratio))
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=DENSE,
        dense_arch_layer_sizes=[32, 16],
        over_arch_layer_sizes=[32, 1],
    )

    # 2. Embeddings train inside backward (fused into the TBE once sharded), as TorchRec's DLRM does.
    apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": 0.05})
    sharders = [CafeEmbeddingBagCollectionSharder(), *get_default_sharders()]
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"))
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    model = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dense_parameters = [p for _, p in in_backward_optimizer_filter(model.named_parameters())]
    dense_optimizer = torch.optim.Adagrad(dense_parameters, lr=0.05)

    # 3. Train: a plain loop (TrainPipelineSparseDist works the same way).
    generator = torch.Generator().manual_seed(1 + rank)
    losses = []
    for _ in range(args.steps):
        dense, kjt, labels = batch(generator, args.batch_size)
        logits = model(dense, kjt).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        loss.backward()
        dense_optimizer.step()
        dense_optimizer.zero_grad()
        losses.append(loss.item())

    # 4. What CAFE chose: ask the sharded collection (DMP replaced the one built above).
    sharded = model.module.sparse_arch.embedding_bag_collection
    if rank == 0:
        print(sharded.describe())
        for name, group in sharded.stats().items():  # this rank's view, monotonic counters
            if not group.get("uncompressed"):
                print(
                    f"{name}: {group['hot_rows_used']:,} of {group['hot_rows']:,} hot rows held, "
                    f"{group['hot_lookup_share']:.0%} of {group['lookups']:,} lookups hit one"
                )

    # 5. Evaluate, then freeze for serving: every rank calls it, rank 0 gets the served model.
    model.eval()
    dense, kjt, labels = batch(torch.Generator().manual_seed(1000 + rank), 4096)
    with torch.no_grad():
        trained = torch.sigmoid(model(dense, kjt).squeeze(-1))
    served_model = quantize_inference_model(model, torch.int8)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    auc = float(torchmetrics.functional.auroc(trained, labels.long(), task="binary"))
    print(f"rank {rank}: train loss {first:.4f} -> {last:.4f}, test AUC {auc:.4f}")
    if served_model is not None:
        with torch.no_grad():
            served = torch.sigmoid(served_model(dense, kjt).squeeze(-1))
        gap = float((served - trained).abs().max())
        print(f"serving (INT8): max |p_served - p_trained| {gap:.4f}")
        if gap > 0.05:
            raise SystemExit(f"the served model disagrees with the trained one by {gap:.4f}")
    if not (last < first and auc > 0.6):
        raise SystemExit(f"training did not learn (loss {first:.4f} -> {last:.4f}, AUC {auc:.4f})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
