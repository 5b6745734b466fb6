"""Training speed of the full DLRM: CAFE and CAFE-ML against the hashing trick with the same
physical rows, runs interleaved so that the machine's noise hits every method alike.

    python -m benchmarks.train_speed [--ratios 100 1000] [--steps 150] [--batch-size 4096]
    python -m benchmarks.train_speed --profile --ratios 100   # where CAFE's step differs from hashing's
    python -m benchmarks.train_speed --ratios 100 --cafe-option policy=paper   # CAFE with a CafeConfig field set

Each run is examples/dlrm/train.py in its own process (one intra-op thread, synthetic stream
over the full Criteo Kaggle cardinalities); samples/s is the trainer's own figure (training
loop only: data, forward, backward, fused update, migrations). Best of `--repeats` rounds per
method (a round runs every method once, in turn), and the ratio within each round, median and
range: the machine's drift between runs shows there.

`--profile` runs hashing and CAFE once each under torch.profiler (the last 60 of `--steps`
steps, at least 90 run: steps 90-150 by default, 1140-1200 with `--steps 1200`, past the fill of
the hot rows; with Python stacks, so the sketch thread shows too) and prints CPU ms per step by
op, per thread: the step's own thread side by side with the difference, ordered by it, then the sketch
thread's top ops. The profiler's own overhead inflates small ops; the differences are what count.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

from benchmarks.common import machine, table, trainer_command

METHODS = ("hash", "cafe", "cafe-ml")


def train_args(method: str, ratio: float, batch_size: int, steps: int, cafe_options: Sequence[str] = ()) -> List[str]:
    """The trainer's arguments for one run: `steps` training steps on day 1, day 2 tests;
    `cafe_options` (CafeConfig KEY=VALUE) apply to the CAFE methods, not to hashing."""
    options = [] if method == "hash" else [a for option in cafe_options for a in ("--cafe-option", option)]
    return [
        "--embedding",
        method,
        "--compression-ratio",
        str(ratio),
        "--data",
        "synthetic",
        "--cardinality-scale",
        "1.0",
        "--batch-size",
        str(batch_size),
        "--days",
        "2",
        "--samples-per-day",
        str(steps * batch_size),
        "--threads",
        "1",
        *options,
    ]


def samples_per_sec(method: str, ratio: float, args: argparse.Namespace, out: Path) -> float:
    name = f"{method}-{ratio:g}x"
    cmd = trainer_command(train_args(method, ratio, args.batch_size, args.steps, args.cafe_option), out, name)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return float(json.loads((out / f"{name}.json").read_text())["samples_per_sec"])


PROFILE_WARM, PROFILE_STEPS = 30, 60  # at least 30 steps run before the 60 profiled


def profiled_run_steps(steps: int) -> int:
    """Steps a profiled run takes for `--steps`: the last PROFILE_STEPS of them are profiled."""
    return max(steps, PROFILE_WARM + PROFILE_STEPS)


def profile_worker(argv: List[str], out: Path, start: int) -> None:
    """--profile-worker: the trainer with `argv`, its steps `start` to `start` + PROFILE_STEPS
    under torch.profiler; writes {thread: {op: CPU ms per step}} to `out`, the step's own thread
    under "main"."""
    from torch.profiler import ProfilerActivity, profile

    import examples.dlrm.train as trainer

    build = trainer.build_trainee
    state: Dict[str, object] = {"step": 0}

    def profiled_build(*a: object, **k: object) -> object:
        trainee = build(*a, **k)
        progress = trainee.pipeline.progress

        def step(batches: object) -> object:
            if state["step"] == start:
                prof = profile(activities=[ProfilerActivity.CPU], with_stack=True)
                prof.__enter__()
                state["prof"] = prof
            result = progress(batches)
            state["step"] = int(state["step"]) + 1  # type: ignore[call-overload]
            if state["step"] == start + PROFILE_STEPS:
                prof = state.pop("prof")
                prof.__exit__(None, None, None)  # type: ignore[attr-defined]
                per_thread: Dict[str, Dict[str, float]] = {}
                for e in prof.events():  # type: ignore[attr-defined]
                    ops = per_thread.setdefault(str(e.thread), {})
                    name = re.sub(r" (object )?at 0x[0-9a-f]+", "", e.name)  # Python objects' addresses differ per run
                    ops[name] = ops.get(name, 0.0) + e.self_cpu_time_total / 1e3 / PROFILE_STEPS
                # the step's own thread: the one running the model's tensor ops (the dense MLPs)
                main = max(per_thread, key=lambda t: per_thread[t].get("aten::addmm", 0.0))
                per_thread["main"] = per_thread.pop(main)
                out.write_text(json.dumps(per_thread))
            return result

        trainee.pipeline.progress = step
        return trainee

    trainer.build_trainee = profiled_build
    trainer.main(argv)


def profile_methods(ratio: float, args: argparse.Namespace, tmp: Path) -> None:
    """Hashing and CAFE profiled at `ratio` (each in its own process); prints the step's thread side
    by side and the other threads' top ops."""
    profiles: Dict[str, Dict[str, Dict[str, float]]] = {}
    for method in ("hash", "cafe"):
        steps = profiled_run_steps(args.steps)
        cmd = trainer_command(
            train_args(method, ratio, args.batch_size, steps, args.cafe_option), tmp, f"profile-{method}"
        )
        out = tmp / f"profile-{method}-ops.json"  # beside the trainer's own profile-{method}.json
        worker = [sys.executable, "-m", "benchmarks.train_speed", "--profile-worker", str(out)]
        worker += ["--profile-from", str(steps - PROFILE_STEPS), "--", *cmd[3:]]
        proc = subprocess.run(worker, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"profile of {method} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        if not out.exists():
            raise RuntimeError(f"profile of {method}: the run ended before step {steps}, so nothing was profiled")
        profiles[method] = json.loads(out.read_text())
    cafe, hashing = profiles["cafe"].get("main", {}), profiles["hash"].get("main", {})
    ops = sorted(set(cafe) | set(hashing), key=lambda op: -abs(cafe.get(op, 0.0) - hashing.get(op, 0.0)))
    rows = [
        [op[:70], cafe.get(op, 0.0), hashing.get(op, 0.0), cafe.get(op, 0.0) - hashing.get(op, 0.0)] for op in ops[:25]
    ]
    rows.append(["all ops", sum(cafe.values()), sum(hashing.values()), sum(cafe.values()) - sum(hashing.values())])
    print(f"{ratio:g}x, the step's thread, CPU ms per step (self time), by the difference:")
    print(table(["op", "CAFE", "hash", "CAFE - hash"], rows))
    for thread, per_op in profiles["cafe"].items():
        if thread == "main" or not any("sketch" in op for op in per_op):
            continue
        busy = {op: ms for op, ms in per_op.items() if "SimpleQueue" not in op and ms > 0.01}
        top = sorted(busy.items(), key=lambda item: -item[1])[:8]
        print("\nCAFE's sketch thread (scoring, insert, rebalance), top ops, CPU ms per step:")
        print(table(["op", "CAFE"], [[op[:70], ms] for op, ms in top]))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[100.0, 1000.0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="profile hashing's and CAFE's steps instead")
    parser.add_argument(
        "--cafe-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a CafeConfig field for the CAFE runs (repeatable), e.g. policy=paper",
    )
    parser.add_argument("--profile-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile-from", type=int, default=PROFILE_WARM, help=argparse.SUPPRESS)
    parser.add_argument("trainer_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile_worker:
        profile_worker([a for a in args.trainer_args if a != "--"], Path(args.profile_worker), args.profile_from)
        return
    print(f"machine: {machine()}")
    if args.cafe_option:
        print(f"CAFE runs with --cafe-option {' '.join(args.cafe_option)}")
    if args.profile:
        steps = profiled_run_steps(args.steps)
        print(
            f"DLRM, 26 Criteo Kaggle features, batch {args.batch_size}, one process, one thread, "
            f"steps {steps - PROFILE_STEPS}-{steps} profiled\n"
        )
        with tempfile.TemporaryDirectory() as tmp:
            for ratio in args.ratios:
                profile_methods(ratio, args, Path(tmp))
        return
    print(f"DLRM, 26 Criteo Kaggle features, batch {args.batch_size}, {args.steps} steps, one process, one thread\n")
    rows: List[list] = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios:
            runs: Dict[str, List[float]] = {method: [] for method in METHODS}
            for _ in range(args.repeats):  # a round: every method once, in turn
                for method in METHODS:
                    runs[method].append(samples_per_sec(method, ratio, args, Path(tmp)))
            best = {method: max(values) for method, values in runs.items()}
            row: list = [f"{ratio:g}x", best["hash"]]
            for method in ("cafe", "cafe-ml"):
                row += [best[method], f"{best[method] / best['hash']:.3f}", spread(runs[method], runs["hash"])]
            rows.append(row)
    print(
        table(
            [
                "ratio",
                "hash samples/s",
                "CAFE samples/s",
                "CAFE / hash",
                "per round",
                "CAFE-ML samples/s",
                "CAFE-ML / hash",
                "per round",
            ],
            rows,
        )
    )
    print("\nsamples/s: best of the rounds; / hash: best over best; per round: each round's ratio, median [min, max]")


def spread(method: Sequence[float], hashing: Sequence[float]) -> str:
    """The per-round ratios method / hashing as 'median [min, max]': the runs of one round run
    back to back, so each round's ratio cancels most of the machine's drift between rounds, and
    the range shows what is left."""
    ratios = sorted(m / h for m, h in zip(method, hashing))
    return f"{statistics.median(ratios):.3f} [{ratios[0]:.3f}, {ratios[-1]:.3f}]"


if __name__ == "__main__":
    main()
