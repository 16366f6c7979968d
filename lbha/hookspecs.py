"""The plugin contract (pluggy project name ``lbha``).

Hooks are synchronous and must return quickly: they register things, hand back an async
service for the daemon to run, or queue work. Built-in plugins use exactly these hooks.
A plugin is a module (or object) exposed under the ``lbha`` entry-point group (healthd and
the CLI load it) or ``lbha.events`` (the heartbeat loads it too: event hooks only, no check
types; see lbha.plugin_manager) whose functions are marked with ``@lbha.hookimpl``. Bump
HOOK_API_VERSION on incompatible change.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from lbha.checkapi import CheckRegistry
    from lbha.desired import DesiredTable
    from lbha.events import Event
    from lbha.model import Config

HOOK_API_VERSION = 1

hookspec = pluggy.HookspecMarker("lbha")
hookimpl = pluggy.HookimplMarker("lbha")

#: An async function a plugin wants run for the daemon's lifetime; cancelled at stop, so it
#: does its own bounded clean-up (`trio.move_on_after(t, shield=True)`) in `finally`.
Service = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class DaemonContext:
    """Which daemon is starting and with what config."""

    #: "healthd", "heartbeat" or "cli" (one-shot commands such as `lbha check`).
    daemon: str
    config: Config


@hookspec
def lbha_register_checks(registry: CheckRegistry) -> None:
    """Add check types with ``registry.add(check)``; see lbha.checkapi.CheckType."""


@hookspec
def lbha_start(context: DaemonContext) -> Service | None:
    """A daemon is starting. Return an async service to run in its nursery, or None."""


@hookspec
def lbha_configure(config: Config) -> None:
    """A config was loaded or reloaded (after validation, before the next ``lbha_apply``)."""


@hookspec
def lbha_apply(desired: DesiredTable) -> None:
    """The desired table changed. Remember it and wake your service; never block here."""


@hookspec
def lbha_event(event: Event) -> None:
    """Something happened (lbha.events). Queue it; never block here."""


@hookspec
def lbha_status() -> dict[str, Any] | None:
    """What this plugin holds now, for `lbha status`: ``{"its name": {JSON-able}}`` or None.

    Report what you already know (last reconcile, problems); never do I/O here.
    """


@hookspec
def lbha_stop(context: DaemonContext) -> None:
    """The daemon stopped cleanly; services were already cancelled."""
