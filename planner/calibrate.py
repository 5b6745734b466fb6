"""Measure what CAFE adds to a step, per looked-up id, next to an FBGEMM TBE on this machine.

    python -m cafe_planner.calibrate [--out PATH] [--ids 65536] [--dim 16] [--repeat 5]

Times, per id, on one CPU thread (the planner models one rank's kernel work), 128 K Zipf(1.1)
ids over 4 tables of 1 M rows at 100x, one id per bag, after 20 warm-up steps:
- ``remap_fwd_ns``: what a CafeEmbeddingBagCollection forward costs over a stock
  EmbeddingBagCollection of the same physical tables (key hashing, HotSketch query, hashed
  rows, output reordering);
- ``remap_bwd_ns``: what its backward costs in training mode over the same module in eval mode
  (importance from the pooled gradient, HotSketch insert, migration of promoted rows), row-wise
  Adagrad applied in backward in both (medians of interleaved rounds; neither figure is taken
  below the bare sketch query / insert);
- ``sketch_query_ns`` / ``sketch_insert_ns``: a bare HotSketch of the group's hot rows;
- ``tbe_fwd_ns`` / ``tbe_bwd_ns``: a SplitTableBatchedEmbeddingBagsCodegen forward and backward
  (fused EXACT_ROWWISE_ADAGRAD update) over the group's physical rows.

The JSON also holds ``fwd_overhead = remap_fwd_ns / tbe_fwd_ns`` and ``bwd_overhead =
remap_bwd_ns / tbe_bwd_ns``: the constants ``CafePerfEstimator`` multiplies the stock perf
model's kernel estimate of a CAFE shard by (see estimators.py). Re-running overwrites the file.
Default path: ``$CAFE_PLANNER_CALIBRATION`` or ``~/.cache/cafe_planner/calibration.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from cafe_planner.estimators import default_path


def _best_ns_per_id(fn: Callable[[], object], n: int, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e9 / n


def _zipf_ids(n: int, vocab: int, exponent: float, gen: torch.Generator) -> torch.Tensor:
    weights = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-exponent)
    ranks = torch.multinomial(weights, n, replacement=True, generator=gen)
    return (ranks * 2654435761) % vocab


def measure(ids: int = 1 << 17, dim: int = 16, repeat: int = 7, vocab: int = 1 << 20) -> Dict[str, object]:
    """Run the timings on one thread and return the calibration record (module docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        setup = _Setup.build(ids, dim, vocab, gen)
        fwd, bwd = _cafe_costs(setup, repeat)
        costs: Dict[str, float] = dict(_sketch_costs(setup, repeat, gen))
        # never below the sketch call that the remap itself makes
        costs["remap_fwd_ns"] = max(fwd, costs["sketch_query_ns"])
        costs["remap_bwd_ns"] = max(bwd, costs["sketch_insert_ns"])
        costs["tbe_fwd_ns"], costs["tbe_bwd_ns"] = _tbe_costs(setup, repeat, gen)
    finally:
        torch.set_num_threads(threads)
    costs["fwd_overhead"] = costs["remap_fwd_ns"] / costs["tbe_fwd_ns"]
    costs["bwd_overhead"] = costs["remap_bwd_ns"] / costs["tbe_bwd_ns"]
    out: Dict[str, object] = dict(costs)
    out["ids"], out["dim"], out["threads"] = setup.n, dim, 1
    out["machine"] = describe_machine()
    out["torch"] = torch.__version__
    out["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return out


@dataclass
class _Setup:
    """What the timings share: one CAFE group of 4 tables of `vocab` rows at 100x, a stock
    collection of the same physical tables (their difference is what CAFE adds), both with
    row-wise Adagrad in backward, and a batch of Zipf(1.1) ids, one per bag."""

    cafe: Any
    stock: Any
    kjt: Any  # raw ids, for the CAFE collection
    stock_kjt: Any  # the same ids modulo the physical rows, for the stock collection
    raw: torch.Tensor
    n: int
    dim: int

    @classmethod
    def build(cls, ids: int, dim: int, vocab: int, gen: torch.Generator) -> "_Setup":
        from torch.distributed.optim import _apply_optimizer_in_backward
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
        from torchrec.optim import RowWiseAdagrad
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection

        features = 4
        batch = max(1, ids // features)
        n = batch * features
        tables = [
            EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=vocab, feature_names=[f"f{i}"])
            for i in range(features)
        ]
        cafe = CafeEmbeddingBagCollection(tables, CafeConfig(compression_ratio=100.0))
        stock = EmbeddingBagCollection(cafe.plan.physical_configs())
        for module in (cafe, stock):
            _apply_optimizer_in_backward(RowWiseAdagrad, module.parameters(), {"lr": 0.01})
        raw = torch.cat([_zipf_ids(batch, vocab, 1.1, gen) for _ in range(features)])
        lengths = torch.ones(n, dtype=torch.int64)
        keys = [f"f{i}" for i in range(features)]
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=raw, lengths=lengths)
        rows = cafe.plan.groups[0].physical_rows
        stock_kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.remainder(raw, rows), lengths=lengths)
        return cls(cafe, stock, kjt, stock_kjt, raw, n, dim)


def _cafe_costs(setup: _Setup, repeat: int) -> Tuple[float, float]:
    """(forward, backward) ns per id that the CAFE collection adds: forward over the stock
    collection; backward in training over the same module in eval mode (no importance hook,
    no sketch insert, no migration). Interleaved rounds, median of per-round differences: a
    shared machine drifts between rounds."""
    cafe, n = setup.cafe, setup.n

    def fwd(module, x):
        return lambda: module(x).values()

    def fwd_bwd(module, x):
        return lambda: module(x).values().sum().backward()

    for _ in range(20):  # warm the sketch (hot rows handed out, decay running) and load the kernels
        fwd_bwd(cafe, setup.kjt)()
    fwd_diff, bwd_diff = [], []
    for _ in range(repeat):
        cafe_fwd = _best_ns_per_id(fwd(cafe, setup.kjt), n, 3)
        stock_fwd = _best_ns_per_id(fwd(setup.stock, setup.stock_kjt), n, 3)
        cafe_all = _best_ns_per_id(fwd_bwd(cafe, setup.kjt), n, 3)
        cafe.eval()
        plain_fwd = _best_ns_per_id(fwd(cafe, setup.kjt), n, 3)
        plain_all = _best_ns_per_id(fwd_bwd(cafe, setup.kjt), n, 3)
        cafe.train()
        fwd_diff.append(cafe_fwd - stock_fwd)
        bwd_diff.append((cafe_all - cafe_fwd) - (plain_all - plain_fwd))
    return statistics.median(fwd_diff), statistics.median(bwd_diff)


def _sketch_costs(setup: _Setup, repeat: int, gen: torch.Generator) -> Dict[str, float]:
    """ns per id of a bare HotSketch (the group's hot rows) query and insert, after 20 warm-up inserts."""
    from cafe_torchrec import HotSketch
    from cafe_torchrec.hashing import mix64

    sketch = HotSketch(hot_capacity=setup.cafe.plan.groups[0].hot_rows, threshold=1.0)
    keys = mix64(setup.raw, 1) & ((1 << 62) - 1)
    scores = torch.rand(setup.n, generator=gen) * 2
    for _ in range(20):
        sketch.insert(keys, scores)
    return {
        "sketch_query_ns": _best_ns_per_id(lambda: sketch.query(keys), setup.n, repeat),
        "sketch_insert_ns": _best_ns_per_id(lambda: sketch.insert(keys, scores), setup.n, repeat),
    }


def _tbe_costs(setup: _Setup, repeat: int, gen: torch.Generator) -> Tuple[float, float]:
    """(forward, backward) ns per id of an FBGEMM TBE over the group's physical rows, the
    backward with its fused EXACT_ROWWISE_ADAGRAD update (medians of `repeat` rounds)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    rows, n = setup.cafe.plan.groups[0].physical_rows, setup.n
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, setup.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01,
    )
    indices = torch.remainder(setup.raw, rows)
    offsets = torch.arange(n + 1, dtype=torch.int64)
    upstream = torch.randn(n, setup.dim, generator=gen)

    def tbe_step() -> None:
        tbe(indices, offsets).backward(upstream)

    fwd, bwd = [], []
    for _ in range(repeat):
        f = _best_ns_per_id(lambda: tbe(indices, offsets), n, 3)
        fwd.append(f)
        bwd.append(_best_ns_per_id(tbe_step, n, 3) - f)
    return statistics.median(fwd), max(statistics.median(bwd), 1e-3)


def describe_machine() -> str:
    """'<CPU model>, <N> cores': where a calibration (or a benchmark) was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def write(record: Dict[str, object], path: Optional[Path] = None) -> Path:
    path = Path(path) if path is not None else default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cafe_planner.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {default_path()})")
    parser.add_argument("--ids", type=int, default=1 << 17, help="ids per timed call")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=7, help="interleaved rounds (medians)")
    args = parser.parse_args(argv)
    record = measure(ids=args.ids, dim=args.dim, repeat=args.repeat)
    path = write(record, args.out)
    for key in ("sketch_query_ns", "sketch_insert_ns", "remap_fwd_ns", "remap_bwd_ns", "tbe_fwd_ns", "tbe_bwd_ns"):
        print(f"{key:18s} {record[key]:8.1f} ns/id")
    print(f"fwd_overhead {record['fwd_overhead']:.2f}x TBE, bwd_overhead {record['bwd_overhead']:.2f}x TBE")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
