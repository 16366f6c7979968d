"""Scripted hostile TCP servers on loopback, for any check that talks TCP (and a UDP one).

    async with hostile_server(trickle(b"HTTP/1.1 200 OK\\r\\n")) as port:
        result = await run_check_now("http", rport=port, negotiate_timeout=0.5)

A behaviour is an async function of the accepted trio stream, made by one of the factories
here (or written in the test for an exact wire shape). `hostile_server` runs it for every
connection, closes the connection when the behaviour returns or the client goes away, and
stops everything when the block ends.

Behaviours never close first unless told to (`script(..., close=True)`): they read and drop
whatever the client sends and close once its end of stream arrives, so the fd-growth tests
see both sides go. A client that half-closes and then waits for the answer (simpletcp does)
needs `hold=True`: the connection then stays open until the server stops.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

Behaviour = Callable[[trio.SocketStream], Awaitable[None]]
#: A hostile UDP server: gets each datagram, returns the datagrams to answer with.
Answer = Callable[[bytes], list[bytes]]

#: Bytes a garbage server sends: a TLS alert-looking header, NULs and high bytes.
GARBAGE = b"\x15\x03\x01\x00\x02\x02\x50\x00\xff\xfe\x00garbage\x00\x1b[0m" * 4


async def drain(stream: trio.SocketStream, *, hold: bool = False) -> None:
    """Read and drop what the client sends until its end of stream; with `hold`, then keep
    the connection open until the server stops."""
    while await stream.receive_some(65536):
        pass
    if hold:
        await trio.sleep_forever()


def silent(prefix: bytes = b"", *, hold: bool = False) -> Behaviour:
    """Send `prefix` (a greeting, say) at once, then never answer."""
    async def behave(stream: trio.SocketStream) -> None:
        if prefix:
            await stream.send_all(prefix)
        await drain(stream, hold=hold)
    return behave


def garbage(prefix: bytes = b"", data: bytes = GARBAGE, *, hold: bool = False) -> Behaviour:
    """Answer at once with bytes no protocol expects (after `prefix`), then never again."""
    return silent(prefix + data, hold=hold)


def trickle(data: bytes, interval: float = 1.0, prefix: bytes = b"", *,
            hold: bool = False) -> Behaviour:
    """Send `prefix` at once, then `data` one byte every `interval` seconds whatever the
    client does meanwhile, then never answer."""
    async def behave(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            # Reading meanwhile keeps the client from blocking on a full window.
            nursery.start_soon(functools.partial(drain, stream, hold=hold))
            if prefix:
                await stream.send_all(prefix)
            for byte in data:
                await stream.send_all(bytes([byte]))
                await trio.sleep(interval)
    return behave


def script(*steps: bytes | None, close: bool = False, reset: bool = False) -> Behaviour:
    """Send each step in turn, None meaning "read one chunk from the client" (the server
    gives up if the client has gone); then never answer, or close: with FIN when `close`,
    with RST when `reset`."""
    async def behave(stream: trio.SocketStream) -> None:
        for step in steps:
            if step is None:
                if not await stream.receive_some(65536):
                    return
            else:
                await stream.send_all(step)
        if reset:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif not close:
            await drain(stream)
    return behave


def endless(prefix: bytes, filler: bytes = b"x" * 65536) -> Behaviour:
    """Read the request, send `prefix`, then `filler` forever: an answer that never ends."""
    async def behave(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(prefix)
        while True:
            await stream.send_all(filler)
    return behave


def tls_stall(*steps: bytes | None) -> Behaviour:
    """Play `steps` as `script` does (a greeting, STARTTLS and its answer), read the
    ClientHello, send the first bytes of a ServerHello record, then nothing."""
    async def behave(stream: trio.SocketStream) -> None:
        await script(*steps, close=True)(stream)
        if await stream.receive_some(65536):
            # Record header: handshake (22), TLS 1.2, length 100; the 100 bytes never come.
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
                pass  # the client went away (it may reset at any time): that ends any behaviour

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host=host))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def serve_udp(answer: Answer, *, task_status: trio.TaskStatus[int]) -> None:
    """Answer every datagram on 127.0.0.1 as `answer` says, until cancelled; reports the port."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, peer = await sock.recvfrom(65535)
            for datagram in answer(data):
                await sock.sendto(datagram, peer)
