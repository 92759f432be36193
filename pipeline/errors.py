"""Errors every stage shares: the CLI turns a `UsageError` into one line on stderr and exit code 2."""

import re

# How Python names an object by address ("<_io.BytesIO object at 0x7f3a...>"), as PIL's messages do
_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def without_addresses(message: str) -> str:
    """``message`` without the object addresses in it: the same failure then reads the same in every run."""
    return _ADDRESS.sub("", message)


class UsageError(Exception):
    """Bad input or configuration, found before any work starts; nothing has been written."""


class StageError(Exception):
    """A stage started but could not finish (e.g. a diverged loss); the CLI exits 1 with this message."""
