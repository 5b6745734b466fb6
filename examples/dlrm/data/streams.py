"""Named click streams for the quality suite: an independent generator, and the real Criteo sample.

Why a second generator: CAFE's quality is otherwise shown on one stream, the project's own
synthetic teacher (`synthetic.py`). The streams here share no code with it: another label
model, another id mapping, other skews, lengths, batch sizes and kinds of drift. Each
named setting (`settings()`) is a `StreamSpec`; `batches(spec, split, seed)` yields plain
tensors (no TorchRec needed) so the official CAFE artifact can train on exactly the same
batches as the TorchRec trainer.

Time: a setting has `train_days` training days, then one validation day, then one held-out
test day. The validation and test splits are the first `eval_steps` batches of their day.

Ids: one id per field per sample (one-hot, like Criteo), in [0, cardinality_f)
(label-encoded). A sample draws a popularity rank r_f from a bounded Zipf(s_f) over
[0, N_f) (exact inverse CDF) and maps it through a fixed random permutation of [0, N_f):
id = perm_f[(r_f + c_f(e)) mod N_f], where the offset c_f(e) (0 in epoch 0, else a hash of
(seed, f, e)) changes with the rank's epoch e. Drift is a rule for e:

- ``none``: e = 0 always;
- ``gradual``: e = floor(t * drift_rate + u_f(r)), t the time in days (continuous, batch
  midpoints), u_f(r) a hash-uniform per (field, rank): a share `drift_rate` of all ranks,
  popular ones included, takes a new, unrelated id per day, continuously;
- ``abrupt``: e = the number of training-day boundaries passed, so every rank takes a new id
  at each boundary between training days (`spec.drift_steps`); the validation and test days
  keep the last training day's popularity, so their AUC says how well a method caught up.

Labels ~ Bernoulli(sigmoid(z)) with the logit

    z = b(day) + sum_f a_f g_f(id_f)                          per-(field, id) effects
        + sum_{(f, h) in P} w_fh <v_f(id_f), v_h(id_h)> / sqrt(4)   low-rank pairwise, some field pairs
        + sum_j beta_j eps_j                                  dense linear (latent normals)
        + gamma eps_0 q(id_q)                                 one dense x id interaction

where g, v (4-dim) and q are standard normals (approximately: the sum of the four 16-bit
lanes of a 64-bit hash of (seed, field, id, purpose), scaled), so every id of every field has
its own effect (no shared table); a_f are Dirichlet shares of the linear variance and P is F
random field pairs. The 13 dense
features are log(1 + floor(exp(mu_j + sigma_j eps_j))), Criteo-like transformed counts of
correlated normals eps (a shared per-sample factor): the model sees counts, the label uses
the normals. The bias b(day) is calibrated (bisection on a 16k-sample draw of that day) so
every day's click rate is `target_ctr`; drift alone would move it.

The real sample: setting ``criteo10k`` reads /work/shared/data/criteo_kaggle_train_head10k.txt
in place (through `CriteoTsvReader`): rows 0-6999 train, 7000-7999 validation, 8000-9999
test, batches of 128 (full batches only: 54, 7 and 15). Its ids are label-encoded per field
in order of first appearance within the whole file (missing values, read as 0, are one more
value), so ids lie in [0, n_f) with n_f the field's distinct values in the file; ids first seen
in validation or test rows are ones training never saw, as in production.

Every batch is a pure function of (spec, split, batch index, seed): streams are
reproducible and random-access (`batch_at`), so ranks and resumed runs need no replay.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

NUM_DENSE = 13
SPLITS = ("train", "validation", "test")
DRIFTS = ("none", "gradual", "abrupt")
ROLES = ("dev", "held_out")
CRITEO_SAMPLE = Path(__file__).resolve().parents[4] / "shared" / "data" / "criteo_kaggle_train_head10k.txt"
CRITEO_ROWS = (7000, 1000, 2000)  # train, validation, test rows of the sample, in file order

Arrays = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # dense [B, 13] f32, ids [B, F] i64, labels [B] f32

_MASK64 = (1 << 64) - 1
_LATENT_DIM = 4
_LINEAR_SD = 1.0  # sd of the summed per-(field, id) effects
_PAIR_SD = 0.7  # sd of the summed pairwise interactions
_DENSE_SD = 0.5  # sd of the dense linear term
_CROSS_SD = 0.3  # sd of the dense x id interaction
_CALIBRATION_SAMPLES = 1 << 14
# Purposes of the hashes and random streams, kept apart by a tag.
_TAG_WORLD, _TAG_BATCH, _TAG_CALIBRATION, _TAG_EFFECT, _TAG_OFFSET, _TAG_PHASE = range(6)
_SPLIT_TAG = {split: i for i, split in enumerate(SPLITS)}


@dataclass(frozen=True)
class StreamSpec:
    """One named stream: its fields, skew, length, batch size, drift and role in the protocol.

    role: "dev" (defaults may be tuned on it) or "held_out" (reported, never tuned on).
    field_cardinalities / zipf: per field N_f and Zipf exponent s_f (empty for the Criteo sample).
    drift / drift_rate: see the module docstring; drift_rate is the share of ranks re-assigned
        per day (gradual only).
    criteo_path: read this Criteo TSV instead of generating (then steps come from CRITEO_ROWS).
    embedding_dim: the model's embedding dim on this setting (the trainer's --embedding-dim
        default, the official's dim in the suite): not part of the stream, part of the setting,
        so one stream can be a setting at two dims.
    """

    name: str
    role: str
    description: str
    batch_size: int
    steps_per_day: int
    train_days: int
    eval_steps: int
    field_cardinalities: Tuple[int, ...] = ()
    zipf: Tuple[float, ...] = ()
    drift: str = "none"
    drift_rate: float = 0.0
    target_ctr: float = 0.25
    criteo_path: Optional[str] = None
    embedding_dim: int = 16

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"stream {self.name}: role must be one of {ROLES}, got {self.role!r}")
        if self.drift not in DRIFTS:
            raise ValueError(f"stream {self.name}: drift must be one of {DRIFTS}, got {self.drift!r}")
        if min(self.batch_size, self.steps_per_day, self.train_days, self.eval_steps) <= 0:
            raise ValueError(f"stream {self.name}: batch_size, steps_per_day, train_days, eval_steps must be positive")
        if self.eval_steps > self.steps_per_day:
            raise ValueError(f"stream {self.name}: eval_steps {self.eval_steps} > steps_per_day {self.steps_per_day}")
        if self.criteo_path is None:
            if len(self.field_cardinalities) < 2 or len(self.zipf) != len(self.field_cardinalities):
                raise ValueError(f"stream {self.name}: need >= 2 fields and one Zipf exponent per field")
            if min(self.field_cardinalities) < 1 or max(self.field_cardinalities) >= 2**31:
                raise ValueError(f"stream {self.name}: cardinalities must lie in [1, 2^31)")
            if min(self.zipf) <= 0:
                raise ValueError(f"stream {self.name}: Zipf exponents must be positive")
        if self.drift == "gradual" and not 0 < self.drift_rate <= 1:
            raise ValueError(f"stream {self.name}: gradual drift needs drift_rate in (0, 1], got {self.drift_rate}")
        if not 0 < self.target_ctr < 1:
            raise ValueError(f"stream {self.name}: target_ctr must be in (0, 1), got {self.target_ctr}")
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(
                f"stream {self.name}: embedding_dim must be a positive multiple of 4, got {self.embedding_dim}"
            )

    @property
    def cardinalities(self) -> Tuple[int, ...]:
        """N_f per field: ids of field f lie in [0, N_f)."""
        if self.criteo_path is not None:
            return _criteo_encoded(self.criteo_path)[3]
        return self.field_cardinalities

    @property
    def train_steps(self) -> int:
        return self.steps("train")

    def steps(self, split: str) -> int:
        """Batches in a split."""
        _check_split(split)
        if self.criteo_path is not None:
            return CRITEO_ROWS[_SPLIT_TAG[split]] // self.batch_size
        return self.train_days * self.steps_per_day if split == "train" else self.eval_steps

    @property
    def drift_steps(self) -> Tuple[int, ...]:
        """Training steps at which an abrupt drift happens (its first batch is in the new regime)."""
        if self.drift != "abrupt":
            return ()
        return tuple(d * self.steps_per_day for d in range(1, self.train_days))

    def day_of(self, split: str, index: int) -> int:
        """The day of batch `index` of a split: train days 0..train_days-1, then validation, then test."""
        if not 0 <= index < self.steps(split):
            raise ValueError(f"stream {self.name}: {split} has {self.steps(split)} batches, asked for {index}")
        if split == "train":
            return index // self.steps_per_day
        return self.train_days + (split == "test")

    def summary(self) -> Dict[str, object]:
        """What a results file records about the stream."""
        cards = self.cardinalities
        return {
            "stream": self.name,
            "role": self.role,
            "description": self.description,
            "fields": len(cards),
            "ids": int(sum(cards)),
            "cardinalities": list(cards),
            "zipf": list(self.zipf),
            "drift": self.drift,
            "drift_rate": self.drift_rate,
            "batch_size": self.batch_size,
            "steps_per_day": self.steps_per_day,
            "train_days": self.train_days,
            "train_steps": self.train_steps,
            "validation_steps": self.steps("validation"),
            "test_steps": self.steps("test"),
            "drift_steps": list(self.drift_steps),
        }


# ----------------------------------------------------------------------------- the named settings
# Criteo Kaggle's small fields (3 .. 1,460 values) beside big ones, for the cardinality mix.
_CRITEO_SMALL = (3, 4, 10, 15, 18, 24, 27, 105, 305, 583, 633, 1460)


def _spread(lo: float, hi: float, count: int) -> Tuple[float, ...]:
    """`count` exponents over [lo, hi], interleaved so that neighbouring fields differ."""
    steps = max(count - 1, 1)
    stride = 5 if count % 5 else 3
    return tuple(round(lo + (hi - lo) * ((stride * i) % count) / steps, 3) for i in range(count))


def settings() -> Dict[str, StreamSpec]:
    """The named streams of the quality suite, dev settings first."""
    big26 = (
        1_013_123,
        220_261,
        1_252,
        9_315,
        568,
        835_159,
        319,
        1_499,
        546_131,
        565,
        217,
        704_655,
        28_618,
        14_257,
    ) + _CRITEO_SMALL  # Criteo Kaggle's fields, the big ones x 0.1
    mix16 = (1_200_000, 600_000, 150_000, 40_000, 9_000, 2_000) + _CRITEO_SMALL[:10]
    mix10 = (1_500_000, 300_000, 60_000, 5_000, 1460, 305, 105, 24, 10, 3)
    mix12 = (900_000, 700_000, 200_000, 50_000, 12_517, 5_683, 1460, 633, 305, 27, 10, 4)
    specs = [
        StreamSpec(
            "abrupt8",
            "dev",
            "close to issue #21's independent stream: 8 fields, 2.66M ids, Zipf 0.8-1.3, 1.2M samples of "
            "1024, every popular id re-assigned at 3 day boundaries",
            batch_size=1024,
            steps_per_day=293,
            train_days=4,
            eval_steps=100,
            field_cardinalities=(1_000_000, 800_000, 500_000, 250_000, 80_000, 20_000, 8_000, 2_000),
            zipf=(0.8, 1.3, 1.0, 1.15, 0.9, 1.2, 1.05, 0.85),
            drift="abrupt",
        ),
        StreamSpec(
            "short128",
            "dev",
            "short stream: 400 steps of 128 (51k samples), 16 fields from 3 to 1.2M ids, no drift",
            batch_size=128,
            steps_per_day=200,
            train_days=2,
            eval_steps=100,
            field_cardinalities=mix16,
            zipf=_spread(0.9, 1.3, len(mix16)),
        ),
        StreamSpec(
            "gradual26",
            "dev",
            "Criteo-like 26 fields (big ones x 0.1, 3.4M ids), 900 steps of 1024, 30% of ranks re-assigned "
            "per day, continuously",
            batch_size=1024,
            steps_per_day=300,
            train_days=3,
            eval_steps=100,
            field_cardinalities=big26,
            zipf=_spread(0.9, 1.3, 26),
            drift="gradual",
            drift_rate=0.3,
        ),
        StreamSpec(
            "flat8",
            "dev",
            "low skew: 8 fields (1M to 2k ids), Zipf 0.6-0.85, 600 steps of 1024, no drift: the hot rows "
            "pay least here, so a default that spends too much memory on them shows",
            batch_size=1024,
            steps_per_day=300,
            train_days=2,
            eval_steps=100,
            field_cardinalities=(1_000_000, 800_000, 500_000, 250_000, 80_000, 20_000, 8_000, 2_000),
            zipf=_spread(0.6, 0.85, 8),
        ),
        StreamSpec(
            "long128",
            "held_out",
            "long stream: 5,500 steps of 128, 10 fields from 3 to 1.5M ids, 20% of ranks re-assigned per day",
            batch_size=128,
            steps_per_day=1100,
            train_days=5,
            eval_steps=400,
            field_cardinalities=mix10,
            zipf=_spread(0.9, 1.3, len(mix10)),
            drift="gradual",
            drift_rate=0.2,
        ),
        StreamSpec(
            "abrupt4096",
            "held_out",
            "big batches: 300 steps of 4096 (1.2M samples), 12 fields, every popular id re-assigned at 2 day "
            "boundaries",
            batch_size=4096,
            steps_per_day=100,
            train_days=3,
            eval_steps=25,
            field_cardinalities=mix12,
            zipf=_spread(0.9, 1.3, len(mix12)),
            drift="abrupt",
        ),
        StreamSpec(
            "skewed16",
            "held_out",
            "stationary and skewed: 16 fields, Zipf 1.1-1.3, 900 steps of 1024, no drift",
            batch_size=1024,
            steps_per_day=300,
            train_days=3,
            eval_steps=100,
            field_cardinalities=mix16,
            zipf=_spread(1.1, 1.3, len(mix16)),
        ),
        StreamSpec(
            "criteo10k",
            "held_out",
            "the real Criteo Kaggle head sample: 7,000 / 1,000 / 2,000 rows, 26 fields label-encoded",
            batch_size=128,
            steps_per_day=CRITEO_ROWS[0] // 128,
            train_days=1,
            eval_steps=1,
            criteo_path=str(CRITEO_SAMPLE),
        ),
        # held out from the start (added after the defaults were last chosen): the extremes the eight
        # settings above leave out, steeper and flatter skew, batch 32, and a wider model
        StreamSpec(
            "steep12",
            "held_out",
            "steep skew: 12 fields, Zipf 1.3-1.6, 600 steps of 512, no drift",
            batch_size=512,
            steps_per_day=300,
            train_days=2,
            eval_steps=100,
            field_cardinalities=mix12,
            zipf=_spread(1.3, 1.6, len(mix12)),
        ),
        StreamSpec(
            "fastflat26",
            "held_out",
            "flat and fast: 26 Criteo-like fields (3.4M ids), Zipf 0.5-0.8, 300 steps of 2048, half of "
            "the ranks re-assigned per day",
            batch_size=2048,
            steps_per_day=100,
            train_days=3,
            eval_steps=25,
            field_cardinalities=big26,
            zipf=_spread(0.5, 0.8, 26),
            drift="gradual",
            drift_rate=0.5,
        ),
        StreamSpec(
            "tiny32",
            "held_out",
            "batch 32: 3,000 steps, 10 fields from 3 to 1.5M ids, Zipf 0.9-1.2, every popular id "
            "re-assigned at the day boundary",
            batch_size=32,
            steps_per_day=1500,
            train_days=2,
            eval_steps=400,
            field_cardinalities=mix10,
            zipf=_spread(0.9, 1.2, len(mix10)),
            drift="abrupt",
        ),
    ]
    abrupt8 = next(s for s in specs if s.name == "abrupt8")
    specs.append(
        replace(
            abrupt8,
            name="abrupt8-dim64",
            role="held_out",
            description="abrupt8's stream with the model at dim 64 (a hot row costs 256 bytes of weights)",
            embedding_dim=64,
        )
    )
    return {s.name: s for s in specs}


# ----------------------------------------------------------------------------- public access
def batches(spec: StreamSpec, split: str, seed: int = 0, start: int = 0) -> Iterator[Arrays]:
    """The batches of a split in time order, from batch `start` on: (dense [B, 13] float32,
    ids [B, F] int64, labels [B] float32). The seed picks the world (effects, permutations) and
    the draws; the Criteo sample ignores it."""
    for index in range(start, spec.steps(split)):
        yield batch_at(spec, split, index, seed)


def batch_at(spec: StreamSpec, split: str, index: int, seed: int = 0) -> Arrays:
    """Batch `index` of a split (random access: a pure function of its arguments)."""
    day = spec.day_of(split, index)
    if spec.criteo_path is not None:
        dense, ids, labels, _ = _criteo_encoded(spec.criteo_path)
        lo = sum(CRITEO_ROWS[: _SPLIT_TAG[split]]) + index * spec.batch_size
        rows = slice(lo, lo + spec.batch_size)  # copies: callers may write to their batch
        return torch.tensor(dense[rows]), torch.tensor(ids[rows]), torch.tensor(labels[rows])
    world = _world(spec, seed)
    rng = np.random.default_rng([seed, _TAG_BATCH, _SPLIT_TAG[split], index])
    dense, eps, ids = world.features(rng, spec.batch_size, _time(spec, split, index, day), day)
    logits = world.logits(eps, ids) + _bias(spec, seed, day)
    labels = (rng.random(spec.batch_size) < _sigmoid(logits)).astype(np.float32)
    return torch.from_numpy(dense), torch.from_numpy(ids), torch.from_numpy(labels)


def popular_ids(spec: StreamSpec, split: str, index: int, field: int, count: int, seed: int = 0) -> np.ndarray:
    """The ids of popularity ranks 0..count-1 of a field during batch `index` of a split (ground truth)."""
    if spec.criteo_path is not None:
        raise ValueError(f"stream {spec.name}: the real sample has no known popularity ranks")
    day = spec.day_of(split, index)
    ranks = np.arange(min(count, spec.field_cardinalities[field]), dtype=np.int64)[:, None]
    fields = np.asarray([field])
    return _world(spec, seed).ids_of_ranks(ranks, _time(spec, split, index, day), day, fields)[:, 0]


def zipf_probabilities(spec: StreamSpec, field: int, count: int) -> np.ndarray:
    """P(rank r) for r < count of a field: the skew the generator draws from."""
    cdf = _zipf_cdf(spec.field_cardinalities[field], spec.zipf[field])
    return np.diff(cdf[:count], prepend=0.0)


# ----------------------------------------------------------------------------- the generator
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _time(spec: StreamSpec, split: str, index: int, day: int) -> float:
    """The batch's time in days (its midpoint): gradual drift moves with it."""
    position = index % spec.steps_per_day if split == "train" else index
    return day + (position + 0.5) / spec.steps_per_day


def _epochs(spec: StreamSpec, day: int) -> int:
    """Abrupt drift: training-day boundaries passed by `day` (validation and test keep the last)."""
    return min(day, spec.train_days - 1) if spec.drift == "abrupt" else 0


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> np.uint64:
    """A 64-bit key from small integers (seed, purpose, field, ...)."""
    h = np.zeros(1, dtype=np.uint64)
    for part in parts:
        h = _mix64(h ^ np.uint64(part & _MASK64))
    return h[0]


def _uniform(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> floats in (0, 1)."""
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _normal(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """A standard normal per (value, key) pair (broadcast; uint64), a pure function of the pair: the sum of
    the four 16-bit lanes of its hash (Irwin-Hall, 4 uniforms), centred and scaled to variance 1."""
    h = _mix64(_mix64(values.astype(np.uint64) ^ keys))
    lane = np.uint64(0xFFFF)
    total = (h & lane) + ((h >> np.uint64(16)) & lane) + ((h >> np.uint64(32)) & lane) + (h >> np.uint64(48))
    return (total.astype(np.float64) * 2.0**-16 - 2.0 + 2.0**-17 * 4) * math.sqrt(3.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@functools.lru_cache(maxsize=64)
def _zipf_cdf(size: int, exponent: float) -> np.ndarray:
    """Cumulative P(rank <= r) of the bounded Zipf P(r) ~ (r + 1)^-s over [0, size)."""
    weights = np.arange(1, size + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return cdf


class _World:
    """The parts of a stream fixed by (spec, seed): permutations, effect keys and scales, pairs, dense law.

    Per-field arrays are concatenated (field f at [start_f, start_f + N_f)) so that one numpy
    call serves every field: generation stays small next to a training step.
    """

    def __init__(self, spec: StreamSpec, seed: int) -> None:
        rng = np.random.default_rng([seed, _TAG_WORLD])
        self.spec, self.seed = spec, seed
        num_fields = len(spec.field_cardinalities)
        self.sizes = np.asarray(spec.field_cardinalities, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        # Field f's CDF shifted by f: searching f + u (u in [0, 1)) lands in field f's segment.
        self.cdfs = np.concatenate(
            [f + _zipf_cdf(int(n), float(s)) for f, (n, s) in enumerate(zip(self.sizes, spec.zipf))]
        )
        self.perms = np.concatenate([rng.permutation(int(n)) for n in self.sizes])
        self.offset_keys = np.asarray([_key(seed, _TAG_OFFSET, f) for f in range(num_fields)], dtype=np.uint64)
        self.phase_keys = np.asarray([_key(seed, _TAG_PHASE, f) for f in range(num_fields)], dtype=np.uint64)
        # Effect keys [F, 6]: column 0 the linear effect, 1 the dense x id effect, 2.. the latent vector.
        self.effect_keys = np.asarray(
            [[_key(seed, _TAG_EFFECT, f, j) for j in range(2 + _LATENT_DIM)] for f in range(num_fields)],
            dtype=np.uint64,
        )
        # Per-field importance: Dirichlet shares of the linear variance (some fields matter little).
        self.field_scale = _LINEAR_SD * np.sqrt(rng.dirichlet(np.ones(num_fields)))
        # Low-rank pairwise interaction on `num_fields` random field pairs (a_p, b_p) with weights w_p.
        all_pairs = np.asarray([(a, b) for a in range(num_fields) for b in range(a + 1, num_fields)])
        chosen = all_pairs[rng.choice(len(all_pairs), size=min(num_fields, len(all_pairs)), replace=False)]
        self.pair_a, self.pair_b = chosen[:, 0], chosen[:, 1]
        weights = rng.standard_normal(len(chosen))
        self.pair_weights = weights * _PAIR_SD / np.linalg.norm(weights) / math.sqrt(_LATENT_DIM)
        # Dense: correlated normals behind Criteo-like log counts.
        self.dense_mu = np.linspace(0.0, 4.0, NUM_DENSE)[rng.permutation(NUM_DENSE)]
        self.dense_sigma = rng.uniform(0.5, 1.5, NUM_DENSE)
        self.dense_rho = rng.uniform(0.0, 0.7, NUM_DENSE)
        beta = rng.standard_normal(NUM_DENSE)
        self.dense_beta = beta * _DENSE_SD / np.linalg.norm(beta)
        self.cross_field = int(rng.integers(num_fields))

    def ids_of_ranks(self, ranks: np.ndarray, time: float, day: int, fields: Optional[np.ndarray] = None) -> np.ndarray:
        """Ids of popularity ranks [n, F] (or of `fields` [k], ranks [n, k]) at a time (days) of a day."""
        fields = np.arange(len(self.sizes)) if fields is None else fields
        sizes = self.sizes[fields]
        if self.spec.drift == "gradual":
            phase = _uniform(_mix64(ranks.astype(np.uint64) ^ self.phase_keys[fields]))
            epochs = np.floor(time * self.spec.drift_rate + phase).astype(np.int64)
        else:
            epochs = np.full(ranks.shape, _epochs(self.spec, day), dtype=np.int64)
        # c_f(e): 0 in epoch 0, else a hash of (seed, field, e) mod N_f
        hashed = (_mix64(epochs.astype(np.uint64) ^ self.offset_keys[fields]) % sizes.astype(np.uint64)).astype(
            np.int64
        )
        offsets = np.where(epochs == 0, 0, hashed)
        return self.perms[self.starts[fields] + (ranks + offsets) % sizes]

    def features(
        self, rng: np.random.Generator, n: int, time: float, day: int
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dense counts [n, 13] (float32), their latent normals [n, 13] and ids [n, F] (int64)."""
        fields = np.arange(len(self.sizes))
        # Sorted queries make the binary searches share their cache lines (2.5x faster on 8k queries).
        queries = (rng.random((n, len(fields))) + fields).ravel()
        order = np.argsort(queries)
        found = np.empty(queries.size, dtype=np.int64)
        found[order] = np.searchsorted(self.cdfs, queries[order], side="right")
        ranks = np.minimum(found.reshape(n, len(fields)) - self.starts, self.sizes - 1)
        ids = self.ids_of_ranks(ranks, time, day)
        shared = rng.standard_normal((n, 1))
        eps = self.dense_rho * shared + np.sqrt(1.0 - self.dense_rho**2) * rng.standard_normal((n, NUM_DENSE))
        dense = np.log1p(np.floor(np.exp(self.dense_mu + self.dense_sigma * eps))).astype(np.float32)
        return dense, eps, ids

    def logits(self, eps: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The label model's logits [n] without the day's bias."""
        # Element-wise products and sums only: numpy's BLAS would start threads the trainer does not want.
        normals = _normal(ids[:, :, None], self.effect_keys)  # [n, F, 6]
        latents = normals[:, :, 2:]
        dots = (latents[:, self.pair_a] * latents[:, self.pair_b]).sum(axis=2)  # [n, pairs]
        cross = _CROSS_SD * eps[:, 0] * normals[:, self.cross_field, 1]
        return (
            (eps * self.dense_beta).sum(axis=1)
            + (normals[:, :, 0] * self.field_scale).sum(axis=1)
            + (dots * self.pair_weights).sum(axis=1)
            + cross
        )


@functools.lru_cache(maxsize=4)
def _world(spec: StreamSpec, seed: int) -> _World:
    return _World(spec, seed)


@functools.lru_cache(maxsize=256)
def _bias(spec: StreamSpec, seed: int, day: int) -> float:
    """b(day): mean(sigmoid(z + b)) = target_ctr on a draw at the day's midpoint (bisection)."""
    world = _world(spec, seed)
    rng = np.random.default_rng([seed, _TAG_CALIBRATION, day])
    _, eps, ids = world.features(rng, _CALIBRATION_SAMPLES, day + 0.5, day)
    logits = world.logits(eps, ids)
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _sigmoid(logits + mid).mean() < spec.target_ctr else (lo, mid)
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- the real sample
@functools.lru_cache(maxsize=2)
def _criteo_encoded(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Tuple[int, ...]]:
    """The whole sample: dense [n, 13] (log1p), ids [n, 26] label-encoded by first appearance, labels [n],
    and the per-field number of distinct values."""
    from examples.dlrm.data.criteo_tsv import CriteoTsvConfig, CriteoTsvReader

    if not Path(path).exists():
        raise FileNotFoundError(f"stream criteo10k: the Criteo sample is not at {path}")
    rows = sum(CRITEO_ROWS)
    (batch,) = list(CriteoTsvReader(CriteoTsvConfig(paths=[path], batch_size=rows, drop_last=True, stop_row=rows)))
    raw = batch.sparse_features.values().numpy().reshape(-1, rows).T
    ids = np.empty_like(raw)
    sizes = []
    for f in range(raw.shape[1]):
        _, first, inverse = np.unique(raw[:, f], return_index=True, return_inverse=True)
        code_of_unique = np.argsort(np.argsort(first))  # rank of each value's first row
        ids[:, f] = code_of_unique[inverse.reshape(-1)]
        sizes.append(len(first))
    return batch.dense_features.numpy(), ids, batch.labels.numpy(), tuple(sizes)
