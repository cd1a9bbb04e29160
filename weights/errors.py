"""The weights package's error and the one-line form every error message of the project takes."""
from __future__ import annotations


class WeightsError(ValueError):
    """A checkpoint problem, with a one-line message naming the file and the key or value at fault."""


def one_line(e: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line (whitespace runs collapsed), cut to `limit` characters, for the
    `error: ...` lines; the exception's type name when it has no message."""
    return " ".join(str(e).split())[:limit] or type(e).__name__
