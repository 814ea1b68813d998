"""Errors a user can fix. The CLI prints them as one line and exits non-zero, never a traceback."""


class UserError(Exception):
    """Something the user can fix: bad spec, missing file, unreachable teacher, failed gate.

    The message must say what is wrong and how to fix it, in one line.
    """

    exit_code = 2


class GateFailed(UserError):
    """The teacher scored below the spec's threshold on the held-out test set."""

    exit_code = 3
