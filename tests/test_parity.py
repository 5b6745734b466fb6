"""Drop-in parity with the stock EmbeddingBagCollection, input kind by input kind.

Each input the stock collection accepts runs through stock and CAFE side by side: a
variable-batch (VBE) KJT means its expansion by the inverse indices (stock pools, then
expands; CAFE equals itself on the expanded KJT, in eval and in training), int32 ids,
lengths and offsets mean their int64 values; what CAFE cannot take is refused with a
ValueError naming it, state unchanged. Sharded twins are in test_parity_sharded.py.
"""

from __future__ import annotations

import copy
from typing import List, Optional

import pytest
import torch
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection
from cafe_torchrec.baselines import HashingEmbeddingBagCollection
from cafe_torchrec.kjt import expand_variable_batch

FEATURES = ["f0", "f1"]


def tables(pooling: PoolingType = PoolingType.SUM) -> List[EmbeddingBagConfig]:
    """A compressed table with two features and a small plain one (stock semantics)."""
    return [
        EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=50_000, feature_names=["f0"], pooling=pooling),
        EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=16, feature_names=["f1"], pooling=pooling),
    ]


def cafe(pooling: PoolingType = PoolingType.SUM, weighted: bool = False) -> CafeEmbeddingBagCollection:
    torch.manual_seed(0)
    ebc = CafeEmbeddingBagCollection(tables(pooling), CafeConfig(compression_ratio=100, seed=3), is_weighted=weighted)
    _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.1})
    return ebc


def vbe_kjt(
    strides: List[int], batch: int, seed: int = 0, weighted: bool = False, per_rank: Optional[List[List[int]]] = None
) -> KeyedJaggedTensor:
    """A VBE KJT: feature f has strides[f] bags (split over ranks as per_rank[f]), the output
    has `batch` samples, inverse_indices pick a bag of each feature per sample."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (sum(strides),), generator=gen)
    values = torch.randint(0, 16, (int(lengths.sum()),), generator=gen)  # in range for stock
    inverse = torch.stack([torch.randint(0, s, (batch,), generator=gen) for s in strides])
    weights = torch.rand(values.numel(), generator=gen) if weighted else None
    return KeyedJaggedTensor(
        keys=FEATURES,
        values=values,
        lengths=lengths,
        weights=weights,
        stride_per_key_per_rank=per_rank or [[s] for s in strides],
        inverse_indices=(FEATURES, inverse),
    )


# strides and output batch; (3, 5) at batch 4 sums to features x batch, the case a KJT rebuilt
# with one uniform stride took silently
STRIDE_PATTERNS = [([3, 5], 4), ([3, 5], 6), ([1, 4], 4), ([4, 4], 4), ([5, 2], 3), ([2, 2], 7)]


@pytest.mark.parametrize("strides,batch", STRIDE_PATTERNS)
def test_vbe_equals_the_expanded_kjt_stock_and_cafe(strides, batch) -> None:
    kjt = vbe_kjt(strides, batch)
    expanded = expand_variable_batch(kjt)
    assert expanded.stride() == batch and not expanded.variable_stride_per_key()
    stock = EmbeddingBagCollection(tables())
    torch.testing.assert_close(stock(kjt).values(), stock(expanded).values())  # the expansion is stock's meaning
    ebc = cafe().eval()
    out = ebc(kjt)
    assert out.values().shape == (batch, 16) and out.keys() == FEATURES
    assert torch.equal(out.values(), ebc(expanded).values())


@pytest.mark.parametrize(
    "pooling,weighted", [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)]
)
def test_vbe_training_equals_training_on_the_expanded_kjt(pooling, weighted) -> None:
    a, b = cafe(pooling, weighted), cafe(pooling, weighted)
    probe = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    for step in range(6):
        kjt = vbe_kjt([3, 5], 4, seed=step, weighted=weighted)
        out_a, out_b = a(kjt).values(), b(expand_variable_batch(kjt)).values()
        assert torch.equal(out_a, out_b), step
        (out_a * probe).sum().backward()
        (out_b * probe).sum().backward()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert a.stats()[a.plan.groups[0].name]["promotions"] > 0  # the sketch really moved


def test_vbe_with_strides_split_over_ranks() -> None:
    kjt = vbe_kjt([3, 5], 6, per_rank=[[2, 1], [3, 2]])
    ebc = cafe().eval()
    torch.testing.assert_close(EmbeddingBagCollection(tables())(kjt).values().shape, torch.Size([6, 16]))
    assert torch.equal(ebc(kjt).values(), ebc(expand_variable_batch(kjt)).values())


def test_inverse_indices_on_a_uniform_kjt_expand_as_stock() -> None:
    kjt = vbe_kjt([4, 4], 4)
    uniform = KeyedJaggedTensor(
        keys=FEATURES, values=kjt.values(), lengths=kjt.lengths(), stride=4, inverse_indices=kjt.inverse_indices()
    )
    stock = EmbeddingBagCollection(tables())
    ebc = cafe().eval()
    torch.testing.assert_close(stock(uniform).values(), stock(expand_variable_batch(uniform)).values())
    assert torch.equal(ebc(uniform).values(), ebc(expand_variable_batch(uniform)).values())


@pytest.mark.parametrize("form", ["empty inverse indices", "one-stride vbe without inverse indices"])
def test_a_kjt_stock_pools_as_its_uniform_batch_is_that_batch(form: str) -> None:
    """Stock expands by inverse indices only when they have entries, and a VBE KJT whose keys
    share one stride and has none pools as that batch; CAFE means the same, training included."""
    uniform = vbe_kjt([4, 4], 4)
    kwargs = dict(keys=FEATURES, values=uniform.values(), lengths=uniform.lengths())
    if form == "empty inverse indices":
        kjt = KeyedJaggedTensor(**kwargs, stride=4, inverse_indices=(FEATURES, torch.zeros(2, 0, dtype=torch.int64)))
    else:
        kjt = KeyedJaggedTensor(**kwargs, stride_per_key_per_rank=[[4], [4]])
    plain = KeyedJaggedTensor(**kwargs, stride=4)
    stock = EmbeddingBagCollection(tables())
    torch.testing.assert_close(stock(kjt).values(), stock(plain).values())
    a, b = cafe(), cafe()
    for _ in range(3):
        out_a, out_b = a(kjt).values(), b(plain).values()
        assert out_a.shape == (4, 16) and torch.equal(out_a, out_b)
        out_a.sum().backward()
        out_b.sum().backward()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_an_unweighted_collection_ignores_input_weights() -> None:
    """Stock ignores per-sample weights when it is not weighted; so must CAFE's lookup and its
    importance scores (they once scaled the sketch's scores): training with and without them
    is the same run."""
    a, b = cafe(), cafe()
    gen = torch.Generator().manual_seed(4)
    for step in range(12):
        kjt = vbe_kjt([6, 6], 6, seed=step, weighted=True)
        with_weights = KeyedJaggedTensor(
            keys=FEATURES,
            values=kjt.values(),
            lengths=kjt.lengths(),
            weights=torch.rand(kjt.values().numel(), generator=gen) * 10,
        )
        without = KeyedJaggedTensor(keys=FEATURES, values=kjt.values(), lengths=kjt.lengths())
        out_a, out_b = a(with_weights).values(), b(without).values()
        assert torch.equal(out_a, out_b), step
        (out_a * out_a).sum().backward()
        (out_b * out_b).sum().backward()
    assert a.stats()["cafe_dim8"]["promotions"] > 0
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def _unchanged(ebc, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in ebc.state_dict().items())


@pytest.mark.parametrize("case", ["no inverse", "out of range", "missing key", "bad shape", "stride mismatch"])
def test_unsupported_vbe_is_refused_naming_vbe_state_unchanged(case) -> None:
    good = vbe_kjt([3, 5], 4)
    names, inverse = good.inverse_indices()
    kwargs = dict(keys=FEATURES, values=good.values(), lengths=good.lengths(), stride_per_key_per_rank=[[3], [5]])
    if case == "no inverse":
        kjt, match = KeyedJaggedTensor(**kwargs), "without inverse_indices"
    elif case == "out of range":
        bad = inverse.clone()
        bad[0, 1] = 3
        kjt, match = (
            KeyedJaggedTensor(**kwargs, inverse_indices=(names, bad)),
            "feature 'f0'.*inverse_indices must lie in",
        )
    elif case == "missing key":
        kjt, match = (
            KeyedJaggedTensor(**kwargs, inverse_indices=(["f0"], inverse[:1])),
            "feature 'f1' has no inverse_indices",
        )
    elif case == "bad shape":
        kjt, match = KeyedJaggedTensor(**kwargs, inverse_indices=(names, inverse[0])), "must be \\[len"
    else:
        kwargs["stride_per_key_per_rank"] = [[3], [4]]
        kjt, match = KeyedJaggedTensor(**kwargs, inverse_indices=(names, inverse)), "strides per key"
    ebc = cafe()
    before = copy.deepcopy(ebc.state_dict())
    with pytest.raises(ValueError, match=f"(?s)variable-batch \\(VBE\\).*{match}"):
        ebc(kjt)
    assert _unchanged(ebc, before)


def test_int32_ids_lengths_and_offsets_equal_int64() -> None:
    gen = torch.Generator().manual_seed(5)
    a, b = cafe(), cafe()
    probe = torch.randn(8, 16, generator=gen)
    stock = EmbeddingBagCollection(tables())
    for step in range(6):
        lengths = torch.randint(0, 3, (16,), generator=gen)
        values = torch.randint(-50, 3000, (int(lengths.sum()),), generator=gen)
        wide = KeyedJaggedTensor(keys=FEATURES, values=values, lengths=lengths)
        offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        narrow = KeyedJaggedTensor(keys=FEATURES, values=values.to(torch.int32), offsets=offsets)
        if step == 0:
            in_range = values.abs() % 16
            positive = KeyedJaggedTensor(keys=FEATURES, values=in_range, lengths=lengths)
            positive32 = KeyedJaggedTensor(keys=FEATURES, values=in_range.int(), lengths=lengths.int())
            assert torch.equal(stock(positive32).values(), stock(positive).values())  # stock's own parity
        out_a, out_b = a(wide).values(), b(narrow).values()
        assert torch.equal(out_a, out_b), step
        (out_a * probe).sum().backward()
        (out_b * probe).sum().backward()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_int32_vbe_equals_int64_vbe() -> None:
    kjt = vbe_kjt([3, 5], 6)
    narrow = KeyedJaggedTensor(
        keys=FEATURES,
        values=kjt.values().int(),
        lengths=kjt.lengths().int(),
        stride_per_key_per_rank=[[3], [5]],
        inverse_indices=kjt.inverse_indices(),
    )
    ebc = cafe().eval()
    assert torch.equal(ebc(kjt).values(), ebc(narrow).values())


def test_baselines_take_vbe_and_int32_like_cafe() -> None:
    torch.manual_seed(0)
    ebc = HashingEmbeddingBagCollection(tables(), compression_ratio=100).eval()
    kjt = vbe_kjt([3, 5], 4)
    expanded = expand_variable_batch(kjt)
    narrow = KeyedJaggedTensor(keys=FEATURES, values=expanded.values().int(), lengths=expanded.lengths().int())
    assert torch.equal(ebc(kjt).values(), ebc(expanded).values())
    assert torch.equal(ebc(narrow).values(), ebc(expanded).values())


def test_float_ids_and_lengths_are_refused() -> None:
    ebc = cafe()
    floats = KeyedJaggedTensor(keys=FEATURES, values=torch.tensor([1.0, 2.0]), lengths=torch.tensor([1, 0, 1, 0]))
    with pytest.raises(ValueError, match="ids must be int32 or int64"):
        ebc(floats)


def test_stats_are_monotonic_and_intervals_come_from_a_helper() -> None:
    from cafe_torchrec.stats import stats_interval

    ebc = cafe()
    group = ebc.plan.groups[0].name
    kjt = expand_variable_batch(vbe_kjt([3, 5], 4))
    ebc(kjt).values().sum().backward()
    first = ebc.stats()
    assert ebc.stats() == first  # reading does not reset
    ebc(kjt).values().sum().backward()
    second = ebc.stats()
    interval = stats_interval(second, first)
    lookups = int(kjt["f0"].lengths().sum())
    assert first[group]["lookups"] == lookups and second[group]["lookups"] == 2 * lookups
    assert interval[group]["lookups"] == lookups and interval[group]["tables"]["big"]["lookups"] == lookups
    assert interval[group]["hot_lookup_share"] == interval[group]["hot_lookups"] / lookups
    assert second["small"] == {"uncompressed": True, "rows": 16, "bytes": {"weights": 16 * 8 * 4, "sketch": 0}}


def test_memory_counts_fp16_tables_at_two_bytes_and_the_ratio_against_fp16() -> None:
    from torchrec.modules.embedding_configs import DataType

    half = [
        EmbeddingBagConfig(
            name=t.name,
            embedding_dim=8,
            num_embeddings=t.num_embeddings,
            feature_names=t.feature_names,
            data_type=DataType.FP16,
        )
        for t in tables()
    ]
    ebc = CafeEmbeddingBagCollection(half, CafeConfig(compression_ratio=100))
    m, layout = ebc.memory(), ebc.plan.groups[0]
    assert m["logical_bytes"] == (50_000 + 16) * 8 * 2
    assert m["weight_bytes"] == (layout.physical_rows + 16) * 8 * 2
    assert ebc.stats()["small"]["bytes"]["weights"] == 16 * 8 * 2
    assert ebc.physical.embedding_bags["small"].weight.dtype == torch.float16
    assert m["compression_ratio"] == m["logical_bytes"] / (m["weight_bytes"] + m["sketch_bytes"])


@pytest.mark.parametrize("ratio", [10, 100, 1000, 10000])
@pytest.mark.parametrize("dim", [4, 16])
def test_a_group_holds_no_more_than_hashing_at_its_ratio_and_the_most_hot_rows_that_fit(ratio: int, dim: int) -> None:
    """A group's rows (weights, and the sketch bytes that grow with its hot rows) stay within
    the hashing trick's bytes at the same ratio, and one hot row more would not: the hashed
    rows' rounding and the sketch come out of the hot rows. Its bookkeeping (per-table regions,
    signature, counters; the sketch's first bucket) is counted by memory() but not fitted."""
    import dataclasses

    from cafe_torchrec.remap import group_state_bytes

    rows = [1_200_000, 600_000, 150_000, 40_000, 9_000, 2_000, 583, 305, 105, 27, 24, 18, 15, 10, 4, 3]
    tbls = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=r, feature_names=[f"f{i}"])
        for i, r in enumerate(rows)
    ]
    cafe = CafeEmbeddingBagCollection(tbls, CafeConfig(compression_ratio=ratio))
    hashing = HashingEmbeddingBagCollection(tbls, compression_ratio=ratio)
    (group,) = cafe.plan.groups
    fixed = group_state_bytes(dataclasses.replace(group, hot_rows=0))

    def rows_bytes(layout) -> int:
        return layout.weight_bytes() + group_state_bytes(layout) - fixed

    assert group.hot_rows > 0
    assert rows_bytes(group) <= group.budget_bytes()
    assert rows_bytes(dataclasses.replace(group, hot_rows=group.hot_rows + 1)) > group.budget_bytes()
    mine, theirs = cafe.memory(), hashing.memory()
    assert mine["weight_bytes"] + mine["sketch_bytes"] - fixed <= theirs["weight_bytes"]  # hashing holds weights alone


@pytest.mark.parametrize("multi_level", [False, True])
def test_a_budget_with_no_room_for_hot_rows_keeps_hashings_rows_and_warns(
    multi_level: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A small table at 1000x (hashing: 2 rows of 256 bytes): one hot row (256 bytes of
    weights and its sketch entries) does not fit beside the 1 hashed row the hot share leaves
    it, so the group keeps hashing's rows and says so."""
    tbls = [EmbeddingBagConfig(name="t0", embedding_dim=64, num_embeddings=1_500, feature_names=["f0"])]
    with caplog.at_level("WARNING", logger="cafe_torchrec.modules"):
        ebc = CafeEmbeddingBagCollection(tbls, CafeConfig(compression_ratio=1000, multi_level=multi_level))
    hashing = HashingEmbeddingBagCollection(tbls, compression_ratio=1000)
    (group,) = ebc.plan.groups
    assert group.hot_rows == 0
    assert [t.hashed_rows for t in group.tables] == hashing.rows == [2]
    assert "holds no hot row" in caplog.text and "cafe_dim64" in caplog.text
