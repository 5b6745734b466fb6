"""End-to-end tests of the DLRM example: examples/dlrm/train.py in process and through TorchX.

(a) one process on the real Criteo sample writes a results JSON with a finite AUC;
(b) a 2-process TorchX job (gloo) succeeds and writes its JSON;
(c) the same job with one worker made to fail exits non-zero;
(d) a run resumed from a mid-run checkpoint ends with exactly the metrics of the uninterrupted run;
(e) periodic evaluation does not change training (no sketch update in eval).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples.dlrm import train

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO.parent / "shared/data/criteo_kaggle_train_head10k.txt"
VENV_BIN = Path(sys.executable).parent
SMALL_SYNTHETIC = [
    "--data",
    "synthetic",
    "--days",
    "2",
    "--samples-per-day",
    "8192",
    "--batch-size",
    "256",
    "--no-progress",
    "--no-plot",
]


def torchx_job(tmp_path: Path, *script_args: str) -> subprocess.CompletedProcess:
    """`torchx run -s local_cwd examples/dlrm/component.py:train --nproc 2 -- ...` from the repo root."""
    torchx = VENV_BIN / "torchx"
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # torchrun from the venv
    cmd = [
        str(torchx if torchx.exists() else "torchx"),
        "run",
        "-s",
        "local_cwd",
        "-cfg",
        f"log_dir={tmp_path / 'torchx-logs'}",
        "examples/dlrm/component.py:train",
        "--nproc",
        "2",
        "--",
        *script_args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(not SAMPLE.exists(), reason=f"Criteo sample not found at {SAMPLE}")
def test_one_process_on_real_criteo_sample(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = train.main(
        [
            "--data",
            "tsv",
            "--tsv-path",
            str(SAMPLE),
            "--train-rows",
            "6400",
            "--test-rows",
            "2048",
            "--batch-size",
            "128",
            "--embedding",
            "cafe",
            "--compression-ratio",
            "100",
            "--eval-every",
            "25",
            "--out-dir",
            str(out),
            "--run-name",
            "tsv",
            "--no-progress",
        ]
    )
    saved = json.loads((out / "tsv.json").read_text())
    assert saved["steps"] == 50 and saved["method"] == "cafe"
    assert math.isfinite(saved["test_auc"]) and 0.5 < saved["test_auc"] <= 1.0
    assert math.isfinite(saved["test_log_loss"]) and math.isfinite(saved["online_train_loss"])
    assert saved["compression_ratio"] > 50 and saved["memory_bytes"] < saved["logical_bytes"]
    assert saved["test_samples"] == 2048 and 0 <= saved["hot_lookup_share"] <= 1
    assert [e["step"] for e in saved["eval_history"]] == [25, 50]
    assert (out / "tsv.png").stat().st_size > 0
    assert result["test_auc"] == saved["test_auc"]


def test_torchx_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = torchx_job(
        tmp_path,
        "--embedding",
        "cafe",
        "--sharding",
        "row_wise",
        "--eval-every",
        "8",
        "--out-dir",
        str(out),
        "--run-name",
        "tx",
        *SMALL_SYNTHETIC,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    saved = json.loads((out / "tx.json").read_text())
    assert saved["world_size"] == 2 and saved["steps"] == 16
    assert math.isfinite(saved["test_auc"]) and saved["train_samples"] == 16 * 2 * 256
    assert any("cafe_dim16" in line and "row_wise" in line and "[0, 1]" in line for line in saved["sharding"])


def test_torchx_failing_worker_fails_the_job(tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = torchx_job(
        tmp_path,
        "--embedding",
        "cafe",
        "--out-dir",
        str(out),
        "--run-name",
        "fail",
        "--fail-at-step",
        "5",
        "--fail-rank",
        "1",
        *SMALL_SYNTHETIC,
    )
    assert job.returncode != 0
    assert "InjectedFailure" in job.stdout + job.stderr
    assert not (out / "fail.json").exists()


@pytest.mark.parametrize("dense_optimizer", ["adagrad", "adam"])  # Adam's state is lazy: nothing before a step
def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path: Path, dense_optimizer: str) -> None:
    common = [
        "--embedding",
        "cafe",
        "--dense-optimizer",
        dense_optimizer,
        "--max-steps",
        "20",
        "--eval-every",
        "10",
        *SMALL_SYNTHETIC,
        "--out-dir",
        str(tmp_path / "out"),
    ]
    ckpt = tmp_path / "ckpt"
    full = train.main(
        [
            *common,
            "--run-name",
            "full",
            "--checkpoint-dir",
            str(ckpt),
            "--checkpoint-every",
            "5",
            "--keep-checkpoints",
            "2",
        ]
    )
    # keep-last-K and no half-written checkpoint left behind
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000015", "step_00000020"]
    resumed = train.main([*common, "--run-name", "resumed", "--resume", str(ckpt / "step_00000015")])
    assert resumed["resumed_from"].endswith("step_00000015")
    for key in (
        "test_auc",
        "test_log_loss",
        "online_train_loss",
        "train_samples",
        "hot_lookup_share",
        "loss_history",
        "eval_history",
        "hot_history",
    ):
        assert resumed[key] == full[key], key
    if dense_optimizer == "adagrad":  # flags that move the data or drop optimizer state: refused, named
        changed = ["--batch-size", "128", "--optimizer", "adagrad", "--run-name", "changed"]
        with pytest.raises(ValueError, match="--batch-size 256 there, 128 here; --optimizer 'rowwise_adagrad' there"):
            train.main([*common, *changed, "--resume", str(ckpt / "step_00000015")])


def test_evaluation_leaves_training_untouched(tmp_path: Path) -> None:
    """eval() + no_grad: periodic evaluations change neither the sketches nor the weights."""
    common = [
        "--embedding",
        "cafe",
        "--max-steps",
        "12",
        "--log-every",
        "4",
        *SMALL_SYNTHETIC,
        "--out-dir",
        str(tmp_path),
    ]
    with_evals = train.main([*common, "--eval-every", "4", "--eval-batches", "4", "--run-name", "evals"])
    without = train.main([*common, "--run-name", "plain"])
    assert len(with_evals["eval_history"]) == 3 and len(without["eval_history"]) == 1
    for key in ("test_auc", "test_log_loss", "online_train_loss", "loss_history", "hot_history"):
        assert with_evals[key] == without[key], key
