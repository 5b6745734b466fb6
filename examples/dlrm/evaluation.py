"""What a run measures: test AUC and log loss over every rank's batches, and CAFE's hot-lookup counts."""

from __future__ import annotations

import weakref
from typing import Any, Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.datasets.utils import Batch

from examples.dlrm.pipeline import restart


def gather_cat(t: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate a 1-D tensor of every rank (sizes may differ) on every rank."""
    if world == 1:
        return t
    n = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    padded = torch.zeros(top, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def evaluate(pipeline: Any, model: torch.nn.Module, batches: Iterator[Batch], world: int) -> Dict[str, float]:
    """AUC and log loss over every rank's test batches; eval() + no_grad, so sketches do not move."""
    from torchmetrics.classification import BinaryAUROC

    model.eval()
    restart(pipeline)
    preds, labels = [], []
    try:
        with torch.no_grad():
            while True:
                try:
                    _, logits, batch_labels = pipeline.progress(batches)
                except StopIteration:
                    break
                preds.append(torch.sigmoid(logits.float()).reshape(-1))
                labels.append(batch_labels.float().reshape(-1))
    finally:
        model.train()
    device = next(model.parameters()).device
    p = gather_cat(torch.cat(preds) if preds else torch.zeros(0, device=device), world).cpu().double()
    y = gather_cat(torch.cat(labels) if labels else torch.zeros(0, device=device), world).cpu().double()
    if p.numel() == 0:
        raise RuntimeError("evaluation saw no test batches")
    auroc = BinaryAUROC()
    auroc.update(p, y.long())
    auc = float(auroc.compute())
    log_loss = float(F.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y))
    return {"auc": auc, "log_loss": log_loss, "samples": int(p.numel()), "ctr": float(y.mean())}


def cafe_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The sharded CAFE collections inside `model` (whose stats() give the hot-lookup counts)."""
    from cafe_torchrec.distributed import ShardedCafeEmbeddingBagCollection

    return [m for m in model.modules() if isinstance(m, ShardedCafeEmbeddingBagCollection)]


_last_stats: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[str, Dict[str, Any]]]" = weakref.WeakKeyDictionary()


def hot_counts(modules: List[torch.nn.Module]) -> Tuple[float, float]:
    """(hot lookups, lookups) on this rank since the previous call for the same collections
    (their stats() counters are monotonic; the interval comes from stats_interval)."""
    from cafe_torchrec.stats import stats_interval

    hot = lookups = 0.0
    for m in modules:
        now = m.stats()
        for entry in stats_interval(now, _last_stats.get(m, {})).values():
            if not entry.get("uncompressed"):
                lookups += entry["lookups"]
                hot += entry["hot_lookups"]
        _last_stats[m] = now
    return hot, lookups
