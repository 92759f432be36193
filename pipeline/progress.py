"""Progress bars whose log lines print above them: a warning or error logged while a tqdm bar was on the
terminal was written onto the bar's line (``embed:  50%|█████  | 6/12 [00:09<00:09]2026-... ERROR ...``), and the
bar went on drawing over it. Lines that other processes write (dask workers) are theirs and not covered."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading

from tqdm import tqdm

_lock = threading.Lock()
_users = 0  # blocks inside `logs_above_bars` now, on any thread: the first wraps, the last unwraps
_wrapped: list[tuple[logging.StreamHandler, object]] = []  # (handler, the stream it had)


class _AboveBars:
    """A console stream whose writes go through `tqdm.write`: any bar on it is cleared, the text written, the
    bar drawn again below."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


def _console(handler: logging.Handler) -> bool:
    return type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr)


@contextlib.contextmanager
def logs_above_bars():
    """While the block runs, the root logger's console handlers (plain StreamHandlers on stdout or stderr) write
    through `tqdm.write`; their levels, formats and filters stay theirs. Blocks may overlap, on any threads."""
    global _users
    with _lock:
        if _users == 0:
            for h in logging.root.handlers:
                if _console(h):
                    _wrapped.append((h, h.setStream(_AboveBars(h.stream))))
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                for h, stream in _wrapped:
                    h.setStream(stream)
                _wrapped.clear()


@contextlib.contextmanager
def bar(iterable=None, **kw):
    """A tqdm bar (``kw`` are tqdm's), closed when the block ends, with log lines printed above it."""
    with tqdm(iterable, **kw) as b, logs_above_bars():
        yield b
