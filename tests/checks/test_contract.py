"""The contract every UDP and every blocking-library check keeps, run against each of them.

A check is a UDP check when it uses the kit's `udp.exchange`, a blocking one when it uses
the kit's `run_blocking`; both are found among the installed checks, so a new check of
either kind runs this suite without being listed here. Its required spec keys get
placeholder values: these servers never judge them.

UDP: a silent server is down at the check's own deadline with the check's own reason;
garbage is ignored, not believed, until then; a closed port is down at once; thousands of
checks (silent, garbage, refused, cancelled from outside) leave no socket behind.
Blocking: a silent or trickling server is down within the deadline with the phase named;
checks the engine cancels leave no thread and no socket behind.
"""

from __future__ import annotations

import inspect
import random
import socket
import sys
import threading
from typing import Any

import pytest
import trio
from hostile import GARBAGE, hostile_server, serve_udp, silent, trickle
from resources import closed_port, free_port, open_fds, settle, timed

from lbha.checkapi import CheckResult, required_spec_keys_of
from lbha.checkkit.blocking import RunLimiter
from lbha.testing import installed_checks, run_check_now

DEADLINE = 0.5
#: What the issue allows past the deadline for a verdict.
SLACK = 0.1
#: Placeholders for required spec keys.
_PLACEHOLDERS: dict[str, Any] = {"request": "www.example.test", "login": "lbha",
                                 "password": "lbha", "secret": "lbha", "database": "lbha"}


def _using(marker: str) -> list[str]:
    registry = installed_checks()
    return sorted(name for name in registry
                  if marker in inspect.getsource(sys.modules[type(registry.get(name)).__module__]))


UDP_CHECKS = _using("udp.exchange(")
BLOCKING_CHECKS = _using("run_blocking(")


def test_the_kit_users_are_found() -> None:
    assert {"dns", "sip", "radius"} <= set(UDP_CHECKS)
    assert {"ldap", "ldaps", "mysql"} <= set(BLOCKING_CHECKS)


async def check(name: str, port: int, **spec: Any) -> CheckResult:
    required = {key: _PLACEHOLDERS[key] for key in required_spec_keys_of(
        installed_checks().get(name))}
    spec.setdefault("negotiate_timeout", DEADLINE)
    return await run_check_now(name, rport=port, protocol="udp" if name in UDP_CHECKS
                               else "tcp", **(required | spec))


def assert_own_verdict(result: CheckResult) -> None:
    """Down with the check's reason, not the engine's bare one."""
    assert not result.up
    assert not result.reason.startswith("timeout after"), result.reason


# ------------------------------------------------------------------------- UDP checks


async def on_udp(name: str, answer: Any, **spec: Any) -> tuple[CheckResult, float]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_udp, answer)
        outcome = await timed(check(name, port, **spec))
        nursery.cancel_scope.cancel()
    return outcome


@pytest.mark.parametrize("name", UDP_CHECKS)
@pytest.mark.wallclock
async def test_udp_silent_server_is_down_at_the_deadline(name: str) -> None:
    result, elapsed = await on_udp(name, lambda data: [])
    assert_own_verdict(result)
    assert "within 0.45 s" in result.reason or "within 0.5 s" in result.reason, result.reason
    assert elapsed <= DEADLINE + SLACK


@pytest.mark.parametrize("name", UDP_CHECKS)
@pytest.mark.wallclock
async def test_udp_garbage_is_ignored_until_the_deadline(name: str) -> None:
    junk = [b"", b"\x00", GARBAGE, b"\xff" * 600, b"HTTP/1.1 400 Bad Request\r\n\r\n"]
    result, elapsed = await on_udp(name, lambda data: junk)
    assert_own_verdict(result)
    assert "ignored" in result.reason, result.reason
    assert elapsed <= DEADLINE + SLACK


@pytest.mark.parametrize("name", UDP_CHECKS)
@pytest.mark.wallclock
async def test_udp_closed_port_is_down_at_once(name: str) -> None:
    port = free_port(socket.SOCK_DGRAM)
    result, elapsed = await timed(check(name, port, negotiate_timeout=3.0))
    assert_own_verdict(result)
    assert "unreachable" in result.reason or "refused" in result.reason, result.reason
    assert elapsed < 0.5


@pytest.mark.parametrize("name", UDP_CHECKS)
async def test_udp_ten_thousand_checks_leave_no_socket_behind(name: str) -> None:
    """Silent, garbage, refused and cancelled-from-outside checks, 200 at a time."""
    rng = random.Random(7)
    dead_port = free_port(socket.SOCK_DGRAM)
    counts = {"down": 0, "cancelled": 0}

    async with trio.open_nursery() as servers:
        silent_port = await servers.start(serve_udp, lambda data: [])
        junk_port = await servers.start(serve_udp, lambda data: [GARBAGE])
        before = open_fds()
        limiter = trio.CapacityLimiter(200)

        async def one(kind: int) -> None:
            async with limiter:
                if kind == 3:
                    with trio.move_on_after(rng.uniform(0, 0.02)):
                        await check(name, silent_port)
                    counts["cancelled"] += 1
                    return
                port = (silent_port, junk_port, dead_port)[kind]
                result = await check(name, port, negotiate_timeout=0.1 if kind < 2 else 3.0)
                assert not result.up
                counts["down"] += 1

        async with trio.open_nursery() as nursery:
            for i in range(10_000):
                nursery.start_soon(one, i % 4)
        after = open_fds()
        servers.cancel_scope.cancel()
    assert sum(counts.values()) == 10_000
    assert after == before, f"{after - before} descriptors leaked"


# -------------------------------------------------------------------- blocking checks


def _limiter(name: str) -> RunLimiter:
    module = sys.modules[type(installed_checks().get(name)).__module__]
    (limiter,) = {v for v in vars(module).values() if isinstance(v, RunLimiter)}
    return limiter


@pytest.mark.parametrize("name", BLOCKING_CHECKS)
@pytest.mark.parametrize("behaviour", ["silent", "trickle"])
@pytest.mark.wallclock
async def test_blocking_hostile_server_is_down_within_the_deadline(name: str,
                                                                   behaviour: str) -> None:
    handler = silent() if behaviour == "silent" else trickle(b"\x30" * 200, 0.05)
    async with hostile_server(handler) as port:
        result, elapsed = await timed(check(name, port, negotiate_timeout=0.6))
    assert_own_verdict(result)
    assert f"127.0.0.1:{port}" in result.reason, result.reason
    assert elapsed < 0.7, elapsed


@pytest.mark.parametrize("name", BLOCKING_CHECKS)
async def test_blocking_closed_port_is_down_at_once(name: str) -> None:
    with closed_port() as port:
        result, elapsed = await timed(check(name, port, negotiate_timeout=3.0))
    assert_own_verdict(result)
    assert "refused" in result.reason, result.reason
    assert elapsed < 0.5


@pytest.mark.parametrize("name", BLOCKING_CHECKS)
@pytest.mark.wallclock
async def test_blocking_cancelled_checks_leave_no_threads_or_sockets(name: str) -> None:
    """The engine gives up at the deadline; the abandoned threads end promptly anyway."""
    limiter = _limiter(name)
    threads, fds = threading.active_count(), open_fds()
    async with hostile_server(silent()) as port, trio.open_nursery() as nursery:
        for _ in range(limiter.tokens * 3):
            # A deadline shorter than the check's own timeouts: the engine cancels it.
            nursery.start_soon(lambda: check(name, port, seconds=0.2, negotiate_timeout=5.0))
    assert limiter.get().borrowed_tokens <= limiter.tokens
    start = trio.current_time()
    now_threads, now_fds = await settle(threads + limiter.tokens, fds, limiter.get())
    assert limiter.get().borrowed_tokens == 0
    assert trio.current_time() - start < 0.5  # interrupted, not waiting for their timeouts
    assert now_fds <= fds
    assert now_threads <= threads + limiter.tokens
