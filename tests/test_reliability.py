"""Bad input and long life: clear errors, documented behaviour, state never half updated."""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from benchmarks.soak import SoakConfig, soak
from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection
from tests.helpers import features_of, tables, zipf_kjt
from tests.test_cafe_module import make


def state_of(ebc) -> dict:
    return copy.deepcopy(ebc.state_dict())


def unchanged(ebc, before: dict) -> bool:
    return all(torch.equal(before[k], v) for k, v in ebc.state_dict().items())


def test_negative_lengths_and_float_ids_are_refused_untouched() -> None:
    ebc = make()
    before = state_of(ebc)
    bad_lengths = KeyedJaggedTensor(keys=["f0", "f1"], values=torch.tensor([1, 2]), lengths=torch.tensor([2, -1, 1, 0]))
    with pytest.raises(ValueError, match="negative lengths"):
        ebc(bad_lengths)
    floats = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=torch.tensor([1.0, 2.0]), lengths=torch.tensor([1, 1])
    )
    with pytest.raises(ValueError, match="int64"):
        ebc(floats)
    assert unchanged(ebc, before)


def test_negative_and_out_of_range_ids_are_hashed_like_any_id() -> None:
    ebc = make().eval()
    ids = torch.tensor([-5, 2**62, 7, -(2**63)])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=torch.cat([ids, ids]), lengths=torch.ones(8, dtype=torch.int64)
    )
    out = ebc(kjt)
    assert torch.isfinite(out.values()).all()
    keys = ebc.keys("f0", ids)
    assert (keys >= 0).all() and keys.unique().numel() == 4  # distinct ids, distinct keys


def test_huge_bag() -> None:
    ebc = make()
    values = torch.randint(0, 10**12, (200_000,))
    kjt = KeyedJaggedTensor(keys=["f0", "f1"], values=values, lengths=torch.tensor([199_999, 1, 0, 0]))
    out = ebc(kjt)
    out.values().sum().backward()
    assert out.values().shape == (2, 16) and torch.isfinite(out.values()).all()


def test_nan_gradients_never_reach_the_sketch_as_nan() -> None:
    ebc = make()
    group = ebc.groups[ebc.plan.groups[0].name]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.ones(4, dtype=torch.int64)
    )
    (ebc(kjt).values() * float("nan")).sum().backward()
    (ebc(kjt).values() * float("inf")).sum().backward()
    assert torch.isfinite(group.sketch.slot_scores).all()
    assert torch.isfinite(group.sketch.total_score).all()


def test_long_drifting_stream_keeps_the_sketch_invariants() -> None:
    """A shortened soak (benchmarks/soak.py runs 1M steps): every check inside soak() asserts
    rows assigned + free == capacity, no row owned twice, finite bounded scores, bounded
    migrations per step."""
    report = soak(SoakConfig(steps=4_000, batch=256, check_every=100))
    assert report["promotions"] > 500 and report["demotions"] > 300  # it really churned
    assert report["max_migrations_per_step"] <= report["capacity"]


def weighted_collection() -> CafeEmbeddingBagCollection:
    """A plain table listed before a CAFE group: the inner feature order differs from the input's,
    so a permute reads the weights (where weights shorter than the ids once read past their end)."""
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=50, feature_names=["f1"]),
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=100_000, feature_names=["f0"]),
    ]
    ebc = CafeEmbeddingBagCollection(tables, CafeConfig(compression_ratio=10.0), is_weighted=True)
    _apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.1})
    return ebc


@pytest.mark.parametrize(
    "weights, message",
    [
        (torch.ones(4), "4 per-sample weights for 12 ids"),  # stock: RuntimeError (split_with_sizes)
        (torch.ones(13), "13 per-sample weights for 12 ids"),
        (torch.ones(12, 1), "1-D floating point"),
        (torch.ones(12, dtype=torch.int64), "1-D floating point"),
        (torch.ones(12, dtype=torch.float64), "float64 .* tables \\['cafe_dim8', 't1'\\] hold float32"),
    ],
)
def test_weights_that_do_not_fit_are_refused_before_anything_changes(weights: torch.Tensor, message: str) -> None:
    ebc = weighted_collection()
    before, stats = state_of(ebc), copy.deepcopy(ebc.stats())
    values = torch.arange(1, 13)
    kjt = KeyedJaggedTensor(keys=["f1", "f0"], values=values, lengths=torch.tensor([1, 1, 5, 5]), weights=weights)
    with pytest.raises(ValueError, match=message):
        ebc(kjt)
    assert unchanged(ebc, before) and ebc.stats() == stats
    ok = KeyedJaggedTensor(keys=["f1", "f0"], values=values, lengths=torch.tensor([1, 1, 5, 5]), weights=torch.ones(12))
    ebc(ok).values().sum().backward()  # the same collection still trains on weights that fit


def test_a_tensordict_input_means_what_it_means_to_the_stock_collection() -> None:
    """Stock EmbeddingBagCollection takes a TensorDict of jagged nested tensors (maybe_td_to_kjt)."""
    ebc = make().eval()
    lengths = {"f0": torch.tensor([2, 1, 0]), "f1": torch.tensor([1, 1, 3])}
    ids = {"f0": torch.tensor([5, 6, 7]), "f1": torch.tensor([8, 9, 10, 11, 12])}
    td = TensorDict(
        {f: torch.nested.nested_tensor_from_jagged(ids[f], lengths=lengths[f]) for f in ("f1", "f0")}, batch_size=[3]
    )
    kjt = KeyedJaggedTensor(
        keys=["f1", "f0"], values=torch.cat([ids["f1"], ids["f0"]]), lengths=torch.cat([lengths["f1"], lengths["f0"]])
    )
    got, want = ebc(td).to_dict(), ebc(kjt).to_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[f], want[f]) for f in want)


def _build(device: str = "cpu", **cfg) -> CafeEmbeddingBagCollection:
    config = CafeConfig(compression_ratio=20, seed=1, multi_level=True, **cfg)
    return CafeEmbeddingBagCollection(tables((5000, 3000)), config, device=torch.device(device))


def _trained_default() -> CafeEmbeddingBagCollection:
    torch.manual_seed(0)
    ebc = _build()
    _apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.1})
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        ebc(zipf_kjt(features_of(tables((5000, 3000))), 128, 5000, gen, max_len=3)).values().sum().backward()
    return ebc


def test_a_meta_module_materialised_then_loaded_serves_and_counts_as_the_saved_one() -> None:
    """to_empty leaves uninitialised memory; what is derived from the layout (each table's
    regions) and the counters, which no checkpoint holds, must not come from it."""
    saved = _trained_default()
    module = _build("meta")
    module.to_empty(device="cpu")
    with torch.no_grad():
        for buffer in module.buffers():  # what uninitialised memory may hold
            buffer.fill_(float("nan") if buffer.is_floating_point() else 7)
    module.load_state_dict(saved.state_dict())
    probe = zipf_kjt(features_of(tables((5000, 3000))), 64, 5000, torch.Generator().manual_seed(9), max_len=3)
    with torch.no_grad():
        assert torch.equal(module.eval()(probe).values(), saved.eval()(probe).values())
    assert all(entry.get("lookups", 0) == 0 for entry in module.stats().values())


def test_reset_parameters_after_to_empty_builds_what_the_constructor_builds() -> None:
    """TorchRec's init_parameters (to_empty, then every submodule's reset_parameters) on a module
    built on the meta device; the inner stock collection's own reset skips its meta-built tables."""
    from torchrec.distributed.utils import init_parameters

    torch.manual_seed(0)
    fresh = _build()
    module = _build("meta")
    torch.manual_seed(0)
    init_parameters(module, torch.device("cpu"))
    mine, want = module.state_dict(), fresh.state_dict()
    assert mine.keys() == want.keys() and all(torch.equal(mine[k], want[k]) for k in want)


def test_a_dtype_cast_leaves_the_sketch_bookkeeping_as_it_was() -> None:
    ebc = _trained_default()
    sketch = ebc.groups[ebc.plan.groups[0].name].sketch
    kept = {name: getattr(sketch, name).clone() for name in ("total_score", "medium_level", "decayed_occurrences")}
    kept["row_marks"] = sketch.row_marks.clone()
    ebc.double()
    assert ebc.physical.embedding_bags[ebc.plan.groups[0].name].weight.dtype == torch.float64  # the tables cast
    for name, before in kept.items():
        after = getattr(sketch, name)
        assert after.dtype == before.dtype and torch.equal(after, before), name
    gen = torch.Generator().manual_seed(4)
    ebc.train()(zipf_kjt(features_of(tables((5000, 3000))), 64, 5000, gen, max_len=3)).values().sum().backward()


def test_the_paper_policys_medium_level_follows_the_config_a_checkpoint_is_loaded_into() -> None:
    """Under the paper's policy the medium level is threshold x medium_share, a constant of the
    config (neither is in the layout signature); a checkpoint's must not override it."""
    saved = make(multi_level=True, threshold=3.0, medium_share=0.2)
    loaded = make(multi_level=True, threshold=3.0, medium_share=0.5)
    loaded.load_state_dict(saved.state_dict())
    sketch = loaded.groups[loaded.plan.groups[0].name].sketch
    assert sketch.medium_threshold == pytest.approx(1.5)
    state = loaded.state_dict()  # the same written in place, as dcp.load does
    for key, value in saved.state_dict().items():
        state[key].copy_(value)
    assert sketch.medium_threshold == pytest.approx(1.5)


def test_state_written_in_place_as_dcp_load_does_is_used_and_checked() -> None:
    """dcp.load writes into model.state_dict()'s tensors, which are the module's own; without a
    load_state_dict after it, the next lookup still hashes with the loaded seed and checks the
    layout signature the checkpoint left."""
    saved = make(seed=1)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        saved(zipf_kjt(["f0", "f1"], 64, 3000, gen, max_len=2)).values().sum().backward()
    probe = zipf_kjt(["f0", "f1"], 32, 3000, torch.Generator().manual_seed(8), max_len=2)
    for seed, fits in ((1, True), (2, False)):
        module = make(seed=seed)
        state = module.state_dict()
        for key, value in saved.state_dict().items():
            state[key].copy_(value)
        if fits:
            with torch.no_grad():
                assert torch.equal(module.eval()(probe).values(), saved.eval()(probe).values())
        else:
            with pytest.raises(ValueError, match="another layout"):
                module(probe)


def test_weights_of_the_tables_dtype_after_a_module_cast() -> None:
    ebc = weighted_collection().double()
    values, lengths = torch.arange(1, 13), torch.tensor([1, 1, 5, 5])
    ebc(
        KeyedJaggedTensor(
            keys=["f1", "f0"], values=values, lengths=lengths, weights=torch.ones(12, dtype=torch.float64)
        )
    )
    stats = copy.deepcopy(ebc.stats())
    with pytest.raises(ValueError, match="float32 but tables"):
        ebc(KeyedJaggedTensor(keys=["f1", "f0"], values=values, lengths=lengths, weights=torch.ones(12)))
    assert ebc.stats() == stats


def test_a_checkpoint_of_another_layout_is_refused_naming_what_differs() -> None:
    from cafe_torchrec.remap import _FORMAT, check_layout, layout_signature

    layout = make().groups["cafe_dim8"].layout
    mine = layout_signature(layout)
    other_seed = mine.clone()
    other_seed[5] += 1
    with pytest.raises(ValueError, match=r"another layout: seed \d+ saved, \d+ here;"):
        check_layout(layout, other_seed)
    older = torch.cat([torch.tensor([_FORMAT - 3]), mine[1:-1]])  # an older format, laid out otherwise
    with pytest.raises(ValueError, match=f"another layout: format {_FORMAT - 3} saved, {_FORMAT} here;"):
        check_layout(layout, older)
