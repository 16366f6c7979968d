"""`lbha healthd`: the engine, its plugins' services, the control socket and signals.

SIGTERM (or SIGINT) cancels one scope and everything under it stops in order; SIGHUP or
`lbha reload` re-reads the config, and a bad new config is refused with the old one kept.
One healthd per run directory (`run_healthd` takes the run lock before anything else).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import trio

from lbha.admin_state import AdminStore, StateFileError
from lbha.config import load_config
from lbha.control import serve_control
from lbha.engine import Engine, EngineError
from lbha.errors import ConfigError, ControlError
from lbha.hookspecs import DaemonContext, Service
from lbha.model import Config
from lbha.plugin_manager import PluginManager
from lbha.run_lock import RunLock
from lbha.table import Admin

log = logging.getLogger("lbha.healthd")

STATE_FILE = "healthd-state.json"


class Healthd:
    def __init__(self, config_path: Path, config: Config, plugins: PluginManager) -> None:
        self.config_path = config_path
        self.config = config
        self.plugins = plugins
        self.engine = Engine(
            config,
            plugins.checks,
            apply=lambda table: plugins.call("lbha_apply", desired=table),
            event=lambda event: plugins.call("lbha_event", event=event),
            admin_store=AdminStore(config.paths.state_dir / STATE_FILE),
        )

    def reload(self) -> str:
        """Load and switch to the config file; raises ConfigError and keeps the old one."""
        config = load_config(self.config_path, checks=self.plugins.checks)
        self.plugins.call("lbha_configure", config=config)
        self.engine.reload(config)
        self.config = config
        return f"reloaded {self.config_path}"

    def backends(self) -> dict[str, Any]:
        """What each backend plugin reports of the table it holds (lbha_status)."""
        merged: dict[str, Any] = {}
        for part in self.plugins.call("lbha_status"):
            if isinstance(part, dict):
                merged.update(part)
        return merged

    async def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        """Control socket commands: status, drain, halt, online, reload."""
        if cmd == "status":
            status = self.engine.status()
            status["backends"] = self.backends()
            return status
        if cmd in ("drain", "halt", "online"):
            rip = args.get("rip")
            vip = args.get("vip")
            if not isinstance(rip, str) or not (vip is None or isinstance(vip, str)):
                raise ControlError(f"{cmd} needs 'rip' (and 'vip' unless all VIPs) as strings")
            try:
                changed = self.engine.set_admin(Admin(cmd), vip, rip)
            except (EngineError, StateFileError) as exc:
                raise ControlError(str(exc)) from None
            return [f"{virtual}/{real}" for virtual, real in changed]
        if cmd == "reload":
            try:
                return self.reload()
            except ConfigError as exc:
                log.error("reload refused, keeping the running config:\n%s", exc)
                raise ControlError(f"reload refused, old config kept running:\n{exc}") from None
        raise ControlError(f"unknown command {cmd!r} (status, drain, halt, online, reload)")

    async def _signals(self, cancel: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    try:
                        log.info("%s", self.reload())
                    except ConfigError as exc:
                        log.error("reload refused, keeping the running config:\n%s", exc)
                else:
                    log.info("stopping on %s", signal.Signals(signum).name)
                    cancel.cancel()
                    return

    async def _guard(self, name: str, service: Service) -> None:
        try:
            await service()
        except Exception:
            log.exception("plugin service %s failed; the engine carries on without it", name)

    async def run(
        self, *, task_status: trio.TaskStatus[Healthd] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until SIGTERM/SIGINT; the caller holds the run lock (see `run_healthd`)."""
        context = DaemonContext("healthd", self.config)
        self.plugins.call("lbha_configure", config=self.config)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, nursery.cancel_scope)
                # The socket first: a path it cannot use stops the daemon before any backend
                # has touched the host.
                await nursery.start(serve_control, self.config.paths.healthd_socket, self.handle)
                for index, service in enumerate(self.plugins.call("lbha_start", context=context)):
                    nursery.start_soon(self._guard, getattr(service, "__qualname__", index),
                                       service)
                await nursery.start(self.engine.run)
                log.info("healthd running: %d virtual services, %d real servers",
                         len(self.config.virtuals),
                         sum(len(v.reals) for v in self.config.virtuals))
                task_status.started(self)
        finally:
            self.plugins.call("lbha_stop", context=context)


async def run_healthd(
    config_path: Path, config: Config, plugins: PluginManager, *,
    task_status: trio.TaskStatus[Healthd] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`lbha healthd`: take the run lock (RunLockError names the running PID), then run."""
    with RunLock(config.paths.run_dir, "healthd"):
        await Healthd(config_path, config, plugins).run(task_status=task_status)
