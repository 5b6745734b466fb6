"""Helpers every benchmark shares: the machine line, timing, a plain-text table, and the
command line of one example-trainer run."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, List, Sequence, Union

import torch

# The planner's calibration records the same machine line; one helper keeps the two alike.
from cafe_planner.calibrate import describe_machine


def machine() -> str:
    """One line naming the machine, so a printed table says where it was measured."""
    return f"{describe_machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def best_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Minimum wall time of fn over `repeat` runs: the least noisy figure on a shared machine."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def table(headers: Sequence[str], rows: List[Sequence[object]]) -> str:
    """Render rows as an aligned text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 1000 else f"{c:,.0f}"
    return str(c)


def trainer_command(args: Sequence[str], out_dir: Union[str, Path], run_name: str) -> List[str]:
    """`python -m examples.dlrm.train ARGS` without its progress bar and plot, writing its results
    to OUT_DIR/RUN_NAME.json: one training run in a process of its own."""
    return [
        sys.executable,
        "-m",
        "examples.dlrm.train",
        *args,
        "--no-progress",
        "--no-plot",
        "--out-dir",
        str(out_dir),
        "--run-name",
        run_name,
    ]
