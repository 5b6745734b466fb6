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


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, run: Dict[str, Any]) -> Dict[str, Any]:
    """All or nothing: a checkpoint that does not fit raises with the model untouched; so does one
    saved by a run with other `run` flags (train.RUN_FLAGS and the world size), checked first."""
    import torch.distributed.checkpoint as dcp

    from cafe_torchrec.distributed.checkpoint import load_checkpoint_atomically

    saved: Dict[str, Any] = {"meta": ""}
    dcp.load(saved, checkpoint_id=str(path))  # the metadata alone
    check_run(path, json.loads(saved["meta"]).get("run"), run)
    return json.loads(load_checkpoint_atomically(model, str(path), optimizer, extra={"meta": ""})["meta"])


def check_run(path: Path, saved: Optional[Dict[str, Any]], run: Dict[str, Any]) -> None:
    """ValueError naming every run flag whose value differs from the checkpoint's: another batch
    size, world size or data would read other batches from the resumed step, another optimizer
    would drop its state. A checkpoint from before the flags were saved is not checked (said)."""
    if saved is None:
        print(f"[train] {path} does not record its run's flags (an older checkpoint): not checked", flush=True)
        return
    now = json.loads(json.dumps(run))  # as the checkpoint holds them (tuples as lists)
    changed = [
        f"{'world size' if k == 'world_size' else '--' + k.replace('_', '-')} {saved.get(k)!r} there, {v!r} here"
        for k, v in now.items()
        if saved.get(k) != v
    ]
    if changed:
        raise ValueError(
            f"checkpoint {path} was saved by a run with other flags: {'; '.join(changed)}; a resume keeps "
            "them (another batch size, world size or data would read other batches, another optimizer drop its state)"
        )


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
    if not found:  # nothing yet: start from scratch, and say so (a mistyped directory looks the same)
        print(f"[train] --resume: no checkpoint under {args.checkpoint_dir}: starting from step 0", flush=True)
    return found[-1] if found else None
