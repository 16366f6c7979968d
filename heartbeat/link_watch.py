"""Watch the host's addresses and links over rtnetlink, as keepalived does.

Two things happen behind the daemon's back. A floating IP is removed (an operator, a network
script, DHCP): the active node must put it back and announce it. An interface carrying
floating IPs loses its carrier (cable cut, `ip link set down`): the node can no longer serve,
so it must release them for the peer (the state machine's `Carrier` event) and not take them
again until the carrier returns.

The kernel sends every change to sockets subscribed to its address and link groups.
`decide` turns each notification into what the daemon must do (pure: tested without
sockets); `LinkWatch` waits on the trio thread for the non-blocking socket to be readable,
reads what is there, and tells the daemon. Our own releases show up as removals too; the
daemon re-adds only while its state machine says active, under the lock its releases hold,
and the kernel is asked afresh (an add of an address present changes nothing), so the watch
never fights the daemon.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import trio

from lbha.heartbeat.errors import HeartbeatError
from lbha.heartbeat.rtnetlink import AddressChange, Change, Link, Monitor, Overflow

log = logging.getLogger(__name__)

#: Datagrams read per wake-up: a flood of notifications never holds the trio thread long.
MAX_BATCH = 64
#: Seconds before reading the interfaces again after netlink failed.
RETRY = 1.0


@dataclass(frozen=True)
class Watched:
    """What the watch knows: our floating IPs, the devices carrying them, every device's
    state (a device not listed does not exist)."""

    ours: frozenset[str]
    devices: frozenset[str]
    usable: Mapping[str, bool] = field(default_factory=dict)
    #: Interface index -> name, to follow renames.
    names: Mapping[int, str] = field(default_factory=dict)

    def no_carrier(self) -> frozenset[str]:
        """The devices carrying floating IPs that cannot serve (no carrier, down or gone)."""
        return frozenset(d for d in self.devices if not self.usable.get(d, False))


@dataclass(frozen=True)
class Verdict:
    """What one notification asks of the daemon."""

    #: Re-add whichever floating IPs are missing (if active), and announce those.
    restore: bool = False
    #: Read every link afresh: notifications were lost.
    resync: bool = False


def with_links(watched: Watched, links: Iterable[Link]) -> Watched:
    """`watched` with the state of every link from a fresh dump."""
    links = list(links)
    return replace(watched, usable={link.name: link.usable for link in links},
                   names={link.index: link.name for link in links})


def decide(watched: Watched, change: Change) -> tuple[Watched, Verdict]:
    """Apply one notification: the new view, and what the daemon must do about it.

    The carrier set the daemon must hear is `watched.no_carrier()` afterwards; the caller
    tells the state machine when it differs from the last one told.
    """
    if isinstance(change, Overflow):
        return watched, Verdict(restore=True, resync=True)
    if isinstance(change, AddressChange):
        lost = not change.added and change.address.address in watched.ours
        return watched, Verdict(restore=lost)
    link, removed = change.link, change.removed
    usable = dict(watched.usable)
    names = dict(watched.names)
    old_name = names.pop(link.index, None)
    if old_name is not None:
        usable.pop(old_name, None)
    was = watched.usable.get(link.name, False)
    if not removed:
        usable[link.name] = link.usable
        names[link.index] = link.name
    after = replace(watched, usable=usable, names=names)
    # Coming up, an interface may have lost its addresses (IPv6 ones are flushed on down).
    came_up = link.name in watched.devices and link.usable and not removed and not was
    return after, Verdict(restore=came_up)


class Sink(Protocol):
    """What the watch tells (the daemon)."""

    async def on_carrier(self, down: frozenset[str]) -> None:
        """The devices carrying floating IPs without carrier changed to `down`."""

    async def on_address_lost(self) -> None:
        """A floating IP may be missing: re-add and announce it if this node is active."""


#: Our floating IPs and the devices carrying them, resolved afresh.
Targets = Callable[[], Awaitable[tuple[frozenset[str], frozenset[str]]]]
#: Every link, dumped afresh.
Links = Callable[[], Awaitable[list[Link]]]


class LinkWatch:
    """Reads the kernel's notifications on the trio thread and tells a `Sink`."""

    def __init__(self, targets: Targets, links: Links,
                 monitor: Callable[[], Monitor] = Monitor) -> None:
        self._targets = targets
        self._links = links
        self._monitor = monitor
        self._waiting: trio.CancelScope | None = None
        self._stale = False

    def refresh(self) -> None:
        """The floating IPs changed (a reload): resolve them and read every link afresh."""
        self._stale = True
        if self._waiting is not None:
            self._waiting.cancel()

    async def _fresh(self, watched: Watched | None) -> Watched:
        try:
            ours, devices = await self._targets()
            return with_links(Watched(ours, devices), await self._links())
        except HeartbeatError as exc:
            if watched is None:
                raise
            log.error("cannot read the interfaces (retrying in %gs): %s", RETRY, exc)
            self._stale = True
            await trio.sleep(RETRY)
            return watched

    async def run(self, sink: Sink, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled. Started once the first carrier state is told, so the state
        machine never takes over on an interface without carrier."""
        monitor = self._monitor()  # subscribed before the dump: no change falls in between
        try:
            watched = await self._fresh(None)
            told = watched.no_carrier()
            await sink.on_carrier(told)
            task_status.started()
            while True:
                if not self._stale:
                    with trio.CancelScope() as self._waiting:
                        await trio.lowlevel.wait_readable(monitor)
                    self._waiting = None
                changes = monitor.read(MAX_BATCH)
                if self._stale:
                    self._stale = False
                    changes.append(Overflow())
                restore = resync = False
                for change in changes:
                    watched, verdict = decide(watched, change)
                    restore = restore or verdict.restore
                    resync = resync or verdict.resync
                if resync:
                    watched = await self._fresh(watched)
                # One carrier report per batch: a flap inside one batch changes nothing.
                if watched.no_carrier() != told:
                    told = watched.no_carrier()
                    await sink.on_carrier(told)
                if restore:
                    await sink.on_address_lost()
                await trio.lowlevel.checkpoint()
        finally:
            self._waiting = None
            monitor.close()
