"""Scripted hostile servers on loopback, for any check that talks TCP.

    async with hostile_server(trickle(b"HTTP/1.1 200 OK\\r\\n")) as port:
        result = await run_check_now("http", rport=port, negotiate_timeout=0.5)

Each behaviour is an async function of the accepted trio stream; `hostile_server` runs it for
every connection in a nursery of its own, closes each connection when the behaviour returns or
the client goes away, and stops everything when the block ends. Behaviours take an optional
`prefix` sent first, so a protocol's greeting (`b"220 mail ESMTP\\r\\n"`) can precede the
misbehaviour.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

Behaviour = Callable[[trio.SocketStream], Awaitable[None]]

#: Bytes a garbage server sends: a TLS alert-looking header, NULs and high bytes.
GARBAGE = b"\x15\x03\x01\x00\x02\x02\x50\x00\xff\xfe\x00garbage\x00\x1b[0m" * 4


async def drain(stream: trio.SocketStream) -> None:
    """Read and drop what the client sends; never close first.

    A client that half-closes (simpletcp does) still gets no answer and no close: the
    connection is held until the client resets or closes it (seen by polling, as a
    half-closed socket is always readable), or the server stops.
    """
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await stream.receive_some(65536):
            pass
    sock = stream.socket
    with contextlib.suppress(OSError):
        while True:
            await trio.sleep(0.05)
            # Raises once the client's reset arrived; b"" while it only half-closed.
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)


def silent(prefix: bytes = b"") -> Behaviour:
    """Accept (after `prefix`) and never answer; read whatever comes so the client is not
    blocked on a full window."""
    async def behave(stream: trio.SocketStream) -> None:
        if prefix:
            await stream.send_all(prefix)
        await drain(stream)
    return behave


def trickle(data: bytes, interval: float = 1.0, prefix: bytes = b"") -> Behaviour:
    """Send `data` one byte every `interval` seconds (after `prefix` at once)."""
    async def behave(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, stream)
            if prefix:
                await stream.send_all(prefix)
            for byte in data:
                await stream.send_all(bytes([byte]))
                await trio.sleep(interval)
            await trio.sleep_forever()
    return behave


def garbage(prefix: bytes = b"", data: bytes = GARBAGE) -> Behaviour:
    """Answer at once with bytes no protocol expects, then wait for the client to leave."""
    async def behave(stream: trio.SocketStream) -> None:
        await stream.send_all(prefix + data)
        await drain(stream)
    return behave


def close_after(data: bytes, *, wait_for_request: bool = True, reset: bool = False) -> Behaviour:
    """Send `data` (a truncated answer) and close: with FIN, or RST when `reset`."""
    async def behave(stream: trio.SocketStream) -> None:
        if wait_for_request:
            await stream.receive_some(65536)
        await stream.send_all(data)
        if reset:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return behave


def endless(prefix: bytes, filler: bytes = b"x" * 65536) -> Behaviour:
    """Send `prefix`, then `filler` forever: an answer that never ends."""
    async def behave(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(prefix)
        while True:
            await stream.send_all(filler)
    return behave


def tls_stall() -> Behaviour:
    """Read the ClientHello, send the first bytes of a ServerHello record, then nothing."""
    async def behave(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        # Record header: handshake (22), TLS 1.2, length 100 — the 100 bytes never come.
        await stream.send_all(b"\x16\x03\x03\x00\x64\x02")
        await drain(stream)
    return behave


@contextlib.asynccontextmanager
async def hostile_server(behaviour: Behaviour, host: str = "127.0.0.1") -> AsyncIterator[int]:
    """Serve `behaviour` on a free port of `host`; yields the port."""
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await behaviour(stream)
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away: that ends any behaviour

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host=host))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()
