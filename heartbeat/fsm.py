"""The heartbeat state machine: pure decisions, `step(settings, state, event) -> (state, actions)`.

No I/O and no clock: every event carries `now` (seconds, any monotonic origin) and the driver
asks `deadline(...).at()` when to call again with a `Tick`. The driver executes the actions in
order, so "Release, then Send" means the peer hears PASSIVE only once the addresses are gone.

Roles and states: each node is master or slave (its preference) and active (holds the floating
IPs) or passive. The rules, in the order `_decide` applies them:

1. Start-up: stay passive until the peer is heard or `initdead` passes (then take over with
   a warning, not a "peer dead" alarm: a peer never heard may simply start later).
2. Peer dead (every link silent for `deadtime`) or leaving (graceful stop): become active.
3. Both active (a partition healed): the node with the stronger claim keeps the IPs and
   announces them (GARP / NA) at once; the other releases, but only once the keeper's frames
   say it hears this node (HEARS_PEER), so after the keeper's announcement: until then
   clients may still point here. A heal is rarely symmetric: a node's frames can wait a
   second on an ARP entry that failed during the partition while the peer's get through.
   Claim, compared in order: able to serve (carrier, below), wants to be active (manual
   takeover), not yielded (manual standby), master role, smaller name. While active,
   wants/yielded are clear, so after a partition the master keeps.
4. Active and the peer asks for the IPs (WANTS_ACTIVE: manual takeover or failback): release
   first, then tell the peer, which takes over on hearing PASSIVE. No moment with both active.
5. Both passive: the stronger claim becomes active.
6. Passive and the peer is active: ask for the IPs when a manual takeover is pending, or when
   this node is the master with auto_failback on and has not been put in standby.

Carrier (the `Carrier` event, from the link watch): a node whose interfaces carrying floating
IPs lost their carrier cannot serve. It releases at once and tells the peer (if any link still
works) with NO_CARRIER set, which outranks every other claim; it never takes the IPs or asks
for them while the carrier is down, whatever the rules above say. When the carrier returns it
still counts as unable for one deadtime (and still says NO_CARRIER, so a live peer takes
over meanwhile), then rejoins by the usual rules. Frames queued during the cut behind a
pending ARP resolution, on both sides, arrive in a burst when the link returns, oldest first;
acting on one at once (a PASSIVE from before the peer took over) made both nodes hold the IPs.
After a deadtime the latest frame is the peer's current state.

Becoming active, or the peer coming back while active, always announces the addresses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from lbha.heartbeat.said import Flags, PeerState

_NOTHING_HEARD: Mapping[str, float] = MappingProxyType({})


@dataclass(frozen=True)
class Timers:
    keepalive: float
    warntime: float
    deadtime: float
    initdead: float


@dataclass(frozen=True)
class Settings:
    node: str
    peer: str
    master: bool
    auto_failback: bool
    timers: Timers


@dataclass(frozen=True)
class State:
    started: float
    starting: bool = True
    active: bool = False
    leaving: bool = False
    #: Last state and flags the peer sent; None until heard.
    peer_state: PeerState | None = None
    peer_flags: Flags = Flags.NONE
    peer_alive: bool = False
    #: Up links (transport path name -> time of the last valid frame on it).
    links: dict[str, float] = field(default_factory=dict)
    last_heard: float | None = None
    warned: bool = False
    #: A manual takeover waits for the peer to release.
    takeover_pending: bool = False
    #: Manual standby (or a release on the peer's request): do not ask for the IPs back.
    yielded: bool = False
    split_brain: bool = False
    #: Devices carrying floating IPs that have no carrier: this node cannot serve.
    no_carrier: frozenset[str] = frozenset()
    #: The carrier came back: still unable to serve until this time (frames settle).
    rejoin_until: float | None = None


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class Received:
    now: float
    link: str
    state: PeerState
    flags: Flags


@dataclass(frozen=True)
class Takeover:
    now: float


@dataclass(frozen=True)
class Standby:
    now: float


@dataclass(frozen=True)
class Stop:
    now: float


@dataclass(frozen=True)
class Carrier:
    """The devices carrying floating IPs that have no carrier now (empty: every one can
    serve)."""

    now: float
    down: frozenset[str]


Event = Tick | Received | Takeover | Standby | Stop | Carrier


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Acquire:
    """Add every floating IP, then announce them (GARP / unsolicited NA)."""

    reason: str


@dataclass(frozen=True)
class Release:
    """Remove every floating IP this node holds."""

    reason: str


@dataclass(frozen=True)
class Announce:
    """Send GARP / NA for the addresses already held (clients may point at the peer)."""

    reason: str


@dataclass(frozen=True)
class Send:
    """Send a keepalive now rather than at the next interval (our state changed)."""


@dataclass(frozen=True)
class Notify:
    """Emit an lbha_event; `kind` is a ClusterEvent kind."""

    kind: str
    severity: str
    old_state: str
    new_state: str
    reason: str


@dataclass(frozen=True)
class Log:
    level: str
    message: str


@dataclass(frozen=True)
class Reply:
    """The answer to a manual command."""

    ok: bool
    message: str


Action = Acquire | Release | Announce | Send | Notify | Log | Reply
#: Actions that tell people; they go after those the peer and the clients wait on.
_TELLS = Notify | Log | Reply


# ----------------------------------------------------------------------------- queries


def initial(now: float) -> State:
    return State(started=now)


def frame_state(state: State) -> PeerState:
    if state.leaving:
        return PeerState.LEAVING
    if state.active:
        return PeerState.ACTIVE
    return PeerState.STARTING if state.starting else PeerState.PASSIVE


def unable(state: State) -> bool:
    """No carrier on an interface carrying floating IPs, or back less than deadtime ago."""
    return bool(state.no_carrier) or state.rejoin_until is not None


def wants_active(settings: Settings, state: State) -> bool:
    if state.active or state.leaving or unable(state):
        return False
    return state.takeover_pending or (
        settings.master and settings.auto_failback and not state.yielded
    )


def frame_flags(settings: Settings, state: State) -> Flags:
    flags = Flags.REPORTS_HEARING | (Flags.MASTER if settings.master else Flags.NONE)
    if state.peer_alive:
        flags |= Flags.HEARS_PEER
    if wants_active(settings, state):
        flags |= Flags.WANTS_ACTIVE
    if state.yielded:
        flags |= Flags.YIELDED
    if unable(state):
        flags |= Flags.NO_CARRIER
    return flags


@dataclass(frozen=True)
class Deadline:
    """What the next deadline depends on. `at` decides it, for the daemon (`deadline`) and
    for a keepalive thread timing routine frames the state machine has not seen yet."""

    #: Up link -> time of its last frame: each goes down `deadtime` after it.
    links: Mapping[str, float] = field(default_factory=dict)
    deadtime: float = math.inf
    #: The last frame; a late-keepalive warning is due `warntime` after it (None: no
    #: warning to come).
    last_heard: float = -math.inf
    warntime: float | None = None
    #: The earliest deadline frames do not move (initdead, the end of settling; inf: none).
    fixed: float = math.inf

    def at(self, heard: Mapping[str, float] = _NOTHING_HEARD) -> float:
        """When a Tick can change something (inf: only a frame or command can), once the
        routine frames last `heard` (link -> time, each at or after `last_heard`, on links
        already up) are shown to the state machine."""
        # map() over C methods, not a generator: a keepalive thread runs this on every frame.
        at = self.fixed
        if self.links:
            at = min(at, min(map(heard.get, self.links, self.links.values())) + self.deadtime)
        if self.warntime is not None:
            at = min(at, max((self.last_heard, *heard.values())) + self.warntime)
        return at


def deadline(settings: Settings, state: State) -> Deadline:
    """What decides when the next Tick is due in `state` (`Deadline.at`)."""
    t = settings.timers
    fixed = math.inf
    if state.starting:
        fixed = state.started + t.initdead
    if state.rejoin_until is not None:
        fixed = min(fixed, state.rejoin_until)
    warns = state.last_heard is not None and not state.warned and state.peer_alive
    return Deadline(state.links, t.deadtime,
                    state.last_heard if state.last_heard is not None else -math.inf,
                    t.warntime if warns else None, fixed)


def _claim(serves: bool, wants: bool, yielded: bool, master: bool,
           name: str) -> tuple[bool, bool, bool, bool, str]:
    # Compared with max(): the inverted name makes the smaller name win a full tie.
    return (serves, wants, not yielded, master, "".join(chr(0x10FFFF - ord(c)) for c in name))


def _we_win(settings: Settings, state: State) -> bool:
    ours = _claim(not unable(state), wants_active(settings, state), state.yielded,
                  settings.master, settings.node)
    pf = state.peer_flags
    theirs = _claim(not pf & Flags.NO_CARRIER, bool(pf & Flags.WANTS_ACTIVE),
                    bool(pf & Flags.YIELDED),
                    bool(pf & Flags.MASTER), settings.peer)
    return ours > theirs


def _role(settings: Settings) -> str:
    return "master" if settings.master else "slave"


@dataclass(frozen=True)
class Routine:
    """Frames that would change nothing but the time of their link: a peer still in
    `peer_state` with `peer_flags`, on a link already up. A keepalive thread may time these
    without waking the driver, as long as it wakes it at the state's `Deadline`, moved on by
    them (`Deadline.at`)."""

    peer_state: PeerState
    peer_flags: Flags
    #: Up link -> time of its last frame, as the state machine knows it.
    links: Mapping[str, float]


def heard(state: State, link: str, at: float) -> State:
    """`state` after the routine frames (see `routine`) on `link` up to the one at `at`.

    Exactly what `step` makes of them one by one, since each arrived before the routine's
    deadline: only the times move. So the keepalive thread keeps the last one per link, and
    the daemon applies that, not a `Received` step at its time: stepped after a quiet spell
    longer than deadtime, that frame would read the spell as silence (link down, peer dead).
    """
    return replace(state, links={**state.links, link: at}, last_heard=at)


def routine(settings: Settings, state: State) -> Routine | None:
    """The frames that are routine in `state`, or None when every frame may matter."""
    if state.peer_state is None or state.last_heard is None or not state.links \
            or state.rejoin_until is not None:  # settling (one deadtime): the daemon sees all
        return None
    t = state.last_heard
    for link in state.links:
        # Decided by the state machine itself, so this can never disagree with `step`.
        after, actions = step(settings, state, Received(t, link, state.peer_state,
                                                        state.peer_flags))
        if actions or after != replace(state, links={**state.links, link: t}, last_heard=t):
            return None
    return Routine(state.peer_state, state.peer_flags, dict(state.links))


# ----------------------------------------------------------------------------- transitions


def step(settings: Settings, state: State, event: Event) -> tuple[State, list[Action]]:
    """Apply one event; return the new state and the actions to carry out, in order.

    Addresses, frames and announcements come first, then events, logs and the reply: the peer
    and the clients wait on the former, people do not.
    """
    state, actions = _step(settings, state, event)
    return state, ([a for a in actions if not isinstance(a, _TELLS)]
                   + [a for a in actions if isinstance(a, _TELLS)])


def _step(settings: Settings, state: State, event: Event) -> tuple[State, list[Action]]:
    actions: list[Action] = []
    if state.leaving:
        return state, [Reply(False, "the daemon is stopping")] if isinstance(
            event, Takeover | Standby) else []
    if isinstance(event, Stop):
        return _stop(state, actions)
    state = _expire(settings, state, event.now, actions)
    reason = ""
    if isinstance(event, Received):
        state, reason = _received(settings, state, event, actions)
    elif isinstance(event, Takeover):
        state, reason = _takeover(state, actions)
    elif isinstance(event, Standby):
        state, reason = _standby(settings, state, actions)
    elif isinstance(event, Carrier):
        state, reason = _carrier(settings, state, event, actions)
    return _decide(settings, state, event.now, reason, actions)


def _expire(settings: Settings, state: State, now: float, actions: list[Action]) -> State:
    t = settings.timers
    for link, last in state.links.items():
        if now >= last + t.deadtime:
            actions.append(Notify("link_down", "warning", "up", "down",
                                  f"no keepalive from {settings.peer} on {link} for "
                                  f"{now - last:.3f}s (deadtime {t.deadtime:g}s)"))
    links = {k: v for k, v in state.links.items() if now < v + t.deadtime}
    if len(links) != len(state.links):
        state = replace(state, links=links)
        if not links and state.peer_alive:
            actions.append(Notify("peer_dead", "critical", "alive", "dead",
                                  f"{settings.peer}: no keepalive on any link for "
                                  f"{t.deadtime:g}s"))
            state = replace(state, peer_alive=False, peer_state=None, peer_flags=Flags.NONE,
                            split_brain=False)
    if state.peer_alive and state.last_heard is not None and not state.warned \
            and now >= state.last_heard + t.warntime:
        actions.append(Log("warning", f"late keepalive: nothing from {settings.peer} for "
                                      f"{now - state.last_heard:.3f}s (warntime "
                                      f"{t.warntime:g}s)"))
        state = replace(state, warned=True)
    if state.starting and not state.peer_alive and now >= state.started + t.initdead:
        # Not "peer dead": a peer never heard may just start later. `_decide` says it.
        state = replace(state, starting=False)
    return state


def _received(
    settings: Settings, state: State, event: Received, actions: list[Action]
) -> tuple[State, str]:
    if event.state is PeerState.LEAVING:
        if state.peer_alive:
            for link in state.links:
                actions.append(Notify("link_down", "info", "up", "down",
                                      f"{settings.peer} stopped gracefully ({link})"))
            actions.append(Notify("peer_dead", "warning", "alive", "stopped",
                                  f"{settings.peer} stopped gracefully"))
        state = replace(state, peer_alive=False, peer_state=None, peer_flags=Flags.NONE,
                        links={}, last_heard=event.now, split_brain=False, starting=False)
        return state, f"{settings.peer} stopped gracefully"
    reason = ""
    if event.link not in state.links:
        actions.append(Notify("link_up", "info", "down", "up",
                              f"keepalive from {settings.peer} on {event.link}"))
    was_alive = state.peer_alive
    state = replace(state, links={**state.links, event.link: event.now}, last_heard=event.now,
                    warned=False, peer_alive=True, peer_state=event.state,
                    peer_flags=event.flags, starting=False)
    if not was_alive:
        reason = f"{settings.peer} is back"
        if state.active and (event.state is not PeerState.ACTIVE or _we_win(settings, state)):
            # After a partition heal or the peer's restart clients may point at the peer:
            # the node that keeps the addresses re-announces at once. The one about to step
            # down must not: its announcement would send clients to a node releasing them.
            actions.append(Announce(f"{settings.peer} is back; re-announcing our addresses"))
    if event.state is not PeerState.ACTIVE:
        state = replace(state, split_brain=False)
    return state, reason


def _takeover(state: State, actions: list[Action]) -> tuple[State, str]:
    if state.active:
        actions.append(Reply(True, "already active"))
        return state, ""
    if state.no_carrier:
        actions.append(Reply(False, f"refused: no carrier on {_devices(state.no_carrier)}; "
                                    "this node cannot serve the floating IPs"))
        return state, ""
    state = replace(state, takeover_pending=True, yielded=False, starting=False)
    actions.append(Send())
    return state, "manual takeover"


def _standby(settings: Settings, state: State, actions: list[Action]) -> tuple[State, str]:
    if not state.active:
        actions.append(Reply(True, "already passive; will not ask for the floating IPs back"))
        return replace(state, yielded=True, takeover_pending=False), ""
    if not state.peer_alive:
        actions.append(Reply(False, f"refused: {settings.peer} is dead, standby would leave "
                                    "no node active"))
        return state, ""
    actions.append(Release("manual standby"))
    actions.append(Notify("standby", "info", "active", "passive", "manual standby"))
    actions.append(Send())
    actions.append(Reply(True, f"released the floating IPs; {settings.peer} takes over"))
    return replace(state, active=False, yielded=True, takeover_pending=False), ""


def _devices(names: frozenset[str]) -> str:
    return ", ".join(sorted(names))


def _carrier(
    settings: Settings, state: State, event: Carrier, actions: list[Action]
) -> tuple[State, str]:
    lost, back = event.down - state.no_carrier, state.no_carrier - event.down
    if not lost and not back:
        return state, ""
    state = replace(state, no_carrier=event.down)
    reason = ""
    if lost:
        reason = f"no carrier on {_devices(lost)}"
        actions.append(Notify("carrier_lost", "critical" if state.active else "warning", "up",
                              "down", reason))
        if state.active:
            # Release for the peer, as keepalived's FAULT state does: clients cannot reach the
            # addresses here, and keeping them would make both nodes hold them on return.
            actions.append(Release(reason))
            actions.append(Notify("standby", "warning", "active", "passive",
                                  f"{reason}: released the floating IPs"))
            state = replace(state, active=False, split_brain=False)
    if back:
        actions.append(Notify("carrier_back", "info", "down", "up",
                              f"carrier back on {_devices(back)}"))
    if lost:
        state = replace(state, rejoin_until=None)
    elif not event.down:  # every device back: settle for a deadtime (module docstring)
        state = replace(state, rejoin_until=event.now + settings.timers.deadtime)
    actions.append(Send())
    return state, reason


def _stop(state: State, actions: list[Action]) -> tuple[State, list[Action]]:
    if state.active:
        actions.append(Release("stopping"))
        actions.append(Notify("standby", "info", "active", "stopped", "daemon stopping"))
    actions.append(Send())
    return replace(state, active=False, leaving=True), actions


def _become_active(
    settings: Settings, state: State, kind: str, reason: str, actions: list[Action],
    severity: str | None = None,
) -> State:
    actions.append(Acquire(reason))
    actions.append(Notify(kind, severity or ("warning" if kind == "failover" else "info"),
                          "passive", "active", reason))
    actions.append(Send())
    return replace(state, active=True, takeover_pending=False, yielded=False)


def _decide(
    settings: Settings, state: State, now: float, reason: str, actions: list[Action]
) -> tuple[State, list[Action]]:
    if state.rejoin_until is not None and now >= state.rejoin_until:
        state = replace(state, rejoin_until=None)
    if state.starting or unable(state):
        return state, actions
    peer = settings.peer
    if not state.peer_alive:
        if state.active:
            return state, actions
        if state.takeover_pending:
            why = reason or f"{peer} is dead"
            return _become_active(settings, state, "takeover", why, actions), actions
        if state.last_heard is None:
            # Never heard since start-up (initdead passed): nothing failed, yet this node
            # now serves alone, which an operator should know.
            why = (f"{peer} not heard within initdead {settings.timers.initdead:g}s of "
                   "start-up; taking over")
            return _become_active(settings, state, "takeover", why, actions,
                                  severity="warning"), actions
        why = reason or f"{peer} is dead"
        return _become_active(settings, state, "failover", why, actions), actions
    if state.active and state.peer_state is PeerState.ACTIVE:
        if _we_win(settings, state):
            if not state.split_brain:
                actions.append(Notify("split_brain", "critical", "active", "active",
                                      f"both nodes active; {settings.node} ({_role(settings)}) "
                                      f"keeps the floating IPs, {peer} steps down"))
                actions.append(Announce("split brain resolved in our favour"))
                state = replace(state, split_brain=True)
            return state, actions
        pf = state.peer_flags
        if pf & Flags.REPORTS_HEARING and not pf & Flags.HEARS_PEER:
            # The keeper announces when it hears us; releasing before that loses the
            # clients that still point here.
            if not state.split_brain:
                actions.append(Notify("split_brain", "critical", "active", "active",
                                      f"both nodes active; {peer} keeps the floating IPs, "
                                      f"{settings.node} ({_role(settings)}) steps down as "
                                      f"soon as {peer} hears it"))
                state = replace(state, split_brain=True)
            return state, actions
        actions.append(Release(f"split brain: {peer} keeps the floating IPs"))
        if state.split_brain:
            actions.append(Notify("standby", "info", "active", "passive",
                                  f"split brain resolved: {peer} hears us and keeps the "
                                  "floating IPs"))
        else:
            actions.append(Notify("split_brain", "critical", "active", "passive",
                                  f"both nodes active; {peer} keeps the floating IPs, "
                                  f"{settings.node} ({_role(settings)}) steps down"))
        actions.append(Send())
        return replace(state, active=False, split_brain=False), actions
    if state.active:
        if state.peer_flags & Flags.WANTS_ACTIVE:
            why = f"{peer} asked for the floating IPs"
            actions.append(Release(why))
            actions.append(Notify("standby", "info", "active", "passive", why))
            actions.append(Send())
            state = replace(state, active=False, yielded=True)
        return state, actions
    if state.peer_state is PeerState.ACTIVE:
        return state, actions
    if _we_win(settings, state):
        if state.takeover_pending:
            why = "manual takeover"
        elif state.peer_flags & Flags.NO_CARRIER:
            why = f"{peer} has no carrier"
        elif state.peer_flags & Flags.YIELDED:
            why = f"{peer} is in standby"
        elif settings.master:
            why = f"{settings.node} is the master and {peer} is passive"
        else:
            why = f"{peer} is passive"
        state = _become_active(settings, state, "takeover", why, actions)
    return state, actions
