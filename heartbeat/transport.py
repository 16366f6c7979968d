"""Heartbeat links. `Transport` is the seam: UDP unicast today, a serial line later.

A transport carries frames both ways and drives the steady-state keepalive exchange of a
`KeepalivePump`: it sends the pump's frame every `interval`, passes what it receives through
the pump (authentication and replay checks happen in `protocol.Receiver`, so a forged frame
costs one HMAC and nothing else), hands the daemon only what can change something and wakes
it at the pump's deadline. Each received frame is tagged with a link name
("udp:198.18.0.2"); the state machine keeps a link up while valid frames arrive on it.

`UdpTransport` does all this on the trio loop (the daemon's tests run it on a fake network).
`ThreadedUdpTransport`, the one `lbha heartbeat` uses, does it on a plain thread, so the trio
loop sleeps through routine keepalives: a wake-up of the loop costs several times the CPU of
the keepalive itself (bench/README.md).
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
from typing import Protocol

import trio

from lbha.heartbeat.errors import TransportError
from lbha.heartbeat.keepalive_pump import KeepalivePump
from lbha.heartbeat.protocol import AUTH_FAILURES, MAX_FRAME, Frame, Verdict
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


#: A received frame for the daemon: (verdict, frame or None, link name).
_ForDaemon = tuple[Verdict, Frame | None, str]
#: What the keepalive thread hands the trio side: a frame (or stale verdict), or None for
#: the deadline.
_Handoff = _ForDaemon | None


def _take(pump: KeepalivePump, data: bytes, address: tuple[str, ...], now: float,
          ) -> _ForDaemon | None:
    """Pass one datagram through the pump; what the daemon must see, if anything (a frame
    that may change something, or a verdict to warn about: stale, or failing authentication
    from the peer's address, most likely a key mismatch). Other drops are counted by the
    pump's receiver and logged here."""
    link = f"udp:{address[0]}"
    verdict, frame = pump.received(data, link, now)
    if frame is not None or verdict is Verdict.STALE_GENERATION or (
            verdict in AUTH_FAILURES and pump.receiver.expects(link)):
        return verdict, frame, link
    if verdict is not Verdict.OK:
        log.debug("dropped a frame on %s: %s", link, verdict)
    return None

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
        """Until cancelled (after `open`): send `pump.frame()` every `pump.interval`, pass
        received frames through `pump.received` and hand `sink` what it does not keep, and
        call `sink.on_deadline()` when `pump.due()`; set `pump.rearm` to be woken when the
        pump's deadline moves earlier."""

    @abstractmethod
    async def send(self, frame: bytes) -> None:
        """Send one frame on every path; a path that fails is logged, never raised."""

    @abstractmethod
    def describe(self) -> list[str]:
        """Human-readable path names, for status output."""

    @abstractmethod
    def links(self) -> set[str] | None:
        """The link names frames may legitimately arrive on (None: any)."""


class UdpTransport(Transport):
    """UDP unicast to each peer address, from the matching local (bind) address.

    With `bind` empty, one wildcard socket per address family the peers use. With `bind` set,
    one socket per bind address; a peer address is reached from the first bind address of its
    family, so the source address the peer sees is predictable.
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

    def describe(self) -> list[str]:
        return [f"udp:{p} port {self.port}" for p in self.peers]

    def links(self) -> set[str] | None:
        return {f"udp:{p}" for p in self.peers}

    def _new_socket(self, family: socket.AddressFamily) -> trio.socket.SocketType:
        return trio.socket.socket(family, socket.SOCK_DGRAM)

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

    def _require_open(self) -> None:
        if not self._sockets:
            raise TransportError(f"{type(self).__name__}.run() before open()")

    def _socket_for(self, peer: IPAddress) -> trio.socket.SocketType | None:
        return next((s for local, s in self._sockets.items() if local.version == peer.version),
                    None)

    async def run(
        self, pump: KeepalivePump, sink: Sink, *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._require_open()
        rearmed = trio.Event()

        def rearm() -> None:
            rearmed.set()  # the pump is only used from the trio thread here

        pump.rearm = rearm
        async with trio.open_nursery() as nursery:
            for sock in self._sockets.values():
                nursery.start_soon(self._receive, sock, pump, sink)
            task_status.started()
            next_send = trio.current_time()
            while True:
                now = trio.current_time()
                if now >= next_send:
                    await self.send(pump.frame())
                    next_send = now + pump.interval
                if pump.due(now):
                    await sink.on_deadline()
                with trio.move_on_at(min(next_send, pump.deadline())):
                    await rearmed.wait()
                rearmed = trio.Event()

    @staticmethod
    async def _receive(sock: trio.socket.SocketType, pump: KeepalivePump, sink: Sink) -> None:
        while True:
            try:
                data, address = await sock.recvfrom(MAX_FRAME + 1)
            except OSError as exc:
                # ICMP errors from an earlier send surface here (ECONNREFUSED): not fatal.
                log.debug("heartbeat receive: %s", exc)
                continue
            taken = _take(pump, data, address, trio.current_time())
            if taken is not None:
                await sink.on_frame(*taken)

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


def _hand(channel: trio.MemorySendChannel[_Handoff], item: _Handoff) -> None:
    # Runs as a trio callback, where an exception would crash the loop: never raise.
    try:
        channel.send_nowait(item)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        log.debug("heartbeat hand-off while stopping; dropped")


class ThreadedUdpTransport(UdpTransport):
    """`UdpTransport` with the keepalive exchange on a plain thread (see the module doc).

    The thread owns receiving, the periodic keepalives and the pump's deadline; the daemon's
    own frames (a state change) still go out from trio through `send`. What the pump hands
    over reaches the daemon in order through a channel. The thread's clock is
    `time.perf_counter`: trio's default clock minus a constant offset, measured at `run`.
    """

    #: At most one frame-less verdict of each kind a second reaches the daemon (it only
    #: warns).
    WARN_EVERY = 1.0

    def __init__(self, peers: Sequence[IPAddress], port: int,
                 bind: Sequence[IPAddress] = ()) -> None:
        super().__init__(peers, port, bind)
        self._plain: dict[int, socket.socket] = {}

    def _new_socket(self, family: socket.AddressFamily) -> trio.socket.SocketType:
        plain = socket.socket(family, socket.SOCK_DGRAM)
        plain.setblocking(False)
        self._plain[plain.fileno()] = plain
        return trio.socket.from_stdlib_socket(plain)

    def close(self) -> None:
        super().close()
        self._plain.clear()

    async def run(
        self, pump: KeepalivePump, sink: Sink, *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._require_open()
        to_trio, from_thread = trio.open_memory_channel[_Handoff](math.inf)
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
                nursery.start_soon(self._from_thread, from_thread, sink)
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
    async def _from_thread(from_thread: trio.MemoryReceiveChannel[_Handoff],
                           sink: Sink) -> None:
        async for item in from_thread:
            if item is None:
                await sink.on_deadline()
            else:
                await sink.on_frame(*item)

    @staticmethod
    async def _stop_thread_on_cancel(wake_w: socket.socket) -> None:
        try:
            await trio.sleep_forever()
        finally:
            wake_w.shutdown(socket.SHUT_WR)  # the thread reads EOF and returns

    def _pump_thread(self, pump: KeepalivePump, to_trio: trio.MemorySendChannel[_Handoff],
                     token: trio.lowlevel.TrioToken, offset: float, wake: socket.socket) -> None:
        routes = [(self._plain[sock.fileno()], (str(peer), self.port))
                  for peer in self.peers if (sock := self._socket_for(peer)) is not None]
        wake_fd = wake.fileno()
        next_send = time.perf_counter()
        #: Verdict -> when one was last handed over without a frame.
        warned: dict[Verdict, float] = {}
        # epoll, not poll: the registration stays put instead of being redone at every wake.
        with select.epoll() as poller:
            for fd in self._plain:
                poller.register(fd, select.EPOLLIN)
            poller.register(wake, select.EPOLLIN)
            while True:
                now = time.perf_counter()
                if now >= next_send:
                    frame = pump.frame()
                    for plain, destination in routes:
                        try:
                            plain.sendto(frame, destination)
                        except OSError as exc:
                            log.debug("heartbeat send to %s failed: %s", destination[0], exc)
                    next_send = now + pump.interval
                if pump.due(now + offset):
                    token.run_sync_soon(_hand, to_trio, None)
                wake_at = min(next_send, pump.deadline() - offset)
                for fd, _ in poller.poll(max(0.0, wake_at - now)):
                    if fd == wake_fd:
                        if not wake.recv(64):
                            return
                        continue
                    try:
                        data, address = self._plain[fd].recvfrom(MAX_FRAME + 1)
                    except OSError as exc:  # EAGAIN, or an ICMP error from an earlier send
                        log.debug("heartbeat receive: %s", exc)
                        continue
                    at = time.perf_counter()
                    if next_send - at < pump.interval / 2:
                        # Answer now rather than wake again in a moment: nodes fall into step,
                        # one wake-up a keepalive instead of two. Gaps stay within `interval`.
                        next_send = at
                    taken = _take(pump, data, address, at + offset)
                    if taken is None:
                        continue
                    if taken[1] is None:  # a verdict to warn about: the daemon only warns
                        if at - warned.get(taken[0], -math.inf) < self.WARN_EVERY:
                            continue
                        warned[taken[0]] = at
                    token.run_sync_soon(_hand, to_trio, taken)
