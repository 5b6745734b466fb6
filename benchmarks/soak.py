"""Long-run soak of the HotSketch on a drifting stream: invariants and flat memory.

    python -m benchmarks.soak [--steps 1000000]

Every `check_every` steps it asserts: hot rows assigned + free rows == capacity; no row
owned by two keys; scores finite, non-negative and bounded; migrations per step bounded;
and it records the process RSS, which must stay flat after warm-up.
"""

from __future__ import annotations

import argparse
import resource
from dataclasses import dataclass
from typing import Dict

import torch
from tqdm import tqdm

from cafe_torchrec.hashing import mix64
from cafe_torchrec.sketch import HotSketch
from cafe_torchrec.sketch.types import tags_of


@dataclass(frozen=True)
class SoakConfig:
    steps: int = 1_000_000
    batch: int = 256
    vocab: int = 100_000
    drift_every: int = 1_000  # the popular ids shift this often
    capacity: int = 2_000
    threshold: float = 20.0
    check_every: int = 1_000
    seed: int = 0


def rss_mb() -> float:
    """Current resident set size (MB), from /proc (falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def soak(cfg: SoakConfig, progress: bool = False) -> Dict[str, float]:
    gen = torch.Generator().manual_seed(cfg.seed)
    sketch = HotSketch(hot_capacity=cfg.capacity, threshold=cfg.threshold, decay=0.9)
    weights = torch.arange(1, cfg.vocab + 1, dtype=torch.float64).pow(-1.1)
    pool = torch.multinomial(weights, 1 << 20, replacement=True, generator=gen)  # Zipf ranks, reused
    scores_pool = torch.rand(1 << 20, generator=gen) * 2
    owner: Dict[int, int] = {}
    promotions = demotions = worst = 0
    rss = []
    for step in tqdm(range(cfg.steps), disable=not progress, mininterval=5):
        start = (step * cfg.batch * 7919) % (pool.numel() - cfg.batch)
        ranks = pool[start : start + cfg.batch]
        keys = mix64(ranks + (step // cfg.drift_every) * cfg.vocab, cfg.seed)
        res = sketch.insert(keys, scores_pool[start : start + cfg.batch])
        for r in res.demoted_rows.tolist():
            assert owner.pop(r, None) is not None, f"step {step}: row {r} freed but not held"
        for k, r in zip(res.promoted_keys.tolist(), res.promoted_rows.tolist()):
            assert r not in owner, f"step {step}: row {r} assigned twice"
            owner[r] = k
        promotions += res.promoted_rows.numel()
        demotions += res.demoted_rows.numel()
        worst = max(worst, res.promoted_rows.numel() + res.demoted_rows.numel())
        if step % cfg.check_every == 0:
            held = (sketch.slot_rows >= 0).nonzero().flatten()
            rows = sketch.slot_rows[held]
            free = sketch.free_rows()
            assert rows.numel() + free.numel() == cfg.capacity, f"step {step}: rows leaked"
            owners = tags_of(torch.tensor([owner[r] for r in rows.tolist()], dtype=torch.int64))
            assert torch.equal(sketch.slot_tags[held], owners), f"step {step}: a row is held by another key"
            assert torch.cat([rows, free]).unique().numel() == cfg.capacity, f"step {step}: a row is held twice"
            scores = sketch.slot_scores
            assert torch.isfinite(scores).all() and (scores >= 0).all(), f"step {step}: bad score"
            assert float(scores.max()) <= 10 * sketch.decay_trigger, f"step {step}: scores unbounded"
            rss.append(rss_mb())
    tail = rss[len(rss) // 4 :] or rss
    return {
        "steps": cfg.steps,
        "capacity": cfg.capacity,
        "promotions": promotions,
        "demotions": demotions,
        "max_migrations_per_step": worst,
        "rss_after_warmup_mb": tail[0],
        "rss_end_mb": tail[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1_000_000)
    args = parser.parse_args()
    report = soak(SoakConfig(steps=args.steps), progress=True)
    for key, value in report.items():
        print(f"{key:>26}: {value:,.1f}" if isinstance(value, float) else f"{key:>26}: {value:,}")
    growth = report["rss_end_mb"] - report["rss_after_warmup_mb"]
    print(f"{'rss growth after warm-up':>26}: {growth:+.1f} MB")


if __name__ == "__main__":
    main()
