"""Training speed of the full DLRM: CAFE and CAFE-ML against the hashing trick with the same
physical rows, runs interleaved so that the machine's noise hits every method alike.

    python -m benchmarks.train_speed [--ratios 100 1000] [--steps 150] [--batch-size 4096]

Each run is examples/dlrm/train.py in its own process (one intra-op thread, synthetic stream
over the full Criteo Kaggle cardinalities); samples/s is the trainer's own figure (training
loop only: data, forward, backward, fused update, migrations). Best of `--repeats` per method.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List

from benchmarks.common import machine, table, trainer_command

METHODS = ("hash", "cafe", "cafe-ml")


def samples_per_sec(method: str, ratio: float, args: argparse.Namespace, out: Path) -> float:
    name = f"{method}-{ratio:g}x"
    train_args = [
        "--embedding",
        method,
        "--compression-ratio",
        str(ratio),
        "--data",
        "synthetic",
        "--cardinality-scale",
        "1.0",
        "--batch-size",
        str(args.batch_size),
        "--days",
        "2",
        "--samples-per-day",
        str(args.steps * args.batch_size),  # one day trains, one tests
        "--threads",
        "1",
    ]
    cmd = trainer_command(train_args, out, name)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return float(json.loads((out / f"{name}.json").read_text())["samples_per_sec"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[100.0, 1000.0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"DLRM, 26 Criteo Kaggle features, batch {args.batch_size}, {args.steps} steps, one process, one thread\n")
    rows: List[list] = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios:
            best: Dict[str, float] = {}
            for _ in range(args.repeats):
                for method in METHODS:
                    best[method] = max(best.get(method, 0.0), samples_per_sec(method, ratio, args, Path(tmp)))
            rows.append(
                [
                    f"{ratio:g}x",
                    best["hash"],
                    best["cafe"],
                    best["cafe"] / best["hash"],
                    best["cafe-ml"],
                    best["cafe-ml"] / best["hash"],
                ]
            )
    print(
        table(["ratio", "hash samples/s", "CAFE samples/s", "CAFE / hash", "CAFE-ML samples/s", "CAFE-ML / hash"], rows)
    )


if __name__ == "__main__":
    main()
