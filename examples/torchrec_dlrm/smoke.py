"""The TorchRec calls of TorchRec's reference DLRM trainer, with CAFE swapped in, on random data.

The reference trainer is `torchrec_dlrm/dlrm_main.py` of facebookresearch/dlrm (run it
itself with `run.sh` and `cafe.patch` beside this file). This script makes the same TorchRec
calls in the same order, with the two edits a user makes: the collection is a
`CafeEmbeddingBagCollection` (built on the meta device, as the reference builds its stock one)
and `CafeEmbeddingBagCollectionSharder` joins the default sharders. It runs in either mode:

- one-hot: `DLRM`, SGD embeddings, `RandomRecDataset` batches (int64 ids, int32 lengths and
  offsets);
- DCN + multi-hot: `DLRM_DCN`, Adagrad embeddings, the one-hot batches turned into multi-hot
  bags the way the reference's multi-hot mode does it (each id picks an int32 lookup row:
  int32 ids, int64 offsets and lengths).

The calls, in order: `RandomRecDataset` in a `DataLoader`; `EmbeddingBagConfig` per Criteo
feature; the collection on `torch.device("meta")`; `DLRM` / `DLRM_DCN`; `DLRMTrain`;
`apply_optimizer_in_backward` over `model.sparse_arch.parameters()`;
`EmbeddingShardingPlanner(Topology(local_world_size=get_local_size(), ...), batch_size,
HeuristicalStorageReservation(0.05))` and `collective_plan`; `DistributedModelParallel`;
`KeyedOptimizerWrapper` over `in_backward_optimizer_filter(model.named_parameters())`;
`CombinedOptimizer([model.fused_optimizer, dense])`; an LR scheduler over it;
`KeyedJaggedTensor.from_offsets_sync` (multi-hot); `TrainPipelineSparseDist(...,
execute_all_batches=True)` with `progress()` then `scheduler.step()` per batch; evaluation with
the same pipeline under `eval()` + `no_grad()`, a two-class `torchmetrics.AUROC` on
`stack((1 - p, p))` and a `dist.reduce` of the sample count.

One addition: labels are set to `dense_features[:, 0] > 0` (the reference's random labels
cannot be learnt), so the loss must fall and the AUC rise if training works.

Run it on 2 gloo ranks:

    torchx run -s local_cwd dist.ddp -j 1x2 --script examples/torchrec_dlrm/smoke.py -- --mode dcn_multi_hot
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchmetrics
from torch.utils.data import DataLoader
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES
from torchrec.datasets.random import RandomRecDataset
from torchrec.datasets.utils import Batch
from torchrec.distributed import TrainPipelineSparseDist
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.types import ShardingPlan
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection
from cafe_torchrec.distributed import CafeEmbeddingBagCollectionSharder

# Criteo 1TB table sizes (the reference README's), capped so a CPU smoke run stays small; the
# tables of 200 rows or fewer stay plain at 10x (CAFE's rule), as Criteo's small fields do.
CRITEO_1TB_ROWS = [
    40000000,
    39060,
    17295,
    7424,
    20265,
    3,
    7122,
    1543,
    63,
    40000000,
    3067956,
    405282,
    10,
    2209,
    11938,
    155,
    4,
    976,
    14,
    40000000,
    40000000,
    40000000,
    590152,
    12973,
    108,
    36,
]
SMOKE_ROWS = [min(n, 2000) for n in CRITEO_1TB_ROWS]
# The multi-hot sizes of the MLPerf DLRM v2 benchmark (the reference README's).
MLPERF_MULTI_HOT_SIZES = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
MODES = ("one_hot", "dcn_multi_hot")


@dataclass
class SmokeConfig:
    """One run; defaults are the one-hot mode at smoke size (see `for_mode`)."""

    mode: str = "one_hot"
    num_embeddings_per_feature: List[int] = field(default_factory=lambda: list(SMOKE_ROWS))
    multi_hot_sizes: Optional[List[int]] = None
    embedding_dim: int = 16
    dense_arch_layer_sizes: List[int] = field(default_factory=lambda: [32, 16])
    over_arch_layer_sizes: List[int] = field(default_factory=lambda: [32, 16, 1])
    dcn_num_layers: int = 2
    dcn_low_rank_dim: int = 8
    adagrad: bool = False
    learning_rate: float = 1.0
    eps: float = 1e-8
    lr_warmup_steps: int = 3
    batch_size: int = 64
    train_batches: int = 60
    eval_batches: int = 4
    compression_ratio: float = 10.0
    seed: int = 0

    @classmethod
    def for_mode(cls, mode: str, **overrides: Any) -> "SmokeConfig":
        """one_hot: DLRM with SGD (the reference's defaults); dcn_multi_hot: DLRM_DCN, Adagrad and
        the MLPerf multi-hot sizes (the reference README's MLPerf command)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "dcn_multi_hot":
            overrides = {
                "multi_hot_sizes": list(MLPERF_MULTI_HOT_SIZES),
                "adagrad": True,
                "learning_rate": 0.05,
                **overrides,
            }
        return cls(mode=mode, **overrides)


class MappedLoader:
    """A data loader whose batches pass through `fn` (the reference wraps its loaders this way)."""

    def __init__(self, fn: Callable[[Batch], Batch], source: Iterable[Batch]) -> None:
        self.fn = fn
        self.source = source

    def __iter__(self) -> Iterator[Batch]:
        return (self.fn(batch) for batch in self.source)

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]


class MultiHot:
    """One-hot batches -> multi-hot bags, built as the reference's multi-hot mode builds them.

    Feature k's id i picks row i of an int32 lookup table of `sizes[k]` ids (i itself, then
    uniform draws below the table size), seeded alike on every rank. The bag's ids are thus
    int32 and its offsets (a cumulative sum of the sizes) int64.
    """

    def __init__(self, sizes: List[int], num_embeddings: List[int], seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.sizes = sizes
        self.tables = [
            torch.cat(
                [torch.arange(rows).unsqueeze(1), torch.randint(0, rows, (rows, size - 1), generator=gen)], dim=1
            ).to(torch.int32)
            for rows, size in zip(num_embeddings, sizes)
        ]

    def __call__(self, batch: Batch) -> Batch:
        features = batch.sparse_features
        batch_size = batch.dense_features.shape[0]
        one_hot = features.values().view(len(self.tables), batch_size)
        values = torch.cat([F.embedding(ids, table).reshape(-1) for ids, table in zip(one_hot, self.tables)])
        lengths = torch.tensor(self.sizes).repeat_interleave(batch_size)
        offsets = torch.cat([torch.zeros(1, dtype=lengths.dtype), lengths.cumsum(0)])
        sparse = KeyedJaggedTensor.from_offsets_sync(keys=features.keys(), values=values, offsets=offsets)
        return Batch(dense_features=batch.dense_features, sparse_features=sparse, labels=batch.labels)


def learnable_labels(batch: Batch) -> Batch:
    """Labels a DLRM can learn: 1 where the first dense feature is positive."""
    labels = (batch.dense_features[:, 0] > 0).to(batch.labels.dtype)
    return Batch(dense_features=batch.dense_features, sparse_features=batch.sparse_features, labels=labels)


def random_loader(cfg: SmokeConfig, stage: str, rank: int) -> MappedLoader:
    """The reference's random data loader (`RandomRecDataset`, one id per feature), then the
    labels above and, in multi-hot mode, the multi-hot bags."""
    num_batches = cfg.train_batches if stage == "train" else cfg.eval_batches
    stage_seed = {"train": 0, "val": 1, "test": 2}[stage]
    loader = DataLoader(
        RandomRecDataset(
            keys=DEFAULT_CAT_NAMES,
            batch_size=cfg.batch_size,
            hash_sizes=cfg.num_embeddings_per_feature,
            manual_seed=cfg.seed * 1000 + 10 * rank + stage_seed,
            ids_per_feature=1,
            num_dense=len(DEFAULT_INT_NAMES),
            num_batches=num_batches,
        ),
        batch_size=None,
        batch_sampler=None,
        pin_memory=False,
        num_workers=0,
    )
    mapped = MappedLoader(learnable_labels, loader)
    if cfg.multi_hot_sizes is not None:
        mapped = MappedLoader(MultiHot(cfg.multi_hot_sizes, cfg.num_embeddings_per_feature, cfg.seed), mapped)
    return mapped


def build_model(cfg: SmokeConfig, device: torch.device) -> DLRMTrain:
    """DLRM (one-hot) or DLRM_DCN (multi-hot) over a CAFE collection built on the meta device."""
    tables = [
        EmbeddingBagConfig(name=f"t_{name}", embedding_dim=cfg.embedding_dim, num_embeddings=rows, feature_names=[name])
        for name, rows in zip(DEFAULT_CAT_NAMES, cfg.num_embeddings_per_feature)
    ]
    collection = CafeEmbeddingBagCollection(
        tables=tables, cafe=CafeConfig(compression_ratio=cfg.compression_ratio), device=torch.device("meta")
    )
    common = dict(
        embedding_bag_collection=collection,
        dense_in_features=len(DEFAULT_INT_NAMES),
        dense_arch_layer_sizes=cfg.dense_arch_layer_sizes,
        over_arch_layer_sizes=cfg.over_arch_layer_sizes,
        dense_device=device,
    )
    if cfg.mode == "dcn_multi_hot":
        return DLRMTrain(DLRM_DCN(dcn_num_layers=cfg.dcn_num_layers, dcn_low_rank_dim=cfg.dcn_low_rank_dim, **common))
    return DLRMTrain(DLRM(**common))


def shard(model: DLRMTrain, cfg: SmokeConfig, device: torch.device) -> Tuple[DistributedModelParallel, ShardingPlan]:
    """In-backward embedding optimizer, the reference's planner, and DMP with the CAFE sharder."""
    embedding_optimizer = torch.optim.Adagrad if cfg.adagrad else torch.optim.SGD
    kwargs: Dict[str, float] = {"lr": cfg.learning_rate}
    if cfg.adagrad:
        kwargs["eps"] = cfg.eps
    apply_optimizer_in_backward(embedding_optimizer, model.model.sparse_arch.parameters(), kwargs)
    planner = EmbeddingShardingPlanner(
        topology=Topology(
            local_world_size=get_local_size(), world_size=dist.get_world_size(), compute_device=device.type
        ),
        batch_size=cfg.batch_size,
        storage_reservation=HeuristicalStorageReservation(percentage=0.05),
    )
    sharders = [CafeEmbeddingBagCollectionSharder(), *get_default_sharders()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders), plan


def make_optimizer(model: DistributedModelParallel, cfg: SmokeConfig) -> Tuple[CombinedOptimizer, Any]:
    """The fused embedding optimizer and a keyed dense one, combined, and a warmup LR scheduler."""
    if cfg.adagrad:

        def dense(params: Any) -> torch.optim.Optimizer:
            return torch.optim.Adagrad(params, lr=cfg.learning_rate, eps=cfg.eps)
    else:

        def dense(params: Any) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=cfg.learning_rate)

    dense_optimizer = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())), dense)
    optimizer = CombinedOptimizer([model.fused_optimizer, dense_optimizer])
    warmup = max(cfg.lr_warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return optimizer, scheduler


def record_input_dtypes(sharded: Any) -> List[Dict[str, str]]:
    """Record the dtypes of every KJT the sharded collection's input_dist receives (observation only)."""
    seen: List[Dict[str, str]] = []
    input_dist = sharded.input_dist

    def recording(ctx: Any, features: KeyedJaggedTensor) -> Any:
        seen.append(
            {
                "ids": str(features.values().dtype),
                "lengths": str(features.lengths().dtype),
                "offsets": str(features.offsets().dtype),
            }
        )
        return input_dist(ctx, features)

    sharded.input_dist = recording
    return seen


def train(
    pipeline: TrainPipelineSparseDist, model: torch.nn.Module, loader: MappedLoader, scheduler: Any
) -> List[float]:
    """One epoch: progress() then scheduler.step() per batch until the pipeline runs dry."""
    model.train()
    batches = iter(loader)
    losses = []
    while True:
        try:
            loss, _logits, _labels = pipeline.progress(batches)
        except StopIteration:
            return losses
        scheduler.step()
        losses.append(float(loss))


def evaluate(pipeline: TrainPipelineSparseDist, model: torch.nn.Module, loader: MappedLoader) -> Dict[str, float]:
    """AUROC over every rank's batches, as the reference computes it, and the sample count on rank 0."""
    model.eval()
    batches = iter(loader)
    auroc = torchmetrics.AUROC(task="multiclass", num_classes=2)
    with torch.no_grad():
        while True:
            try:
                _loss, logits, labels = pipeline.progress(batches)
            except StopIteration:
                break
            preds = torch.sigmoid(logits)
            auroc(torch.stack((1 - preds, preds), dim=1), labels)
    result = auroc.compute().item()
    num_samples = torch.tensor(sum(map(len, auroc.target)))
    dist.reduce(num_samples, 0, op=dist.ReduceOp.SUM)
    return {"auc": result, "samples": int(num_samples)}


def run(cfg: SmokeConfig) -> Dict[str, Any]:
    """Build, shard, train one epoch, evaluate val and test; what a test needs to check it."""
    torch.manual_seed(cfg.seed)
    device = torch.device("cpu")
    rank = dist.get_rank()
    loaders = {stage: random_loader(cfg, stage, rank) for stage in ("train", "val", "test")}
    model, plan = shard(build_model(cfg, device), cfg, device)
    optimizer, scheduler = make_optimizer(model, cfg)
    sharded = model.module.model.sparse_arch.embedding_bag_collection
    input_dtypes = record_input_dtypes(sharded)
    pipeline = TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)
    losses = train(pipeline, model, loaders["train"], scheduler)
    val = evaluate(pipeline, model, loaders["val"])
    test = evaluate(pipeline, model, loaders["test"])
    return {
        "mode": cfg.mode,
        "losses": losses,
        "val": val,
        "test": test,
        "input_dtypes": input_dtypes,
        "sharded_type": type(sharded).__name__,
        "stats": sharded.stats(),
        "plan": plan_summary(plan),
        "lr": [group["lr"] for group in optimizer.param_groups],
    }


def plan_summary(plan: ShardingPlan) -> Dict[str, str]:
    """{physical table: sharding type} of the sparse arch's collection."""
    return {table: p.sharding_type for module_plan in plan.plan.values() for table, p in module_plan.items()}


def main(argv: List[str]) -> None:
    """Entry point under torchrun / torchx dist.ddp: one run, printed on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="one_hot")
    parser.add_argument("--train_batches", type=int, default=SmokeConfig.train_batches)
    parser.add_argument("--compression_ratio", type=float, default=SmokeConfig.compression_ratio)
    args = parser.parse_args(argv)
    dist.init_process_group(backend="gloo")
    try:
        out = run(
            SmokeConfig.for_mode(args.mode, train_batches=args.train_batches, compression_ratio=args.compression_ratio)
        )
        promotions = [0] * dist.get_world_size()
        dist.all_gather_object(promotions, sum(s.get("promotions", 0) for s in out["stats"].values()))
        if dist.get_rank() == 0:
            first, last = out["losses"][:5], out["losses"][-5:]
            print(f"mode {out['mode']}: plan {out['plan']}")
            print(f"ids reaching the CAFE collection: {out['input_dtypes'][0]}")
            print(
                f"train loss: first 5 steps {sum(first) / len(first):.4f}, last 5 {sum(last) / len(last):.4f}"
                f" ({len(out['losses'])} steps, finite: {all(math.isfinite(x) for x in out['losses'])})"
            )
            print(f"AUROC over val set: {out['val']['auc']:.4f} ({out['val']['samples']} samples)")
            print(f"AUROC over test set: {out['test']['auc']:.4f} ({out['test']['samples']} samples)")
            print(f"CAFE promotions per rank: {promotions}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
