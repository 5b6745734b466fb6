"""Tests of the quality suite's streams (examples/dlrm/data/streams.py) and of the trainer on them.

The generator's claims are checked against what it yields: ids in range, one seed one
stream, days in order, popularity following the configured Zipf exponent, drift moving the
popular ids exactly at the drift steps, daily click rates at the target; the real sample's
label encoding against an independent parse of the file; and one short training run.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.dlrm import train
from examples.dlrm.args import parse_args
from examples.dlrm.data.streams import (
    CRITEO_ROWS,
    CRITEO_SAMPLE,
    SPLITS,
    StreamSpec,
    batch_at,
    batches,
    popular_ids,
    settings,
    zipf_probabilities,
)

GENERATED = [s for s in settings().values() if s.criteo_path is None]
needs_sample = pytest.mark.skipif(not CRITEO_SAMPLE.exists(), reason=f"Criteo sample not found at {CRITEO_SAMPLE}")


def small(drift: str = "none", **kwargs: object) -> StreamSpec:
    """A fast stream for the statistical tests: big batches, few steps, a 1M-id field beside small ones."""
    base = dict(
        name=f"test-{drift}",
        role="dev",
        description="test",
        batch_size=4096,
        steps_per_day=6,
        train_days=3,
        eval_steps=2,
        field_cardinalities=(1_000_000, 3, 1460, 50_000),
        zipf=(0.9, 1.0, 1.3, 1.1),
        drift=drift,
    )
    return StreamSpec(**{**base, **kwargs})


def test_settings_cover_the_protocol() -> None:
    """At least six generated settings spanning length, batch, skew, cardinality and drift, both roles."""
    specs = settings()
    assert len(GENERATED) >= 6 and "criteo10k" in specs
    assert min(s.train_steps for s in GENERATED) <= 500 and max(s.train_steps for s in GENERATED) >= 5000
    assert {128, 4096} <= {s.batch_size for s in GENERATED}
    assert {"none", "gradual", "abrupt"} == {s.drift for s in GENERATED}
    assert {"dev", "held_out"} == {s.role for s in specs.values()}
    assert all(min(s.zipf) >= 0.5 and max(s.zipf) <= 1.6 and len(set(s.zipf)) > 1 for s in GENERATED)
    assert any(max(s.zipf) < 0.9 for s in GENERATED)  # a low-skew stream, where hot rows pay least
    assert any(min(s.zipf) >= 1.3 for s in GENERATED)  # a steep one, where a few ids carry the lookups
    assert {16, 64} <= {s.embedding_dim for s in specs.values()}
    assert any(min(s.cardinalities) <= 4 and max(s.cardinalities) >= 1_000_000 for s in GENERATED)
    issue = specs["abrupt8"]  # close to issue #21's stream
    assert len(issue.cardinalities) == 8 and sum(issue.cardinalities) == 2_660_000 and len(issue.drift_steps) == 3
    assert abs(issue.train_steps * issue.batch_size - 1_200_000) < issue.batch_size * 4


@pytest.mark.parametrize("spec", GENERATED, ids=[s.name for s in GENERATED])
def test_batch_layout_and_id_ranges(spec: StreamSpec) -> None:
    cards = torch.tensor(spec.cardinalities)
    for split in SPLITS:
        dense, ids, labels = batch_at(spec, split, spec.steps(split) - 1)
        assert dense.shape == (spec.batch_size, 13) and dense.dtype == torch.float32
        assert ids.shape == (spec.batch_size, len(cards)) and ids.dtype == torch.int64
        assert labels.shape == (spec.batch_size,) and labels.dtype == torch.float32
        assert ids.min() >= 0 and torch.all(ids.max(dim=0).values < cards)
        assert set(labels.unique().tolist()) <= {0.0, 1.0} and torch.isfinite(dense).all() and dense.min() >= 0


def test_deterministic_by_seed() -> None:
    spec = small("gradual", drift_rate=0.5)
    first = [batch_at(spec, "train", 7, seed=1), batch_at(spec, "test", 1, seed=1)]
    again = [batch_at(spec, "train", 7, seed=1), batch_at(spec, "test", 1, seed=1)]
    other = batch_at(spec, "train", 7, seed=2)
    for a, b in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(first[0][1], other[1]) and not torch.equal(first[0][2], other[2])
    streamed = list(batches(spec, "train", seed=1, start=6))
    assert len(streamed) == spec.train_steps - 6 and all(torch.equal(x, y) for x, y in zip(streamed[1], first[0]))


def test_splits_are_ordered_in_time() -> None:
    """Train days, then the validation day, then the test day; no batch repeats across splits."""
    spec = small("abrupt")
    train_days = [spec.day_of("train", i) for i in range(spec.train_steps)]
    assert train_days == sorted(train_days) and train_days[-1] == spec.train_days - 1
    assert spec.day_of("validation", 0) == spec.train_days and spec.day_of("test", 0) == spec.train_days + 1
    seen = {batch_at(spec, split, i)[1].numpy().tobytes() for split in SPLITS for i in range(spec.steps(split))}
    assert len(seen) == sum(spec.steps(split) for split in SPLITS)
    with pytest.raises(ValueError, match="validation has 2 batches"):
        batch_at(spec, "validation", 2)


def test_abrupt_drift_moves_the_popular_ids_only_at_drift_steps() -> None:
    spec = small("abrupt")
    assert spec.drift_steps == (6, 12)
    for field in range(len(spec.cardinalities)):
        top = min(20, spec.cardinalities[field])
        sets = [frozenset(popular_ids(spec, "train", i, field, top).tolist()) for i in range(spec.train_steps)]
        changed = [i for i in range(1, spec.train_steps) if sets[i] != sets[i - 1]]
        if spec.cardinalities[field] > 1000:
            assert changed == list(spec.drift_steps), field
            assert all(len(sets[i] & sets[i - 1]) <= 2 for i in spec.drift_steps)
        assert set(changed) <= set(spec.drift_steps), field
        # the evaluation days keep the last training day's popularity
        assert frozenset(popular_ids(spec, "test", 0, field, top).tolist()) == sets[-1]
    # what is drawn follows the ground truth: the most frequent id of the skewed field is rank 0's
    for step in (spec.drift_steps[0] - 1, spec.drift_steps[0]):
        ids = batch_at(spec, "train", step)[1][:, 2]
        assert int(ids.mode().values) == int(popular_ids(spec, "train", step, 2, 1)[0])
    stationary = small("none")
    assert stationary.drift_steps == ()
    assert np.array_equal(popular_ids(stationary, "train", 0, 0, 50), popular_ids(stationary, "test", 1, 0, 50))


def test_gradual_drift_reassigns_its_rate_per_day() -> None:
    spec = small("gradual", drift_rate=0.3)
    assert spec.drift_steps == ()
    top = 2000
    day0 = popular_ids(spec, "train", 0, 0, top)
    next_step = popular_ids(spec, "train", 1, 0, top)
    next_day = popular_ids(spec, "train", spec.steps_per_day, 0, top)
    moved_per_step = np.mean(day0 != next_step)
    moved_per_day = np.mean(day0 != next_day)
    assert abs(moved_per_day - 0.3) < 0.05  # binomial sd ~0.01
    assert abs(moved_per_step - 0.3 / spec.steps_per_day) < 0.03 and moved_per_step > 0


def test_zipf_skew_per_field() -> None:
    """The frequencies of the true rank-r ids follow each field's Zipf exponent."""
    spec = small("none", steps_per_day=25, train_days=2)
    ids = torch.cat([batch_at(spec, "train", i)[1] for i in range(spec.train_steps)]).numpy()
    n = len(ids)
    for field, exponent in enumerate(spec.zipf):
        top = min(100, spec.cardinalities[field])
        truth = popular_ids(spec, "train", 0, field, top)
        counts = np.asarray([(ids[:, field] == i).sum() for i in truth], dtype=np.float64)
        expected = zipf_probabilities(spec, field, top) * n
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 1), field
        if top >= 100:
            slope = np.polyfit(np.log(np.arange(1, top + 1)), np.log(counts), 1)[0]
            assert abs(slope + exponent) < 0.06, (field, slope)


def test_daily_click_rate_is_calibrated_under_drift() -> None:
    spec = small("abrupt", target_ctr=0.2, steps_per_day=4)
    for day in range(spec.train_days):
        labels = torch.cat([batch_at(spec, "train", day * 4 + i)[2] for i in range(4)])
        assert abs(labels.mean().item() - 0.2) < 0.015, day  # sd of the mean ~0.003


@needs_sample
def test_criteo10k_reads_the_sample_label_encoded() -> None:
    spec = settings()["criteo10k"]
    with CRITEO_SAMPLE.open() as handle:
        rows = list(csv.reader(handle, delimiter="\t"))[: sum(CRITEO_ROWS)]
    raw = [row[14:] for row in rows]
    assert list(spec.cardinalities) == [len({r[f] for r in raw}) for f in range(26)]
    assert [spec.steps(s) for s in SPLITS] == [54, 7, 15]
    starts = {"train": 0, "validation": CRITEO_ROWS[0], "test": CRITEO_ROWS[0] + CRITEO_ROWS[1]}
    codes: list = [dict() for _ in range(26)]  # first appearance order, over the whole file
    for r in raw:
        for f, value in enumerate(r):
            codes[f].setdefault(value, len(codes[f]))
    for split, start in starts.items():
        for index in (0, spec.steps(split) - 1):
            dense, ids, labels = batch_at(spec, split, index)
            lo = start + index * 128
            assert labels.tolist() == [float(row[0]) for row in rows[lo : lo + 128]]
            expected = [[codes[f][r[f]] for f in range(26)] for r in raw[lo : lo + 128]]
            assert ids.tolist() == expected
            first_dense = [math.log1p(max(int(x), 0)) if x else 0.0 for x in rows[lo][1:14]]
            assert dense[0].tolist() == pytest.approx(first_dense, rel=1e-6)


def test_cafe_options_are_checked() -> None:
    base = ["--data", "stream", "--stream", "short128"]
    options = ["--cafe-option", "policy=paper", "--cafe-option", "decay=0.9", "--cafe-option", "importance=frequency"]
    assert parse_args([*base, *options]).cafe_config_options == {
        "policy": "paper",
        "decay": 0.9,
        "importance": "frequency",
    }
    for bad in (
        ["--cafe-option", "nonsense=1"],
        ["--cafe-option", "decay=0.9"],  # the paper policy's, refused under the adaptive one at parse time
        ["--cafe-option", "hot_share=abc"],
        ["--cafe-option", "seed=3"],
        ["--cafe-option", "threshold=5", "--cafe-threshold", "6"],
        ["--batch-size", "256"],
        ["--embedding", "hash", "--cafe-option", "decay=0.9"],
    ):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])


def test_a_settings_batch_and_dim_are_the_trainers_defaults() -> None:
    """A stream's batch size is fixed by its setting; its embedding dim is the default, and may be changed."""
    wide = parse_args(["--data", "stream", "--stream", "abrupt8-dim64"])
    assert (wide.batch_size, wide.embedding_dim) == (1024, 64)
    assert parse_args(["--data", "stream", "--stream", "abrupt8-dim64", "--embedding-dim", "32"]).embedding_dim == 32
    assert parse_args(["--data", "stream", "--stream", "tiny32"]).batch_size == 32
    assert parse_args([]).embedding_dim == 16 and parse_args([]).batch_size == 1024
    with pytest.raises(ValueError, match="embedding_dim must be a positive multiple of 4"):
        replace(settings()["abrupt8"], embedding_dim=10)


def test_training_on_a_stream_reports_validation_and_test(tmp_path: Path) -> None:
    result = train.main(
        [
            "--data",
            "stream",
            "--stream",
            "short128",
            "--max-steps",
            "30",
            "--log-every",
            "5",
            "--embedding",
            "cafe",
            "--compression-ratio",
            "100",
            "--cafe-option",
            "policy=paper",
            "--cafe-option",
            "threshold=7",
            "--cafe-option",
            "decay=0.9",
            "--out-dir",
            str(tmp_path),
            "--run-name",
            "s",
            "--no-progress",
            "--no-plot",
        ]
    )
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["test_auc"] == result["test_auc"] and saved["eval_split"] == "validation"
    spec = settings()["short128"]
    assert saved["val_samples"] == spec.steps("validation") * 128 and saved["test_samples"] == spec.steps("test") * 128
    for key in ("val_auc", "test_auc", "val_log_loss", "test_log_loss"):
        assert math.isfinite(saved[key]), key
    assert saved["val_auc"] != saved["test_auc"]
    assert "threshold 7," in saved["describe"] and saved["cafe_options"] == {
        "policy": "paper",
        "threshold": 7,
        "decay": 0.9,
    }
    assert [h["step"] for h in saved["hot_history"]] == [5, 10, 15, 20, 25, 30]
    assert saved["data"]["stream"] == "short128" and saved["data"]["drift_steps"] == []


def test_suite_recovery_and_grid_choice() -> None:
    """The suite's readings: recovery steps after each drift, the grid point chosen on validation (not test),
    and gains over hashing paired by seed."""
    from benchmarks.suite import Run, cells, choose_grid, grid_reports, recovery

    spec = small("abrupt")  # drifts at steps 6 and 12 of 18
    shares = {2: 0.5, 4: 0.6, 6: 0.6, 8: 0.1, 10: 0.55, 12: 0.6, 14: 0.2, 16: 0.3, 18: 0.35}
    result = {"hot_history": [{"step": k, "hot_lookup_share": v} for k, v in shares.items()]}
    drifts = recovery(result, spec)
    assert [d["drift_step"] for d in drifts] == [6, 12]
    assert drifts[0]["level_before"] == pytest.approx(1.7 / 3) and drifts[0]["steps"] == 4  # 0.55 >= 0.9 x 0.567
    assert drifts[1]["steps"] is None and drifts[1]["min_after"] == 0.2  # 0.35 < 0.9 x 1.25 / 3 at the end

    def run(method: str, seed: int, args: tuple) -> Run:
        return Run(method, "s", 1000.0, seed, ("--stream-seed", str(seed), "--seed", str(seed), *args), "cafe")

    results = {
        run("grid", 0, ("a",)): {"val_auc": 0.70, "test_auc": 0.60},
        run("grid", 0, ("b",)): {"val_auc": 0.69, "test_auc": 0.80},
    }
    choice = choose_grid(results)
    assert choice == {("s", 1000.0): ("--stream-seed", "0", "--seed", "0", "a")}
    # equal validation AUCs: the first point in grid order, whatever order the runs finished in
    from benchmarks.suite import grid_args, grid_points

    first, second = (tuple(grid_args(p)) for p in grid_points(1000.0)[:2])
    tied = [(run("grid", 0, second), {"val_auc": 0.7}), (run("grid", 0, first), {"val_auc": 0.7})]
    for order in (tied, tied[::-1]):
        assert choose_grid(dict(order))[("s", 1000.0)][-len(first) :] == first
    reports = grid_reports(choice, [0, 1])
    assert [r.args[:4] for r in reports] == [
        ("--stream-seed", "0", "--seed", "0"),
        ("--stream-seed", "1", "--seed", "1"),
    ]
    paired = {
        run("hash", 0, ()): {"test_auc": 0.60},
        run("hash", 1, ()): {"test_auc": 0.70},
        run("cafe", 0, ()): {"test_auc": 0.62},
        run("cafe", 1, ()): {"test_auc": 0.71},
    }
    spec_s = StreamSpec(**{**small().__dict__, "name": "s"})
    (cell,) = cells(paired, [spec_s], [1000.0], [0, 1], ["cafe"])
    assert cell["gain_points"] == pytest.approx([2.0, 1.0]) and cell["gain_spread"] == pytest.approx(1.0)
    assert cell["test_auc_spread"] == pytest.approx(0.09)
    # recovery rows for every run of our CAFE collection, ablations included, and none for hashing
    from benchmarks.suite import recoveries

    def on_spec(method: str, args: tuple) -> Run:
        return Run(method, spec.name, 1000.0, 0, ("--embedding", *args), "cafe")

    history = {"hot_history": result["hot_history"]}
    runs = {
        on_spec("cafe", ("cafe",)): history,
        on_spec("cafe-hyst1.5", ("cafe", "--cafe-option", "hysteresis=1.5")): history,
        on_spec("cafe-ml", ("cafe-ml",)): history,
        on_spec("hash", ("hash",)): history,
    }
    rows = recoveries(runs, [spec])
    assert sorted({r["method"] for r in rows}) == ["cafe", "cafe-hyst1.5", "cafe-ml"]
    assert [r["steps"] for r in rows if r["method"] == "cafe-hyst1.5"] == [[4], [None]]
