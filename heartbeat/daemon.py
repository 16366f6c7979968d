"""The trio driver: feeds frames, timers and commands to the state machine, runs its actions.

`Heartbeat` is the core (no signals, no config files: tests run two of them on a fake network
under MockClock). `run_daemon` wraps it for `lbha heartbeat`: config and key file, plugins,
control socket, SIGTERM/SIGINT (one cancel scope) and SIGHUP (reload).

Every state machine step runs under one lock and its actions run in order before the next
step, so a Release always completes before the frame saying PASSIVE leaves. The address
manager's watch (link_watch.py) reports carrier changes as state machine events and missing
floating IPs, which the active node re-adds under the same lock.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from lbha.config import load_config
from lbha.control import serve_control
from lbha.errors import ConfigError, ControlError
from lbha.events import ClusterEvent, Event, Severity
from lbha.heartbeat import fsm
from lbha.heartbeat.errors import HeartbeatError
from lbha.heartbeat.floating_ips import AddressManager, NetlinkAddresses, floating_ips
from lbha.heartbeat.generation import FILE_NAME as GENERATION_FILE
from lbha.heartbeat.generation import GenerationStore
from lbha.heartbeat.keepalive_pump import KeepalivePump
from lbha.heartbeat.protocol import (
    AUTH_FAILURES,
    Frame,
    KeyRing,
    Receiver,
    Verdict,
    dropped,
    load_key_file,
)
from lbha.heartbeat.transport import ThreadedUdpTransport, Transport
from lbha.hookspecs import DaemonContext
from lbha.model import ClusterConfig, Config, Role
from lbha.plugin_manager import PluginManager, load_event_plugins
from lbha.run_lock import RunLock

log = logging.getLogger(__name__)

#: Bound on the clean-up at stop (release the IPs, say LEAVING), even if netlink hangs.
STOP_TIMEOUT = 5.0
#: At most one warning this often about frames of an old generation.
STALE_WARNING_INTERVAL = 60.0
#: At most one warning this often per kind of authentication failure from the peer.
AUTH_WARNING_INTERVAL = 60.0

Emit = Callable[[Event], None]


def settings_from(cluster: ClusterConfig) -> fsm.Settings:
    if len(cluster.peers) != 1:
        raise HeartbeatError(f"lbha heartbeat manages a pair: expected one peer in "
                             f"[[cluster.peers]], got {len(cluster.peers)}")
    return fsm.Settings(
        node=cluster.node,
        peer=cluster.peers[0].name,
        master=cluster.role is Role.MASTER,
        auto_failback=cluster.auto_failback,
        timers=fsm.Timers(cluster.keepalive, cluster.warntime, cluster.deadtime,
                          cluster.initdead),
    )


def load_keys(cluster: ClusterConfig) -> KeyRing | None:
    """The key ring, or None only when the config says auth = "none"."""
    if cluster.auth == "none":
        log.warning("auth = \"none\": heartbeat frames are NOT authenticated (lab use only)")
        return None
    if cluster.auth_key_file is None:
        raise HeartbeatError("no auth_key_file in [cluster] (set auth = \"none\" for a lab)")
    return load_key_file(cluster.auth_key_file)


class Heartbeat:
    """One node of the pair: state machine + transport + floating IPs."""

    def __init__(self, config: Config, keys: KeyRing | None, transport: Transport,
                 addresses: AddressManager, emit: Emit,
                 generations: GenerationStore | None = None) -> None:
        assert config.cluster is not None
        cluster = config.cluster
        self.cluster = cluster
        self._ips = floating_ips(config)
        self.settings = settings_from(cluster)
        self.transport = transport
        self.addresses = addresses
        self.emit = emit
        # Without a store (tests) the generation comes from the clock alone.
        self._generations = generations
        now_us = time.time_ns() // 1000
        self.generation = generations.start(now_us) if generations is not None else now_us
        floors = generations.peers if generations is not None else {}
        self.receiver = Receiver(cluster.cluster_id, cluster.node, {self.settings.peer}, keys,
                                 transport.links(), floors=floors)
        self.pump = KeepalivePump(
            self.receiver, keys, cluster_id=cluster.cluster_id, node=cluster.node,
            generation=self.generation, interval=cluster.keepalive, deadtime=cluster.deadtime)
        #: Frames the pump handed over that this daemon has handled.
        self._handled = 0
        self._peer_generation = floors.get(self.settings.peer, 0)
        self._state_limiter = trio.CapacityLimiter(1)
        self._stale_warned = -math.inf
        self._auth_warned: dict[tuple[Verdict, bool], float] = {}
        self.state = fsm.initial(trio.current_time())
        self._publish()
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._announcing: trio.CancelScope | None = None
        self._changed = trio.Event()
        self._started_wall = time.time()
        self._garp_count = cluster.garp_count
        #: Floating IPs re-added after something else removed them.
        self._restored = 0
        #: Why the last acquire did not place every floating IP (None: it did).
        self._address_error: str | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; on the way out release the IPs and tell the peer, bounded.

        Refuses to start (FloatingIPError, nothing changed) when a floating IP cannot be
        placed on this host: a node that cannot serve must not claim to."""
        await self.addresses.check(self._ips)
        await self.transport.open()
        try:
            # A passive start must not leave addresses a crashed run left behind.
            await self.addresses.release()
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    # The carrier is known before any frame can make this node take over.
                    await nursery.start(self.addresses.watch, self)
                    await nursery.start(self.transport.run, self.pump, self)
                    task_status.started()
            finally:
                self._nursery = None
                with trio.move_on_after(STOP_TIMEOUT, shield=True) as scope:
                    await self._stop()
                if scope.cancelled_caught:
                    log.error("stop clean-up did not finish within %gs; floating IPs may "
                              "remain", STOP_TIMEOUT)
        finally:
            self.transport.close()
            self.addresses.close()

    async def _stop(self) -> None:
        if self._announcing is not None:
            self._announcing.cancel()
        async with self._lock:
            await self._handle(fsm.Stop(trio.current_time()))
            await self._send()  # a second LEAVING, in case the first is lost

    async def on_frame(self, verdict: Verdict, frame: Frame | None, link: str) -> None:
        """transport.Sink: a frame the pump handed over, or a stale verdict."""
        if frame is None:
            if verdict is Verdict.STALE_GENERATION and self._generations is not None:
                self._warn_stale(link)
            elif verdict in AUTH_FAILURES:
                self._warn_auth(verdict, link)
            return
        if frame.generation > self._peer_generation:
            self._peer_generation = frame.generation
            self._peer_restarted(frame.node, frame.generation)
        await self._handle_handed(fsm.Received(trio.current_time(), link, frame.state,
                                               frame.flags))

    def _warn_stale(self, link: str) -> None:
        # Authenticated but older than the newest generation seen: a replay, or a peer that
        # lost its state_dir while its clock is behind; the latter needs an operator.
        now = trio.current_time()
        if now - self._stale_warned < STALE_WARNING_INTERVAL:
            return
        self._stale_warned = now
        assert self._generations is not None
        log.warning("dropping authenticated frames on %s from an older generation of %s than "
                    "the newest seen: a replay, or %s lost its state_dir while its clock is "
                    "behind; if so, fix its clock or delete %s here and restart", link,
                    self.settings.peer, self.settings.peer, self._generations.path)

    def _warn_auth(self, verdict: Verdict, link: str) -> None:
        # Without it, nodes with different keys only log "peer dead", both of them active.
        # Limited per kind and per peer liveness, so a key changed on one node is named as
        # soon as the peer counts as dead, even after the warning while it was alive.
        now = trio.current_time()
        alive = self.state.peer_alive
        if now - self._auth_warned.get((verdict, alive), -math.inf) < AUTH_WARNING_INTERVAL:
            return
        self._auth_warned[(verdict, alive)] = now
        peer = self.settings.peer
        if alive:
            log.warning("frames with the address of %s on %s fail authentication (%s) while "
                        "its frames are still valid: forged frames on the LAN, or a key "
                        "changed on one node only", peer, link, verdict)
            return
        log.warning("frames from %s on %s fail authentication (%s): likely %s; until "
                    "fixed each node takes the other for dead and both hold the floating "
                    "IPs", peer, link, verdict, AUTH_FAILURES[verdict])

    def _peer_restarted(self, node: str, generation: int) -> None:
        # Once per boot of the peer, but an fsync: kept off the trio thread.
        if self._nursery is not None and self._generations is not None:
            self._nursery.start_soon(partial(
                trio.to_thread.run_sync, self._generations.saw_peer, node, generation,
                limiter=self._state_limiter))

    async def on_deadline(self) -> None:
        """transport.Sink: the state machine's next deadline has come."""
        await self._handle_handed(fsm.Tick(trio.current_time()))

    async def on_carrier(self, down: frozenset[str]) -> None:
        """link_watch.Sink: the devices carrying floating IPs without carrier are `down`."""
        async with self._lock:
            await self._handle(fsm.Carrier(trio.current_time(), down))

    async def on_address_lost(self) -> None:
        """link_watch.Sink: a floating IP may have been removed behind our back. Re-added
        only while active, under the lock our own releases hold, so never fought over."""
        async with self._lock:
            if not self.state.active or self.state.leaving:
                return
            added = await self._acquire("restoring removed floating IPs")
            if not added:
                return
            self._restored += len(added)
            what = ", ".join(added)
            await self._start_announcing(f"restored {what}")
            self._notify(fsm.Notify("floating_ip_restored", "warning", "missing", "held",
                                    f"{what} removed behind lbha's back; re-added and "
                                    "announced"))

    async def _acquire(self, reason: str) -> list[str]:
        """Place every floating IP it can; the addresses added (caller holds the lock)."""
        try:
            added = await self.addresses.acquire()
        except HeartbeatError as exc:
            log.error("floating IPs (%s): %s", reason, exc)
            self._address_error = str(exc)
            return []
        self._address_error = None
        return added or []

    async def _handle_handed(self, event: fsm.Event) -> None:
        """Handle what the pump handed over, then count it, so the routine filter published
        next is known to include its effect."""
        async with self._lock:
            try:
                await self._handle(event)
            finally:
                self._handled += 1
                self._expect()

    # ------------------------------------------------------------------ actions

    def _sync(self) -> None:
        """Give the state machine the times of the routine frames the pump took (caller holds
        the lock)."""
        for a in self.pump.arrivals():
            self.state = fsm.heard(self.state, a.link, a.at)

    async def _handle(self, event: fsm.Event) -> list[fsm.Action]:
        """Apply one event after the routine frames before it (caller holds the lock)."""
        self._sync()
        return await self._step(event)

    async def _step(self, event: fsm.Event) -> list[fsm.Action]:
        """Apply one event and carry out its actions, in order (caller holds the lock)."""
        old = self.state
        self.state, actions = fsm.step(self.settings, self.state, event)
        for action in actions:
            await self._do(action)
        self._publish()
        if self.state != old:
            self._changed.set()
            self._changed = trio.Event()
        return actions

    async def _do(self, action: fsm.Action) -> None:
        if isinstance(action, fsm.Acquire):
            await self._acquire(action.reason)
            await self._start_announcing(action.reason)
        elif isinstance(action, fsm.Release):
            if self._announcing is not None:
                self._announcing.cancel()
            try:
                await self.addresses.release()
            except HeartbeatError as exc:
                log.error("release (%s): %s", action.reason, exc)
        elif isinstance(action, fsm.Announce):
            await self._start_announcing(action.reason)
        elif isinstance(action, fsm.Send):
            await self._send()
        elif isinstance(action, fsm.Notify):
            self._notify(action)
        elif isinstance(action, fsm.Log):
            log.log(logging.getLevelName(action.level.upper()), "%s", action.message)

    async def _start_announcing(self, reason: str) -> None:
        if self._nursery is None or self._garp_count <= 0:
            return
        if self._announcing is not None:
            self._announcing.cancel()
        # The first at once, before the rest of the step (events, logs, our frame): until
        # it arrives, clients send to the node that released the addresses.
        announced = await self.addresses.announce()
        if announced:
            log.info("announced floating IPs %s (%s)", ", ".join(announced), reason)
        scope = trio.CancelScope()
        self._announcing = scope
        self._nursery.start_soon(self._announce, scope)

    async def _announce(self, scope: trio.CancelScope) -> None:
        with scope:
            for _ in range(self._garp_count - 1):
                await trio.sleep(self.cluster.garp_interval)
                await self.addresses.announce()
            while self.cluster.garp_refresh > 0:
                await trio.sleep(self.cluster.garp_refresh)
                await self.addresses.announce()

    def _tell_state(self) -> None:
        # Only where the peer may hear our new state: at a Send action (after the Release
        # before it) or once every action of a step is done. Never mid-step.
        self.pump.announce(fsm.frame_state(self.state),
                           fsm.frame_flags(self.settings, self.state))

    def _expect(self) -> None:
        self.pump.expect(fsm.routine(self.settings, self.state),
                         fsm.deadline(self.settings, self.state), self._handled)

    def _publish(self) -> None:
        self._tell_state()
        self._expect()

    async def _send(self) -> None:
        self._tell_state()
        await self.transport.send(self.pump.frame())

    def _notify(self, action: fsm.Notify) -> None:
        # Not logged here: the built-in log plugin logs every event, as for the health engine.
        message = f"{self.cluster.node}: {action.kind.replace('_', ' ')}: {action.reason}"
        self.emit(ClusterEvent(
            kind=action.kind, message=message, severity=Severity(action.severity),
            node=self.cluster.node,
            old_state=action.old_state, new_state=action.new_state, peer=self.settings.peer,
            reason=action.reason,
        ))

    # ------------------------------------------------------------------ commands

    async def command(self, cmd: str, args: dict[str, Any]) -> Any:
        """Control socket handler: status, takeover, standby."""
        if cmd == "status":
            return await self.status()
        if cmd in ("takeover", "standby"):
            return await self._manual(cmd)
        raise ControlError(f"unknown command {cmd!r} (status, takeover, standby)")

    async def _manual(self, cmd: str) -> dict[str, Any]:
        event = fsm.Takeover if cmd == "takeover" else fsm.Standby
        async with self._lock:
            actions = await self._handle(event(trio.current_time()))
        reply = next((a for a in actions if isinstance(a, fsm.Reply)), None)
        if reply is not None and not reply.ok:
            raise ControlError(reply.message)
        if cmd == "takeover" and reply is None:
            # Wait (bounded) for the peer to release and for us to take over.
            with trio.move_on_after(2 * self.settings.timers.deadtime + 1):
                while not self.state.active:
                    await self._changed.wait()
            if not self.state.active:
                raise ControlError("takeover requested but this node is not active yet; "
                                   "see `lbha cluster-status`")
            return {"message": "now active", **await self.status()}
        return {"message": reply.message if reply else "done", **await self.status()}

    async def status(self) -> dict[str, Any]:
        if not self._lock.locked():  # a step under way owns the state (it may be in netlink)
            self._sync()
        s = self.state
        age = None if s.last_heard is None else trio.current_time() - s.last_heard
        try:
            held = await self.addresses.held()
        except HeartbeatError as exc:
            held = [f"unknown ({exc})"]
        verdicts = self.pump.verdicts()
        return {
            "node": self.cluster.node,
            "role": "master" if self.settings.master else "slave",
            "state": "active" if s.active else "passive",
            "starting": s.starting,
            "link": "up" if s.links else "down",
            "links": sorted(s.links),
            "peer": self.settings.peer,
            "peer_state": s.peer_state.name.lower() if s.peer_state is not None else "dead",
            "last_keepalive_age": age,
            "floating_ips": held,
            "floating_ip_error": self._address_error,
            "floating_ips_restored": self._restored,
            "no_carrier": sorted(s.no_carrier),
            "takeover_pending": s.takeover_pending,
            "yielded": s.yielded,
            "auto_failback": self.settings.auto_failback,
            "frames_sent": self.pump.sent,
            "frames_accepted": verdicts[Verdict.OK],
            "frames_dropped": dropped(verdicts),
            "uptime": time.time() - self._started_wall,
        }

    # ------------------------------------------------------------------ reload

    async def reconfigure(self, config: Config, keys: KeyRing | None) -> None:
        """Apply a reloaded config: timers, failback, keys, floating IPs. Not node/peer/port.
        Refused, changing nothing, when a floating IP could not be placed on this host."""
        cluster = config.cluster
        assert cluster is not None
        try:
            await self.addresses.check(floating_ips(config))
        except HeartbeatError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return
        new = settings_from(cluster)
        if (new.node, new.peer, new.master) != (self.settings.node, self.settings.peer,
                                                self.settings.master) \
                or (cluster.udp_port, cluster.bind, cluster.peers) != (
                    self.cluster.udp_port, self.cluster.bind, self.cluster.peers):
            log.warning("reload: node, role, peer, port and bind changes need a restart of "
                        "lbha heartbeat; keeping the running values for those")
            new = replace(new, node=self.settings.node, peer=self.settings.peer,
                          master=self.settings.master)
        async with self._lock:
            self.settings = new
            self.pump.reconfigure(keys, cluster.keepalive, cluster.deadtime)
            self.cluster = replace(cluster, node=self.cluster.node, peers=self.cluster.peers,
                                   role=self.cluster.role, udp_port=self.cluster.udp_port,
                                   bind=self.cluster.bind)
            self._garp_count = cluster.garp_count
            old_ips = {str(f.address) for f in self._ips}
            self._ips = floating_ips(config)
            self.addresses.reconfigure(self._ips)
            dropped = old_ips - {str(f.address) for f in self._ips}
            try:
                if dropped:
                    await self.addresses.remove(dropped)
                if self.state.active:
                    await self._acquire("reload")
                    await self._start_announcing("reload")
            except HeartbeatError as exc:
                log.error("reload: floating IPs not fully applied: %s", exc)
            self._expect()  # the timers may have changed
        log.info("reloaded configuration")


# ---------------------------------------------------------------------- the process


class _Plugins:
    """Emits events through the plugin manager; a failing plugin never stops the daemon."""

    def __init__(self, manager: PluginManager) -> None:
        self.manager = manager

    def emit(self, event: Event) -> None:
        self.manager.call("lbha_event", event=event)


def _load(path: Path) -> tuple[Config, KeyRing | None]:
    # No check plugin is loaded here: checks are healthd's to judge (and `config check`'s).
    config = load_config(path, judge_checks=False)
    if config.cluster is None:
        raise HeartbeatError(f"{path}: no [cluster] section; lbha heartbeat needs one")
    return config, load_keys(config.cluster)


#: SCHED_RR priority: above ordinary work, below the kernel's own real-time threads.
REALTIME_PRIORITY = 10
#: Bit of CAP_SYS_NICE in /proc/self/status CapEff.
_CAP_SYS_NICE = 23
_POLICY_NAMES = {os.SCHED_RR: "SCHED_RR", os.SCHED_FIFO: "SCHED_FIFO"}


def _go_realtime() -> None:
    """Keepalives must not wait behind a busy machine: run at a real-time priority, as the
    service manager set it (the unit's CPUSchedulingPolicy=rr) or by asking for it."""
    policy = os.sched_getscheduler(0)
    reset_on_fork = bool(policy & os.SCHED_RESET_ON_FORK)
    policy &= ~os.SCHED_RESET_ON_FORK
    if policy in _POLICY_NAMES and not reset_on_fork:
        # Threads started from now on, the keepalive thread among them, inherit it.
        log.info("real-time priority (%s %d) set by the service manager", _POLICY_NAMES[policy],
                 os.sched_getparam(0).sched_priority)
        return
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(REALTIME_PRIORITY))
    except OSError as exc:
        log.warning("cannot take real-time priority (%s: %s); keepalives may be delayed on a "
                    "busy machine and cause false failovers. Under systemd set "
                    "CPUSchedulingPolicy=rr and CPUSchedulingResetOnFork=no in the unit "
                    "(contrib/systemd/lbha-heartbeat.service does); else run as root or grant "
                    "CAP_SYS_NICE; or set realtime = false", exc.strerror,
                    "; ".join(_realtime_obstacles(reset_on_fork)) or "unknown cause")


def _realtime_obstacles(reset_on_fork: bool) -> list[str]:
    """What can refuse sched_setscheduler here, for the warning."""
    status: dict[str, str] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            status[key] = value.strip()
    except OSError:
        pass
    out = []
    if reset_on_fork:
        out.append("the service manager set SCHED_RESET_ON_FORK (CPUSchedulingResetOnFork=yes), "
                   "so threads start at normal priority and only CAP_SYS_NICE may lift it")
    if not int(status.get("CapEff", "0"), 16) >> _CAP_SYS_NICE & 1:
        rtprio = resource.getrlimit(resource.RLIMIT_RTPRIO)[0]
        if rtprio != resource.RLIM_INFINITY and rtprio < REALTIME_PRIORITY:
            out.append(f"no CAP_SYS_NICE and RLIMIT_RTPRIO {rtprio} (systemd: "
                       "CapabilityBoundingSet=, LimitRTPRIO=)")
    if status.get("Seccomp") == "2":
        out.append("a seccomp filter may refuse the call (systemd: SystemCallFilter=~@resources)")
    return out


async def run_daemon(
    path: Path, *, manager: PluginManager | None = None,
    task_status: trio.TaskStatus[Heartbeat] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`lbha heartbeat`: run until SIGTERM/SIGINT, reload on SIGHUP. Raises LbhaError subclasses
    (bad config, unsafe key file, port in use, another heartbeat on the run dir) before
    anything is changed on the host."""
    manager = manager if manager is not None else load_event_plugins()
    config, keys = _load(path)
    cluster = config.cluster
    assert cluster is not None
    # One heartbeat per run dir, before the generation file or any address is touched.
    lock = RunLock(config.paths.run_dir, "heartbeat")
    if cluster.realtime:
        _go_realtime()
    manager.call("lbha_configure", config=config)
    plugins = _Plugins(manager)
    transport = ThreadedUdpTransport(cluster.peers[0].addresses, cluster.udp_port,
                                     cluster.bind)
    node = Heartbeat(config, keys, transport, NetlinkAddresses(floating_ips(config)),
                     plugins.emit, GenerationStore(config.paths.state_dir / GENERATION_FILE))
    context = DaemonContext("heartbeat", config)
    with lock, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            await nursery.start(serve_control, config.paths.heartbeat_socket, node.command)
            for service in manager.call("lbha_start", context=context):
                nursery.start_soon(service)
            log.info("lbha heartbeat %s (%s) started, pid %d, links %s", cluster.node,
                     cluster.role, os.getpid(), ", ".join(transport.describe()))
            task_status.started(node)
            async for signum in signals:
                if signum != signal.SIGHUP:
                    log.info("stopping on %s", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
                try:
                    new_config, new_keys = _load(path)
                except (ConfigError, HeartbeatError) as exc:
                    log.error("reload refused, the running configuration stays: %s", exc)
                    continue
                manager.call("lbha_configure", config=new_config)
                await node.reconfigure(new_config, new_keys)
    manager.call("lbha_stop", context=context)
