"""Train TorchRec's DLRM on Criteo-like data with a CAFE (or baseline) embedding collection.

Runs as one process (`python examples/dlrm/train.py ...`) or under torchrun / TorchX
(`torchx run -s local_cwd examples/dlrm/component.py:train --nproc 2 -- ...`): gloo on CPU,
NCCL on GPUs (device cuda:LOCAL_RANK). The model is `DistributedModelParallel` over
`DLRMTrain(DLRM | DLRM_DCN)` with `[CafeEmbeddingBagCollectionSharder(), *get_default_sharders()]`
and a plan from `EmbeddingShardingPlanner.collective_plan`; training runs through
`TrainPipelineSparseDist`, the embedding optimizer is fused in backward, the dense one is a
`KeyedOptimizerWrapper` combined with `model.fused_optimizer`.

Data: `--data synthetic` (SyntheticCriteo: train on every day but the last, test on the
last), `--data tsv` (raw Criteo TSV, chronological split at `--train-rows`) or `--data npy`
(TorchRec's day files; train on every day but the last). Batch k of a split goes to rank
k % world_size; each rank runs the same number of steps.

Training is cut into segments at evaluation and checkpoint steps; the pipeline is drained
at each boundary, so evaluation (model.eval() + no_grad: no sketch update) and checkpoints
see a quiescent model and a checkpoint's data position is exactly its step.

Output (rank 0): `<out-dir>/<run-name>.json` (method, memory, compression ratio, test AUC and
log loss, average online training loss, samples/s, histories) and `<run-name>.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script (torchrun examples/dlrm/train.py): import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import logging
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

NUM_DENSE = 13

# TorchRec 1.8 / torch 2.13 deprecation chatter that says nothing about this run
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\.")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.")
for _name in ("torchrec.distributed.planner", "torch.fx._symbolic_trace"):
    logging.getLogger(_name).setLevel(logging.ERROR)
SHARDINGS = ("auto", "table_wise", "row_wise")
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


class InjectedFailure(RuntimeError):
    """Raised by --fail-at-step / --fail-rank (a test hook)."""


# ----------------------------------------------------------------------------- arguments
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from examples.dlrm.embeddings import METHODS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--embedding", choices=METHODS, default="cafe", help="embedding collection")
    g.add_argument("--compression-ratio", type=float, default=100.0, help="logical / physical embedding bytes")
    g.add_argument("--embedding-dim", type=int, default=16)
    g.add_argument("--interaction", choices=("dot", "dcn"), default="dot", help="DLRM (dot) or DLRM_DCN")
    g.add_argument("--dense-arch", default=None, help="dense arch layer sizes, comma separated (default: 64,<dim>)")
    g.add_argument("--over-arch", default="64,32,1", help="over arch layer sizes, comma separated (last: 1)")
    g.add_argument("--dcn-num-layers", type=int, default=2)
    g.add_argument("--dcn-low-rank-dim", type=int, default=32)
    g.add_argument("--cafe-threshold", type=float, default=None, help="CAFE hot threshold (default: per ratio)")
    g.add_argument("--cafe-hot-share", type=float, default=None, help="CAFE hot memory share (default: per ratio)")
    g.add_argument("--cafe-importance", choices=("gradient", "frequency"), default="gradient")
    g.add_argument("--baseline-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra constructor argument of a baseline, e.g. collisions=global (qr), eviction_interval=50 (mc)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=1024, help="per-rank batch size")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="rowwise_adagrad", help="embedding optimizer (fused)")
    g.add_argument("--learning-rate", type=float, default=0.05, help="embedding learning rate")
    g.add_argument("--dense-optimizer", choices=("adagrad", "sgd", "adam"), default="adagrad")
    g.add_argument("--dense-lr", type=float, default=0.01, help="dense learning rate")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: the whole split)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=("synthetic", "tsv", "npy"), default="synthetic")
    g.add_argument("--cardinality-scale", type=float, default=None,
                   help="logical cardinalities = Criteo Kaggle cardinalities x scale (default: 0.01 synthetic, 1 tsv/npy)")
    g.add_argument("--cardinalities", default=None, help="explicit logical cardinalities, 26 comma separated")
    g.add_argument("--days", type=int, default=3, help="synthetic days (train on all but the last)")
    g.add_argument("--samples-per-day", type=int, default=1 << 17, help="synthetic samples per day")
    g.add_argument("--drift", type=float, default=0.1, help="synthetic: share of popular ids replaced per day")
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--tsv-path", nargs="+", default=None, help="raw Criteo TSV file(s), in time order")
    g.add_argument("--train-rows", type=int, default=None, help="tsv: rows for training (default: 80%%)")
    g.add_argument("--test-rows", type=int, default=None, help="tsv: rows for testing after the training rows (default: the rest)")
    g.add_argument("--tsv-on-error", choices=("raise", "skip"), default="raise")
    g.add_argument("--npy-root", default=None, help="directory of day_{i}_{dense,sparse,labels}.npy")
    g.add_argument("--npy-days", default=None, help="npy: comma separated days (default: all found; last is the test day)")
    g = p.add_argument_group("distribution")
    g.add_argument("--sharding", choices=SHARDINGS, default="auto", help="sharding of the physical embedding tables")
    g.add_argument("--cpu", action="store_true", help="stay on CPU (gloo) even when CUDA is available")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: $OMP_NUM_THREADS, else 1: more threads next to gloo's "
                        "made small CPU steps ~30x slower on a 2-core host)")
    g = p.add_argument_group("evaluation, checkpoints, output")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--eval-batches", type=int, default=None, help="per-rank test batches of periodic evaluations (final: all)")
    g.add_argument("--log-every", type=int, default=10, help="loss / hot-share aggregation interval (steps)")
    g.add_argument("--checkpoint-dir", default=None)
    g.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep the last K checkpoints")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint directory, or the latest one in --checkpoint-dir")
    g.add_argument("--out-dir", default="results")
    g.add_argument("--run-name", default=None, help="name of the JSON / PNG (default: <embedding>)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--no-plot", action="store_true")
    g = p.add_argument_group("test hooks")
    g.add_argument("--fail-at-step", type=int, default=None, help="raise InjectedFailure before this step")
    g.add_argument("--fail-rank", type=int, default=0, help="the rank that fails (with --fail-at-step)")
    args = p.parse_args(argv)
    if args.batch_size <= 0 or args.log_every <= 0:
        p.error("--batch-size and --log-every must be positive")
    if args.checkpoint_every and not args.checkpoint_dir:
        p.error("--checkpoint-every needs --checkpoint-dir")
    if args.resume == "latest" and not args.checkpoint_dir:
        p.error("--resume without a path needs --checkpoint-dir")
    if args.data == "tsv" and not args.tsv_path:
        p.error("--data tsv needs --tsv-path")
    if args.data == "npy" and not args.npy_root:
        p.error("--data npy needs --npy-root")
    if args.data == "synthetic" and args.days < 2:
        p.error("--days must be >= 2 (train on all days but the last, test on the last)")
    args.run_name = args.run_name or args.embedding
    if args.cardinality_scale is None:
        args.cardinality_scale = 0.01 if args.data == "synthetic" else 1.0
    if args.cardinality_scale <= 0:
        p.error("--cardinality-scale must be positive")
    return args


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _options(pairs: Sequence[str]) -> Dict[str, Any]:
    """KEY=VALUE strings -> a dict, values as int, float, bool or str."""
    out: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--baseline-option {pair!r}: expected KEY=VALUE")
        parsed: Any = value
        for conv in (int, float):
            try:
                parsed = conv(value)
                break
            except ValueError:
                continue
        if value in ("true", "false", "True", "False"):
            parsed = value.lower() == "true"
        out[key.strip()] = parsed
    return out


# ----------------------------------------------------------------------------- process group
@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    created: bool  # this run created the process group (and destroys it)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(args: argparse.Namespace) -> Dist:
    """From torchrun's env vars when present, else a 1-process group; NCCL on CUDA, gloo on CPU."""
    use_cuda = torch.cuda.is_available() and not args.cpu
    backend = "nccl" if use_cuda else "gloo"
    created = False
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
        created = True
    else:
        rank, world = 0, 1
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        created = True
    local_rank = int(os.environ.get("LOCAL_RANK", rank if world > 1 else 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return Dist(rank, world, local_rank, local_world, device, created)


# ----------------------------------------------------------------------------- data
@dataclass
class Data:
    """This rank's view of the train and test splits."""

    cardinalities: List[int]
    train_steps: int  # per rank, equal on every rank
    test_batches: int  # per rank, equal on every rank
    train_from: Callable[[int], Iterator[Batch]]  # step -> this rank's batches from that step on
    test: Callable[[], Iterator[Batch]]
    description: Dict[str, Any] = field(default_factory=dict)


def _count_rows(paths: Sequence[str]) -> int:
    from examples.dlrm.data.criteo_tsv import _open_text

    n = 0
    for path in paths:
        with _open_text(path) as handle:
            n += sum(1 for _ in handle)
    return n


def _logical_cardinalities(args: argparse.Namespace) -> List[int]:
    from examples.dlrm.data import KAGGLE_CARDINALITIES

    if args.cardinalities:
        cards = _ints(args.cardinalities)
        if len(cards) != len(KAGGLE_CARDINALITIES):
            raise ValueError(f"--cardinalities needs {len(KAGGLE_CARDINALITIES)} values, got {len(cards)}")
        return cards
    return [max(1, round(c * args.cardinality_scale)) for c in KAGGLE_CARDINALITIES]


def make_data(args: argparse.Namespace, rank: int, world: int) -> Data:
    bs = args.batch_size
    if args.data == "synthetic":
        from examples.dlrm.data import KAGGLE_CARDINALITIES, SyntheticCriteo, SyntheticCriteoConfig

        base = tuple(_ints(args.cardinalities)) if args.cardinalities else KAGGLE_CARDINALITIES
        cfg = SyntheticCriteoConfig(cardinalities=base, cardinality_scale=1.0 if args.cardinalities else args.cardinality_scale,
                                    num_days=args.days, samples_per_day=args.samples_per_day, drift=args.drift,
                                    seed=args.data_seed)
        train = SyntheticCriteo(cfg, bs, rank=rank, world_size=world, days=range(args.days - 1))
        test = SyntheticCriteo(cfg, bs, rank=rank, world_size=world, days=[args.days - 1])
        bpd = train.batches_per_day
        train_steps = len(train.days) * bpd // world
        test_batches = bpd // world

        def stream(ds: SyntheticCriteo, start: int, count: int) -> Iterator[Batch]:
            for i in range(start, count):
                day_pos, index_in_day = divmod(rank + i * world, bpd)
                yield ds.batch(ds.days[day_pos], index_in_day)

        return Data(train.cardinalities, train_steps, test_batches,
                    lambda start: stream(train, start, train_steps), lambda: stream(test, 0, test_batches),
                    {"data": "synthetic", "days": args.days, "samples_per_day": args.samples_per_day,
                     "drift": args.drift, "cardinality_scale": args.cardinality_scale,
                     "train_days": list(train.days), "test_day": args.days - 1})
    if args.data == "tsv":
        from examples.dlrm.data import CriteoTsvConfig, CriteoTsvReader

        paths = list(args.tsv_path)
        total = _count_rows(paths) if args.train_rows is None or args.test_rows is None else None
        train_rows = args.train_rows if args.train_rows is not None else int(0.8 * total)
        test_stop = train_rows + args.test_rows if args.test_rows is not None else total
        train_steps = train_rows // bs // world
        test_batches = (test_stop - train_rows) // bs // world

        def tsv_train(start: int) -> Iterator[Batch]:
            if args.tsv_on_error == "raise":  # batch boundaries do not move: start at the row
                cfg = CriteoTsvConfig(paths=paths, batch_size=bs, drop_last=True, rank=rank, world_size=world,
                                      start_row=start * world * bs, stop_row=train_rows, on_error="raise")
                return islice(iter(CriteoTsvReader(cfg)), train_steps - start)
            cfg = CriteoTsvConfig(paths=paths, batch_size=bs, drop_last=True, rank=rank, world_size=world,
                                  stop_row=train_rows, on_error="skip")
            return islice(iter(CriteoTsvReader(cfg)), start, train_steps)

        def tsv_test() -> Iterator[Batch]:
            cfg = CriteoTsvConfig(paths=paths, batch_size=bs, drop_last=True, rank=rank, world_size=world,
                                  start_row=train_rows, stop_row=test_stop, on_error=args.tsv_on_error)
            return islice(iter(CriteoTsvReader(cfg)), test_batches)

        return Data(_logical_cardinalities(args), train_steps, test_batches, tsv_train, tsv_test,
                    {"data": "tsv", "paths": [str(x) for x in paths], "train_rows": train_rows,
                     "test_rows": test_stop - train_rows, "cardinality_scale": args.cardinality_scale})
    from examples.dlrm.data import CriteoNpyConfig, CriteoNpyReader

    root = Path(args.npy_root)
    if args.npy_days:
        days = _ints(args.npy_days)
    else:
        days = sorted(int(p.name.split("_")[1]) for p in root.glob("day_*_labels.npy"))
    if len(days) < 2:
        raise ValueError(f"{root}: need at least 2 npy days (train on all but the last), found {days}")
    train_days, test_day = days[:-1], days[-1]

    def npy(days_: List[int], start: int, count: int) -> Iterator[Batch]:
        cfg = CriteoNpyConfig(root=root, days=days_, batch_size=bs, drop_last=True, rank=rank, world_size=world,
                              start_row=start * world * bs)
        return islice(iter(CriteoNpyReader(cfg)), count - start)

    train_rows = CriteoNpyReader(CriteoNpyConfig(root=root, days=train_days, batch_size=bs)).num_rows
    test_rows = CriteoNpyReader(CriteoNpyConfig(root=root, days=[test_day], batch_size=bs)).num_rows
    train_steps, test_batches = train_rows // bs // world, test_rows // bs // world
    return Data(_logical_cardinalities(args), train_steps, test_batches,
                lambda start: npy(train_days, start, train_steps), lambda: npy([test_day], 0, test_batches),
                {"data": "npy", "root": str(root), "train_days": train_days, "test_day": test_day,
                 "cardinality_scale": args.cardinality_scale})


def modulo_ids(stream: Iterator[Batch], cardinalities: Sequence[int]) -> Iterator[Batch]:
    """Ids taken modulo each feature's cardinality (for uncompressed stock tables)."""
    sizes = torch.tensor(cardinalities, dtype=torch.int64)
    for batch in stream:
        kjt = batch.sparse_features
        per_id = torch.repeat_interleave(sizes, torch.tensor(kjt.length_per_key()))
        values = torch.remainder(kjt.values(), per_id)
        yield Batch(batch.dense_features,
                    KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths(), stride=kjt.stride()),
                    batch.labels)


def int64_lengths(stream: Iterator[Batch]) -> Iterator[Batch]:
    """The same batches with int64 KJT lengths."""
    for batch in stream:
        kjt = batch.sparse_features
        yield Batch(batch.dense_features,
                    KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths().long(),
                                      stride=kjt.stride()),
                    batch.labels)


# ----------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace, spec: Any, device: torch.device) -> torch.nn.Module:
    from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

    dense = _ints(args.dense_arch) if args.dense_arch else [64, args.embedding_dim]
    over = _ints(args.over_arch)
    if dense[-1] != args.embedding_dim:
        raise ValueError(f"--dense-arch must end with the embedding dim {args.embedding_dim}, got {dense}")
    if over[-1] != 1:
        raise ValueError(f"--over-arch must end with 1 (the logit), got {over}")
    if args.interaction == "dcn":
        model = DLRM_DCN(embedding_bag_collection=spec.module, dense_in_features=NUM_DENSE,
                         dense_arch_layer_sizes=dense, over_arch_layer_sizes=over,
                         dcn_num_layers=args.dcn_num_layers, dcn_low_rank_dim=args.dcn_low_rank_dim,
                         dense_device=device)
    else:
        model = DLRM(embedding_bag_collection=spec.module, dense_in_features=NUM_DENSE,
                     dense_arch_layer_sizes=dense, over_arch_layer_sizes=over, dense_device=device)
    return DLRMTrain(model)


def embedding_optimizer(args: argparse.Namespace):
    from torchrec.optim import RowWiseAdagrad

    if args.optimizer == "sgd":
        return torch.optim.SGD, {"lr": args.learning_rate}
    if args.optimizer == "adagrad":
        return torch.optim.Adagrad, {"lr": args.learning_rate}
    return RowWiseAdagrad, {"lr": args.learning_rate}


def dense_optimizer_factory(args: argparse.Namespace) -> Callable:
    cls = {"adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD, "adam": torch.optim.Adam}[args.dense_optimizer]
    return lambda params: cls(params, lr=args.dense_lr)


def make_sharders(args: argparse.Namespace, spec: Any, device: torch.device) -> List[Any]:
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import get_default_sharders

    from cafe_torchrec.distributed import CafeEmbeddingBagCollectionSharder

    defaults = get_default_sharders()
    if args.embedding.startswith("mc-") and device.type == "cpu":
        # TorchRec's MC-EBC sharder offers no sharding type on CPU (torchrec #2958): leave the managed
        # collision module unsharded and let DMP shard the stock EBC inside it.
        from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder

        defaults = [s for s in defaults if not isinstance(s, ManagedCollisionEmbeddingBagCollectionSharder)]
    if args.sharding == "row_wise" and device.type == "cpu" and not spec.is_cafe:
        # TorchRec's EBC sharder offers no row-wise on CPU; CAFE's physical-table sharder adds it (gloo runs it)
        from cafe_torchrec.distributed.sharder import PhysicalTablesSharder

        defaults = [PhysicalTablesSharder() if type(s) is EmbeddingBagCollectionSharder else s for s in defaults]
    return [CafeEmbeddingBagCollectionSharder(), *defaults]


def row_wise_safe(rows: int, world: int) -> bool:
    """Whether a row-wise split of `rows` gives every rank at least one row.

    A rank with an empty row-wise shard makes FBGEMM's CPU exact backward (get_hash_size in
    embedding_backward_split_cpu_template.cpp) scan hash_size_cumsum past its end for a non-zero
    size: undefined behaviour, seen as a spurious "CPU exact rowwise adagrad currently doesn't
    support embedding tables with more than 2B rows" on rank 1 now and then.
    """
    block = -(-rows // world)
    return rows > block * (world - 1)


def sharding_constraints(args: argparse.Namespace, spec: Any, world: int) -> Dict[str, Any]:
    """ParameterConstraints per physical table: --sharding on the tables it fits, table-wise for tiny ones."""
    from torchrec.distributed.planner import ParameterConstraints

    constraints = {}
    for name, rows in spec.physical_tables().items():
        if world > 1 and not row_wise_safe(rows, world):
            constraints[name] = ParameterConstraints(sharding_types=["table_wise"])
        elif args.sharding != "auto":
            constraints[name] = ParameterConstraints(sharding_types=[args.sharding])
    return constraints


def plan_sharding(args: argparse.Namespace, spec: Any, model: torch.nn.Module, sharders: List[Any], d: Dist):
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    constraints = sharding_constraints(args, spec, d.world_size) or None
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=d.world_size, local_world_size=d.local_world_size, compute_device=d.device.type),
        batch_size=args.batch_size, constraints=constraints)
    return planner.collective_plan(model, sharders, dist.GroupMember.WORLD)


def plan_summary(plan: Any) -> List[str]:
    """One line per module and (sharding type, kernel, ranks): the tables placed that way."""
    lines = []
    for module_path, module_plan in plan.plan.items():
        placed: Dict[tuple, List[str]] = {}
        for table, ps in module_plan.items():
            placed.setdefault((ps.sharding_type, ps.compute_kernel, tuple(ps.ranks or ())), []).append(table)
        for (sharding, kernel, ranks), tables in placed.items():
            lines.append(f"{module_path}: {sharding}/{kernel} on ranks {list(ranks)}: {', '.join(tables)}")
    return lines


def cafe_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    from cafe_torchrec.distributed import ShardedCafeEmbeddingBagCollection

    return [m for m in model.modules() if isinstance(m, ShardedCafeEmbeddingBagCollection)]


def hot_counts(modules: List[torch.nn.Module]) -> tuple:
    """(hot lookups, lookups) on this rank since the last call (stats() resets its counters)."""
    hot = lookups = 0.0
    for m in modules:
        for group in m.stats().values():
            lookups += group["lookups"]
            hot += group["hot_lookup_share"] * group["lookups"]
    return hot, lookups


# ----------------------------------------------------------------------------- evaluation
def gather_cat(t: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate a 1-D tensor of every rank (sizes may differ) on every rank."""
    if world == 1:
        return t
    n = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    padded = torch.zeros(top, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def restart(pipeline: Any) -> None:
    """Before a new iterator: TrainPipelineSparseDist switches by itself, TrainPipelineBase needs reset()."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    if not isinstance(pipeline, TrainPipelineSparseDist):
        pipeline.reset()


def evaluate(pipeline: Any, model: torch.nn.Module, batches: Iterator[Batch], world: int) -> Dict[str, float]:
    """AUC and log loss over every rank's test batches; eval() + no_grad, so sketches do not move."""
    from torchmetrics.classification import BinaryAUROC

    model.eval()
    restart(pipeline)
    preds, labels = [], []
    try:
        with torch.no_grad():
            while True:
                try:
                    _, logits, batch_labels = pipeline.progress(batches)
                except StopIteration:
                    break
                preds.append(torch.sigmoid(logits.float()).reshape(-1))
                labels.append(batch_labels.float().reshape(-1))
    finally:
        model.train()
    device = next(model.parameters()).device
    p = gather_cat(torch.cat(preds) if preds else torch.zeros(0, device=device), world).cpu().double()
    y = gather_cat(torch.cat(labels) if labels else torch.zeros(0, device=device), world).cpu().double()
    if p.numel() == 0:
        raise RuntimeError("evaluation saw no test batches")
    auroc = BinaryAUROC()
    auroc.update(p, y.long())
    auc = float(auroc.compute())
    log_loss = float(F.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y))
    return {"auc": auc, "log_loss": log_loss, "samples": int(p.numel()), "ctr": float(y.mean())}


# ----------------------------------------------------------------------------- checkpoints
def _checkpoints(root: Path) -> List[Path]:
    return sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: Any, meta: Dict[str, Any],
                    keep: int, d: Dist) -> Path:
    """DCP into a hidden temp dir, then rank 0 renames it: a visible step_N is always complete."""
    import torch.distributed.checkpoint as dcp

    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if d.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "meta": json.dumps(meta)}
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if d.rank == 0:
        if final.exists():  # a rerun over an old directory: move the old one aside first
            old = root / f".old_step_{step:08d}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
        for stale in _checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any) -> Dict[str, Any]:
    """All or nothing: a checkpoint that does not fit raises with the model untouched."""
    from cafe_torchrec.distributed.checkpoint import load_checkpoint_atomically

    return json.loads(load_checkpoint_atomically(model, str(path), optimizer, extra={"meta": ""})["meta"])


def resolve_resume(args: argparse.Namespace) -> Optional[Path]:
    if args.resume is None:
        return None
    if args.resume != "latest":
        path = Path(args.resume)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {path}: no such checkpoint directory")
        return path
    found = _checkpoints(Path(args.checkpoint_dir)) if Path(args.checkpoint_dir).is_dir() else []
    return found[-1] if found else None  # nothing yet: start from scratch


# ----------------------------------------------------------------------------- output
def write_plot(path: Path, losses: List[Dict[str, float]], evals: List[Dict[str, float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if losses:
        ax.plot([x["step"] for x in losses], [x["loss"] for x in losses], color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (interval mean)", color="tab:blue")
    ax2 = ax.twinx()
    if evals:
        ax2.plot([x["step"] for x in evals], [x["auc"] for x in evals], "o-", color="tab:red", label="eval AUC")
    ax2.set_ylabel("eval AUC", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- training
def run(args: argparse.Namespace, d: Dist) -> Dict[str, Any]:
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from tqdm import tqdm

    from examples.dlrm.embeddings import CAFE_METHODS, build_embedding

    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    torch.manual_seed(args.seed)
    data = make_data(args, d.rank, d.world_size)
    total_steps = data.train_steps if args.max_steps is None else min(args.max_steps, data.train_steps)
    if total_steps <= 0 or data.test_batches <= 0:
        raise ValueError(f"not enough data for {d.world_size} rank(s) at batch size {args.batch_size}: "
                         f"{data.train_steps} train steps, {data.test_batches} test batches per rank")

    cafe_options = {"importance": args.cafe_importance}
    if args.cafe_threshold is not None:
        cafe_options["threshold"] = args.cafe_threshold
    if args.cafe_hot_share is not None:
        cafe_options["hot_share"] = args.cafe_hot_share
    # The whole collection is sharded when it is CAFE or stock: build it on meta (no unsharded weights).
    # A baseline's wrapper (its own id state) stays unsharded around its inner tables: build it for real.
    whole = args.embedding in CAFE_METHODS or args.embedding == "full"
    spec = build_embedding(args.embedding, data.cardinalities, embedding_dim=args.embedding_dim,
                           compression_ratio=args.compression_ratio, seed=args.seed, cafe_options=cafe_options,
                           baseline_options=_options(args.baseline_option),
                           device=torch.device("meta") if whole else d.device)
    memory, description = spec.memory(), spec.describe()  # before sharding: baselines read their inner EBC
    model = build_model(args, spec, d.device)
    opt_cls, opt_kwargs = embedding_optimizer(args)
    _apply_optimizer_in_backward(opt_cls, model.model.sparse_arch.parameters(), opt_kwargs)
    sharders = make_sharders(args, spec, d.device)
    plan = plan_sharding(args, spec, model, sharders, d)
    dmp = DistributedModelParallel(module=model, device=d.device, plan=plan, sharders=sharders)
    dense_opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                      dense_optimizer_factory(args))
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense_opt])
    if spec.is_cafe or args.embedding == "full":
        pipeline = TrainPipelineSparseDist(dmp, optimizer, d.device, execute_all_batches=True)
    else:
        # A baseline wraps its sharded tables in Python that transforms the ids (and is not
        # fx-traceable), so TrainPipelineSparseDist cannot pipeline (or even trace) it.
        pipeline = TrainPipelineBase(dmp, optimizer, d.device)
    cafes = cafe_modules(dmp) if spec.is_cafe else []
    if d.rank == 0 and d.world_size > 1 and args.embedding in ("ada", "mc-lfu", "mc-dlfu"):
        print(f"[train] WARNING: {args.embedding} keeps its per-id state unsharded; on {d.world_size} ranks each "
              "rank updates its own copy (DDP does not broadcast buffers), so ranks may map one id to different rows",
              flush=True)
    if d.rank == 0:
        print(f"[train] {type(pipeline).__name__}; {args.embedding} x{args.compression_ratio:g} on {d.world_size} rank(s), {d.device}: "
              f"{total_steps} steps of {args.batch_size}/rank, {data.test_batches} test batches/rank", flush=True)
        print("\n".join("[train] " + line for line in description.splitlines()), flush=True)
        print("\n".join("[plan] " + line for line in plan_summary(plan)), flush=True)

    # state that survives a resume
    meta: Dict[str, Any] = {"step": 0, "loss_sum": 0.0, "samples": 0, "train_time": 0.0, "hot": 0.0,
                            "lookups": 0.0, "loss_history": [], "eval_history": [], "hot_history": []}
    resumed_from = resolve_resume(args)
    if resumed_from is not None:
        meta = load_checkpoint(resumed_from, dmp, optimizer)
        if d.rank == 0:
            print(f"[train] resumed from {resumed_from} at step {meta['step']}", flush=True)
    start_step = meta["step"]
    # Per-method input transforms: stock tables need ids < rows; AdaEmbed (cafe_torchrec.baselines.adaembed)
    # fails on int32 KJT lengths (index_add_ of int32 with int64), so give it int64 lengths.
    transforms: List[Callable[[Iterator[Batch]], Iterator[Batch]]] = []
    if spec.needs_id_modulo:
        transforms.append(lambda it: modulo_ids(it, data.cardinalities))
    if args.embedding == "ada":
        transforms.append(int64_lengths)

    def transformed(it: Iterator[Batch]) -> Iterator[Batch]:
        for t in transforms:
            it = t(it)
        return it

    stream_from = lambda s: transformed(data.train_from(s))  # noqa: E731
    test_stream = lambda: transformed(data.test())  # noqa: E731
    periodic_test = test_stream if args.eval_batches is None else (lambda: islice(test_stream(), args.eval_batches))

    boundaries = {total_steps}
    for every in (args.eval_every, args.checkpoint_every):
        if every and every > 0:
            boundaries.update(range(every, total_steps, every))
    bar = tqdm(total=total_steps, initial=start_step, disable=d.rank != 0 or args.no_progress,
               dynamic_ncols=True, mininterval=1.0, desc=args.run_name)
    step = start_step
    # loss sum, samples, hot lookups, lookups since the last flush (on the device: no sync per step)
    interval = torch.zeros(4, dtype=torch.float64, device=d.device)
    last_ckpt: Optional[Path] = None

    def flush_interval() -> None:
        nonlocal interval
        if cafes:
            hot, lookups = hot_counts(cafes)
            interval[2] += hot
            interval[3] += lookups
        dist.all_reduce(interval)
        loss_sum, samples, hot, lookups = interval.cpu().tolist()
        interval.zero_()
        if samples == 0:
            return
        meta["loss_sum"] += loss_sum
        meta["samples"] += int(samples)
        meta["loss_history"].append({"step": step, "loss": loss_sum / samples})
        postfix = {"loss": f"{loss_sum / samples:.4f}"}
        if cafes:
            meta["hot"] += hot
            meta["lookups"] += lookups
            share = hot / lookups if lookups else 0.0
            meta["hot_history"].append({"step": step, "hot_lookup_share": share})
            postfix["hot"] = f"{share:.1%}"
        elapsed = meta["train_time"] + (time.perf_counter() - seg_start)
        postfix["samples/s"] = f"{meta['samples'] / max(elapsed, 1e-9):,.0f}"
        bar.set_postfix(postfix, refresh=False)

    while step < total_steps:
        seg_end = min(b for b in boundaries if b > step)
        batches = stream_from(step)
        batches = islice(batches, seg_end - step)
        restart(pipeline)
        seg_start = time.perf_counter()
        exhausted = False
        while step < seg_end:
            if args.fail_at_step is not None and step == args.fail_at_step and d.rank == args.fail_rank:
                raise InjectedFailure(f"injected failure on rank {d.rank} at step {step} (--fail-at-step)")
            try:
                loss, logits, _ = pipeline.progress(batches)  # DLRMTrain's (loss, logits, labels)
            except StopIteration:
                exhausted = True
                break
            step += 1
            interval[0] += loss.detach().double() * logits.numel()
            interval[1] += logits.numel()
            bar.update(1)
            if step % args.log_every == 0 or step == seg_end:
                flush_interval()
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        meta["train_time"] += time.perf_counter() - seg_start
        if step % args.log_every and step != seg_end:  # stopped early: flush the rest
            flush_interval()
        meta["step"] = step
        if exhausted:  # fewer batches than counted (skipped lines): every rank stops here
            total_steps = step
            break
        if args.eval_every and step % args.eval_every == 0 and step < total_steps:
            result = evaluate(pipeline, dmp, periodic_test(), d.world_size)
            meta["eval_history"].append({"step": step, **result})
            if d.rank == 0:
                bar.write(f"[eval] step {step}: AUC {result['auc']:.4f}, log loss {result['log_loss']:.4f}")
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            last_ckpt = save_checkpoint(Path(args.checkpoint_dir), step, dmp, optimizer, meta, args.keep_checkpoints, d)
            if d.rank == 0:
                bar.write(f"[checkpoint] {last_ckpt}")
    bar.close()

    final = evaluate(pipeline, dmp, test_stream(), d.world_size)
    meta["eval_history"].append({"step": step, **final})
    results = {
        "method": args.embedding,
        "run_name": args.run_name,
        "compression_ratio_requested": spec.compression_ratio,
        "compression_ratio": memory["compression_ratio"],
        "memory_bytes": memory["physical_bytes"],
        "logical_bytes": memory["logical_bytes"],
        "memory": memory,
        "describe": description,
        "test_auc": final["auc"],
        "test_log_loss": final["log_loss"],
        "test_samples": final["samples"],
        "online_train_loss": meta["loss_sum"] / max(meta["samples"], 1),
        "samples_per_sec": meta["samples"] / max(meta["train_time"], 1e-9),
        "train_samples": meta["samples"],
        "train_time_s": meta["train_time"],
        "steps": step,
        "world_size": d.world_size,
        "batch_size": args.batch_size,
        "global_batch_size": args.batch_size * d.world_size,
        "device": str(d.device),
        "sharding": plan_summary(plan),
        "hot_lookup_share": meta["hot"] / meta["lookups"] if spec.is_cafe and meta["lookups"] else None,
        "data": data.description,
        "eval_history": meta["eval_history"],
        "loss_history": meta["loss_history"],
        "hot_history": meta["hot_history"],
        "resumed_from": str(resumed_from) if resumed_from else None,
        "last_checkpoint": str(last_ckpt) if last_ckpt else None,
        "args": vars(args),
    }
    if d.rank == 0:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if not args.no_plot:
            plot = out_dir / f"{args.run_name}.png"
            write_plot(plot, meta["loss_history"], meta["eval_history"],
                       f"{args.run_name}: {args.embedding} {memory['compression_ratio']:.1f}x, test AUC {final['auc']:.4f}")
            results["plot"] = str(plot)
        results["wall_time_s"] = time.perf_counter() - wall_start
        path = out_dir / f"{args.run_name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        os.replace(tmp, path)
        results["json"] = str(path)
        print(f"[result] {args.run_name}: AUC {final['auc']:.4f}, log loss {final['log_loss']:.4f}, "
              f"online loss {results['online_train_loss']:.4f}, {results['samples_per_sec']:,.0f} samples/s, "
              f"{memory['physical_bytes']:,} bytes ({memory['compression_ratio']:.1f}x) -> {path}", flush=True)
    dist.barrier()
    return results


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse, set up the process group, train; returns the results dict (raises on failure)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    d = setup_distributed(args)
    try:
        return run(args, d)
    finally:
        torch.set_num_threads(threads)
        if d.created:
            dist.destroy_process_group()


def cli() -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
