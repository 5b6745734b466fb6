"""The train pipeline a method can run under, and how to point it at a new batch iterator."""

from __future__ import annotations

from typing import Any

import torch


def make_pipeline(pipelined: bool, model: torch.nn.Module, optimizer: Any, device: torch.device) -> Any:
    """TrainPipelineSparseDist when the collection is sharded whole (CAFE, stock tables), else TrainPipelineBase.

    A baseline wraps its sharded tables in Python that transforms the ids (and is not
    fx-traceable), so TrainPipelineSparseDist cannot pipeline (or even trace) it.
    """
    from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist

    if pipelined:
        return TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)
    return TrainPipelineBase(model, optimizer, device)


def restart(pipeline: Any) -> None:
    """Before a new iterator: TrainPipelineSparseDist switches by itself, TrainPipelineBase needs reset()."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    if not isinstance(pipeline, TrainPipelineSparseDist):
        pipeline.reset()
