"""The schema engine of the config loader: typed reading of TOML tables.

A `Table` reads keys by type (strings, bounded integers, durations with floors, choices,
addresses, lists, sub-tables), records each problem with its key path and line in a
`Context`, and reports keys nobody asked for as unknown. Sections (`lbha.config`,
`lbha.config_virtual`) say what to read; this module knows how.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any, TypeVar

from lbha.checkapi import CheckRegistry
from lbha.durations import format_duration, parse_duration
from lbha.errors import Problem
from lbha.model import (
    BUILTIN_CHECK_TYPES,
    ENGINE_CHECK_TYPES,
    NEGOTIATE_SERVICES,
    IPAddress,
)
from lbha.toml_locator import Locator

#: Timer floors (docs/config.md, "Timer floors"): below them a setting cannot do its job on a
#: general-purpose kernel (scheduling jitter alone is a few ms) and only burns CPU or fails
#: over on noise. deadtime >= 2 x keepalive and keepalive < warntime < deadtime <= initdead
#: are checked too.
MIN_KEEPALIVE = 0.01
#: Check intervals and timeouts, feedback intervals, ping_timeout, garp_interval.
MIN_TIMER = 0.01
#: garp_refresh, when not 0 (off).
MIN_GARP_REFRESH = 0.1
#: IPVS / HAProxy reconcile intervals: each pass reads the whole kernel / HAProxy table.
MIN_RECONCILE = 0.1

KeyPath = tuple[str | int, ...]
T = TypeVar("T")
MISSING: Any = object()


#: Keys whose value is a secret: an error about one never quotes the value.
SECRET_KEYS = frozenset({"password", "secret", "community"})


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class Context:
    def __init__(self, source: str, text: str, checks: CheckRegistry | None,
                 judge_checks: bool = True) -> None:
        self.source = source
        self.locator = Locator(text)
        self.checks = checks
        self.judge_checks = judge_checks
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []

    @cached_property
    def check_names(self) -> tuple[frozenset[str], frozenset[str]]:
        """Check types and negotiate services known, with the plugins' (asked once)."""
        types = ENGINE_CHECK_TYPES | BUILTIN_CHECK_TYPES
        services = NEGOTIATE_SERVICES
        if self.checks is not None:
            negotiate = self.checks.negotiate_names()
            types |= {n for n in self.checks if n not in negotiate}
            services |= negotiate
        return types, services

    def _problem(self, path: KeyPath, message: str) -> Problem:
        return Problem(self.source, format_path(path), message, self.locator.line(path))

    def error(self, path: KeyPath, message: str) -> None:
        self.errors.append(self._problem(path, message))

    def warn(self, path: KeyPath, message: str) -> None:
        self.warnings.append(self._problem(path, message))


def type_name(value: object) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "an array", dict: "a table",
    }.get(type(value), type(value).__name__)


def did_you_mean(word: str, choices: set[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class Table:
    """One TOML table being read; every key asked for becomes a known key."""

    def __init__(self, ctx: Context, value: object, path: KeyPath) -> None:
        self.ctx = ctx
        self.path = path
        self.known: set[str] = set()
        if isinstance(value, dict):
            self.data: dict[str, Any] = value
        else:
            if value is not None:
                ctx.error(path, f"expected a table, got {type_name(value)}")
            self.data = {}

    def has(self, key: str) -> bool:
        self.known.add(key)
        return key in self.data

    def raw(self, key: str) -> Any:
        self.known.add(key)
        return self.data.get(key, MISSING)

    def error(self, key: str | int | None, message: str) -> None:
        self.ctx.error(self.path if key is None else (*self.path, key), message)

    def _get(
        self, key: str, default: T, required: bool, check: Callable[[Any], T | None], want: str
    ) -> T:
        value = self.raw(key)
        if value is MISSING:
            if required:
                self.error(None, f"missing required key {key!r}")
            return default
        converted = check(value)
        if converted is None:
            shown = "" if key in SECRET_KEYS else f" {value!r}"
            self.error(key, f"expected {want}, got {type_name(value)}{shown}")
            return default
        return converted

    def str(self, key: str, default: T = None, required: bool = False) -> str | T:  # type: ignore[assignment]
        return self._get(key, default, required, lambda v: v if isinstance(v, str) else None,
                         "a string")

    def bool(self, key: str, default: bool) -> bool:
        return self._get(key, default, False, lambda v: v if isinstance(v, bool) else None,
                         "true or false")

    def int(self, key: str, default: T, lo: int, hi: int, required: bool = False) -> int | T:
        value = self._get(
            key, MISSING, required,
            lambda v: v if isinstance(v, int) and not isinstance(v, bool) else None,
            "an integer",
        )
        if value is MISSING:
            return default
        if not lo <= value <= hi:
            self.error(key, f"{value} is out of range {lo}..{hi}")
            return default
        return value

    def duration(
        self, key: str, default: T, positive: bool = True, minimum: float = 0.0
    ) -> float | T:
        """A duration; `minimum` is a floor below which the setting cannot work (0 is "off"
        where `positive` is false, and is then allowed under the floor)."""
        value = self.raw(key)
        if value is MISSING:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.error(key, str(exc))
            return default
        if positive and seconds <= 0:
            self.error(key, f"must be greater than 0, got {value!r}")
            return default
        if seconds < minimum and (positive or seconds > 0):
            self.error(key, f"{value!r} is below the floor of {format_duration(minimum)} "
                       "(see docs/config.md, \"Timer floors\")")
            return default
        return seconds

    def choice(self, key: str, default: T, choices: type[Any] | frozenset[str]) -> Any:
        names = (
            frozenset(str(c.value) for c in choices) if isinstance(choices, type)
            else choices
        )
        value = self.str(key, MISSING)
        if value is MISSING:
            return default
        if value not in names:
            self.error(key, f"{value!r} is not one of {', '.join(sorted(names))}"
                       f"{did_you_mean(value, names)}")
            return default
        return choices(value) if isinstance(choices, type) else value

    def address(self, key: str, required: bool = False) -> IPAddress | None:
        value = self.str(key, None, required)
        return None if value is None else parse_address(self, key, value)

    def list(self, key: str) -> list[Any]:
        value = self.raw(key)
        if value is MISSING:
            return []
        if not isinstance(value, list):
            self.error(key, f"expected an array, got {type_name(value)} {value!r}")
            return []
        return value

    def str_list(self, key: str) -> list[str]:
        out = []
        for i, item in enumerate(self.list(key)):
            if isinstance(item, str):
                out.append(item)
            else:
                self.ctx.error((*self.path, key, i), f"expected a string, got {item!r}")
        return out

    def address_list(self, key: str) -> tuple[IPAddress, ...]:
        found = []
        for i, item in enumerate(self.str_list(key)):
            if (addr := parse_address(self, (key, i), item)) is not None:
                found.append(addr)
        return tuple(found)

    def table(self, key: str) -> Table:
        return Table(self.ctx, self.raw(key) if self.has(key) else {}, (*self.path, key))

    def tables(self, key: str) -> Iterator[Table]:
        for i, item in enumerate(self.list(key)):
            yield Table(self.ctx, item, (*self.path, key, i))

    def finish(self) -> None:
        for key in self.data:
            if key not in self.known:
                self.error(key, f"unknown key {key!r}{did_you_mean(key, self.known)}")


def parse_address(table: Table, key: str | tuple[str, int], value: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        path = (*table.path, *(key if isinstance(key, tuple) else (key,)))
        table.ctx.error(path, f"{value!r} is not a valid IPv4 or IPv6 address")
        return None


def floating_problem(address: IPAddress, device: str | None, scope_hint: str) -> str | None:
    """Why `address` cannot float (be added to an interface and announced), or None;
    `scope_hint` says how to give a link-local address its interface."""
    if address.is_multicast:
        return f"{address} is a multicast address; a floating IP must be unicast"
    if address.is_unspecified or address == ipaddress.IPv4Address("255.255.255.255"):
        return f"{address} is not a host address"
    if address.is_link_local and device is None:
        return f"{address} is link-local: it exists on every interface, so {scope_hint}"
    return None


def email_address(t: Table, key: str | tuple[str, int], value: str) -> None:
    if not re.fullmatch(r"[^@\s]+@[^@\s]+", value):
        path = (*t.path, *(key if isinstance(key, tuple) else (key,)))
        t.ctx.error(path, f"{value!r} is not an email address")
