"""Per-occurrence importance from the pooled-output gradient (no per-row gradients needed).

For SUM pooling an occurrence's embedding gradient is exactly its bag's pooled-output
gradient (times the per-sample weight when weighted); MEAN is handled by the module, which
pools with SUM and divides afterwards, so the gradient seen here is already divided by the
bag length. Scores are normalised per feature and batch to mean 1, as in the paper.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from cafe_torchrec.ops import resolve_kernel


def occurrence_scores(
    grad: torch.Tensor,
    columns: Tuple[int, int],
    lengths: torch.Tensor,
    num_features: int,
    weights: Optional[torch.Tensor],
    mode: str,
    kernel: str = "auto",
) -> torch.Tensor:
    """Scores [N] for the occurrences of `num_features` features, feature-major like a KJT.

    grad [B, C]: gradient of a pooled output whose `columns` hold the features' pooled
    values (feature by feature); lengths [F*B]: bag lengths, feature-major; weights [N] or None;
    mode "gradient" or "frequency"; kernel: the group's kernel choice (ops.resolve_kernel):
    "cpp" runs the C++ op on float32 gradients, "torch" torch_occurrence_scores.
    """
    if mode == "frequency":
        return torch.ones(int(lengths.sum()), dtype=torch.float32, device=lengths.device)
    if resolve_kernel(kernel, grad.device) == "cpp" and grad.dtype == torch.float32:
        dim = (columns[1] - columns[0]) // max(num_features, 1)
        empty = grad.new_empty(0)
        return torch.ops.cafe.occurrence_scores(
            grad, columns[0], num_features, dim, lengths, weights if weights is not None else empty
        )
    return torch_occurrence_scores(grad, columns, lengths, num_features, weights)


def torch_occurrence_scores(
    grad: torch.Tensor,
    columns: Tuple[int, int],
    lengths: torch.Tensor,
    num_features: int,
    weights: Optional[torch.Tensor],
) -> torch.Tensor:
    """The gradient scores of occurrence_scores in torch ops (any device): the twin of the C++ op."""
    pooled_grad = grad[:, columns[0] : columns[1]]
    batch = pooled_grad.shape[0]
    per_feature = lengths.view(num_features, batch).sum(1)  # [F]
    norms = torch.linalg.vector_norm(pooled_grad.view(batch, num_features, -1).float(), dim=2)  # [B, F]
    scores = norms.t().reshape(-1).repeat_interleave(lengths)  # [N]
    if weights is not None:
        scores = scores * weights.abs().float()
    feature_of = torch.arange(num_features, device=lengths.device).repeat_interleave(per_feature)
    total = torch.zeros(num_features, dtype=torch.float32, device=lengths.device).index_add_(0, feature_of, scores)
    mean = total / per_feature.clamp(min=1)
    # a feature whose gradients are all zero gets zero scores (nothing to rank), not NaN; one with
    # a NaN gradient (a NaN mean) too, but for that bag's occurrences, which stay NaN (x * 0) and
    # are skipped by the insert, as in the C++ op; an inf one gives an inf mean: x / inf, the same
    return torch.where(mean[feature_of] > 0, scores / mean[feature_of], scores * 0.0)
