"""A fake datagram network for trio tests: no real sockets, seeded drop/duplicate/delay/reorder.

Installed with `trio.socket.set_custom_socket_factory`, so the real `UdpTransport` runs on it
unchanged. Time is trio's clock: under `autojump_clock` delays cost nothing. Hosts are just
the addresses sockets bind to; `partition(a, b)` silently drops traffic between two of them.
"""

from __future__ import annotations

import random
import socket
from typing import Any

import trio


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
