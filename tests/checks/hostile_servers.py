"""Scripted hostile TCP servers on 127.0.0.1 for the negotiate checks' failure paths."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import trio

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def silent(stream: trio.SocketStream) -> None:
    """Accept, read whatever comes, never answer."""
    while await stream.receive_some(65536):
        pass
    await trio.sleep_forever()


def send_then_hold(data: bytes, *, after_request: bool = True, close: bool = False) -> Handler:
    """Send `data` (after the client's first bytes, or at once), then hold or close."""
    async def handler(stream: trio.SocketStream) -> None:
        if after_request:
            await stream.receive_some(65536)
        await stream.send_all(data)
        if close:
            await stream.aclose()
            return
        await silent(stream)
    return handler


def trickle(data: bytes, interval: float = 0.1) -> Handler:
    """Send `data` one byte every `interval` seconds, starting at once."""
    async def handler(stream: trio.SocketStream) -> None:
        for i in range(len(data)):
            await stream.send_all(data[i:i + 1])
            await trio.sleep(interval)
        await silent(stream)
    return handler


async def _guarded(handler: Handler, stream: trio.SocketStream) -> None:
    # The check under test may reset the connection at any time; that is its right.
    try:
        await handler(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[int]:
    """Serve `handler` on a free 127.0.0.1 port for the duration of the block."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, partial(_guarded, handler), listeners))
        yield port
        nursery.cancel_scope.cancel()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing listens on right now (for servers we start and stopped servers)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settle(max_threads: int, max_fds: int, limiter: trio.CapacityLimiter | None = None,
                 seconds: float = 5.0) -> tuple[int, int]:
    """Wait (bounded) for abandoned worker threads to end and their sockets to close.

    Returns the thread and descriptor counts at the end. trio keeps idle worker threads
    for reuse a few seconds, so callers allow for the limiter's capacity in `max_threads`.
    """
    for _ in range(int(seconds / 0.05)):
        if (threading.active_count() <= max_threads and open_fds() <= max_fds
                and (limiter is None or not limiter.borrowed_tokens)):
            break
        await trio.sleep(0.05)
    return threading.active_count(), open_fds()
