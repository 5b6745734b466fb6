"""CafeEmbeddingBagCollection behaviour: migration, drift, state_dict, errors, DLRM."""

from __future__ import annotations

import copy
import dataclasses
import functools
import io

import pytest
import torch
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection
from cafe_torchrec.sketch import cpp_kernel, torch_kernel
from cafe_torchrec.sketch.types import tags_of
from tests.helpers import features_of, tables, zipf_kjt


def make(rows=(5000, 3000), lr: float = 0.05, optimizer=torch.optim.SGD, **cfg) -> CafeEmbeddingBagCollection:
    torch.manual_seed(0)
    args = dict(compression_ratio=20, policy="paper", threshold=3.0, seed=1)
    args.update(cfg)
    ebc = CafeEmbeddingBagCollection(tables(rows), CafeConfig(**args))
    _apply_optimizer_in_backward(optimizer, ebc.parameters(), {"lr": lr})
    return ebc


def one_id_kjt(ebc, feature: str, raw_id: int, batch: int = 4) -> KeyedJaggedTensor:
    names = features_of(ebc.embedding_bag_configs())
    values = torch.tensor([raw_id if f == feature else 10**9 + i for f in names for i in range(batch)])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=names, values=values, lengths=torch.ones(len(names) * batch, dtype=torch.int64)
    )


@pytest.mark.parametrize("feature,table,other", [("f0", "t0", "f1"), ("f1", "t1", "f0")])
def test_promoted_id_keeps_its_embedding_and_cooled_id_returns_to_hashing(feature: str, table: str, other: str) -> None:
    """Also: the promotion and the demotion count for the id's table (a demotion frees a row,
    and the group remembers which table its owner was of: a sketch slot holds no key)."""
    # lr 0: weights move only by migration; decay (x0.1) before every batch
    ebc = make(lr=0.0, threshold=5.0, decay=0.1, decay_trigger=1e-9)
    group = ebc.groups[ebc.plan.groups[0].name]
    kjt = one_id_kjt(ebc, feature, 42, batch=8)  # id 42 scores 8 per step
    key = ebc.keys(feature, torch.tensor([42]))
    before = ebc(kjt)[feature].detach().clone()
    ebc(kjt).values().sum().backward()  # enters the sketch (never hot on entry)
    assert group.sketch.query(key)[0].item() == -1
    ebc(kjt).values().sum().backward()  # 0.8 + 8 >= 5: promoted after the update
    assert group.sketch.query(key)[0].item() >= 0
    assert ebc.stats()[group.layout.name]["tables"][table]["promotions"] == 1
    torch.testing.assert_close(ebc.eval()(kjt)[feature], before)  # the output does not jump
    ebc.train()
    ebc(one_id_kjt(ebc, other, 7)).values().sum().backward()  # no hits: 8.8 x 0.1 < 5, freed
    assert group.sketch.query(key)[0].item() == -1
    counts = {t: s["demotions"] for t, s in ebc.stats()[group.layout.name]["tables"].items()}
    assert counts[table] == 1 and sum(counts.values()) == 1, counts
    torch.testing.assert_close(ebc.eval()(kjt)[feature], before)  # back on its (unchanged) hashed row


@pytest.mark.parametrize("multi_level", [False, True])
def test_each_table_s_hashed_rows_start_from_its_own_init(multi_level: bool) -> None:
    """As in a stock collection: a table's rows start from its init_fn (TorchRec's default
    +-sqrt(1 / its rows), or the user's), not from one bound for the whole group."""
    configs = tables([200_000, 3000, 4000])
    configs[2] = dataclasses.replace(configs[2], init_fn=functools.partial(torch.nn.init.constant_, val=0.25))
    ebc = CafeEmbeddingBagCollection(configs, CafeConfig(compression_ratio=10, multi_level=multi_level))
    layout = ebc.plan.groups[0]
    weight = ebc.physical.embedding_bags[layout.name].weight.detach()
    offsets = [level1 for level1, _ in layout.region_offsets()]
    regions = [weight[level1 : level1 + t.hashed_rows] for t, level1 in zip(layout.tables, offsets)]
    assert layout.tables[2].level2_rows > 0 if multi_level else layout.tables[2].level2_rows == 0
    for region, rows in zip(regions[:2], (200_000, 3000)):
        bound = (1 / rows) ** 0.5
        assert 0.95 * bound < float(region.abs().max()) <= bound  # the small table: 8x the large one's
    assert torch.equal(regions[2], torch.full_like(regions[2], 0.25))
    assert float(weight[: layout.hot_rows].abs().max()) <= (1 / 200_000) ** 0.5


def test_an_init_fn_that_needs_the_whole_table_is_refused_naming_it() -> None:
    pretrained = torch.randn(3000, 8)
    configs = tables([200_000, 3000])
    configs[1] = dataclasses.replace(configs[1], init_fn=lambda w: w.data.copy_(pretrained))
    with pytest.raises(ValueError, match="table 't1': its init_fn failed on its .* hashed rows.*warm_start"):
        CafeEmbeddingBagCollection(configs, CafeConfig(compression_ratio=10))


def test_hot_set_follows_drift() -> None:
    ebc = make(threshold=20.0, decay=0.5, decay_trigger=2.0)
    group = ebc.groups[ebc.plan.groups[0].name]
    gen = torch.Generator().manual_seed(0)
    names = features_of(ebc.embedding_bag_configs())

    def hot_share(offset: int) -> float:
        """Share of the 20 most popular f0 ids (ranks 0..19 of zipf_kjt) that hold a hot row."""
        ids = (torch.arange(20) * 7919) % 200 + offset
        keys = ebc.keys("f0", ids)
        return float((group.sketch.query(keys)[0] >= 0).float().mean())

    probe = torch.randn(512, 16, generator=gen)  # a bounded objective: gradients do not blow up
    for step in range(120):
        offset = 0 if step < 60 else 50_000
        (ebc(zipf_kjt(names, 512, 200, gen, offset=offset)).values() * probe).sum().backward()
        if step == 59:
            first_old, first_new = hot_share(0), hot_share(50_000)
    last_old, last_new = hot_share(0), hot_share(50_000)
    assert first_old > 0.5 and first_new == 0.0, (first_old, first_new)
    assert last_new > 0.5 and last_old < first_old / 2, (first_old, first_new, last_old, last_new)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adagrad, RowWiseAdagrad])
def test_state_dict_round_trip_gives_same_outputs_and_next_step(optimizer) -> None:
    gen = torch.Generator().manual_seed(3)
    a = make(optimizer=optimizer, multi_level=True)
    names = features_of(a.embedding_bag_configs())
    batches = [zipf_kjt(names, 64, 300, gen, max_len=2) for _ in range(12)]
    for kjt in batches[:8]:
        a(kjt).values().pow(2).sum().backward()
    buf = io.BytesIO()
    opt_states = {n: p._in_backward_optimizers[0].state_dict() for n, p in a.named_parameters()}
    torch.save({"model": a.state_dict(), "optim": opt_states}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    b = make(optimizer=optimizer, multi_level=True, seed=1)
    torch.manual_seed(123)
    b.load_state_dict(saved["model"])
    for n, p in b.named_parameters():
        p._in_backward_optimizers[0].load_state_dict(saved["optim"][n])
    for kjt in batches[8:]:
        assert torch.equal(a(kjt).values(), b(kjt).values())
        a(kjt).values().pow(2).sum().backward()
        b(kjt).values().pow(2).sum().backward()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("other", [dict(compression_ratio=40), dict(seed=6)])  # another seed: the same shapes
def test_checkpoint_from_another_config_is_refused_untouched(other) -> None:
    a, b = make(**other), make()
    with torch.no_grad():  # weights that differ from b's (both start from one torch seed)
        for p in a.parameters():
            p.add_(1.0)
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(ValueError, match="different config"):
        b.load_state_dict(a.state_dict())
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())


def test_checkpoint_of_the_previous_format_is_refused_untouched() -> None:
    """A checkpoint saved before the stale rule's window joined the policy's state (format 5)
    lacks it: refused by its layout signature, naming the version, before any state changes."""
    old, b = make().state_dict(), make()
    old = {k: v for k, v in old.items() if not k.endswith("stale_window")}
    for key in [k for k in old if k.endswith("layout_signature")]:
        old[key] = old[key].clone()
        old[key][0] = 5
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(ValueError, match="another layout.*version"):
        b.load_state_dict(old)
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())


def test_mean_pooling_and_multi_level_are_exact() -> None:
    tbls = tables([5000], dim=8, pooling=PoolingType.MEAN)
    ebc = CafeEmbeddingBagCollection(
        tbls, CafeConfig(compression_ratio=20, policy="paper", threshold=6.0, multi_level=True, medium_share=0.25)
    )
    _apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.0})
    gen = torch.Generator().manual_seed(0)
    kjt = zipf_kjt(["f0"], 32, 50, gen, max_len=4)
    for _ in range(3):
        ebc(kjt).values().sum().backward()
    group = ebc.groups[ebc.plan.groups[0].name]
    weight = ebc.physical.embedding_bags[group.layout.name].weight
    fresh = zipf_kjt(["f0"], 32, 50, gen, max_len=4, offset=10**6)
    classes = set()
    for batch in (kjt, fresh):
        keys = ebc.keys("f0", batch.values())
        look = group.lookup(keys, count=False)
        hot = look.primary < group.layout.hot_rows  # hot rows come first in the table
        classes |= {"hot"} if hot.any() else set()
        classes |= {"medium"} if look.medium.any() else set()
        classes |= {"cold"} if (~hot & ~look.medium).any() else set()
        second = torch.where(look.medium[:, None], weight[look.level2], torch.zeros(1, 8))
        bags = torch.arange(32).repeat_interleave(batch.lengths())
        expected = torch.zeros(32, 8).index_add_(0, bags, weight[look.primary] + second) / batch.lengths()[:, None]
        torch.testing.assert_close(ebc.eval()(batch).values(), expected)
    assert classes == {"hot", "medium", "cold"}


def test_cpp_lookup_split_across_threads_equals_the_torch_path() -> None:
    """The C++ remap splits a batch into one range per thread, cutting table runs; it must give
    the torch path's rows, medium mask and per-table counts, and hints to the slots keys sit in."""
    ebc = make(rows=(50_000, 30_000, 20_000), multi_level=True, medium_share=0.25)
    names = features_of(ebc.embedding_bag_configs())
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # some keys hot, some medium
        ebc(zipf_kjt(names, 256, 5000, gen, max_len=4)).values().sum().backward()
    group = ebc.groups[ebc.plan.groups[0].name]
    batch = zipf_kjt(names, 20_000, 5000, gen)  # 60k keys: 3 ranges of 20k at 3 threads
    keys = torch.cat([ebc.keys(f, batch[f].values()) for f in names])
    threads = torch.get_num_threads()
    looks, counts = [], []
    regions, sketch = group.regions, group.sketch
    try:
        torch.set_num_threads(3)
        for kernel in (cpp_kernel, torch_kernel):
            counts.append(torch.zeros(3, 3, dtype=torch.int64))
            looks.append(kernel.lookup(sketch.state(), keys, regions, sketch.medium_threshold, counts[-1]))
    finally:
        torch.set_num_threads(threads)
    cpp, ref = looks
    hot = ref.primary < group.layout.hot_rows
    assert hot.any() and ref.medium.any() and (~hot & ~ref.medium).any()
    for name in ("primary", "level2", "medium"):
        assert torch.equal(getattr(cpp, name), getattr(ref, name)), name
    assert torch.equal(counts[0], counts[1]) and int(counts[0][:, 0].sum()) == len(keys)
    slots = group.sketch.find(keys)
    assert torch.equal(cpp.hints.long(), slots) and bool((slots >= 0).any())
    present = slots >= 0
    assert torch.equal(group.sketch.slot_tags[slots[present]], tags_of(keys[present]))


def test_output_order_and_plain_tables_follow_the_configs() -> None:
    tbls = [
        EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=10, feature_names=["s"]),
        EmbeddingBagConfig(name="big", embedding_dim=16, num_embeddings=100_000, feature_names=["b"]),
        EmbeddingBagConfig(name="mid", embedding_dim=8, num_embeddings=50_000, feature_names=["m"]),
    ]
    ebc = CafeEmbeddingBagCollection(tbls, CafeConfig(compression_ratio=10)).eval()  # 10 rows <= 2000/10: plain
    assert [g.name for g in ebc.plan.groups] == ["cafe_dim16", "cafe_dim8"] and len(ebc.plan.plain) == 1
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["m", "b", "s"], values=torch.tensor([1, 2, 3, 13]), lengths=torch.tensor([1, 1, 2])
    )  # s: ids 3 and 13 -> rows 3, 3
    kt = ebc(kjt)
    assert kt.keys() == ["s", "b", "m"] and kt.length_per_key() == [8, 16, 8]
    small = ebc.physical.embedding_bags["small"].weight
    torch.testing.assert_close(kt["s"][0], small[3] * 2)
    assert "uncompressed" in ebc.describe() and ebc.memory()["compression_ratio"] > 9


def test_pooled_output_moves_columns_and_gradients_back_to_config_order() -> None:
    """PooledOutput (FBGEMM's pooled permute) against plain column indexing, forward and backward,
    with mixed dims and an inner order that interleaves them."""
    from cafe_torchrec.output import PooledOutput

    tbls = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=10, feature_names=[f"f{i}"])
        for i, dim in enumerate([8, 16, 4, 8, 12])
    ]
    inner = ["f1", "f3", "f0", "f4", "f2"]
    dims = {f"f{i}": t.embedding_dim for i, t in enumerate(tbls)}
    starts = {f: sum(dims[g] for g in inner[: inner.index(f)]) for f in inner}
    columns = torch.tensor([c for f in sorted(dims) for c in range(starts[f], starts[f] + dims[f])])
    values = torch.randn(5, sum(dims.values()), requires_grad=True)
    kt = PooledOutput(tbls, inner, mean_by_sum=False)(values, None)
    assert kt.keys() == ["f0", "f1", "f2", "f3", "f4"] and kt.length_per_key() == [8, 16, 4, 8, 12]
    expected = values.index_select(1, columns)
    torch.testing.assert_close(kt.values(), expected, rtol=0, atol=0)
    upstream = torch.randn_like(expected)
    (got,) = torch.autograd.grad(kt.values(), values, upstream)
    (want,) = torch.autograd.grad(expected, values, upstream)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(dim=6), "multiple of 4"),
        (dict(pooling=PoolingType.NONE), "pooling"),
        (dict(ratio=0.5), "compression_ratio"),
        (dict(hot_share=1.5), "hot_share"),
        (dict(threshold=0.0), "threshold"),
        (dict(hot_share="0.5"), "hot_share must be float, got '0.5'"),  # a value from a command line
        (dict(threshold=True), "threshold must be float, got True"),
    ],
)
def test_bad_configs_raise_value_error_naming_the_table(bad, match) -> None:
    tbl = EmbeddingBagConfig(
        name="t_cat",
        embedding_dim=bad.get("dim", 8),
        num_embeddings=10_000,
        feature_names=["cat"],
        pooling=bad.get("pooling", PoolingType.SUM),
    )
    cfg = CafeConfig(
        compression_ratio=bad.get("ratio", 10.0),
        hot_share=bad.get("hot_share"),
        threshold=bad.get("threshold"),
        policy="paper",
    )
    with pytest.raises(ValueError, match=match) as err:
        CafeEmbeddingBagCollection([tbl], cfg)
    assert "t_cat" in str(err.value)


@pytest.mark.parametrize("stale_hits", [0.0, -1.0, float("nan")])
def test_a_bad_stale_rule_raises_naming_the_table(stale_hits: float) -> None:
    with pytest.raises(ValueError, match="table 't0': stale_hits must be in \\(0, 2048\\]"):
        CafeEmbeddingBagCollection(tables([5000]), CafeConfig(stale_hits=stale_hits))
    off = CafeEmbeddingBagCollection(tables([5000]), CafeConfig(stale_hits=float("inf")))  # no stale rule
    assert off.groups[off.plan.groups[0].name].sketch.adaptive.stale_hits == float("inf")


@pytest.mark.parametrize("stale_burst", [-0.1, 1.5, float("nan")])
def test_a_bad_stale_burst_raises_naming_the_table(stale_burst: float) -> None:
    with pytest.raises(ValueError, match=r"table 't0': stale_burst must be in \[0, 1\]"):
        CafeEmbeddingBagCollection(tables([5000]), CafeConfig(stale_burst=stale_burst))
    every = CafeEmbeddingBagCollection(tables([5000]), CafeConfig(stale_burst=0.0))  # any stale id
    assert every.groups[every.plan.groups[0].name].sketch.adaptive.stale_burst == 0.0


def test_mismatched_group_settings_raise() -> None:
    tbls = tables([5000, 5000])
    with pytest.raises(ValueError, match="group"):
        CafeEmbeddingBagCollection(
            tbls, {"t0": CafeConfig(policy="paper", threshold=5.0), "t1": CafeConfig(policy="paper", threshold=6.0)}
        )


def test_group_names_never_merge_or_collide() -> None:
    """A named group is its own group even when named like a dim ("dim16" on dim-16 tables
    beside unnamed ones), and a user table named like a physical table is refused naming both."""
    wide = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=50_000, feature_names=[f"f{i}"])
        for i in range(3)
    ]
    configs = {"t0": CafeConfig(group="dim16"), "t1": CafeConfig(), "t2": CafeConfig()}
    ebc = CafeEmbeddingBagCollection(wide, configs)
    assert [(g.name, [t.name for t in g.tables]) for g in ebc.plan.groups] == [
        ("cafe_dim16_dim16", ["t0"]),
        ("cafe_dim16", ["t1", "t2"]),
    ]
    clash = EmbeddingBagConfig(name="cafe_dim16", embedding_dim=8, num_embeddings=10, feature_names=["g"])
    with pytest.raises(ValueError, match="table 'cafe_dim16' has the name of the physical table of CAFE group"):
        CafeEmbeddingBagCollection(wide[1:] + [clash], CafeConfig())
    compressed = EmbeddingBagConfig(name="cafe_dim16", embedding_dim=8, num_embeddings=50_000, feature_names=["g"])
    with pytest.raises(ValueError, match="table 'cafe_dim16' has the name of the physical table"):
        CafeEmbeddingBagCollection(wide[1:] + [compressed], CafeConfig())  # in the dim-8 group
    # a table of its own group's name lives inside that physical table: allowed
    member = EmbeddingBagConfig(name="cafe_dim16", embedding_dim=16, num_embeddings=50_000, feature_names=["g"])
    assert [g.name for g in CafeEmbeddingBagCollection(wide[1:] + [member], CafeConfig()).plan.groups] == ["cafe_dim16"]


def test_bad_input_raises_and_changes_nothing() -> None:
    ebc = make()
    gen = torch.Generator().manual_seed(0)
    good = zipf_kjt(["f0", "f1"], 8, 100, gen)
    ebc(good).values().sum().backward()
    before = copy.deepcopy(ebc.state_dict())
    cases = [
        (
            KeyedJaggedTensor.from_lengths_sync(keys=["f0"], values=torch.tensor([1]), lengths=torch.tensor([1])),
            "lacks",
        ),
        (
            KeyedJaggedTensor.from_lengths_sync(
                keys=["f0", "f1", "zz"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 1])
            ),
            "unknown",
        ),
        (
            KeyedJaggedTensor.from_lengths_sync(
                keys=["f0", "f1"], values=torch.tensor([1, 2], dtype=torch.int16), lengths=torch.tensor([1, 1])
            ),
            "int32 or int64",
        ),
        (KeyedJaggedTensor(keys=["f0", "f1"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1])), "sum to"),
        (KeyedJaggedTensor(keys=["f0", "f0"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1])), "duplicated"),
    ]
    for kjt, match in cases:
        with pytest.raises(ValueError, match=match):
            ebc(kjt)
    assert all(torch.equal(before[k], v) for k, v in ebc.state_dict().items())


def test_training_without_in_backward_optimizer_is_refused() -> None:
    ebc = CafeEmbeddingBagCollection(tables([5000]), CafeConfig(compression_ratio=20))
    kjt = zipf_kjt(["f0"], 4, 10, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="in-backward optimizer"):
        ebc(kjt)
    ebc.eval()
    assert ebc(kjt).values().shape == (4, 8)
    with torch.no_grad():
        ebc.train()(kjt)


def test_empty_batch_and_empty_feature() -> None:
    ebc = make()
    empty = KeyedJaggedTensor(
        keys=["f0", "f1"], values=torch.empty(0, dtype=torch.int64), lengths=torch.zeros(8, dtype=torch.int64)
    )
    out = ebc(empty)
    assert out.values().shape == (4, 16) and not out.values().any()
    out.values().sum().backward()
    half = KeyedJaggedTensor(keys=["f0", "f1"], values=torch.tensor([5, 6]), lengths=torch.tensor([1, 1, 0, 0]))
    ebc(half).values().sum().backward()


@pytest.mark.parametrize("optimizer", [torch.optim.Adagrad, RowWiseAdagrad])
@pytest.mark.parametrize("multi_level", [False, True])
def test_promotion_copies_the_rows_and_starts_the_optimizer_state_fresh(optimizer, multi_level) -> None:
    """The new hot row holds what the id read (its level-1 row, plus its level-2 row with
    CAFE-ML), after this step's update; its optimizer state starts at zero, as a fresh row."""
    from cafe_torchrec.migration import row_store

    ebc = make(lr=0.1, optimizer=optimizer, threshold=5.0, multi_level=multi_level, medium_share=0.1)
    group = ebc.groups[ebc.plan.groups[0].name]
    kjt = one_id_kjt(ebc, "f0", 42, batch=8)
    key = ebc.keys("f0", torch.tensor([42]))
    store = row_store(ebc.physical, group.layout.name)
    sources = [group.hashed_rows(key, 1)] + ([group.hashed_rows(key, 2)] if multi_level else [])
    ebc(kjt).values().sum().backward()  # enters the sketch
    ebc(kjt).values().sum().backward()  # promoted at the end of this backward, after the update
    row = int(group.sketch.query(key)[0])
    assert row >= 0
    torch.testing.assert_close(store.weight[row], sum(store.weight[s][0] for s in sources))
    assert all(bool((state[sources[0]] != 0).any()) for state in store.states)  # the hashed row has state
    for state in store.states:
        assert bool((state[row] == 0).all())


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_cpp_prepare_equals_the_torch_prepare_in_any_key_order(weighted: bool, id_dtype: torch.dtype) -> None:
    """FeatureMap.prepare in one C++ pass (reorder, pre-hash, id mod rows) gives the torch
    path's inner KJT: two groups of two dims and a plain table between them, the input's keys
    in another order, per-sample weights moved with their ids."""
    from cafe_torchrec.ops import available

    if not available():
        pytest.skip("no C++ build")
    tbls = [
        *tables([5000, 3000], dim=8, features_per_table=[2, 1]),
        EmbeddingBagConfig(name="plain", embedding_dim=8, num_embeddings=30, feature_names=["p"]),
        EmbeddingBagConfig(name="wide", embedding_dim=16, num_embeddings=9000, feature_names=["w"]),
    ]
    ebc = CafeEmbeddingBagCollection(tbls, CafeConfig(compression_ratio=20), is_weighted=weighted)
    feature_map = ebc.feature_map
    gen = torch.Generator().manual_seed(4)
    keys = ["w", "f2", "p", "f0", "f1"]
    lengths = torch.randint(0, 4, (len(keys) * 6,), generator=gen)
    values = torch.randint(0, 2**31 - 1, (int(lengths.sum()),), generator=gen).to(id_dtype)
    weights = torch.rand(values.numel(), generator=gen) if weighted else None
    kjt = KeyedJaggedTensor.from_lengths_sync(keys, values, lengths, weights=weights)
    assert feature_map.inner != keys
    feature_map.kernel = "cpp"
    got = feature_map.prepare(kjt)
    feature_map.kernel = "torch"
    expected = feature_map.prepare(kjt)
    assert got.keys() == expected.keys() == feature_map.inner
    assert got.values().dtype == torch.int64
    assert torch.equal(got.values(), expected.values().to(torch.int64))
    assert torch.equal(got.lengths(), expected.lengths())
    if weighted:
        assert torch.equal(got.weights(), expected.weights())
    for f in keys:  # each feature's ids and weights are its own, in the inner order
        assert torch.equal(got[f].lengths(), kjt[f].lengths())
