"""Samples/s of sharded CAFE against the stock sharded EmbeddingBagCollection with the same
physical rows, at world size 1, 2 and 4 (gloo, CPU), measured side by side in one run.

    python -m benchmarks.throughput [--batch 4096] [--steps 5] [--rounds 9] [--worlds 1 2 4]
    python -m benchmarks.throughput --profile     # where CAFE's extra time goes, world size 1

Both sides get the same DLRM-sized input (26 features, Zipf 1.05 ids over the Criteo Kaggle
cardinalities) and the same fused row-wise Adagrad; the stock side looks up id mod rows in a
table shaped exactly like CAFE's physical table, so the ratio is CAFE's own overhead
(pre-hash, remap, sketch, migration). Each rank builds both models and times them in
alternating blocks; the table gives the median per-round ratio (and its range), which moves far
less than the absolute samples/s on a shared machine.

`--profile` runs one rank with every piece of work on the caller's thread
(CAFE_SKETCH_THREAD=0) under torch.profiler and splits a step's CPU time: the CAFE ops
(pre-hash, lookup, importance, insert, rebalance), CAFE's profiler ranges (`## cafe: ... ##`,
their Python and tensor work around the ops), the TBE kernels, and what is left; stock's step
beside it. With the sketch thread on (the default), importance, insert and rebalance overlap
the TBE backward where a core is free.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from benchmarks.common import machine, table
from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection
from cafe_torchrec.datasets import KAGGLE_CARDINALITIES as KAGGLE
from cafe_torchrec.distributed import CafeEmbeddingBagCollectionSharder
from tests.dist_utils import run_ranks

FEATURES = [f"cat_{i}" for i in range(26)]


def criteo_batches(batch: int, steps: int, seed: int) -> List[KeyedJaggedTensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = []
        for n in KAGGLE:
            u = torch.rand(batch, generator=gen, dtype=torch.float64)
            ranks = torch.floor(torch.exp(u * torch.log(torch.tensor(float(n) + 1)))) - 1  # ~Zipf(1) ranks
            ids.append((ranks.long() * 2654435761) % n)
        out.append(
            KeyedJaggedTensor.from_lengths_sync(
                keys=FEATURES, values=torch.cat(ids), lengths=torch.ones(26 * batch, dtype=torch.int64)
            )
        )
    return out


def tables(dim: int) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=n, feature_names=[f])
        for f, n in zip(FEATURES, KAGGLE)
    ]


def build(
    world: int, method: str, ratio: float, sharding: str
) -> Tuple[DistributedModelParallel, CafeEmbeddingBagCollection]:
    """A DMP of CAFE, or of the stock EBC over exactly CAFE's physical tables, with fused row-wise Adagrad."""
    torch.manual_seed(0)
    cafe = CafeEmbeddingBagCollection(tables(16), CafeConfig(compression_ratio=ratio))
    if method == "cafe":
        module, sharder = cafe, CafeEmbeddingBagCollectionSharder()
    else:  # the same physical tables, stock
        module = EmbeddingBagCollection(cafe.plan.physical_configs())
        sharder = _StockWithRowWise()
    _apply_optimizer_in_backward(RowWiseAdagrad, module.parameters(), {"lr": 0.01})
    names = [c.name for c in cafe.plan.physical_configs()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"),
        constraints={n: ParameterConstraints(sharding_types=[sharding]) for n in names},
    )
    plan = planner.collective_plan(module, [sharder], dist.GroupMember.WORLD)
    return DistributedModelParallel(module, device=torch.device("cpu"), plan=plan, sharders=[sharder]), cafe


def paired_rates(
    rank: int, world: int, ratio: float, batch: int, steps: int, rounds: int, sharding: str
) -> Dict[str, List[float]]:
    """Samples/s (all ranks) of `rounds` blocks of `steps` steps, stock and CAFE alternating in one
    process, so that a slow spell of the shared machine hits both sides of a round alike."""
    models = {m: build(world, m, ratio, sharding) for m in ("stock", "cafe")}
    cafe = models["cafe"][1]
    inputs = paired_inputs(criteo_batches(batch, steps * (rounds + 1), seed=rank), cafe)  # fresh ids in every block
    probe = torch.randn(batch, 26 * 16)

    def block(method: str, index: int) -> float:
        dmp = models[method][0]
        dist.barrier()
        start = time.perf_counter()
        for kjt in inputs[method][index * steps : (index + 1) * steps]:
            (dmp(kjt).values() * probe).sum().backward()
        dist.barrier()
        return batch * world * steps / (time.perf_counter() - start)

    for method in models:  # warm-up: first steps allocate, build input dists, fill the sketch
        block(method, 0)
    rates: Dict[str, List[float]] = {"stock": [], "cafe": []}
    for r in range(1, rounds + 1):
        for method in ("stock", "cafe"):
            rates[method].append(block(method, r))
    return rates


CAFE_OPS = (
    "cafe::prepare_ids",
    "cafe::remap_lookup",
    "cafe::occurrence_scores",
    "cafe::sketch_insert",
    "cafe::sketch_rebalance",
)
CAFE_RANGES = (
    "## cafe: input check and pre-hash ##",
    "## cafe: remap ##",
    "## cafe: importance and sketch insert ##",
    "## cafe: migration ##",
)


def profile_phases(rank: int, world: int, ratio: float, batch: int, steps: int, sharding: str) -> List[list]:
    """Per step CPU ms of stock and CAFE, and CAFE's parts (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    models = {m: build(world, m, ratio, sharding) for m in ("stock", "cafe")}
    cafe = models["cafe"][1]
    inputs = paired_inputs(criteo_batches(batch, 2 * steps, seed=rank), cafe)
    probe = torch.randn(batch, 26 * 16)
    totals, events = {}, {}
    for method, (dmp, _) in models.items():
        for kjt in inputs[method][:steps]:  # warm-up
            (dmp(kjt).values() * probe).sum().backward()
        start = time.thread_time()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for kjt in inputs[method][steps:]:
                (dmp(kjt).values() * probe).sum().backward()
        totals[method] = (time.thread_time() - start) / steps * 1e3
        events[method] = {e.key: e for e in prof.key_averages()}
    ms = {k: e.self_cpu_time_total / steps / 1e3 for k, e in events["cafe"].items()}
    rows = [
        ["stock step", totals["stock"]],
        ["CAFE step", totals["cafe"]],
        ["CAFE - stock", totals["cafe"] - totals["stock"]],
    ]
    for op in CAFE_OPS:
        rows.append([f"  {op}", ms.get(op, 0.0)])
    for label in CAFE_RANGES:
        event = events["cafe"].get(label)
        total = event.cpu_time_total / steps / 1e3 if event is not None else 0.0
        rows.append([f"  {label} (total, ops included)", total])
    rows.append(["CAFE / stock (CPU time)", totals["stock"] / totals["cafe"]])
    return rows


def paired_inputs(
    batches: List[KeyedJaggedTensor], cafe: CafeEmbeddingBagCollection
) -> Dict[str, List[KeyedJaggedTensor]]:
    """The same batches for both sides: CAFE's as they are, stock's as the rows of CAFE's
    physical tables they stand for (in CAFE's inner feature order)."""
    stock = [
        KeyedJaggedTensor.from_lengths_sync(
            keys=cafe.feature_map.inner, values=_stock_ids(b, cafe), lengths=b.lengths()
        )
        for b in batches
    ]
    return {"cafe": batches, "stock": stock}


def _stock_ids(kjt: KeyedJaggedTensor, cafe: CafeEmbeddingBagCollection) -> torch.Tensor:
    """id mod rows of each feature's physical table (the hashing the stock table stands for)."""
    prepared = cafe.feature_map.prepare(kjt)
    rows = {c.name: c.num_embeddings for c in cafe.plan.physical_configs()}
    per_feature = torch.tensor([rows[cafe.feature_map.info[f].table] for f in prepared.keys()])
    return torch.remainder(prepared.values(), per_feature.repeat_interleave(torch.tensor(prepared.length_per_key())))


class _StockWithRowWise(EmbeddingBagCollectionSharder):
    def sharding_types(self, compute_device_type: str) -> List[str]:
        return sorted(set(super().sharding_types(compute_device_type)) | {"row_wise"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4096, help="samples per rank per step")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=9, help="stock/CAFE block pairs per world size")
    parser.add_argument("--ratio", type=float, default=1000.0)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sharding", choices=["table_wise", "row_wise"], default="row_wise")
    parser.add_argument("--profile", action="store_true", help="split a world-size-1 step's CPU time instead")
    args = parser.parse_args()
    if args.profile:
        os.environ["CAFE_SKETCH_THREAD"] = "0"  # every piece of work on the thread the profile sees
        print(f"machine: {machine()}")
        print(
            f"one rank, 26 Criteo Kaggle features, {args.batch} samples/step, {args.ratio:g}x, {args.sharding}, "
            f"{args.steps * 4} profiled steps, all work on one thread"
        )
        rows = run_ranks(profile_phases, 1, args.ratio, args.batch, args.steps * 4, args.sharding)[0]
        print(table(["per step", "CPU ms"], rows))
        return
    print(f"machine: {machine()}")
    print(
        f"26 Criteo Kaggle features, {args.batch} samples/rank/step, {args.ratio:g}x, {args.sharding}, "
        "fused row-wise Adagrad\n"
    )
    rows = []
    for world in tqdm(args.worlds, desc="world sizes"):
        rates = run_ranks(paired_rates, world, args.ratio, args.batch, args.steps, args.rounds, args.sharding)[0]
        ratios = [c / s for s, c in zip(rates["stock"], rates["cafe"])]
        rows.append(
            [
                world,
                statistics.median(rates["stock"]),
                statistics.median(rates["cafe"]),
                statistics.median(ratios),
                min(ratios),
                max(ratios),
            ]
        )
    print(table(["world", "stock EBC samples/s", "CAFE samples/s", "CAFE / stock (median)", "min", "max"], rows))
    print(f"(medians over {args.rounds} rounds; a round is {args.steps} stock steps then {args.steps} CAFE steps)")


if __name__ == "__main__":
    main()
