"""CafeEmbeddingBagCollection against the pure-PyTorch reference, inside torchrec's DLRM."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.models.dlrm import DLRM
from torchrec.optim import RowWiseAdagrad

from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection
from tests.helpers import features_of, tables, zipf_kjt
from tests.reference_cafe import ReferenceCafe

DIM, BATCH, STEPS, LR = 8, 16, 25, 0.05


def build(optimizer: str, multi_level: bool, kernel: str = "auto"):
    torch.manual_seed(0)
    tbls = tables([4000, 3000], dim=DIM, features_per_table=[2, 1])
    cfg = CafeConfig(
        compression_ratio=20,
        policy="paper",
        threshold=3.0,
        decay=0.8,
        decay_trigger=0.5,
        multi_level=multi_level,
        seed=7,
    )
    ebc = CafeEmbeddingBagCollection(tbls, cfg, kernel=kernel)
    model = DLRM(
        embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8, DIM], over_arch_layer_sizes=[8, 1]
    )
    layout = ebc.plan.groups[0]
    weight = ebc.physical.embedding_bags[layout.name].weight.detach()
    ref_ebc = ReferenceCafe(tbls, layout, weight, optimizer, LR)
    ref = DLRM(
        embedding_bag_collection=ref_ebc,
        dense_in_features=4,
        dense_arch_layer_sizes=[8, DIM],
        over_arch_layer_sizes=[8, 1],
    )
    ref.dense_arch.load_state_dict(model.dense_arch.state_dict())
    ref.over_arch.load_state_dict(model.over_arch.state_dict())
    opt_cls, kwargs = (
        (torch.optim.SGD, {"lr": LR}) if optimizer == "sgd" else (RowWiseAdagrad, {"lr": LR, "eps": 1e-10})
    )
    _apply_optimizer_in_backward(opt_cls, ebc.parameters(), kwargs)
    return model, ebc, ref, ref_ebc


@pytest.mark.parametrize(
    "optimizer,multi_level,kernel",
    [
        ("sgd", False, "auto"),
        ("rowwise_adagrad", False, "auto"),
        ("sgd", True, "auto"),
        ("rowwise_adagrad", True, "auto"),
        ("rowwise_adagrad", True, "torch"),  # the torch-ops path (the CUDA one) against the same reference
    ],
)
def test_dlrm_training_matches_reference(optimizer: str, multi_level: bool, kernel: str) -> None:
    model, ebc, ref, ref_ebc = build(optimizer, multi_level, kernel)
    dense_opt = torch.optim.SGD([p for n, p in model.named_parameters() if "sparse_arch" not in n], lr=LR)
    ref_opt = torch.optim.SGD([p for n, p in ref.named_parameters() if "sparse_arch" not in n], lr=LR)
    gen = torch.Generator().manual_seed(1)
    group = ebc.groups[ebc.plan.groups[0].name]
    promotions = demotions = medium = 0
    for step in range(STEPS):
        kjt = zipf_kjt(
            features_of(ebc.embedding_bag_configs()), BATCH, 300, gen, max_len=3, offset=0 if step < 15 else 1000
        )
        dense = torch.randn(BATCH, 4, generator=gen)
        labels = torch.randint(0, 2, (BATCH,), generator=gen).float()
        out, ref_out = model(dense, kjt).squeeze(1), ref(dense, kjt).squeeze(1)
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
        for o, opt in ((out, dense_opt), (ref_out, ref_opt)):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(o, labels).backward()
            opt.step()
        ref_ebc.step()
        stats = ebc.stats()[ebc.plan.groups[0].name]
        promotions += stats["promotions"]
        demotions += stats["demotions"]
        medium += sum(t["medium_lookup_share"] > 0 for t in stats["tables"].values())
        assert group.sketch.slot_tags.tolist() == ref_ebc.sketch.tags, f"sketch tags differ at step {step}"
        assert group.sketch.slot_rows.tolist() == ref_ebc.sketch.rows, f"hot rows differ at step {step}"
        torch.testing.assert_close(group.sketch.slot_scores, torch.tensor(ref_ebc.sketch.scores), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(group.sketch.slot_errors, torch.tensor(ref_ebc.sketch.errors), rtol=1e-4, atol=1e-4)
        weight = ebc.physical.embedding_bags[ebc.plan.groups[0].name].weight
        torch.testing.assert_close(weight, ref_ebc.weight.detach(), rtol=1e-4, atol=1e-5)
    assert promotions > 10 and demotions > 0, (promotions, demotions)
    assert medium > 0 or not multi_level
