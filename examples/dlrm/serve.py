"""Freeze a trained DLRM for serving: train as the demo does (one process), then for each dtype
swap the CAFE collection for its frozen form (cafe_torchrec.inference.quantize_inference_model),
trace it with torchrec.fx, script it, and report bytes, test AUC and latency against the
training model.

    python -m examples.dlrm.serve                          # the demo's data and model, 100x
    python -m examples.dlrm.serve --dtypes fp16,int8 --save results/serve -- --data stream --stream abrupt8

Everything after `--` goes to the trainer (examples/dlrm/train.py flags); without it the
demo's settings are used (synthetic stream, Kaggle cardinalities x 0.01, 4 days x 65,536
samples, batch 1024, CAFE at 100x). With --save DIR the scripted models are written there
(torch.jit.save), loadable where torchrec and fbgemm_gpu are installed.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torchrec.fx
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec.inference import FrozenCafeEmbeddingBagCollection, quantize_inference_model, served_dtype

DEMO_FLAGS = [
    "--data",
    "synthetic",
    "--cardinality-scale",
    "0.01",
    "--days",
    "4",
    "--samples-per-day",
    "65536",
    "--batch-size",
    "1024",
    "--compression-ratio",
    "100",
    "--embedding",
    "cafe",
]
LATENCY_BATCHES = (1, 64, 512)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, train = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dtypes", default="fp32,fp16,int8", help="comma separated: fp32, fp16, int8, int4")
    p.add_argument("--latency-seconds", type=float, default=1.0, help="timing per model and batch size")
    p.add_argument("--save", default=None, help="directory for the scripted models")
    args = p.parse_args(own)
    args.train_flags = train or DEMO_FLAGS
    return args


class Trained:
    """A model trained in this process by the example trainer's own steps (world size 1)."""

    def __init__(self, train_flags: Sequence[str]) -> None:
        from examples.dlrm import train as trainer
        from examples.dlrm.args import parse_args as trainer_args
        from examples.dlrm.data_setup import make_data
        from examples.dlrm.process_group import setup_distributed

        self.args = trainer_args(["--no-plot", "--no-progress", *train_flags])
        torch.set_num_threads(self.args.threads or 1)
        torch.manual_seed(self.args.seed)
        self.dist = setup_distributed(self.args)
        if self.dist.world_size != 1:
            raise ValueError("examples.dlrm.serve trains in one process; run it without torchrun")
        data = make_data(self.args, 0, 1)
        self.trainee = trainer.build_trainee(self.args, data, self.dist)
        meta, _ = trainer.initial_state(self.args, self.trainee, self.dist)
        self.splits = trainer.adapted_splits(self.args, self.trainee, data)
        trainer.train(self.args, self.dist, self.trainee, self.splits, meta, trainer.planned_steps(self.args, data, 1))
        self.final = trainer.final_evaluations(self.trainee, self.splits, 1)
        if hasattr(self.trainee.pipeline, "detach"):  # give the model its own forward back
            self.trainee.pipeline.detach()

    @property
    def model(self) -> torch.nn.Module:
        """The training model's DLRM (sharded collection inside, eval mode)."""
        return self.trainee.dmp.module.model.eval()

    def served(self, dtype: torch.dtype) -> torch.nn.Module:
        """The DLRM with its CAFE collection frozen (quantize_inference_model), in eval mode."""
        model = quantize_inference_model(self.trainee.dmp, dtype)
        return model.model.eval()

    def close(self) -> None:
        if self.dist.created:
            torch.distributed.destroy_process_group()


def frozen_collection(model: torch.nn.Module) -> FrozenCafeEmbeddingBagCollection:
    return next(m for m in model.modules() if isinstance(m, FrozenCafeEmbeddingBagCollection))


def scripted(model: torch.nn.Module) -> torch.jit.ScriptModule:
    """TorchRec's serving recipe after quantization: fx trace, then TorchScript."""
    return torch.jit.script(torchrec.fx.symbolic_trace(model))


@torch.no_grad()
def auc(model: Callable[[torch.Tensor, KeyedJaggedTensor], torch.Tensor], batches: Iterator[Batch]) -> float:
    """Test AUC (torchmetrics) of a DLRM-shaped model over the batches."""
    from torchmetrics.classification import BinaryAUROC

    metric = BinaryAUROC()
    for batch in batches:
        metric.update(
            torch.sigmoid(model(batch.dense_features, batch.sparse_features).reshape(-1)),
            batch.labels.reshape(-1).long(),
        )
    return float(metric.compute())


def head(batch: Batch, n: int) -> Batch:
    """The first n samples of a (fixed-stride, unweighted) batch."""
    kjt = batch.sparse_features
    lengths = kjt.lengths().view(len(kjt.keys()), -1)
    starts = torch.nn.functional.pad(kjt.lengths().cumsum(0), (1, 0))[:-1].view_as(lengths)[:, 0]
    counts = lengths[:, :n].sum(1)
    values = torch.cat([kjt.values()[s : s + c] for s, c in zip(starts.tolist(), counts.tolist())])
    return Batch(
        dense_features=batch.dense_features[:n],
        labels=batch.labels[:n],
        sparse_features=KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=lengths[:, :n].flatten(), stride=n),
    )


def latency(model: Callable[..., Any], inputs: Sequence[Any], seconds: float) -> float:
    """Median seconds per call over rounds of at least `seconds` / 5 each, after a warm-up."""
    for _ in range(3):
        model(*inputs)
    rounds = []
    for _ in range(5):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 5:
            model(*inputs)
            calls += 1
        rounds.append((time.perf_counter() - start) / calls)
    return sorted(rounds)[2]


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    from benchmarks.common import machine, table

    warnings.filterwarnings("ignore", category=FutureWarning)  # TorchRec / ShardedTensor deprecation chatter
    args = parse_args(argv)
    trained = Trained(args.train_flags)
    try:
        rows = report(trained, args.dtypes.split(","), args.latency_seconds, args.save)
    finally:
        trained.close()
    print(f"[serve] {machine()}")
    print(table(list(rows[0]), [list(r.values()) for r in rows]))
    return rows


def report(trained: Trained, dtypes: Sequence[str], seconds: float, save: Optional[str]) -> List[Dict[str, Any]]:
    """One row for the training model and one per dtype: embedding bytes (training: weights +
    sketch; frozen: weights as FBGEMM stores them + the frozen maps), test AUC, and the whole
    model's latency per batch size (one thread)."""
    test = list(trained.splits.test())
    inputs = {n: (head(test[0], n).dense_features, head(test[0], n).sparse_features) for n in LATENCY_BATCHES}
    memory = trained.trainee.memory
    rows = [
        {
            "model": "training (eval)",
            "embedding bytes": f"{int(memory['weight_bytes']):,} + {int(memory.get('sketch_bytes', 0)):,} sketch",
            "test AUC": f"{trained.final['test']['auc']:.4f}",
            **{f"ms @{n}": 1e3 * latency(trained.model, inputs[n], seconds) for n in LATENCY_BATCHES},
        }
    ]
    for name in dtypes:
        served = trained.served(served_dtype(name))
        script = scripted(served)
        if save:
            Path(save).mkdir(parents=True, exist_ok=True)
            torch.jit.save(script, str(Path(save) / f"dlrm_{name}.pt"))
        nbytes = frozen_collection(served).nbytes()
        rows.append(
            {
                "model": f"frozen {name}, scripted",
                "embedding bytes": f"{nbytes['weights']:,} + {nbytes['maps']:,} maps",
                "test AUC": f"{auc(script, iter(test)):.4f}",
                **{f"ms @{n}": 1e3 * latency(script, inputs[n], seconds) for n in LATENCY_BATCHES},
            }
        )
    return rows


if __name__ == "__main__":
    main()
