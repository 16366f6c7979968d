"""A fake datagram network for trio tests: no real sockets, seeded drop/duplicate/delay/reorder.

Installed with `trio.socket.set_custom_socket_factory`. Time is trio's clock: under
`autojump_clock` delays cost nothing. Hosts are just the addresses sockets bind to;
`partition(a, b)` silently drops traffic between two of them. `FakeNetTransport` is the
daemon's own transport on it, with only its keepalive thread replaced by a trio loop.
"""

from __future__ import annotations

import math
import random
import socket
from functools import partial
from typing import Any

import trio

from lbha.heartbeat.keepalive_pump import KeepalivePump
from lbha.heartbeat.protocol import MAX_FRAME
from lbha.heartbeat.transport import Handed, Sink, ThreadedUdpTransport, deliver, udp_link


class FakeNet(trio.abc.SocketFactory):
    def __init__(self, seed: int = 0, *, drop: float = 0.0, duplicate: float = 0.0,
                 delay: tuple[float, float] = (0.0, 0.0)) -> None:
        self.rng = random.Random(seed)
        self.drop = drop
        self.duplicate = duplicate
        self.delay = delay
        self.bound: dict[tuple[str, int], FakeSocket] = {}
        self.blocked: set[frozenset[str]] = set()
        #: (source, destination) pairs dropped one way only.
        self.blocked_one_way: set[tuple[str, str]] = set()
        self.sent = 0
        self.dropped = 0
        #: (time, source host) of every datagram sent.
        self.sent_at: list[tuple[float, str]] = []

    def install(self) -> None:
        trio.socket.set_custom_socket_factory(self)

    def socket(self, family: Any = socket.AF_INET, type: Any = socket.SOCK_DGRAM,
               proto: int = 0) -> FakeSocket:
        assert type == socket.SOCK_DGRAM, "the fake network carries datagrams only"
        return FakeSocket(self, family)

    def partition(self, a: str, b: str) -> None:
        self.blocked.add(frozenset((a, b)))

    def block_one_way(self, source: str, destination: str) -> None:
        """Drop traffic from `source` to `destination` only (e.g. the sender's neighbour
        entry for the destination failed, while the other way still works)."""
        self.blocked_one_way.add((source, destination))

    def heal(self) -> None:
        self.blocked.clear()
        self.blocked_one_way.clear()

    def inject(self, source: tuple[str, int], destination: tuple[str, int], data: bytes) -> None:
        """A datagram from a host with no socket here (an attacker on the LAN)."""
        self._route(source, destination, data)

    def _route(self, source: tuple[str, int], destination: tuple[str, int], data: bytes) -> None:
        self.sent += 1
        self.sent_at.append((trio.current_time(), source[0]))
        if frozenset((source[0], destination[0])) in self.blocked or \
                (source[0], destination[0]) in self.blocked_one_way or \
                self.rng.random() < self.drop:
            self.dropped += 1
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            delay = self.rng.uniform(*self.delay)
            trio.lowlevel.spawn_system_task(self._deliver_later, delay, source, destination,
                                            data)

    async def _deliver_later(self, delay: float, source: tuple[str, int],
                             destination: tuple[str, int], data: bytes) -> None:
        await trio.sleep(delay)
        target = self.bound.get(destination)
        if target is not None and not target.closed:
            target.queue.append((data, source))
            target.ready.set()


class FakeSocket(trio.socket.SocketType):
    def __init__(self, net: FakeNet, family: int) -> None:
        super().__init__()
        self.net = net
        self._family = family
        self.address: tuple[str, int] | None = None
        self.queue: list[tuple[bytes, tuple[str, int]]] = []
        self.ready = trio.Event()
        self.closed = False
        self.options: dict[tuple[int, int], Any] = {}

    @property
    def family(self) -> Any:
        return self._family

    @property
    def type(self) -> Any:
        return socket.SOCK_DGRAM

    def setsockopt(self, level: int, optname: int, value: Any, optlen: Any = None) -> None:
        self.options[(level, optname)] = value

    async def bind(self, address: Any) -> None:
        await trio.lowlevel.checkpoint()
        key = (address[0], address[1])
        if key in self.net.bound:
            raise OSError(98, "Address already in use")
        self.net.bound[key] = self
        self.address = key

    def getsockname(self) -> Any:
        return self.address

    async def sendto(self, data: Any, *args: Any) -> int:
        await trio.lowlevel.checkpoint()
        assert self.address is not None
        destination = args[-1]
        self.net._route(self.address, (destination[0], destination[1]), bytes(data))
        return len(data)

    async def recvfrom(self, bufsize: int, flags: int = 0) -> Any:
        while not self.queue:
            if self.closed:
                raise trio.ClosedResourceError
            self.ready = trio.Event()
            await self.ready.wait()
        await trio.lowlevel.checkpoint()
        data, source = self.queue.pop(0)
        return data[:bufsize], source

    def close(self) -> None:
        self.closed = True
        self.ready.set()
        if self.address is not None and self.net.bound.get(self.address) is self:
            del self.net.bound[self.address]

    def fileno(self) -> int:
        return -1


#: What the thread's epoll reports, as one queue: a datagram, or None for a rearm.
_Event = tuple[bytes, Any] | None


class FakeNetTransport(ThreadedUdpTransport):
    """`lbha heartbeat`'s transport on the fake network: its sockets code (on the fake
    sockets), the pump's decisions (`timers`, `datagram`, `wake_at`) and the hand-off to the
    daemon (`deliver`) are the production code; only the keepalive thread's epoll loop is
    replaced by this trio loop, step for step, so MockClock drives it."""

    def _new_socket(self, family: socket.AddressFamily) -> trio.socket.SocketType:
        return trio.socket.socket(family, socket.SOCK_DGRAM)

    async def run(
        self, pump: KeepalivePump, sink: Sink, *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._require_open()
        to_daemon, handed = trio.open_memory_channel[Handed](math.inf)
        report, events = trio.open_memory_channel[_Event](math.inf)
        pump.rearm = partial(report.send_nowait, None)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(deliver, handed, sink)
                for sock in self._sockets.values():
                    nursery.start_soon(self._receive, sock, report)
                task_status.started()
                while True:
                    now = trio.current_time()
                    frame, due = pump.timers(now)
                    if frame is not None:
                        await self.send(frame)
                    if due:
                        to_daemon.send_nowait(None)
                    with trio.move_on_at(pump.wake_at()):
                        event = await events.receive()
                        if event is not None:
                            handoff = pump.datagram(event[0], udp_link(event[1]),
                                                    trio.current_time())
                            if handoff is not None:
                                to_daemon.send_nowait(handoff)
        finally:
            pump.rearm = lambda: None

    @staticmethod
    async def _receive(sock: trio.socket.SocketType,
                       report: trio.MemorySendChannel[_Event]) -> None:
        while True:
            data, address = await sock.recvfrom(MAX_FRAME + 1)
            report.send_nowait((data, address))
