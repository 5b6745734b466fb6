"""Train TorchRec's DLRM on Criteo-like data with a CAFE (or baseline) embedding collection.

Runs as one process (`python examples/dlrm/train.py ...`) or under torchrun / TorchX
(`torchx run -s local_cwd examples/dlrm/component.py:train --nproc 2 -- ...`): gloo on CPU,
NCCL on GPUs (device cuda:LOCAL_RANK). The model is `DistributedModelParallel` over
`DLRMTrain(DLRM | DLRM_DCN)` with `[CafeEmbeddingBagCollectionSharder(), *get_default_sharders()]`
and a plan from `EmbeddingShardingPlanner.collective_plan`; training runs through
`TrainPipelineSparseDist`, the embedding optimizer is fused in backward, the dense one is a
`KeyedOptimizerWrapper` combined with `model.fused_optimizer`.

Data: `--data synthetic` (SyntheticCriteo: train on every day but the last, test on the
last), `--data tsv` (raw Criteo TSV, chronological split at `--train-rows`), `--data npy`
(TorchRec's day files; train on every day but the last) or `--data stream --stream NAME`
(a named setting of data/streams.py: train days, a validation day, a test day). Batch k of
a split goes to rank k % world_size; each rank runs the same number of steps.

Training is cut into segments at evaluation and checkpoint steps; the pipeline is drained
at each boundary, so evaluation (model.eval() + no_grad: no sketch update) and checkpoints
see a quiescent model and a checkpoint's data position is exactly its step.

Periodic evaluations (`--eval-every`) use the validation split when the data has one, else
the test split; the final evaluation covers both (`val_auc`, `val_log_loss` are None without
a validation split).

Output (rank 0): `<out-dir>/<run-name>.json` (method, memory, compression ratio, test and
validation AUC and log loss, average online training loss, samples/s, the loss, evaluation
and hot-lookup-share histories with their steps) and `<run-name>.png`.

This module is the training loop (run and the steps it calls, main, cli); its parts live
beside it: args (flags), process_group, data_setup (splits, stream adapters), model (DLRM,
optimizers), sharding, pipeline, evaluation, checkpoints and plotting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script (torchrun examples/dlrm/train.py): import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import logging
import warnings

import torch
import torch.distributed as dist

from examples.dlrm.args import parse_args
from examples.dlrm.checkpoints import load_checkpoint, resolve_resume, save_checkpoint
from examples.dlrm.data_setup import input_transform, make_data
from examples.dlrm.evaluation import cafe_modules, evaluate, hot_counts
from examples.dlrm.model import build_model, dense_optimizer_factory, embedding_optimizer
from examples.dlrm.pipeline import make_pipeline, restart
from examples.dlrm.plotting import write_plot
from examples.dlrm.process_group import Dist, setup_distributed
from examples.dlrm.sharding import make_sharders, plan_sharding, plan_summary

# TorchRec 1.8 / torch 2.13 deprecation chatter that says nothing about this run
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\.")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.")
for _name in ("torchrec.distributed.planner", "torch.fx._symbolic_trace"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class InjectedFailure(RuntimeError):
    """Raised by --fail-at-step / --fail-rank (a test hook)."""


@dataclass
class Trainee:
    """The sharded model of a run and what trains, evaluates and describes it."""

    spec: Any  # examples.dlrm.embeddings.EmbeddingSpec
    memory: Dict[str, float]
    description: str
    plan: Any
    dmp: torch.nn.Module
    optimizer: Any
    dense_optimizer: Any  # inside `optimizer` too
    pipeline: Any
    cafes: List[torch.nn.Module]


@dataclass
class Splits:
    """The batches the model sees (after the method's input adapters): training from a step on, and the
    evaluation splits; `monitor` is what periodic evaluations use (validation when the data has one)."""

    train_from: Callable[[int], Iterator[Any]]
    test: Callable[[], Iterator[Any]]
    validation: Optional[Callable[[], Iterator[Any]]]

    @property
    def monitor(self) -> Callable[[], Iterator[Any]]:
        return self.validation or self.test


def run(args: argparse.Namespace, d: Dist) -> Dict[str, Any]:
    """Build, shard and train the model on this rank, evaluate it; rank 0 writes the JSON and PNG."""
    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    torch.manual_seed(args.seed)
    data = make_data(args, d.rank, d.world_size)
    total_steps = planned_steps(args, data, d.world_size)
    trainee = build_trainee(args, data, d)
    announce(args, d, trainee, data, total_steps)
    meta, resumed_from = initial_state(args, trainee, d)
    splits = adapted_splits(args, trainee, data)
    step, last_ckpt = train(args, d, trainee, splits, meta, total_steps)
    final = final_evaluations(trainee, splits, d.world_size)
    meta["eval_history"].append({"step": step, **(final["validation"] or final["test"])})
    results = results_of(args, d, trainee, data, meta, final, step, resumed_from, last_ckpt)
    if d.rank == 0:
        write_outputs(args, trainee, meta, results, wall_start)
    dist.barrier()
    return results


def planned_steps(args: argparse.Namespace, data: Any, world: int) -> int:
    """Training steps of this run (--max-steps caps the split); raises when a split is empty."""
    total = data.train_steps if args.max_steps is None else min(args.max_steps, data.train_steps)
    if total <= 0 or data.test_batches <= 0 or (data.validation is not None and data.validation_batches <= 0):
        raise ValueError(
            f"not enough data for {world} rank(s) at batch size {args.batch_size}: "
            f"{data.train_steps} train steps, {data.validation_batches} validation batches, "
            f"{data.test_batches} test batches per rank"
        )
    return total


def build_trainee(args: argparse.Namespace, data: Any, d: Dist) -> Trainee:
    """The embedding collection, DLRM, fused and dense optimizers, sharding plan, DMP and pipeline."""
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from examples.dlrm.embeddings import CAFE_METHODS, build_embedding

    # The whole collection is sharded when it is CAFE or stock: build it on meta (no unsharded weights).
    # A baseline's wrapper (its own id state) stays unsharded around its inner tables: build it for real.
    whole = args.embedding in CAFE_METHODS or args.embedding == "full"
    spec = build_embedding(
        args.embedding,
        data.cardinalities,
        embedding_dim=args.embedding_dim,
        compression_ratio=args.compression_ratio,
        seed=args.seed,
        cafe_options=args.cafe_config_options,
        baseline_options=args.baseline_options,
        device=torch.device("meta") if whole else d.device,
    )
    memory, description = spec.memory(), spec.describe()  # before sharding: baselines read their inner EBC
    model = build_model(args, spec, d.device)
    opt_cls, opt_kwargs = embedding_optimizer(args)
    _apply_optimizer_in_backward(opt_cls, model.model.sparse_arch.parameters(), opt_kwargs)
    sharders = make_sharders(args, spec, d.device)
    plan = plan_sharding(args, spec, model, sharders, d)
    dmp = DistributedModelParallel(module=model, device=d.device, plan=plan, sharders=sharders)
    dense_opt = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), dense_optimizer_factory(args)
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense_opt])
    pipeline = make_pipeline(spec.is_cafe or args.embedding == "full", dmp, optimizer, d.device)
    cafes = cafe_modules(dmp) if spec.is_cafe else []
    return Trainee(spec, memory, description, plan, dmp, optimizer, dense_opt, pipeline, cafes)


def announce(args: argparse.Namespace, d: Dist, trainee: Trainee, data: Any, total_steps: int) -> None:
    """Rank 0 prints what runs where (and warns when a baseline's id state cannot be sharded)."""
    if d.rank != 0:
        return
    if d.world_size > 1 and args.embedding in ("ada", "mc-lfu", "mc-dlfu"):
        print(
            f"[train] WARNING: {args.embedding} keeps its per-id state unsharded; on {d.world_size} ranks each "
            "rank updates its own copy (DDP does not broadcast buffers), so ranks may map one id to different rows",
            flush=True,
        )
    print(
        f"[train] {type(trainee.pipeline).__name__}; {args.embedding} x{args.compression_ratio:g} on "
        f"{d.world_size} rank(s), {d.device}: {total_steps} steps of {args.batch_size}/rank, "
        f"{data.validation_batches} validation and {data.test_batches} test batches/rank",
        flush=True,
    )
    print("\n".join("[train] " + line for line in trainee.description.splitlines()), flush=True)
    print("\n".join("[plan] " + line for line in plan_summary(trainee.plan)), flush=True)


def initial_state(args: argparse.Namespace, trainee: Trainee, d: Dist) -> Tuple[Dict[str, Any], Optional[Path]]:
    """The run state that survives a resume: fresh, or loaded (with the model) from the checkpoint to resume."""
    meta: Dict[str, Any] = {
        "step": 0,
        "loss_sum": 0.0,
        "samples": 0,
        "train_time": 0.0,
        "hot": 0.0,
        "lookups": 0.0,
        "loss_history": [],
        "eval_history": [],
        "hot_history": [],
        "run": run_flags(args, d.world_size),
    }
    resumed_from = resolve_resume(args)
    if resumed_from is not None:
        # Adam creates its state at its first step: one step on zero gradients (TorchRec's
        # init_state; no weight decay here, so the weights stay) gives the checkpoint's state a place
        trainee.dense_optimizer.init_state()
        run = meta["run"]
        meta = load_checkpoint(resumed_from, trainee.dmp, trainee.optimizer, run)
        meta["run"] = run  # an older checkpoint has none: the next ones record them
        if d.rank == 0:
            print(f"[train] resumed from {resumed_from} at step {meta['step']}", flush=True)
    return meta, resumed_from


# Flags that fix where the data stands at a step and what the optimizers' state means: a resume
# with another value would read other batches or drop state, so it is refused (checkpoints.py).
# Per data source, only those that act on it; paths are not compared (data may move).
RUN_FLAGS = ("batch_size", "data", "optimizer", "dense_optimizer")
DATA_FLAGS = {
    "synthetic": ("data_seed", "days", "samples_per_day", "drift", "cardinality_scale", "cardinalities"),
    "stream": ("stream", "stream_seed"),
    "tsv": ("train_rows", "tsv_on_error"),
    "npy": ("npy_days",),
}


def run_flags(args: argparse.Namespace, world_size: int) -> Dict[str, Any]:
    """The flags a resume must keep (RUN_FLAGS, its data source's DATA_FLAGS) and the world
    size (the global batch)."""
    flags = RUN_FLAGS + DATA_FLAGS[args.data]
    return {"world_size": world_size, **{flag: getattr(args, flag) for flag in flags}}


def adapted_splits(args: argparse.Namespace, trainee: Trainee, data: Any) -> Splits:
    """The data's splits through the method's input adapters."""
    transformed = input_transform(args.embedding, trainee.spec.needs_id_modulo, data.cardinalities)
    validation = data.validation
    return Splits(
        lambda start: transformed(data.train_from(start)),
        lambda: transformed(data.test()),
        (lambda: transformed(validation())) if validation is not None else None,
    )


class IntervalLog:
    """Loss and hot-lookup counts since the last flush, kept on the device (no sync per step); a flush
    all-reduces them over ranks and appends one point to meta's loss and hot-share histories."""

    def __init__(self, meta: Dict[str, Any], cafes: List[torch.nn.Module], device: torch.device, bar: Any) -> None:
        self.meta, self.cafes, self.bar = meta, cafes, bar
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, samples, hot lookups, lookups

    def add(self, loss: torch.Tensor, logits: torch.Tensor) -> None:
        self.sums[0] += loss.detach().double() * logits.numel()
        self.sums[1] += logits.numel()

    def flush(self, step: int, train_time: float) -> None:
        """Fold the interval into meta; `train_time` (so far, this segment included) gives the samples/s shown."""
        if self.cafes:
            hot, lookups = hot_counts(self.cafes)
            self.sums[2] += hot
            self.sums[3] += lookups
        dist.all_reduce(self.sums)
        loss_sum, samples, hot, lookups = self.sums.cpu().tolist()
        self.sums.zero_()
        if samples == 0:
            return
        meta = self.meta
        meta["loss_sum"] += loss_sum
        meta["samples"] += int(samples)
        meta["loss_history"].append({"step": step, "loss": loss_sum / samples})
        postfix = {"loss": f"{loss_sum / samples:.4f}"}
        if self.cafes:
            meta["hot"] += hot
            meta["lookups"] += lookups
            share = hot / lookups if lookups else 0.0
            meta["hot_history"].append({"step": step, "hot_lookup_share": share})
            postfix["hot"] = f"{share:.1%}"
        postfix["samples/s"] = f"{meta['samples'] / max(train_time, 1e-9):,.0f}"
        self.bar.set_postfix(postfix, refresh=False)


def segment_ends(args: argparse.Namespace, total_steps: int) -> List[int]:
    """Steps at which training pauses (evaluations, checkpoints) and the last step, ascending."""
    ends = {total_steps}
    for every in (args.eval_every, args.checkpoint_every):
        if every and every > 0:
            ends.update(range(every, total_steps, every))
    return sorted(ends)


def train_segment(
    args: argparse.Namespace,
    d: Dist,
    trainee: Trainee,
    batches: Iterator[Any],
    step: int,
    seg_end: int,
    log: IntervalLog,
    seg_start: float,
) -> Tuple[int, bool]:
    """Steps from `step` to `seg_end`; returns (the step reached, whether the batches ran out first)."""
    while step < seg_end:
        if args.fail_at_step is not None and step == args.fail_at_step and d.rank == args.fail_rank:
            raise InjectedFailure(f"injected failure on rank {d.rank} at step {step} (--fail-at-step)")
        try:
            loss, logits, _ = trainee.pipeline.progress(batches)  # DLRMTrain's (loss, logits, labels)
        except StopIteration:
            return step, True
        step += 1
        log.add(loss, logits)
        log.bar.update(1)
        if step % args.log_every == 0 or step == seg_end:
            log.flush(step, log.meta["train_time"] + time.perf_counter() - seg_start)
    return step, False


def train(
    args: argparse.Namespace, d: Dist, trainee: Trainee, splits: Splits, meta: Dict[str, Any], total_steps: int
) -> Tuple[int, Optional[Path]]:
    """Train segment by segment (the pipeline drained at each end), evaluating and checkpointing between
    them; returns the last step and the last checkpoint written."""
    from tqdm import tqdm

    step = meta["step"]
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=d.rank != 0 or args.no_progress,
        dynamic_ncols=True,
        mininterval=1.0,
        desc=args.run_name,
    )
    log = IntervalLog(meta, trainee.cafes, d.device, bar)
    monitor = splits.monitor if args.eval_batches is None else (lambda: islice(splits.monitor(), args.eval_batches))
    last_ckpt: Optional[Path] = None
    for seg_end in (e for e in segment_ends(args, total_steps) if e > step):
        restart(trainee.pipeline)
        seg_start = time.perf_counter()
        step, exhausted = train_segment(
            args, d, trainee, islice(splits.train_from(step), seg_end - step), step, seg_end, log, seg_start
        )
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        meta["train_time"] += time.perf_counter() - seg_start
        if step % args.log_every and step != seg_end:  # stopped early: flush the rest
            log.flush(step, meta["train_time"])
        meta["step"] = step
        if exhausted:  # fewer batches than counted (skipped lines): every rank stops here
            break
        if args.eval_every and step % args.eval_every == 0 and step < total_steps:
            result = evaluate(trainee.pipeline, trainee.dmp, monitor(), d.world_size)
            meta["eval_history"].append({"step": step, **result})
            if d.rank == 0:
                bar.write(f"[eval] step {step}: AUC {result['auc']:.4f}, log loss {result['log_loss']:.4f}")
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            last_ckpt = save_checkpoint(
                Path(args.checkpoint_dir), step, trainee.dmp, trainee.optimizer, meta, args.keep_checkpoints, d
            )
            if d.rank == 0:
                bar.write(f"[checkpoint] {last_ckpt}")
    bar.close()
    return step, last_ckpt


def final_evaluations(trainee: Trainee, splits: Splits, world: int) -> Dict[str, Optional[Dict[str, float]]]:
    """AUC and log loss on the whole test split and, when the data has one, the whole validation split."""

    def on(split: Callable[[], Iterator[Any]]) -> Dict[str, float]:
        return evaluate(trainee.pipeline, trainee.dmp, split(), world)

    return {"validation": on(splits.validation) if splits.validation is not None else None, "test": on(splits.test)}


def results_of(
    args: argparse.Namespace,
    d: Dist,
    trainee: Trainee,
    data: Any,
    meta: Dict[str, Any],
    final: Dict[str, Optional[Dict[str, float]]],
    step: int,
    resumed_from: Optional[Path],
    last_ckpt: Optional[Path],
) -> Dict[str, Any]:
    """The run's results (the JSON's content; val_* are None when the data has no validation split)."""
    memory, test, val = trainee.memory, final["test"], final["validation"] or {}
    return {
        "method": args.embedding,
        "run_name": args.run_name,
        "compression_ratio_requested": trainee.spec.compression_ratio,
        "compression_ratio": memory["compression_ratio"],
        "memory_bytes": memory["physical_bytes"],
        "logical_bytes": memory["logical_bytes"],
        "memory": memory,
        "describe": trainee.description,
        "cafe_options": trainee.spec.options if trainee.spec.is_cafe else None,
        "test_auc": test["auc"],
        "test_log_loss": test["log_loss"],
        "test_samples": test["samples"],
        "val_auc": val.get("auc"),
        "val_log_loss": val.get("log_loss"),
        "val_samples": val.get("samples"),
        "eval_split": "validation" if final["validation"] is not None else "test",
        "online_train_loss": meta["loss_sum"] / max(meta["samples"], 1),
        "samples_per_sec": meta["samples"] / max(meta["train_time"], 1e-9),
        "train_samples": meta["samples"],
        "train_time_s": meta["train_time"],
        "steps": step,
        "world_size": d.world_size,
        "batch_size": args.batch_size,
        "global_batch_size": args.batch_size * d.world_size,
        "device": str(d.device),
        "sharding": plan_summary(trainee.plan),
        "hot_lookup_share": meta["hot"] / meta["lookups"] if trainee.spec.is_cafe and meta["lookups"] else None,
        "data": data.description,
        "eval_history": meta["eval_history"],
        "loss_history": meta["loss_history"],
        "hot_history": meta["hot_history"],
        "resumed_from": str(resumed_from) if resumed_from else None,
        "last_checkpoint": str(last_ckpt) if last_ckpt else None,
        "args": vars(args),
    }


def write_outputs(
    args: argparse.Namespace, trainee: Trainee, meta: Dict[str, Any], results: Dict[str, Any], wall_start: float
) -> None:
    """The PNG and (atomically) the JSON under --out-dir, and the one-line summary."""
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ratio = trainee.memory["compression_ratio"]
    if not args.no_plot:
        plot = out_dir / f"{args.run_name}.png"
        write_plot(
            plot,
            meta["loss_history"],
            meta["eval_history"],
            f"{args.run_name}: {args.embedding} {ratio:.1f}x, test AUC {results['test_auc']:.4f}",
        )
        results["plot"] = str(plot)
    results["wall_time_s"] = time.perf_counter() - wall_start
    path = out_dir / f"{args.run_name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)
    results["json"] = str(path)
    val = f"val AUC {results['val_auc']:.4f}, " if results["val_auc"] is not None else ""
    print(
        f"[result] {args.run_name}: {val}AUC {results['test_auc']:.4f}, log loss {results['test_log_loss']:.4f}, "
        f"online loss {results['online_train_loss']:.4f}, {results['samples_per_sec']:,.0f} samples/s, "
        f"{trainee.memory['physical_bytes']:,} bytes ({ratio:.1f}x) -> {path}",
        flush=True,
    )


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
    """The console entry point: main() under torchelastic's @record (a failing rank's error reaches torchrun)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
