"""Ports and descriptors of the test process: free and closed loopback ports, the fd table,
a bounded wait for abandoned threads and sockets to go, and the 10,000-logins run every
blocking-library check makes against its real server."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import trio

from lbha.checkapi import CheckResult
from lbha.checkkit.blocking import RunLimiter


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for servers we start and stopped servers)."""
    with socket.socket(_family(host), kind) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextmanager
def closed_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A TCP port bound but not listening (held so nobody takes it): connecting is refused."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        yield sock.getsockname()[1]


def open_fds() -> int:
    """How many descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def fd_table() -> dict[str, str]:
    """fd -> what it is (socket:[inode], pipe, file), for a readable leak report."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return out


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


async def ten_thousand_logins(login: Callable[[str], Awaitable[CheckResult]], password: str,
                              limiter: RunLimiter) -> None:
    """10,000 checks of a blocking-library check against its real server, every tenth with
    a wrong password: each verdict right, and no thread or descriptor left behind.

    `login(password)` runs one check. Batches of twice the limiter: enough to queue for
    threads, not so many that the queue outlasts the deadline on a busy machine.
    """
    threads, fds = threading.active_count(), open_fds()
    verdicts: list[bool] = []
    surprises: list[str] = []

    async def one(i: int) -> None:
        wrong = i % 10 == 9
        result = await login("no" if wrong else password)
        verdicts.append(result.up)
        if result.up == wrong:
            surprises.append(result.reason)

    batch = 2 * limiter.tokens
    for start in range(0, 10_000, batch):
        async with trio.open_nursery() as nursery:
            for i in range(start, min(start + batch, 10_000)):
                nursery.start_soon(one, i)
    assert not surprises, surprises[:5]
    assert verdicts.count(True) == 9000
    now_threads, now_fds = await settle(threads + limiter.tokens, fds, limiter.get())
    assert now_fds <= fds
    assert now_threads <= threads + limiter.tokens


async def timed(run: Awaitable[CheckResult]) -> tuple[CheckResult, float]:
    """The result of `run` and how long it took (trio's clock)."""
    started = trio.current_time()
    result = await run
    return result, trio.current_time() - started
