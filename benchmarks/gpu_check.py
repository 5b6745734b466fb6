"""GPU check: the torch-ops twins of the sketch, remap and importance ops on a device, against the CPU.

    python -m benchmarks.gpu_check [--device cuda] [--out DIR] [--quick] [--repeat N]

Needs torch alone (no torchrec, fbgemm-gpu, tqdm or C++ build), so it runs on a machine that
has only a CUDA torch: it sets CAFE_KERNEL=torch, so the CPU side is the torch-ops twin too.

Correctness (printed PASS/FAIL per check; the exit status is 1 if any fails):

- sketch, dyadic scores: the device's HotSketch(kernel="torch") ends every batch with the CPU
  twin's state bit for bit (slots: tags, scores, row words; free rows; reservations; total
  score) and the same InsertResult: multiples of 1/8 sum exactly in any order, so the device's atomic adds
  cannot differ, and every other step is one IEEE operation per element on both. On streams
  whose sums stay exact (decay 0.5, see SKETCHES) it also equals the sequential reference
  (tests/reference_sketch.py) slot for slot.
- sketch, float scores: keys, hot rows, newcomer flags and results equal the CPU twin's; scores
  and errors within rtol 1e-5 (summed floats may differ in the last bit: summation order).
- keys -> rows: pre-hash and lookup (hot row or level-1 row, level-2 row, medium flag) equal the
  CPU twin's and a plain-int reference bit for bit (integer ops only).
- importance: occurrence scores within rtol 1e-5 of a float64 definition and of the CPU twin
  (norms and per-feature means are float sums).

Timings: median of --repeat calls, synchronised, each call on a fresh batch of 26 features x
4096 and x 65536 Zipf(1.05) ids (vocabulary 10^6 per feature); the sketch is sized as the
module sizes the 26 Criteo Kaggle tables at 1000x, dim 16 (11,458 hot rows and buckets, 4 slots,
threshold 500) and has seen 8 batches of the stream before it is timed. On a non-CPU device the
CPU twins are timed on the same batches in the same run (the speed-up column).
Writes gpu_check.json and gpu_check.md to --out (default $OUT if set, else results/gpu_check).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from cafe_torchrec.hashing import (
    LEVEL_MULTIPLIERS,
    SLOT_BITS,
    SLOT_MASK,
    bounded_int,
    fold_int,
    make_keys,
    mix64,
    mix64_int,
    table_salts,
)
from cafe_torchrec.importance import occurrence_scores
from cafe_torchrec.sketch import HotSketch, InsertResult, torch_kernel
from tests.reference_sketch import ReferenceSketch

NUM_FEATURES = 26  # Criteo's categorical features
DIM = 16
VOCAB = 1_000_000
ZIPF = 1.05
WARM_BATCHES = 8
TIMED_SIZES = (4096, 65536)
# The sketch of the 26 Kaggle tables at 1000x, dim 16 (CafeEmbeddingBagCollection's layout).
HOT_ROWS, THRESHOLD = 11_458, 500.0


def lookup(
    sketch: HotSketch, regions: torch.Tensor, keys: torch.Tensor, multi_level: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Primary row (hot row, else level-1 row), level-2 row and medium flag per key: the torch-ops
    twin of the fused lookup (HotSketch.lookup), with or without the sketch's medium level.
    regions [T, 4]: level-1 offset and rows, level-2 offset and rows per table slot."""
    out = torch_kernel.lookup(sketch.state(), keys, regions, sketch.medium_threshold if multi_level else None, None)
    return out.primary, out.level2, out.medium


def make_regions(level1_rows: Sequence[int], level2_rows: Sequence[int], hot_rows: int) -> torch.Tensor:
    """Regions of a block [hot | t0 level-1 | t0 level-2 | t1 level-1 | ...] (layout.region_offsets)."""
    out, offset = [], hot_rows
    for r1, r2 in zip(level1_rows, level2_rows):
        out.append([offset, r1, offset + r1, max(r2, 1)])
        offset += r1 + r2
    return torch.tensor(out, dtype=torch.int64)


# ----------------------------------------------------------------------------------- inputs


def zipf_ids(n: int, gen: torch.Generator, vocab: int = VOCAB, z: float = ZIPF) -> torch.Tensor:
    """n ids in [0, vocab) with P(rank r) ~ r^-z, ranks scattered over the id space (CPU)."""
    weights = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-z)
    ranks = torch.multinomial(weights, n, replacement=True, generator=gen)
    return torch.remainder(ranks * 2654435761, vocab)


def dyadic_scores(n: int, gen: torch.Generator) -> torch.Tensor:
    """Multiples of 1/8 up to 4: float32 sums of them are exact in any order."""
    return torch.randint(0, 33, (n,), generator=gen).float() / 8


def with_bad_scores(scores: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A few NaN, inf and negative scores, which every kernel must skip and count."""
    scores = scores.clone()
    where = torch.randint(0, scores.numel(), (3,), generator=gen)
    scores[where] = torch.tensor([float("nan"), float("inf"), -1.0])
    return scores


# ------------------------------------------------------------------------------ comparisons


def assert_same_state(a: HotSketch, b: HotSketch, where: str) -> None:
    """Bit-for-bit equal sketch state: slots (tags, score bits, row words), free rows, reservations, total."""
    if not torch.equal(a.slots.cpu(), b.slots.cpu()):
        diff = (a.slots.cpu() != b.slots.cpu()).any(1).nonzero().flatten()
        raise AssertionError(f"{where}: {diff.numel()} slots differ, first {diff[:5].tolist()}")
    if not torch.equal(a.free_count.cpu(), b.free_count.cpu()) or not torch.equal(a.free_bits.cpu(), b.free_bits.cpu()):
        raise AssertionError(f"{where}: free rows differ")
    if not torch.equal(a.reserved.cpu(), b.reserved.cpu()):
        raise AssertionError(f"{where}: reservations {int(a.reserved[0])} != {int(b.reserved[0])}")
    if not torch.equal(a.total_score.cpu(), b.total_score.cpu()):
        raise AssertionError(f"{where}: total score {float(a.total_score[0])!r} != {float(b.total_score[0])!r}")


def assert_same_result(a: InsertResult, b: InsertResult, where: str) -> None:
    for name in ("promoted_keys", "promoted_rows", "demoted_rows"):
        if not torch.equal(getattr(a, name).cpu(), getattr(b, name).cpu()):
            raise AssertionError(f"{where}: {name} differ")
    for name in ("skipped", "dropped", "decayed"):
        if getattr(a, name) != getattr(b, name):
            raise AssertionError(f"{where}: {name} {getattr(a, name)} != {getattr(b, name)}")


def assert_matches_reference(sk: HotSketch, ref: ReferenceSketch, where: str) -> None:
    """Slot for slot equal to the sequential reference (tags, scores, rows, errors, flags, free rows)."""
    for name, got, want in (
        ("tags", sk.slot_tags, ref.tags),
        ("scores", sk.slot_scores, ref.scores),
        ("rows", sk.slot_rows, ref.rows),
        ("errors", sk.slot_errors, ref.errors),
        ("newcomers", sk.slot_newcomers, ref.newcomer),
        ("reservations", sk.slot_reserved, ref.reserved),
    ):
        if got.tolist() != want:
            raise AssertionError(f"{where}: slot {name} differ from the sequential reference")
    if sk.free_rows().tolist() != ref.free_list:
        raise AssertionError(f"{where}: free rows differ from the sequential reference")


def assert_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
        raise AssertionError(f"{what} differ")


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> float:
    """Within tolerance; returns the largest relative difference, for the report."""
    a, b = a.cpu().double(), b.cpu().double()
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    return float(((a - b).abs() / b.abs().clamp(min=1e-30)).max()) if a.numel() else 0.0


# --------------------------------------------------------------------------- correctness


# Decay 0.5 and a few decays per stream keep every slot score a dyadic fraction with at most
# 24 significant bits, so a key's occurrences sum exactly in any order and the sequential
# reference (one occurrence at a time) is matched bit for bit. With another decay (the default
# 0.98), or many halvings, a decayed score plus a key's batch sum may round differently from
# adding its occurrences one by one (the torch twins add the sum): an ulp from the reference,
# while device and CPU twin, which compute the same sums, still agree bit for bit.
SKETCHES: Dict[str, Dict[str, float]] = {
    # decays every few batches, evicts, promotes and demotes (the sizes of tests/test_sketch.py)
    "small": dict(
        hot_capacity=24,
        threshold=6.0,
        num_buckets=16,
        slots_per_bucket=4,
        medium_threshold=2.0,
        decay=0.5,
        decay_trigger=20.0,
        seed=3,
    ),
    # a hot row per slot and no decay: buckets fill with hot slots and newcomers are dropped
    "full": dict(
        hot_capacity=64,
        threshold=3.0,
        num_buckets=16,
        slots_per_bucket=4,
        medium_threshold=1.0,
        decay=0.5,
        decay_trigger=1e9,
        seed=5,
    ),
    # more buckets, longer streams
    "large": dict(
        hot_capacity=384,
        threshold=6.0,
        num_buckets=256,
        slots_per_bucket=4,
        medium_threshold=2.0,
        decay=0.5,
        decay_trigger=16.0,
        seed=7,
    ),
    # the default decay: device vs CPU twin only (see above)
    "large, decay 0.98": dict(
        hot_capacity=384,
        threshold=6.0,
        num_buckets=256,
        slots_per_bucket=4,
        medium_threshold=2.0,
        decay=0.98,
        decay_trigger=0.5,
        seed=9,
    ),
}


def sketch_trio(device: torch.device, args: Dict[str, float]) -> Tuple[HotSketch, HotSketch, ReferenceSketch]:
    dev = HotSketch(kernel="torch", device=device, **args)
    cpu = HotSketch(kernel="torch", **args)
    ref = ReferenceSketch(
        int(args["num_buckets"]),
        int(args["slots_per_bucket"]),
        int(args["hot_capacity"]),
        args["threshold"],
        args["decay"],
        cpu.decay_trigger,
        int(args["seed"]),
    )
    return dev, cpu, ref


def check_sketch_exact(device: torch.device, quick: bool) -> str:
    """Device vs CPU twin bit for bit on dyadic scores, and vs the sequential reference where
    sums are exact in any order (see SKETCHES)."""
    gen = torch.Generator().manual_seed(0)
    seen = {"batches": 0, "vs reference": 0, "promoted": 0, "demoted": 0, "decays": 0, "skipped": 0, "dropped": 0}
    large = 8 if quick else 30
    streams = [
        ("small", 40, 200, 400, 4000),
        ("full", 30, 200, 300, 300),
        ("large", large, 2048, 3000, 30000),
        ("large, decay 0.98", large, 2048, 3000, 30000),
    ]
    for scale, batches, n, vocab, vocab_later in streams:
        args = SKETCHES[scale]
        dev, cpu, ref = sketch_trio(device, args)
        exact_reference = args["decay"] == 0.5
        for step in range(batches):
            ids = zipf_ids(n, gen, vocab if step < batches // 2 else vocab_later, 1.1)  # the vocabulary shifts
            keys = mix64(ids, 99)
            scores = with_bad_scores(dyadic_scores(n, gen), gen) if step % 5 == 0 else dyadic_scores(n, gen)
            where = f"{scale} sketch, batch {step}"
            got = dev.insert(keys.to(device), scores.to(device))
            want = cpu.insert(keys, scores)
            assert_same_result(got, want, where)
            assert_same_state(dev, cpu, where)
            q_dev, q_cpu = dev.query(keys.to(device)), cpu.query(keys)
            assert_equal(q_dev[0], q_cpu[0], f"{where}: queried hot rows")
            assert_equal(q_dev[1], q_cpu[1], f"{where}: queried medium flags")
            if exact_reference:
                promoted, rows, demoted = ref.insert_batch(keys.tolist(), scores.tolist())
                if (
                    got.promoted_keys.tolist() != promoted
                    or got.promoted_rows.tolist() != rows
                    or got.demoted_rows.tolist() != demoted
                ):
                    raise AssertionError(f"{where}: promotions or demotions differ from the sequential reference")
                assert_matches_reference(dev, ref, where)
                if q_dev[0].tolist() != [ref.query(k)[0] for k in keys.tolist()]:
                    raise AssertionError(f"{where}: queried hot rows differ from the sequential reference")
                seen["vs reference"] += 1
            seen["batches"] += 1
            seen["promoted"] += got.promoted_keys.numel()
            seen["demoted"] += got.demoted_rows.numel()
            seen["decays"] += int(got.decayed)
            seen["skipped"] += got.skipped
            seen["dropped"] += got.dropped
    if not all(seen.values()):
        raise AssertionError(f"the streams did not exercise promotion, demotion, decay, skipping and dropping: {seen}")
    return ", ".join(f"{k} {v}" for k, v in seen.items())


def check_sketch_float(device: torch.device, quick: bool) -> str:
    """Device vs CPU twin on real-valued scores: keys, rows, flags and results exact, scores close."""
    gen = torch.Generator().manual_seed(1)
    worst, batches, promoted = 0.0, 0, 0
    for scale, count, n in (("small", 40, 300), ("large", 6 if quick else 20, 4096)):
        args = SKETCHES[scale]
        dev, cpu = HotSketch(kernel="torch", device=device, **args), HotSketch(kernel="torch", **args)
        for step in range(count):
            keys = mix64(zipf_ids(n, gen, 2000 if scale == "small" else 40000, 1.2), 5)
            scores = torch.rand(n, generator=gen) * 2
            where = f"{scale} sketch, batch {step}"
            got, want = dev.insert(keys.to(device), scores.to(device)), cpu.insert(keys, scores)
            assert_same_result(got, want, where)
            assert_equal(dev.slot_tags, cpu.slot_tags, f"{where}: slot tags")
            assert_equal(dev.slot_rows, cpu.slot_rows, f"{where}: slot rows")
            assert_equal(dev.slot_newcomers, cpu.slot_newcomers, f"{where}: newcomer flags")
            worst = max(
                worst,
                assert_close(dev.slot_scores, cpu.slot_scores, f"{where}: slot scores", atol=1e-5),
                assert_close(dev.slot_errors, cpu.slot_errors, f"{where}: slot errors", atol=1e-5),
            )
            q_dev, q_cpu = dev.query(keys.to(device)), cpu.query(keys)
            assert_equal(q_dev[0], q_cpu[0], f"{where}: queried hot rows")
            assert_equal(q_dev[1], q_cpu[1], f"{where}: queried medium flags")
            batches += 1
            promoted += want.promoted_keys.numel()
    if not promoted:
        raise AssertionError("the stream promoted nothing")
    return f"batches {batches}, promoted {promoted}, max relative score difference {worst:.2e}"


def check_keys_to_rows(device: torch.device, quick: bool) -> str:
    """Pre-hash and lookup on the device equal the CPU twin and plain-int arithmetic bit for bit."""
    gen = torch.Generator().manual_seed(2)
    batch = 64 if quick else 256
    extremes = torch.tensor([0, -1, 1, 2**63 - 1, -(2**63), 2**40 + 3])
    salts = table_salts(NUM_FEATURES, seed=11)
    slots = torch.arange(NUM_FEATURES).repeat_interleave(batch)
    level1 = [1, 3, 4096, 100_003, 2**31] + [1000 + 37 * i for i in range(NUM_FEATURES - 5)]  # 1 and 2^31: the bounds
    level2 = [0, 1] + [300 + 11 * i for i in range(NUM_FEATURES - 2)]
    args = dict(SKETCHES["large"], hot_capacity=512, num_buckets=512)
    regions = make_regions(level1, level2, args["hot_capacity"])
    dev, cpu, ref = sketch_trio(device, args)
    hot = medium_seen = 0
    for step in range(6):
        ids = zipf_ids(NUM_FEATURES * batch, gen, 5000, 1.1) - 2500  # negative ids are valid ids too
        ids[: extremes.numel()] = extremes
        keys = make_keys(ids.to(device), slots.to(device), salts.to(device))
        keys_cpu = make_keys(ids, slots, salts)
        assert_equal(keys, keys_cpu, f"batch {step}: keys")
        want_keys = [
            ((mix64_int(i, int(salts[t])) >> SLOT_BITS) << SLOT_BITS) | t for i, t in zip(ids.tolist(), slots.tolist())
        ]
        if keys_cpu.tolist() != want_keys:
            raise AssertionError(f"batch {step}: keys differ from mix64_int")
        for multi_level in (False, True):
            got = lookup(dev, regions.to(device), keys, multi_level)
            want = lookup(cpu, regions, keys_cpu, multi_level)
            for name, g, w in zip(("primary rows", "level-2 rows", "medium flags"), got, want):
                assert_equal(g, w, f"batch {step}, multi_level={multi_level}: {name}")
        primary, level2, medium = want
        ref_primary, ref_level2, ref_medium = [], [], []
        for key in want_keys:
            o1, r1, o2, r2 = regions[key & SLOT_MASK].tolist()
            hot_row = ref.query(key)[0]
            ref_primary.append(hot_row if hot_row >= 0 else o1 + bounded_int(fold_int(key, LEVEL_MULTIPLIERS[1]), r1))
            ref_level2.append(o2 + bounded_int(fold_int(key, LEVEL_MULTIPLIERS[2]), r2))
            ref_medium.append(ref.is_medium(key, args["medium_threshold"]))
        if primary.tolist() != ref_primary or level2.tolist() != ref_level2 or medium.tolist() != ref_medium:
            raise AssertionError(f"batch {step}: rows differ from the plain-int reference")
        hot += int((primary < args["hot_capacity"]).sum())
        medium_seen += int(medium.sum())
        scores = dyadic_scores(keys_cpu.numel(), gen)  # the next batch sees a fuller sketch
        dev.insert(keys, scores.to(device))
        cpu.insert(keys_cpu, scores)
        ref.insert_batch(want_keys, scores.tolist())
    if not (hot and medium_seen):
        raise AssertionError(f"the stream gave no hot ({hot}) or no medium ({medium_seen}) lookups")
    return f"{6 * NUM_FEATURES * batch} keys, {hot} hot and {medium_seen} medium lookups"


def importance_definition(
    grad: torch.Tensor,
    first_column: int,
    lengths: torch.Tensor,
    num_features: int,
    dim: int,
    weights: Optional[torch.Tensor],
) -> torch.Tensor:
    """Per occurrence: its bag's gradient norm x |weight|, divided by its feature's mean (float64)."""
    batch = grad.shape[0]
    out = []
    for f in range(num_features):
        block = grad[:, first_column + f * dim : first_column + (f + 1) * dim].double()
        out.append(block.norm(dim=1).repeat_interleave(lengths[f * batch : (f + 1) * batch]))
    scores = torch.cat(out)
    if weights is not None:
        scores = scores * weights.double().abs()
    feature = torch.arange(num_features).repeat_interleave(lengths.view(num_features, batch).sum(1))
    for f in range(num_features):
        mask = feature == f
        mean = scores[mask].mean() if bool(mask.any()) else torch.tensor(0.0, dtype=torch.float64)
        scores[mask] = scores[mask] / mean if mean > 0 else 0.0
    return scores


def check_importance(device: torch.device, quick: bool) -> str:
    """Occurrence scores on the device vs a float64 definition and the CPU twin."""
    gen = torch.Generator().manual_seed(3)
    batch, first = (64 if quick else 1024), 5
    grad = torch.randn(batch, first + NUM_FEATURES * DIM + 3, generator=gen)
    grad[:, first + 2 * DIM : first + 3 * DIM] = 0  # a feature whose gradients are all zero scores 0, not NaN
    lengths = torch.randint(0, 4, (NUM_FEATURES * batch,), generator=gen)
    columns = (first, first + NUM_FEATURES * DIM)
    worst = 0.0
    for weighted in (False, True):
        weights = torch.randn(int(lengths.sum()), generator=gen) if weighted else None
        got = occurrence_scores(
            grad.to(device),
            columns,
            lengths.to(device),
            NUM_FEATURES,
            weights.to(device) if weighted else None,
            "gradient",
        )
        twin = occurrence_scores(grad, columns, lengths, NUM_FEATURES, weights, "gradient")
        want = importance_definition(grad, first, lengths, NUM_FEATURES, DIM, weights)
        what = "weighted" if weighted else "unweighted"
        worst = max(
            worst,
            assert_close(got, want, f"{what} scores vs the definition"),
            assert_close(got, twin, f"{what} scores vs the CPU twin"),
        )
    ones = occurrence_scores(grad.to(device), columns, lengths.to(device), NUM_FEATURES, None, "frequency")
    assert_equal(ones, torch.ones(int(lengths.sum())), "frequency scores")
    return f"{int(lengths.sum())} occurrences, max relative difference {worst:.2e}"


def check_adaptive_policy(device: torch.device, quick: bool) -> str:
    """The adaptive policy's rebalance (sketch/policy.py, torch ops) on the device vs the CPU twin
    bit for bit on dyadic scores through an abrupt drift (decays, stale hot ids zeroed, swaps), and vs
    the sequential reference where no decay makes every sum exact (a huge horizon)."""
    from cafe_torchrec.sketch.policy import AdaptivePolicy

    gen = torch.Generator().manual_seed(2)
    seen = {"batches": 0, "vs reference": 0, "promoted": 0, "demoted": 0, "decays": 0}
    for horizon in (8.0, 1e12):
        policy = AdaptivePolicy(horizon=horizon, entry_score=1.0, rebalances_per_horizon=4, medium_share=0.25)
        args = dict(hot_capacity=300, num_buckets=300, slots_per_bucket=4, seed=3, adaptive=policy)
        dev, cpu = HotSketch(kernel="torch", device=device, **args), HotSketch(kernel="torch", **args)
        ref = ReferenceSketch(300, 4, 300, cpu.threshold, 0.98, 0.0, 3, adaptive=policy)
        steps = 20 if quick else 60
        for step in range(steps):
            ids = zipf_ids(3000, gen, 3000, 0.9) + (10**6 if step >= steps // 2 else 0)  # an abrupt drift
            keys = mix64(ids, 4)
            scores = dyadic_scores(keys.numel(), gen)
            where = f"adaptive, horizon {horizon:g}, batch {step}"
            got, want = dev.insert(keys.to(device), scores.to(device)), cpu.insert(keys, scores)
            assert_same_result(got, want, where)
            assert_same_state(dev, cpu, where)
            for name in ("row_marks", "decayed_occurrences", "occurrences_since", "stale_window", "medium_level"):
                assert_equal(getattr(dev, name), getattr(cpu, name), f"{where}: {name}")
            if horizon > 1e9:
                promoted, rows, demoted = ref.insert_batch(keys.tolist(), scores.tolist())
                if got.promoted_rows.tolist() != rows or got.demoted_rows.tolist() != demoted:
                    raise AssertionError(f"{where}: promotions or demotions differ from the sequential reference")
                assert_matches_reference(dev, ref, where)
                seen["vs reference"] += 1
            seen["batches"] += 1
            seen["promoted"] += got.promoted_keys.numel()
            seen["demoted"] += got.demoted_rows.numel()
            seen["decays"] += int(got.decayed)
    if not all(seen.values()):
        raise AssertionError(f"the streams did not exercise promotion, swaps and decay: {seen}")
    return ", ".join(f"{k} {v}" for k, v in seen.items())


CHECKS: List[Tuple[str, Callable[[torch.device, bool], str]]] = [
    ("sketch, dyadic scores: bit for bit vs CPU twin and sequential reference", check_sketch_exact),
    ("sketch, float scores: exact keys/rows, scores within rtol 1e-5 of CPU twin", check_sketch_float),
    ("adaptive policy: bit for bit vs CPU twin, and vs sequential reference without decay", check_adaptive_policy),
    ("keys -> rows: bit for bit vs CPU twin and plain-int reference", check_keys_to_rows),
    ("importance: within rtol 1e-5 of float64 definition and CPU twin", check_importance),
]


def run_checks(device: torch.device, quick: bool) -> List[Dict[str, object]]:
    results = []
    for name, check in CHECKS:
        start = time.perf_counter()
        try:
            detail, passed = check(device, quick), True
        except Exception as err:  # a failing op must not hide the other checks' results
            detail, passed = f"{type(err).__name__}: {err}", False
            traceback.print_exc()
        seconds = time.perf_counter() - start
        print(f"{'PASS' if passed else 'FAIL'}  {name} ({seconds:.1f} s): {detail}", flush=True)
        results.append(dict(check=name, passed=passed, detail=detail, seconds=round(seconds, 2)))
    return results


# ------------------------------------------------------------------------------- timings


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[int], object], calls: int, device: torch.device, first: int = 0) -> float:
    """Median wall time in ms of fn(first), ..., fn(first + calls - 1), synchronised around each."""
    times = []
    for i in range(first, first + calls):
        synchronize(device)
        start = time.perf_counter()
        fn(i)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_ops(device: torch.device, batch: int, repeat: int, warm: int) -> Dict[str, float]:
    """ms per call of each op on `device`, each call on a fresh batch, after `warm` batches
    inserted into the sketch (and up to 3 of them as warm-up calls of each op)."""
    gen = torch.Generator().manual_seed(batch)
    n = NUM_FEATURES * batch
    slots = torch.arange(NUM_FEATURES).repeat_interleave(batch).to(device)
    salts = table_salts(NUM_FEATURES, seed=0).to(device)
    count = warm + repeat
    ids = [zipf_ids(n, gen).to(device) for _ in range(count)]
    keys = [make_keys(i, slots, salts) for i in ids]
    scores = [(torch.rand(n, generator=gen) * 2).to(device) for _ in range(count)]  # importance-like, mean 1
    regions = make_regions([4096] * NUM_FEATURES, [1229] * NUM_FEATURES, HOT_ROWS).to(device)
    sketch = HotSketch(HOT_ROWS, THRESHOLD, medium_threshold=0.2 * THRESHOLD, kernel="torch", device=device)
    grad = torch.randn(batch, NUM_FEATURES * DIM, generator=gen).to(device)
    lengths = torch.ones(n, dtype=torch.int64, device=device)
    for b in range(warm):  # a sketch that has seen the stream: slots full, hot rows handed out
        sketch.insert(keys[b], scores[b])
    ops: Dict[str, Callable[[int], object]] = {
        "pre-hash (ids -> keys)": lambda b: make_keys(ids[b], slots, salts),
        "sketch query": lambda b: sketch.query(keys[b]),
        "keys -> rows (CAFE)": lambda b: lookup(sketch, regions, keys[b], False),
        "keys -> rows (CAFE-ML)": lambda b: lookup(sketch, regions, keys[b], True),
        "importance (d=16)": lambda b: occurrence_scores(
            grad, (0, NUM_FEATURES * DIM), lengths, NUM_FEATURES, None, "gradient"
        ),
    }
    out = {}
    for name, fn in ops.items():
        median_ms(fn, min(3, warm), device)  # warm-up: allocator, kernel loading
        out[name] = median_ms(fn, repeat, device, first=warm)
    out["sketch insert"] = median_ms(lambda b: sketch.insert(keys[b], scores[b]), repeat, device, first=warm)
    # the adaptive policy: an insert that runs a rebalance first (due before every insert here)
    from cafe_torchrec.sketch.policy import AdaptivePolicy

    adaptive = HotSketch(HOT_ROWS, kernel="torch", device=device, adaptive=AdaptivePolicy(rebalances_per_horizon=10**6))
    for b in range(warm):
        adaptive.insert(keys[b], scores[b])
    out["adaptive insert (+ rebalance)"] = median_ms(
        lambda b: adaptive.insert(keys[b], scores[b]), repeat, device, first=warm
    )
    return out


def run_timings(
    device: torch.device, sizes: Sequence[int], repeat: int, warm: int, cpu_repeat: int
) -> List[Dict[str, object]]:
    rows = []
    for batch in sizes:
        print(f"timing 26 x {batch} ids on {device} ...", flush=True)
        on_device = time_ops(device, batch, repeat, warm)
        on_cpu = time_ops(torch.device("cpu"), batch, cpu_repeat, warm) if device.type != "cpu" and cpu_repeat else {}
        for op, ms in on_device.items():
            row = dict(
                op=op,
                features=NUM_FEATURES,
                batch=batch,
                ids=NUM_FEATURES * batch,
                device=str(device),
                ms=ms,
                ns_per_id=ms * 1e6 / (NUM_FEATURES * batch),
            )
            if op in on_cpu:
                row.update(cpu_ms=on_cpu[op], speedup=on_cpu[op] / ms)
            rows.append(row)
    return rows


# -------------------------------------------------------------------------------- report


def machine(device: torch.device) -> Dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: Dict[str, object] = dict(
        cpu=cpu,
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: Dict[str, object]) -> str:
    gpu = f"{info['gpu']}, " if "gpu" in info else ""
    return (
        f"{gpu}{info['cpu']}, {info['cores']} cores ({info['threads']} intra-op threads), "
        f"torch {info['torch']}, CUDA {info['cuda']}"
    )


def markdown(info: Dict[str, object], checks: List[Dict[str, object]], timings: List[Dict[str, object]]) -> str:
    lines = [f"Machine: {machine_line(info)}", "", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'PASS' if c['passed'] else 'FAIL'} | {c['detail']} |" for c in checks]
    with_cpu = any("cpu_ms" in t for t in timings)
    head = "| op | ids | ms per call | ns per id |" + (" CPU twin ms | speed-up |" if with_cpu else "")
    lines += ["", head, "|---|---|---|---|" + ("---|---|" if with_cpu else "")]
    for t in timings:
        row = f"| {t['op']} | {t['features']} x {t['batch']} | {t['ms']:.3g} | {t['ns_per_id']:.3g} |"
        if with_cpu:
            row += f" {t['cpu_ms']:.3g} | {t['speedup']:.3g}x |" if "cpu_ms" in t else " | |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def write_results(
    out: Path,
    record: Dict[str, object],
    checks: List[Dict[str, object]],
    timings: List[Dict[str, object]],
    error: Optional[str],
    start: float,
) -> str:
    """The results so far as gpu_check.json and gpu_check.md under `out` (returns the Markdown):
    written after the checks and again after the timings, so a crash in the timings (a
    device-side assert poisons the CUDA context) loses neither the checks nor the error."""
    info = record["machine"]
    assert isinstance(info, dict)
    table = markdown(info, checks, timings) + (f"\nTimings failed: {error}\n" if error else "")
    seconds = round(time.perf_counter() - start, 1)
    full = dict(record, checks=checks, timings=timings, timings_error=error, seconds=seconds)
    (out / "gpu_check.json").write_text(json.dumps(full, indent=2) + "\n")
    (out / "gpu_check.md").write_text(table)
    return table


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="device under test (cpu: a dry run)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "results/gpu_check"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller checks; 26 x 4096 timings only, 2 warm batches, 3 calls, no CPU column",
    )
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per op (default 21 on a GPU, 5 on CPU)")
    parser.add_argument("--cpu-repeat", type=int, default=5, help="timed calls of the CPU twins beside a GPU (0: skip)")
    args = parser.parse_args(argv)
    # The torch-ops twins on every device: also keeps the CPU side from compiling the C++ ops.
    os.environ["CAFE_KERNEL"] = "torch"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (use --device cpu for a dry run)")
    repeat = 3 if args.quick else args.repeat or (5 if device.type == "cpu" else 21)
    sizes = TIMED_SIZES[:1] if args.quick else TIMED_SIZES
    info = machine(device)
    print(f"Machine: {machine_line(info)}", flush=True)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.gpu_check", *(sys.argv[1:] if argv is None else argv)])

    record = dict(machine=info, device=str(device), quick=args.quick, repeat=repeat, command=command)
    checks = run_checks(device, args.quick)
    write_results(args.out, record, checks, [], None, start)
    timings: List[Dict[str, object]] = []
    error = None
    try:
        timings = run_timings(
            device, sizes, repeat, 2 if args.quick else WARM_BATCHES, 0 if args.quick else args.cpu_repeat
        )
    except Exception as exc:  # recorded and reported; the checks' results stand
        error = f"{type(exc).__name__}: {exc}"
    table = write_results(args.out, record, checks, timings, error, start)
    print("\n" + table)
    failed = [c["check"] for c in checks if not c["passed"]]
    print(
        f"{len(checks) - len(failed)}/{len(checks)} checks passed in {time.perf_counter() - start:.1f} s"
        f"{'; timings failed: ' + error if error else ''}; wrote {args.out}/gpu_check.json and .md"
    )
    return 1 if failed or error else 0


if __name__ == "__main__":
    sys.exit(main())
