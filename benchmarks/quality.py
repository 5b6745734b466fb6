"""Quality benchmark: the same DLRM, data and memory budget for every embedding method.

    python -m benchmarks.quality [--data synthetic|criteo10k|both] [--ratios 10 100 1000 10000] [--seeds 0 1 2]

Each (method, ratio) trains in its own process through examples/dlrm/train.py (same FBGEMM
kernels, same fused optimizer where a method has embeddings) and writes its results JSON;
this driver prints one table (test AUC, log loss, average online training loss, memory,
achieved compression ratio, samples/s), writes results/quality.json and a PNG plot.

Data: the synthetic drifting Criteo-like stream (train on all days but the last, test on the
last, online loss over the whole stream), and the real 10k-row Criteo sample (chronological
80/20 split). Methods a ratio cannot serve (AdaEmbed above dim/2, Q-R past its feasible
range) are reported as infeasible, not silently dropped.

Seeds: a model seed moves test AUC by up to ~0.3 points here (init and hash salts), as much as
some gaps between methods; with several `--seeds` each cell is the mean over seeds and the
table gives the spread (max - min), so a gap smaller than the spreads is not a finding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks.common import machine, table, trainer_command

METHODS = ["hash", "qr", "mc-lfu", "mc-dlfu", "ada", "cafe", "cafe-ml"]
# Q-R with one collision count over all compressed tables, as the paper's code: per-table
# counts are infeasible for small tables at 10x and above.
METHOD_ARGS = {"qr": ["--baseline-option", "collisions=global"]}
SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "criteo_kaggle_train_head10k.txt"


def data_args(data: str, args: argparse.Namespace) -> List[str]:
    if data == "synthetic":
        return [
            "--data",
            "synthetic",
            "--days",
            str(args.days),
            "--samples-per-day",
            str(args.samples_per_day),
            "--cardinality-scale",
            str(args.cardinality_scale),
            "--drift",
            str(args.drift),
        ]
    return ["--data", "tsv", "--tsv-path", str(SAMPLE), "--train-rows", "8000"]


def run_one(
    method: str, ratio: Optional[float], data: str, seed: int, args: argparse.Namespace, out: Path
) -> Dict[str, object]:
    name = (f"{data}-{method}-{ratio:g}x" if ratio else f"{data}-{method}") + (f"-s{seed}" if seed else "")
    train_args = [
        "--embedding",
        method,
        "--seed",
        str(seed),
        "--batch-size",
        str(args.batch_size if data == "synthetic" else args.criteo10k_batch_size),
        "--threads",
        str(args.threads),
        *data_args(data, args),
    ]
    if ratio:
        train_args += ["--compression-ratio", str(ratio), *METHOD_ARGS.get(method, [])]
    cmd = trainer_command(train_args, out, name)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"method": method, "ratio": ratio, "data": data, "seed": seed, "error": reason[:160]}
    result = json.loads((out / f"{name}.json").read_text())
    result.update(method=method, ratio=ratio, data=data, seed=seed, wall_s=time.perf_counter() - start)
    return result


def cells(results: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """One cell per (data, method, ratio): means over its seeds and the test-AUC spread."""
    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for r in results:
        groups.setdefault((r["data"], r["method"], r["ratio"]), []).append(r)
    out = []
    for (data, method, ratio), runs in groups.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            out.append(dict(runs[0]))
            continue
        cell = {
            "data": data,
            "method": method,
            "ratio": ratio,
            "seeds": len(ok),
            "auc_spread": max(r["test_auc"] for r in ok) - min(r["test_auc"] for r in ok),
        }
        for key in (
            "test_auc",
            "test_log_loss",
            "online_train_loss",
            "memory_bytes",
            "compression_ratio",
            "samples_per_sec",
        ):
            cell[key] = statistics.fmean(float(r[key]) for r in ok)
        out.append(cell)
    return out


def plot(results: List[Dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["data"] for r in results})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        rows = [r for r in cells(results) if r["data"] == data and "error" not in r]
        for method in sorted({r["method"] for r in rows if r["ratio"]}):
            pts = sorted((r["ratio"], r["test_auc"]) for r in rows if r["method"] == method and r["ratio"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        for r in rows:
            if not r["ratio"]:
                ax.axhline(r["test_auc"], color="black", linestyle="--", label="full (uncompressed)")
        ax.set_xscale("log")
        ax.set_xlabel("compression ratio")
        ax.set_ylabel("test AUC")
        ax.set_title(data)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["synthetic", "criteo10k", "both"], default="both")
    parser.add_argument("--ratios", type=float, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--samples-per-day", type=int, default=1 << 19, help="4 training days x 512k = 2.1M samples")
    parser.add_argument("--cardinality-scale", type=float, default=0.1)
    parser.add_argument("--drift", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--criteo10k-batch-size",
        type=int,
        default=128,
        help="batch on the 10k-row sample (the paper's 128: 62 steps; 1024 would give 8)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="model seeds per cell (mean and spread)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per run (2 contend badly on 2 cores)")
    parser.add_argument("--out-dir", default="results/quality")
    parser.add_argument("--no-full", action="store_true", help="skip the uncompressed run")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace these runs in an existing quality.json instead of starting a new one",
    )
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets = ["synthetic", "criteo10k"] if args.data == "both" else [args.data]
    results = []
    for data in datasets:
        for seed in args.seeds:
            if not args.no_full:
                results.append(run_one("full", None, data, seed, args, out))
            for ratio in args.ratios:
                for method in args.methods:
                    results.append(run_one(method, ratio, data, seed, args, out))
                    r = results[-1]
                    print(
                        f"{data} {method} {ratio:g}x seed {seed}: " + (r.get("error") or f"AUC {r['test_auc']:.4f}"),
                        flush=True,
                    )
    if args.merge and (out / "quality.json").exists():
        fresh = {(r["data"], r["method"], r["ratio"], r.get("seed", 0)) for r in results}
        old = json.loads((out / "quality.json").read_text())["results"]
        results = [r for r in old if (r["data"], r["method"], r["ratio"], r.get("seed", 0)) not in fresh] + results
    rows = []
    for r in sorted(cells(results), key=lambda r: (r["data"], r["ratio"] or 0, r["method"])):
        if "error" in r:
            rows.append(
                [
                    r["data"],
                    r["method"],
                    f"{r['ratio']:g}x" if r["ratio"] else "1x",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"infeasible/failed: {r['error']}",
                ]
            )
            continue
        rows.append(
            [
                r["data"],
                r["method"],
                f"{r['ratio']:g}x" if r["ratio"] else "1x",
                f"{r['test_auc']:.4f}",
                f"{r['auc_spread']:.4f}",
                r["seeds"],
                f"{r['test_log_loss']:.4f}",
                f"{r['online_train_loss']:.4f}",
                f"{r['memory_bytes'] / 2**20:.2f}",
                f"{r['compression_ratio']:.1f}",
                f"{r['samples_per_sec']:,.0f}",
                "",
            ]
        )
    print(f"\nmachine: {machine()}")
    print(
        table(
            [
                "data",
                "method",
                "ratio",
                "test AUC",
                "AUC spread",
                "seeds",
                "log loss",
                "online loss",
                "MiB",
                "achieved",
                "samples/s",
                "note",
            ],
            rows,
        )
    )
    (out / "quality.json").write_text(
        json.dumps({"machine": machine(), "args": vars(args), "results": results}, indent=1)
    )
    plot(results, out / "quality.png")
    print(f"\nwrote {out / 'quality.json'} and {out / 'quality.png'}")


if __name__ == "__main__":
    main()
