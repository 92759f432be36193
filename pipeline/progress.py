"""Progress bars whose log lines print above them: a warning or error logged while a tqdm bar was on the
terminal was written onto the bar's line (``embed:  50%|█████  | 6/12 [00:09<00:09]2026-... ERROR ...``), and the
bar went on drawing over it."""

from __future__ import annotations

import contextlib
import logging

from tqdm import tqdm
from tqdm.contrib.logging import _is_console_logging_handler, logging_redirect_tqdm


@contextlib.contextmanager
def logs_above_bars():
    """While the block runs, the root logger's console handler writes through `tqdm.write` (its format and
    filters kept), which clears any bar on the terminal, writes the line and draws the bar again below it.
    Where the root logger has no console handler (a library caller's own setup), its handlers are left alone."""
    if any(_is_console_logging_handler(h) for h in logging.root.handlers):
        with logging_redirect_tqdm():
            yield
    else:
        yield


@contextlib.contextmanager
def bar(iterable=None, **kw):
    """A tqdm bar (``kw`` are tqdm's), closed when the block ends, with log lines printed above it."""
    with tqdm(iterable, **kw) as b, logs_above_bars():
        yield b
