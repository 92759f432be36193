"""A training run's ``metrics.jsonl`` (one JSON object a line, each with its ``step``) and its ``loss.png``."""

from __future__ import annotations

import json
import os
from pathlib import Path


def append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # a line torn by a kill in the middle of its write
        return float("inf")


def truncate(path: Path, start: int) -> None:
    """Keep the rows of steps <= `start`, rewritten atomically. A run killed after its last checkpoint logged
    steps that its resumed run logs again (and a kill mid-write leaves a torn last line): dropped, so the file
    reads as one uninterrupted run."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if _step_of(line) <= start]
    if len(keep) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    os.replace(tmp, path)


def plot_loss(metrics_file: Path, png: Path, title: str, ylabel: str) -> None:
    """The loss curve of ``metrics_file`` as a PNG (log scale), written atomically; nothing without loss rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_file)] if metrics_file.exists() else []
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*pts))
    ax.set(xlabel="step", ylabel=ylabel, yscale="log", title=title)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp{os.getpid()}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, png)
