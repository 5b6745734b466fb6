"""The main demo: DLRM on a drifting synthetic Criteo-like stream, CAFE against its peers, via TorchX.

    python -m examples.demo            (what `make demo` runs)

For each method (cafe, cafe-ml, hash when its module imports, and the uncompressed full
tables) it launches one 2-process job

    torchx run -s local_cwd examples/dlrm/component.py:train --nproc 2 -- --embedding M ...

(gloo on CPU; every job trains on days 0..D-2 of the stream and tests on day D-1), then
prints one row per method from the job's results JSON: memory, compression ratio, test AUC,
log loss, average online training loss and training samples/s. About a minute per method
on 2 cores at the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
COMPONENT = "examples/dlrm/component.py:train"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--methods", default=None, help="comma separated (default: cafe,cafe-ml,hash if importable,full)")
    p.add_argument("--compression-ratio", type=float, default=100.0)
    p.add_argument("--nproc", type=int, default=2, help="processes per job")
    p.add_argument("--gpu", type=int, default=0, help="GPUs per job (0: CPU/gloo)")
    p.add_argument("--cardinality-scale", type=float, default=0.01, help="x the Criteo Kaggle cardinalities")
    p.add_argument("--days", type=int, default=4, help="synthetic days: train on all but the last")
    p.add_argument("--samples-per-day", type=int, default=65536)
    p.add_argument("--batch-size", type=int, default=1024, help="per process")
    p.add_argument("--eval-every", type=int, default=32, help="steps between evaluations (the plots' AUC curve)")
    p.add_argument("--out-dir", default="results/demo")
    p.add_argument("--extra", default="", help="extra arguments for train.py, one string")
    return p.parse_args(argv)


def default_methods() -> List[str]:
    from examples.dlrm.embeddings import available_methods

    available = set(available_methods())
    return [m for m in ("cafe", "cafe-ml", "hash", "full") if m in available]


def torchx_bin() -> str:
    """The torchx next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / "torchx"
    found = str(local) if local.exists() else shutil.which("torchx")
    if not found:
        raise SystemExit("torchx is not installed: run `make demo` (it creates .venv) or pip install torchx")
    return found


def job_command(args: argparse.Namespace, method: str, out_dir: Path) -> List[str]:
    script_args = [
        "--embedding",
        method,
        "--compression-ratio",
        f"{args.compression_ratio:g}",
        "--data",
        "synthetic",
        "--cardinality-scale",
        f"{args.cardinality_scale:g}",
        "--days",
        str(args.days),
        "--samples-per-day",
        str(args.samples_per_day),
        "--batch-size",
        str(args.batch_size),
        "--eval-every",
        str(args.eval_every),
        "--out-dir",
        str(out_dir),
        "--run-name",
        method,
        "--no-progress",
        *args.extra.split(),
    ]
    return [
        torchx_bin(),
        "run",
        "-s",
        "local_cwd",
        "-cfg",
        f"log_dir={out_dir / 'torchx-logs'}",
        COMPONENT,
        "--nproc",
        str(args.nproc),
        "--gpu",
        str(args.gpu),
        "--name",
        f"demo-{method}",
        "--",
        *script_args,
    ]


def run_job(args: argparse.Namespace, method: str, out_dir: Path) -> Dict[str, object]:
    """Launch one job, its output into <out_dir>/<method>.log; returns its results JSON (or an error)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # torchx runs torchrun from PATH
    log = out_dir / f"{method}.log"
    result_path = out_dir / f"{method}.json"
    result_path.unlink(missing_ok=True)
    cmd = job_command(args, method, out_dir)
    start = time.perf_counter()
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    elapsed = time.perf_counter() - start
    if rc != 0 or not result_path.exists():
        return {"method": method, "error": f"exit code {rc}, see {log}", "job_s": elapsed}
    result = json.loads(result_path.read_text())
    result["job_s"] = elapsed
    return result


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def table(results: List[Dict[str, object]]) -> str:
    header = ["method", "memory", "ratio", "test AUC", "log loss", "online loss", "samples/s", "job s"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([str(r["method"]), "FAILED", "", "", "", "", "", f"{r['job_s']:.0f}"])
            continue
        rows.append(
            [
                str(r["method"]),
                _bytes(float(r["memory_bytes"])),
                f"{float(r['compression_ratio']):.1f}x",
                f"{float(r['test_auc']):.4f}",
                f"{float(r['test_log_loss']):.4f}",
                f"{float(r['online_train_loss']):.4f}",
                f"{float(r['samples_per_sec']):,.0f}",
                f"{float(r['job_s']):.0f}",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(row) for row in rows)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    methods = args.methods.split(",") if args.methods else default_methods()
    out_dir = (REPO / args.out_dir).resolve() if not Path(args.out_dir).is_absolute() else Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"CAFE demo: DLRM on a synthetic Criteo-like stream ({args.days} days x {args.samples_per_day:,} samples, "
        f"drift 0.1, cardinalities x{args.cardinality_scale:g}), {args.nproc} processes per job via TorchX, "
        f"{args.compression_ratio:g}x compression",
        flush=True,
    )
    results = []
    start = time.perf_counter()
    for method in methods:
        print(f"  {method:8s} ... ", end="", flush=True)
        r = run_job(args, method, out_dir)
        results.append(r)
        if "error" in r:
            print(f"FAILED ({r['error']})", flush=True)
        else:
            print(f"AUC {float(r['test_auc']):.4f} in {float(r['job_s']):.0f} s", flush=True)
    print()
    print(table(results))
    print()
    print(
        f"total {time.perf_counter() - start:.0f} s; results JSON and PNG plots: "
        f"{', '.join(str(out_dir / (m + '.json')) for m in methods)} (and .png); job logs: {out_dir}/*.log"
    )
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
