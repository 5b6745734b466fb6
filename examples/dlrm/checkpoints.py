"""Checkpoints of a run: saved whole or not at all, the last K kept, and the one to resume from."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from examples.dlrm.process_group import Dist


def _checkpoints(root: Path) -> List[Path]:
    """The complete checkpoints (step_N) under `root`, oldest first."""
    return sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(
    root: Path, step: int, model: torch.nn.Module, optimizer: Any, meta: Dict[str, Any], keep: int, d: Dist
) -> Path:
    """DCP into a hidden temp dir, then rank 0 renames it: a visible step_N is always complete."""
    import torch.distributed.checkpoint as dcp

    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if d.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "meta": json.dumps(meta)}
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if d.rank == 0:
        if final.exists():  # a rerun over an old directory: move the old one aside first
            old = root / f".old_step_{step:08d}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
        for stale in _checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any) -> Dict[str, Any]:
    """All or nothing: a checkpoint that does not fit raises with the model untouched."""
    from cafe_torchrec.distributed.checkpoint import load_checkpoint_atomically

    return json.loads(load_checkpoint_atomically(model, str(path), optimizer, extra={"meta": ""})["meta"])


def resolve_resume(args: argparse.Namespace) -> Optional[Path]:
    """The checkpoint --resume names (or the latest in --checkpoint-dir); None: start from scratch."""
    if args.resume is None:
        return None
    if args.resume != "latest":
        path = Path(args.resume)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {path}: no such checkpoint directory")
        return path
    found = _checkpoints(Path(args.checkpoint_dir)) if Path(args.checkpoint_dir).is_dir() else []
    return found[-1] if found else None  # nothing yet: start from scratch
