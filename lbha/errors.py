"""Typed exceptions, one per failure family, each with a message an operator can act on."""

from __future__ import annotations

from dataclasses import dataclass


class LbhaError(Exception):
    """Base of every error lbha raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file."""

    source: str
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(LbhaError):
    """A config file is unreadable or invalid; carries every problem found, not only the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        count = len(problems)
        head = f"{count} problem{'s' if count != 1 else ''} in configuration"
        super().__init__("\n".join([head, *(f"  {p}" for p in problems)]))


class PluginError(LbhaError):
    """A plugin failed to load, to register or to run a hook."""


class ControlError(LbhaError):
    """A daemon's control socket could not be reached or refused a request."""
