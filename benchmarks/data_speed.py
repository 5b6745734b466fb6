"""Speed of the example's data sources against the training step they feed.

    python -m benchmarks.data_speed

A data source must not be what limits training: the synthetic stream should make a batch of
4096 in well under 10 ms and the TSV reader parse the 10k-row Criteo sample in well under a
second (a DLRM step on 4096 samples takes tens of ms on this machine: see benchmarks.train_speed).
Best of several runs, since the machine is shared and noisy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import best_time, machine, table
from examples.dlrm.data import CriteoTsvConfig, CriteoTsvReader, SyntheticCriteo, SyntheticCriteoConfig

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared/data/criteo_kaggle_train_head10k.txt"


def main() -> None:
    torch.set_num_threads(1)
    print(f"machine: {machine()}\n")
    stream = SyntheticCriteo(SyntheticCriteoConfig(), 4096)
    stream.batch(3, 0)  # calibrates day 3 once
    counter = iter(range(1, 1_000_000))
    synthetic = best_time(lambda: stream.batch(3, next(counter)), repeat=10)
    rows = [["synthetic stream, one batch of 4096", synthetic * 1e3, "< 10 ms", 4096 / synthetic]]
    if SAMPLE.exists():
        tsv = best_time(lambda: list(CriteoTsvReader(CriteoTsvConfig(paths=[SAMPLE], batch_size=4096))), repeat=2)
        rows.append(["TSV reader, the 10k-row Criteo sample", tsv * 1e3, "< 1000 ms", 10_000 / tsv])
    else:
        print(f"(the Criteo sample is not at {SAMPLE}: TSV reader skipped)")
    print(table(["source", "ms", "target", "samples/s"], rows))


if __name__ == "__main__":
    main()
