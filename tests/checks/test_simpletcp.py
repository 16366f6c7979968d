"""`simpletcp` against a line-based trio server on loopback and the hostile servers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from hostile import GARBAGE, endless, garbage, hostile_server, script, silent, trickle
from resources import closed_port, open_fds

from lbha.checkapi import Transcript
from lbha.checks.simpletcp import request_bytes
from lbha.testing import run_check_now

DEADLINE = 0.5
SLACK = 0.1
ANSWER = b"hello there\r\nSTATUS OK\r\nload 0.5\nlast line without end"


@asynccontextmanager
async def line_server(answer: bytes = ANSWER) -> AsyncIterator[tuple[int, list[bytes]]]:
    """Reads the request until the client half-closes, records it, answers, closes."""
    seen: list[bytes] = []

    async def behave(stream: trio.SocketStream) -> None:
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
        seen.append(data)
        await stream.send_all(answer)

    async with hostile_server(behave) as port:
        yield port, seen


async def timed(**spec: object) -> tuple[bool, str, float]:
    spec.setdefault("negotiate_timeout", DEADLINE)
    start = time.monotonic()
    result = await run_check_now("simpletcp", **spec)  # type: ignore[arg-type]
    return result.up, result.reason, time.monotonic() - start


def test_only_backslash_n_is_translated() -> None:
    assert request_bytes("PING\\nSTATUS\\r\\n") == b"PING\nSTATUS\\r\n"
    assert request_bytes(None) == b""
    assert request_bytes("ünïcode\r\n") == "ünïcode\r\n".encode()


async def test_request_sent_then_half_closed_and_line_matched() -> None:
    transcript = Transcript()
    async with line_server() as (port, seen):
        result = await run_check_now("simpletcp", rport=port, request="PING\\nSTATUS\\n",
                                     receive="STATUS OK", transcript=transcript)
    assert result.up, result.reason
    assert result.reason == f"line 2 from 127.0.0.1:{port} matches 'STATUS OK': 'STATUS OK'"
    # The server saw the whole request and then end of stream (it only answers after EOF).
    assert seen == [b"PING\nSTATUS\n"]
    assert transcript.lines == [
        f"* TCP connect to 127.0.0.1:{port}",
        "> 12 bytes: PING\\nSTATUS\\n",
        "< hello there",
        "< STATUS OK",
    ]


async def test_regex_matches_one_line_at_a_time() -> None:
    async with line_server() as (port, _):
        up = await run_check_now("simpletcp", rport=port, receive=r"^load \d\.\d$",
                                 regex=True)
        across = await run_check_now("simpletcp", rport=port, receive="there.STATUS",
                                     regex=True)
        last = await run_check_now("simpletcp", rport=port, receive="without end$",
                                   regex=True)
    assert up.up, up.reason
    assert not across.up
    assert across.reason == (f"127.0.0.1:{port} closed the connection without a line matching "
                             "'there.STATUS' (4 lines, 54 bytes)")
    assert last.up, last.reason


async def test_empty_receive_is_up_once_sent() -> None:
    async with line_server() as (port, _):
        result = await run_check_now("simpletcp", rport=port, request="QUIT\\n")
    assert result.up
    assert result.reason == f"connected to 127.0.0.1:{port} and sent 5 bytes (no receive to match)"


async def test_refused_and_no_port_and_udp() -> None:
    with closed_port() as port:
        refused = await run_check_now("simpletcp", rport=port, receive="x")
    assert refused.reason == f"connect to 127.0.0.1:{port} refused"
    no_port = await run_check_now("simpletcp", receive="x")
    assert no_port.reason == ("simpletcp needs a port: set the real server's port or check.port "
                              "(127.0.0.1)")
    udp = await run_check_now("simpletcp", rport=53, protocol="udp", receive="x")
    assert not udp.up
    assert udp.reason.startswith("simpletcp over UDP is not supported")


HOSTILE = [
    # simpletcp half-closes after its request: that is not goodbye, so the servers hold on.
    ("silent", silent(hold=True), "waiting for a line matching 'OK' from {ep} timed out after "
                                  "0.45 s (0 bytes received)"),
    ("trickle", trickle(b"OK\n", hold=True),
     "waiting for a line matching 'OK' from {ep} timed out after 0.45 s (1 bytes received)"),
    ("garbage", garbage(hold=True), "waiting for a line matching 'OK' from {ep} timed out "
                                    f"after 0.45 s ({len(GARBAGE)} bytes received)"),
    ("close-mid-line", script(None, b"O", close=True),
     "{ep} closed the connection without a line matching 'OK' (1 lines, 1 bytes)"),
    ("endless", endless(b"", b"no\n" * 8192), "no line matching 'OK' in the first 64 KiB "
                                              "from {ep}"),
]


@pytest.mark.parametrize(("behaviour", "reason"), [h[1:] for h in HOSTILE],
                         ids=[h[0] for h in HOSTILE])
@pytest.mark.wallclock
async def test_hostile_server(behaviour: object, reason: str) -> None:
    async with hostile_server(behaviour) as port:  # type: ignore[arg-type]
        up, got, elapsed = await timed(rport=port, request="PING\\n", receive="OK")
    assert not up
    assert got == reason.format(ep=f"127.0.0.1:{port}")
    assert elapsed < DEADLINE + SLACK


async def run_many(count: int, batch: int, cut: float | None = None,
                   **spec: object) -> set[bool]:
    verdicts: set[bool] = set()

    async def one() -> None:
        with trio.move_on_after(cut if cut is not None else float("inf")):
            verdicts.add((await run_check_now("simpletcp", **spec)).up)  # type: ignore[arg-type]

    for first in range(0, count, batch):
        async with trio.open_nursery() as nursery:
            for _ in range(min(batch, count - first)):
                nursery.start_soon(one)
    return verdicts


async def test_no_fd_growth() -> None:
    """10,000 checks per server kind, including checks cut from outside mid-exchange."""
    before = open_fds()
    async with line_server() as (port, seen):
        assert await run_many(10_000, 500, rport=port, request="PING\\n",
                              receive="STATUS OK") == {True}
        seen.clear()
    async with hostile_server(silent(hold=True)) as port:
        assert await run_many(5_000, 1_000, rport=port, receive="OK",
                              negotiate_timeout=0.1) == {False}
        await run_many(5_000, 1_000, cut=0.02, rport=port, receive="OK")
    async with hostile_server(script(b"no\n", close=True)) as port:
        assert await run_many(10_000, 500, rport=port, receive="OK") == {False}
    assert open_fds() == before
