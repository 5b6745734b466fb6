"""HotSketch: kernels equal the sequential reference; invariants hold over long streams."""

from __future__ import annotations

import io
import math

import pytest
import torch

from cafe_torchrec.hashing import mix64
from cafe_torchrec.ops import available as cpp_available
from cafe_torchrec.sketch import HotSketch
from cafe_torchrec.sketch.types import tags_of
from tests.reference_sketch import ReferenceSketch

KERNELS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not cpp_available(), reason="no C++ build"))]


def zipf_keys(n: int, vocab: int, z: float, gen: torch.Generator) -> torch.Tensor:
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    ids = torch.multinomial(ranks.pow(-z), n, replacement=True, generator=gen)
    return mix64(ids, 99)


def dyadic_scores(n: int, gen: torch.Generator) -> torch.Tensor:
    """Multiples of 1/8: float32 sums are exact in any order (until a decay scales them), so
    kernels can match bit for bit."""
    return torch.randint(0, 33, (n,), generator=gen).float() / 8


def make(kernel: str, **kw) -> HotSketch:
    args = dict(
        hot_capacity=24, threshold=6.0, num_buckets=16, slots_per_bucket=4, decay=0.9, decay_trigger=2.0, seed=3
    )
    args.update(kw)
    return HotSketch(kernel=kernel, **args)


@pytest.mark.parametrize("kernel", KERNELS)
def test_batched_insert_equals_sequential_reference(kernel: str) -> None:
    gen = torch.Generator().manual_seed(0)
    sk = make(kernel)
    ref = ReferenceSketch(16, 4, 24, 6.0, 0.9, sk.decay_trigger, 3)
    seen = {"promoted": 0, "demoted": 0, "full": 0}
    for step in range(60):
        keys = zipf_keys(200, 400 if step < 30 else 4000, 1.1, gen)  # vocabulary shifts half way
        scores = dyadic_scores(200, gen)
        res = sk.insert(keys, scores)
        pos, rows, demoted = ref.insert_batch(keys.tolist(), scores.tolist())
        assert res.promoted_keys.tolist() == pos
        assert res.promoted_rows.tolist() == rows
        assert res.demoted_rows.tolist() == demoted
        seen["promoted"] += len(pos)
        seen["demoted"] += len(demoted)
        seen["full"] += int(sk.free_count[0]) == 0
        assert sk.slot_tags.tolist() == ref.tags
        assert sk.slot_scores.tolist() == ref.scores
        assert sk.slot_rows.tolist() == ref.rows
        assert sk.slot_errors.tolist() == ref.errors
        assert sk.slot_newcomers.tolist() == ref.newcomer
        free = sk.free_rows().tolist()
        assert free == ref.free_list
        assert float(sk.total_score[0]) == pytest.approx(ref.total, rel=1e-12)
        q_rows, _ = sk.query(keys)
        assert q_rows.tolist() == [ref.query(k)[0] for k in keys.tolist()]
    assert seen["promoted"] > 24 and seen["demoted"] > 0 and seen["full"] > 0, seen


@pytest.mark.parametrize("kernel", KERNELS)
def test_newcomers_to_buckets_of_hot_slots_are_dropped_as_the_reference(kernel: str) -> None:
    """Few buckets, many hot rows: most buckets fill with hot slots, so newcomers are dropped
    (counted) while others are placed in the same batch; slots equal the sequential reference."""
    gen = torch.Generator().manual_seed(5)
    sk = make(kernel, hot_capacity=16, num_buckets=4, threshold=1.0)
    ref = ReferenceSketch(4, 4, 16, 1.0, 0.9, sk.decay_trigger, 3)
    dropped = 0
    for _ in range(12):
        keys = zipf_keys(64, 40, 0.8, gen)
        scores = dyadic_scores(64, gen)
        res = sk.insert(keys, scores)
        ref.insert_batch(keys.tolist(), scores.tolist())
        dropped += res.dropped
        assert sk.slot_tags.tolist() == ref.tags and sk.slot_scores.tolist() == ref.scores
        assert sk.slot_rows.tolist() == ref.rows and sk.slot_errors.tolist() == ref.errors
    assert dropped > 20


def test_cpp_and_torch_kernels_agree_on_real_valued_scores() -> None:
    if not cpp_available():
        pytest.skip("no C++ build")
    gen = torch.Generator().manual_seed(1)
    a, b = make("cpp", medium_threshold=2.0), make("torch", medium_threshold=2.0)
    for _ in range(40):
        keys = zipf_keys(300, 2000, 1.2, gen)
        scores = torch.rand(300, generator=gen) * 2
        ra, rb = a.insert(keys, scores), b.insert(keys, scores)
        assert torch.equal(ra.promoted_keys, rb.promoted_keys) and torch.equal(ra.promoted_rows, rb.promoted_rows)
        assert torch.equal(a.slot_tags, b.slot_tags) and torch.equal(a.slot_rows, b.slot_rows)
        assert torch.equal(a.slot_newcomers, b.slot_newcomers)
        torch.testing.assert_close(a.slot_scores, b.slot_scores, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.slot_errors, b.slot_errors, rtol=1e-5, atol=1e-5)
        qa, qb = a.query(keys), b.query(keys)
        assert torch.equal(qa[0], qb[0]) and torch.equal(qa[1], qb[1])


@pytest.mark.parametrize("kernel", KERNELS)
def test_decay_never_leaks_or_duplicates_hot_rows(kernel: str) -> None:
    gen = torch.Generator().manual_seed(2)
    sk = make(kernel, hot_capacity=40, num_buckets=40, threshold=4.0, decay=0.7, decay_trigger=1.0)
    assigned: dict = {}
    promotions = demotions = 0
    for step in range(400):
        offset = (step // 50) * 1000  # the popular ids change every 50 steps
        ids = torch.multinomial(torch.arange(1, 301, dtype=torch.float64).pow(-1.3), 256, True, generator=gen) + offset
        keys = mix64(ids, 5)
        res = sk.insert(keys, torch.rand(256, generator=gen) * 3)
        promotions += res.promoted_rows.numel()
        demotions += res.demoted_rows.numel()
        for r in res.demoted_rows.tolist():
            assigned.pop(r)
        for k, r in zip(res.promoted_keys.tolist(), res.promoted_rows.tolist()):
            assert r not in assigned
            assigned[r] = k
        rows = sk.slot_rows[sk.slot_rows >= 0]
        free = sk.free_rows()
        assert rows.numel() + free.numel() == sk.hot_capacity
        assert torch.cat([rows, free]).unique().numel() == sk.hot_capacity
        assert sorted(rows.tolist()) == sorted(assigned)
        assert torch.isfinite(sk.slot_scores).all() and (sk.slot_scores >= 0).all()
    assert promotions > 40 and demotions > 20  # the stream really exercised migration both ways


@pytest.mark.parametrize("kernel", KERNELS)
def test_bad_scores_are_skipped_and_never_stored(kernel: str) -> None:
    sk = make(kernel)
    keys = mix64(torch.arange(6), 0)
    scores = torch.tensor([1.0, float("nan"), float("inf"), -2.0, float("-inf"), 3.4e38])
    res = sk.insert(keys, scores)
    assert res.skipped == 4
    res = sk.insert(keys, scores)  # saturates instead of overflowing to inf
    assert torch.isfinite(sk.slot_scores).all()
    stored = set(sk.slot_tags[sk.slot_tags != 0].tolist())
    assert stored == set(tags_of(keys[[0, 5]]).tolist())


@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_batch_and_bad_keys(kernel: str) -> None:
    sk = make(kernel)
    res = sk.insert(torch.empty(0, dtype=torch.int64), torch.empty(0))
    assert res.promoted_rows.numel() == 0
    assert sk.query(torch.empty(0, dtype=torch.int64))[0].numel() == 0
    before = {k: v.clone() for k, v in sk.state_dict().items()}
    with pytest.raises(ValueError, match="non-negative"):
        sk.insert(torch.tensor([5, -1]), torch.ones(2))
    with pytest.raises(ValueError, match="int64"):
        sk.insert(torch.tensor([5, 1], dtype=torch.int32), torch.ones(2))
    with pytest.raises(ValueError, match="shaped like keys"):
        sk.insert(torch.tensor([5, 1]), torch.ones(3))
    assert all(torch.equal(before[k], v) for k, v in sk.state_dict().items())


@pytest.mark.parametrize("kernel", KERNELS)
def test_state_dict_round_trip_continues_identically(kernel: str) -> None:
    gen = torch.Generator().manual_seed(4)
    a = make(kernel, seed=11, medium_threshold=1.0)
    batches = [(zipf_keys(100, 500, 1.1, gen), dyadic_scores(100, gen)) for _ in range(30)]
    for k, s in batches[:15]:
        a.insert(k, s)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make(kernel, seed=0, medium_threshold=1.0)  # the seed comes from the checkpoint
    b.load_state_dict(torch.load(buf))
    for k, s in batches[15:]:
        ra, rb = a.insert(k, s), b.insert(k, s)
        assert ra.promoted_rows.tolist() == rb.promoted_rows.tolist()
        assert ra.promoted_keys.tolist() == rb.promoted_keys.tolist()
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name


def test_query_levels_hot_medium_cold() -> None:
    sk = make("torch", medium_threshold=2.0, threshold=5.0, decay_trigger=1e9)
    keys = mix64(torch.arange(3), 1)
    sk.insert(keys, torch.tensor([1.0, 1.0, 1.0]))  # all enter; never hot on entry
    sk.insert(keys, torch.tensor([5.0, 2.0, 0.5]))
    rows, medium = sk.query(torch.cat([keys, mix64(torch.tensor([99]), 1)]))
    assert rows[0] >= 0 and rows[1:].tolist() == [-1, -1, -1]
    assert medium.tolist() == [False, True, False, False]


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_newcomer_is_medium_only_after_a_later_hit(kernel: str) -> None:
    """Space-Saving hands a newcomer the evicted minimum's score; that score says nothing of the
    newcomer, so it is not medium until a later batch hits it (its promotion rules are unchanged)."""
    sk = HotSketch(
        hot_capacity=4,
        threshold=100.0,
        num_buckets=1,
        slots_per_bucket=2,
        medium_threshold=2.0,
        decay_trigger=1e9,
        kernel=kernel,
    )
    a, b, c = mix64(torch.arange(3), 4).tolist()
    sk.insert(torch.tensor([a, b]), torch.tensor([3.0, 10.0]))
    assert sk.query(torch.tensor([a, b]))[1].tolist() == [False, False]  # new, though scored >= 2
    sk.insert(torch.tensor([a, b]), torch.tensor([0.0, 0.0]))
    assert sk.query(torch.tensor([a, b]))[1].tolist() == [True, True]  # hit again: confirmed
    sk.insert(torch.tensor([c]), torch.tensor([1.0]))  # evicts a (the minimum): score 4, error 3, estimate 2.5
    tag_a, tag_c = tags_of(torch.tensor([a, c])).tolist()
    assert sk.slot_tags.tolist().count(tag_c) == 1 and tag_a not in sk.slot_tags.tolist()
    assert sk.query(torch.tensor([c]))[1].tolist() == [False]
    sk.insert(torch.tensor([c]), torch.tensor([0.0]))
    assert sk.query(torch.tensor([c]))[1].tolist() == [True]


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_key_that_earns_its_row_keeps_it_against_the_same_batch_newcomers(kernel: str) -> None:
    """Rows go to the batch's candidates before its newcomers are placed: a candidate that is the
    minimum of its bucket becomes hot instead of being replaced (and its score inherited) by a
    newcomer of the same batch."""
    sk = HotSketch(hot_capacity=4, threshold=4.0, num_buckets=1, slots_per_bucket=4, decay_trigger=1e9, kernel=kernel)
    a, x1, x2, x3, e = mix64(torch.arange(5), 6).tolist()
    sk.insert(torch.tensor([a, x1, x2, x3]), torch.tensor([1.0, 5.0, 5.0, 5.0]))  # fills the bucket, no hit yet
    res = sk.insert(torch.tensor([a, e]), torch.tensor([3.0, 0.5]))  # a: 4 >= 4, still the bucket's minimum
    assert res.promoted_keys.tolist() == [a]
    assert sorted(sk.slot_tags.tolist()) == sorted(tags_of(torch.tensor([a, e, x2, x3])).tolist())  # e took x1's slot
    assert sk.query(torch.tensor([a]))[0].tolist() == res.promoted_rows.tolist()


@pytest.mark.parametrize("kernel", KERNELS)
def test_promotion_and_medium_discount_half_the_inherited_score(kernel: str) -> None:
    """A newcomer's Space-Saving score includes the evicted key's; the sketch estimates its own
    share as score - error / 2, so the evicted score alone cannot make it hot or medium."""
    sk = HotSketch(
        hot_capacity=4,
        threshold=10.0,
        num_buckets=1,
        slots_per_bucket=1,
        medium_threshold=6.0,
        decay_trigger=1e9,
        kernel=kernel,
    )
    a, b = mix64(torch.arange(2), 4).tolist()
    sk.insert(torch.tensor([a]), torch.tensor([8.0]))
    sk.insert(torch.tensor([b]), torch.tensor([1.0]))  # evicts a: score 9, error 8, estimate 5
    assert sk.slot_tags.tolist() == tags_of(torch.tensor([b])).tolist() and sk.slot_errors.tolist() == [8.0]
    res = sk.insert(torch.tensor([b]), torch.tensor([2.0]))  # score 11 >= 10, estimate 7 < 10
    assert res.promoted_keys.tolist() == [] and sk.query(torch.tensor([b]))[1].tolist() == [True]  # 7 >= 6
    res = sk.insert(torch.tensor([b]), torch.tensor([3.0]))  # score 14, estimate 10: hot
    assert res.promoted_keys.tolist() == [b]
    assert sk.slot_scores.tolist() == [10.0] and sk.slot_errors.tolist() == [0.0]  # the estimate is kept
    slots, estimates = sk.top_k(1)
    assert slots.tolist() == sk.find(torch.tensor([b])).tolist() == [0] and estimates.tolist() == [10.0]


@pytest.mark.parametrize(
    "bad", [dict(threshold=0), dict(decay=1.0), dict(medium_threshold=9.0), dict(hot_capacity=-1), dict(kernel="x")]
)
def test_bad_config_raises(bad: dict) -> None:
    with pytest.raises(ValueError):
        make("torch", **bad) if "kernel" not in bad else HotSketch(hot_capacity=4, threshold=1.0, kernel=bad["kernel"])


def test_nbytes_counts_every_buffer_twelve_bytes_a_slot() -> None:
    sk = make("torch")
    # free count, reserved, total score, seed, initialized, decayed count, count since, stale window; medium level
    scalars = 8 * 8 + 4
    bitmap = 8  # 24 rows: one int64 word
    assert sk.nbytes() == 16 * 4 * 12 + bitmap + scalars
    assert make_adaptive("torch").nbytes() == 16 * 4 * 12 + bitmap + 24 * 2 + scalars  # + a float16 mark per hot row


def test_cpp_prepare_ids_equals_torch_make_keys_and_remainder() -> None:
    """The C++ prepare reorders features, pre-hashes group ids as hashing.make_keys and takes
    plain ids mod rows as torch.remainder (negative ids too), from int64 and int32 ids alike."""
    if not cpp_available():
        pytest.skip("no C++ build")
    from cafe_torchrec.hashing import SLOT_BITS, make_keys

    gen = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.randint(-(2**62), 2**62, (500,), generator=gen), torch.tensor([0, -1, 2**63 - 1, -(2**63)])])
    counts = torch.tensor([200, 0, 250, 54])  # input features 0-3
    order = torch.tensor([2, 0, 3, 1])  # output feature j is input feature order[j]
    salts, slots, modulus = torch.tensor([11, 22, 0, 33]), torch.tensor([0, 1, 0, 2]), torch.tensor([0, 0, 7, 0])
    pieces = ids.split(counts.tolist())
    expected = []
    for j, f in enumerate(order.tolist()):
        if modulus[j] > 0:
            expected.append(torch.remainder(pieces[f], int(modulus[j])))
        else:
            expected.append(make_keys(pieces[f], torch.full_like(pieces[f], int(slots[j])), salts))
    expected = torch.cat(expected)
    got = torch.ops.cafe.prepare_ids(ids, counts, order, salts, slots, modulus, SLOT_BITS)
    assert torch.equal(got, expected)
    small = torch.randint(-(2**31), 2**31, (504,), generator=gen, dtype=torch.int32)
    assert torch.equal(
        torch.ops.cafe.prepare_ids(small, counts, order, salts, slots, modulus, SLOT_BITS),
        torch.ops.cafe.prepare_ids(small.long(), counts, order, salts, slots, modulus, SLOT_BITS),
    )
    with pytest.raises(RuntimeError, match="every input feature once"):
        torch.ops.cafe.prepare_ids(ids, counts, torch.tensor([2, 0, 2, 1]), salts, slots, modulus, SLOT_BITS)


@pytest.mark.parametrize("weighted", [False, True])
def test_cpp_occurrence_scores_equal_the_definition(weighted: bool) -> None:
    """Bag gradient norm x |weight|, normalised per feature to mean 1 (columns 3.. of the grad)."""
    if not cpp_available():
        pytest.skip("no C++ build")
    gen = torch.Generator().manual_seed(0)
    batch, features, dim = 5, 3, 4
    grad = torch.randn(batch, 3 + features * dim + 2, generator=gen)
    grad[:, 3 + dim : 3 + 2 * dim] = 0  # a feature whose gradients are all zero scores 0, not NaN
    lengths = torch.randint(0, 3, (features * batch,), generator=gen)
    weights = torch.randn(int(lengths.sum()), generator=gen) if weighted else torch.empty(0)
    got = torch.ops.cafe.occurrence_scores(grad, 3, features, dim, lengths, weights)
    norms = grad[:, 3 : 3 + features * dim].view(batch, features, dim).norm(dim=2).t().reshape(-1)
    expected = norms.repeat_interleave(lengths) * (weights.abs() if weighted else 1)
    feature = torch.arange(features).repeat_interleave(lengths.view(features, batch).sum(1))
    for f in range(features):
        mask = feature == f
        mean = expected[mask].mean() if mask.any() else torch.tensor(0.0)
        expected[mask] = expected[mask] / mean if mean > 0 else 0.0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_bad_gradient_leaves_its_occurrences_nan_in_both_kernels(bad: float) -> None:
    """A NaN or inf gradient in one bag: that feature's other occurrences score 0 and its own
    stay NaN (the insert skips and counts them), in the C++ op and its twin alike; once the
    twin turned them into 0, which the insert would have placed."""
    from cafe_torchrec.importance import occurrence_scores

    gen = torch.Generator().manual_seed(1)
    batch, features, dim = 4, 2, 4
    grad = torch.randn(batch, features * dim, generator=gen)
    grad[1, 0] = bad  # feature 0, bag 1
    lengths = torch.tensor([1, 2, 1, 0, 1, 1, 1, 1])
    for kernel in [k for k in ("cpp", "torch") if k != "cpp" or cpp_available()]:
        scores = occurrence_scores(grad, (0, features * dim), lengths, features, None, "gradient", kernel)
        assert torch.isnan(scores).tolist() == [False, True, True, False] + [False] * 4, kernel
        assert scores[[0, 3]].tolist() == [0.0, 0.0] and torch.isfinite(scores[4:]).all(), kernel


# ---- the adaptive policy (sketch/policy.py)
def make_adaptive(kernel: str, **policy) -> HotSketch:
    from cafe_torchrec.sketch.policy import AdaptivePolicy

    args = dict(horizon=6.0, hysteresis=1.5, entry_score=1.0, rebalances_per_horizon=4, medium_share=0.25)
    args.update(policy)
    return HotSketch(
        hot_capacity=24, num_buckets=16, slots_per_bucket=4, seed=3, kernel=kernel, adaptive=AdaptivePolicy(**args)
    )


def reference_for(sk: HotSketch) -> ReferenceSketch:
    return ReferenceSketch(
        sk.num_buckets, sk.slots_per_bucket, sk.hot_capacity, sk.threshold, 0.98, 0.0, 3, adaptive=sk.adaptive
    )


def drifting_batches(gen: torch.Generator, steps: int, batch: int = 200):
    for step in range(steps):
        offset = 0 if step < steps // 2 else 7_000  # an abrupt drift half way
        yield zipf_keys(batch, 600, 1.1, gen) + offset * 2654435761


def assert_same_as_reference(sk: HotSketch, ref: ReferenceSketch, res, got: tuple) -> None:
    pos, rows, demoted = got
    assert res.promoted_keys.tolist() == pos and res.promoted_rows.tolist() == rows
    assert res.demoted_rows.tolist() == demoted
    assert sk.slot_tags.tolist() == ref.tags and sk.slot_scores.tolist() == ref.scores
    assert sk.slot_rows.tolist() == ref.rows and sk.slot_errors.tolist() == ref.errors
    assert sk.slot_newcomers.tolist() == ref.newcomer
    assert sk.free_rows().tolist() == ref.free_list
    assert sk.slot_reserved.tolist() == ref.reserved and int(sk.reserved[0]) == ref.reservations
    marks = sk.row_marks.tolist()
    assert {row: marks[row] for row in ref.marks} == ref.marks  # each hot row's due occurrences (float16)
    assert float(sk.decayed_occurrences[0]) == ref.decayed and int(sk.occurrences_since[0]) == ref.since
    assert int(sk.stale_window[0]) == ref.window


@pytest.mark.parametrize("kernel", KERNELS)
def test_adaptive_policy_ranks_like_the_sequential_reference(kernel: str) -> None:
    """No decay (a huge horizon keeps the factor at 1), so sums stay exact in any order: both
    kernels must pick the same promotions, swaps and rows as the reference, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    sk = make_adaptive(kernel, horizon=1e12)
    ref = reference_for(sk)
    swaps = 0
    for keys in drifting_batches(gen, 80):
        scores = dyadic_scores(keys.numel(), gen)
        res = sk.insert(keys, scores)
        assert_same_as_reference(sk, ref, res, ref.insert_batch(keys.tolist(), scores.tolist()))
        swaps += res.demoted_rows.numel()
    assert swaps > 10  # the drift made challengers replace hot ids


@pytest.mark.parametrize(
    "policy",
    [
        dict(stale_hits=8.0),
        dict(stale_hits=8.0, stale_burst=0.0),
        dict(stale_hits=2.0, stale_burst=0.0),
        dict(stale_hits=2.0),
        dict(stale_hits=2.0, stale_burst=0.6),
        dict(stale_hits=2.0, rebalances_per_horizon=16),  # a window of 4 rebalances after a burst
        dict(stale_hits=float("inf")),
    ],
)
def test_adaptive_policy_with_decay_equals_the_reference_bit_for_bit(policy: dict) -> None:
    """With decays (non-dyadic factors), the C++ insert, which adds occurrences in input order
    as the reference does, stays bit-equal; the torch-ops twin agrees on keys and rows; at the
    default stale rule, ones acting on any stale id, a stricter burst, a longer window, and none."""
    if not cpp_available():
        pytest.skip("no C++ build")
    gen = torch.Generator().manual_seed(5)
    sk, twin = make_adaptive("cpp", **policy), make_adaptive("torch", **policy)
    ref = reference_for(sk)
    decays = 0
    for keys in drifting_batches(gen, 120):
        scores = torch.rand(keys.numel(), generator=gen) * 2
        res, res_twin = sk.insert(keys, scores), twin.insert(keys, scores)
        assert_same_as_reference(sk, ref, res, ref.insert_batch(keys.tolist(), scores.tolist()))
        assert float(sk.medium_level[0]) == (ref.medium if ref.medium != float("inf") else sk._first_medium)
        assert torch.equal(res.promoted_keys, res_twin.promoted_keys) and torch.equal(sk.slot_rows, twin.slot_rows)
        assert torch.equal(sk.stale_window, twin.stale_window)
        torch.testing.assert_close(twin.slot_scores, sk.slot_scores, rtol=1e-5, atol=1e-5)
        decays += res.decayed
    assert decays > 10


@pytest.mark.parametrize("kernel", KERNELS)
def test_adaptive_policy_follows_an_abrupt_drift(kernel: str) -> None:
    """The share of a batch that hits hot rows returns to 90% of its pre-drift level within a
    few horizons of the marginal id; the paper's policy on the same stream does not return."""
    from cafe_torchrec.sketch.policy import AdaptivePolicy

    def hit_shares(sk: HotSketch) -> list:
        gen = torch.Generator().manual_seed(6)
        weights = torch.arange(1, 5001, dtype=torch.float64).pow(-1.1)
        shares = []
        for step in range(300):
            ids = torch.multinomial(weights, 500, replacement=True, generator=gen) + (10**6 if step >= 150 else 0)
            keys = mix64(ids, 1)
            shares.append(float((sk.query(keys)[0] >= 0).float().mean()))
            sk.insert(keys, torch.ones(500))
        return shares

    adaptive = hit_shares(HotSketch(64, adaptive=AdaptivePolicy(), kernel=kernel))
    paper = hit_shares(HotSketch(64, threshold=100.0, kernel=kernel))
    no_stale_rule = hit_shares(HotSketch(64, adaptive=AdaptivePolicy(stale_hits=float("inf")), kernel=kernel))
    before = sum(adaptive[130:150]) / 20
    back = next(i for i, s in enumerate(adaptive[150:]) if s >= 0.9 * before)
    assert before > 0.5 and back < 60, (before, back)
    assert max(paper[200:]) < 0.1 * before  # the paper's stale hot ids never leave
    # without the stale rule yesterday's ids keep their rows until the decay lets challengers win
    back_without = next((i for i, s in enumerate(no_stale_rule[150:]) if s >= 0.9 * before), 150)
    assert no_stale_rule[:150] == adaptive[:150] and back_without > back + 10, (back, back_without)


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_decay_runs_faster_after_a_burst(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank gets another id: yesterday's heads land anywhere, some where they still see a
    hit now and then (never stale). In the window after the drift's burst the decay runs 4x
    faster, and the hot share is back to 90% in 27 steps against 39 without (a rebalance's
    winners take their rows at their next hit: 20 against 58 when they took them at once)."""
    from cafe_torchrec.sketch import policy

    def steps_back() -> int:
        sk = HotSketch(256, adaptive=policy.AdaptivePolicy(), kernel=kernel)
        gen = torch.Generator().manual_seed(6)
        weights = torch.arange(1, 5001, dtype=torch.float64).pow(-1.0)
        permutation = torch.randperm(5000, generator=gen)
        shares = []
        for step in range(230):
            ids = torch.multinomial(weights, 500, replacement=True, generator=gen)
            keys = mix64(permutation[ids] if step >= 150 else ids, 1)
            shares.append(float((sk.query(keys)[0] >= 0).float().mean()))
            sk.insert(keys, torch.ones(500))
        before = sum(shares[130:150]) / 20
        return next((i for i, s in enumerate(shares[150:]) if s >= 0.9 * before), 80)

    faster = steps_back()
    monkeypatch.setattr(policy, "STALE_WINDOW_DECAY", 1.0)
    assert faster <= 30 and steps_back() >= faster + 10, faster


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_stale_rule_waits_for_a_burst(kernel: str) -> None:
    """Two of the 64 hot ids going quiet (gradual churn: about 4% of the hot score, under the
    10% burst) keep their rows and lose them only to challengers that beat them; with
    stale_burst 0 the stale rule takes their rows within a few steps."""
    from cafe_torchrec.sketch.policy import AdaptivePolicy

    quiet = mix64(torch.tensor([10, 11]), 1)

    def held(burst: float) -> list:
        sk = HotSketch(64, adaptive=AdaptivePolicy(stale_burst=burst), kernel=kernel)
        gen = torch.Generator().manual_seed(8)
        weights = torch.arange(1, 5001, dtype=torch.float64).pow(-1.1)
        rows = []
        for step in range(200):
            ids = torch.multinomial(weights, 500, replacement=True, generator=gen)
            if step >= 100:
                ids = ids[(ids != 10) & (ids != 11)]  # they go quiet
            sk.insert(mix64(ids, 1), torch.ones(ids.numel()))
            rows.append(int((sk.query(quiet)[0] >= 0).sum()))
        return rows

    default, any_stale = held(AdaptivePolicy().stale_burst), held(0.0)
    assert default[:100] == any_stale[:100] and default[99] == 2
    assert any_stale[120] == 0  # the stale rule took both rows
    assert default[150] == 2  # no burst: they keep them until a challenger beats their decayed score


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_challenger_needs_less_margin_after_a_burst(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """16 hot ids at 1 occurrence a step; 8 challengers at 2 a step from step 50, 2 more at 1.7
    from step 350. Outside a burst a challenger needs 3x the weakest hot id's estimate (the
    hysteresis), so none gets a row. At step 400 half the hot ids go quiet: in the burst's
    rebalance their rows go to the 8, and in the window after it, where the hysteresis halves
    to 1.5, the 2 late ones (not yet at 1.5x in the burst's rebalance) take live hot ids' rows."""
    from cafe_torchrec.sketch import policy

    steady, quiet = torch.arange(8), torch.arange(8, 16)
    early, late = torch.arange(100, 108), torch.arange(108, 110)

    def run() -> list:
        sk = HotSketch(16, num_buckets=256, adaptive=policy.AdaptivePolicy(), kernel=kernel)
        log = []
        for step in range(600):
            parts = [(steady, 1.0)] + ([(quiet, 1.0)] if step < 400 else [])
            parts += [(early, 1.0)] * 2 if step >= 50 else []
            parts += [(late, 0.85)] * 2 if step >= 350 else []
            keys = mix64(torch.cat([ids for ids, _ in parts]), 1)
            sk.insert(keys, torch.cat([torch.full((ids.numel(),), score) for ids, score in parts]))
            rows = [int((sk.query(mix64(ids, 1))[0] >= 0).sum()) for ids in (early, late)]
            log.append((int(sk.stale_window[0]), *rows))
        return log

    log = run()
    burst = next(step for step, (window, _, _) in enumerate(log) if window > 0)
    in_late = next(step for step, (_, _, late_rows) in enumerate(log) if late_rows == 2)
    assert log[burst - 1] == (0, 0, 0) and log[burst] == (policy.AdaptivePolicy().stale_window, 8, 0)
    assert log[in_late][0] > 0 and log[-1] == (0, 8, 2)  # the late ones got in inside the window
    monkeypatch.setattr(policy, "STALE_WINDOW_MARGIN", 1.0)  # the hysteresis stays 3 in the window
    assert run()[-1] == (0, 8, 0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("stream", ["all new", "one id", "nan scores", "huge scores"])
def test_adaptive_policy_stays_finite_and_never_leaks_rows(kernel: str, stream: str) -> None:
    gen = torch.Generator().manual_seed(7)
    sk = make_adaptive(kernel, horizon=4.0)
    assigned: dict = {}
    for step in range(300):
        if stream == "all new":
            keys = mix64(torch.arange(200) + 200 * step, 2)
        elif stream == "one id":
            keys = mix64(torch.zeros(200, dtype=torch.int64), 2)
        else:
            keys = zipf_keys(200, 300, 1.2, gen)
        scores = torch.rand(200, generator=gen) * 3
        if stream == "nan scores":
            scores[::3] = float("nan")
        if stream == "huge scores":
            scores = scores * 1e37
        res = sk.insert(keys, scores)
        for r in res.demoted_rows.tolist():
            assigned.pop(r)
        for k, r in zip(res.promoted_keys.tolist(), res.promoted_rows.tolist()):
            assert r not in assigned
            assigned[r] = k
        rows = sk.slot_rows[sk.slot_rows >= 0]
        free = sk.free_rows()
        assert torch.cat([rows, free]).unique().numel() == rows.numel() + free.numel() == sk.hot_capacity
        assert sorted(rows.tolist()) == sorted(assigned)
        assert torch.isfinite(sk.slot_scores).all() and (sk.slot_scores >= 0).all()
        assert torch.isfinite(sk.decayed_occurrences).all() and torch.isfinite(sk.medium_level).all()
    if stream == "one id":  # decay bounds its score near horizon x its rate, not the stream length
        assert float(sk.slot_scores.max()) < 200 * 4.0 * 4


@pytest.mark.parametrize("kernel", KERNELS)
def test_adaptive_state_round_trips_between_rebalances(kernel: str) -> None:
    """Saved between two rebalances, inside the stale rule's window after the drift's burst,
    a sketch resumes exactly."""
    gen = torch.Generator().manual_seed(8)
    a = make_adaptive(kernel, rebalances_per_horizon=16)  # a window of 4 rebalances
    batches = list(drifting_batches(gen, 60))
    scores = [dyadic_scores(keys.numel(), gen) for keys in batches]
    cut = 0
    for keys, batch_scores in zip(batches, scores):
        a.insert(keys, batch_scores)
        cut += 1
        if int(a.stale_window[0]) > 0 and int(a.occurrences_since[0]) > 0:
            break
    assert 30 < cut < 60 and "stale_window" in a.state_dict()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = make_adaptive(kernel, rebalances_per_horizon=16)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(a.stale_window, b.stale_window)
    for keys, batch_scores in zip(batches[cut:], scores[cut:]):
        ra, rb = a.insert(keys, batch_scores), b.insert(keys, batch_scores)
        assert torch.equal(ra.promoted_rows, rb.promoted_rows) and torch.equal(ra.demoted_rows, rb.demoted_rows)
    assert torch.equal(a.slots, b.slots) and torch.equal(a.medium_level, b.medium_level)
    assert torch.equal(a.decayed_occurrences, b.decayed_occurrences) and torch.equal(a.stale_window, b.stale_window)


def test_adaptive_rebalance_with_many_swaps_equals_the_reference() -> None:
    """An abrupt drift on a larger sketch makes one rebalance swap more than 64 hot ids (the C++
    kernel sorts only the prefixes the swaps reach, doubling them as needed)."""
    if not cpp_available():
        pytest.skip("no C++ build")
    gen = torch.Generator().manual_seed(9)
    from cafe_torchrec.sketch.policy import AdaptivePolicy

    policy = AdaptivePolicy(horizon=8.0, rebalances_per_horizon=1)
    sk = HotSketch(hot_capacity=300, num_buckets=300, slots_per_bucket=4, seed=3, kernel="cpp", adaptive=policy)
    ref = reference_for(sk)
    most = 0
    for step in range(60):
        ids = torch.multinomial(torch.arange(1, 3001, dtype=torch.float64).pow(-0.9), 3000, True, generator=gen)
        keys = mix64(ids + (10**6 if step >= 30 else 0), 4)
        scores = torch.rand(keys.numel(), generator=gen) * (2 if step < 30 else 40)  # the new ids weigh far more
        res = sk.insert(keys, scores)
        assert_same_as_reference(sk, ref, res, ref.insert_batch(keys.tolist(), scores.tolist()))
        most = max(most, res.demoted_rows.numel())
    assert most > 64, most


@pytest.mark.parametrize("kernel", KERNELS)
def test_settings_are_float32_and_a_minus_zero_score_is_zero(kernel: str) -> None:
    """The kernels hold their settings in float32 (a threshold of 0.7 is 0.699999988): a score
    of 0.7 reaches it, as the sequential reference now says too; a newcomer's score of -0.0 is
    stored as +0.0 by both kernels (the slots compare bit for bit)."""
    keys = mix64(torch.tensor([3, 4]), 1)
    sk = make(kernel, threshold=0.7, decay_trigger=1e9)
    ref = ReferenceSketch(16, 4, 24, 0.7, 0.9, sk.decay_trigger, 3)
    sk.insert(keys, torch.tensor([0.7, -0.0]))
    ref.insert_batch(keys.tolist(), [0.7, -0.0])
    assert not bool(torch.signbit(sk.slot_scores).any())  # key 4's newcomer score is +0.0
    assert [math.copysign(1.0, x) for x in sk.slot_scores.tolist()] == [math.copysign(1.0, x) for x in ref.scores]
    result = sk.insert(keys[:1], torch.tensor([0.0]))  # key 3 is hit: its 0.7 reaches the float32 threshold
    ref.insert_batch(keys[:1].tolist(), [0.0])
    assert result.promoted_keys.tolist() == [keys[0].item()]
    assert sk.slot_tags.tolist() == ref.tags and sk.slot_rows.tolist() == ref.rows
    assert sk.slot_scores.tolist() == ref.scores


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_tiny_horizon_with_huge_scores_stays_finite(kernel: str) -> None:
    """AdaptivePolicy accepts any horizon > 0: the decay exponent is clamped to its maximum,
    not rounded from an infinite rate (the twin raised OverflowError; the C++ op clamped)."""
    from cafe_torchrec.sketch.policy import AdaptivePolicy

    keys = mix64(torch.arange(2), 1)
    policy = AdaptivePolicy(horizon=1e-300, entry_score=1.0, rebalances_per_horizon=1)
    sk = HotSketch(hot_capacity=1, num_buckets=1, slots_per_bucket=2, seed=0, kernel=kernel, adaptive=policy)
    for _ in range(3):
        sk.insert(keys, torch.tensor([3e38, 1.0]))
    assert bool(torch.isfinite(sk.slot_scores).all())


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_refused_insert_changes_nothing_with_a_rebalance_due(kernel: str) -> None:
    """Bad keys or hints are refused before a due rebalance runs: the C++ insert checks signs
    in its own pass, and a rebalance before it once swapped a hot row no caller saw."""
    from cafe_torchrec.sketch.policy import AdaptivePolicy

    k0, k1 = mix64(torch.arange(2), 9).tolist()
    policy = AdaptivePolicy(horizon=1e12, entry_score=1.0, rebalances_per_horizon=1000)
    sk = HotSketch(hot_capacity=1, num_buckets=1, slots_per_bucket=2, seed=0, kernel=kernel, adaptive=policy)
    for keys, scores in (([k0], [1.0]), ([k0], [0.0]), ([k1], [8.0]), ([k1], [0.0])):
        sk.insert(torch.tensor(keys), torch.tensor(scores))
    assert sk._rebalance_due()  # the next insert rebalances first (k1 would take k0's row)
    before = {name: t.clone() for name, t in sk.state_dict().items()}
    with pytest.raises(ValueError, match="non-negative"):
        sk.insert(torch.tensor([k0, -3]), torch.ones(2))
    with pytest.raises(ValueError, match="hints must be an int32"):
        sk.insert(torch.tensor([k0, k1]), torch.ones(2), hints=torch.zeros(2, dtype=torch.int64))
    assert all(torch.equal(before[name], t) for name, t in sk.state_dict().items())


@pytest.mark.parametrize(
    "bad",
    [
        dict(horizon=0.0),
        dict(hysteresis=0.5),
        dict(entry_score=-1.0),
        dict(rebalances_per_horizon=0),
        dict(medium_share=1.5),
    ],
)
def test_bad_adaptive_policy_raises(bad: dict) -> None:
    from cafe_torchrec.sketch.policy import AdaptivePolicy

    with pytest.raises(ValueError, match=next(iter(bad))):
        HotSketch(hot_capacity=4, adaptive=AdaptivePolicy(**bad))


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_rebalance_winner_takes_its_reserved_row_at_its_next_hit(kernel: str) -> None:
    """A rebalance cannot copy a winner's hashed rows (a slot holds a tag, not the key that
    locates them): it frees the loser's row and reserves it, and the winner takes it at its next
    hit, in the insert, which has the key. Meanwhile another id that reaches the entry score
    does not take the reserved row."""
    from cafe_torchrec.sketch.policy import AdaptivePolicy

    policy = AdaptivePolicy(horizon=1e12, hysteresis=1.5, entry_score=1.0, rebalances_per_horizon=1000)
    sk = HotSketch(hot_capacity=1, num_buckets=1, slots_per_bucket=4, kernel=kernel, adaptive=policy)
    a, b, c = mix64(torch.arange(3), 8).tolist()

    def insert(key: int, score: float):
        return sk.insert(torch.tensor([key]), torch.tensor([score]))

    insert(a, 1.0)
    assert insert(a, 1.0).promoted_keys.tolist() == [a]  # confirmed at 2 >= 1, and a row is free
    insert(b, 1.0)
    insert(b, 10.0)  # 11, but no row is free
    swap = insert(c, 1.0)  # the rebalance: b (11) beats a (2) by 1.5x
    assert swap.demoted_rows.tolist() == [0] and swap.promoted_keys.tolist() == []
    assert sk.query(torch.tensor([a, b]))[0].tolist() == [-1, -1] and int(sk.reserved[0]) == 1
    assert sk.slot_reserved[sk.find(torch.tensor([b]))].tolist() == [True]
    assert insert(c, 5.0).promoted_keys.tolist() == []  # c (6) is a candidate, but the free row is b's
    taken = insert(b, 1.0)
    assert taken.promoted_keys.tolist() == [b] and taken.promoted_rows.tolist() == [0]
    assert int(sk.reserved[0]) == 0 and not bool(sk.slot_reserved.any())
    assert sk.query(torch.tensor([b]))[0].tolist() == [0]


@pytest.mark.parametrize("kernel", KERNELS)
def test_keys_of_one_bucket_and_tag_are_one_key_to_the_sketch(kernel: str) -> None:
    """A slot holds bits 31-62 of its key: keys of one bucket that differ only in bits 0-30 (the
    table slot and 16 hash bits) are one key to it, as two keys of 2^-32 odds would be."""
    sk = make(kernel, num_buckets=1, threshold=100.0)
    a = int(mix64(torch.tensor([1]), 0)[0])
    sk.insert(torch.tensor([a]), torch.tensor([2.0]))
    assert sk.find(torch.tensor([a, a ^ 1, a ^ (1 << 30), a ^ (1 << 31)])).tolist() == [0, 0, 0, -1]
    sk.insert(torch.tensor([a ^ 1]), torch.tensor([3.0]))
    assert sk.slot_scores[0].item() == 5.0 and int((sk.slot_tags != 0).sum()) == 1


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("hints", [False, True])
def test_a_promotion_of_keys_sharing_a_slot_reports_the_first_that_hit_it(kernel: str, hints: bool) -> None:
    """Keys of one bucket and tag share a slot; when it is promoted, the key reported (whose
    hashed rows the new row starts from) is the batch's first occurrence that hit the slot, not
    the one that brought it to the threshold, in every kernel and the reference."""
    sk = make(kernel, num_buckets=1, threshold=5.0, decay_trigger=1e9)
    ref = ReferenceSketch(1, 4, 24, 5.0, 0.9, 1e9, 3)
    a = int(mix64(torch.tensor([1]), 0)[0]) & ~0x7FFF  # table slot 0, the only region below
    regions = torch.tensor([[24, 8, 0, 1]])  # hashed rows 24..31, as hashing.hashed_rows reads them
    for keys, scores in (([a], [1.0]), ([a, a ^ (1 << 20)], [1.0, 5.0])):
        k, s = torch.tensor(keys), torch.tensor(scores)
        res = sk.insert(k, s, sk.lookup(k, regions).hints if hints else None)
        assert res.promoted_keys.tolist() == ref.insert_batch(keys, scores)[0]
    assert res.promoted_keys.tolist() == [a]


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_stale_rule_means_none_even_when_a_count_passes_float16(kernel: str) -> None:
    """A hot id of a huge score that stops being hit is owed more occurrences than a float16
    holds; its count stops at the largest one, so stale_hits=inf (no stale rule) is never
    reached, and the id keeps its score (an infinite count read as stale zeroed it)."""
    from cafe_torchrec.sketch.policy import AdaptivePolicy

    policy = AdaptivePolicy(horizon=4.0, entry_score=1.0, rebalances_per_horizon=4, stale_hits=float("inf"))
    sk = HotSketch(hot_capacity=2, num_buckets=4, slots_per_bucket=4, kernel=kernel, adaptive=policy)
    big, small = mix64(torch.arange(2), 3).tolist()
    for _ in range(6):
        sk.insert(torch.tensor([big, small]), torch.tensor([3e6, 1.0]))
    assert sk.query(torch.tensor([big]))[0].tolist() != [-1]
    for _ in range(40):
        sk.insert(torch.tensor([small]), torch.tensor([1.0]))
    assert float(sk.row_marks.float().max()) == 65504.0 and int(sk.stale_window[0]) == 0
    assert float(sk.slot_scores[sk.find(torch.tensor([big]))][0]) > 0


@pytest.mark.parametrize("field", ["free_count", "reserved", "free_bits"])
def test_a_checkpoint_whose_rows_do_not_add_up_is_refused_untouched(field: str) -> None:
    """The kernels trust the free-row count, the bitmap and the reservations: a state dict where
    they disagree is refused (ValueError) before anything is loaded."""
    gen = torch.Generator().manual_seed(3)
    sk = make_adaptive("torch")
    for keys in drifting_batches(gen, 20):
        sk.insert(keys, dyadic_scores(keys.numel(), gen))
    state = {name: t.clone() for name, t in sk.state_dict().items()}
    if field == "free_bits":
        state[field][0] ^= 1 << 23  # row 23 flips between free and not
    else:
        state[field] += 1
    before = {name: t.clone() for name, t in sk.state_dict().items()}
    with pytest.raises(ValueError, match="corrupt or foreign checkpoint"):
        sk.load_state_dict(state)
    assert all(torch.equal(before[name], t) for name, t in sk.state_dict().items())


def test_stale_hits_beyond_a_float16_count_are_refused() -> None:
    from cafe_torchrec.sketch.policy import AdaptivePolicy

    with pytest.raises(ValueError, match="stale_hits"):
        AdaptivePolicy(stale_hits=5000.0).validate()
    AdaptivePolicy(stale_hits=float("inf")).validate()
