"""A training run's ``metrics.jsonl`` (one JSON object a line, each with its ``step``) and its ``loss.png``."""

from __future__ import annotations

import io
import json
from pathlib import Path

from pipeline import store


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
    store.atomic_write(path, "".join(f"{line}\n" for line in keep).encode())


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
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    store.atomic_write(png, buf.getvalue())
