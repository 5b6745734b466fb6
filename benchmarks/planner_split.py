"""Profiled budget split vs the uniform split: the same DLRM, the same memory, two CAFE layouts.

    python -m benchmarks.planner_split [--steps 1500] [--batch 256] [--budget-ratio 1000] [--scale 0.01]

The synthetic Criteo stream (examples/dlrm/data/synthetic.py) at a small cardinality scale,
with Zipf exponents spread over [0.5, 1.5] across the 26 features (so skew differs a lot
between tables), stationary (drift 0). Memory budget: the logical table bytes / --budget-ratio,
counting weights + sketch + row-wise Adagrad state (cafe_planner.solve_budget). Both sides get
the same budget, world size 1:
- uniform: one ratio for every table, bisected to fill the budget (the paper's hot shares);
- profiled: solve_budget with a profile = the ids of the first --profile-batches training
  batches, rows going where skew buys the most importance mass.
Each side trains a torchrec DLRM (dim 16) from the same seed on the same batches, one pass,
and is evaluated on held-out batches of the same day. Prints AUC and log loss side by side,
with the teacher's (oracle) AUC for reference, and the machine line.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Dict, List

import torch
from torch.distributed.optim import _apply_optimizer_in_backward
from torchmetrics.functional.classification import binary_auroc
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import RowWiseAdagrad

from benchmarks.common import machine, table
from cafe_planner import estimate_coverage, solve_budget
from cafe_torchrec import CafeEmbeddingBagCollection, HotSketch
from examples.dlrm.data.synthetic import SyntheticCriteo, SyntheticCriteoConfig

DIM = 16


def exponents(n: int, low: float = 0.5, high: float = 1.5) -> tuple:
    """Zipf exponents over [low, high], interleaved so neighbouring features differ."""
    return tuple(low + (high - low) * ((7 * i) % n) / max(n - 1, 1) for i in range(n))


def tables_for(cardinalities: List[int]) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=n, feature_names=[f"cat_{i}"])
        for i, n in enumerate(cardinalities)
    ]


def train_and_eval(configs, tables, train, test, seed: int, lr: float) -> Dict[str, float]:
    torch.manual_seed(seed)
    ebc = CafeEmbeddingBagCollection(tables, configs)
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=13,
        dense_arch_layer_sizes=[64, DIM],
        over_arch_layer_sizes=[64, 32, 1],
    )
    _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": lr})
    embedding_params = {id(p) for p in ebc.parameters()}
    dense = torch.optim.Adam([p for p in model.parameters() if id(p) not in embedding_params], lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    start = time.perf_counter()
    for batch in train:
        logits = model(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = loss_fn(logits, batch.labels)
        dense.zero_grad()
        loss.backward()
        dense.step()
    seconds = time.perf_counter() - start
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for batch in test:
            preds.append(torch.sigmoid(model(batch.dense_features, batch.sparse_features).squeeze(-1)))
            labels.append(batch.labels)
    p, y = torch.cat(preds), torch.cat(labels)
    logloss = float(torch.nn.functional.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y))
    hot = sum(s["hot_rows_used"] for name, s in ebc.stats().items() if "hot_rows_used" in s)
    return {"auc": float(binary_auroc(p, y.long())), "logloss": logloss, "seconds": seconds, "hot_used": hot}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training batches per side")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--eval-batches", type=int, default=40)
    parser.add_argument("--profile-batches", type=int, default=20)
    parser.add_argument("--budget-ratio", type=float, default=1000.0, help="budget = logical table bytes / this")
    parser.add_argument("--scale", type=float, default=0.01, help="cardinality scale of the Kaggle sizes")
    parser.add_argument("--lr", type=float, default=0.05, help="embedding learning rate (row-wise Adagrad)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    per_day = (args.steps + args.eval_batches) * args.batch
    cfg = SyntheticCriteoConfig(
        cardinality_scale=args.scale,
        zipf_exponents=exponents(26),
        num_days=1,
        samples_per_day=per_day,
        drift=0.0,
        seed=args.seed,
    )
    stream = SyntheticCriteo(cfg, args.batch)
    cards = stream.cardinalities
    tables = tables_for(cards)
    train = [stream.batch(0, i) for i in range(args.steps)]
    test = [stream.batch(0, args.steps + i) for i in range(args.eval_batches)]
    oracle = float(
        binary_auroc(
            torch.cat([stream.teacher_probability(b, 0) for b in test]), torch.cat([b.labels for b in test]).long()
        )
    )
    profile = {
        f"cat_{i}": torch.cat([b.sparse_features[f"cat_{i}"].values() for b in train[: args.profile_batches]])
        for i in range(len(cards))
    }

    HotSketch(8, 1.0).insert(torch.tensor([1]), torch.tensor([1.0]))  # load (or build) the C++ kernel before timing
    logical = sum(n * DIM * 4 for n in cards)
    budget = int(logical / args.budget_ratio)
    uniform = solve_budget(tables, budget, 1, optimizer="rowwise_adagrad")
    profiled = solve_budget(tables, budget, 1, optimizer="rowwise_adagrad", profile=profile)
    # the uniform split's expected coverage under the same profile, for the tables below
    uniform.coverage = estimate_coverage(uniform, tables, profile)
    occurrences = {t.name: sum(profile[f].numel() for f in t.feature_names) for t in tables}

    def expected_mass(sol) -> float:
        return sum(sol.coverage[n] * w for n, w in occurrences.items()) / sum(occurrences.values())

    rows = []
    results = {}
    for name, sol in (("uniform", uniform), ("profiled", profiled)):
        res = train_and_eval(sol.configs, tables, train, test, args.seed, args.lr)
        results[name] = res
        ratios = [r for r in sol.ratios().values()]
        rows.append(
            [
                name,
                f"{sol.used:,}",
                f"{min(ratios):.3g}-{max(ratios):.3g}x",
                f"{sol.effective_ratio():.1f}x",
                f"{100 * expected_mass(sol):.1f}%",
                res["hot_used"],
                f"{res['seconds']:.0f}",
                f"{res['auc']:.4f}",
                f"{res['logloss']:.4f}",
            ]
        )
    print(f"planner_split: {machine()}")
    print(
        f"synthetic Criteo, 26 features, cardinalities x{args.scale:g} ({sum(cards):,} ids), Zipf exponents 0.5-1.5, "
        f"drift 0; {args.steps} x {args.batch} training samples, {args.eval_batches * args.batch} held out; "
        f"budget {budget:,} B (logical / {args.budget_ratio:g}, weights + sketch + row-wise Adagrad); "
        f"profile = first {args.profile_batches} batches; oracle AUC {oracle:.4f}"
    )
    print(
        table(
            [
                "split",
                "bytes used",
                "per-table ratio",
                "overall",
                "expected mass covered",
                "hot rows used",
                "train s",
                "AUC",
                "log loss",
            ],
            rows,
        )
    )
    delta = results["profiled"]["auc"] - results["uniform"]["auc"]
    print(f"profiled - uniform AUC: {delta:+.4f}")
    per_table = [
        [
            t.name,
            cards[i],
            f"{exponents(26)[i]:.2f}",
            f"{uniform.ratios()[t.name]:.3g}",
            f"{profiled.ratios()[t.name]:.3g}",
            f"{100 * uniform.coverage[t.name]:.0f}%",
            f"{100 * profiled.coverage[t.name]:.0f}%",
        ]
        for i, t in enumerate(tables)
    ]
    print(
        table(
            ["table", "rows", "zipf", "uniform ratio", "profiled ratio", "uniform cover", "profiled cover"], per_table
        )
    )
    return 0 if math.isfinite(delta) else 1


if __name__ == "__main__":
    raise SystemExit(main())
