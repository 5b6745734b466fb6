"""Run a function on N real gloo processes and collect what each returns."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> List[Any]:
    """fn(rank, world, *args) on `world` spawned processes; returns the per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(
                _worker, args=(world, free_port(), out_dir, fn, args), nprocs=world, start_method="spawn"
            )
        except ProcessException:  # the per-rank files below say which rank failed and why
            pass
        results, errors = [], []
        for rank in range(world):
            path = os.path.join(out_dir, f"{rank}.pt")
            got = torch.load(path, weights_only=False) if os.path.exists(path) else {"error": "died without a result"}
            if "error" in got:  # every rank's: the first is often a peer's lost connection
                errors.append(f"rank {rank} failed:\n{got['error']}")
            else:
                results.append(got["ok"])
        if errors:
            raise AssertionError("\n".join(errors))
        return results
