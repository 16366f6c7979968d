"""The check kit's pieces on their own: schedules, the UDP exchange, the runner, the texts."""

from __future__ import annotations

import errno
import math

import pytest
import trio
from hostile import serve_udp

from lbha.checkapi import CheckRequest, CheckResult, Transcript
from lbha.checkkit import (
    CheckFailed,
    describe_error,
    matches,
    printable,
    quote,
    run_within,
    udp,
)
from lbha.checks.sip import TIMER_E
from lbha.testing import check_spec, target


def test_schedules_of_the_three_udp_protocols() -> None:
    dns = udp.backoff(1.0)
    assert [dns(n) for n in range(1, 5)] == [1.0, 2.0, 4.0, 8.0]
    assert [TIMER_E(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    radius = udp.backoff(0.9, factor=1.0, sends=3)
    assert [radius(n) for n in range(1, 4)] == [0.9, 0.9, math.inf]


async def test_exchange_sends_on_the_schedule_until_the_answer(autojump_clock) -> None:
    """The server answers the third datagram; sends at 0, 0.5 and 1.5 s (T1 doubling)."""
    sent_at: list[float] = []
    seen: list[bytes] = []

    def answer(data: bytes) -> list[bytes]:
        seen.append(data)
        return [b"junk", b"yes"] if len(seen) == 3 else [b"junk"]

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_udp, answer)
        start = trio.current_time()
        async with udp.udp_socket(target(rport=port)) as sock:
            verdict = await udp.exchange(
                sock, b"ask", lambda data: "answer" if data == b"yes" else None, TIMER_E,
                max_datagrams=10, sent=lambda n: sent_at.append(trio.current_time() - start))
        nursery.cancel_scope.cancel()
    assert verdict == "answer"
    assert sent_at == pytest.approx([0.0, 0.5, 1.5])
    assert seen == [b"ask"] * 3


async def test_exchange_gives_up_after_max_datagrams(autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_udp, lambda data: [b"junk"] * 5)
        async with udp.udp_socket(target(rport=port)) as sock:
            verdict = await udp.exchange(sock, b"ask", lambda data: None, udp.backoff(1.0),
                                         max_datagrams=5)
        nursery.cancel_scope.cancel()
    assert verdict is None


def _request(timeout: float, transcript: Transcript | None = None) -> CheckRequest:
    spec = check_spec("dns")
    return CheckRequest(target(rport=53), spec, spec.options, timeout, transcript)


async def test_run_within_gives_the_checks_own_verdict_before_the_deadline(
        autojump_clock) -> None:
    transcript = Transcript()
    request = _request(3.0, transcript)
    start = trio.current_time()
    result = await run_within(request, trio.sleep_forever,  # type: ignore[arg-type]
                              timed_out=lambda budget: f"nothing within {budget:g} s")
    assert result == CheckResult.failure("nothing within 2.9 s")
    assert trio.current_time() - start == pytest.approx(2.9)
    assert transcript.lines == ["* nothing within 2.9 s"]


async def test_run_within_turns_failures_and_errors_into_reasons() -> None:
    async def fails() -> CheckResult:
        raise CheckFailed("the server said no")

    async def refused() -> CheckResult:
        raise OSError(errno.ECONNREFUSED, "refused")

    request = _request(1.0)
    assert await run_within(request, fails, timed_out=str) == CheckResult.failure(
        "the server said no")
    assert await run_within(
        request, refused, timed_out=str,
        error=lambda exc: describe_error("connect to", "198.18.0.21:80", exc),
    ) == CheckResult.failure("connect to 198.18.0.21:80 refused")
    with pytest.raises(OSError, match="refused"):  # without `error` it is the engine's
        await run_within(request, refused, timed_out=str)


def test_one_describer_for_tcp_udp_and_broken_streams() -> None:
    refused = OSError(errno.ECONNREFUSED, "Connection refused")
    assert describe_error("connect to", "h:1", refused) == "connect to h:1 refused"
    assert describe_error("DNS query to", "h:53", refused, udp="DNS: ") == \
        "DNS: UDP port h:53 unreachable (ICMP port unreachable)"
    broken = trio.BrokenResourceError()
    broken.__cause__ = OSError(errno.ECONNRESET, "reset")
    assert describe_error("query to", "h:1", broken) == \
        "query to h:1 failed: connection reset by the server"


def test_quote_printable_and_matches() -> None:
    assert quote(b"OK\r\n\x1b[31m") == "'OK???[31m'"
    assert quote("x" * 70) == "'" + "x" * 60 + "...'"
    assert quote("abc", marks=False) == "abc"
    assert quote("a" * 500, None, marks=False) == "a" * 500
    assert printable(b"a\r\nb\x00") == "a\\r\\nb\\x00"
    assert matches(b"HTTP/1.1 200 OK", "200", regex=False)
    assert matches("192.0.2.10", r"^192\.0\.2\.\d+$", regex=True)
    assert not matches(b"nope", "200", regex=False)
    with pytest.raises(CheckFailed, match="not a valid regex"):
        matches(b"x", "(", regex=True)
