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

This module is the training loop (run, main, cli); its parts live beside it: args (flags),
process_group, data_setup (splits, stream adapters), model (DLRM, optimizers), sharding,
pipeline, evaluation, checkpoints and plotting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

if __package__ in (None, ""):  # run as a script (torchrun examples/dlrm/train.py): import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import logging
import warnings

import torch
import torch.distributed as dist

from examples.dlrm.args import cafe_options, key_value_options, parse_args
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


def run(args: argparse.Namespace, d: Dist) -> Dict[str, Any]:
    """Build, shard and train the model on this rank, evaluate it; rank 0 writes the JSON and PNG."""
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.model_parallel import DistributedModelParallel
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

    # The whole collection is sharded when it is CAFE or stock: build it on meta (no unsharded weights).
    # A baseline's wrapper (its own id state) stays unsharded around its inner tables: build it for real.
    whole = args.embedding in CAFE_METHODS or args.embedding == "full"
    spec = build_embedding(args.embedding, data.cardinalities, embedding_dim=args.embedding_dim,
                           compression_ratio=args.compression_ratio, seed=args.seed, cafe_options=cafe_options(args),
                           baseline_options=key_value_options(args.baseline_option),
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
    pipeline = make_pipeline(spec.is_cafe or args.embedding == "full", dmp, optimizer, d.device)
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
    transformed = input_transform(args.embedding, spec.needs_id_modulo, data.cardinalities)
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
    """The console entry point: main() under torchelastic's @record (a failing rank's error reaches torchrun)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
