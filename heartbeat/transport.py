"""Heartbeat links. `Transport` is the seam: UDP unicast today, a serial line later.

A transport carries frames both ways and drives the steady-state keepalive exchange of a
`KeepalivePump`, which makes every decision of it (keepalive_pump.py): the transport sends
what `pump.timers` says is due, passes every datagram it receives through `pump.datagram`
(authentication and replay checks happen in `protocol.Receiver`, so a forged frame costs one
HMAC and nothing else), hands the daemon what that returns, in order (`deliver`), and sleeps
until `pump.wake_at()`. Each received frame is tagged with a link name ("udp:198.18.0.2",
`udp_link`); the state machine keeps a link up while valid frames arrive on it.

`ThreadedUdpTransport` runs that loop on a plain thread, so the trio loop sleeps through routine
keepalives: a wake-up of the loop costs several times the CPU of the keepalive itself
(bench/README.md). The daemon's tests replace only the loop, with a trio one over their fake
network (tests/heartbeat/fakenet.py); the sockets, the pump and the hand-off are this module's.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import select
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import suppress
from functools import partial
from typing import Any, Protocol

import trio

from lbha.heartbeat.errors import TransportError
from lbha.heartbeat.keepalive_pump import Handoff, KeepalivePump
from lbha.heartbeat.protocol import MAX_FRAME, Frame, Verdict
from lbha.model import IPAddress

log = logging.getLogger(__name__)


class Sink(Protocol):
    """The daemon side of a transport; each call is awaited before the next."""

    async def on_frame(self, verdict: Verdict, frame: Frame | None, link: str) -> None:
        """A frame the pump did not take as routine (it may change something), or a verdict
        to warn about: STALE_GENERATION, or an authentication failure (AUTH_FAILURES) on a
        link the peer's frames arrive on."""

    async def on_deadline(self) -> None:
        """The pump's deadline has come."""


#: What a transport's loop hands the daemon: a frame or a verdict, or None for the deadline.
Handed = Handoff | None


def udp_link(address: tuple[Any, ...]) -> str:
    """The link name of a peer's UDP address (as recvfrom returns it)."""
    return f"udp:{address[0]}"


async def deliver(handed: trio.MemoryReceiveChannel[Handed], sink: Sink) -> None:
    """Hand `sink` what the transport's loop passed on, in order, each awaited."""
    async for item in handed:
        if item is None:
            await sink.on_deadline()
        else:
            await sink.on_frame(*item)


#: DSCP CS6 (network control), so a busy LAN queues keepalives ahead of bulk traffic.
_TOS_CS6 = 0xC0


class Transport(ABC):
    """One or more paths to the peer carrying heartbeat frames."""

    @abstractmethod
    async def open(self) -> None:
        """Open every path (bind sockets, open ttys); raise TransportError if one cannot be."""

    @abstractmethod
    def close(self) -> None:
        """Close every path. Sending stays possible until then, even after `run` ends."""

    @abstractmethod
    async def run(
        self, pump: KeepalivePump, sink: Sink, *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Until cancelled (after `open`): send what `pump.timers` says is due, pass every
        received datagram through `pump.datagram`, hand `sink` what those return (`deliver`)
        and sleep until `pump.wake_at()`; set `pump.rearm` to be woken when the pump's
        deadline moves earlier."""

    @abstractmethod
    async def send(self, frame: bytes) -> None:
        """Send one frame on every path; a path that fails is logged, never raised."""

    @abstractmethod
    def describe(self) -> list[str]:
        """Human-readable path names, for status output."""

    @abstractmethod
    def links(self) -> set[str] | None:
        """The link names frames may legitimately arrive on (None: any)."""


def _hand(channel: trio.MemorySendChannel[Handed], item: Handed) -> None:
    # Runs as a trio callback, where an exception would crash the loop: never raise.
    try:
        channel.send_nowait(item)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        log.debug("heartbeat hand-off while stopping; dropped")


class ThreadedUdpTransport(Transport):
    """UDP unicast to each peer address, from the matching local (bind) address.

    With `bind` empty, one wildcard socket per address family the peers use. With `bind` set,
    one socket per bind address; a peer address is reached from the first bind address of its
    family, so the source address the peer sees is predictable.

    The keepalive loop runs on a plain thread (see the module doc); the daemon's own frames (a
    state change) still go out from trio through `send`. What the loop hands over reaches the
    daemon in order through a channel. The thread's clock is `time.perf_counter`: trio's
    default clock minus a constant offset, measured at `run`.
    """

    def __init__(self, peers: Sequence[IPAddress], port: int,
                 bind: Sequence[IPAddress] = ()) -> None:
        if not peers:
            raise TransportError("no peer address to send keepalives to: set "
                                 "[[cluster.peers]] addresses")
        self.peers = tuple(peers)
        self.port = port
        self.bind = tuple(bind)
        families = {a.version for a in self.peers}
        locals_ = [a for a in self.bind if a.version in families]
        if self.bind and {a.version for a in locals_} != families:
            missing = families - {a.version for a in locals_}
            raise TransportError(
                f"peer addresses need IPv{min(missing)} but no bind address of that family is "
                "configured; add one to [cluster] bind or remove bind"
            )
        wildcard = {4: ipaddress.ip_address("0.0.0.0"), 6: ipaddress.ip_address("::")}
        self.locals: tuple[IPAddress, ...] = tuple(locals_) or tuple(
            wildcard[v] for v in sorted(families))
        self._sockets: dict[IPAddress, trio.socket.SocketType] = {}
        #: The same sockets as plain ones, by file descriptor, for the thread.
        self._plain: dict[int, socket.socket] = {}

    def describe(self) -> list[str]:
        return [f"udp:{p} port {self.port}" for p in self.peers]

    def links(self) -> set[str] | None:
        return {udp_link((p,)) for p in self.peers}

    def _new_socket(self, family: socket.AddressFamily) -> trio.socket.SocketType:
        plain = socket.socket(family, socket.SOCK_DGRAM)
        plain.setblocking(False)
        self._plain[plain.fileno()] = plain
        return trio.socket.from_stdlib_socket(plain)

    async def _open_one(self, local: IPAddress) -> trio.socket.SocketType:
        family = socket.AF_INET if local.version == 4 else socket.AF_INET6
        sock = self._new_socket(family)
        try:
            if local.version == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, _TOS_CS6)
            else:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, _TOS_CS6)
            await sock.bind((str(local), self.port))
        except OSError as exc:
            sock.close()
            hint = ""
            if exc.errno == errno.EADDRNOTAVAIL:
                hint = ": the address is not configured on this host"
            elif exc.errno == errno.EADDRINUSE:
                hint = ": another process (another lbha heartbeat?) uses the port"
            raise TransportError(f"cannot bind heartbeat UDP socket to [{local}]:{self.port}"
                                 f"{hint} ({exc.strerror})") from None
        return sock

    async def open(self) -> None:
        try:
            for local in self.locals:
                self._sockets[local] = await self._open_one(local)
        except TransportError:
            self.close()
            raise

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        self._plain.clear()

    def _require_open(self) -> None:
        if not self._sockets:
            raise TransportError(f"{type(self).__name__}.run() before open()")

    def _socket_for(self, peer: IPAddress) -> trio.socket.SocketType | None:
        return next((s for local, s in self._sockets.items() if local.version == peer.version),
                    None)

    async def send(self, frame: bytes) -> None:
        for peer in self.peers:
            sock = self._socket_for(peer)
            if sock is None:
                continue
            try:
                await sock.sendto(frame, (str(peer), self.port))
            except OSError as exc:
                # Link down or no route: the peer's silence will tell the state machine.
                log.debug("heartbeat send to %s failed: %s", peer, exc)

    async def run(
        self, pump: KeepalivePump, sink: Sink, *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._require_open()
        to_trio, from_thread = trio.open_memory_channel[Handed](math.inf)
        offset = trio.current_time() - time.perf_counter()
        # The thread sleeps in epoll on the sockets and on this pair: a byte wakes it to
        # look at the deadline again (rearm) or, once the socket is closed, to stop.
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)

        def rearm() -> None:
            with suppress(BlockingIOError):  # a byte already waiting wakes it just as well
                wake_w.send(b"r")

        pump.rearm = rearm
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(deliver, from_thread, sink)
                nursery.start_soon(self._stop_thread_on_cancel, wake_w)
                nursery.start_soon(partial(
                    trio.to_thread.run_sync, self._pump_thread, pump, to_trio,
                    trio.lowlevel.current_trio_token(), offset, wake_r,
                    limiter=trio.CapacityLimiter(1)))
                task_status.started()
        finally:
            pump.rearm = lambda: None
            wake_r.close()
            wake_w.close()

    @staticmethod
    async def _stop_thread_on_cancel(wake_w: socket.socket) -> None:
        try:
            await trio.sleep_forever()
        finally:
            wake_w.shutdown(socket.SHUT_WR)  # the thread reads EOF and returns

    def _pump_thread(self, pump: KeepalivePump, to_trio: trio.MemorySendChannel[Handed],
                     token: trio.lowlevel.TrioToken, offset: float, wake: socket.socket) -> None:
        routes = [(self._plain[sock.fileno()], (str(peer), self.port))
                  for peer in self.peers if (sock := self._socket_for(peer)) is not None]
        wake_fd = wake.fileno()
        clock = time.perf_counter
        # epoll, not poll: the registration stays put instead of being redone at every wake.
        with select.epoll() as poller:
            for fd in self._plain:
                poller.register(fd, select.EPOLLIN)
            poller.register(wake, select.EPOLLIN)
            while True:
                now = clock() + offset
                frame, due = pump.timers(now)
                if frame is not None:
                    for plain, destination in routes:
                        try:
                            plain.sendto(frame, destination)
                        except OSError as exc:
                            log.debug("heartbeat send to %s failed: %s", destination[0], exc)
                if due:
                    token.run_sync_soon(_hand, to_trio, None)
                for fd, _ in poller.poll(max(0.0, pump.wake_at() - now)):
                    if fd == wake_fd:
                        if not wake.recv(64):
                            return
                        continue
                    try:
                        data, address = self._plain[fd].recvfrom(MAX_FRAME + 1)
                    except OSError as exc:  # EAGAIN, or an ICMP error from an earlier send
                        log.debug("heartbeat receive: %s", exc)
                        continue
                    handoff = pump.datagram(data, udp_link(address), clock() + offset)
                    if handoff is not None:
                        token.run_sync_soon(_hand, to_trio, handoff)
