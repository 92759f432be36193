"""Errors every stage shares: the CLI turns a `UsageError` into one line on stderr and exit code 2."""

import re
import signal
from collections import Counter

# How Python names an object by address ("<_io.BytesIO object at 0x7f3a...>"), as PIL's messages do
_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def without_addresses(message: str) -> str:
    """``message`` without the object addresses in it: the same failure then reads the same in every run."""
    return _ADDRESS.sub("", message)


class UsageError(Exception):
    """Bad input or configuration, found before any work starts; nothing has been written."""


class StageError(Exception):
    """A stage started but could not finish (e.g. a diverged loss); the CLI exits 1 with this message."""


class Stopped(Exception):
    """A stage stopped on a signal once its progress was saved: SIGTERM (a batch scheduler's notice before its
    SIGKILL) or SIGINT (Ctrl-C). The CLI exits 128 + the signal (143, 130: as a shell reports a process the
    signal ended) with this message."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = int(signum)


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C that a stage caught to say what it kept (one clause, the CLI's line says it before what to run
    next); ``nothing_kept``: a rerun starts over, so the command's usual advice (--resume) would mislead."""

    def __init__(self, kept: str, nothing_kept: bool = False) -> None:
        super().__init__(kept)
        self.nothing_kept = nothing_kept


# Failure messages often name the one URL, host or object they are about (img2dataset's "unknown url type:
# 'a/b.png'", urllib3's "HTTPSConnectionPool(host='x.org', ...)", PIL's "<_io.BytesIO object at 0x7f..>"):
# counted as they are, a run over millions of samples summarised millions of one-off reasons.
_URL = re.compile(r"\b[a-zA-Z][\w+.-]*://[^\s'\"<>]+")
_QUOTED = re.compile(r"(?<!\w)'[^']*'")  # not from the apostrophe of "can't"
_URL_PATH = re.compile(r"(with url: )\S+")  # urllib3's "Max retries exceeded with url: /a/b.jpg"
KINDS_KEPT = 50  # a summary's most common kinds of failure; the rest are counted under OTHER_KINDS
OTHER_KINDS = "(other reasons)"


def kind_of(reason: str) -> str:
    """A failure reason with the URL, host or object it names taken out, so that one cause is one kind."""
    kind = _URL.sub("<url>", without_addresses(reason))
    kind = _QUOTED.sub("'...'", _URL_PATH.sub(r"\1<url>", kind)).strip()
    return kind or reason


def by_kind(reasons: dict[str, int]) -> dict[str, int]:
    """Counts by reason -> counts by kind of reason, commonest first: the first KINDS_KEPT, then OTHER_KINDS."""
    kinds: Counter = Counter()
    for reason, n in reasons.items():
        kinds[kind_of(reason)] += n
    kept = dict(kinds.most_common(KINDS_KEPT))
    if len(kinds) > KINDS_KEPT:
        kept[OTHER_KINDS] = sum(kinds.values()) - sum(kept.values())
    return kept
