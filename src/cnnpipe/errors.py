"""Errors a user can fix; the CLI prints them as one line and exits non-zero."""

import re

_LINE_BREAKS = re.compile(r"\s*[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]\s*")
MAX_MESSAGE = 600  # characters: a message quoting hostile input stays one readable line


class UserError(Exception):
    """Bad input, params or environment: the message says what is wrong and what to do.

    The message is made one line (newlines become spaces) and capped at `MAX_MESSAGE`
    characters here, the one place every error passes, since messages quote what the user gave
    (a value, a file name, a server's answer) and that can be of any size."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` on one line, cut to `limit` characters with a note of how many were left out."""
    flat = _LINE_BREAKS.sub(" ", str(text)).strip()
    if len(flat) <= limit:
        return flat
    cut = limit - 40
    return f"{flat[:cut]}… ({len(flat) - cut:,} more characters)"


def first_line(err: BaseException) -> str:
    """The first line of what `err` says (a library's message can run to a traceback's
    length), or its type's name when it says nothing."""
    text = str(getattr(err, "message", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__
