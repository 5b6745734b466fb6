"""quantize_inference_model: TorchRec's function of that name, for models with CAFE collections.

TorchRec's own swaps every stock EmbeddingBagCollection for its QuantEmbeddingBagCollection;
on a CAFE collection it would quantize only the inner physical tables and keep the sketch and
the training module. This one first swaps every CAFE collection for its frozen form (freeze),
then hands the model to TorchRec's function for the stock collections. Then, as TorchRec's
recipe goes: torchrec.fx.symbolic_trace, torch.jit.script (of the traced module), or
torch.export.export.
"""

from __future__ import annotations

from typing import Dict, Optional, cast

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardedModule
from torchrec.inference.modules import quantize_inference_model as torchrec_quantize_inference_model

from cafe_torchrec._torchrec_compat import module_with_children
from cafe_torchrec.inference.freeze import freeze
from cafe_torchrec.modules import CafeEmbeddingBagCollection


def quantize_inference_model(
    model: nn.Module, dtype: torch.dtype = torch.int8, output_dtype: torch.dtype = torch.float
) -> Optional[nn.Module]:
    """The model for serving: every CAFE collection frozen with physical tables in `dtype`
    (torch.float32, float16, int8, quint4x2), then TorchRec's quantize_inference_model with
    `dtype` for the stock collections.

    Unsharded, the model is changed in place and returned (as TorchRec's function does). A
    DistributedModelParallel model is gathered: call this on every rank (the sharded CAFE
    collections freeze collectively); rank 0 gets a new unsharded model sharing the dense
    modules, the DMP model stays as it was, and the other ranks get None. A sharded stock
    collection has no gathering here: ValueError naming it, before anything runs."""
    from cafe_torchrec.distributed.sharded import ShardedCafeEmbeddingBagCollection

    sharded = isinstance(model, DistributedModelParallel)
    root = cast(nn.Module, model.module) if sharded else model
    cafe_types = (CafeEmbeddingBagCollection, ShardedCafeEmbeddingBagCollection)
    targets = [(path, m) for path, m in root.named_modules() if isinstance(m, cafe_types)]
    inside = [p for p, _ in targets]
    others = [
        path
        for path, m in root.named_modules()
        if isinstance(m, ShardedModule) and not isinstance(m, cafe_types) and not any(_below(path, p) for p in inside)
    ]
    if others:
        raise ValueError(
            f"quantize_inference_model gathers sharded CAFE collections only; {others} are sharded "
            "stock modules (gather them with TorchRec, e.g. shard_quant_model for serving)"
        )
    frozen: Dict[str, nn.Module] = {}
    for path, module in targets:  # the same order on every rank: the sharded ones gather collectively
        result = freeze(module, dtype)
        if result is not None:
            frozen[path] = result
    if sharded and dist.get_rank() != 0:
        return None
    root = module_with_children(root, frozen) if sharded else _replaced_in_place(root, frozen)
    return torchrec_quantize_inference_model(root, quantization_dtype=dtype, output_dtype=output_dtype)


def _below(path: str, parent: str) -> bool:
    """Whether module path `path` lies strictly below `parent` ("" is the root)."""
    return path != parent and (parent == "" or path.startswith(parent + "."))


def _replaced_in_place(root: nn.Module, replacements: Dict[str, nn.Module]) -> nn.Module:
    """`root` with the submodule at each path replaced (the root itself if its path is "")."""
    if "" in replacements:
        return replacements[""]
    for path, module in replacements.items():
        parent, _, name = path.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, name, module)
    return root
