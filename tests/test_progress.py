"""Log lines and progress bars (`pipeline.progress`)."""

import logging
import re
import sys

from pipeline import progress


def test_a_line_logged_under_a_bar_prints_on_a_line_of_its_own_with_the_handlers_format_and_filters(capsys):
    """embed's ERROR for a failed shard was written onto the bar's line, which then drew over it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("LOG %(levelname)s %(message)s"))
    handler.addFilter(lambda r: "hidden" not in r.getMessage())
    root, log = logging.getLogger(), logging.getLogger("tests.progress")
    root.addHandler(handler)
    try:
        with progress.bar(total=3, desc="work", file=sys.stderr, mininterval=0) as bar:
            bar.update(1)
            log.warning("shard 1 failed")
            log.warning("a hidden line")
            bar.update(2)
        assert root.handlers[-1] is handler  # put back
    finally:
        root.removeHandler(handler)
    pieces = [p for p in re.split(r"[\r\n]", capsys.readouterr().err) if p.strip()]
    assert [p for p in pieces if "failed" in p] == ["LOG WARNING shard 1 failed"]
    assert not any("hidden" in p for p in pieces)
    assert pieces[-1].startswith("work: 100%")


def test_without_a_console_handler_the_loggers_handlers_are_left_alone():
    root = logging.getLogger()
    before = list(root.handlers)
    root.handlers = [h for h in before if not isinstance(h, logging.StreamHandler)]
    try:
        kept = list(root.handlers)
        with progress.logs_above_bars():
            assert root.handlers == kept
    finally:
        root.handlers = before
