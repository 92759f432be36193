"""Stand-ins for img2dataset in `pipeline.download`'s child process (`tests/test_download.py`): importable by a
spawned child, and light to import."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def ignores_ctrl_c(kwargs: dict) -> None:
    """A download whose Ctrl-C handling never returns, as img2dataset's pool terminate sometimes does: SIGINT is
    ignored, and a process of its own (a pool worker's stand-in) runs under it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)",
        ]
    )
    Path(kwargs["ready"]).write_text(f"{worker.pid}\n")
    time.sleep(600)


def fails(kwargs: dict) -> None:
    raise ValueError("img2dataset refused the input")
