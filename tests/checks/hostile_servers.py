"""Scripted hostile TCP servers on 127.0.0.1 for the negotiate checks' failure paths."""

from __future__ import annotations

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
