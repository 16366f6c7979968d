"""Heartbeat links. `Transport` is the seam: UDP unicast today, a serial line later.

A transport carries opaque frames both ways. It never interprets them: authentication and
replay checks happen in `protocol.Receiver`, so a forged frame costs one HMAC and nothing else.
Each received frame is tagged with a link name ("udp:198.18.0.2"); the state machine keeps a
link up while valid frames arrive on it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence

import trio

from lbha.heartbeat.errors import TransportError
from lbha.heartbeat.protocol import MAX_FRAME
from lbha.model import IPAddress

log = logging.getLogger(__name__)

#: Awaited with (frame bytes, link name) for every datagram received, before the next receive.
Deliver = Callable[[bytes, str], Awaitable[None]]

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
        self, deliver: Deliver, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver received frames until cancelled (after `open`)."""

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

    async def _open_one(self, local: IPAddress) -> trio.socket.SocketType:
        family = socket.AF_INET if local.version == 4 else socket.AF_INET6
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
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

    async def run(
        self, deliver: Deliver, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if not self._sockets:
            raise TransportError("UdpTransport.run() before open()")
        async with trio.open_nursery() as nursery:
            for sock in self._sockets.values():
                nursery.start_soon(self._receive, sock, deliver)
            task_status.started()

    @staticmethod
    async def _receive(sock: trio.socket.SocketType, deliver: Deliver) -> None:
        while True:
            try:
                data, address = await sock.recvfrom(MAX_FRAME + 1)
            except OSError as exc:
                # ICMP errors from an earlier send surface here (ECONNREFUSED): not fatal.
                log.debug("heartbeat receive: %s", exc)
                continue
            await deliver(data, f"udp:{address[0]}")

    async def send(self, frame: bytes) -> None:
        for peer in self.peers:
            sock = next((s for local, s in self._sockets.items()
                         if local.version == peer.version), None)
            if sock is None:
                continue
            try:
                await sock.sendto(frame, (str(peer), self.port))
            except OSError as exc:
                # Link down or no route: the peer's silence will tell the state machine.
                log.debug("heartbeat send to %s failed: %s", peer, exc)
