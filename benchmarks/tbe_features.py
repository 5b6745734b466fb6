"""FBGEMM's CPU TBE with many features in one table against one feature per table, same lookups.

    python -m benchmarks.tbe_features            # 26 features x 4096 ids, dim 16, 524,288 rows
    python -m benchmarks.tbe_features --batch 1024

A CAFE group is one physical table that every compressed feature reads (26 on Criteo), where
hashing's tables hold one feature each; `benchmarks.train_speed --profile` puts most of CAFE's
step-time gap to hashing in FBGEMM's CPU backward (`split_embedding_backward_codegen_rowwise_
adagrad_cpu`). This benchmark isolates that: the same ids (Zipf-like, each feature on its own
rows), the same rows in all, fwd + bwd with EXACT_ROWWISE_ADAGRAD on one thread, laid out as
  - F features in 1 table (CAFE's layout),
  - the same ids as 1 feature of F x batch bags in 1 table; the same with its [F x B, D] output
    moved to the [B, F x D] a collection returns (a copy forward, one backward); the same as a
    variable-batch (VBE) TBE beside a plain table's feature of B bags, which is how one TorchRec
    collection would have to carry it,
  - F features in F tables (hashing's layout),
rounds of the layouts alternating, median ms and each layout's ratio to F tables.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from benchmarks.common import machine, table

ROWS = 524_288  # CAFE's group at 100x on the Kaggle cardinalities
PLAIN_ROWS = 1_000  # a plain (uncompressed) table beside the group


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="fwd + bwd steps per round and layout")
    return p.parse_args(argv)


def layouts(features: int, batch: int, dim: int) -> Dict[str, Callable[[], None]]:
    """One fwd + bwd step of each layout over the same rows and ids (one id per bag)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    per_feature = ROWS // features
    gen = torch.Generator().manual_seed(0)
    local = (torch.floor(per_feature ** torch.rand(features * batch, generator=gen)) - 1).long()
    local = local.clamp(0, per_feature - 1)  # Zipf-like ids within each feature's rows
    feature = torch.arange(features * batch) // batch
    global_ids = local + feature * per_feature

    def tbe(rows: List[int], feature_table_map: List[int]) -> torch.nn.Module:
        return SplitTableBatchedEmbeddingBagsCodegen(
            [(r, dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for r in rows],
            feature_table_map=feature_table_map,
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            learning_rate=0.01,
            pooling_mode=PoolingMode.SUM,
        )

    def step(module: torch.nn.Module, indices: torch.Tensor, move: bool = False, **kwargs: Any) -> Callable[[], None]:
        bags = torch.arange(indices.numel() + 1)

        def run() -> None:
            out = module(indices, bags, **kwargs)
            if move:  # [F x B, D] -> [B, F x D], as the collection's output needs it (a copy each way)
                out = out.view(features, batch, dim).transpose(0, 1).reshape(batch, features * dim)
            out.backward(torch.ones_like(out))

        return run

    # a variable-batch (VBE) TBE: the group as 1 feature of F x B bags beside a plain table's feature of B bags
    plain_ids = torch.remainder(local[:batch], PLAIN_ROWS)
    vbe_ids = torch.cat([global_ids, plain_ids])
    one = tbe([ROWS], [0])
    return {
        f"{features} features, 1 table (CAFE's group)": step(tbe([ROWS], [0] * features), global_ids),
        f"1 feature of {features} x {batch} bags, 1 table": step(one, global_ids),
        "  the same, output moved to [B, F x D]": step(one, global_ids, move=True),
        "  the same beside a plain table's B bags (VBE)": step(
            tbe([ROWS, PLAIN_ROWS], [0, 1]), vbe_ids, batch_size_per_feature_per_rank=[[features * batch], [batch]]
        ),
        f"{features} features, {features} tables (hashing's)": step(
            tbe([per_feature] * features, list(range(features))), local
        ),
    }


def main(argv: Optional[Sequence[str]] = None) -> List[List[object]]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    cases = layouts(args.features, args.batch, args.dim)
    for run in cases.values():
        run()  # warm-up
    times: Dict[str, List[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, run in cases.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    reference = list(median.values())[-1]
    rows: List[List[object]] = [[name, f"{ms:.2f}", f"{ms / reference:.2f}"] for name, ms in median.items()]
    print(f"[tbe_features] {machine()}; {args.features} x {args.batch} ids, dim {args.dim}, {ROWS:,} rows")
    print(table(["layout", "fwd + bwd ms (median)", f"/ {args.features} tables"], rows))
    return rows


if __name__ == "__main__":
    main()
