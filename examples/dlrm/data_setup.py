"""This rank's train, validation and test batches: the split per data source, the logical
cardinalities, and the per-method adapters a stream goes through before the model sees it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from examples.dlrm.args import comma_ints

BatchTransform = Callable[[Iterator[Batch]], Iterator[Batch]]


@dataclass
class Data:
    """This rank's view of the train, test and (for sources that have one) validation splits."""

    cardinalities: List[int]
    train_steps: int  # per rank, equal on every rank
    test_batches: int  # per rank, equal on every rank
    train_from: Callable[[int], Iterator[Batch]]  # step -> this rank's batches from that step on
    test: Callable[[], Iterator[Batch]]
    description: Dict[str, Any] = field(default_factory=dict)
    validation: Optional[Callable[[], Iterator[Batch]]] = None
    validation_batches: int = 0  # per rank, equal on every rank


def make_data(args: argparse.Namespace, rank: int, world: int) -> Data:
    """The split that --data names; batch k of a split goes to rank k % world."""
    if args.data == "synthetic":
        return _synthetic_data(args, rank, world)
    if args.data == "tsv":
        return _tsv_data(args, rank, world)
    if args.data == "stream":
        return _stream_data(args, rank, world)
    return _npy_data(args, rank, world)


def _stream_data(args: argparse.Namespace, rank: int, world: int) -> Data:
    """A named stream of examples/dlrm/data/streams.py: its train days, validation day and test day."""
    from examples.dlrm.data.criteo_tsv import make_batch
    from examples.dlrm.data.streams import batch_at, settings

    spec = settings()[args.stream]
    per_rank = {split: spec.steps(split) // world for split in ("train", "validation", "test")}

    def split_from(split: str, start: int) -> Iterator[Batch]:
        for i in range(start, per_rank[split]):
            dense, ids, labels = batch_at(spec, split, rank + i * world, args.stream_seed)
            yield make_batch(dense.numpy(), ids.numpy(), labels.numpy())

    return Data(
        list(spec.cardinalities),
        per_rank["train"],
        per_rank["test"],
        lambda start: split_from("train", start),
        lambda: split_from("test", 0),
        {"data": "stream", "stream_seed": args.stream_seed, **spec.summary()},
        validation=lambda: split_from("validation", 0),
        validation_batches=per_rank["validation"],
    )


def _synthetic_data(args: argparse.Namespace, rank: int, world: int) -> Data:
    """SyntheticCriteo: train on every day but the last, test on the last."""
    from examples.dlrm.data import KAGGLE_CARDINALITIES, SyntheticCriteo, SyntheticCriteoConfig

    bs = args.batch_size
    base = tuple(comma_ints(args.cardinalities)) if args.cardinalities else KAGGLE_CARDINALITIES
    cfg = SyntheticCriteoConfig(
        cardinalities=base,
        cardinality_scale=1.0 if args.cardinalities else args.cardinality_scale,
        num_days=args.days,
        samples_per_day=args.samples_per_day,
        drift=args.drift,
        seed=args.data_seed,
    )
    train = SyntheticCriteo(cfg, bs, rank=rank, world_size=world, days=range(args.days - 1))
    test = SyntheticCriteo(cfg, bs, rank=rank, world_size=world, days=[args.days - 1])
    bpd = train.batches_per_day
    train_steps = len(train.days) * bpd // world
    test_batches = bpd // world

    def stream(ds: SyntheticCriteo, start: int, count: int) -> Iterator[Batch]:
        for i in range(start, count):
            day_pos, index_in_day = divmod(rank + i * world, bpd)
            yield ds.batch(ds.days[day_pos], index_in_day)

    return Data(
        train.cardinalities,
        train_steps,
        test_batches,
        lambda start: stream(train, start, train_steps),
        lambda: stream(test, 0, test_batches),
        {
            "data": "synthetic",
            "days": args.days,
            "samples_per_day": args.samples_per_day,
            "drift": args.drift,
            "cardinality_scale": args.cardinality_scale,
            "train_days": list(train.days),
            "test_day": args.days - 1,
        },
    )


def _tsv_data(args: argparse.Namespace, rank: int, world: int) -> Data:
    """Raw Criteo TSV, split chronologically at --train-rows (default: 80% of the rows)."""
    from examples.dlrm.data import CriteoTsvConfig, CriteoTsvReader

    bs = args.batch_size
    paths = list(args.tsv_path)
    total = _count_rows(paths) if args.train_rows is None or args.test_rows is None else None
    train_rows = args.train_rows if args.train_rows is not None else int(0.8 * total)
    test_stop = train_rows + args.test_rows if args.test_rows is not None else total
    train_steps = train_rows // bs // world
    test_batches = (test_stop - train_rows) // bs // world

    def rows(start_row: int, stop_row: int, on_error: str) -> Iterator[Batch]:
        """This rank's batches of rows [start_row, stop_row)."""
        cfg = CriteoTsvConfig(
            paths=paths,
            batch_size=bs,
            drop_last=True,
            rank=rank,
            world_size=world,
            start_row=start_row,
            stop_row=stop_row,
            on_error=on_error,
        )
        return iter(CriteoTsvReader(cfg))

    def tsv_train(start: int) -> Iterator[Batch]:
        if args.tsv_on_error == "raise":  # batch boundaries do not move: start at the row
            return islice(rows(start * world * bs, train_rows, "raise"), train_steps - start)
        return islice(rows(0, train_rows, "skip"), start, train_steps)

    def tsv_test() -> Iterator[Batch]:
        return islice(rows(train_rows, test_stop, args.tsv_on_error), test_batches)

    return Data(
        _logical_cardinalities(args),
        train_steps,
        test_batches,
        tsv_train,
        tsv_test,
        {
            "data": "tsv",
            "paths": [str(x) for x in paths],
            "train_rows": train_rows,
            "test_rows": test_stop - train_rows,
            "cardinality_scale": args.cardinality_scale,
        },
    )


def _npy_data(args: argparse.Namespace, rank: int, world: int) -> Data:
    """TorchRec's day files: train on every day but the last, test on the last."""
    from examples.dlrm.data import CriteoNpyConfig, CriteoNpyReader

    bs = args.batch_size
    root = Path(args.npy_root)
    if args.npy_days:
        days = comma_ints(args.npy_days)
    else:
        days = sorted(int(p.name.split("_")[1]) for p in root.glob("day_*_labels.npy"))
    if len(days) < 2:
        raise ValueError(f"{root}: need at least 2 npy days (train on all but the last), found {days}")
    train_days, test_day = days[:-1], days[-1]

    def npy(days_: List[int], start: int, count: int) -> Iterator[Batch]:
        cfg = CriteoNpyConfig(
            root=root,
            days=days_,
            batch_size=bs,
            drop_last=True,
            rank=rank,
            world_size=world,
            start_row=start * world * bs,
        )
        return islice(iter(CriteoNpyReader(cfg)), count - start)

    train_rows = CriteoNpyReader(CriteoNpyConfig(root=root, days=train_days, batch_size=bs)).num_rows
    test_rows = CriteoNpyReader(CriteoNpyConfig(root=root, days=[test_day], batch_size=bs)).num_rows
    train_steps, test_batches = train_rows // bs // world, test_rows // bs // world
    return Data(
        _logical_cardinalities(args),
        train_steps,
        test_batches,
        lambda start: npy(train_days, start, train_steps),
        lambda: npy([test_day], 0, test_batches),
        {
            "data": "npy",
            "root": str(root),
            "train_days": train_days,
            "test_day": test_day,
            "cardinality_scale": args.cardinality_scale,
        },
    )


def _count_rows(paths: Sequence[str]) -> int:
    """Lines in the (possibly compressed) TSV files: the default split needs the total."""
    from examples.dlrm.data.criteo_tsv import _open_text

    n = 0
    for path in paths:
        with _open_text(path) as handle:
            n += sum(1 for _ in handle)
    return n


def _logical_cardinalities(args: argparse.Namespace) -> List[int]:
    """--cardinalities, else the Criteo Kaggle cardinalities x --cardinality-scale."""
    from examples.dlrm.data import KAGGLE_CARDINALITIES

    if args.cardinalities:
        cards = comma_ints(args.cardinalities)
        if len(cards) != len(KAGGLE_CARDINALITIES):
            raise ValueError(f"--cardinalities needs {len(KAGGLE_CARDINALITIES)} values, got {len(cards)}")
        return cards
    return [max(1, round(c * args.cardinality_scale)) for c in KAGGLE_CARDINALITIES]


# ----------------------------------------------------------------------------- stream adapters
def input_transform(embedding: str, needs_id_modulo: bool, cardinalities: Sequence[int]) -> BatchTransform:
    """What a stream goes through for this embedding method: stock tables need ids < rows; AdaEmbed
    (cafe_torchrec.baselines.adaembed) fails on int32 KJT lengths (index_add_ of int32 with int64),
    so it gets int64 lengths."""
    transforms: List[BatchTransform] = []
    if needs_id_modulo:
        transforms.append(lambda it: modulo_ids(it, cardinalities))
    if embedding == "ada":
        transforms.append(int64_lengths)

    def transformed(it: Iterator[Batch]) -> Iterator[Batch]:
        for t in transforms:
            it = t(it)
        return it

    return transformed


def modulo_ids(stream: Iterator[Batch], cardinalities: Sequence[int]) -> Iterator[Batch]:
    """Ids taken modulo each feature's cardinality (for uncompressed stock tables)."""
    sizes = torch.tensor(cardinalities, dtype=torch.int64)
    for batch in stream:
        kjt = batch.sparse_features
        per_id = torch.repeat_interleave(sizes, torch.tensor(kjt.length_per_key()))
        values = torch.remainder(kjt.values(), per_id)
        yield Batch(
            batch.dense_features,
            KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths(), stride=kjt.stride()),
            batch.labels,
        )


def int64_lengths(stream: Iterator[Batch]) -> Iterator[Batch]:
    """The same batches with int64 KJT lengths."""
    for batch in stream:
        kjt = batch.sparse_features
        yield Batch(
            batch.dense_features,
            KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths().long(), stride=kjt.stride()),
            batch.labels,
        )
