"""Print a CAFE sharding plan for a Criteo-sized DLRM without allocating its tables.

    python -m cafe_planner --world-size 4 --budget 2GiB [--ratio 1000] [--optimizer rowwise_adagrad]
                           [--dim 16] [--cardinalities kaggle|terabyte|1,2,3...] [--json]
                           [--device cpu|cuda] [--local-world-size N] [--summary]

The CafeEmbeddingBagCollection is built on the "meta" device (shapes only) and planned with
CafePlanner.plan (no process group, no GPU: a cuda topology is only planned for). With --budget
and no --ratio the solver picks the ratio (bisection; --profile-zipf adds a synthetic profile for
the profiled split); with --ratio the budget, if given, is checked. Neither: --ratio 100.
--world-size and --ratio also take comma lists (one plan per combination). --local-world-size
is the ranks per host (TorchRec's Topology.local_world_size; rank r uses device r mod N):
default min(world size, 8) on cuda (an 8-GPU host), the world size on cpu (one host).
--summary prints one line per plan instead of the reports. The cluster-scale sweep (CriteoTB,
the MLPerf cardinalities capped at 40M, dim 128, 8 GPUs per host):

    python -m cafe_planner --cardinalities terabyte --dim 128 --device cuda --ratio 10 --summary \
        --world-size 8,16,32,64,128,256,512,1024
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Callable, List, Optional, TypeVar

from cafe_torchrec.datasets import KAGGLE_CARDINALITIES, TERABYTE_CARDINALITIES

Number = TypeVar("Number", int, float)


def cardinalities(spec: str) -> List[int]:
    if spec.lower() == "kaggle":
        return list(KAGGLE_CARDINALITIES)
    if spec.lower() == "terabyte":
        return list(TERABYTE_CARDINALITIES)
    try:
        out = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--cardinalities: kaggle, terabyte or comma-separated ints, got {spec!r}"
        ) from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("--cardinalities: need at least one positive cardinality")
    return out


def _zipf_profile(rows: List[int], samples: int, seed: int = 0):
    """A synthetic profile: `samples` ids per feature, Zipf exponents spread over [0.8, 1.4]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, n in enumerate(rows):
        s = 0.8 + 0.6 * ((7 * i) % len(rows)) / max(len(rows) - 1, 1)
        head = min(n, 1 << 20)
        w = torch.arange(1, head + 1, dtype=torch.float64).pow(-s)
        out[f"cat_{i}"] = torch.multinomial(w, samples, replacement=True, generator=gen)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cafe_planner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=_ints, default=[1], help="ranks (or a comma list)")
    parser.add_argument("--budget", default=None, help="total bytes (2GiB, 512MiB, 1.5e9) or per-rank caps a,b,c")
    parser.add_argument("--ratio", type=_floats, default=None, help="fixed compression ratio (or a comma list)")
    parser.add_argument("--optimizer", default="rowwise_adagrad", help="sgd, adagrad, rowwise_adagrad, adam, ...")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument(
        "--cardinalities", type=cardinalities, default=list(KAGGLE_CARDINALITIES), help="kaggle, terabyte or 1,2,3..."
    )
    parser.add_argument("--batch-size", type=int, default=512, help="per-rank batch size for the estimates")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the topology's compute device")
    parser.add_argument(
        "--local-world-size",
        type=_positive,
        default=None,
        metavar="N",
        help="ranks per host (default: min(world size, 8) on cuda, the world size on cpu)",
    )
    parser.add_argument("--calibration", default=None, help="perf calibration JSON (python -m cafe_planner.calibrate)")
    parser.add_argument(
        "--profile-zipf",
        type=int,
        default=0,
        metavar="N",
        help="with --budget: profiled split from N synthetic Zipf ids per feature",
    )
    parser.add_argument("--json", action="store_true", help="print the reports as a JSON list")
    parser.add_argument(
        "--summary",
        action="store_true",
        help="one line per plan: world size, planning seconds, bytes per rank, balance",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    logging.getLogger("torchrec").setLevel(logging.ERROR)

    import torch
    from torchrec.distributed.planner import Topology
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from cafe_planner.estimators import resolve_optimizer
    from cafe_planner.planner import CafePlanner
    from cafe_planner.report import grid_lines
    from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection
    from cafe_torchrec.distributed import CafeEmbeddingBagCollectionSharder

    budget = None
    if args.budget is not None:
        budget = args.budget.split(",") if "," in args.budget else args.budget
    ratios = args.ratio if args.ratio is not None else ([None] if budget is not None else [100.0])
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=args.dim, num_embeddings=n, feature_names=[f"cat_{i}"])
        for i, n in enumerate(args.cardinalities)
    ]
    profile = _zipf_profile(args.cardinalities, args.profile_zipf) if args.profile_zipf else None
    imported = time.perf_counter()
    results, summary = [], []
    for world_size in args.world_size:
        local = args.local_world_size or default_local_world_size(world_size, args.device)
        for ratio in ratios:
            t0 = time.perf_counter()
            try:
                topology = Topology(world_size=world_size, local_world_size=local, compute_device=args.device)
                planner = CafePlanner(
                    topology,
                    memory_budget=budget,
                    compression_ratio=ratio,
                    batch_size=args.batch_size,
                    optimizer=args.optimizer,
                    calibration=args.calibration,
                    profile=profile,
                )
                if budget is not None:
                    configs = planner.configure(tables)
                else:
                    assert ratio is not None  # without a budget every run has a ratio
                    configs = {t.name: CafeConfig(compression_ratio=ratio) for t in tables}
                module = CafeEmbeddingBagCollection(tables, configs, device=torch.device("meta"))
                # the sharder a job would use: it builds the optimizer the plan counts
                optimizer = resolve_optimizer(args.optimizer)
                fused = {"optimizer": optimizer} if optimizer is not None else None
                planner.plan(module, [CafeEmbeddingBagCollectionSharder(fused_params=fused)])
            except ValueError as e:
                print(f"error (world size {world_size}, ratio {ratio}): {e}", file=sys.stderr)
                return 2
            seconds = time.perf_counter() - t0
            report = planner.report()
            solution = planner.solution
            label = (
                f"{ratio:g}x"
                if ratio is not None or solution is None
                else f"{solution.effective_ratio():.4g}x (budget)"
            )
            if args.json:
                out = report.to_dict()
                out.update(seconds=seconds, requested_ratio=ratio, process_seconds=_process_age())
                results.append(out)
            elif args.summary:
                summary.append(_summary_row(report, label, seconds))
            else:
                print(f"=== world size {world_size}, ratio {label}")
                print(report)
                print(
                    f"planned {len(tables)} tables for {world_size} rank(s) in {seconds:.2f} s "
                    f"(tables on the meta device)\n"
                )
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    if args.summary:
        from cafe_planner.calibrate import describe_machine

        print(
            f"{len(tables)} tables, dim {args.dim}, {sum(args.cardinalities):,} logical rows, {args.device}, "
            f"optimizer {args.optimizer}; planned on {describe_machine()}"
        )
        print(
            "\n".join(
                grid_lines(
                    [
                        "world size",
                        "ranks/host",
                        "ratio",
                        "planning s",
                        "bytes/rank min",
                        "bytes/rank max",
                        "balance",
                        "budget used",
                    ],
                    summary,
                )
            )
        )
        print(
            "bytes/rank: weights + optimizer state + sketch; balance: (max - min) / max; "
            "planning s: configure (with --budget) + TorchRec planning of one size"
        )
    age = _process_age()
    total = f"{age:.2f} s since the interpreter started" if age is not None else f"{time.perf_counter() - start:.2f} s"
    print(f"planning {time.perf_counter() - imported:.2f} s; total {total}")
    return 0


def default_local_world_size(world_size: int, device: str) -> int:
    """Ranks per host when --local-world-size is not given: an 8-GPU host on cuda (device
    indices are int8, so one host never holds more than 127), one host for every rank on cpu."""
    return min(world_size, 8) if device == "cuda" else world_size


def _summary_row(report, ratio: str, seconds: float) -> List[str]:
    """One line of --summary for one plan."""
    from cafe_planner.report import human_bytes

    states = [r.state_bytes for r in report.ranks]
    used = f"{100 * report.total_state_bytes() / report.budget:.1f}%" if report.budget else "-"
    return [
        str(report.world_size),
        str(report.local_world_size),
        ratio,
        f"{seconds:.2f}",
        human_bytes(min(states)),
        human_bytes(max(states)),
        f"{100 * report.balance():.2f}%",
        used,
    ]


def _process_age() -> Optional[float]:
    """Seconds since this process started (Linux /proc), imports included; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _comma_list(spec: str, convert: Callable[[str], Number], kind: str, below_one: str) -> List[Number]:
    """One value or a comma list, each >= 1; argparse shows the ArgumentTypeError's text."""
    try:
        out = [convert(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind} or a comma list, got {spec!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{below_one}, got {spec!r}")
    return out


def _positive(spec: str) -> int:
    """--local-world-size: one positive int."""
    try:
        value = int(spec)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {spec!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {spec!r}")
    return value


def _ints(spec: str) -> List[int]:
    """--world-size: positive ints."""
    return _comma_list(spec, int, "an int", "expected positive ints")


def _floats(spec: str) -> List[float]:
    """--ratio: ratios >= 1."""
    return _comma_list(spec, float, "a number", "ratios must be >= 1")


if __name__ == "__main__":
    raise SystemExit(main())
