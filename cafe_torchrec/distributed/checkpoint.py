"""Load a DCP checkpoint all or nothing.

torch.distributed.checkpoint reads into the tensors of the state dict it is given; a
truncated file or a checkpoint of another world size or layout then fails half way, with
some weights already overwritten. This loads into copies first and touches the model (and
optimizer) only when every read and check succeeded.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from cafe_torchrec._torchrec_compat import is_sharded_tensor


def load_checkpoint_atomically(
    model: nn.Module, checkpoint_id: str, optimizer: Optional[Any] = None, extra: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """Read `checkpoint_id` into copies of model (and optimizer) state, then apply it.

    Raises what DCP or the modules' own checks raise (e.g. a CAFE layout mismatch) with the
    model and optimizer unchanged. Returns the loaded `extra` entries (e.g. metadata)."""
    state: Dict[str, Any] = {"model": copy.deepcopy(model.state_dict())}
    if optimizer is not None:
        optim_state = optimizer.state_dict()
        if optim_state.get("state"):
            state["optim"] = copy.deepcopy(optim_state)
    # Stateful extras: DCP reads their state_dict, and their load_state_dict runs with the checks
    # below (inside dcp.load it ran after DCP's last collective: an error on one rank left the
    # others waiting in _agree's all_gather_object)
    stateful = {k: v for k, v in (extra or {}).items() if isinstance(v, Stateful)}
    state.update({k: v.state_dict() if k in stateful else v for k, v in (extra or {}).items()})
    try:
        dcp.load(state, checkpoint_id=checkpoint_id)
    except CheckpointException as err:  # a BaseException: make it an ordinary, readable error
        # DCP keeps each failure as (exception, stack): the exception says what went wrong
        failures = "; ".join(
            f"rank {rank}: {exc[0] if isinstance(exc, tuple) else exc}"
            for rank, exc in sorted(err.failures.items())[:2]
        )
        raise ValueError(f"checkpoint {checkpoint_id} does not fit this model ({failures})") from None
    try:
        _check_model_state(model, state["model"])
        for key, obj in stateful.items():
            obj.load_state_dict(state[key])
        refusal = None
    except Exception as err:  # noqa: BLE001 - any rank-local failure: every rank must hear of it
        refusal = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
    _agree(refusal, checkpoint_id)
    with torch.no_grad():
        model.load_state_dict(state["model"])
        if optimizer is not None and "optim" in state:
            optimizer.load_state_dict(state["optim"])
    return {k: stateful.get(k, state[k]) for k in (extra or {})}


def _agree(refusal: Optional[str], checkpoint_id: str) -> None:
    """Raise on every rank when any rank refused: a rank checks only the groups it holds (a
    table-wise group lives on one rank), and the others must not apply a checkpoint it refused."""
    refusals = [refusal]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        refusals = [None] * dist.get_world_size()
        dist.all_gather_object(refusals, refusal)
    failed = [(rank, msg) for rank, msg in enumerate(refusals) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise ValueError(f"checkpoint {checkpoint_id} refused (rank {rank}: {msg})")


def _check_model_state(model: nn.Module, loaded: Dict[str, Any]) -> None:
    """Compare every CAFE layout signature with the loaded one before touching anything (DCP
    has already refused tensors of another shape)."""
    current = model.state_dict()
    for key, saved in loaded.items():
        if not key.endswith("layout_signature"):
            continue
        mine, theirs = _local(current[key]), _local(saved)
        if mine is not None and theirs is not None and not torch.equal(mine.cpu(), theirs.cpu()):
            raise ValueError(
                f"checkpoint layout {key} is {theirs.tolist()}, this model's is {mine.tolist()}: "
                "it was saved from a different CAFE config or world size"
            )


def _local(value: Any) -> Optional[torch.Tensor]:
    """This rank's tensor of a plain or sharded state entry (None where it holds no shard)."""
    if is_sharded_tensor(value):
        shards = value.local_shards()
        return shards[0].tensor if shards else None
    return value
