"""TorchRec's reference DLRM trainer's calls with CAFE swapped in (issue #22, "Real clients").

examples/torchrec_dlrm/smoke.py makes the calls of facebookresearch/dlrm's
torchrec_dlrm/dlrm_main.py, in its order, with CafeEmbeddingBagCollection and its sharder in
place of the stock ones; here it runs on 2 gloo ranks in the trainer's one-hot mode (DLRM, SGD)
and its DCN + multi-hot mode (DLRM_DCN, Adagrad), whose int32 ids the collection once refused.
"""

from __future__ import annotations

import math
from typing import Any, Dict

from examples.torchrec_dlrm import smoke
from tests.dist_utils import run_ranks

# The id / length / offset dtypes each mode's batches carry in the reference trainer.
REFERENCE_DTYPES = {
    "one_hot": {"ids": "torch.int64", "lengths": "torch.int32", "offsets": "torch.int32"},  # RandomRecDataset
    "dcn_multi_hot": {"ids": "torch.int32", "lengths": "torch.int64", "offsets": "torch.int64"},  # its Multihot
}


def both_modes(rank: int, world: int) -> Dict[str, Any]:
    return {mode: smoke.run(smoke.SmokeConfig.for_mode(mode)) for mode in smoke.MODES}


def test_reference_trainer_calls_train_cafe_in_both_modes() -> None:
    results = run_ranks(both_modes, 2)
    for mode in smoke.MODES:
        runs = [r[mode] for r in results]
        cfg = smoke.SmokeConfig.for_mode(mode)
        for r in runs:
            assert r["sharded_type"] == "ShardedCafeEmbeddingBagCollection", mode
            assert "cafe_dim16" in r["plan"], (mode, r["plan"])
            # every batch of the three stages reached the CAFE collection with the reference's dtypes
            assert len(r["input_dtypes"]) == cfg.train_batches + 2 * cfg.eval_batches, mode
            assert all(d == REFERENCE_DTYPES[mode] for d in r["input_dtypes"]), (mode, r["input_dtypes"][:2])
            losses = r["losses"]
            assert len(losses) == cfg.train_batches and all(math.isfinite(x) for x in losses), mode
            first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
            assert last < first - 0.2, (mode, first, last)
            # the warmup scheduler ran to its end: every param group (fused and dense) is at the full rate
            assert all(math.isclose(lr, cfg.learning_rate, rel_tol=1e-6) for lr in r["lr"]), (mode, r["lr"])
        # the AUROC is computed over both ranks' samples, so every rank reports the same one
        for stage in ("val", "test"):
            aucs = {r[stage]["auc"] for r in runs}
            assert len(aucs) == 1 and next(iter(aucs)) > 0.8, (mode, stage, aucs)
        assert runs[0]["test"]["samples"] == 2 * cfg.eval_batches * cfg.batch_size, mode
        promotions = sum(s.get("promotions", 0) for r in runs for s in r["stats"].values())
        assert promotions > 0, (mode, [r["stats"] for r in runs])
