"""Deterministic synthetic Criteo-like click stream: Zipf ids that drift over days, labels from a hidden teacher.

Ids: per feature f a sample draws a popularity rank r from a bounded Zipf(s_f) over
[0, N_f) and maps it to an id with a keyed permutation P_f of [0, N_f) (a Feistel
network; no table of size N_f exists). Drift: on day d rank r is in epoch
e = floor(d * drift + u_f(r)), u_f(r) a hash-uniform in [0, 1), and its id is
P_f((r + c_f(e)) mod N_f) with a random offset c_f per epoch. So from one day to the
next a fraction ``drift`` of the ranks, popular ones included, take a new, unrelated
id. Within an epoch rank -> id is a bijection; ranks in different epochs can share an
id (chance 1/N_f per pair).

Labels ~ Bernoulli(sigmoid(teacher logit)); the teacher is a fixed function of the
ids and dense values: per-(feature, id) weights, a dense linear term and pairwise dot
products of 4-dim per-id vectors (so a DLRM can beat a linear model), plus a per-day
bias calibrated so every day's click rate is ``target_ctr`` (drift alone would move it,
as the popular ids' weights change). ``teacher_probability`` is the oracle: its AUC is
the best any model can reach on this stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchrec.datasets.utils import Batch

from cafe_torchrec.datasets import KAGGLE_CARDINALITIES
from examples.dlrm.data.criteo_tsv import make_batch

_MASK64 = (1 << 64) - 1
_FEISTEL_ROUNDS = 4
_GOLDEN32 = np.uint32(0x9E3779B9)
_TEACHER_ROWS = 1 << 16  # hashed teacher table: ids sharing a row share a latent; small = cache-fast
_TEACHER_DIM = 4
_LINEAR_SCALE = 1.0  # sd of the summed per-id weights
_PAIR_SCALE = 1.0  # sd of the summed pairwise interactions
_DENSE_SCALE = 0.5  # sd of the dense linear term
_CALIBRATION_SAMPLES = 1 << 14
# Seed-sequence tags keep the random streams of different purposes apart.
_TAG_TEACHER, _TAG_CALIBRATION, _TAG_BATCH = 0, 1, 2


def default_zipf_exponents(num_features: int) -> tuple[float, ...]:
    """A fixed spread of exponents over [1.05, 1.3], interleaved so that neighbouring features differ."""
    steps = max(num_features - 1, 1)
    return tuple(1.05 + 0.25 * ((7 * i) % num_features) / steps for i in range(num_features))


@dataclass(frozen=True)
class SyntheticCriteoConfig:
    """The synthetic world: feature sizes, skew, days, drift, click rate and seed."""

    cardinalities: tuple[int, ...] = KAGGLE_CARDINALITIES
    cardinality_scale: float = 1.0
    zipf_exponents: tuple[float, ...] | None = None  # None: default_zipf_exponents
    num_days: int = 4
    samples_per_day: int = 1 << 20  # rounded down to whole batches by the stream
    drift: float = 0.1  # fraction of popularity ranks whose id changes per day; 0 = stationary
    target_ctr: float = 0.25
    seed: int = 0
    num_dense: int = 13

    def __post_init__(self) -> None:
        if not 0.0 <= self.drift <= 1.0:
            raise ValueError(f"drift must be in [0, 1], got {self.drift}")
        if not 0.0 < self.target_ctr < 1.0:
            raise ValueError(f"target_ctr must be in (0, 1), got {self.target_ctr}")
        if len(self.cardinalities) < 2:
            raise ValueError("need at least 2 sparse features")
        if self.zipf_exponents is not None and len(self.zipf_exponents) != len(self.cardinalities):
            raise ValueError("zipf_exponents and cardinalities differ in length")
        if any(s <= 0 for s in self.exponents()):
            raise ValueError("Zipf exponents must be positive")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if min(self.num_days, self.samples_per_day, self.num_dense) <= 0 or self.cardinality_scale <= 0:
            raise ValueError("num_days, samples_per_day, num_dense and cardinality_scale must be positive")
        if max(self.scaled_cardinalities()) >= 2**31:
            raise ValueError("scaled cardinalities must be below 2^31 (ids are generated in uint32)")

    def scaled_cardinalities(self) -> list[int]:
        """Cardinalities times cardinality_scale, at least 1 row each."""
        return [max(1, round(c * self.cardinality_scale)) for c in self.cardinalities]

    def exponents(self) -> tuple[float, ...]:
        """The per-feature Zipf exponents in use."""
        return self.zipf_exponents or default_zipf_exponents(len(self.cardinalities))


def _mix_int(x: int) -> int:
    """SplitMix64 finalizer on a Python int: derives independent keys from small integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _keys(*parts: int, count: int) -> np.ndarray:
    """uint32 keys [count], one per feature i, each a hash of (*parts, i)."""
    keys = []
    for i in range(count):
        h = 0
        for part in (*parts, i):
            h = _mix_int(h ^ part)
        keys.append(h & 0xFFFFFFFF)
    return np.asarray(keys, dtype=np.uint32)


def _mix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer on uint32 arrays (wrapping arithmetic): a fast, well-mixed hash."""
    x = x ^ (x >> np.uint32(16))
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)
    return x


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _bounded_zipf_ranks(u: np.ndarray, exponents: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Map uniforms u [B, F] to ranks in [0, N_f) with P(r) ~ (r + 1)^-s_f.

    Inverse CDF of the density x^-s on [0.5, N + 0.5), rounded: the midpoint rule makes
    it close to the discrete Zipf. Written with log1p/expm1 so that s = 1 is exact too.
    """
    c = 1.0 - exponents
    c = np.where(c == 0.0, 1e-200, c)
    span = np.expm1(c * np.log(2.0 * sizes + 1.0))
    x = 0.5 * np.exp(np.log1p(u * span) / c)
    return np.minimum(np.floor(x + 0.5).astype(np.int64) - 1, sizes - 1)  # x >= 0.5: ranks >= 0


class _RankToId:
    """Rank -> id maps of every feature for any day: a rotation per epoch, then a keyed Feistel permutation.

    The network permutes [0, R_f * 2^k_f), R_f = ceil(N_f / 2^k_f), with 2^k_f <= sqrt(N_f)
    chosen so that the domain exceeds N_f by at most 1/64: cycle walking (re-applying the
    network to values outside [0, N_f)) is rare and short. uint32 arithmetic (N_f < 2^31)
    is twice as fast as uint64.
    """

    def __init__(self, sizes: Sequence[int], seed: int, drift: float) -> None:
        low_bits = [self._low_bits(n) for n in sizes]
        self.low_bits = np.asarray(low_bits, dtype=np.uint32)
        self.low_mask = np.asarray([(1 << k) - 1 for k in low_bits], dtype=np.uint32)
        self.low_shift = np.asarray([32 - k for k in low_bits], dtype=np.uint32)
        self.high_radix = np.asarray([-(-n >> k) for n, k in zip(sizes, low_bits)], dtype=np.uint32)
        self.sizes = np.asarray(sizes, dtype=np.uint32)
        self.seed, self.drift = seed, drift
        self.round_keys = np.stack([_keys(seed, 1, i, count=len(sizes)) for i in range(_FEISTEL_ROUNDS)])
        self.drift_keys = _keys(seed, 2, count=len(sizes))

    @staticmethod
    def _low_bits(n: int) -> int:
        """Largest k <= bits(n) / 2 whose domain ceil(n / 2^k) * 2^k exceeds n by at most 1/64 (k = 0: a rotation)."""
        k = (n - 1).bit_length() // 2
        while k and (-(-n >> k) << k) - n > n / 64:
            k -= 1
        return k

    def _offsets(self, epoch: int) -> np.ndarray:
        """Per-feature rotation c_f(epoch) in [0, N_f)."""
        return _keys(self.seed, 3, epoch, count=len(self.sizes)) % self.sizes

    def _feistel(self, x: np.ndarray, keys: np.ndarray, cols: np.ndarray | slice) -> np.ndarray:
        """One pass of the network over uint32 x in [0, R * 2^k); cols picks the features' parameters.

        Even rounds: high = (high + h(low)) mod R, h's top 16 bits scaled to [0, R) (Lemire);
        odd rounds: low ^= top k bits of h(high). h: multiplicative hashing of (half ^ round key).
        """
        low_bits, low_shift, radix = self.low_bits[cols], self.low_shift[cols], self.high_radix[cols]
        high, low = x >> low_bits, x & self.low_mask[cols]
        for i, key in enumerate(keys):
            mixed = (high if i % 2 else low) ^ key
            mixed *= _GOLDEN32
            if i % 2:
                mixed >>= low_shift  # numpy shifts by 32 give 0: k = 0 leaves low = 0
                low ^= mixed
            else:
                mixed >>= np.uint32(16)
                mixed *= radix  # < 2^16 * R <= 2^32
                mixed >>= np.uint32(16)
                high += mixed
                np.minimum(high, high - radix, out=high)  # mod R: the difference wraps when high < R
        return (high << low_bits) | low

    def _permute(self, x: np.ndarray) -> np.ndarray:
        """P_f applied to x [B, F] in [0, N_f): a broadcast pass, then walking of the few outside [0, N_f)."""
        ids = self._feistel(x, self.round_keys, slice(None))
        outside = ids >= self.sizes
        if outside.any():
            walk, cols = ids[outside], np.nonzero(outside)[1]
            todo = np.arange(walk.size)
            while todo.size:
                walk[todo] = self._feistel(walk[todo], self.round_keys[:, cols[todo]], cols[todo])
                todo = todo[walk[todo] >= self.sizes[cols[todo]]]
            ids[outside] = walk
        return ids

    def __call__(self, ranks: np.ndarray, day: int) -> np.ndarray:
        """Ids [B, F] (int64) of ranks [B, F] on a day."""
        ranks = ranks.astype(np.uint32)
        base = math.floor(day * self.drift)
        offsets = self._offsets(base)
        # Epoch base + 1 iff u >= 1 - frac(day * drift), u = hash / 2^32: compare hashes to a threshold.
        threshold = round((1.0 - (day * self.drift - base)) * 2**32)
        if threshold < 2**32:
            moved = _mix32(ranks ^ self.drift_keys) >= np.uint32(threshold)
            offsets = np.where(moved, self._offsets(base + 1), offsets)
        rotated = ranks + offsets  # < 2 N_f < 2^32
        np.minimum(rotated, rotated - self.sizes, out=rotated)  # mod N_f
        return self._permute(rotated).astype(np.int64)


class _Teacher:
    """The hidden click model, without its per-day bias: hashed per-(feature, id) latents plus dense weights."""

    def __init__(self, config: SyntheticCriteoConfig) -> None:
        rng = np.random.default_rng([config.seed, _TAG_TEACHER])
        num_features = len(config.cardinalities)
        # Columns: weight w, 4-dim vector v, |v|^2, so that one gather and one sum give all terms.
        # The sum over F(F-1)/2 pairs of 4-dim dot products has variance pairs * 4 * sd^4.
        pair_sd = (_PAIR_SCALE**2 / (num_features * (num_features - 1) / 2 * _TEACHER_DIM)) ** 0.25
        scale = np.asarray([_LINEAR_SCALE / math.sqrt(num_features)] + [pair_sd] * _TEACHER_DIM)
        params = rng.standard_normal((_TEACHER_ROWS, 1 + _TEACHER_DIM)) * scale
        squares = np.square(params[:, 1:]).sum(axis=1, keepdims=True)
        self.table = np.concatenate([params, squares], axis=1).astype(np.float32)
        dense_weights = rng.standard_normal(config.num_dense) * _DENSE_SCALE / math.sqrt(config.num_dense)
        self.dense_weights = dense_weights.astype(np.float32)
        self.dense_center = _dense_log_means(config.num_dense)
        self.keys = _keys(config.seed, 4, count=num_features)
        self.ones = np.ones(num_features, dtype=np.float32)

    def logits(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Unbiased teacher logits [B] from dense [B, D] (transformed) and ids [B, F]."""
        rows = _mix32(ids.astype(np.uint32) ^ self.keys) & np.uint32(_TEACHER_ROWS - 1)
        sums = self.ones @ np.take(self.table, rows, axis=0)  # [B, 6]; take and matmul beat indexing and sum
        vectors = sums[:, 1 : 1 + _TEACHER_DIM]
        pairs = 0.5 * (np.einsum("bd,bd->b", vectors, vectors) - sums[:, -1])  # sum over pairs of v_f . v_g
        return sums[:, 0] + pairs + (dense - self.dense_center) @ self.dense_weights


def _calibrated_bias(logits: np.ndarray, target_ctr: float) -> float:
    """The bias b (bisection) with mean(sigmoid(logits + b)) = target_ctr."""
    lo, hi = -30.0, 30.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _sigmoid(logits + mid).mean() < target_ctr else (lo, mid)
    return 0.5 * (lo + hi)


def _dense_log_means(num_dense: int) -> np.ndarray:
    """Per-column mean of log(raw count) of the synthetic dense features, spread over [0.5, 4]."""
    return np.linspace(0.5, 4.0, num_dense, dtype=np.float32)


class SyntheticCriteo(IterableDataset[Batch]):
    """Batches of the synthetic stream for the selected days, in day order, batch k to rank k % world_size.

    Each day holds ``samples_per_day // batch_size`` full batches; every batch is a pure
    function of (config, day, batch index in day, batch_size), so streams are
    reproducible, random-access (``batch``) and disjoint across ranks. Ranks yield equal
    numbers of batches when ``len(days) * batches_per_day`` is a multiple of world_size.
    """

    def __init__(
        self,
        config: SyntheticCriteoConfig,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        days: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not 0 < batch_size <= config.samples_per_day:
            raise ValueError(f"need 0 < batch_size <= samples_per_day, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
        self.days = list(range(config.num_days) if days is None else days)
        if not self.days or any(not 0 <= d < config.num_days for d in self.days):
            raise ValueError(f"days must be non-empty and lie in [0, {config.num_days}), got {self.days}")
        self.config, self.batch_size, self.rank, self.world_size = config, batch_size, rank, world_size
        self.cardinalities = config.scaled_cardinalities()
        self._sizes = np.asarray(self.cardinalities, dtype=np.int64)
        self._exponents = np.asarray(config.exponents(), dtype=np.float64)
        self._dense_means = _dense_log_means(config.num_dense)
        self._rank_to_id = _RankToId(self.cardinalities, config.seed, config.drift)
        self._teacher = _Teacher(config)
        self._biases: dict[int, float] = {}

    @property
    def batches_per_day(self) -> int:
        """Batches in one day over all ranks."""
        return self.config.samples_per_day // self.batch_size

    def _global_indices(self) -> range:
        return range(self.rank, len(self.days) * self.batches_per_day, self.world_size)

    def __len__(self) -> int:
        return len(self._global_indices())

    def day_of_batch(self, index: int) -> int:
        """The day of this stream's index-th batch."""
        return self.days[self._global_indices()[index] // self.batches_per_day]

    def hot_ids(self, feature: int, count: int, day: int) -> np.ndarray:
        """The true ids of popularity ranks 0..count-1 of a feature on a day (ground truth for hot-id recall)."""
        count = min(count, self.cardinalities[feature])
        ranks = np.zeros((count, len(self._sizes)), dtype=np.int64)
        ranks[:, feature] = np.arange(count)
        return self._rank_to_id(ranks, day)[:, feature]

    def _features(self, rng: np.random.Generator, n: int, day: int) -> tuple[np.ndarray, np.ndarray]:
        """Dense [n, D] log(1 + lognormal counts) and ids [n, F] of one day."""
        ranks = _bounded_zipf_ranks(rng.random((n, len(self._sizes))), self._exponents, self._sizes)
        normal = rng.standard_normal((n, self.config.num_dense), dtype=np.float32)
        counts = np.floor(np.exp(self._dense_means + normal))
        return np.log1p(counts), self._rank_to_id(ranks, day)

    def _bias(self, day: int) -> float:
        """The teacher's bias on a day, calibrated on a sample of that day (cached)."""
        if day not in self._biases:
            rng = np.random.default_rng([self.config.seed, _TAG_CALIBRATION, day])
            logits = self._teacher.logits(*self._features(rng, _CALIBRATION_SAMPLES, day))
            self._biases[day] = _calibrated_bias(logits, self.config.target_ctr)
        return self._biases[day]

    def batch(self, day: int, index_in_day: int) -> Batch:
        """Batch number index_in_day of a day, whatever this stream's rank and days."""
        rng = np.random.default_rng([self.config.seed, _TAG_BATCH, day, index_in_day, self.batch_size])
        dense, ids = self._features(rng, self.batch_size, day)
        labels = rng.random(self.batch_size) < _sigmoid(self._teacher.logits(dense, ids) + self._bias(day))
        return make_batch(dense, ids, labels)

    def __iter__(self) -> Iterator[Batch]:
        for k in self._global_indices():
            day_pos, index_in_day = divmod(k, self.batches_per_day)
            yield self.batch(self.days[day_pos], index_in_day)

    def teacher_probability(self, batch: Batch, day: int) -> torch.Tensor:
        """The true click probability [B] of each sample of a batch of a day: the oracle's prediction."""
        kjt = batch.sparse_features
        ids = kjt.values().numpy().reshape(len(kjt.keys()), -1).T
        logits = self._teacher.logits(batch.dense_features.numpy(), ids) + self._bias(day)
        return torch.from_numpy(_sigmoid(logits).astype(np.float32))
