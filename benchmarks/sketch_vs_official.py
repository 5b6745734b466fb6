"""HotSketch against the official CAFE artifact's sketch, side by side on the same ids, memory and thread.

    python -m benchmarks.sketch_vs_official [--repeats 5] [--decay 0.99]

The official sketch is built from its source (benchmarks/official.py: g++ -O3 -march=native)
and called through ctypes; ours is `cafe_torchrec.sketch.HotSketch` with the C++ kernel and
its fused lookup `HotSketch.lookup` (hot row or hashed row per key, and the slot hints the
insert takes), keys from the C++ pre-hash `torch.ops.cafe.prepare_ids` as the collection makes them. One
intra-op thread for both (torch.set_num_threads(1) also sets the OpenMP threads of the
official's query loop: the same libgomp). Times are this thread's CPU time (all work runs on
it), the median of `--repeats` rounds, in ns per occurrence; a round runs both sides back to
back and "ours / official" is the median of the rounds' ratios (< 1: ours is faster).

Workloads:

1. 100k unique keys, 25k hot rows (4 slots each: 100k slots), threshold 50, scores U(0, 1):
   an insert into an empty sketch (reset before each repeat), an insert of keys already held
   (after one warm-up insert, as benchmarks.sketch measures), a query. The official takes the
   raw ids (its hash is a modulo), in C calls of at most 16384 ids (its static result buffers).
2. A DLRM step: 26 fields (the Criteo Kaggle cardinalities) x 4096 samples, Zipf(1.05) ids,
   10k hot rows at the paper's memory (one 4-slot bucket per hot row), threshold 4, scores the
   per-field normalised L2 norms of a random [4096, 26 x 16] output gradient (both sketches get
   the same scores). The official: one C call per field, on global ids (id + field offset), as
   its layer calls it. Ours: one call over the step's 106k keys (pre-hashed, untimed; the
   pre-hash is its own row), the insert with the slot hints the lookup returned. 5 warm steps,
   then each timed step is a fresh batch. "Python step": the official's SKEmbeddingBag.query +
   insert_grad per field (its int32 conversion, ctypes casts, scoring from the gradient,
   insert, re-query and row copies of promoted ids; not its embedding lookups), on a sketch of
   its own fed the same stream; for ours the sum of its timed parts plus its scoring op.
   Recall: the share of the true top-10k (by exact score over the 5 warm steps) holding a hot
   row, in each side's C-call sketch, and how many hot rows each has handed out by then.

Prints the machine and a markdown table ready for the README.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch

from benchmarks.common import machine
from benchmarks.official import MAX_IDS_PER_CALL, OfficialArtifact, OfficialSketch, OfficialUnavailable, build_official
from benchmarks.sketch import zipf_ids

COMMAND = "python -m benchmarks.sketch_vs_official"
UNIQUE_KEYS, UNIQUE_HOT_ROWS, UNIQUE_THRESHOLD = 100_000, 25_000, 50
STEP_BATCH, STEP_DIM, STEP_HOT_ROWS, STEP_THRESHOLD, ZIPF_Z, WARM_STEPS = 4096, 16, 10_000, 4, 1.05, 5
OFFICIAL_C, OFFICIAL_PY = 25, 0  # official sketch indices: the C-call one, and the one its SKEmbeddingBag uses
T = TypeVar("T")


def _timed(fn: Callable[..., object], *args: object) -> float:
    """CPU seconds of this thread in fn(*args): at one thread all of both sides' work runs on it, and
    time the shared machine's scheduler gives other processes (~4 ms slices here) does not count."""
    return _timed_result(fn, *args)[0]


def _timed_result(fn: Callable[..., T], *args: object) -> Tuple[float, T]:
    """(CPU seconds of this thread in fn(*args), its result)."""
    start = time.thread_time()
    result = fn(*args)
    return time.thread_time() - start, result


@dataclass
class Measure:
    """Per-round times (s) of one measurement on each side over `n` occurrences; the two sides of a
    round run back to back, so their ratio is measured side by side (a slow spell of the shared
    machine hits both)."""

    n: int
    official: List[float] = field(default_factory=list)
    ours: List[float] = field(default_factory=list)

    def ns(self, side: str) -> Optional[float]:
        """Median ns per occurrence of one side (None if it has no such measurement)."""
        times = getattr(self, side)
        return statistics.median(times) / self.n * 1e9 if times else None

    def ratio(self) -> Optional[float]:
        """Median over rounds of ours / official."""
        if not self.official:
            return None
        return statistics.median(o / f for o, f in zip(self.ours, self.official))


def _c_calls(sketch: OfficialSketch, ids: np.ndarray, scores: np.ndarray, chunk: int):
    """The official's C calls over `ids` in pieces of `chunk`, pointers prepared: (query, insert) closures."""
    pieces = [
        (sketch.ids_arg(ids[s : s + chunk]), sketch.scores_arg(scores[s : s + chunk]), len(ids[s : s + chunk]))
        for s in range(0, len(ids), chunk)
    ]

    def query() -> None:
        for ptr, _, n in pieces:
            sketch.c_query(ptr, n, sketch.index)

    def insert() -> None:
        for ptr, sptr, n in pieces:
            sketch.c_insert(ptr, sptr, n, sketch.index)

    return query, insert


def unique_keys(artifact: OfficialArtifact, repeats: int, decay: float) -> Dict[str, Measure]:
    """Workload 1: insert into an empty sketch, insert of keys held, query; per side."""
    from cafe_torchrec.hashing import mix64
    from cafe_torchrec.sketch import HotSketch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(10 * UNIQUE_KEYS, generator=gen)[:UNIQUE_KEYS]
    scores = torch.rand(UNIQUE_KEYS, generator=gen)
    keys = mix64(ids, 1)
    ours = HotSketch(hot_capacity=UNIQUE_HOT_ROWS, threshold=float(UNIQUE_THRESHOLD), decay=decay, kernel="cpp")
    ids_np = np.ascontiguousarray(ids.numpy().astype(np.int32))
    scores_np = np.ascontiguousarray(scores.numpy())
    out = {name: Measure(UNIQUE_KEYS) for name in ("insert, empty sketch", "insert, keys held", "query")}
    for r in range(repeats + 1):  # round 0 warms both up (first calls, allocator) and is not counted
        off = OfficialSketch(artifact, UNIQUE_HOT_ROWS, UNIQUE_THRESHOLD, decay, index=OFFICIAL_C)
        off_query, off_insert = _c_calls(off, ids_np, scores_np, MAX_IDS_PER_CALL)
        t_off = _timed(off_insert)
        ours.reset_state()
        t_ours = _timed(lambda: ours.insert(keys, scores))
        if r:
            out["insert, empty sketch"].official.append(t_off)
            out["insert, empty sketch"].ours.append(t_ours)
    for _ in range(repeats):  # the last round's insert left every key held
        out["insert, keys held"].official.append(_timed(off_insert))
        out["insert, keys held"].ours.append(_timed(lambda: ours.insert(keys, scores)))
        out["query"].official.append(_timed(off_query))
        out["query"].ours.append(_timed(lambda: ours.query(keys)))
    return out


def prehash(ids: torch.Tensor, counts: torch.Tensor, salts: torch.Tensor) -> torch.Tensor:
    """Keys of feature-major ids, `counts[t]` of table slot t: the collection's C++ pre-hash."""
    from cafe_torchrec.hashing import SLOT_BITS

    tables = torch.arange(len(counts))
    return torch.ops.cafe.prepare_ids(ids, counts, tables, salts, tables, torch.zeros_like(tables), SLOT_BITS)


class _Step:
    """One DLRM step's inputs for both sides: ids, global ids, keys, gradient and scores."""

    def __init__(self, cards: Sequence[int], offsets: Sequence[int], salts: torch.Tensor, seed: int) -> None:
        f, b = len(cards), STEP_BATCH
        self.ids = [zipf_ids(b, n, ZIPF_Z, seed * 1000 + i) for i, n in enumerate(cards)]
        self.global_ids = np.ascontiguousarray(
            np.concatenate([(x + o).numpy() for x, o in zip(self.ids, offsets)]).astype(np.int32)
        )
        self.keys = prehash(torch.cat(self.ids), torch.full((f,), b, dtype=torch.int64), salts)  # feature-major
        gen = torch.Generator().manual_seed(10_000 + seed)
        self.grad = torch.randn(b, f * STEP_DIM, generator=gen)
        norms = torch.linalg.vector_norm(self.grad.view(b, f, STEP_DIM), dim=2)  # [B, F]
        self.scores = (norms * b / norms.sum(0)).t().contiguous().view(-1)  # feature-major, mean 1 per field
        self.scores_np = np.ascontiguousarray(self.scores.numpy())


def dlrm_step(artifact: OfficialArtifact, repeats: int, decay: float) -> Dict[str, Union[Measure, Dict[str, float]]]:
    """Workload 2: query, insert, both, our pre-hash, the whole step; recall ("recall": per side)."""
    from torch.nn import Parameter

    from cafe_torchrec.hashing import mix64_int
    from cafe_torchrec.importance import occurrence_scores
    from cafe_torchrec.sketch import HotSketch
    from cafe_torchrec.sketch.policy import AdaptivePolicy
    from examples.dlrm.data.synthetic import KAGGLE_CARDINALITIES

    cards = list(KAGGLE_CARDINALITIES)
    f, b = len(cards), STEP_BATCH
    n = f * b
    offsets = np.concatenate([[0], np.cumsum(cards)[:-1]]).tolist()
    salts = torch.tensor([mix64_int(i, 0) for i in range(f)], dtype=torch.int64)
    counts = torch.full((f,), b, dtype=torch.int64)
    ours = HotSketch(hot_capacity=STEP_HOT_ROWS, threshold=float(STEP_THRESHOLD), decay=decay, kernel="cpp")
    ours.prepare()
    # our default, the adaptive policy (no threshold): same memory, fed the same keys and scores,
    # untimed; it only adds a recall row
    adaptive = HotSketch(hot_capacity=STEP_HOT_ROWS, kernel="cpp", adaptive=AdaptivePolicy())
    level1 = [max(1, c // 1000) for c in cards]  # hashed rows only shape the lookup's output, not its cost
    starts = np.concatenate([[STEP_HOT_ROWS], STEP_HOT_ROWS + np.cumsum(level1)[:-1]]).tolist()
    regions = torch.tensor([[s, r, 0, 1] for s, r in zip(starts, level1)], dtype=torch.int64)
    off = OfficialSketch(artifact, STEP_HOT_ROWS, STEP_THRESHOLD, decay, index=OFFICIAL_C)
    OfficialSketch(artifact, STEP_HOT_ROWS, STEP_THRESHOLD, decay, index=OFFICIAL_PY)  # the one its bags use
    weight_hot = Parameter(torch.zeros(STEP_HOT_ROWS, STEP_DIM))
    bags = [
        artifact.sk_embedding_bag.SKEmbeddingBag(
            i,
            STEP_HOT_ROWS,
            artifact.lib,
            weight_hot,
            torch.device("cpu"),
            c,
            STEP_DIM,
            o,
            max(1, math.ceil(c * 0.2 / 1000)),
            False,
        )
        for i, (c, o) in enumerate(zip(cards, offsets))
    ]
    lengths = torch.ones(n, dtype=torch.int64)

    def lookup(step: _Step) -> torch.Tensor:
        return ours.lookup(step.keys, regions).hints

    def official_python(step: _Step) -> None:
        for bag, ids in zip(bags, step.ids):
            bag.query(ids)
        for i, (bag, ids) in enumerate(zip(bags, step.ids)):
            bag.out_grad = step.grad[:, i * STEP_DIM : (i + 1) * STEP_DIM]
            bag.insert_grad(ids)

    names = {
        "query": "query (ours: fused lookup)",
        "insert": "insert (ours: with the lookup's slot hints)",
        "both": "query + insert",
        "hash": "ours' pre-hash (prepare_ids; the official adds field offsets in Python)",
        "step": "whole step (official: its Python query + insert_grad per field; ours: pre-hash + lookup + "
        "scoring + insert)",
    }
    out: Dict[str, Measure] = {key: Measure(n) for key in names}
    exact: Dict[int, float] = {}
    recall: Dict[str, float] = {}
    for s in range(WARM_STEPS + repeats):
        step = _Step(cards, offsets, salts, s)
        off_query, off_insert = _c_calls(off, step.global_ids, step.scores_np, b)
        t: Dict[str, float] = {}
        for side in ("official", "ours") if s % 2 == 0 else ("ours", "official"):  # alternate who goes first
            if side == "official":
                t["off_q"], t["off_i"] = _timed(off_query), _timed(off_insert)
                t["off_py"] = _timed(official_python, step)
            else:
                t["hash"] = _timed(prehash, torch.cat(step.ids), counts, salts)
                t["q"], hints = _timed_result(lookup, step)
                t["i"] = _timed(ours.insert, step.keys, step.scores, hints)
                adaptive.insert(step.keys, step.scores)
                t["score"] = _timed(occurrence_scores, step.grad, (0, f * STEP_DIM), lengths, f, None, "gradient")
        if s < WARM_STEPS:
            for gid, score in zip(step.global_ids.tolist(), step.scores.tolist()):
                exact[gid] = exact.get(gid, 0.0) + score
            if s == WARM_STEPS - 1:
                recall = _recall(exact, off, ours, offsets, salts, adaptive)
            continue
        for key, official_t, ours_t in (
            ("query", t["off_q"], t["q"]),
            ("insert", t["off_i"], t["i"]),
            ("both", t["off_q"] + t["off_i"], t["q"] + t["i"]),
            ("step", t["off_py"], t["hash"] + t["q"] + t["score"] + t["i"]),
        ):
            out[key].official.append(official_t)
            out[key].ours.append(ours_t)
        out["hash"].ours.append(t["hash"])
    results: Dict[str, Union[Measure, Dict[str, float]]] = {names[key]: m for key, m in out.items()}
    results["recall"] = recall
    return results


def _recall(
    exact: Dict[int, float], off: OfficialSketch, ours, offsets: Sequence[int], salts: torch.Tensor, adaptive
) -> Dict[str, float]:
    """Share of the true top-k (k = hot rows) holding a hot row in each sketch."""
    top = sorted(exact, key=exact.__getitem__, reverse=True)[:STEP_HOT_ROWS]
    off_hot = float((off.query(np.asarray(top, dtype=np.int32)) < 0).mean())
    bounds = np.asarray(offsets[1:])
    field = np.searchsorted(bounds, np.asarray(top), side="right")  # global id -> its field
    local = torch.tensor(np.asarray(top) - np.asarray(offsets)[field], dtype=torch.int64)
    order = np.argsort(field, kind="stable")
    counts = torch.tensor(np.bincount(field, minlength=len(offsets)), dtype=torch.int64)
    keys = prehash(local[order], counts, salts)
    ours_hot = float((ours.query(keys)[0] >= 0).float().mean())
    adaptive_hot = float((adaptive.query(keys)[0] >= 0).float().mean())
    seen = np.fromiter(exact, dtype=np.int32, count=len(exact))
    return {
        "official": off_hot,
        "ours": ours_hot,
        "official rows": float((off.query(seen) < 0).sum()),
        "ours rows": float(ours.hot_rows_used()),
        "ours, adaptive policy": adaptive_hot,
        "ours, adaptive policy rows": float(adaptive.hot_rows_used()),
    }


def render(results: Dict[str, Dict[str, Union[Measure, Dict[str, float]]]], bytes_row: str, repeats: int) -> str:
    """The markdown table: one bold row per workload, then its measurements."""
    lines = [
        f"| ns per occurrence, median of {repeats} | official artifact (C call) | ours | ours / official |",
        "|---|---|---|---|",
    ]
    for workload, rows in results.items():
        lines.append(f"| **{workload}** | | | |")
        for name, m in rows.items():
            if isinstance(m, dict):  # recall
                lines.append(
                    f"| recall of the true top-{STEP_HOT_ROWS // 1000}k after {WARM_STEPS} steps "
                    f"(threshold {STEP_THRESHOLD}) | {m['official']:.3f} | {m['ours']:.3f} | |"
                )
                lines.append(
                    f"| hot rows assigned then (of {STEP_HOT_ROWS:,}) | {m['official rows']:,.0f} | "
                    f"{m['ours rows']:,.0f} | |"
                )
                lines.append(
                    f"| same recall, ours with its default adaptive policy (no threshold; rows assigned) | "
                    f"{m['official']:.3f} | {m['ours, adaptive policy']:.3f} "
                    f"({m['ours, adaptive policy rows']:,.0f}) | |"
                )
                continue
            off, ratio = m.ns("official"), m.ratio()
            note = " (its Python step)" if name.startswith("whole step") else ""
            lines.append(
                f"| {name} | {f'{off:.1f}{note}' if off is not None else '-'} | {m.ns('ours'):.1f} | "
                f"{f'{ratio:.2f}' if ratio is not None else ''} |"
            )
    lines.append(bytes_row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--decay", type=float, default=0.99, help="decay of both sketches (the official's default)")
    args = parser.parse_args()
    try:
        artifact = build_official()
    except OfficialUnavailable as e:
        print(f"skipped: {e}")
        return
    from cafe_torchrec.ops import available
    from cafe_torchrec.sketch import HotSketch

    if not available():  # builds them on first use, before anything is timed
        raise RuntimeError("cafe_torchrec's C++ ops did not build; this benchmark compares its C++ kernels")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        print(f"machine: {machine()}")
        print(f"official artifact: {artifact.root} (built with: {artifact.build_command})\n")
        unique = (
            f"{UNIQUE_KEYS // 1000}k unique keys, {UNIQUE_HOT_ROWS // 1000}k hot rows, threshold {UNIQUE_THRESHOLD}"
        )
        step = (
            f"Zipf({ZIPF_Z}), 26 x {STEP_BATCH} per step, {STEP_HOT_ROWS // 1000}k hot rows, paper memory, "
            f"threshold {STEP_THRESHOLD}"
        )
        results = {
            unique: unique_keys(artifact, args.repeats, args.decay),
            step: dlrm_step(artifact, args.repeats, args.decay),
        }
    finally:
        torch.set_num_threads(threads)
    ours = HotSketch(hot_capacity=STEP_HOT_ROWS, threshold=1.0)
    slot_bytes = ours.slots.numel() * ours.slots.element_size() // ours.slots.shape[0]
    off_bytes = OfficialSketch(artifact, STEP_HOT_ROWS, STEP_THRESHOLD, index=OFFICIAL_C).nbytes
    bytes_row = (
        f"| sketch bytes at {STEP_HOT_ROWS // 1000}k hot rows (4 slots each) | {off_bytes:,} "
        f"(12 B slots) | {ours.nbytes():,} ({slot_bytes} B slots + a free-row bit per hot row) | "
        f"{ours.nbytes() / off_bytes:.2f} |"
    )
    print(render(results, bytes_row, args.repeats))
    print(f"\n(one thread, decay {args.decay} on both; command: {COMMAND})")


if __name__ == "__main__":
    main()
