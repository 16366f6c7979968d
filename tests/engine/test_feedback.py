"""Feedback agents: reply parsers, apply_reading, and fetchers against real loopback servers."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from lbha.feedback import (
    AGENT_REPLY_LIMIT,
    FeedbackReading,
    apply_reading,
    parse_agent_reply,
    parse_http_reply,
    read_agent,
    read_http,
)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


HOSTS = [
    "127.0.0.1",
    pytest.param(
        "::1", marks=pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
    ),
]


# --- agent parser -----------------------------------------------------------------------------

# (reply, percent, state, error substring or None)
AGENT_CASES = [
    (b"75%\n", 75, None, None),
    (b"75\n", 75, None, None),  # bare number: Loadbalancer.org variants; HAProxy rejects it
    (b"0%\n", 0, None, None),
    (b"100%\r\n", 100, None, None),
    (b"up ready 75%\n", 75, "up", None),
    (b"up\n", None, "up", None),
    (b"ready\n", None, "up", None),
    (b"drain\n", 0, None, None),
    (b"drain 60%\n", 0, None, None),  # drain wins over a percentage on the same line
    (b"ready drain\n", 0, None, None),  # admin words: the last one wins, as in HAProxy
    (b"drain ready 40%\n", 40, "up", None),
    (b"down\n", None, "down", None),
    (b"fail\n", None, "down", None),
    (b"stopped #planned work\n", None, "down", None),
    (b"maint\n", None, "down", None),
    (b"maint up\n", None, "down", None),  # `up` does not leave maint
    (b"down ready 50%\n", 50, "down", None),  # `ready` does not cancel down
    (b"up down\n", None, "down", None),
    (b"down up\n", None, "up", None),
    (b"  80%  \r\n", 80, None, None),
    (b"80%\rtrailing junk", 80, None, None),  # CR alone ends the line
    (b"60%\nsecond line ignored\n", 60, None, None),
    (b"up, 20%\n", 20, "up", None),
    (b"up,20%\tready\n", 20, "up", None),
    (b"UP 20%\n", 20, "up", None),
    (b"Up ReAdY 007%\n", 7, "up", None),
    (b"150%\n", 100, None, "'150%' capped at 100%"),
    (b"9999999999999999999999%\n", 100, None, "capped at 100%"),
    (b"up foo 30%\n", 30, "up", "unknown word 'foo'"),  # valid words still apply
    (b"maxconn:10 25%\n", 25, None, "unknown word 'maxconn:10'"),
    (b"75.5%\n", None, None, "garbage reply '75.5%' (percentage is not an integer: '75.5%')"),
    (b"75.5\n", None, None, "not an integer"),
    (b"-3%\n", None, None, "garbage reply '-3%' (negative percentage '-3%')"),
    (b"+3%\n", None, None, "malformed percentage '+3%'"),
    (b"abc\n", None, None, "garbage reply 'abc' (unknown word 'abc')"),
    (b"%\n", None, None, "unknown word '%'"),
    (b"75%%\n", None, None, "unknown word '75%%'"),
    (b"stopped#x\n", None, None, "unknown word 'stopped#x'"),
    (b"error\n", None, None, "garbage reply 'error' (agent reports an error)"),
    (b"75%", None, None, "incomplete line '75%' (no line end)"),
    (b"", None, None, "empty reply"),
    (b"\n", None, None, "empty reply"),
    (b" \t, \r\n", None, None, "empty reply"),
    (b"\xff\xfe\n", None, None, "non-ASCII reply '\\xff\\xfe'"),
    (b"50% caf\xc3\xa9\n", None, None, "non-ASCII reply"),
    (b"7" * 600 + b"%\n", None, None, f"reply longer than {AGENT_REPLY_LIMIT} bytes"),
    (b"x" * 600, None, None, f"reply longer than {AGENT_REPLY_LIMIT} bytes"),
]


@pytest.mark.parametrize(("reply", "percent", "state", "error"), AGENT_CASES)
def test_parse_agent_reply(reply, percent, state, error):
    reading = parse_agent_reply(reply)
    assert (reading.percent, reading.state) == (percent, state)
    if error is None:
        assert reading.error is None
    else:
        assert reading.error is not None
        assert error in reading.error


def test_parse_agent_reply_quotes_long_garbage_briefly():
    reading = parse_agent_reply(b"z" * 300 + b"\n")
    assert reading.error is not None
    assert len(reading.error) < 200
    assert "..." in reading.error


def test_parse_agent_reply_limit_is_a_parameter():
    too_short = parse_agent_reply(b"60%\n", limit=3)
    assert too_short.error == "reply longer than 3 bytes without a line end"
    assert parse_agent_reply(b"60%\n", limit=4).percent == 60


# --- http parser ------------------------------------------------------------------------------

HTTP_CASES = [
    (200, b"42", 42, None),
    (200, b"42%\n", 42, None),
    (200, b"  7 \r\n", 7, None),
    (204, b"0", 0, None),
    (200, b"100", 100, None),
    (200, b"150", 100, "'150' capped at 100%"),
    (503, b"42", None, "HTTP status 503"),
    (301, b"", None, "HTTP status 301"),  # redirects are not followed
    (200, b"", None, "empty body"),
    (200, b"abc", None, "garbage body 'abc'"),
    (200, b"Error 5 occurred", None, "garbage body"),  # strict: no "first integer anywhere"
    (200, b"-4", None, "garbage body '-4'"),
    (200, b"42.5", None, "garbage body '42.5'"),
    (200, b"\xff", None, "non-ASCII body '\\xff'"),
]


@pytest.mark.parametrize(("status", "body", "percent", "error"), HTTP_CASES)
def test_parse_http_reply(status, body, percent, error):
    reading = parse_http_reply(status, body)
    assert reading.percent == percent
    assert reading.state is None
    if error is None:
        assert reading.error is None
    else:
        assert reading.error is not None
        assert error in reading.error


# --- fuzzing ----------------------------------------------------------------------------------

_AGENT_WORDS = st.sampled_from(
    ["up", "down", "ready", "drain", "maint", "fail", "stopped", "error", "75%", "75", "-3%",
     "1.5%", "150%", "#why", "x", "", "%", "0"]
)
_SEPARATORS = st.sampled_from([" ", "\t", ",", ", ", " #"])


@st.composite
def _agent_lines(draw: st.DrawFn) -> bytes:
    words = draw(st.lists(_AGENT_WORDS, max_size=6))
    line = "".join(w + draw(_SEPARATORS) for w in words)
    return (line + draw(st.sampled_from(["\n", "\r\n", "\r", ""]))).encode()


def _check_reading(reading: FeedbackReading) -> None:
    assert reading.percent is None or 0 <= reading.percent <= 100
    assert reading.state in (None, "up", "down")
    assert reading.error is None or isinstance(reading.error, str)
    # Every reading either carries something usable or says why not.
    assert reading.percent is not None or reading.state is not None or reading.error


@given(st.binary(max_size=2 * AGENT_REPLY_LIMIT) | _agent_lines())
def test_fuzz_parse_agent_reply_never_raises(data):
    _check_reading(parse_agent_reply(data))


@given(st.integers(min_value=-(2**70), max_value=2**70), st.binary(max_size=6000))
def test_fuzz_parse_http_reply_never_raises(status, body):
    _check_reading(parse_http_reply(status, body))


@given(st.integers(min_value=0, max_value=100) | st.none(), st.builds(
    FeedbackReading,
    percent=st.integers(min_value=0, max_value=100) | st.none(),
    state=st.sampled_from([None, "up", "down"]),
    error=st.text(max_size=20) | st.none(),
))
def test_fuzz_apply_reading(last, reading):
    percent, reason = apply_reading(last, reading)
    assert percent == (reading.percent if reading.percent is not None else last)
    assert reason


# --- apply_reading ----------------------------------------------------------------------------


def test_apply_reading_takes_a_new_percentage():
    assert apply_reading(75, FeedbackReading(percent=60)) == (
        60, "feedback reports 60% idle; weight at 60%"
    )


def test_apply_reading_keeps_last_good_value_on_garbage():
    reading = FeedbackReading(error="feedback agent at 198.18.0.21:3333: garbage reply 'abc'")
    assert apply_reading(75, reading) == (
        75, "feedback agent at 198.18.0.21:3333: garbage reply 'abc'; keeping weight at 75%"
    )


def test_apply_reading_without_history_keeps_full_weight():
    reading = FeedbackReading(error="feedback agent at 198.18.0.21:3333: connection refused")
    assert apply_reading(None, reading) == (
        None, "feedback agent at 198.18.0.21:3333: connection refused; keeping full weight"
    )


def test_apply_reading_applies_valid_words_and_reports_the_rest():
    reading = parse_agent_reply(b"up foo 30%\n")
    assert apply_reading(75, reading) == (30, "unknown word 'foo'; weight at 30%")


def test_apply_reading_state_only_reply_keeps_weight():
    assert apply_reading(40, parse_agent_reply(b"down\n")) == (
        40, "feedback reply has no percentage; keeping weight at 40%"
    )


def test_apply_reading_drain_is_zero():
    assert apply_reading(75, parse_agent_reply(b"drain\n"))[0] == 0


# --- real servers -----------------------------------------------------------------------------

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def _serve(nursery: trio.Nursery, host: str, handler: Handler) -> int:
    """Start a one-handler-per-connection TCP server on `host`, return its port."""
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=host))
    return listeners[0].socket.getsockname()[1]


async def _closed_port(host: str) -> int:
    """A port on `host` that nothing listens on (bound, then closed)."""
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    with trio.socket.socket(family, trio.socket.SOCK_STREAM) as sock:
        await sock.bind((host, 0))
        return sock.getsockname()[1]


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@pytest.mark.parametrize("host", HOSTS)
async def test_read_agent_reads_one_line(host, nursery):
    received = []
    done = trio.Event()

    async def agent(stream: trio.SocketStream) -> None:
        await stream.send_all(b"60%\n")
        received.append(await stream.receive_some(100))  # the reader sends nothing: EOF
        await stream.aclose()
        done.set()

    port = await _serve(nursery, host, agent)
    assert await read_agent(host, port) == FeedbackReading(percent=60)
    with trio.fail_after(2):
        await done.wait()
    assert received == [b""]


@pytest.mark.parametrize("host", HOSTS)
async def test_read_agent_refused(host):
    port = await _closed_port(host)
    reading = await read_agent(host, port)
    assert reading == FeedbackReading(
        error=f"feedback agent at {_bracket(host)}:{port}: connection refused"
    )


async def test_read_agent_closes_socket_when_caller_times_out(nursery):
    saw_eof = trio.Event()

    async def silent_agent(stream: trio.SocketStream) -> None:
        # Never writes; the reader's deadline must close its end, which we see as EOF.
        if await stream.receive_some(100) == b"":
            saw_eof.set()

    port = await _serve(nursery, "127.0.0.1", silent_agent)
    # Holding the traceback keeps the reader's frames alive, so the socket cannot be closed
    # by garbage collection: only the reader's own cleanup can produce the EOF.
    with pytest.raises(trio.TooSlowError) as cancelled, trio.fail_after(0.2):
        await read_agent("127.0.0.1", port)
    with trio.fail_after(2):
        await saw_eof.wait()
    assert cancelled.traceback


async def test_read_agent_trickle(nursery):
    async def trickling_agent(stream: trio.SocketStream) -> None:
        for piece in (b"u", b"p r", b"eady 4", b"2", b"%", b"\n"):
            await stream.send_all(piece)
            await trio.sleep(0.02)
        await stream.aclose()

    port = await _serve(nursery, "127.0.0.1", trickling_agent)
    assert await read_agent("127.0.0.1", port) == FeedbackReading(percent=42, state="up")


async def test_read_agent_stops_at_line_end_without_waiting_for_close(nursery):
    async def lingering_agent(stream: trio.SocketStream) -> None:
        await stream.send_all(b"up 33%\n")
        await trio.sleep_forever()

    port = await _serve(nursery, "127.0.0.1", lingering_agent)
    with trio.fail_after(2):
        assert await read_agent("127.0.0.1", port) == FeedbackReading(percent=33, state="up")


async def test_read_agent_incomplete_line_then_close(nursery):
    async def agent(stream: trio.SocketStream) -> None:
        await stream.send_all(b"75%")
        await stream.aclose()

    port = await _serve(nursery, "127.0.0.1", agent)
    assert await read_agent("127.0.0.1", port) == FeedbackReading(
        error=f"feedback agent at 127.0.0.1:{port}: incomplete line '75%' (no line end)"
    )


async def test_read_agent_closes_without_data(nursery):
    async def agent(stream: trio.SocketStream) -> None:
        await stream.aclose()

    port = await _serve(nursery, "127.0.0.1", agent)
    assert await read_agent("127.0.0.1", port) == FeedbackReading(
        error=f"feedback agent at 127.0.0.1:{port}: empty reply"
    )


async def test_read_agent_endless_line_is_bounded(nursery):
    async def flooding_agent(stream: trio.SocketStream) -> None:
        try:
            while True:
                await stream.send_all(b"9" * 1024)
        except trio.BrokenResourceError:
            pass

    port = await _serve(nursery, "127.0.0.1", flooding_agent)
    with trio.fail_after(2):
        reading = await read_agent("127.0.0.1", port, limit=100)
    assert reading == FeedbackReading(
        error=f"feedback agent at 127.0.0.1:{port}: reply longer than 100 bytes without a "
              "line end"
    )


async def _hung(stream: trio.SocketStream) -> None:
    """Accepts, then never says a word."""
    await trio.sleep_forever()


async def test_a_hung_agent_is_a_reading_that_says_so(nursery, autojump_clock):
    port = await _serve(nursery, "127.0.0.1", _hung)
    start = trio.current_time()
    reading = await read_agent("127.0.0.1", port, seconds=1)
    assert trio.current_time() - start == pytest.approx(1)
    assert reading == FeedbackReading(
        error=f"feedback agent at 127.0.0.1:{port}: did not answer within 1 s"
    )
    assert apply_reading(40, reading)[1] == (
        f"feedback agent at 127.0.0.1:{port}: did not answer within 1 s; keeping weight at 40%"
    )


async def test_an_agent_stuck_mid_line_is_a_reading_that_says_so(nursery, autojump_clock):
    async def stuck_agent(stream: trio.SocketStream) -> None:
        await stream.send_all(b"7")
        await trio.sleep_forever()

    port = await _serve(nursery, "127.0.0.1", stuck_agent)
    reading = await read_agent("127.0.0.1", port, seconds=0.5)
    assert reading == FeedbackReading(
        error=f"feedback agent at 127.0.0.1:{port}: no complete reply within 0.5 s "
              "(received so far: '7')"
    )


async def test_a_hung_http_feedback_server_is_a_reading_that_says_so(nursery, autojump_clock):
    port = await _serve(nursery, "127.0.0.1", _hung)
    reading = await read_http("127.0.0.1", port, "/load", seconds=2)
    assert reading == FeedbackReading(
        error=f"http feedback at http://127.0.0.1:{port}/load: did not answer within 2 s"
    )


def _http_server(response: bytes, requests: list[bytes], *, then_hang: bool = False) -> Handler:
    async def handler(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = await stream.receive_some(1024)
            if not chunk:
                return
            request += chunk
        requests.append(request)
        await stream.send_all(response)
        if then_hang:
            await trio.sleep_forever()
        await stream.aclose()

    return handler


@pytest.mark.parametrize("host", HOSTS)
async def test_read_http_200(host, nursery):
    requests: list[bytes] = []
    response = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n37"
    port = await _serve(nursery, host, _http_server(response, requests))
    assert await read_http(host, port, "/feedback?x=1") == FeedbackReading(percent=37)
    assert requests == [
        f"GET /feedback?x=1 HTTP/1.0\r\nHost: {_bracket(host)}:{port}\r\n"
        "User-Agent: lbha-feedback\r\nAccept: */*\r\nConnection: close\r\n\r\n".encode()
    ]


async def test_read_http_virtualhost_and_content_length_on_keepalive(nursery):
    requests: list[bytes] = []
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n55%IGNORED"
    port = await _serve(nursery, "127.0.0.1", _http_server(response, requests, then_hang=True))
    with trio.fail_after(2):  # Content-Length satisfied: no need to wait for the close
        reading = await read_http("127.0.0.1", port, "/", virtualhost="app.example")
    assert reading == FeedbackReading(percent=55)
    assert b"\r\nHost: app.example\r\n" in requests[0]


async def test_read_http_500(nursery):
    port = await _serve(
        nursery, "127.0.0.1", _http_server(b"HTTP/1.1 500 Oops\r\n\r\n42", [])
    )
    assert await read_http("127.0.0.1", port, "/load") == FeedbackReading(
        error=f"http feedback at http://127.0.0.1:{port}/load: HTTP status 500"
    )


async def test_read_http_redirect_is_not_followed(nursery):
    response = b"HTTP/1.0 302 Found\r\nLocation: http://127.0.0.1:1/\r\n\r\n"
    port = await _serve(nursery, "127.0.0.1", _http_server(response, []))
    reading = await read_http("127.0.0.1", port, "/")
    assert reading.error is not None
    assert reading.error.endswith("HTTP status 302")


async def test_read_http_endless_body_is_bounded(nursery):
    async def flooding_server(stream: trio.SocketStream) -> None:
        await stream.receive_some(1024)
        try:
            await stream.send_all(b"HTTP/1.0 200 OK\r\n\r\n")
            while True:
                await stream.send_all(b"1" * 1024)
        except trio.BrokenResourceError:
            pass

    port = await _serve(nursery, "127.0.0.1", flooding_server)
    with trio.fail_after(2):
        reading = await read_http("127.0.0.1", port, "/")
    assert reading == FeedbackReading(
        error=f"http feedback at http://127.0.0.1:{port}/: response longer than 4096 bytes"
    )


async def test_read_http_not_http(nursery):
    # The HTTP checks' wording: one reader (lbha.http_exchange) serves both.
    port = await _serve(nursery, "127.0.0.1", _http_server(b"60%\n\n", []))
    reading = await read_http("127.0.0.1", port, "/")
    assert reading.error == (
        f"http feedback at http://127.0.0.1:{port}/: did not answer HTTP: '60%\\n\\n'"
    )


async def test_read_http_interim_and_chunked_on_keepalive(nursery):
    response = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n1\r\n4\r\n2;x=1\r\n2%\r\n0\r\n\r\n")
    port = await _serve(nursery, "127.0.0.1", _http_server(response, [], then_hang=True))
    with trio.fail_after(2):  # the last chunk ends the body: no need to wait for the close
        assert await read_http("127.0.0.1", port, "/") == FeedbackReading(percent=42)


async def test_read_http_body_cut_short_is_no_weight(nursery):
    # "5" of "55%": applying it would drop the server to a tenth of its weight.
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n5"
    port = await _serve(nursery, "127.0.0.1", _http_server(response, []))
    reading = await read_http("127.0.0.1", port, "/")
    assert reading == FeedbackReading(
        error=f"http feedback at http://127.0.0.1:{port}/: closed the connection after 1 of "
              f"3 body bytes ({len(response)} bytes received)")


@pytest.mark.parametrize(("response", "error"), [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     "sent a malformed chunked body (chunk size 'zz')"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n42\r\n",
     "sent a malformed chunked body (chunk longer than its size)"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n42",
     "sent an invalid Content-Length '2, 3'"),
    (b"HTTP/1.1 2000 OK\r\n\r\n42", "sent a malformed HTTP status line: 'HTTP/1.1 2000 OK'"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-Flood: y\r\n" * 1000 + b"\r\n42",
     "response longer than 4096 bytes"),
], ids=["chunk-size", "chunk-too-long", "content-length", "status-line", "header-flood"])
async def test_read_http_malformed_responses(nursery, response, error):
    port = await _serve(nursery, "127.0.0.1", _http_server(response, [], then_hang=True))
    with trio.fail_after(2):
        reading = await read_http("127.0.0.1", port, "/")
    assert reading == FeedbackReading(error=f"http feedback at http://127.0.0.1:{port}/: {error}")


async def test_a_trickling_http_feedback_server_fails_at_the_deadline(nursery, autojump_clock):
    async def trickle(stream: trio.SocketStream) -> None:
        await stream.receive_some(1024)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n42":
            await stream.send_all(bytes([byte]))
            await trio.sleep(1)

    port = await _serve(nursery, "127.0.0.1", trickle)
    start = trio.current_time()
    reading = await read_http("127.0.0.1", port, "/", seconds=5)
    assert trio.current_time() - start == pytest.approx(5)
    assert reading == FeedbackReading(
        error=f"http feedback at http://127.0.0.1:{port}/: no complete reply within 5 s "
              "(5 bytes received)")


async def test_read_http_closed_without_response(nursery):
    async def rude_server(stream: trio.SocketStream) -> None:
        await stream.aclose()

    port = await _serve(nursery, "127.0.0.1", rude_server)
    reading = await read_http("127.0.0.1", port, "/")
    assert reading.error is not None
    assert reading.error.startswith(f"http feedback at http://127.0.0.1:{port}/: ")


@pytest.mark.parametrize("host", HOSTS)
async def test_read_http_refused(host):
    port = await _closed_port(host)
    assert await read_http(host, port, "/") == FeedbackReading(
        error=f"http feedback at http://{_bracket(host)}:{port}/: connection refused"
    )


async def test_read_http_rejects_header_injection_in_path():
    reading = await read_http("127.0.0.1", 9, "/x HTTP/1.0\r\nX-Evil: 1")
    assert reading.error is not None
    assert "invalid path" in reading.error


async def test_read_http_closes_socket_when_caller_times_out(nursery):
    saw_eof = trio.Event()

    async def silent_server(stream: trio.SocketStream) -> None:
        await stream.receive_some(1024)  # the request
        while await stream.receive_some(1024):
            pass
        saw_eof.set()

    port = await _serve(nursery, "127.0.0.1", silent_server)
    # Holding the traceback keeps the reader's frames alive, so the socket cannot be closed
    # by garbage collection: only the reader's own cleanup can produce the EOF.
    with pytest.raises(trio.TooSlowError) as cancelled, trio.fail_after(0.2):
        await read_http("127.0.0.1", port, "/")
    with trio.fail_after(2):
        await saw_eof.wait()
    assert cancelled.traceback
