"""The DLRM trainer's command line: flags, their checks and defaults, and the option strings they carry."""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence

# The first line of train.py's docstring: --help shows it as the description.
DESCRIPTION = "Train TorchRec's DLRM on Criteo-like data with a CAFE (or baseline) embedding collection."
SHARDINGS = ("auto", "table_wise", "row_wise")
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The trainer's flags, checked, with the defaults that depend on other flags filled in."""
    from examples.dlrm.embeddings import METHODS

    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--embedding", choices=METHODS, default="cafe", help="embedding collection")
    g.add_argument("--compression-ratio", type=float, default=100.0, help="logical / physical embedding bytes")
    g.add_argument(
        "--embedding-dim",
        type=int,
        default=None,
        help="embedding dim (default: the stream's with --data stream, else 16)",
    )
    g.add_argument("--interaction", choices=("dot", "dcn"), default="dot", help="DLRM (dot) or DLRM_DCN")
    g.add_argument("--dense-arch", default=None, help="dense arch layer sizes, comma separated (default: 64,<dim>)")
    g.add_argument("--over-arch", default="64,32,1", help="over arch layer sizes, comma separated (last: 1)")
    g.add_argument("--dcn-num-layers", type=int, default=2)
    g.add_argument("--dcn-low-rank-dim", type=int, default=32)
    g.add_argument(
        "--cafe-threshold",
        type=float,
        default=None,
        help="CAFE hot threshold of the paper's fixed policy (with --cafe-option policy=paper; "
        "the default adaptive policy has none)",
    )
    g.add_argument("--cafe-hot-share", type=float, default=None, help="CAFE hot memory share (default: per ratio)")
    g.add_argument(
        "--cafe-importance",
        choices=("gradient", "frequency"),
        default=None,
        help="CAFE importance score (default: CafeConfig's, gradient)",
    )
    g.add_argument(
        "--cafe-level2-share",
        type=float,
        default=None,
        help="CAFE-ML: share of hashed rows in the second hashed region (default: CafeConfig's)",
    )
    g.add_argument(
        "--cafe-medium-share",
        type=float,
        default=None,
        help="CAFE-ML: medium threshold as a share of the hot threshold (default: CafeConfig's)",
    )
    g.add_argument(
        "--cafe-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any CafeConfig field, e.g. hysteresis=2 or policy=paper (repeatable; not compression_ratio, "
        "multi_level or seed, which --compression-ratio, --embedding and --seed set)",
    )
    g.add_argument(
        "--baseline-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra constructor argument of a baseline, e.g. collisions=global (qr), eviction_interval=50 (mc)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="per-rank batch size (default: the stream's with --data stream, else 1024)",
    )
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="rowwise_adagrad", help="embedding optimizer (fused)")
    g.add_argument("--learning-rate", type=float, default=0.05, help="embedding learning rate")
    g.add_argument("--dense-optimizer", choices=("adagrad", "sgd", "adam"), default="adagrad")
    g.add_argument("--dense-lr", type=float, default=0.01, help="dense learning rate")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: the whole split)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        choices=("synthetic", "tsv", "npy", "stream"),
        default="synthetic",
        help="stream: a named setting of examples/dlrm/data/streams.py (train days, validation day, test day)",
    )
    g.add_argument("--stream", choices=tuple(stream_settings()), default=None, help="--data stream: the setting")
    g.add_argument("--stream-seed", type=int, default=0, help="--data stream: seed of the stream's world and draws")
    g.add_argument(
        "--cardinality-scale",
        type=float,
        default=None,
        help="logical cardinalities = Criteo Kaggle cardinalities x scale (default: 0.01 synthetic, 1 tsv/npy)",
    )
    g.add_argument("--cardinalities", default=None, help="explicit logical cardinalities, 26 comma separated")
    g.add_argument("--days", type=int, default=3, help="synthetic days (train on all but the last)")
    g.add_argument("--samples-per-day", type=int, default=1 << 17, help="synthetic samples per day")
    g.add_argument("--drift", type=float, default=0.1, help="synthetic: share of popular ids replaced per day")
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--tsv-path", nargs="+", default=None, help="raw Criteo TSV file(s), in time order")
    g.add_argument("--train-rows", type=int, default=None, help="tsv: rows for training (default: 80%%)")
    g.add_argument(
        "--test-rows", type=int, default=None, help="tsv: rows for testing after the training rows (default: the rest)"
    )
    g.add_argument("--tsv-on-error", choices=("raise", "skip"), default="raise")
    g.add_argument("--npy-root", default=None, help="directory of day_{i}_{dense,sparse,labels}.npy")
    g.add_argument(
        "--npy-days", default=None, help="npy: comma separated days (default: all found; last is the test day)"
    )
    g = p.add_argument_group("distribution")
    g.add_argument("--sharding", choices=SHARDINGS, default="auto", help="sharding of the physical embedding tables")
    g.add_argument("--cpu", action="store_true", help="stay on CPU (gloo) even when CUDA is available")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: $OMP_NUM_THREADS, else 1: more threads next to gloo's "
        "made small CPU steps ~30x slower on a 2-core host)",
    )
    g = p.add_argument_group("evaluation, checkpoints, output")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    g.add_argument(
        "--eval-batches", type=int, default=None, help="per-rank test batches of periodic evaluations (final: all)"
    )
    g.add_argument("--log-every", type=int, default=10, help="loss / hot-share aggregation interval (steps)")
    g.add_argument("--checkpoint-dir", default=None)
    g.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep the last K checkpoints (0: all)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="resume from a checkpoint directory, or the latest one in --checkpoint-dir",
    )
    g.add_argument("--out-dir", default="results")
    g.add_argument("--run-name", default=None, help="name of the JSON / PNG (default: <embedding>)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--no-plot", action="store_true")
    g = p.add_argument_group("test hooks")
    g.add_argument("--fail-at-step", type=int, default=None, help="raise InjectedFailure before this step")
    g.add_argument("--fail-rank", type=int, default=0, help="the rank that fails (with --fail-at-step)")
    args = p.parse_args(argv)
    if args.log_every <= 0:
        p.error("--log-every must be positive")
    for flag in ("max_steps", "eval_batches", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    for flag in ("eval_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0")
    if args.checkpoint_every and not args.checkpoint_dir:
        p.error("--checkpoint-every needs --checkpoint-dir")
    if args.resume == "latest" and not args.checkpoint_dir:
        p.error("--resume without a path needs --checkpoint-dir")
    if args.data == "tsv" and not args.tsv_path:
        p.error("--data tsv needs --tsv-path")
    if args.data == "npy" and not args.npy_root:
        p.error("--data npy needs --npy-root")
    if args.data == "synthetic" and args.days < 2:
        p.error("--days must be >= 2 (train on all days but the last, test on the last)")
    _resolve_stream_defaults(p, args)
    try:
        args.cafe_config_options = cafe_options(args)
        args.baseline_options = key_value_options(args.baseline_option, "--baseline-option")
    except ValueError as err:
        p.error(str(err))
    if args.cafe_config_options and args.embedding not in ("cafe", "cafe-ml"):
        p.error(f"CAFE options {sorted(args.cafe_config_options)} given for --embedding {args.embedding}")
    if args.embedding in ("cafe", "cafe-ml"):
        from examples.dlrm.embeddings import cafe_config

        config = cafe_config(args.embedding, args.compression_ratio, args.seed, args.cafe_config_options)
        try:  # here, not after the data and the model are built
            config.validate("--cafe-option / --cafe-* flags")
        except ValueError as err:
            p.error(str(err))
    if args.baseline_options and args.embedding in ("cafe", "cafe-ml", "full"):
        p.error(f"--baseline-option given for --embedding {args.embedding}, which is no baseline")
    args.run_name = args.run_name or args.embedding
    if args.cardinality_scale is None:
        args.cardinality_scale = 0.01 if args.data == "synthetic" else 1.0
    if args.cardinality_scale <= 0:
        p.error("--cardinality-scale must be positive")
    return args


def comma_ints(text: str) -> List[int]:
    """'64,32,1' -> [64, 32, 1] (empty items skipped): layer sizes, cardinalities, days."""
    return [int(x) for x in text.split(",") if x.strip()]


def _resolve_stream_defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--batch-size and --embedding-dim: a stream's batch size is part of its setting (another is
    refused); its embedding dim is the default (another may be asked for). Other sources default
    to batches of 1024 at dim 16."""
    if args.data == "stream":
        if args.stream is None:
            p.error("--data stream needs --stream NAME")
        spec = stream_settings()[args.stream]
        if args.batch_size not in (None, spec.batch_size):
            p.error(f"--batch-size {args.batch_size}: stream {args.stream} has batches of {spec.batch_size}")
        args.batch_size = spec.batch_size
        if args.embedding_dim is None:
            args.embedding_dim = spec.embedding_dim
    else:
        args.batch_size = 1024 if args.batch_size is None else args.batch_size
        args.embedding_dim = 16 if args.embedding_dim is None else args.embedding_dim
    if args.batch_size <= 0:
        p.error("--batch-size must be positive")


def stream_settings() -> Dict[str, Any]:
    """The named streams (--stream choices)."""
    from examples.dlrm.data.streams import settings

    return settings()


def key_value_options(pairs: Sequence[str], flag: str) -> Dict[str, Any]:
    """KEY=VALUE strings of a repeatable `flag` -> a dict, values as int, float, bool or str."""
    out: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE")
        if key.strip() in out:
            raise ValueError(f"{flag} {key.strip()} is given twice")
        parsed: Any = value
        for conv in (int, float):
            try:
                parsed = conv(value)
                break
            except ValueError:
                continue
        if value in ("true", "false", "True", "False"):
            parsed = value.lower() == "true"
        out[key.strip()] = parsed
    return out


def cafe_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The CafeConfig fields the CAFE flags and --cafe-option set; the rest keep CafeConfig's defaults.

    Raises ValueError for a field CafeConfig does not have, one that another flag owns, or one
    set both by its own flag and by --cafe-option.
    """
    import dataclasses

    from cafe_torchrec.config import CafeConfig

    flags = {
        "importance": args.cafe_importance,
        "threshold": args.cafe_threshold,
        "hot_share": args.cafe_hot_share,
        "level2_share": args.cafe_level2_share,
        "medium_share": args.cafe_medium_share,
    }
    options = {key: value for key, value in flags.items() if value is not None}
    known = {f.name for f in dataclasses.fields(CafeConfig)}
    owned = {"compression_ratio": "--compression-ratio", "multi_level": "--embedding cafe-ml", "seed": "--seed"}
    for key, value in key_value_options(args.cafe_option, "--cafe-option").items():
        if key in owned:
            raise ValueError(f"--cafe-option {key}: set it with {owned[key]}")
        if key not in known:
            raise ValueError(f"--cafe-option {key}: CafeConfig has no such field (fields: {', '.join(sorted(known))})")
        if key in options:
            raise ValueError(f"--cafe-option {key}: also set by --cafe-{key.replace('_', '-')}")
        options[key] = value
    return options
