"""The DLRM around the embedding collection, and the optimizers that train it."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Tuple

import torch

from examples.dlrm.args import comma_ints

NUM_DENSE = 13  # Criteo's dense features


def build_model(args: argparse.Namespace, spec: Any, device: torch.device) -> torch.nn.Module:
    """DLRMTrain(DLRM | DLRM_DCN) over `spec.module`, with the arch sizes the flags give."""
    from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

    dense = comma_ints(args.dense_arch) if args.dense_arch else [64, args.embedding_dim]
    over = comma_ints(args.over_arch)
    if dense[-1] != args.embedding_dim:
        raise ValueError(f"--dense-arch must end with the embedding dim {args.embedding_dim}, got {dense}")
    if over[-1] != 1:
        raise ValueError(f"--over-arch must end with 1 (the logit), got {over}")
    if args.interaction == "dcn":
        model = DLRM_DCN(
            embedding_bag_collection=spec.module,
            dense_in_features=NUM_DENSE,
            dense_arch_layer_sizes=dense,
            over_arch_layer_sizes=over,
            dcn_num_layers=args.dcn_num_layers,
            dcn_low_rank_dim=args.dcn_low_rank_dim,
            dense_device=device,
        )
    else:
        model = DLRM(
            embedding_bag_collection=spec.module,
            dense_in_features=NUM_DENSE,
            dense_arch_layer_sizes=dense,
            over_arch_layer_sizes=over,
            dense_device=device,
        )
    return DLRMTrain(model)


def embedding_optimizer(args: argparse.Namespace) -> Tuple[type, Dict[str, Any]]:
    """(class, kwargs) of the embedding optimizer, fused into the backward pass."""
    from torchrec.optim import RowWiseAdagrad

    if args.optimizer == "sgd":
        return torch.optim.SGD, {"lr": args.learning_rate}
    if args.optimizer == "adagrad":
        return torch.optim.Adagrad, {"lr": args.learning_rate}
    return RowWiseAdagrad, {"lr": args.learning_rate}


def dense_optimizer_factory(args: argparse.Namespace) -> Callable:
    """params -> the dense optimizer (KeyedOptimizerWrapper builds it over the dense parameters)."""
    cls = {"adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD, "adam": torch.optim.Adam}[args.dense_optimizer]
    return lambda params: cls(params, lr=args.dense_lr)
