"""Serving: the frozen collection against the training module's eval forward, TorchRec's serving
recipe (quantize, fx, TorchScript, export), the conversions to and from a stock collection, the
refusal of a foreign state dict, and freezing a DMP-sharded collection on 2 gloo ranks.

No `from __future__ import annotations` here: torch.jit.script reads the annotations of the
traced model's forward, which must be types, not strings."""

import copy
import dataclasses
import types
from typing import Dict, List

import pytest
import torch
import torchrec.fx
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection
from cafe_torchrec.hashing import KEY_SPACE, make_keys
from cafe_torchrec.inference import (
    FrozenCafeEmbeddingBagCollection,
    freeze,
    frequent_ids,
    quantize_inference_model,
    to_embedding_bag_collection,
    warm_start,
)
from cafe_torchrec.ops import available as cpp_available
from tests.dist_utils import run_ranks
from tests.helpers import zipf_kjt

FEATURES = ["f0", "f1", "f3", "f2"]  # config order: the C++ op takes such a KJT as it is
GROUP = "cafe_dim8"


def tables(pooling: PoolingType = PoolingType.SUM) -> List[EmbeddingBagConfig]:
    """Two compressed tables (one with two features) and, between them in config order, a plain
    table of 10 rows (features f0, f1, f3, f2)."""
    return [
        EmbeddingBagConfig(
            name="t0", embedding_dim=8, num_embeddings=6000, feature_names=["f0", "f1"], pooling=pooling
        ),
        EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=10, feature_names=["f3"], pooling=pooling),
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=4000, feature_names=["f2"], pooling=pooling),
    ]


def batch(gen: torch.Generator, size: int = 24, weighted: bool = False) -> KeyedJaggedTensor:
    kjt = zipf_kjt(FEATURES, size, 400, gen, max_len=3)
    if not weighted:
        return kjt
    return KeyedJaggedTensor(
        keys=FEATURES,
        values=kjt.values(),
        lengths=kjt.lengths(),
        weights=torch.rand(kjt.values().numel(), generator=gen) + 0.5,
    )


def trained(
    multi_level: bool = False, pooling: PoolingType = PoolingType.SUM, weighted: bool = False, steps: int = 8
) -> CafeEmbeddingBagCollection:
    """A small collection after a few SGD steps on Zipf ids: hot rows taken, medium ids when multi-level."""
    torch.manual_seed(0)
    ebc = CafeEmbeddingBagCollection(
        tables(pooling),
        CafeConfig(compression_ratio=20, policy="paper", threshold=3.0, seed=5, multi_level=multi_level),
        is_weighted=weighted,
    )
    _apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.1})
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ebc(batch(gen, 32, weighted)).values().sum().backward()
    return ebc.eval()


def served(ebc: CafeEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> torch.Tensor:
    with torch.no_grad():
        return ebc(kjt).values()


def hot_and_medium(ebc: CafeEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> Dict[str, int]:
    """How many of the batch's compressed ids the sketch serves from a hot row, and as medium."""
    remap = ebc.groups[GROUP]
    keys = torch.cat([ebc.keys(f, kjt[f].values()) for f in ("f0", "f1", "f2")])
    lookup = remap.lookup(keys, count=False)
    medium = int(lookup.medium.sum()) if lookup.medium.numel() else 0
    return {"hot": int((lookup.primary < remap.layout.hot_rows).sum()), "medium": medium}


def variants(kjt: KeyedJaggedTensor, gen: torch.Generator) -> Dict[str, KeyedJaggedTensor]:
    """The same batch as int32 (lengths or offsets), with the keys permuted, and a VBE batch
    (some bags empty, some ids negative), and a batch without ids."""
    order = [2, 0, 3, 1]
    permuted = kjt.permute(order)
    narrow = KeyedJaggedTensor(
        keys=FEATURES, values=kjt.values().int(), lengths=kjt.lengths().int(), weights=kjt.weights_or_none()
    )
    strides = [3, 5, 2, 4]
    lengths = torch.randint(0, 3, (sum(strides),), generator=gen)
    values = torch.randint(-5, 900, (int(lengths.sum()),), generator=gen)
    inverse = torch.stack([torch.randint(0, s, (6,), generator=gen) for s in strides])
    weights = torch.rand(values.numel(), generator=gen) if kjt.weights_or_none() is not None else None
    vbe = KeyedJaggedTensor(
        keys=FEATURES,
        values=values,
        lengths=lengths,
        weights=weights,
        stride_per_key_per_rank=[[s] for s in strides],
        inverse_indices=(FEATURES, inverse),
    )
    no_ids = KeyedJaggedTensor(
        keys=FEATURES,
        values=torch.zeros(0, dtype=torch.int64),
        lengths=torch.zeros(8, dtype=torch.int64),
        weights=torch.zeros(0) if kjt.weights_or_none() is not None else None,
    )
    by_offsets = KeyedJaggedTensor(
        keys=FEATURES, values=kjt.values().int(), offsets=kjt.offsets().int(), weights=kjt.weights_or_none()
    )
    # inverse indices with no entries, which stock ignores; a VBE KJT of one stride without any
    empty_inverse = KeyedJaggedTensor(
        keys=FEATURES,
        values=kjt.values(),
        lengths=kjt.lengths(),
        weights=kjt.weights_or_none(),
        inverse_indices=(FEATURES, torch.zeros(len(FEATURES), 0, dtype=torch.int64)),
    )
    one_stride = KeyedJaggedTensor(
        keys=FEATURES,
        values=kjt.values(),
        lengths=kjt.lengths(),
        weights=kjt.weights_or_none(),
        stride_per_key_per_rank=[[kjt.stride()]] * len(FEATURES),
    )
    return {
        "plain": kjt,
        "permuted": permuted,
        "int32": narrow,
        "vbe": vbe,
        "no ids": no_ids,
        "int32 offsets": by_offsets,
        "empty inverse indices": empty_inverse,
        "one-stride vbe": one_stride,
    }


@pytest.mark.parametrize(
    "multi_level,pooling,weighted",
    [
        (False, PoolingType.SUM, False),
        (True, PoolingType.SUM, False),
        (True, PoolingType.MEAN, False),
        (False, PoolingType.SUM, True),
        (True, PoolingType.SUM, True),
    ],
)
def test_frozen_fp32_equals_the_eval_forward(multi_level: bool, pooling: PoolingType, weighted: bool) -> None:
    ebc = trained(multi_level, pooling, weighted)
    frozen = freeze(ebc)
    gen = torch.Generator().manual_seed(2)
    kjt = batch(gen, 24, weighted)
    seen = hot_and_medium(ebc, kjt)
    assert seen["hot"] > 10 and (seen["medium"] > 0) == multi_level, seen
    for name, variant in variants(kjt, gen).items():
        assert torch.equal(frozen(variant).values(), served(ebc, variant)), name
    assert not any("sketch" in k for k in frozen.state_dict())


def same_physical_input(
    fused: FrozenCafeEmbeddingBagCollection, twin: FrozenCafeEmbeddingBagCollection, kjt: KeyedJaggedTensor
) -> None:
    """The C++ op's inner KJT equals the torch-ops twin's bit for bit: rows, lengths, weights."""
    got, want = fused.physical_input(kjt), twin.physical_input(kjt)
    assert got.keys() == want.keys() and got.stride() == want.stride()
    assert torch.equal(got.values(), want.values())
    assert torch.equal(got.lengths(), want.lengths())
    assert (got.weights_or_none() is None) == (want.weights_or_none() is None)
    if want.weights_or_none() is not None:
        assert torch.equal(got.weights(), want.weights())


needs_cpp = pytest.mark.skipif(not cpp_available(), reason="the C++ ops are not built")


@needs_cpp
@pytest.mark.parametrize(
    "multi_level,pooling,weighted",
    [(False, PoolingType.SUM, False), (True, PoolingType.MEAN, False), (True, PoolingType.SUM, True)],
)
def test_serving_op_equals_its_torch_twin(multi_level: bool, pooling: PoolingType, weighted: bool) -> None:
    fused = freeze(trained(multi_level, pooling, weighted)).with_kernel("cpp")
    twin = fused.with_kernel("torch")
    assert (fused.kernel, twin.kernel) == ("cpp", "torch")
    gen = torch.Generator().manual_seed(12)
    for name, variant in variants(batch(gen, 40, weighted), gen).items():
        same_physical_input(fused, twin, variant)
        assert torch.equal(fused(variant).values(), twin(variant).values()), name


@needs_cpp
def test_serving_op_probes_a_map_of_any_capacity_as_its_twin() -> None:
    """freeze sizes hash-map regions in powers of two (the op masks); a map of another capacity
    (here 2 x keys + 3) goes through the op's general modulo and must give the twin's rows."""
    frozen = freeze(trained(multi_level=True))
    held = frozen.hash_table[:, 0] != -1
    keys, values = frozen.hash_table[held, 0], frozen.hash_table[held, 1]
    capacity = 2 * keys.numel() + 3
    table = torch.full((capacity, 2), -1, dtype=torch.int64)
    offsets = torch.tensor([0, capacity, capacity], dtype=torch.int64)
    torch.ops.fbgemm.pruned_hashmap_insert(keys, values, torch.tensor([0, keys.numel(), keys.numel()]), table, offsets)
    rebuilt = [
        FrozenCafeEmbeddingBagCollection(
            frozen.embedding_bag_configs(),
            [f for c in frozen.physical.embedding_bag_configs() for f in c.feature_names],
            frozen.feature_info,
            frozen.group_bounds.tolist(),
            table,
            offsets,
            frozen.regions,
            frozen.bucket_hashes,
            frozen.physical,
            frozen.is_weighted(),
            multi_level=True,
            multi_block=False,
            kernel=kernel,
        )
        for kernel in ("cpp", "torch")
    ]
    gen = torch.Generator().manual_seed(14)
    kjt = batch(gen, 64)
    for variant in variants(kjt, gen).values():
        same_physical_input(rebuilt[0], rebuilt[1], variant)
    assert torch.equal(rebuilt[0].physical_input(kjt).values(), frozen.physical_input(kjt).values())


@pytest.mark.parametrize("kernel", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_frozen_holds_one_table_where_the_tables_fit_it(kernel: str) -> None:
    """One group and plain tables of its dim: one physical table with the features in config
    order, so the output is not reordered; a plain table of another dim keeps the tables apart.
    Both serve what the eval forward does."""
    one = freeze(trained(multi_level=True)).with_kernel(kernel)
    assert [c.feature_names for c in one.physical.embedding_bag_configs()] == [["f0", "f1", "f3", "f2"]]
    torch.manual_seed(0)
    configs = tables()
    configs[1] = dataclasses.replace(configs[1], embedding_dim=4)
    ebc = CafeEmbeddingBagCollection(configs, CafeConfig(compression_ratio=20, policy="paper", multi_level=True))
    _apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.1})
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        ebc(batch(gen, 32)).values().sum().backward()
    apart = freeze(ebc.eval()).with_kernel(kernel)
    assert [c.name for c in apart.physical.embedding_bag_configs()] == [GROUP, "t2"]
    kjt = batch(gen, 24)
    for frozen, trained_ebc in ((one, trained(multi_level=True)), (apart, ebc)):
        for name, variant in variants(kjt, gen).items():
            assert torch.equal(frozen(variant).values(), served(trained_ebc, variant)), name


def two_blocks(frozen: FrozenCafeEmbeddingBagCollection, kernel: str) -> FrozenCafeEmbeddingBagCollection:
    """The frozen collection as if its group were served from two row-wise blocks: keys from
    KEY_SPACE / 2 on read block 1's regions, here block 0's with a third of the rows each."""
    info = frozen.feature_info.clone()
    cafe = info[:, 6] == 0  # plain_rows 0: the group's features
    info[cafe, 4] = (KEY_SPACE + 1) // 2  # block size
    info[cafe, 5] = 1  # last block
    slots = int(info[cafe, 3][0])
    group = frozen.regions[1 : 1 + slots]  # block 0 (row 0: placeholder; plain tables' rows after)
    second = group.clone()
    second[:, 1] = (group[:, 1] // 3).clamp(min=1)
    second[:, 3] = (group[:, 3] // 3).clamp(min=1)
    info[~cafe, 2] = torch.where(info[~cafe, 2] > 0, info[~cafe, 2] + slots, 0)  # after block 1's rows
    regions = torch.cat([frozen.regions[: 1 + slots], second, frozen.regions[1 + slots :]])
    block1 = frozen.bucket_hashes[1:2].clone()  # block 1's sketch: block 0's hash, its buckets after block 0's
    block1[:, 2] = block1[:, 1]
    bucket_hashes = torch.cat([frozen.bucket_hashes, block1])
    inner = [f for c in frozen.physical.embedding_bag_configs() for f in c.feature_names]
    return FrozenCafeEmbeddingBagCollection(
        frozen.embedding_bag_configs(),
        inner,
        info,
        frozen.group_bounds.tolist(),
        frozen.hash_table,
        frozen.hash_offsets,
        regions,
        bucket_hashes,
        frozen.physical,
        frozen.is_weighted(),
        multi_level=True,
        multi_block=True,
        kernel=kernel,
    )


@needs_cpp
def test_serving_op_routes_row_wise_blocks_as_its_twin() -> None:
    frozen = freeze(trained(multi_level=True))
    fused, twin = two_blocks(frozen, "cpp"), two_blocks(frozen, "torch")
    gen = torch.Generator().manual_seed(13)
    kjt = batch(gen, 64)
    for variant in variants(kjt, gen).values():
        same_physical_input(fused, twin, variant)
    # block 1 is read: the hashed rows of keys past KEY_SPACE / 2 moved (hot rows did not)
    moved = fused.physical_input(kjt).values() != frozen.physical_input(kjt).values()
    assert int(moved.sum()) >= 10


@pytest.mark.parametrize("kernel", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_frozen_input_errors_name_what_is_wrong(kernel: str) -> None:
    frozen = freeze(trained(weighted=True)).with_kernel(kernel)
    bad = {
        "feature 'f1' has negative lengths": dict(values=torch.tensor([1]), lengths=torch.tensor([2, -1, 0, 0])),
        "lengths sum to 2 but there are 1 ids": dict(values=torch.tensor([1]), lengths=torch.tensor([1, 1, 0, 0])),
        "ids must be int32 or int64": dict(values=torch.tensor([1.0]), lengths=torch.tensor([1, 0, 0, 0])),
        "is weighted but the KeyedJaggedTensor has no weights": dict(
            values=torch.tensor([1]), lengths=torch.tensor([1, 0, 0, 0])
        ),
    }
    for message, parts in bad.items():
        weights = None if "weights" in message else torch.ones(parts["values"].numel())
        with pytest.raises(ValueError, match=message):
            frozen(KeyedJaggedTensor(keys=FEATURES, weights=weights, **parts))


@pytest.mark.parametrize("kernel", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_frozen_takes_a_batch_without_bags(kernel: str) -> None:
    """No bags (batch 0): stock and the training module fail on it (an IndexError in TorchRec);
    the frozen module answers an empty batch with both kernels (the C++ op once read a null
    lengths pointer as offsets)."""
    frozen = freeze(trained()).with_kernel(kernel)
    kjt = KeyedJaggedTensor(
        keys=FEATURES, values=torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(0, dtype=torch.int64), stride=0
    )
    assert frozen(kjt).values().shape == (0, 32)


@pytest.mark.parametrize("kernel", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_frozen_takes_fp16_weights_of_fp16_tables(kernel: str) -> None:
    """Stock requires a weighted FP16 table's weights in float16; FBGEMM's quantized lookup
    takes float32, so the frozen module widens them (exactly)."""
    half = [dataclasses.replace(t, data_type=DataType.FP16) for t in tables()]
    torch.manual_seed(0)
    ebc = CafeEmbeddingBagCollection(half, CafeConfig(compression_ratio=20, seed=5), is_weighted=True).eval()
    kjt = batch(torch.Generator().manual_seed(4), 16, weighted=True)
    kjt = KeyedJaggedTensor(keys=FEATURES, values=kjt.values(), lengths=kjt.lengths(), weights=kjt.weights().half())
    expected = served(ebc, kjt)
    # within float16 rounding: the training module pools in float16, the frozen one in float32
    torch.testing.assert_close(freeze(ebc).with_kernel(kernel)(kjt).values(), expected, rtol=0, atol=2e-3)
    exported = to_embedding_bag_collection(ebc)  # feeds one-id bags with weights in the tables' dtype
    assert set(exported.embedding_bags) == {"t0", "t1", "t2"}


@needs_cpp
def test_a_moved_frozen_module_chooses_its_kernel_again() -> None:
    """The C++ op runs on CPU only: moved to meta (shape work) 'auto' takes the torch-ops twin,
    'cpp' is refused; a move to a device its quantized tables would not follow (FBGEMM's TBE
    stays where TorchRec built it) is refused before anything moves."""
    frozen = freeze(trained())
    assert frozen.kernel == "cpp"
    moved = frozen.to("meta")
    assert moved.kernel == "torch" and {b.device.type for b in moved.buffers()} == {"meta"}
    with pytest.raises(ValueError, match="runs on CPU tensors only"):
        freeze(trained()).with_kernel("cpp").to("meta")
    staying = freeze(trained())
    with pytest.raises(ValueError, match="serves on CPU"):
        # what .cuda() would give (this CPU build cannot make a CUDA tensor; the probe is all it reads)
        staying._apply(lambda t: types.SimpleNamespace(device=torch.device("cuda", 0)))  # type: ignore[arg-type]
    assert staying.feature_info.device.type == "cpu" and staying.kernel == "cpp"


def test_frozen_refuses_what_training_refuses() -> None:
    frozen = freeze(trained())
    bad = KeyedJaggedTensor(
        keys=["f0", "f1", "f2"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 0, 1, 0, 0, 0])
    )
    with pytest.raises(ValueError, match="lacks features"):
        frozen(bad)
    with pytest.raises(ValueError, match="negative lengths"):
        frozen(KeyedJaggedTensor(keys=FEATURES, values=torch.tensor([1]), lengths=torch.tensor([2, -1, 0, 0])))


def test_quantized_tables_track_fp32_and_shrink() -> None:
    ebc = trained(multi_level=True)
    kjt = batch(torch.Generator().manual_seed(3), 32)
    reference = served(ebc, kjt)
    scale = float(reference.abs().max())
    bytes_fp32 = freeze(ebc).nbytes()["weights"]
    for dtype, tolerance in ((torch.float16, 2e-3), (torch.int8, 2e-2), (torch.quint4x2, 0.2)):
        frozen = freeze(ebc, dtype)
        error = float((frozen(kjt).values() - reference).abs().max())
        assert 0 < error <= tolerance * scale, (dtype, error, scale)
    int8 = freeze(ebc, torch.int8).nbytes()["weights"]
    assert int8 * 8 * 4 == bytes_fp32 * (8 + 4)  # dim 8: 8 bytes and an fp16 scale and bias per row


class TinyModel(nn.Module):
    """A CAFE collection, a stock collection and a dense layer, as a DLRM holds them."""

    def __init__(self, cafe: nn.Module, stock: nn.Module) -> None:
        super().__init__()
        self.cafe, self.stock, self.dense = cafe, stock, nn.Linear(8 * 6, 1)

    def forward(self, features: KeyedJaggedTensor, other: KeyedJaggedTensor) -> torch.Tensor:
        return self.dense(torch.cat([self.cafe(features).values(), self.stock(other).values()], dim=1))


def test_torchrec_serving_recipe_quantize_fx_script_export() -> None:
    torch.manual_seed(0)
    stock = EmbeddingBagCollection(
        [EmbeddingBagConfig(name="s0", embedding_dim=8, num_embeddings=50, feature_names=["g0", "g1"])]
    )
    model = TinyModel(trained(multi_level=True), stock).eval()
    gen = torch.Generator().manual_seed(4)
    kjt = batch(gen, 16)
    other = KeyedJaggedTensor(
        keys=["g0", "g1"],
        values=torch.randint(0, 50, (40,), generator=gen),
        lengths=torch.full((32,), 1).index_fill_(0, torch.tensor([0, 9]), 5),
    )
    with torch.no_grad():
        expected = model(kjt, other)
    served_model = quantize_inference_model(model, torch.int8)
    assert isinstance(served_model.cafe, FrozenCafeEmbeddingBagCollection)
    assert (
        type(served_model.stock).__name__ == "QuantizedEmbeddingBagCollection"
        or "quant" in type(served_model.stock).__module__
    )
    eager = served_model(kjt, other)
    torch.testing.assert_close(eager, expected, atol=0.02, rtol=0.05)
    traced = torchrec.fx.symbolic_trace(served_model)
    fused = served_model.cafe.kernel == "cpp"  # the C++ op where it is built, else its twin
    assert ("fused_physical_input" in traced.code) == fused
    scripted = torch.jit.script(traced)
    for name, module in (("fx", traced), ("script", scripted)):
        assert torch.equal(module(kjt, other), eager), name
    # torch.export of the CAFE part, batch size and id count dynamic (the stock part after TorchRec's own
    # quantize_inference_model does not export with this torch and FBGEMM: its TBE holds an fbgemm.AtomicCounter
    # without a fake class); KJT leaves: values, weights, lengths, offsets, strides, inverse indices
    dynamic = [
        {0: torch.export.Dim("ids")},
        None,
        {0: len(FEATURES) * torch.export.Dim("batch", min=2)},
        None,
        None,
        None,
    ]
    exported = torch.export.export(served_model.cafe, (kjt,), strict=False, dynamic_shapes={"features": dynamic})
    assert ("cafe.serving_rows" in str(exported.graph)) == fused
    other_size = batch(gen, 9)
    assert torch.equal(exported.module()(other_size).values(), served_model.cafe(other_size).values())
    with pytest.raises(Exception, match="lacks features"):  # the checks survive scripting
        scripted(KeyedJaggedTensor(keys=["f0"], values=torch.tensor([1]), lengths=torch.tensor([1])), other)


@pytest.mark.parametrize("kernel", ["cpp", "torch"])
@pytest.mark.parametrize("weighted", [False, True])
def test_frozen_multi_level_traces_and_scripts_on_either_kernel(kernel: str, weighted: bool) -> None:
    """The torch-ops kernel (CUDA, or where the C++ ops do not load) once branched on its
    weights in Python, which fx traces as always present."""
    frozen = freeze(trained(multi_level=True, weighted=weighted)).with_kernel(kernel)
    kjt = batch(torch.Generator().manual_seed(6), weighted=weighted)
    eager = frozen(kjt).values()
    traced = torchrec.fx.symbolic_trace(frozen)
    scripted = torch.jit.script(traced)
    assert torch.equal(traced(kjt).values(), eager) and torch.equal(scripted(kjt).values(), eager)


@pytest.mark.parametrize("tracer", [torch.fx.symbolic_trace, torchrec.fx.symbolic_trace])
def test_training_module_traces_with_fx_in_eval(tracer) -> None:
    ebc = trained(multi_level=True, pooling=PoolingType.MEAN)
    graph = tracer(ebc)
    kjt = batch(torch.Generator().manual_seed(5))
    assert torch.equal(graph(kjt).values(), served(ebc, kjt))
    with pytest.raises(ValueError, match="unknown features"):  # the input checks run in the traced graph
        graph(KeyedJaggedTensor(keys=FEATURES + ["x"], values=torch.tensor([1]), lengths=torch.tensor([1, 0, 0, 0, 0])))


@pytest.mark.parametrize("multi_level,pooling", [(False, PoolingType.SUM), (True, PoolingType.MEAN)])
def test_export_to_a_plain_collection_gives_each_id_its_cafe_row(multi_level: bool, pooling: PoolingType) -> None:
    ebc = trained(multi_level, pooling)
    stock = to_embedding_bag_collection(ebc)
    kjt = batch(torch.Generator().manual_seed(6))  # ids in [0, 400): within every table but the plain one
    values = [kjt[f].values() % 10 if f == "f3" else kjt[f].values() for f in FEATURES]  # f3: the plain table
    kjt = KeyedJaggedTensor(keys=FEATURES, values=torch.cat(values), lengths=kjt.lengths())
    torch.testing.assert_close(stock(kjt).values(), served(ebc, kjt), rtol=1e-6, atol=1e-6)
    raw = {"t0": torch.tensor([-7, 10**12, 3]), "t1": torch.tensor([5])}
    listed = to_embedding_bag_collection(ebc, raw)
    positions = KeyedJaggedTensor(
        keys=FEATURES, values=torch.tensor([0, 1, 2, 0, 0, 0]), lengths=torch.tensor([1, 1, 1, 1, 0, 1, 0, 1])
    )
    ids = KeyedJaggedTensor(  # f3 (plain): position 0 is id 0; f2 (t1): position 0 is id 5
        keys=FEATURES, values=torch.tensor([-7, 10**12, 3, -7, 0, 5]), lengths=torch.tensor([1, 1, 1, 1, 0, 1, 0, 1])
    )
    torch.testing.assert_close(listed(positions).values(), served(ebc, ids), rtol=1e-6, atol=1e-6)


def test_warm_start_from_a_stock_state_dict() -> None:
    torch.manual_seed(0)
    stock = EmbeddingBagCollection(tables())
    gen = torch.Generator().manual_seed(7)
    sample = [batch(gen, 32) for _ in range(4)]
    ebc = CafeEmbeddingBagCollection(tables(), CafeConfig(compression_ratio=20, policy="paper", threshold=3.0, seed=5))
    hot = frequent_ids(sample, ebc)
    assert 0 < sum(v.numel() for v in hot.values()) <= ebc.plan.groups[0].hot_rows
    report = warm_start(ebc.eval(), stock.state_dict(), hot)
    assert report[GROUP]["hot"] >= 0.9 * report[GROUP]["given"]
    # hot ids: their stock rows exactly; the others: the mean stock row of the ids sharing their hashed row
    remap, layout = ebc.groups[GROUP], ebc.plan.groups[0]
    salts = ebc.feature_map.salts[GROUP]
    for slot, name, feature in ((0, "t0", "f0"), (1, "t1", "f2")):
        weight = stock.embedding_bags[name].weight.detach()
        ids = torch.arange(weight.shape[0])
        keys = make_keys(ids, torch.full_like(ids, slot), salts)
        is_hot = remap.lookup(keys, count=False).primary < layout.hot_rows
        rows = remap.hashed_rows(keys, 1)
        probe = torch.tensor([int(hot[name][0]), int((~is_hot).nonzero()[0]), int((~is_hot).nonzero()[5])])
        kjt = KeyedJaggedTensor(
            keys=FEATURES,
            values=probe,
            stride=3,
            lengths=torch.cat(
                [
                    torch.ones(3, dtype=torch.int64) if f == feature else torch.zeros(3, dtype=torch.int64)
                    for f in FEATURES
                ]
            ),
        )
        with torch.no_grad():
            out = ebc(kjt)[feature]
        assert bool(is_hot[probe[0]]) and torch.equal(out[0], weight[probe[0]])
        for j in (1, 2):
            members = (~is_hot) & (rows == rows[probe[j]])
            torch.testing.assert_close(out[j], weight[members].mean(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(ebc.physical.embedding_bags["t2"].weight, stock.embedding_bags["t2"].weight)


def test_export_and_frequent_ids_take_what_they_can_and_name_the_rest() -> None:
    """An empty id list exports one zero row (its config's one row); a table name the collection
    lacks, or float ids, raise ValueError naming them; frequent_ids counts only ids a stock table
    holds (warm_start copies their rows) and names features the collection lacks."""
    ebc = trained()
    out = to_embedding_bag_collection(ebc, {"t0": torch.tensor([], dtype=torch.int64)})
    assert out.embedding_bags["t0"].weight.shape == (1, 8) and not out.embedding_bags["t0"].weight.any()
    with pytest.raises(ValueError, match=r"ids name tables \['T0'\]"):
        to_embedding_bag_collection(ebc, {"T0": torch.tensor([1])})
    with pytest.raises(ValueError, match="ids of table 't0' must be a 1-D integer tensor"):
        to_embedding_bag_collection(ebc, {"t0": torch.tensor([1.7, 2.2])})
    values = torch.tensor([7000, -1, 3, 3, 5, 1, 2])  # t0 holds 6000 rows: 7000 and -1 have no stock row
    sample = KeyedJaggedTensor(keys=FEATURES, values=values, lengths=torch.tensor([3, 1, 1, 2]))
    hot = frequent_ids([sample], ebc)
    assert hot["t0"].tolist() == [3] and hot["t1"].tolist() == [1, 2]  # f0 and f1 read t0, f2 reads t1
    warm_start(
        CafeEmbeddingBagCollection(tables(), CafeConfig(compression_ratio=20)),
        EmbeddingBagCollection(tables()).state_dict(),
        hot,
    )
    with pytest.raises(ValueError, match=r"features \['fx'\]"):
        frequent_ids([KeyedJaggedTensor(keys=["fx"], values=torch.tensor([1]), lengths=torch.tensor([1]))], ebc)


def test_a_foreign_state_dict_raises_strict_or_not() -> None:
    ebc = trained()
    stock = EmbeddingBagCollection(tables()).state_dict()
    before = copy.deepcopy(ebc.state_dict())
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"(?s)another layout.*embedding_bags\.t0\.weight.*warm_start"):
            ebc.load_state_dict(stock, strict=strict)
    assert all(torch.equal(before[k], v) for k, v in ebc.state_dict().items())
    parent = nn.ModuleDict({"ebc": ebc})
    with pytest.raises(ValueError, match=r"'ebc\.'"):
        parent.load_state_dict({f"ebc.{k}": v for k, v in stock.items()}, strict=False)
    ebc.load_state_dict(before)  # its own layout still loads, and a partial one without foreign keys too
    ebc.load_state_dict({k: v for k, v in before.items() if k.startswith("physical.")}, strict=False)


def test_a_state_dict_with_a_plain_table_of_another_size_is_refused_before_anything_loads() -> None:
    """A plain table's rows are not in the groups' layout signatures; torch's own size check
    came only after every group's weights and sketch were overwritten."""
    saved = trained().state_dict()
    resized = [dataclasses.replace(t, num_embeddings=20) if t.name == "t2" else t for t in tables()]
    ebc = CafeEmbeddingBagCollection(resized, CafeConfig(compression_ratio=20, policy="paper", threshold=3.0, seed=5))
    before = copy.deepcopy(ebc.state_dict())
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"physical\.embedding_bags\.t2\.weight: \[10, 8\] saved, \[20, 8\] here"):
            ebc.load_state_dict(saved, strict=strict)
    assert all(torch.equal(before[k], v) for k, v in ebc.state_dict().items())


def _sharded_freeze(rank: int, world: int) -> Dict[str, object]:
    from tests.test_sharded import shard

    out: Dict[str, object] = {}
    for sharding_type in ("row_wise", "table_wise"):
        torch.manual_seed(0)
        ebc = CafeEmbeddingBagCollection(
            tables(), CafeConfig(compression_ratio=20, policy="paper", threshold=3.0, seed=5, multi_level=True)
        )
        _apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.1})
        dmp, _, _ = shard(ebc, sharding_type, world)
        gen = torch.Generator().manual_seed(10 + rank)
        for _ in range(6):
            dmp(batch(gen, 32)).values().sum().backward()
        dmp.eval()
        probes = [batch(torch.Generator().manual_seed(100 + r), 16) for r in range(world)]
        with torch.no_grad():
            local = dmp(probes[rank]).to_dict()  # in TorchRec's sharded order: compared by name
        frozen = freeze(dmp.module, torch.float32)
        served_model = quantize_inference_model(dmp, torch.float32)
        out[sharding_type] = {
            "local": local,
            "frozen": [frozen(p).to_dict() for p in probes] if frozen is not None else None,
            "model": [served_model(p).values() for p in probes] if served_model is not None else None,
        }
    return out


def test_freeze_a_dmp_sharded_collection_on_two_ranks() -> None:
    results = run_ranks(_sharded_freeze, 2)
    for sharding_type in ("row_wise", "table_wise"):
        assert results[1][sharding_type]["frozen"] is None and results[1][sharding_type]["model"] is None
        rank0 = results[0][sharding_type]
        for rank in range(2):
            local = results[rank][sharding_type]["local"]
            # row-wise pools each rank's rows apart and sums the partial bags: equal up to float order
            torch.testing.assert_close(
                rank0["frozen"][rank], local, rtol=1e-5, atol=1e-6, msg=f"{sharding_type} {rank}"
            )
            frozen_values = torch.cat(list(rank0["frozen"][rank].values()), dim=1)  # config order
            assert torch.equal(rank0["model"][rank], frozen_values)
