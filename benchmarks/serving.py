"""Serving: the frozen CAFE model against the training model and TorchRec's stock quantized EBC.

    python -m benchmarks.serving                       # abrupt8 and gradual26 at 100x and 1000x
    python -m benchmarks.serving --streams abrupt8 --ratios 100 --methods cafe cafe-ml

For each stream of the quality suite (examples/dlrm/data/streams.py) and ratio, DLRM with a CAFE
collection is trained in this process by the example trainer's own steps (as
`python -m examples.dlrm.train --data stream --stream NAME --compression-ratio R`, one process),
then frozen in FP32, FP16, INT8 and INT4 (cafe_torchrec.inference.quantize_inference_model),
traced with torchrec.fx and scripted. Reported side by side, on this machine in one run:

- test AUC of the training model and of each scripted frozen model (difference in AUC points);
- bytes: the training collection (weights + sketch), each frozen collection (weights as
  FBGEMM stores them + the frozen maps), and a stock QuantEmbeddingBagCollection of the
  logical tables in the same dtype (what serving without compression holds);
- latency per batch of 1, 64 and 512 test samples, one thread: the scripted frozen INT8
  collection, its id work in the C++ op (cafe::serving_rows) and in the op's torch-ops twin,
  against TorchRec's QuantEmbeddingBagCollection over the same physical rows (the frozen
  module's own inner collection, fed the rows the frozen module computes), rounds of the three
  alternating, each ratio the median of the per-round ratios.

Results: results/serving/serving.json (and the table printed).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from benchmarks.common import machine, table

DTYPES = ("fp32", "fp16", "int8", "int4")
BATCHES = (1, 64, 512)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--streams", nargs="+", default=["abrupt8", "gradual26"])
    p.add_argument("--ratios", nargs="+", type=float, default=[100.0, 1000.0])
    p.add_argument("--methods", nargs="+", default=["cafe"], choices=["cafe", "cafe-ml"])
    p.add_argument("--rounds", type=int, default=9, help="latency rounds per batch size (alternating)")
    p.add_argument("--round-seconds", type=float, default=0.2, help="timing per model and round")
    p.add_argument("--max-steps", type=int, default=None, help="cap the training steps (a quick check)")
    p.add_argument("--out", default="results/serving/serving.json")
    return p.parse_args(argv)


def stock_logical_bytes(configs: Sequence[Any], dtype: torch.dtype) -> int:
    """What TorchRec's QuantEmbeddingBagCollection holds for the logical tables in `dtype` (rows x
    FBGEMM's row size at the frozen module's row alignment), computed, not allocated."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import rounded_row_size_in_bytes
    from torchrec.modules.embedding_configs import data_type_to_sparse_type, dtype_to_data_type

    from cafe_torchrec.inference.freeze import ROW_ALIGNMENT

    sparse = data_type_to_sparse_type(dtype_to_data_type(dtype))
    return sum(c.num_embeddings * rounded_row_size_in_bytes(c.embedding_dim, sparse, ROW_ALIGNMENT) for c in configs)


def latency_ratios(frozen: Any, kjts: Dict[int, Any], rounds: int, seconds: float) -> Dict[int, Dict[str, float]]:
    """Per batch size: median ms of the scripted frozen collection with its id work in the C++ op
    ("frozen"), of the same collection with the op's torch-ops twin ("twin": the id work before
    the op), and of its scripted inner QuantEmbeddingBagCollection fed the same physical rows
    ("stock"), rounds of the three alternating; the median per-round ratios to stock [min, max]."""
    from examples.dlrm.serve import scripted

    models = {
        "frozen": scripted(frozen.with_kernel("cpp")),
        "twin": scripted(frozen.with_kernel("torch")),
        "stock": scripted(frozen.physical),
    }
    out = {}
    for n, kjt in kjts.items():
        inputs = {"frozen": kjt, "twin": kjt, "stock": frozen.physical_input(kjt)}
        for _ in range(5):
            for name, model in models.items():
                model(inputs[name])
        times: Dict[str, List[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                times[name].append(seconds_per_call(model, inputs[name], seconds))
        row = {f"{name}_ms": 1e3 * sorted(t)[rounds // 2] for name, t in times.items()}
        for name in ("frozen", "twin"):
            ratios = sorted(f / s for f, s in zip(times[name], times["stock"]))
            prefix = "ratio" if name == "frozen" else "twin_ratio"
            row.update({prefix: ratios[rounds // 2], f"{prefix}_min": ratios[0], f"{prefix}_max": ratios[-1]})
        out[n] = row
    return out


def seconds_per_call(module: Any, features: Any, seconds: float) -> float:
    """Mean seconds per call of module(features) over calls filling `seconds`."""
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        module(features)
        calls += 1
    return (time.perf_counter() - start) / calls


def run_one(stream: str, ratio: float, method: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Train, freeze in every dtype, measure."""
    from cafe_torchrec.inference import served_dtype
    from examples.dlrm.serve import Trained, auc, frozen_collection, head, scripted

    flags = ["--data", "stream", "--stream", stream, "--compression-ratio", f"{ratio:g}", "--embedding", method]
    if args.max_steps:
        flags += ["--max-steps", str(args.max_steps)]
    trained = Trained(flags)
    try:
        test = list(trained.splits.test())
        configs = trained.trainee.spec.tables
        memory = trained.trainee.memory
        result: Dict[str, Any] = {
            "stream": stream,
            "ratio": ratio,
            "method": method,
            "flags": flags,
            "training": {
                "test_auc": trained.final["test"]["auc"],
                "weight_bytes": int(memory["weight_bytes"]),
                "sketch_bytes": int(memory.get("sketch_bytes", 0)),
                "logical_bytes": int(memory["logical_bytes"]),
            },
            "frozen": {},
        }
        for name in DTYPES:
            dtype = served_dtype(name)
            served = trained.served(dtype)
            frozen = frozen_collection(served)
            result["frozen"][name] = {
                "test_auc": auc(scripted(served), iter(test)),
                **frozen.nbytes(),
                "stock_logical_bytes": stock_logical_bytes(configs, dtype),
            }
            if name == "int8":
                kjts = {n: head(test[0], n).sparse_features for n in BATCHES}
                result["latency_int8"] = latency_ratios(frozen, kjts, args.rounds, args.round_seconds)
        return result
    finally:
        trained.close()


def print_tables(results: List[Dict[str, Any]]) -> None:
    print(f"[serving] {machine()}")
    rows = []
    for r in results:
        base = r["training"]["test_auc"]
        rows.append(
            [r["stream"], f"{r['ratio']:g}x", r["method"], f"{base:.4f}"]
            + [f"{100 * (r['frozen'][d]['test_auc'] - base):+.3f}" for d in DTYPES]
        )
    print(table(["stream", "ratio", "method", "training AUC"] + [f"{d} - training (points)" for d in DTYPES], rows))
    rows = []
    for r in results:
        t, f = r["training"], r["frozen"]
        rows.append(
            [r["stream"], f"{r['ratio']:g}x", r["method"], t["weight_bytes"] + t["sketch_bytes"], t["sketch_bytes"]]
            + [f"{f[d]['weights']:,} + {f[d]['maps']:,}" for d in DTYPES]
            + [f"{f['int8']['weights'] / f['fp32']['weights']:.3f}", f["int8"]["stock_logical_bytes"]]
        )
    print(
        table(
            ["stream", "ratio", "method", "training bytes", "of which sketch"]
            + [f"frozen {d}: weights + maps" for d in DTYPES]
            + ["int8 / fp32 weights", "stock int8 EBC (logical)"],
            rows,
        )
    )
    rows = []
    for r in results:
        for n, m in r["latency_int8"].items():
            rows.append(
                [
                    r["stream"],
                    f"{r['ratio']:g}x",
                    r["method"],
                    n,
                    f"{m['stock_ms']:.3f}",
                    f"{m['twin_ms']:.3f}",
                    f"{m['frozen_ms']:.3f}",
                    f"{m['twin_ratio']:.2f} [{m['twin_ratio_min']:.2f}, {m['twin_ratio_max']:.2f}]",
                    f"{m['ratio']:.2f} [{m['ratio_min']:.2f}, {m['ratio_max']:.2f}]",
                ]
            )
    print(
        table(
            [
                "stream",
                "ratio",
                "method",
                "batch",
                "stock int8 ms (same rows)",
                "frozen int8 ms, torch ops",
                "frozen int8 ms, C++ op",
                "torch ops / stock [min, max]",
                "C++ op / stock [min, max]",
            ],
            rows,
        )
    )


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.jit|ast")
    args = parse_args(argv)
    runs = [(s, r, m) for s in args.streams for r in args.ratios for m in args.methods]
    results = [run_one(s, r, m, args) for s, r, m in tqdm(runs, desc="serving", unit="run")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "results": results}, indent=2, default=str))
    print_tables(results)
    print(f"[serving] -> {out}")
    return results


if __name__ == "__main__":
    main()
