"""A small TOML emitter that, unlike a serializer, keeps comments where the importer puts them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

TomlValue = str | int | float | bool | list["TomlValue"] | dict[str, "TomlValue"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {
    '"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r",
}
# TOML forbids control characters (but tab) in comments and in literal strings.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def format_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else format_string(key)


def format_string(text: str) -> str:
    # Regexes are full of backslashes: a literal string shows them as the operator wrote them.
    if "\\" in text and "'" not in text and not _CONTROL.search(text):
        return f"'{text}'"
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif _CONTROL.match(char):
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def format_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} to TOML")
        return repr(value)
    if isinstance(value, str):
        return format_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    inner = ", ".join(f"{format_key(key)} = {format_value(item)}" for key, item in value.items())
    return "{ " + inner + " }" if inner else "{}"


def _comment_line(text: str) -> str:
    return ("# " + _CONTROL.sub("?", text)).rstrip()


@dataclass
class Table:
    """One `[name]` / `[[name]]` section (name None: the document's top-level keys)."""

    name: str | None = None
    array: bool = False
    _entries: list[tuple[str | None, TomlValue | str]] = field(default_factory=list)

    def set(self, key: str, value: TomlValue) -> None:
        """Set a key, replacing an earlier value in place."""
        for index, (existing, _) in enumerate(self._entries):
            if existing == key:
                self._entries[index] = (key, value)
                return
        self._entries.append((key, value))

    def get(self, key: str) -> TomlValue | None:
        for existing, value in self._entries:
            if existing == key:
                return value
        return None

    def remove(self, key: str) -> None:
        self._entries = [(k, v) for k, v in self._entries if k != key]

    def comment(self, text: str) -> None:
        self._entries.append((None, text))

    def keys(self) -> list[str]:
        return [key for key, _ in self._entries if key is not None]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def render(self) -> list[str]:
        lines = []
        if self.name is not None:
            lines.append(f"[[{self.name}]]" if self.array else f"[{self.name}]")
        for key, value in self._entries:
            if key is None:
                lines.extend(_comment_line(part) for part in str(value).splitlines() or [""])
            else:
                lines.append(f"{format_key(key)} = {format_value(value)}")
        return lines


@dataclass
class Document:
    """Tables in output order; empty non-array tables are left out."""

    tables: list[Table] = field(default_factory=list)

    def table(self, name: str | None = None, *, array: bool = False) -> Table:
        new = Table(name, array)
        self.tables.append(new)
        return new

    def render(self) -> str:
        blocks = [t.render() for t in self.tables if t or t.array]
        return "\n\n".join("\n".join(block) for block in blocks) + "\n"
