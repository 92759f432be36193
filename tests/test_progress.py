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


def test_each_console_handler_keeps_its_level_and_stream_and_overlapping_blocks_put_every_stream_back(capsys):
    """tqdm's own redirect replaced the console handlers with one copy of the first: a handler's level was
    dropped (INFO printed where the handler took WARNING and up), a second handler's lines were lost, and two
    bars open at once on two threads, closed in another order, left the root logger redirected for good."""
    import threading

    root, log = logging.getLogger(), logging.getLogger("tests.progress")
    warn = logging.StreamHandler(sys.stderr)
    warn.setLevel(logging.WARNING)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    root.addHandler(warn)
    root.addHandler(out)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        entered, release = threading.Event(), threading.Event()

        def other_bar():
            with progress.bar(total=1, file=sys.stderr):
                entered.set()
                release.wait(5)

        t = threading.Thread(target=other_bar)
        with progress.bar(total=2, file=sys.stderr) as b:
            t.start()
            assert entered.wait(5)
            log.info("an info line")
            log.error("an error line")
            b.update(1)
        release.set()  # the first block closed before the second: out of order
        t.join()
        assert warn.stream is sys.stderr and out.stream is sys.stdout
    finally:
        root.removeHandler(warn)
        root.removeHandler(out)
        root.setLevel(level)
    got = capsys.readouterr()
    assert [p for p in re.split(r"[\r\n]", got.out) if p.strip()] == ["an info line"]
    err = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", p) for p in re.split(r"[\r\n]", got.err) if "line" in p]
    assert err == ["an error line"]  # (after the cursor moves that clear the second bar)
