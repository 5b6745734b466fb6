"""Quality suite (issue #21): does CAFE beat hashing at equal memory on streams we did not design?

    python -m benchmarks.suite                    # hash, cafe, cafe-paper (+ official, cafe-adagrad) everywhere
    python -m benchmarks.suite --quick            # dev subset for fast iteration: dev settings, 2 ratios, 1 seed
    python -m benchmarks.suite --grid             # adds the hand-tuned grid (chosen on validation)
    python -m benchmarks.suite --merge            # re-print the table from the cached runs, running nothing
    python -m benchmarks.suite --snapshot [COMMIT]  # every run from a git archive of COMMIT (default HEAD)

Every run is one `python -m examples.dlrm.train --data stream --stream NAME` process with
`--threads 1`, at most `--jobs` (2) at a time. Methods x settings x ratios x seeds: the
settings are the named streams of examples/dlrm/data/streams.py (train days, a validation
day, a held-out test day), the ratios 10/100/1000/10000, the seeds >= 3 (the seed picks the
stream's world and draws and the model's initialisation and hash salts, so a cell's spread
covers both).

Methods (`METHODS`, a dict to edit as CafeConfig grows policies):
- ``hash``: the hashing trick at the same memory;
- ``cafe``: CAFE with CafeConfig's defaults at run time (whatever they are then);
- ``cafe-paper``: the paper's fixed policy (`--cafe-option policy=paper`: threshold per ratio,
  decay 0.98 by trigger);
- ``grid``: a hand grid over both policies (the paper's threshold x decay x hot share, the
  adaptive one's horizon x hot share; `GRID`, `ADAPTIVE_GRID`, `GRID_RATIOS`), the point
  CHOSEN on the validation day with the first seed, then REPORTED on the test day with all
  seeds (per setting and ratio);
- ``official``: the official artifact's CAFE layer, through benchmarks.official.train_official
  on the very same batches (skipped, with the reason, when that module or the artifact is
  absent); ``cafe-adagrad``: our CAFE with element-wise Adagrad, lr 0.05, as the official
  trains, reported only beside it (same memory, same optimizer);
- ``official-hash`` and ``hash-adagrad``: the hashing of each of those two training loops (the
  official's model, init and loss; ours with Adagrad lr 0.05). Each CAFE's gain over its own
  loop's hashing (`OWN_HASH`) compares the two CAFEs with everything around the embedding
  layer taken out; the suite prints it as its own table.

Protocol: constants are chosen on validation only; settings are `dev` (defaults may be tuned
on them) or `held_out` (never tuned on); the table reports the two separately. Runs with the
same command line and code share one cached result.

Cache: each finished run's JSON is kept under results/suite/runs/, keyed by its command line
and a digest of the code it runs (cafe_torchrec for CAFE, the baseline's files for hashing,
examples/dlrm for all), so an interrupted suite resumes and a code change reruns what it
touches. `--reuse hash` keeps a method's cached runs across code changes; `--merge` prints
whatever is cached (stale runs marked *).

Output: the machine line, one table per role (mean test AUC and its spread max - min over
seeds per method; method - hash in AUC points with the min and max of the per-seed differences),
the grid's choices, for abrupt-drift settings at 1000x the recovery time of the hot-lookup
share after each drift (steps, and fraction of a day, until it is back to 90% of its level
before the drift), results/suite/summary.json and docs/suite.png (AUC gain over hashing per
setting and ratio, one marker per method, error bars from the lowest to the highest per-seed
difference).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from benchmarks.common import machine, table, trainer_command
from examples.dlrm.data.streams import StreamSpec, batches, settings

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "suite"
PLOT = REPO / "docs" / "suite.png"

# method -> trainer arguments. "cafe" follows CafeConfig's defaults (the adaptive policy);
# "cafe-paper" pins the paper's fixed policy.
# The official's optimizer (element-wise Adagrad, lr 0.05): one list, so that ours and its hashing
# train exactly alike beside the official.
_ADAGRAD = ["--optimizer", "adagrad", "--learning-rate", "0.05"]
_ADAGRAD_CAFE = ["--embedding", "cafe", *_ADAGRAD]
METHODS: Dict[str, List[str]] = {
    "hash": ["--embedding", "hash"],
    "cafe": ["--embedding", "cafe"],
    "cafe-paper": ["--embedding", "cafe", "--cafe-option", "policy=paper"],
    "cafe-adagrad": _ADAGRAD_CAFE,
    "hash-adagrad": ["--embedding", "hash", *_ADAGRAD],
    # ablations of cafe-adagrad where the official is ahead: its policy, its hot share at 1000x and 10000x, and more hot
    # rows at the same memory
    "cafe-adagrad-paper": [*_ADAGRAD_CAFE, "--cafe-option", "policy=paper"],
    "cafe-adagrad-hot80": [*_ADAGRAD_CAFE, "--cafe-option", "hot_share=0.8"],
    "cafe-adagrad-hot90": [*_ADAGRAD_CAFE, "--cafe-option", "hot_share=0.9"],
    "cafe-adagrad-lean": [*_ADAGRAD_CAFE, "--cafe-option", "slots_per_hot_row=2"],
    # ablations of the default's hot share (the official's is 0.8 / 0.9 at 1000x / 10000x)
    "cafe-hot80": ["--embedding", "cafe", "--cafe-option", "hot_share=0.8"],
    "cafe-hot85": ["--embedding", "cafe", "--cafe-option", "hot_share=0.85"],
    "cafe-hot90": ["--embedding", "cafe", "--cafe-option", "hot_share=0.9"],
    # hysteresis H: since c231de6 H outside a burst and max(1, H / 2) in it; in older snapshots H everywhere
    "cafe-hyst1.5": ["--embedding", "cafe", "--cafe-option", "hysteresis=1.5"],
    "cafe-hyst2": ["--embedding", "cafe", "--cafe-option", "hysteresis=2"],
    "cafe-hyst3": ["--embedding", "cafe", "--cafe-option", "hysteresis=3"],
    # the adaptive policy without its stale rule
    "cafe-nostale": ["--embedding", "cafe", "--cafe-option", "stale_hits=inf"],
    # the stale rule acting on any stale id, not only in a burst (each time opening the faster-decay window)
    "cafe-anystale": ["--embedding", "cafe", "--cafe-option", "stale_burst=0"],
}
OFFICIAL = "official"  # runs benchmarks.official.train_official in a worker process
# The official artifact's layers the suite runs (label -> train_official's method): its CAFE, and its
# hashing in the same training loop, the control that tells its loop's effect from its CAFE's.
OFFICIAL_RUNS = {OFFICIAL: "cafe", "official-hash": "hash"}
# Each method's gain is also reported over the hashing of its own training loop (same model, optimizer
# and init): the like-for-like comparison of the official's CAFE and ours.
OWN_HASH = {"official": "official-hash", "cafe-adagrad": "hash-adagrad"}
GRID_METHOD = "grid"  # METHODS["cafe"] plus one point of GRID
# The hand-tuned grid, over both policies: the paper's (threshold as a multiple of its per-ratio
# threshold, decay, hot share) and the adaptive one (horizon, hot share).
GRID = {"threshold_x": (0.1, 1.0), "decay": (0.98, 0.8), "hot_share": (0.6, 0.85)}
ADAPTIVE_GRID = {"horizon": (16.0, 64.0), "hot_share": (0.6, 0.9)}
GRID_RATIOS = (1000, 10000)
RATIOS = (10, 100, 1000, 10000)
SEEDS = (0, 1, 2)
QUICK_RATIOS = (1000, 10000)
TABLE_METHODS = ("hash", "cafe", "cafe-paper", GRID_METHOD, OFFICIAL, "cafe-adagrad", "official-hash", "hash-adagrad")
RECOVERY_RATIO = 1000
RECOVERY_LEVEL = 0.9
# Code each method runs: a change there invalidates its cached runs (examples/dlrm counts for all).
CODE = {
    "hash": (
        "cafe_torchrec/baselines",
        "cafe_torchrec/collection.py",
        "cafe_torchrec/layout.py",
        "cafe_torchrec/validation.py",
        "cafe_torchrec/hashing.py",
    ),
    "cafe": ("cafe_torchrec",),
    OFFICIAL: ("benchmarks/official.py",),
}
COMMON_CODE = ("examples/dlrm", "planner")  # the trainer plans with planner/ (placement moves AUCs)
CODE_SUFFIXES = (".py", ".cpp", ".h", ".cu", ".cuh")
SKIPPED = 75  # exit status of an official run without the artifact
# A run is ~10-90 s; one far past that is stuck (e.g. on the stale lock of a killed JIT build of the C++ ops).
RUN_TIMEOUT_S = 1800


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: which method label asked for it, where, and the exact trainer arguments."""

    method: str
    setting: str
    ratio: float
    seed: int
    args: Tuple[str, ...]  # trainer arguments (official: the worker's)
    code_of: str  # the CODE entry whose files it runs

    @property
    def key(self) -> str:
        """Same command line, same key: methods whose arguments coincide share one result."""
        return hashlib.sha1(json.dumps([self.code_of, self.args]).encode()).hexdigest()[:12]

    def stem(self) -> str:
        return f"{self.setting}/{self.ratio:g}x-s{self.seed}-{self.key}"


# ----------------------------------------------------------------------------- planning
def official_available() -> Optional[str]:
    """None when benchmarks.official can be imported, else why not."""
    if importlib.util.find_spec("benchmarks.official") is None:
        return "benchmarks/official.py is not there (yet)"
    return None


def log_every(spec: StreamSpec) -> int:
    """Hot-share resolution: ~50 points per day, so recovery after a drift is measured to 2% of a day."""
    return max(1, spec.steps_per_day // 50)


def train_args(spec: StreamSpec, method_args: Sequence[str], ratio: float, seed: int) -> Tuple[str, ...]:
    return (
        "--data",
        "stream",
        "--stream",
        spec.name,
        "--stream-seed",
        str(seed),
        "--seed",
        str(seed),
        "--compression-ratio",
        f"{ratio:g}",
        "--log-every",
        str(log_every(spec)),
        *method_args,
    )


def grid_points(ratio: float) -> List[Dict[str, Any]]:
    """The grid's CafeConfig fields at a ratio (paper thresholds relative to the paper's there)."""
    from cafe_torchrec.config import default_threshold

    paper = default_threshold(ratio)
    points: List[Dict[str, Any]] = [
        {"policy": "paper", "threshold": round(paper * tx, 3), "decay": decay, "hot_share": share}
        for tx, decay, share in itertools.product(GRID["threshold_x"], GRID["decay"], GRID["hot_share"])
    ]
    points += [
        {"horizon": horizon, "hot_share": share}
        for horizon, share in itertools.product(ADAPTIVE_GRID["horizon"], ADAPTIVE_GRID["hot_share"])
    ]
    return points


def grid_args(point: Dict[str, Any]) -> List[str]:
    out = list(METHODS["cafe"])
    for key, value in point.items():
        out += ["--cafe-option", f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"]
    return out


def plan_runs(
    methods: Sequence[str], specs: Sequence[StreamSpec], ratios: Sequence[float], seeds: Sequence[int]
) -> List[Run]:
    """Every run of the fixed methods, and the grid's validation runs (first seed, GRID_RATIOS only)."""
    runs = []
    for spec, ratio, seed, method in itertools.product(specs, ratios, seeds, methods):
        if method in OFFICIAL_RUNS:
            args = ("official", spec.name, f"{ratio:g}", str(seed))
            if OFFICIAL_RUNS[method] != "cafe":  # the official CAFE's runs keep their cache keys
                args += ("--official-method", OFFICIAL_RUNS[method])
            runs.append(Run(method, spec.name, ratio, seed, args, OFFICIAL))
        elif method == GRID_METHOD:
            if seed == seeds[0] and ratio in GRID_RATIOS:
                runs += [
                    Run(method, spec.name, ratio, seed, train_args(spec, grid_args(p), ratio, seed), "cafe")
                    for p in grid_points(ratio)
                ]
        else:
            runs.append(
                Run(
                    method,
                    spec.name,
                    ratio,
                    seed,
                    train_args(spec, METHODS[method], ratio, seed),
                    "hash" if METHODS[method][1] == "hash" else "cafe",
                )
            )
    return runs


# ----------------------------------------------------------------------------- the cache
def code_digest(code_of: str, repo: Path) -> str:
    """A digest of the source files a method runs in the checkout `repo` (examples/dlrm included)."""
    h = hashlib.sha1()
    for root in (*CODE[code_of], *COMMON_CODE):
        path = repo / root
        files = sorted(p for p in path.rglob("*") if p.suffix in CODE_SUFFIXES) if path.is_dir() else [path]
        for p in files:
            if p.exists():
                h.update(str(p.relative_to(repo)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:10]


def snapshot(commit: str) -> Tuple[Path, str]:
    """A copy of `commit` (git archive) to run from, beside a link to ../shared so its relative paths
    (the Criteo sample, the official artifact) resolve as in the checkout; returns (root, sha).

    Why: other work edits the checkout while a suite runs for an hour; a snapshot keeps every run
    of one suite on one commit. One fixed folder per commit, kept for the next suite, with its C++
    ops built in place once (`build_ops`)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", commit], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    base = Path(tempfile.gettempdir()) / f"cafe-suite-{sha}"
    root = base / "repo"
    if root.is_dir():
        build_ops(root)  # a snapshot made before snapshots built their ops; nothing to do once built
        return root, sha
    staging = Path(tempfile.mkdtemp(prefix=f"cafe-suite-{sha}-"))
    (staging / "shared").symlink_to(REPO.parent / "shared")
    (staging / "repo").mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", sha], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(staging / "repo")], input=archive, check=True)
    # planner/ imports as cafe_planner through the editable install, which points at the checkout: a link
    # in the snapshot's root (first on sys.path with -m) makes the snapshot's own planner win
    (staging / "repo" / "cafe_planner").symlink_to("planner")
    build_ops(staging / "repo")
    try:
        os.rename(staging, base)  # atomic: a concurrent suite either sees the whole snapshot or makes its own
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return root, sha


OPS_FAILED = "build_ops.failed"  # beside a snapshot's repo/: why its C++ ops did not build in place


def build_ops(root: Path) -> None:
    """Compile a snapshot's C++ ops in place (cafe_torchrec/_C, as `make` does in a checkout), once,
    so its runs load them rather than build them just in time. Why: torch's JIT cache keeps one
    build per name (ours: the sources' hash) and rebuilds it when the build's paths change, so two
    snapshots of the same sources (a commit and a scratch build of it) rebuild it in turn, and a
    run killed mid-build leaves a lock file that stalls every later run of those sources. Where the
    commit cannot build them, the reason is kept beside the snapshot and printed each time it is
    used: its runs then build them just in time."""
    failed = root.parent / OPS_FAILED
    with open(root.parent / ".build_ops.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # suites started at once build a reused snapshot once
        if not _built_ops(root) and not failed.exists():
            print(f"building the C++ ops of {root} in place (a minute or two, once)", flush=True)
            proc = subprocess.run(
                [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                cwd=root,
                env={**os.environ, "CAFE_BUILD_OPS": "1"},
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0 or not _built_ops(root):
                # the compiler's errors go to stdout under torch's build, the traceback to stderr
                failed.write_text(f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-1000:]}")
    if failed.exists():
        print(
            f"warning: the C++ ops of {root} did not build in place ({failed}); its runs build them just in "
            f"time: {failed.read_text()[-600:]}",
            flush=True,
        )


def _built_ops(root: Path) -> bool:
    return any((root / "cafe_torchrec").glob("_C*.so"))


class Cache:
    """Finished runs under results/suite/runs/<setting>/<ratio>x-s<seed>-<key>-<code digest>.json."""

    def __init__(self, root: Path, repo: Path, reuse: Iterable[str], any_code: bool) -> None:
        self.root, self.reuse, self.any_code = root, set(reuse), any_code
        self.digests = {name: code_digest(name, repo) for name in CODE}

    def path(self, run: Run) -> Path:
        return self.root / f"{run.stem()}-{self.digests[run.code_of]}.json"

    def get(self, run: Run) -> Optional[Dict[str, Any]]:
        """The cached result of this run with today's code, else (with --reuse / --merge) the newest other."""
        exact = self.path(run)
        if exact.exists():
            return json.loads(exact.read_text())
        if self.any_code or run.method in self.reuse:
            older = sorted(self.root.glob(f"{run.stem()}-*.json"), key=lambda p: p.stat().st_mtime)
            if older:
                return {**json.loads(older[-1].read_text()), "stale": True}
        return None

    def put(self, run: Run, result: Dict[str, Any]) -> None:
        path = self.path(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, path)


# ----------------------------------------------------------------------------- running
def execute(run: Run, repo: Path) -> Dict[str, Any]:
    """One run in its own process in the checkout `repo`; a failure becomes {"error": ..., "returncode": ...}."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    with tempfile.TemporaryDirectory(prefix="suite-") as tmp:
        if run.code_of == OFFICIAL:
            worker = [*run.args[1:4], f"{tmp}/run.json", *run.args[4:]]
            cmd = [sys.executable, "-m", "benchmarks.suite", "--official-worker", *worker]
        else:
            cmd = trainer_command([*run.args, "--threads", "1"], tmp, "run")
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess(cmd, -1, "", f"timed out after {RUN_TIMEOUT_S} s")
        out = Path(tmp) / "run.json"
        if proc.returncode == 0 and out.exists():
            result = json.loads(out.read_text())
        else:
            lines = (proc.stderr.strip() or proc.stdout.strip() or "failed").splitlines()
            result = {"error": lines[-1][:300], "returncode": proc.returncode}
    result["suite"] = {
        "method": run.method,
        "setting": run.setting,
        "ratio": run.ratio,
        "seed": run.seed,
        "args": list(run.args),
        "wall_s": time.perf_counter() - start,
    }
    return result


def cacheable(result: Dict[str, Any]) -> bool:
    """Successes, and ValueErrors (an unsupported input, e.g. a ratio a method cannot reach, stays so);
    not other failures (a checkout edited mid-run, a killed process), which the next resume retries."""
    return "error" not in result or "ValueError" in result["error"]


def run_all(runs: List[Run], cache: Cache, jobs: int, dry: bool, repo: Path) -> Dict[Run, Dict[str, Any]]:
    """Results of `runs`: cached ones read, the rest executed (distinct keys once), `jobs` at a time."""
    from tqdm import tqdm

    results: Dict[Run, Dict[str, Any]] = {}
    todo: Dict[str, List[Run]] = {}
    for run in runs:
        found = cache.get(run)
        if found is not None:
            results[run] = found
        else:
            todo.setdefault(str(cache.path(run)), []).append(run)
    if dry or not todo:
        return results
    with ThreadPoolExecutor(max_workers=jobs) as pool, tqdm(total=len(todo), desc="runs", dynamic_ncols=True) as bar:
        futures = {pool.submit(execute, group[0], repo): group for group in todo.values()}
        for future in as_completed(futures):
            group = futures[future]
            result = future.result()
            if cacheable(result):
                cache.put(group[0], result)
            for run in group:
                results[run] = result
            name = (
                f"{group[0].setting} {'/'.join(sorted({r.method for r in group}))} {group[0].ratio:g}x s{group[0].seed}"
            )
            bar.write(
                f"{name}: "
                + (
                    f"val {result['val_auc']:.4f} test {result['test_auc']:.4f}"
                    if "error" not in result
                    else f"ERROR {result['error']}"
                )
            )
            bar.update(1)
    return results


def official_worker(setting: str, ratio: str, seed: str, out: str, method: str) -> None:
    """--official-worker: train the official CAFE layer on a stream's batches and write its JSON; exits with
    SKIPPED (not cached) when the artifact is unavailable."""
    from benchmarks.official import OfficialUnavailable, train_official

    spec, seed_i = settings()[setting], int(seed)
    try:
        result = train_official(
            list(spec.cardinalities),
            batches(spec, "train", seed_i),
            batches(spec, "validation", seed_i),
            batches(spec, "test", seed_i),
            compression_ratio=float(ratio),
            seed=seed_i,
            embedding_dim=spec.embedding_dim,
            method=method,
        )
    except OfficialUnavailable as err:
        print(f"official skipped: {err}", file=sys.stderr)
        raise SystemExit(SKIPPED) from None
    label = next(name for name, m in OFFICIAL_RUNS.items() if m == method)
    Path(out).write_text(json.dumps({"method": label, **result}))


# ----------------------------------------------------------------------------- reading results
def ok(result: Optional[Dict[str, Any]]) -> bool:
    return result is not None and "error" not in result


def choose_grid(results: Dict[Run, Dict[str, Any]]) -> Dict[Tuple[str, float], Tuple[str, ...]]:
    """(setting, ratio) -> the grid run's arguments with the best validation AUC (first seed);
    among equal AUCs the first point in grid order (grid_points), whatever order the runs
    finished in."""
    best: Dict[Tuple[str, float], Tuple[float, int, Tuple[str, ...]]] = {}
    for run, result in results.items():
        if run.method == GRID_METHOD and ok(result):
            cell = (run.setting, run.ratio)
            # a grid run's arguments end with its point's (train_args)
            order = [tuple(grid_args(p)) for p in grid_points(run.ratio)]
            rank = next((i for i, a in enumerate(order) if tuple(run.args[-len(a) :]) == a), len(order))
            if cell not in best or (result["val_auc"], -rank) > (best[cell][0], -best[cell][1]):
                best[cell] = (result["val_auc"], rank, run.args)
    return {cell: args for cell, (_, _, args) in best.items()}


def _mean_or_none(values: List[float]) -> Optional[float]:
    """The mean, or None when no seed logged a point (a run cut short)."""
    return statistics.fmean(values) if values else None


def grid_reports(choice: Dict[Tuple[str, float], Tuple[str, ...]], seeds: Sequence[int]) -> List[Run]:
    """The chosen grid points with every seed (the first seed's run is the choosing run itself)."""
    runs = []
    for (setting, ratio), args in choice.items():
        for seed in seeds:
            seeded = list(args)
            for flag in ("--stream-seed", "--seed"):
                seeded[seeded.index(flag) + 1] = str(seed)
            runs.append(Run("grid-best", setting, ratio, seed, tuple(seeded), "cafe"))
    return runs


def spread(values: Sequence[float]) -> float:
    return max(values) - min(values) if values else float("nan")


def cells(
    results: Dict[Run, Dict[str, Any]],
    specs: Sequence[StreamSpec],
    ratios: Sequence[float],
    seeds: Sequence[int],
    methods: Sequence[str],
) -> List[Dict[str, Any]]:
    """Per (setting, ratio, method): per-seed test and validation AUC, mean, spread, and the gain over
    hashing (per-seed differences, AUC points)."""
    by: Dict[Tuple[str, float, str, int], Dict[str, Any]] = {}
    for run, result in results.items():
        method = GRID_METHOD if run.method == "grid-best" else run.method
        if run.method != GRID_METHOD:
            by[(run.setting, run.ratio, method, run.seed)] = result
    out = []
    for spec, ratio, method in itertools.product(specs, ratios, methods):
        runs = {s: by.get((spec.name, ratio, method, s)) for s in seeds}
        good = {s: r for s, r in runs.items() if ok(r)}
        errors = sorted({r["error"] for r in runs.values() if r is not None and "error" in r})
        cell: Dict[str, Any] = {
            "setting": spec.name,
            "role": spec.role,
            "ratio": ratio,
            "method": method,
            "seeds": sorted(good),
            "errors": errors,
            "stale": any(r.get("stale") for r in good.values()),
        }
        if good:
            test = [good[s]["test_auc"] for s in sorted(good)]
            cell.update(
                test_auc=test,
                test_auc_mean=statistics.fmean(test),
                test_auc_spread=spread(test),
                val_auc=[good[s].get("val_auc") for s in sorted(good)],
            )
            achieved = [good[s].get("compression_ratio") for s in sorted(good)]
            if all(isinstance(a, (int, float)) for a in achieved):
                cell["achieved_ratio"] = statistics.fmean(achieved)  # logical bytes / bytes held, mean over seeds
            baselines = {"gain": "hash", "own_gain": OWN_HASH.get(method)}
            for field, baseline in baselines.items():
                if baseline is None or method == "hash":
                    continue
                base = {s: by.get((spec.name, ratio, baseline, s)) for s in good}
                paired = [s for s in sorted(good) if ok(base[s])]
                diffs = [100 * (good[s]["test_auc"] - base[s]["test_auc"]) for s in paired]
                if diffs:
                    cell.update(
                        {
                            f"{field}_seeds": paired,
                            f"{field}_points": diffs,
                            f"{field}_mean": statistics.fmean(diffs),
                            f"{field}_spread": spread(diffs),
                            f"{field}_min": min(diffs),
                            f"{field}_max": max(diffs),
                        }
                    )
        out.append(cell)
    return out


def recovery(result: Dict[str, Any], spec: StreamSpec) -> List[Dict[str, Any]]:
    """Per drift step: steps (and fraction of a day) until the hot-lookup share is back to 90% of its
    mean over the last 3 logged intervals before the drift; None when it is not back before the next
    drift (or the end). A logged point at step k covers the batches before k, so the figure is an
    upper bound with the log interval's resolution."""
    history = [(h["step"], h["hot_lookup_share"]) for h in result.get("hot_history", [])]
    out = []
    ends = list(spec.drift_steps[1:]) + [spec.train_steps]
    for drift, end in zip(spec.drift_steps, ends):
        before = [share for step, share in history if step <= drift][-3:]
        if not before:
            continue
        level = statistics.fmean(before)
        after = [(step, share) for step, share in history if drift < step <= end]
        back = next((step for step, share in after if share >= RECOVERY_LEVEL * level), None)
        steps = back - drift if back is not None else None
        out.append(
            {
                "drift_step": drift,
                "level_before": level,
                "min_after": min((s for _, s in after), default=None),
                "steps": steps,
                "days": steps / spec.steps_per_day if steps is not None else None,
            }
        )
    return out


def is_cafe(run: Run) -> bool:
    """Whether a run trains our CAFE collection (any method or ablation built on `--embedding cafe`)."""
    args = list(run.args)
    return "--embedding" in args and args[args.index("--embedding") + 1] in ("cafe", "cafe-ml")


def recoveries(results: Dict[Run, Dict[str, Any]], specs: Sequence[StreamSpec]) -> List[Dict[str, Any]]:
    """Recovery after each drift of every CAFE-like run on abrupt-drift settings at RECOVERY_RATIO:
    one row per (setting, method, drift step) with the per-seed steps (None: not back before the next drift)."""
    out = []
    for spec in specs:
        if spec.drift != "abrupt":
            continue
        per_drift: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
        for run, result in sorted(results.items(), key=lambda item: item[0].seed):
            method = GRID_METHOD if run.method == "grid-best" else run.method
            if (
                run.setting == spec.name
                and run.ratio == RECOVERY_RATIO
                and (method == GRID_METHOD or is_cafe(run))
                and ok(result)
                and run.method != GRID_METHOD
            ):
                for drift in recovery(result, spec):
                    per_drift.setdefault((method, drift["drift_step"]), []).append({**drift, "seed": run.seed})
        for (method, step), drifts in sorted(per_drift.items()):
            done = [d["steps"] for d in drifts if d["steps"] is not None]
            out.append(
                {
                    "setting": spec.name,
                    "method": method,
                    "drift_step": step,
                    "seeds": [d["seed"] for d in drifts],
                    "steps": [d["steps"] for d in drifts],
                    "mean_days": statistics.fmean(done) / spec.steps_per_day if done else None,
                    "level_before": statistics.fmean(d["level_before"] for d in drifts),
                    "min_after": _mean_or_none([d["min_after"] for d in drifts if d["min_after"] is not None]),
                }
            )
    return out


# ----------------------------------------------------------------------------- output
def shown_methods(methods: Sequence[str]) -> List[str]:
    """The methods of a table or plot: TABLE_METHODS' order first, then the others as given."""
    return [m for m in TABLE_METHODS if m in methods] + [m for m in methods if m not in TABLE_METHODS]


def print_tables(cell_list: List[Dict[str, Any]], methods: Sequence[str]) -> None:
    shown = shown_methods(methods)
    index = {(c["setting"], c["ratio"], c["method"]): c for c in cell_list}
    for role in ("dev", "held_out"):
        rows = []
        for setting, ratio in dict.fromkeys((c["setting"], c["ratio"]) for c in cell_list if c["role"] == role):
            row: List[Any] = [setting, f"{ratio:g}x"]
            for method in shown:
                c = index[(setting, ratio, method)]
                if "test_auc_mean" in c:
                    mark = "*" if c["stale"] else ""
                    row.append(f"{c['test_auc_mean']:.4f} ({c['test_auc_spread']:.4f}, n={len(c['seeds'])}){mark}")
                else:
                    row.append("n/a" if c["errors"] else "-")
            for method in (m for m in shown if m != "hash"):
                c = index[(setting, ratio, method)]
                row.append(
                    f"{c['gain_mean']:+.2f} [{c['gain_min']:+.2f}, {c['gain_max']:+.2f}]" if "gain_mean" in c else "-"
                )
            rows.append(row)
        if rows:
            print(
                f"\n{role} settings: mean test AUC (spread max-min over seeds, seeds); method-hash: mean gain "
                "in AUC points [min, max] of the per-seed differences (spread = max - min)"
            )
            print(table(["setting", "ratio", *shown, *[f"{m}-hash" for m in shown if m != "hash"]], rows))
    print_achieved_ratios(cell_list, shown)
    print_own_gains(cell_list, shown)
    errors = sorted({(c["setting"], c["ratio"], c["method"], e) for c in cell_list for e in c["errors"]})
    for setting, ratio, method, error in errors:
        print(f"n/a {setting} {ratio:g}x {method}: {error}")


def print_achieved_ratios(cell_list: List[Dict[str, Any]], shown: Sequence[str]) -> None:
    """The compression each method reached per cell (logical bytes / bytes it held, mean over
    seeds), beside the ratio asked for: the AUCs compare methods at these memories."""
    index = {(c["setting"], c["ratio"], c["method"]): c for c in cell_list}
    rows = []
    for setting, ratio in dict.fromkeys((c["setting"], c["ratio"]) for c in cell_list):
        shown_cells = [index[(setting, ratio, m)] for m in shown]
        if any("achieved_ratio" in c for c in shown_cells):
            rows.append(
                [
                    setting,
                    f"{ratio:g}x",
                    *[
                        f"{c['achieved_ratio']:,.1f}x" + ("*" if c["stale"] else "") if "achieved_ratio" in c else "-"
                        for c in shown_cells
                    ],
                ]
            )
    if rows:
        print(
            "\nachieved compression ratio (logical bytes / bytes held, mean over seeds; *: a cached run of other code)"
        )
        print(table(["setting", "asked", *shown], rows))


def print_own_gains(cell_list: List[Dict[str, Any]], shown: Sequence[str]) -> None:
    """Each CAFE's gain over the hashing of its own training loop (OWN_HASH), side by side: the official's
    CAFE against ours with the effect of everything around the embedding layer taken out."""
    pairs = [(m, OWN_HASH[m]) for m in shown if m in OWN_HASH and OWN_HASH[m] in shown]
    if not pairs:
        return
    index = {(c["setting"], c["ratio"], c["method"]): c for c in cell_list}
    rows = []
    for setting, ratio in dict.fromkeys((c["setting"], c["ratio"]) for c in cell_list):
        row: List[Any] = [setting, f"{ratio:g}x"]
        gains: List[Dict[int, float]] = []  # per method, seed -> its gain
        for method, _ in pairs:
            c = index[(setting, ratio, method)]
            if "own_gain_mean" in c:
                row.append(f"{c['own_gain_mean']:+.2f} [{c['own_gain_min']:+.2f}, {c['own_gain_max']:+.2f}]")
                gains.append(dict(zip(c["own_gain_seeds"], c["own_gain_points"])))
            else:
                row.append("-")
        shared = sorted(set(gains[0]) & set(gains[1])) if len(gains) == 2 else []
        if shared:
            diffs = [gains[1][seed] - gains[0][seed] for seed in shared]
            row.append(f"{statistics.fmean(diffs):+.2f} [{min(diffs):+.2f}, {max(diffs):+.2f}]")
        else:
            row.append("-")
        rows.append(row)
    names = [f"{m} - {h}" for m, h in pairs]
    print(
        "\ngain over the hashing of the same training loop (model, optimizer, init), AUC points, mean "
        "[min, max] over seeds; last column: the second minus the first, paired by seed"
    )
    print(table(["setting", "ratio", *names, "difference"], rows))


def plot(cell_list: List[Dict[str, Any]], specs: Sequence[StreamSpec], methods: Sequence[str], path: Path) -> None:
    """AUC gain over hashing per setting and ratio, one marker per method, error bars = per-seed min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in shown_methods(methods) if m != "hash"]
    cols = min(4, len(specs))
    rows = -(-len(specs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    markers = dict(zip(TABLE_METHODS, "sovD^P<>"))
    for ax, spec in zip(axes.flat, specs):
        ratios = sorted({c["ratio"] for c in cell_list if c["setting"] == spec.name})
        for k, method in enumerate(shown):
            pts = [c for c in cell_list if c["setting"] == spec.name and c["method"] == method and "gain_mean" in c]
            xs = [ratios.index(c["ratio"]) + (k - (len(shown) - 1) / 2) * 0.12 for c in pts]
            ys = [c["gain_mean"] for c in pts]
            err = [[c["gain_mean"] - c["gain_min"] for c in pts], [c["gain_max"] - c["gain_mean"] for c in pts]]
            ax.errorbar(xs, ys, yerr=err, fmt=markers.get(method, "o"), capsize=3, label=method)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(ratios)), [f"{r:g}x" for r in ratios])
        ax.set_title(f"{spec.name} ({spec.role})", fontsize=10)
        ax.set_ylabel("test AUC - hash (points)")
    for ax in list(axes.flat)[len(specs) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(shown), fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_recovery(rec: List[Dict[str, Any]]) -> None:
    if not rec:
        return
    print(
        f"\nhot-lookup share after an abrupt drift at {RECOVERY_RATIO:g}x: steps until it is back to "
        f"{RECOVERY_LEVEL:.0%} of its level just before the drift, per seed ('never': not before the next "
        "drift or the end; upper bounds at the log interval); share before and lowest share after, seed means"
    )
    rows = [
        [
            r["setting"],
            r["method"],
            r["drift_step"],
            " ".join("never" if s is None else str(s) for s in r["steps"]),
            f"{r['mean_days']:.3f}" if r["mean_days"] is not None else "-",
            f"{r['level_before']:.3f}",
            f"{r['min_after']:.3f}",
        ]
        for r in rec
    ]
    print(
        table(
            [
                "setting",
                "method",
                "drift step",
                "steps per seed",
                "days (recovered)",
                "share before",
                "min share after",
            ],
            rows,
        )
    )


# ----------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="dev settings, ratios 1000 and 10000, seed 0")
    p.add_argument(
        "--methods",
        default=None,
        help="comma separated (default: hash,cafe,cafe-paper, and "
        "official,cafe-adagrad when benchmarks.official exists)",
    )
    p.add_argument("--grid", action="store_true", help="add the grid method")
    p.add_argument("--settings", default=None, help="comma separated stream names (default: all)")
    p.add_argument("--ratios", type=float, nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one core each)")
    p.add_argument("--reuse", default="", help="comma separated methods whose cached runs survive code changes")
    p.add_argument("--merge", action="store_true", help="run nothing: print the table from cached runs")
    p.add_argument(
        "--snapshot",
        nargs="?",
        const="HEAD",
        default=None,
        metavar="COMMIT",
        help="run from a git archive of COMMIT (default HEAD) instead of the live checkout",
    )
    p.add_argument("--out-dir", default=str(OUT))
    p.add_argument("--plot", default=str(PLOT))
    p.add_argument("--official-worker", nargs=4, metavar=("SETTING", "RATIO", "SEED", "OUT"), help=argparse.SUPPRESS)
    p.add_argument(
        "--official-method", default="cafe", choices=sorted(set(OFFICIAL_RUNS.values())), help=argparse.SUPPRESS
    )
    return p.parse_args(argv)


def selection(args: argparse.Namespace) -> Tuple[List[str], List[StreamSpec], List[float], List[int]]:
    """Methods, settings, ratios and seeds of this invocation."""
    all_specs = settings()
    if args.methods:
        methods = args.methods.split(",")
    else:
        methods = ["hash", "cafe", "cafe-paper"]
        if official_available() is None and not args.quick:
            methods += [OFFICIAL, "cafe-adagrad"]
    if args.grid and GRID_METHOD not in methods:
        methods.append(GRID_METHOD)
    unknown = [m for m in methods if m not in METHODS and m not in (*OFFICIAL_RUNS, GRID_METHOD)]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join([*METHODS, *OFFICIAL_RUNS, GRID_METHOD])}")
    for name in [m for m in methods if m in OFFICIAL_RUNS]:
        if official_available() is not None:
            print(f"{name}: skipped, {official_available()}")
            methods.remove(name)
    if args.settings:
        names = args.settings.split(",")
    else:
        names = [n for n, s in all_specs.items() if s.role == "dev"] if args.quick else list(all_specs)
    bad = [n for n in names if n not in all_specs]
    if bad:
        raise SystemExit(f"unknown settings {bad}; known: {', '.join(all_specs)}")
    specs = [all_specs[n] for n in names]
    ratios = args.ratios or list(QUICK_RATIOS if args.quick else RATIOS)
    seeds = args.seeds or ([SEEDS[0]] if args.quick else list(SEEDS))
    return methods, specs, ratios, seeds


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.official_worker:
        official_worker(*args.official_worker, args.official_method)
        return {}
    import torch

    torch.set_num_threads(1)  # the machine line then states the runs' thread count
    start = time.perf_counter()
    methods, specs, ratios, seeds = selection(args)
    for spec in list(specs):
        if spec.criteo_path is not None and not Path(spec.criteo_path).exists():
            print(f"{spec.name}: skipped, {spec.criteo_path} not found")
            specs.remove(spec)
    repo, commit = snapshot(args.snapshot) if args.snapshot else (REPO, "working tree")
    return run_suite(args, methods, specs, ratios, seeds, repo, commit, start)


def run_suite(
    args: argparse.Namespace,
    methods: List[str],
    specs: List[StreamSpec],
    ratios: List[float],
    seeds: List[int],
    repo: Path,
    commit: str,
    start: float,
) -> Dict[str, Any]:
    """Plan, run (or read) and report; the checkout `repo` is what runs."""
    cache = Cache(Path(args.out_dir) / "runs", repo, [m for m in args.reuse.split(",") if m], any_code=args.merge)
    runs = plan_runs(methods, specs, ratios, seeds)
    distinct = {str(cache.path(r)) for r in runs}
    grid_cells = sum(1 for s in specs for r in ratios if r in GRID_RATIOS) if GRID_METHOD in methods else 0
    cached = sum(1 for r in runs if cache.get(r) is not None)
    print(f"machine: {machine()}")
    print(f"code: {commit} ({repo})")
    print(
        f"methods {','.join(methods)}; settings {','.join(s.name for s in specs)}; ratios "
        f"{','.join(f'{r:g}' for r in ratios)}; seeds {','.join(map(str, seeds))}"
    )
    print(
        f"expected runs: {len(distinct)} distinct ({len(runs)} requested, identical command lines shared)"
        + (f", plus up to {grid_cells * (len(seeds) - 1)} for the grid's chosen points" if grid_cells else "")
        + f"; {cached} cached"
    )
    results = run_all(runs, cache, args.jobs, args.merge, repo)
    choice = choose_grid(results)
    if choice:
        results.update(run_all(grid_reports(choice, seeds), cache, args.jobs, args.merge, repo))
    cell_list = cells(results, specs, ratios, seeds, methods)
    print(f"\nmachine: {machine()}")
    print_tables(cell_list, methods)
    if choice:
        print("\ngrid points chosen on validation (first seed):")
        for (setting, ratio), chosen in sorted(choice.items()):
            print(f"  {setting} {ratio:g}x: {' '.join(a for a in chosen if '=' in a)}")
    rec = recoveries(results, specs)
    print_recovery(rec)
    wall = time.perf_counter() - start
    summary = {
        "machine": machine(),
        "code": commit,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_time_s": wall,
        "methods": methods,
        "method_args": {m: METHODS.get(m) for m in methods},
        "ratios": ratios,
        "seeds": seeds,
        "grid": {
            "values": GRID,
            "adaptive": ADAPTIVE_GRID,
            "ratios": GRID_RATIOS,
            "chosen": {f"{s}@{r:g}": list(a) for (s, r), a in choice.items()},
        },
        "settings": {s.name: s.summary() for s in specs},
        "cells": cell_list,
        "recovery": rec,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    plot(cell_list, specs, methods, Path(args.plot))
    print(f"\nwrote {out / 'summary.json'} and {args.plot}; wall time {wall / 60:.1f} min")
    return summary


if __name__ == "__main__":
    main()
