"""The one error type that command-line tools turn into a single line on stderr and exit code 2."""


class UsageError(Exception):
    """Bad input from the user: a missing file, an index out of range, a nonsensical flag."""
