"""Find the line of a key path in TOML text, since tomllib reports no positions.

A light line scanner: it follows `[table]` and `[[array]]` headers (counting array entries)
and `key = value` lines, skipping multi-line strings. Keys inside inline tables and arrays are
not indexed; a lookup then falls back to the nearest enclosing key that is.
"""

from __future__ import annotations

import re

Path = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_PART = r"(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-]+)"
_KEY = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=")
_KEY_PART = re.compile(r"\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_\-]+)")


def _split_key(dotted: str) -> list[str]:
    return [a or b or c for a, b, c in _KEY_PART.findall(dotted)]


class Locator:
    """Maps key paths such as ("virtual", 1, "real", 0, "port") to 1-based line numbers."""

    def __init__(self, text: str) -> None:
        self._lines: dict[Path, int] = {}
        self._scan(text)

    def _scan(self, text: str) -> None:
        counts: dict[Path, int] = {}
        table: Path = ()
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_multiline is not None:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            if (header := _HEADER.match(line)) is not None:
                parts = _split_key(header.group(2))
                if header.group(1) == "[[":
                    base = (*self._resolve(parts[:-1], counts), parts[-1])
                    index = counts.get(base, -1) + 1
                    counts[base] = index
                    table = (*base, index)
                else:
                    table = self._resolve(parts, counts)
                self._lines.setdefault(table, number)
                continue
            if (key := _KEY.match(line)) is not None:
                path = (*table, *_split_key(key.group(1)))
                self._lines.setdefault(path, number)
                rest = line[key.end():]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2 == 1:
                        in_multiline = quote
                        break

    @staticmethod
    def _resolve(parts: list[str], counts: dict[Path, int]) -> Path:
        """Turn `virtual.real` into ("virtual", <current index>, "real")."""
        path: Path = ()
        for part in parts:
            path = (*path, part)
            if path in counts:
                path = (*path, counts[path])
        return path

    def line(self, path: Path) -> int | None:
        """Line of `path` or of its nearest indexed ancestor."""
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return None
