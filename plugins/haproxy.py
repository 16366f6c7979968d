"""Built-in backend: layer-7 virtual services reconciled into HAProxy over its runtime API.

Each layer-7 DesiredService names a backend and a stats socket (`level admin`); its
destinations are named by the real server's `name`, which must be the HAProxy server name.
A pass reads `show servers state BACKEND`, diffs it with the desired table and sends only
the commands that change something:

==================  ==========================================================
desired state       HAProxy server
==================  ==========================================================
up, fallback        `state ready`, `weight N` (capped at HAProxy's 256)
drain               `state drain`, weight left as it is (so undrain restores it)
quiesced            `state drain` and `weight 0` (failed, quiescent = true)
fallback-quiesced   `state drain` and `weight 0` (persistent fallback, not in use)
(absent)            `state maint`, then `shutdown sessions server`, once
==================  ==========================================================

A server leaves the desired table on halt and on a failure without quiescent; the table
cannot tell the two apart, so both get MAINT and their sessions are shut down when the server
is taken out (HAProxy's own `on-marked-down shutdown-sessions`). Set quiescent = true to keep
sessions of failing servers (they drain instead). Only servers of the config's layer-7 real
servers are touched; other servers of the same backend are never changed, and the servers of
a virtual service deleted from the config are left as they are. On stop HAProxy is left as it
is (it keeps serving with the last state).

What haproxy.cfg must provide: a `stats socket ... level admin` (UNIX path or `ipv4@H:P`),
the backend, and one `server` line per real server, named like the real server's `name` (by
default its address). A virtual service's fallback server is the server named `fallback`
(usually declared `backup`). A server declared `disabled` stays in MAINT: the runtime API
cannot undo the config (a warning says so). A HAProxy `agent-check` competes with lbha for
the weight and `ready` undoes lbha's drain; the next pass repairs, so use one or the other.

Passes run at start, after every `lbha_apply`, every `[haproxy] reconcile_interval`, and one
second after a pass that met a problem. Every session begins with `show info`: a new worker
PID means HAProxy reloaded and forgot runtime changes, so every backend on that socket is
reconciled at once. A missing socket, an unknown backend or server, or a refused command is
logged once when it appears (and once when it clears) and retried; the engine never waits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from lbha import hookimpl
from lbha.desired import DesiredDestination, DesiredService, DesiredTable
from lbha.hookspecs import DaemonContext, Service
from lbha.model import Config

from .haproxy_runtime import (
    RuntimeApiError,
    ServersStateError,
    ServerState,
    Session,
    open_session,
    parse_address,
    parse_servers_state,
    process_identity,
    valid_name,
)

log = logging.getLogger("lbha.haproxy")

#: HAProxy's largest absolute server weight.
MAX_WEIGHT = 256
#: Delay before retrying after a problem (missing socket, unknown name, refused command).
RETRY_INTERVAL = 1.0
#: How often every socket is asked which worker answers, to catch reloads early.
RELOAD_PROBE_INTERVAL = 1.0
#: Above this many backends to read, one unfiltered `show servers state` is cheaper.
BULK_READ = 16
#: Bound on one whole session (connect, state reads, commands).
SESSION_TIMEOUT = 5.0

BackendKey = tuple[str, str]  # (socket, backend)


@dataclass(frozen=True)
class ServerTarget:
    """What one HAProxy server must look like; weight None leaves the weight alone."""

    admin: str
    weight: int | None


def target_for(destination: DesiredDestination) -> ServerTarget | None:
    """The HAProxy state of a desired destination; None for a state lbha does not know."""
    weight = min(max(destination.weight, 0), MAX_WEIGHT)
    if destination.state in ("up", "fallback"):
        return ServerTarget("ready", weight)
    if destination.state == "drain":
        return ServerTarget("drain", None)
    if destination.state in ("quiesced", "fallback-quiesced"):
        return ServerTarget("drain", 0)
    return None


MAINT = ServerTarget("maint", None)


@dataclass(frozen=True)
class Problem:
    level: int
    message: str


@dataclass
class BackendPlan:
    """Commands that bring one backend to the desired state, and what stood in the way."""

    #: (server name, command), in the order they must run.
    commands: list[tuple[str, str]] = field(default_factory=list)
    #: Server name -> problem.
    problems: dict[str, Problem] = field(default_factory=dict)


def plan_backend(
    backend: str,
    owned: Iterable[str],
    desired: Mapping[str, DesiredDestination],
    current: Mapping[str, ServerState],
    socket: str = "",
) -> BackendPlan:
    """The commands for one backend (pure): owned servers absent from `desired` go to MAINT."""
    plan = BackendPlan()
    where = f"HAProxy backend {backend!r}" + (f" at {socket}" if socket else "")
    for name in sorted(set(owned) | set(desired)):
        dest = desired.get(name)
        target = MAINT if dest is None else target_for(dest)
        state = current.get(name)
        if target is None or state is None or not valid_name(name):
            plan.problems[name] = Problem(logging.ERROR, f"{where}: " + _why_not(
                name, dest, target, current))
            continue
        if dest is not None and dest.weight > MAX_WEIGHT:
            plan.problems[name] = Problem(logging.WARNING, f"{where}: server {name!r} weight "
                                          f"{dest.weight} is above HAProxy's maximum; set to "
                                          f"{MAX_WEIGHT}")
        if target.admin == "ready" and state.config_maint:
            plan.problems[name] = Problem(logging.WARNING, f"{where}: server {name!r} is "
                                          "`disabled` in haproxy.cfg, which the runtime API "
                                          "cannot undo; it stays in MAINT")
        plan.commands.extend((name, command) for command in
                             _server_commands(f"{backend}/{name}", target, state))
    return plan


def _why_not(name: str, dest: DesiredDestination | None, target: ServerTarget | None,
             current: Mapping[str, ServerState]) -> str:
    if target is None:
        unknown = dest.state if dest is not None else "?"
        return f"server {name!r} has desired state {unknown!r}, unknown to the HAProxy plugin"
    if not valid_name(name):
        return (f"{name!r} cannot be a HAProxy server name; name the real server exactly as "
                "its `server` line in haproxy.cfg")
    known = ", ".join(sorted(current)) or "none"
    return (f"no server {name!r} (it has: {known}); add it to haproxy.cfg or set the real "
            "server's name to its HAProxy server name")


def _server_commands(server: str, target: ServerTarget, state: ServerState) -> list[str]:
    weight = []
    if target.weight is not None and target.weight != state.weight:
        weight = [f"set server {server} weight {target.weight}"]
    if target.admin == state.admin:
        return weight
    admin = [f"set server {server} state {target.admin}"]
    if target.admin == "maint":
        admin.append(f"shutdown sessions server {server}")
    # Enter with the right weight; leave (drain/maint) before touching the weight.
    return weight + admin if target.admin == "ready" else admin + weight


def owned_servers(config: Config) -> dict[BackendKey, frozenset[str]]:
    """For each (socket, backend) of the config, the HAProxy servers lbha manages."""
    owned: dict[BackendKey, set[str]] = {}
    for virtual in config.virtuals:
        if virtual.layer != 7 or virtual.haproxy is None:
            continue
        names = owned.setdefault((virtual.haproxy.socket, virtual.haproxy.backend), set())
        names.update(real.name for real in virtual.reals)
        if virtual.fallback is not None:
            names.add("fallback")
    return {key: frozenset(names) for key, names in owned.items()}


Wanted = dict[BackendKey, dict[str, DesiredDestination]]


class DesiredView:
    """The layer-7 part of the latest desired table by (socket, backend).

    Updating costs O(changed services): the engine hands unchanged services over as the same
    objects, so only backends whose services are new objects are rebuilt.
    """

    def __init__(self) -> None:
        self._services: tuple[DesiredService, ...] = ()
        self._members: dict[BackendKey, list[int]] = {}
        self.wanted: Wanted = {}

    def update(self, table: DesiredTable) -> tuple[set[BackendKey], bool]:
        """Switch to `table`; return the backends rebuilt and whether the set of backends
        changed."""
        old, new = self._services, table.services
        self._services = new
        if len(old) == len(new):
            touched = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a is not b]
            if all(_key(old[i]) == _key(new[i]) for i in touched):
                keys = {key for i in touched if (key := _key(new[i])) is not None}
                for key in keys:
                    self.wanted[key] = _destinations(new[i] for i in self._members[key])
                return keys, False
        before = set(self.wanted)
        self._members = {}
        for index, service in enumerate(new):
            if (key := _key(service)) is not None:
                self._members.setdefault(key, []).append(index)
        self.wanted = {key: _destinations(new[i] for i in members)
                       for key, members in self._members.items()}
        return before | set(self.wanted), before != set(self.wanted)


def _key(service: DesiredService) -> BackendKey | None:
    if service.layer != 7 or not service.haproxy_backend or not service.haproxy_socket:
        return None
    return (service.haproxy_socket, service.haproxy_backend)


def _destinations(services: Iterable[DesiredService]) -> dict[str, DesiredDestination]:
    dests: dict[str, DesiredDestination] = {}
    for service in services:
        for dest in service.destinations:
            dests.setdefault(dest.name, dest)
    return dests


async def read_states(
    session: Session, names: list[str], *, info: bool = False, bulk: bool = True,
) -> tuple[str, dict[str, dict[str, ServerState] | str]]:
    """`show info` (when asked) and the servers of each backend in `names`, or the
    error HAProxy gave for it. Many backends are read with one unfiltered command."""
    bulk = bulk and len(names) > BULK_READ
    reads = ["show servers state"] if bulk else [f"show servers state {b}" for b in names]
    replies = await session.execute((["show info"] if info else []) + reads)
    info_text = replies.pop(0) if info else ""
    states: dict[str, dict[str, ServerState] | str] = {}
    if bulk:
        try:
            everything = parse_servers_state(replies[0])
        except ServersStateError as exc:
            raise RuntimeApiError(f"unreadable `show servers state`: {exc}") from None
        states = {b: everything[b] for b in names if b in everything}
        # A backend without server lines: its own reply says whether it exists at all.
        missing = [b for b in names if b not in everything]
        states.update((await read_states(session, missing, bulk=False))[1])
        return info_text, states
    for backend, body in zip(names, replies, strict=True):
        try:
            states[backend] = parse_servers_state(body).get(backend, {})
        except ServersStateError:
            states[backend] = body
    return info_text, states


class HaproxyBackendPlugin:
    """Keeps HAProxy backends equal to the desired table; `run` is the daemon service."""

    def __init__(self) -> None:
        self.reconcile_interval = 10.0
        self._owned_by_config: dict[BackendKey, frozenset[str]] | None = None
        self._seen: dict[BackendKey, set[str]] = {}
        self._view = DesiredView()
        self._desired: DesiredTable | None = None
        self._viewed: DesiredTable | None = None
        self._wake = trio.Event()
        #: Backends whose desired state changed and was not yet reconciled without error.
        self._pending: set[BackendKey] = set()
        #: Socket -> its backends (from the desired table and the config); None: recompute.
        self._layout: dict[str, list[str]] | None = None
        self._all_pending = False
        #: The HAProxy worker (pid, start time) each socket answered from last time.
        self._identity: dict[str, tuple[str, str]] = {}
        self._problems: dict[tuple[str, ...], Problem] = {}
        self._passed = trio.Event()
        #: Generation of the desired table the last finished pass worked from.
        self.reconciled_generation = 0
        self.passes = 0
        self.commands_sent = 0

    # ------------------------------------------------------------------ hooks

    def configure(self, config: Config) -> None:
        self.reconcile_interval = config.haproxy.reconcile_interval
        self._owned_by_config = owned_servers(config)
        self._layout = None
        self._all_pending = True  # ownership may have changed: look at everything again
        self._wake.set()

    def apply(self, desired: DesiredTable) -> None:
        self._desired = desired
        self._wake.set()

    @property
    def problems(self) -> list[str]:
        """The problems outstanding now, one message each."""
        return [problem.message for problem in self._problems.values()]

    def status(self) -> dict[str, Any] | None:
        """What HAProxy holds as lbha last saw it, for `lbha status` (None: no layer 7)."""
        layout = self._layout_now()
        if not layout:
            return None
        desired = self._desired.generation if self._desired is not None else -1
        return {
            "in_sync": desired >= 0 and self.reconciled_generation >= desired
            and not self._has_errors(),
            "sockets": len(layout),
            "backends": sum(len(backends) for backends in layout.values()),
            "passes": self.passes,
            "commands_sent": self.commands_sent,
            "problems": self.problems,
        }

    def _has_errors(self) -> bool:
        return any(p.level >= logging.ERROR for p in self._problems.values())

    # ------------------------------------------------------------------ service

    async def run(self) -> None:
        """Reconcile on every change, periodically, after a problem, and probe for reloads."""
        next_full = next_probe = last_pass = -math.inf
        while True:
            # Before the engine's first table there is nothing to reconcile to: just wait.
            deadline = math.inf if self._desired is None else min(next_full, next_probe)
            if self._has_errors():
                deadline = min(deadline, last_pass + RETRY_INTERVAL)
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._desired is None:
                continue
            now = trio.current_time()
            full = now >= next_full or (self._has_errors() and now >= last_pass + RETRY_INTERVAL)
            probe = full or now >= next_probe
            try:
                await self.reconcile(full=full, probe=probe)
            except Exception as exc:  # log.exception: a bug here must not end reconciliation
                key = ("<plugin>",)
                problem = Problem(logging.ERROR, f"HAProxy plugin pass failed: {_describe(exc)}")
                if self._problems.get(key) != problem:
                    log.exception("%s; retrying", problem.message)
                    self._problems[key] = problem
            else:
                self._problems.pop(("<plugin>",), None)
            last_pass = trio.current_time()
            if full:
                next_full = last_pass + self.reconcile_interval
            if probe:
                next_probe = last_pass + min(RELOAD_PROBE_INTERVAL, self.reconcile_interval)

    async def reconcile(self, *, full: bool = True, probe: bool = True) -> None:
        """One pass: every backend when `full`, else the changed ones; `probe` looks at
        every socket (a reloaded HAProxy gets all its backends reconciled)."""
        desired = self._desired
        if desired is None:
            return
        if desired is not self._viewed:
            rebuilt, keys_changed = self._view.update(desired)
            self._viewed = desired
            self._pending |= rebuilt
            if keys_changed:
                self._layout = None
            if self._owned_by_config is None:
                for key in rebuilt & set(self._view.wanted):
                    self._seen.setdefault(key, set()).update(self._view.wanted[key])
        layout = self._layout_now()
        if self._all_pending:
            self._pending = {(socket, b) for socket, backends in layout.items()
                             for b in backends}
            self._all_pending = False
        pending: dict[str, list[str]] = {}
        for socket, backend in sorted(self._pending):
            pending.setdefault(socket, []).append(backend)
        wanted = self._view.wanted
        async with trio.open_nursery() as nursery:
            for socket, backends in layout.items():
                changed = backends if full else pending.get(socket, [])
                if changed or probe:
                    nursery.start_soon(self._reconcile_socket, socket, backends, changed,
                                       wanted)
        self.reconciled_generation = desired.generation
        self.passes += 1
        self._passed.set()
        self._passed = trio.Event()

    async def wait_reconciled(self, generation: int) -> None:
        """Wait until a pass has worked from `generation` (or a later table)."""
        while self.reconciled_generation < generation:
            await self._passed.wait()

    def _layout_now(self) -> dict[str, list[str]]:
        if self._layout is None:
            self._layout = {}
            for socket, backend in sorted(set(self._view.wanted)
                                          | set(self._owned_by_config or {})):
                self._layout.setdefault(socket, []).append(backend)
            known = {(s, b) for s, backends in self._layout.items() for b in backends}
            self._pending &= known
        return self._layout

    def _owned(self, key: BackendKey) -> frozenset[str]:
        if self._owned_by_config is not None:
            return self._owned_by_config.get(key, frozenset())
        return frozenset(self._seen.get(key, ()))

    async def _reconcile_socket(
        self, socket: str, backends: list[str], changed: list[str],
        wanted: Wanted,
    ) -> None:
        problems: dict[tuple[str, ...], Problem] = {}
        done: Wanted = {}
        looked_at: list[str] = []
        try:
            address = parse_address(socket)
            with trio.fail_after(SESSION_TIMEOUT):
                async with open_session(address) as session:
                    looked_at = await self._session_pass(session, socket, backends, changed,
                                                         wanted, problems, done)
        except RuntimeApiError as exc:
            problems[(socket,)] = Problem(logging.ERROR, f"{exc}; retrying")
        except trio.TooSlowError:
            problems[(socket,)] = Problem(logging.ERROR, f"HAProxy runtime API {socket} did "
                                          f"not finish a pass within {SESSION_TIMEOUT} s; "
                                          "retrying")
        if (socket,) in problems:
            self._identity.pop(socket, None)  # when it answers again, look at everything
        else:
            self._pending.difference_update(done)
        self._report(socket, backends, looked_at, problems)

    async def _session_pass(
        self, session: Session, socket: str, backends: list[str], changed: list[str],
        wanted: Wanted,
        problems: dict[tuple[str, ...], Problem],
        done: Wanted,
    ) -> list[str]:
        """Read, diff and fix over one session; returns the backends looked at."""
        for backend in changed:
            if not valid_name(backend):
                problems[(socket, backend)] = Problem(
                    logging.ERROR, f"{backend!r} cannot be a HAProxy backend name (socket "
                    f"{socket}); fix [virtual.haproxy] backend")
        names = [b for b in changed if valid_name(b)]
        info, states = await read_states(session, names, info=True)
        identity = process_identity(info)
        previous = self._identity.get(socket)
        if identity != previous:
            if previous is not None:
                log.warning("HAProxy at %s restarted or reloaded (worker pid %s -> %s): "
                            "reconciling all its backends", socket, previous[0], identity[0])
            rest = [b for b in backends if b not in states and valid_name(b)]
            states.update((await read_states(session, rest))[1])
        commands: list[tuple[str, str, str]] = []  # (backend, server, command)
        for backend, current in states.items():
            key = (socket, backend)
            if isinstance(current, str):
                why = current.strip()[:200] or "empty reply"
                problems[key] = Problem(logging.ERROR, f"HAProxy at {socket} has no backend "
                                        f"{backend!r} ({why}); fix [virtual.haproxy] backend "
                                        "or haproxy.cfg")
                continue
            plan = plan_backend(backend, self._owned(key), wanted.get(key, {}), current,
                                socket)
            for name, problem in plan.problems.items():
                problems[(socket, backend, name)] = problem
            commands.extend((backend, server, command) for server, command in plan.commands)
            if not any(p.level >= logging.ERROR for p in plan.problems.values()):
                done[key] = wanted.get(key, {})
        replies = await session.execute([command for _, _, command in commands])
        self.commands_sent += len(commands)
        for (backend, server, command), reply in zip(commands, replies, strict=True):
            if reply.strip():
                hint = (" (the stats socket needs `level admin`)"
                        if "permission" in reply.lower() else "")
                problems[(socket, backend, server)] = Problem(
                    logging.ERROR, f"HAProxy at {socket} refused `{command}`: "
                    f"{reply.strip()[:200]}{hint}")
                done.pop((socket, backend), None)
        self._identity[socket] = identity
        if commands:
            log.info("HAProxy at %s: %s", socket, "; ".join(c for _, _, c in commands[:6])
                     + (f" ... ({len(commands)} commands)" if len(commands) > 6 else ""))
        return list(states) + [b for b in changed if not valid_name(b)]

    def _report(self, socket: str, backends: list[str], looked_at: list[str],
                problems: dict[tuple[str, ...], Problem]) -> None:
        """Log each problem once when it appears or changes, and once when it clears."""
        reached = (socket,) not in problems
        for key in [k for k in self._problems if k[0] == socket]:
            if key in problems:
                continue
            gone = len(key) > 1 and key[1] not in backends  # no longer configured
            if (len(key) == 1 and reached) or (len(key) > 1 and (gone or key[1] in looked_at)):
                problem = self._problems.pop(key)
                if not gone:
                    log.info("resolved: %s", problem.message)
        for key, problem in problems.items():
            if self._problems.get(key) != problem:
                log.log(problem.level, "%s", problem.message)
                self._problems[key] = problem


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]  # the nursery's wrapping says nothing to an operator
    return f"{type(exc).__name__}: {exc}"


plugin = HaproxyBackendPlugin()


@hookimpl
def lbha_configure(config: Config) -> None:
    plugin.configure(config)


@hookimpl
def lbha_apply(desired: DesiredTable) -> None:
    plugin.apply(desired)


@hookimpl
def lbha_status() -> dict[str, Any] | None:
    state = plugin.status()
    return {"haproxy": state} if state is not None else None


@hookimpl
def lbha_start(context: DaemonContext) -> Service | None:
    global plugin  # one plugin state per daemon run: nothing carried over from a previous one
    if context.daemon != "healthd":
        return None
    plugin = HaproxyBackendPlugin()
    plugin.configure(context.config)
    return plugin.run
