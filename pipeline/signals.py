"""One signal handler for the length of a block: Ctrl-C counted while img2dataset's child runs, deferred while a
dask cluster starts; SIGTERM turned into a checkpoint in the trainers."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def handling(signum: int, handler):
    """``handler`` for ``signum`` while the block runs, then the previous one back; yields that previous one, or
    None where nothing was installed: off the main thread (only it takes signals), where the signal is ignored
    (`nohup`, a background job: it stays so), or where the previous handler was installed outside Python (it
    could not be put back)."""
    previous = signal.getsignal(signum)
    if threading.current_thread() is not threading.main_thread() or previous in (None, signal.SIG_IGN):
        yield None
        return
    signal.signal(signum, handler)
    try:
        yield previous
    finally:
        signal.signal(signum, previous)
