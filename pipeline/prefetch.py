"""Run a generator in a background thread, a few items ahead of its consumer (decode or gather while the
model computes), and ask the kernel to read a file ahead (`will_need`). Shared by the embed stage and the
training stream."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

JOIN_S = 60.0  # how long a consumer that stops waits for the producer's current item


def will_need(path: str | os.PathLike) -> None:
    """Ask the kernel to read a local file into its page cache now, in the background (posix_fadvise
    WILLNEED; a no-op for pages already there, and where the OS has no posix_fadvise). Raises OSError."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def background(gen: Iterator, depth: int = 3) -> Iterator:
    """Yield ``gen``'s items, produced ``depth`` ahead in a thread. An exception in the producer is raised in
    the consumer. A consumer that stops early (or fails) stops the producer and waits (up to `JOIN_S`) for it to
    finish the item it is on and close ``gen``: a producer still running inside a C extension while the
    interpreter exits can abort the process ("terminate called without an active exception", seen in the
    stream benchmark's probe after it had printed its result)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop, done = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in gen:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer
            put(e)
        finally:
            close = getattr(gen, "close", None)  # run gen's own cleanup here, in its thread
            if close is not None:
                close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(JOIN_S)  # bounded: a producer stuck on I/O is left behind (a daemon) rather than hung on
