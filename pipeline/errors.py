"""Errors every stage shares: the CLI turns a `UsageError` into one line on stderr and exit code 2."""


class UsageError(Exception):
    """Bad input or configuration, found before any work starts; nothing has been written."""
