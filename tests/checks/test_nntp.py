"""`nntp` against a real leafnode on 127.0.0.1 and against hostile servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hostile import hostile_server, script, silent, trickle
from line_servers import (
    assert_no_fd_growth,
    cli_check,
    down_in_time,
    nntp_server,
    transcript_of,
)
from resources import closed_port

from lbha.testing import installed_checks, run_check_now

#: A skip for want of the real server is a failure in CI (tests/conftest.py).
pytestmark = pytest.mark.real_server


@pytest.fixture(scope="module")
def leafnode() -> Iterator[int]:
    with nntp_server() as port:
        yield port


def test_registered_as_a_negotiate_service() -> None:
    check = installed_checks().get("nntp")
    assert check.negotiate
    assert installed_checks().plugin_of("nntp") == "nntp"


async def test_leafnode_is_up_and_quit_is_sent(leafnode: int) -> None:
    result, lines = await transcript_of("nntp", leafnode)
    assert result.up, result.reason
    assert result.reason == f"NNTP 127.0.0.1:{leafnode}: greeting 200 (posting allowed)"
    assert lines[0] == f"* TCP connect to 127.0.0.1:{leafnode}"
    assert lines[1].startswith("< 200 Leafnode NNTP Daemon")
    assert lines[2:] == ["> QUIT", "< 205 Always happy to serve!"]


@pytest.mark.wallclock
async def test_stopped_server_is_refused() -> None:
    with closed_port() as port:
        reason = await down_in_time("nntp", port)
    assert reason == f"connect to 127.0.0.1:{port} refused"


@pytest.mark.parametrize(("greeting", "expected"), [
    (b"201 news.test ready (no posting)\r\n", "greeting 201 (no posting)"),
    (b"200-first line\r\n200 second line\r\n", "greeting 200 (posting allowed)"),
])
async def test_other_good_greetings(greeting: bytes, expected: str) -> None:
    async with hostile_server(script(greeting)) as port:
        result = await run_check_now("nntp", rport=port, negotiate_timeout=0.5)
    assert result.up, result.reason
    assert result.reason.endswith(expected)


@pytest.mark.parametrize(("handler", "expected"), [
    (script(b"400 service temporarily unavailable\r\n"),
     "NNTP greeting from 127.0.0.1:{port} is 400 'service temporarily unavailable', "
     "not 200 or 201"),
    (script(b"503 Leafnode must have a unique fully-qualified domain name.\r\n"),
     "NNTP greeting from 127.0.0.1:{port} is 503 'Leafnode must have a unique "
     "fully-qualified domain name.', not 200 or 201"),
    (script(b"\x16\x03\x01\x00garbage\xff\r\n"),
     "NNTP server 127.0.0.1:{port} answered '????garbage\ufffd' while waiting for the "
     "greeting, which is not a valid NNTP reply"),
    (script(b"x" * 10000),
     "NNTP server 127.0.0.1:{port} sent a line longer than 4096 bytes while waiting for "
     "the greeting"),
    (script(b"20", close=True),
     "NNTP server 127.0.0.1:{port} closed the connection while waiting for the greeting "
     "after '20'"),
    (script(close=True),
     "NNTP server 127.0.0.1:{port} closed the connection while waiting for the greeting"),
    (silent(), "NNTP 127.0.0.1:{port}: timed out after 0.45 s waiting for the greeting"),
    (trickle(b"200 slow\r\n"),
     "NNTP 127.0.0.1:{port}: timed out after 0.45 s waiting for the greeting (received so "
     "far: '2')"),
], ids=["400", "503", "garbage", "endless-line", "close-mid", "close-at-once", "silent",
        "trickle"])
@pytest.mark.wallclock
async def test_hostile_servers_are_down_in_time(handler, expected: str) -> None:
    async with hostile_server(handler) as port:
        reason = await down_in_time("nntp", port)
    assert reason.startswith(expected.format(port=port)), reason


@pytest.mark.parametrize("kind", ["up", "refused", "silent", "garbage", "close-mid", "503"])
async def test_no_fd_growth(kind: str) -> None:
    # Not against leafnode: it serialises sessions on a lock file and makes about one
    # connection in fifteen wait 5 s for it, so the full 10,000-check dialogue (greeting,
    # QUIT, 205) runs against a scripted server speaking the same protocol.
    handlers = {"up": script(b"200 ready\r\n", None, b"205 bye\r\n", close=True),
                "silent": silent(), "garbage": script(b"\xff\xfe garbage\r\n"),
                "close-mid": script(b"20", close=True), "503": script(b"503 no\r\n")}

    async def run_against(port: int) -> None:
        async def run():
            return await run_check_now("nntp", rport=port,
                                       negotiate_timeout=5 if kind == "up" else 0.05)
        await assert_no_fd_growth(run, up=kind == "up")

    if kind == "refused":
        with closed_port() as port:
            await run_against(port)
    else:
        async with hostile_server(handlers[kind]) as port:
            await run_against(port)


def test_lbha_check_once_verbose_shows_the_exchange(leafnode: int, tmp_path) -> None:
    out = cli_check(tmp_path, "news", "nntp", leafnode, vport=119)
    lines = out.splitlines()
    assert lines[0] == (f"news real (127.0.0.1:{leafnode}) nntp: UP: NNTP "
                        f"127.0.0.1:{leafnode}: greeting 200 (posting allowed)")
    assert lines[2].startswith("    < 200 Leafnode NNTP Daemon")
    assert lines[3:] == ["    > QUIT", "    < 205 Always happy to serve!"]
