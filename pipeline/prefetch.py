"""Run a generator in a background thread, a few items ahead of its consumer (decode or gather while the
model computes). Shared by the embed stage and the training stream."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator


def background(gen: Iterator, depth: int = 3) -> Iterator:
    """Yield ``gen``'s items, produced ``depth`` ahead in a thread. An exception in the producer is raised in
    the consumer; a consumer that stops early (or fails) stops the producer instead of leaving it blocked."""
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

    threading.Thread(target=work, daemon=True).start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
