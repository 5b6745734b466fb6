"""Baselines (hashing, QR, AdaEmbed, managed collision): exact outputs, memory, training, state."""

from __future__ import annotations

import io
import math
import types

import pytest
import torch
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec.baselines import (
    AdaEmbedEmbeddingBagCollection,
    HashingEmbeddingBagCollection,
    ManagedCollisionEmbeddingBags,
    QREmbeddingBagCollection,
)
from cafe_torchrec.baselines.managed_collision import _refuse_sharded_cpu_rowwise_adagrad
from cafe_torchrec.hashing import mix64
from tests.helpers import features_of, tables, zipf_kjt


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a busy machine; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sgd(module, lr: float = 0.05):
    _apply_optimizer_in_backward(torch.optim.SGD, module.parameters(), {"lr": lr})
    return module


def bags(kjt: KeyedJaggedTensor, feature: str):
    """The bags of one feature as lists of (id, weight)."""
    jt = kjt[feature]
    values, weights = jt.values().tolist(), (jt.weights().tolist() if jt.weights_or_none() is not None else None)
    out, start = [], 0
    for n in jt.lengths().tolist():
        out.append([(values[i], weights[i] if weights else 1.0) for i in range(start, start + n)])
        start += n
    return out


def explicit_pooled(kjt, feature, row_vector, dim, mean=False):
    """[B, dim]: sum (or mean) over each bag of weight x row_vector(id)."""
    rows = []
    for bag in bags(kjt, feature):
        acc = torch.zeros(dim)
        for i, w in bag:
            acc = acc + w * row_vector(i)
        rows.append(acc / max(len(bag), 1) if mean else acc)
    return torch.stack(rows)


def raw_kjt(features, batch, gen, max_len=3, weighted=False) -> KeyedJaggedTensor:
    """Multi-hot bags (some empty) of ids anywhere in int64, negatives included."""
    lengths = torch.randint(0, max_len + 1, (len(features) * batch,), generator=gen)
    ids = torch.randint(-(2**40), 2**40, (int(lengths.sum()),), generator=gen)
    weights = torch.rand(ids.numel(), generator=gen) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=list(features), values=ids, lengths=lengths, weights=weights)


# ---- exact outputs from the physical weights


@pytest.mark.parametrize(
    "pooling,weighted", [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)]
)
def test_hashing_is_weight_at_id_mod_rows(pooling, weighted) -> None:
    torch.manual_seed(0)
    cfg = tables([20_000, 7_000], dim=8, features_per_table=[2, 1], pooling=pooling)
    ebc = HashingEmbeddingBagCollection(cfg, 10, is_weighted=weighted)
    kjt = raw_kjt(features_of(cfg), 6, torch.Generator().manual_seed(1), weighted=weighted)
    kjt = kjt.permute([2, 0, 1])  # any key order in; config order out
    out = ebc(kjt)
    assert out.keys() == ["f0", "f1", "f2"] and ebc.rows == [2000, 700]
    for f, t, rows in [("f0", "t0", 2000), ("f1", "t0", 2000), ("f2", "t1", 700)]:
        w = ebc.physical.embedding_bags[t].weight
        expected = explicit_pooled(kjt, f, lambda i, w=w, rows=rows: w[i % rows], 8, mean=pooling == PoolingType.MEAN)
        torch.testing.assert_close(out[f], expected)


def test_qr_add_is_sum_of_quotient_and_remainder_rows() -> None:
    torch.manual_seed(0)
    cfg = tables([50_000, 3], dim=8)  # t1 is small: it stays plain (row = id mod 3)
    ebc = QREmbeddingBagCollection(cfg, 50, operation="add")
    c = ebc.collisions[0]
    assert ebc.collisions == [c, 0] and c == math.ceil((1000 - math.sqrt(1000**2 - 4 * 50_000)) / 2)
    kjt = raw_kjt(["f0", "f1"], 8, torch.Generator().manual_seed(2))
    out = ebc(kjt)
    wq, wr = ebc.physical.embedding_bags["t0_q"].weight, ebc.physical.embedding_bags["t0_r"].weight
    assert wq.shape[0] == math.ceil(50_000 / c) and wr.shape[0] == c
    torch.testing.assert_close(
        out["f0"], explicit_pooled(kjt, "f0", lambda i: wq[(i % 50_000) // c] + wr[(i % 50_000) % c], 8)
    )
    w1 = ebc.physical.embedding_bags["t1"].weight
    torch.testing.assert_close(out["f1"], explicit_pooled(kjt, "f1", lambda i: w1[i % 3], 8))


@pytest.mark.parametrize("weighted", [False, True])
def test_qr_mult_is_product_for_one_hot_bags_and_refuses_longer_bags(weighted) -> None:
    torch.manual_seed(0)
    cfg = tables([50_000], dim=8)
    ebc = QREmbeddingBagCollection(cfg, 50, is_weighted=weighted)  # operation "mult" by default
    c = ebc.collisions[0]
    kjt = raw_kjt(["f0"], 16, torch.Generator().manual_seed(3), max_len=1, weighted=weighted)
    assert (kjt.lengths() == 0).any() and (kjt.lengths() == 1).any()
    wq, wr = ebc.physical.embedding_bags["t0_q"].weight, ebc.physical.embedding_bags["t0_r"].weight
    expected = explicit_pooled(kjt, "f0", lambda i: wq[(i % 50_000) // c] * wr[(i % 50_000) % c], 8)
    torch.testing.assert_close(ebc(kjt)["f0"], expected)
    two = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0"],
        values=torch.tensor([1, 2, 3]),
        lengths=torch.tensor([1, 2]),
        weights=torch.ones(3) if weighted else None,
    )
    with pytest.raises(ValueError, match="'f0'.*at most one id"):
        ebc(two)


def test_adaembed_output_is_owned_row_or_zero() -> None:
    torch.manual_seed(0)
    cfg = [
        EmbeddingBagConfig(
            name="t0", embedding_dim=16, num_embeddings=6000, feature_names=["f0"], pooling=PoolingType.MEAN
        ),
        EmbeddingBagConfig(name="small", embedding_dim=16, num_embeddings=3, feature_names=["f1"]),  # plain
        EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=4000, feature_names=["f2", "f3"]),
    ]
    ebc = sgd(AdaEmbedEmbeddingBagCollection(cfg, 4, interval=2))
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        ebc(zipf_kjt(["f0", "f1", "f2", "f3"], 64, 4000, gen, max_len=3)).values().sum().backward()
    pool = ebc.pools["ada_dim16"]
    assert pool.hot_rows == (10_000 * 16 // 4 - 2 * 10_000) // 16 == 1250
    assert int((pool.row_of >= 0).sum()) == 1250 and torch.unique(pool.row_of[pool.row_of >= 0]).numel() == 1250
    ebc.eval()
    popular = (torch.arange(20) * 7919) % 4000  # the zipf_kjt ranks 0..19
    values = torch.cat([popular, torch.randint(-6000, 6000, (20,), generator=gen), torch.arange(-20, 20)])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f2", "f0", "f3", "f1"], values=values, lengths=torch.tensor([5, 5, 10, 10, 7, 3, 0, 10, 10, 10, 5, 5])
    )
    out = ebc(kjt)
    assert out.keys() == ["f0", "f1", "f2", "f3"]
    w = ebc.physical.embedding_bags["ada_dim16"].weight

    def row_vector(offset, n):
        def get(i):
            row = int(pool.row_of[offset + i % n])
            return w[row] if row >= 0 else torch.zeros(16)

        return get

    zero_seen = False
    for f, offset, n in [("f0", 0, 6000), ("f2", 6000, 4000), ("f3", 6000, 4000)]:
        torch.testing.assert_close(out[f], explicit_pooled(kjt, f, row_vector(offset, n), 16, mean=f == "f0"))
        zero_seen |= any(int(pool.row_of[offset + i % n]) < 0 for bag in bags(kjt, f) for i, _ in bag)
    assert zero_seen  # some ids read zeros
    small = ebc.physical.embedding_bags["small"].weight
    torch.testing.assert_close(out["f1"], explicit_pooled(kjt, "f1", lambda i: small[i % 3], 16))


def mc_row(module, raw_id: int) -> int:
    """Explicit lookup in MCH's buffers: the row of a raw id (its pre-hash in the sorted ids)."""
    h = int(mix64(torch.tensor([raw_id]), 0)[0]) % 2**62
    hit = (module._mch_sorted_raw_ids == h).nonzero()
    return int(module._mch_remapped_ids_mapping[hit[0, 0]]) if hit.numel() else module._zch_size - 1


@pytest.mark.parametrize("eviction", ["lfu", "distance_lfu"])
def test_managed_collision_gives_frequent_ids_their_own_rows(eviction) -> None:
    torch.manual_seed(0)
    cfg = tables([5000], dim=8)
    ebc = sgd(ManagedCollisionEmbeddingBags(cfg, 10, eviction=eviction, eviction_interval=3))
    assert ebc.zch_sizes == [500]
    gen = torch.Generator().manual_seed(5)
    frequent = [-7, 3, 10**12, 42, 999]  # raw ids, any int64
    for _ in range(6):
        rand = torch.randint(0, 10**9, (59,), generator=gen)
        values = torch.cat([torch.tensor(frequent), rand])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f0"], values=values, lengths=torch.ones(64, dtype=torch.int64))
        ebc(kjt).values().sum().backward()
    module = ebc.mc_modules()["t0"]
    rows = [mc_row(module, i) for i in frequent]
    assert len(set(rows)) == len(rows) and 499 not in rows
    assert ebc.rows_of("t0", torch.tensor(frequent)).tolist() == rows
    ebc.eval()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0"], values=torch.tensor(frequent + [123456789]), lengths=torch.ones(6, dtype=torch.int64)
    )
    w = ebc.physical.embedding_bags["t0"].weight
    torch.testing.assert_close(ebc(kjt)["f0"], w[rows + [mc_row(module, 123456789)]])


def test_managed_collision_with_real_id_range_and_row_wise_adagrad_unsharded() -> None:
    torch.manual_seed(0)
    ebc = ManagedCollisionEmbeddingBags(tables([5000], dim=8), 10, eviction_interval=2, input_hash_size=5000)
    _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.05})
    gen = torch.Generator().manual_seed(6)
    for _ in range(4):  # two evictions; unsharded eviction resets nothing, so RowWiseAdagrad works
        ebc(zipf_kjt(["f0"], 64, 5000, gen)).values().sum().backward()
    module = ebc.mc_modules()["t0"]
    hit = (module._mch_sorted_raw_ids == 0).nonzero()  # id 0 is the most frequent rank
    assert (
        hit.numel() == 1 and ebc.rows_of("t0", torch.tensor([0])).item() == module._mch_remapped_ids_mapping[hit[0, 0]]
    )


def test_sharded_cpu_row_wise_adagrad_is_refused() -> None:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    for optimizer, refused in [(EmbOptimType.EXACT_ROWWISE_ADAGRAD, True), (EmbOptimType.EXACT_SGD, False)]:
        tbe = types.SimpleNamespace(optimizer=optimizer, use_cpu=True)
        sharded = types.SimpleNamespace(_table_to_tbe_and_index={"t0": (tbe, None)})
        if refused:
            with pytest.raises(ValueError, match="'t0'.*RowWiseAdagrad"):
                _refuse_sharded_cpu_rowwise_adagrad(sharded)
        else:
            _refuse_sharded_cpu_rowwise_adagrad(sharded)


# ---- memory


def test_memory_follows_the_requested_ratio() -> None:
    cfg = tables([400_000, 100_000], dim=16)
    for ebc, ratio in [
        (HashingEmbeddingBagCollection(cfg, 10), 10),
        (HashingEmbeddingBagCollection(cfg, 1000), 1000),
        (QREmbeddingBagCollection(cfg, 50), 50),
        (QREmbeddingBagCollection(cfg, 100, operation="add"), 100),
        (AdaEmbedEmbeddingBagCollection(cfg, 2), 2),
        (AdaEmbedEmbeddingBagCollection(cfg, 6), 6),
    ]:
        m = ebc.memory()
        assert m["logical_bytes"] == 500_000 * 16 * 4
        assert abs(m["compression_ratio"] / ratio - 1) < 0.02, (type(ebc).__name__, ratio, m)
        assert len(ebc.describe().splitlines()) == 3
    ada = AdaEmbedEmbeddingBagCollection(cfg, 4).memory()
    assert ada["extra_bytes"] == 8 * 500_000  # 2 words per logical id
    for eviction, per_row in [("lfu", 24), ("distance_lfu", 32)]:
        mc = ManagedCollisionEmbeddingBags(cfg, 10, eviction=eviction)
        m = mc.memory()
        assert abs(m["logical_bytes"] / m["weight_bytes"] / 10 - 1) < 0.02  # rows as hashing
        assert m["extra_bytes"] == per_row * (40_000 + 10_000)  # MCH's per-row buffers
        assert m["compression_ratio"] < 10


def test_infeasible_ratios_raise_naming_the_table() -> None:
    cfg = tables([100_000, 1000], dim=16)
    with pytest.raises(ValueError, match="'t1'"):  # 1000 rows at 100x: 10 rows < 2 sqrt(1000)
        QREmbeddingBagCollection(cfg, 100, small_table_rows=0)
    with pytest.raises(ValueError, match="'t1'"):  # the paper's rule keeps t1 (1000 > 20 rows) compressed
        QREmbeddingBagCollection(cfg, 100)
    shared = QREmbeddingBagCollection(cfg, 100, collisions="global")  # the paper's global c fits
    assert shared.collisions[0] == shared.collisions[1] > 0
    with pytest.raises(ValueError, match=r"\['t0', 't1'\].*dim / 2 = 8"):
        AdaEmbedEmbeddingBagCollection(cfg, 8)
    AdaEmbedEmbeddingBagCollection(cfg, 7.5)
    with pytest.raises(ValueError, match="compression_ratio"):
        HashingEmbeddingBagCollection(cfg, 0.5)
    with pytest.raises(ValueError, match="'f0'"):
        HashingEmbeddingBagCollection(
            [cfg[0], EmbeddingBagConfig(name="x", embedding_dim=16, num_embeddings=9, feature_names=["f0"])], 10
        )


def test_adaembed_needs_an_in_backward_optimizer() -> None:
    ebc = AdaEmbedEmbeddingBagCollection(tables([5000], dim=16), 4)
    kjt = zipf_kjt(["f0"], 8, 5000, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="in-backward optimizer"):
        ebc(kjt)
    with torch.no_grad():
        ebc(kjt)


# ---- training


def test_adaembed_moves_rows_to_the_currently_popular_ids() -> None:
    torch.manual_seed(0)
    ebc = sgd(
        AdaEmbedEmbeddingBagCollection(
            tables([2000], dim=16), 6, interval=5, decay=0.5, decay_interval=5, importance="frequency"
        ),
        lr=0.0,
    )  # weights move only by reallocation
    pool = ebc.pools["ada_dim16"]
    assert pool.hot_rows == 83
    gen = torch.Generator().manual_seed(7)

    def train(offset, steps):
        for _ in range(steps):
            ebc(zipf_kjt(["f0"], 128, 200, gen, offset=offset)).values().sum().backward()

    def owned(offset, top=40):  # the `top` most popular ids of the set at `offset`
        ids = (torch.arange(top) * 7919) % 200 + offset
        return (pool.row_of[ids] >= 0).float().mean().item()

    train(0, 20)
    assert owned(0) == 1.0 and owned(1000) == 0.0
    before = pool.reallocations
    train(1000, 20)
    # reallocation waits until more than 5% of the rows would change owner: the tail may lag
    assert pool.reallocations > before and owned(1000, top=20) == 1.0 and owned(1000) >= 0.9 and owned(0) < 0.5
    # admitted ids start from a zeroed row (as the reference); the first allocation zeroes nothing
    weight = ebc.physical.embedding_bags["ada_dim16"].weight
    new_rows = pool.row_of[(torch.arange(20) * 7919) % 200 + 1000].long()
    assert not weight[new_rows].any()
    assert weight.abs().sum(1).gt(0).sum() == pool.hot_rows - (pool.row_of[1000:1200] >= 0).sum()


def synthetic_batch(gen, latent, batch):
    """Label = sign of the sum of two per-id latents; dense features are noise."""
    weights = torch.arange(1, 3001, dtype=torch.float64).pow(-1.1)
    ids = [(torch.multinomial(weights, batch, replacement=True, generator=gen) * 7919) % 3000 for _ in range(2)]
    labels = ((latent[0][ids[0]] + latent[1][ids[1]]) > 0).float()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=torch.cat(ids), lengths=torch.ones(2 * batch, dtype=torch.int64)
    )
    return torch.randn(batch, 4, generator=gen), kjt, labels


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (HashingEmbeddingBagCollection, {}),
        (QREmbeddingBagCollection, {"operation": "mult"}),
        (QREmbeddingBagCollection, {"operation": "add"}),
        (AdaEmbedEmbeddingBagCollection, {"interval": 5}),
        (ManagedCollisionEmbeddingBags, {"eviction_interval": 5}),
    ],
    ids=["hash", "qr-mult", "qr-add", "adaembed", "mc"],
)
def test_training_inside_dlrm_reduces_the_loss(cls, kwargs) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    latent = [torch.randn(3000, generator=gen) for _ in range(2)]
    ebc = cls(tables([5000, 3000], dim=16), 4, **kwargs)
    model = DLRM(
        embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 16], over_arch_layer_sizes=[16, 1]
    )
    sgd(ebc)
    dense = torch.optim.Adam([p for n, p in model.named_parameters() if "sparse_arch" not in n], lr=0.01)
    held_out = synthetic_batch(torch.Generator().manual_seed(99), latent, 2048)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = loss_fn(model(held_out[0], held_out[1]).squeeze(1), held_out[2]).item()
        model.train()
        return loss

    first = held_out_loss()
    for _ in range(100):
        x, kjt, y = synthetic_batch(gen, latent, 256)
        loss = loss_fn(model(x, kjt).squeeze(1), y)
        dense.zero_grad()
        loss.backward()
        dense.step()
    last = held_out_loss()
    assert last < first - 0.05 and last < 0.65, (first, last)  # below ln 2: the embeddings learned


# ---- state


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (HashingEmbeddingBagCollection, {}),
        (QREmbeddingBagCollection, {"operation": "add"}),
        (AdaEmbedEmbeddingBagCollection, {"interval": 2}),
        (ManagedCollisionEmbeddingBags, {"eviction_interval": 2}),
    ],
    ids=["hash", "qr", "adaembed", "mc"],
)
def test_state_dict_round_trip_gives_identical_outputs(cls, kwargs) -> None:
    cfg = tables([6000, 3000], dim=16)
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(0)
    trained = sgd(cls(cfg, 4, **kwargs))
    for _ in range(5):
        trained(zipf_kjt(["f0", "f1"], 64, 3000, gen, max_len=2)).values().sum().backward()
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    fresh = sgd(cls(cfg, 4, **kwargs))
    probe = zipf_kjt(["f0", "f1"], 64, 3000, gen, max_len=2)
    assert not torch.equal(fresh.eval()(probe).values(), trained.eval()(probe).values())
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh(probe).values(), trained(probe).values(), rtol=0, atol=0)
    if cls is not ManagedCollisionEmbeddingBags:  # MC's history buffer is working memory, not state
        fresh.train(), trained.train()
        for module in (fresh, trained):  # the next training step (and any reallocation) is the same too
            module(probe).values().sum().backward()
        torch.testing.assert_close(fresh.eval()(probe).values(), trained.eval()(probe).values(), rtol=0, atol=0)


# ---- sharded by DistributedModelParallel (as the example trainer runs them)
PLACED_FEATURES = ["f0", "f1", "f2"]


def placed_tables() -> list:
    """Compressed tables of dims 8 and 16 and a small plain one of dim 8."""
    return [
        EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=20_000, feature_names=["f0"]),
        EmbeddingBagConfig(name="b", embedding_dim=16, num_embeddings=20_000, feature_names=["f1"]),
        EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=3, feature_names=["f2"]),
    ]


PLACED = {
    "hash": (HashingEmbeddingBagCollection, dict(compression_ratio=4.0)),
    "adaembed": (AdaEmbedEmbeddingBagCollection, dict(compression_ratio=2.0)),
    "mc": (ManagedCollisionEmbeddingBags, dict(compression_ratio=4.0)),  # DMP shards the EBC inside the MC wrapper
}


def placed_batch(rank: int) -> KeyedJaggedTensor:
    """Ids and per-sample weights, which these unweighted collections must ignore."""
    gen = torch.Generator().manual_seed(rank)
    lengths = torch.randint(1, 3, (3 * 6,), generator=gen)
    values = torch.randint(0, 20_000, (int(lengths.sum()),), generator=gen)
    return KeyedJaggedTensor.from_lengths_sync(
        PLACED_FEATURES, values, lengths, weights=torch.rand(values.numel(), generator=gen) * 5
    )


def placed_module(method: str):
    cls, kwargs = PLACED[method]
    torch.manual_seed(0)
    return cls(placed_tables(), **kwargs)


def baseline_placed(rank: int, world: int, method: str) -> dict:
    """The inner collection sharded table-wise with its last table on rank 0 and the others on
    rank 1: TorchRec's columns then come in another order than the inner config order."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingPlan

    module = placed_module(method)
    path = next(name for name, m in module.named_modules() if m is module.physical)  # the inner stock EBC
    names = list(module.physical.embedding_bags)
    full = {
        f"{path}.embedding_bags.{n}.weight": b.weight.detach().clone()
        for n, b in module.physical.embedding_bags.items()
    }
    per_param = {n: table_wise(rank=0 if i == len(names) - 1 else 1) for i, n in enumerate(names)}
    sharder = EmbeddingBagCollectionSharder()
    plan = construct_module_sharding_plan(
        module.physical, per_param, local_size=world, world_size=world, device_type="cpu", sharder=sharder
    )
    dmp = DistributedModelParallel(
        module, device=torch.device("cpu"), plan=ShardingPlan({path: plan}), sharders=[sharder]
    )
    dmp.module.load_state_dict(full, strict=False)
    dmp.eval()
    with torch.no_grad():
        out = dmp(placed_batch(rank))
    return {"keys": out.keys(), "values": out.values()}


@pytest.mark.parametrize("method", sorted(PLACED))
def test_sharded_baselines_answer_in_config_order_and_ignore_weights(method: str) -> None:
    from tests.dist_utils import run_ranks

    reference = placed_module(method).eval()
    for rank, got in enumerate(run_ranks(baseline_placed, 2, method)):
        batch = placed_batch(rank)
        unweighted = KeyedJaggedTensor.from_lengths_sync(PLACED_FEATURES, batch.values(), batch.lengths())
        with torch.no_grad():
            expected = reference(unweighted).values()
        assert got["keys"] == PLACED_FEATURES
        torch.testing.assert_close(got["values"], expected, rtol=0, atol=1e-6, msg=f"{method} rank {rank}")
