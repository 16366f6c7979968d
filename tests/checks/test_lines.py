"""The line-protocol session shared by ftp, smtp, imap, pop and nntp: when it says goodbye.

A server that answers garbage has been judged not to speak the protocol: the verdict comes
at once, without a QUIT and without waiting for an answer to one. A server that does speak
it (and refuses) still gets its QUIT. Time is trio's MockClock: it jumps ahead only when
the check sits idle, so the time a verdict took is exactly the time the check waited.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hostile import GARBAGE, hostile_server, script

from lbha.checkapi import Transcript
from lbha.checkkit.lines import CLOSE_SHARE
from lbha.testing import run_check_now

#: The deadline the checks run with; the goodbye would get CLOSE_SHARE of it (0.6 s).
DEADLINE = 3.0
#: Real seconds of idleness before the mock clock jumps to the next timeout.
_IDLE = 0.05


@pytest.fixture
def idle_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=_IDLE)


GARBAGE_LINE = GARBAGE + b"\r\n"
CREDENTIALS = {"login": "bob", "password": "pw"}

HOSTILE = [
    ("ftp", script(GARBAGE_LINE), {}),
    ("smtp", script(GARBAGE_LINE), {}),
    ("smtp", script(b"220 hi\r\n", None, GARBAGE_LINE), {}),
    ("imap", script(GARBAGE_LINE), {}),
    ("imap", script(b"* OK hi\r\n", None, GARBAGE_LINE), CREDENTIALS),
    ("pop", script(GARBAGE_LINE), {}),
    ("pop", script(b"+OK hi\r\n", None, GARBAGE_LINE), CREDENTIALS),
    ("nntp", script(GARBAGE_LINE), {}),
    ("nntp", script(b"x" * 10_000), {}),
    ("ftp", script(b"220-hi\r\n" * 200), {}),
]


@pytest.mark.parametrize(("service", "behaviour", "spec"), HOSTILE, ids=[
    "ftp-greeting", "smtp-greeting", "smtp-ehlo", "imap-greeting", "imap-login",
    "pop-greeting", "pop-user", "nntp-greeting", "nntp-endless-line", "ftp-endless-reply"])
async def test_garbage_gets_no_quit_and_no_wait(idle_clock, service, behaviour, spec) -> None:
    transcript = Transcript()
    async with hostile_server(behaviour) as port:
        start = trio.current_time()
        result = await run_check_now(service, rport=port, negotiate_timeout=DEADLINE,
                                     transcript=transcript, **spec)
        elapsed = trio.current_time() - start
    assert not result.up
    # The old code waited CLOSE_SHARE of the deadline for an answer to QUIT.
    assert elapsed < DEADLINE * CLOSE_SHARE / 10, (elapsed, result.reason)
    sent = [line for line in transcript.lines if line.startswith(">")]
    assert not any(word in line for line in sent for word in ("QUIT", "LOGOUT")), sent


@pytest.mark.parametrize(("service", "behaviour", "goodbye"), [
    ("ftp", script(b"421 too many users\r\n"), "> QUIT"),
    ("smtp", script(b"554 go away\r\n"), "> QUIT"),
    ("imap", script(b"* BYE busy\r\n"), "> a1 LOGOUT"),
    ("pop", script(b"-ERR busy\r\n"), "> QUIT"),
    ("nntp", script(b"400 later\r\n"), "> QUIT"),
], ids=["ftp", "smtp", "imap", "pop", "nntp"])
async def test_a_server_that_speaks_the_protocol_still_gets_its_goodbye(
    idle_clock, service, behaviour, goodbye,
) -> None:
    transcript = Transcript()
    async with hostile_server(behaviour) as port:
        start = trio.current_time()
        result = await run_check_now(service, rport=port, negotiate_timeout=DEADLINE,
                                     transcript=transcript)
        elapsed = trio.current_time() - start
    assert not result.up
    assert goodbye in transcript.lines
    # These servers never answer the goodbye: the wait for it is the bounded one.
    assert elapsed == pytest.approx(DEADLINE * CLOSE_SHARE, abs=0.01)
