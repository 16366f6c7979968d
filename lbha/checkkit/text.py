"""Server text in reasons and transcripts, and the `receive` matcher."""

from __future__ import annotations

import functools
import re

from lbha.checkkit.errors import CheckFailed

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _text(data: bytes | bytearray | memoryview | str, limit: int | None) -> tuple[str, bool]:
    cut = limit is not None and len(data) > limit
    data = data[:limit]
    return (data if isinstance(data, str) else bytes(data).decode("utf-8", "replace")), cut


def quote(data: bytes | str, limit: int | None = 60, *, marks: bool = True) -> str:
    """Server text as a quoted one-liner for a reason: 'OK' (control characters as ?).

    At most `limit` characters (None: all); without `marks`, no quotes around it.
    """
    text, cut = _text(data, limit)
    text = _UNPRINTABLE.sub("?", text) + ("..." if cut else "")
    return f"'{text}'" if marks else text


def printable(data: bytes | bytearray | memoryview | str, limit: int = 160) -> str:
    """Received data as bounded one-line text, control characters escaped (\\r, \\x00)."""
    text, cut = _text(data, limit)
    text = _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)
    return text + ("..." if cut else "")


@functools.lru_cache(maxsize=256)
def _pattern(receive: str) -> re.Pattern[bytes] | re.Pattern[str]:
    """`receive` as a bytes regex (Perl matched bytes too); str when bytes cannot express it."""
    try:
        return re.compile(receive.encode("utf-8"))
    except re.error:
        try:
            return re.compile(receive)
        except re.error as exc:
            raise CheckFailed(f"receive {receive!r} is not a valid regex: {exc}") from None


def matches(data: bytes | str, receive: str, regex: bool) -> bool:
    """`receive` found in `data`: a substring, or a regex search with `regex`.

    Raises CheckFailed for a `receive` that is not a valid regex.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if not regex:
        return receive.encode("utf-8") in raw
    pattern = _pattern(receive)
    if isinstance(pattern.pattern, bytes):
        return pattern.search(raw) is not None  # type: ignore[arg-type]
    return pattern.search(raw.decode("utf-8", "replace")) is not None  # type: ignore[arg-type]
