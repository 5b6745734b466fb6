"""This process's place in the job: the process group (torchrun's or a 1-process one) and its device."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This rank, the world, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    created: bool  # this run created the process group (and destroys it)


def _free_port() -> int:
    """A loopback TCP port free right now, for a 1-process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(args: argparse.Namespace) -> Dist:
    """From torchrun's env vars when present, else a 1-process group; NCCL on CUDA, gloo on CPU."""
    use_cuda = torch.cuda.is_available() and not args.cpu
    backend = "nccl" if use_cuda else "gloo"
    created = False
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
        created = True
    else:
        rank, world = 0, 1
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        created = True
    local_rank = int(os.environ.get("LOCAL_RANK", rank if world > 1 else 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return Dist(rank, world, local_rank, local_world, device, created)
