"""A worker killed with SIGKILL mid-run: the job fails fast, no half-written checkpoint is
visible, and --resume finishes from the last complete checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[2]
TRAIN = [
    "--embedding",
    "cafe",
    "--data",
    "synthetic",
    "--days",
    "2",
    "--samples-per-day",
    "65536",
    "--batch-size",
    "256",
    "--cardinality-scale",
    "0.01",
    "--sharding",
    "row_wise",
    "--no-progress",
    "--no-plot",
    "--checkpoint-every",
    "8",
    "--keep-checkpoints",
    "2",
]


def torchrun(args: List[str]) -> subprocess.Popen:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            str(bin_dir / "torchrun"),
            "--nproc_per_node",
            "2",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            "localhost:0",
            "examples/dlrm/train.py",
            *args,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def worker_of_rank(parent: int, rank: int) -> Optional[int]:
    """The pid of the torchrun worker with RANK=rank (a child of the torchrun process)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().split()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[3]) == parent and f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def test_sigkill_one_rank_then_resume(tmp_path: Path) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    job = torchrun([*TRAIN, "--checkpoint-dir", str(ckpt), "--out-dir", str(out)])
    deadline = time.time() + 240
    while time.time() < deadline and not any(ckpt.glob("step_*")):
        time.sleep(0.5)
    assert any(ckpt.glob("step_*")), "no checkpoint appeared"
    victim = worker_of_rank(job.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    try:
        job.wait(timeout=120)
    finally:
        job.kill()
    assert job.returncode != 0  # the job fails, it does not hang
    visible = sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("."))
    assert visible and all((ckpt / name / ".metadata").exists() for name in visible), visible  # only complete ones
    assert len(visible) <= 2, visible  # --keep-checkpoints 2
    last = int(visible[-1].split("_")[1])
    resumed = torchrun([*TRAIN, "--checkpoint-dir", str(ckpt), "--out-dir", str(out), "--resume"])
    log, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, log[-3000:]
    result = json.loads((out / "cafe.json").read_text())
    assert result["steps"] > last and result["test_auc"] > 0.5
