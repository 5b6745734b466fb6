"""benchmarks/gpu_check.py stays runnable: its CPU dry run passes with torchrec and fbgemm-gpu
unimportable (the GPU machine has neither), and its comparisons catch a one-bit difference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import assert_matches_reference, assert_same_result, assert_same_state
from cafe_torchrec.hashing import mix64
from cafe_torchrec.sketch import HotSketch
from tests.reference_sketch import ReferenceSketch

ROOT = Path(__file__).resolve().parents[1]
# Prepended to each subprocess: any import of torchrec or fbgemm_gpu raises, as on the GPU machine.
BLOCKER = """
import sys
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torchrec", "fbgemm_gpu"):
            raise ImportError(f"{name} is blocked (the GPU machine has no {name})")
        return None
sys.meta_path.insert(0, _Blocker())
"""


def run_blocked(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_cpu_dry_run_passes_every_check_without_torchrec(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_blocked(
        f"from benchmarks.gpu_check import main; sys.exit(main(['--device', 'cpu', '--quick', '--out', {str(out)!r}]))"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((out / "gpu_check.json").read_text())
    assert len(record["checks"]) == 5 and all(c["passed"] for c in record["checks"]), record["checks"]
    assert proc.stdout.count("PASS") >= 5 and "FAIL" not in proc.stdout
    ops = {t["op"] for t in record["timings"]}
    assert {"sketch insert", "sketch query", "keys -> rows (CAFE)", "importance (d=16)"} <= ops
    assert all(t["ms"] > 0 and t["ids"] == 26 * 4096 for t in record["timings"])
    assert "| sketch insert | 26 x 4096 |" in (out / "gpu_check.md").read_text()


def test_a_crash_in_the_timings_keeps_the_checks(tmp_path: Path) -> None:
    """A device-side assert in the timings must not lose the checks' results: they are written
    before the timings run, and the error is recorded (exit status 1)."""
    out = tmp_path / "out"
    proc = run_blocked(
        "import benchmarks.gpu_check as g\n"
        "def boom(*a, **k):\n    raise RuntimeError('device-side assert triggered')\n"
        "g.run_timings = boom\n"
        f"sys.exit(g.main(['--device', 'cpu', '--quick', '--out', {str(out)!r}]))"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    record = json.loads((out / "gpu_check.json").read_text())
    assert len(record["checks"]) == 5 and all(c["passed"] for c in record["checks"])
    assert record["timings"] == [] and "device-side assert" in record["timings_error"]
    assert "Timings failed" in (out / "gpu_check.md").read_text()


def test_script_imports_with_torch_alone() -> None:
    proc = run_blocked(
        "import benchmarks.gpu_check\n"
        "assert not any(m.split('.')[0] in ('torchrec', 'fbgemm_gpu') for m in sys.modules), 'torchrec imported'\n"
        "try:\n    import torchrec\nexcept ImportError:\n    print('blocked')\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "blocked"  # the blocker works, so the import above proves something


def _sketch() -> HotSketch:
    sk = HotSketch(hot_capacity=8, threshold=3.0, num_buckets=8, kernel="torch")
    sk.insert(mix64(torch.arange(40), 1), torch.arange(40).float() / 8)
    return sk


def test_comparisons_catch_a_one_bit_difference() -> None:
    a, b = _sketch(), _sketch()
    assert_same_state(a, b, "equal")
    held = int((b.slot_tags != 0).nonzero()[0])
    b.slot_scores[held] = torch.nextafter(b.slot_scores[held], torch.tensor(float("inf")))
    with pytest.raises(AssertionError, match="1 slots differ"):
        assert_same_state(a, b, "one ulp")
    ref = ReferenceSketch(8, 4, 8, 3.0, 0.98, a.decay_trigger, 0)
    ref.insert_batch(mix64(torch.arange(40), 1).tolist(), (torch.arange(40).float() / 8).tolist())
    assert_matches_reference(a, ref, "equal")
    with pytest.raises(AssertionError, match="slot scores differ"):
        assert_matches_reference(b, ref, "one ulp")
    keys = mix64(torch.arange(40, 60), 1)
    r1 = a.insert(keys, torch.full((20,), 4.0))
    r2 = b.insert(keys, torch.full((20,), 4.0))
    r2.skipped += 1
    with pytest.raises(AssertionError, match="skipped"):
        assert_same_result(r1, r2, "skipped")
