"""The README's quick start runs as a user runs it: `python -m examples.quickstart`.

The script itself exits non-zero when training does not learn (loss falls, AUC > 0.6) or the
INT8 serving model's predictions differ from the trained model's by more than 0.05; here it
also has to report what CAFE chose and hold hot rows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_trains_shards_and_serves() -> None:
    env = {**os.environ, "MASTER_ADDR": "localhost", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    run = subprocess.run(
        [sys.executable, "-m", "examples.quickstart", "--steps", "150"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = run.stdout
    assert "group cafe_dim16: dim 16" in out and "compression ratio 100.0x" in out, out
    held = re.search(r"cafe_dim16: ([\d,]+) of ([\d,]+) hot rows held", out)
    assert held and int(held.group(1).replace(",", "")) > 0, out
    assert re.search(r"serving \(INT8\): max \|p_served - p_trained\| 0\.0\d+", out), out
