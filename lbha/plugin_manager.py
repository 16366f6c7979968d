"""Loads built-in and third-party plugins alike from entry points.

Two groups, by which process loads them:

- ``lbha``: any plugin (check types, backends such as IPVS and HAProxy, event sinks); loaded
  by healthd and the CLI, never by the heartbeat.
- ``lbha.events``: event plugins (``lbha_event``, ``lbha_configure``, ``lbha_start``, ...);
  loaded by healthd, the CLI and the heartbeat. The heartbeat is the small high-priority HA
  process, so these must not provide check types nor import heavy libraries.

A plugin that fails to import, to register or in a hook is reported by name and left out;
it never takes the daemon down.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from lbha import hookspecs
from lbha.checkapi import CheckRegistry

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lbha"
EVENTS_GROUP = "lbha.events"
ALL_GROUPS = (ENTRY_POINT_GROUP, EVENTS_GROUP)


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    module: str
    group: str = ENTRY_POINT_GROUP


@dataclass(frozen=True)
class PluginFailure:
    name: str
    distribution: str
    stage: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.name!r} ({self.distribution}) failed to {self.stage}: {self.error}"


class PluginManager:
    """A typed facade over pluggy that isolates plugins from each other."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager("lbha")
        self._pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[PluginFailure] = []
        self.checks = CheckRegistry()

    def load_entry_points(
        self, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
        groups: Iterable[str] = ALL_GROUPS,
    ) -> None:
        """Import every plugin of `groups`; failures are recorded, logged and skipped."""
        if entry_points is None:
            entry_points = [ep for group in groups
                            for ep in importlib.metadata.entry_points(group=group)]
        for ep in sorted(entry_points, key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if ep.name in self.plugins:
                self._fail(ep.name, dist, "load", "another plugin already uses this name")
                continue
            try:
                module = ep.load()
                self._pm.register(module, name=ep.name)
            except Exception as exc:  # noqa: BLE001 - any plugin bug must be contained
                self._fail(ep.name, dist, "load", f"{type(exc).__name__}: {exc}")
                continue
            if ep.group == EVENTS_GROUP and self._registers_checks(ep.name):
                self._pm.unregister(name=ep.name)
                self._fail(ep.name, dist, "load", f"it is in the {EVENTS_GROUP} group, which the "
                           f"heartbeat loads too, but provides check types; publish it in the "
                           f"{ENTRY_POINT_GROUP} group")
                continue
            self.plugins[ep.name] = PluginInfo(ep.name, dist, version, ep.value, ep.group)

    def _registers_checks(self, name: str) -> bool:
        return any(impl.plugin_name == name
                   for impl in self._pm.hook.lbha_register_checks.get_hookimpls())

    def register(self, plugin: object, name: str, distribution: str = "lbha") -> None:
        """Register an in-process plugin object (tests, embedding)."""
        self._pm.register(plugin, name=name)
        self.plugins[name] = PluginInfo(name, distribution, "-", repr(plugin))

    def register_checks(self) -> CheckRegistry:
        """Ask every plugin for its check types, one plugin at a time."""
        for impl in self._pm.hook.lbha_register_checks.get_hookimpls():
            self.checks.current_plugin = impl.plugin_name
            try:
                impl.function(registry=self.checks)
            except Exception as exc:  # noqa: BLE001
                self._fail_plugin(impl.plugin_name, "register checks", exc)
                # Half-registered plugins are worse than absent ones: take it out entirely.
                self._pm.unregister(name=impl.plugin_name)
                self.checks.remove_plugin(impl.plugin_name)
                self.plugins.pop(impl.plugin_name, None)
        self.checks.current_plugin = "<unknown>"
        return self.checks

    def call(self, hook: str, **kwargs: Any) -> list[Any]:
        """Call a hook on each plugin separately; a raising plugin is reported and skipped."""
        results = []
        for impl in getattr(self._pm.hook, hook).get_hookimpls():
            try:
                result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception as exc:  # noqa: BLE001
                self._fail_plugin(impl.plugin_name, hook, exc)
                continue
            if result is not None:
                results.append(result)
        return results

    def _fail_plugin(self, name: str, stage: str, exc: Exception) -> None:
        info = self.plugins.get(name)
        self._fail(name, info.distribution if info else "?", stage, f"{type(exc).__name__}: {exc}")

    def _fail(self, name: str, dist: str, stage: str, error: str) -> None:
        failure = PluginFailure(name, dist, stage, error)
        self.failures.append(failure)
        log.error("%s; continuing without it", failure)


def load_plugins() -> PluginManager:
    """A manager with every installed plugin loaded and its check types registered."""
    manager = PluginManager()
    manager.load_entry_points()
    manager.register_checks()
    return manager


def load_event_plugins() -> PluginManager:
    """The heartbeat's manager: the event plugins only, so the HA process never imports
    check libraries or the IPVS / HAProxy backends."""
    manager = PluginManager()
    manager.load_entry_points(groups=(EVENTS_GROUP,))
    return manager
