"""Errors every stage shares: the CLI turns a `UsageError` into one line on stderr and exit code 2."""


class UsageError(Exception):
    """Bad input or configuration, found before any work starts; nothing has been written."""


class StageError(Exception):
    """A stage started but could not finish (e.g. a diverged loss); the CLI exits 1 with this message."""
