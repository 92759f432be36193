"""Stand-ins for img2dataset's `download` in `pipeline.download`'s child process (`tests/test_download.py`): importable by a
spawned child, and light to import."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def ignores_ctrl_c(**kwargs) -> None:
    """A download whose Ctrl-C handling never returns, as img2dataset's pool terminate sometimes does: SIGINT is
    ignored, and a process of its own (a pool worker's stand-in) runs under it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"
    worker = subprocess.Popen([sys.executable, "-c", code])
    Path(kwargs["ready"]).write_text(f"{os.getpid()} {worker.pid}\n")
    time.sleep(600)


def exits_on_ctrl_c(**kwargs) -> None:
    """As img2dataset's handler does: sys.exit(0) on SIGINT."""
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    Path(kwargs["ready"]).write_text(f"{os.getpid()}\n")
    time.sleep(600)


def fails(**kwargs) -> None:
    raise ValueError("img2dataset refused the input")


def is_killed(**kwargs) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would end it


def dies_leaving_a_worker(**kwargs) -> None:
    """Killed (as by the OOM killer) while a process of its own (a pool worker's stand-in) runs on."""
    code = "import time; time.sleep(600)"
    worker = subprocess.Popen([sys.executable, "-c", code])
    Path(kwargs["ready"]).write_text(f"{os.getpid()} {worker.pid}\n")
    time.sleep(2.5)  # the parent notes the processes under it every second
    os.kill(os.getpid(), signal.SIGKILL)


def exits_with(**kwargs) -> None:
    sys.exit(kwargs["code"])


def fails_with_its_logger_running(**kwargs) -> None:
    """An error after img2dataset started its logger, a process that is no daemon and runs until told to stop:
    multiprocessing's exit hook in the child waits for it."""
    import multiprocessing

    logger = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(600,))
    logger.start()
    Path(kwargs["ready"]).write_text(f"{os.getpid()} {logger.pid}\n")
    time.sleep(0.2)  # sooner than the parent notes the processes under it (once a second)
    raise ValueError("img2dataset failed after starting its logger")


def orphans_a_worker_then_dies(**kwargs) -> None:
    """A process of its tree orphaned at once (its parent, a go-between, exits), so that the parent's notes of
    the processes under the child never see it; then the child is killed."""
    code = (
        "import subprocess, sys\n"
        "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(w.pid)"
    )
    worker = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    Path(kwargs["ready"]).write_text(f"{os.getpid()} {worker}\n")
    time.sleep(1.5)  # past a note of the tree
    os.kill(os.getpid(), signal.SIGKILL)


def holds_semaphores_and_ignores_ctrl_c(**kwargs) -> None:
    """As img2dataset's pool does: semaphores made, registered with multiprocessing's resource tracker, never
    unlinked by a child that is killed."""
    import multiprocessing

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    held = [multiprocessing.get_context("spawn").Lock() for _ in range(3)]  # named: registered
    Path(kwargs["ready"]).write_text(f"{os.getpid()} {len(held)}\n")
    time.sleep(600)


def keeps_starting_workers(**kwargs) -> None:
    """As img2dataset's pool does when its workers are killed (and every --maxtasksperchild tasks): a new one
    started for each that ends, all the time. Each one's pid goes to the ready file's second line on."""
    import threading

    def spawn():
        while True:
            w = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            with open(kwargs["pids"], "a") as f:
                f.write(f"{w.pid}\n")
            time.sleep(0.01)

    threading.Thread(target=spawn, daemon=True).start()
    time.sleep(1.0)
    Path(kwargs["ready"]).write_text(f"{os.getpid()}\n")
    time.sleep(600)


def says_how_it_takes_sigttou(**kwargs) -> None:
    Path(kwargs["ready"]).write_text(f"{int(signal.getsignal(signal.SIGTTOU) == signal.SIG_IGN)}\n")
