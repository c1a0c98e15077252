"""Errors a user can fix; the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input, params or environment: the message says what is wrong and what to do."""
