"""TorchX component of the DLRM example: `train` wraps `dist.ddp` around examples/dlrm/train.py.

    torchx run -s local_cwd examples/dlrm/component.py:train --nproc 2 -- --embedding cafe ...

runs 2 processes on CPU (gloo); `--gpu 1` (one GPU per process) makes the same script use
NCCL on cuda:LOCAL_RANK. Run it from the repository root (local_cwd runs in the current
directory) with the venv's bin first on PATH (the scheduler runs `torchrun` from PATH).
"""

from typing import Dict, Optional

import torchx
import torchx.specs as specs
from torchx.components import dist as dist_components

SCRIPT = "examples/dlrm/train.py"


def train(
    *script_args: str,
    nproc: int = 2,
    nnodes: int = 1,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    name: str = "cafe-dlrm",
    image: str = torchx.IMAGE,
    max_retries: int = 0,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """DLRM with a CAFE (or baseline) embedding collection, trained by torchrun on nnodes x nproc workers.

    Args:
        script_args: arguments of examples/dlrm/train.py (after `--`)
        nproc: worker processes per node
        nnodes: nodes
        cpu: CPUs per node (resource request; local schedulers ignore it)
        gpu: GPUs per node; > 0 runs on CUDA with NCCL (use gpu = nproc)
        memMB: memory per node in MB (resource request)
        name: job name
        image: image (container schedulers); local_cwd uses the current directory
        max_retries: job retries on failure
        env: extra environment variables of the workers
        rdzv_port: rendezvous port (multi-node)
    """
    workers_env = {"PYTHONUNBUFFERED": "1", "LOGLEVEL": "WARNING"}
    workers_env.update(env or {})
    return dist_components.ddp(
        *script_args,
        script=SCRIPT,
        image=image,
        name=name,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc}",
        env=workers_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
    )
