"""The run's PNG: training loss and evaluation AUC against the step."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List


def write_plot(path: Path, losses: List[Dict[str, float]], evals: List[Dict[str, float]], title: str) -> None:
    """Loss (left axis) and eval AUC (right axis) per step, saved to `path` with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if losses:
        ax.plot([x["step"] for x in losses], [x["loss"] for x in losses], color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (interval mean)", color="tab:blue")
    ax2 = ax.twinx()
    if evals:
        ax2.plot([x["step"] for x in evals], [x["auc"] for x in evals], "o-", color="tab:red", label="eval AUC")
    ax2.set_ylabel("eval AUC", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
