"""Feedback from real servers: idle capacity that scales a real server's weight.

Two sources (see ../shared/spec/feedback-agent.md):

* `agent`: the Loadbalancer.org feedback agent / HAProxy agent-check protocol. We connect to
  TCP port 3333 (by default), send nothing, and read one line such as ``75%\\n`` or
  ``up ready 75%\\n``; the agent writes first and closes.
* `http`: a GET whose body is a bare integer, the idle percentage.

Parsing is pure (`parse_agent_reply`, `parse_http_reply`); the fetchers (`read_agent`,
`read_http`) never raise for network trouble but return a `FeedbackReading` with `error` set,
so the engine keeps the last good weight (`apply_reading`). With `seconds` a fetch bounds
itself and a hung agent becomes such an error ("did not answer within 1 s"), which status
shows; without it the caller bounds the fetch. The fetchers close their socket when cancelled.

Percentages are capped at 100. HAProxy accepts more (up to a final weight of 256), but the
agents only ever report idle capacity 0..100 and issue 3 defines the reply as 0..100; letting
a buggy agent raise a server above its configured weight would be a surprise, so a larger
value is applied as 100 and reported.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import re
from dataclasses import dataclass, replace
from typing import Literal

import trio

from lbha.http_exchange import HttpError, HttpTooLong, Tally, read_response
from lbha.model import IPAddress

#: Bytes read from an agent at most; a real reply is a few bytes.
AGENT_REPLY_LIMIT = 512
#: Bytes of HTTP response (status line, headers and body) read at most.
HTTP_REPLY_LIMIT = 4096
#: Longest piece of a reply quoted in a message.
_SHOWN = 60

_WORD_SEPARATORS = re.compile(r"[ \t,]+")
_PERCENT = re.compile(r"(\d+)%?")
_NUMBERISH = re.compile(r"[-+]?\d*(?:\.\d*)?%?")
_REASON = re.compile(r"(?:^|[ \t])#.*")
_LINE_END = re.compile(rb"[\r\n]")

# HAProxy's words, in its two categories; within a category the last word on the line wins.
_HEALTH_WORDS = {"up": "up", "down": "down", "fail": "down", "stopped": "down"}
_ADMIN_WORDS = frozenset({"ready", "drain", "maint"})


@dataclass(frozen=True)
class FeedbackReading:
    """What one feedback reply said.

    `percent` is the idle capacity to apply (0..100), `state` a health verdict from agent words
    (None when the reply has none), `error` why (part of) the reply was unusable. An error does
    not imply that nothing is usable: unknown words are reported while valid ones still apply,
    as HAProxy does.
    """

    percent: int | None = None
    state: Literal["up", "down"] | None = None
    error: str | None = None


def _show(data: bytes) -> str:
    """Quote a piece of a reply for a message: bounded, non-printable bytes escaped."""
    return repr(data[:_SHOWN])[1:] + ("..." if len(data) > _SHOWN else "")


def _to_percent(digits: str) -> int:
    # Python refuses int() on very long digit strings; anything past 3 digits is > 100 anyway.
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= 3 else 1000


def _number_problem(word: str) -> str:
    if "." in word:
        return f"percentage is not an integer: {_show(word.encode())}"
    if word.startswith("-"):
        return f"negative percentage {_show(word.encode())}"
    return f"malformed percentage {_show(word.encode())}"


def parse_agent_reply(data: bytes, *, limit: int = AGENT_REPLY_LIMIT) -> FeedbackReading:
    """Parse an agent's reply: one line of words separated by spaces, tabs or commas.

    Words (case-insensitive): ``NN%`` or bare ``NN`` (Loadbalancer.org variants print a bare
    number; HAProxy would reject it, we accept it) set the percent; ``up``/``ready`` give state
    "up"; ``down``, ``fail``, ``stopped`` and ``maint`` give state "down" (``ready`` does not
    cancel ``down``, and ``up`` does not cancel ``maint``, as in HAProxy); ``drain`` sets the
    percent to 0, HAProxy's drain being weight 0 for new connections. A drain is lifted by the
    next reply carrying a percentage (the Loadbalancer.org agent sends ``up ready NN%``). Text
    after `` #`` is the agent's free-form reason and is ignored. Only the first line counts
    and it must end in CR or LF: HAProxy ignores an incomplete line, and so do we.
    """
    head = data[:limit]
    end = _LINE_END.search(head)
    if end is None:
        if not head:
            return FeedbackReading(error="empty reply")
        if len(head) >= limit:
            return FeedbackReading(error=f"reply longer than {limit} bytes without a line end")
        return FeedbackReading(error=f"incomplete line {_show(head)} (no line end)")
    try:
        line = head[: end.start()].decode("ascii")
    except UnicodeDecodeError:
        return FeedbackReading(error=f"non-ASCII reply {_show(head[: end.start()])}")
    # HAProxy takes what follows " #" as a reason, not as words ("stopped#x" is one word).
    words = [w for w in _WORD_SEPARATORS.split(_REASON.sub("", line, count=1).lower()) if w]
    if not words:
        return FeedbackReading(error="empty reply")

    percent: int | None = None
    health: str | None = None
    admin: str | None = None
    problems: list[str] = []
    for word in words:
        if word in _HEALTH_WORDS:
            health = _HEALTH_WORDS[word]
        elif word in _ADMIN_WORDS:
            admin = word
        elif (number := _PERCENT.fullmatch(word)) is not None:
            percent = _to_percent(number.group(1))
            if percent > 100:
                problems.append(f"{_show(word.encode())} capped at 100%")
                percent = 100
        elif word == "error":
            problems.append("agent reports an error")
        elif _NUMBERISH.fullmatch(word) and any(c.isdigit() for c in word):
            problems.append(_number_problem(word))
        else:
            problems.append(f"unknown word {_show(word.encode())}")

    if admin == "drain":
        percent = 0
    state: Literal["up", "down"] | None = None
    if health == "down" or admin == "maint":
        state = "down"
    elif health == "up" or admin == "ready":
        state = "up"

    if percent is None and health is None and admin is None:
        shown = _show(line.strip().encode())
        return FeedbackReading(error=f"garbage reply {shown} ({'; '.join(problems)})")
    return FeedbackReading(percent=percent, state=state, error="; ".join(problems) or None)


def parse_http_reply(status: int, body: bytes) -> FeedbackReading:
    """Parse an HTTP feedback response: a 2xx whose body is ``NN`` or ``NN%``, whitespace allowed.

    Deliberately strict: taking "the first integer anywhere" would turn an error page
    ("Error 5 ...") into a weight.
    """
    if not 200 <= status <= 299:
        return FeedbackReading(error=f"HTTP status {status}")
    try:
        text = body.decode("ascii").strip()
    except UnicodeDecodeError:
        return FeedbackReading(error=f"non-ASCII body {_show(body)}")
    if not text:
        return FeedbackReading(error="empty body")
    number = _PERCENT.fullmatch(text)
    if number is None:
        return FeedbackReading(error=f"garbage body {_show(text.encode())}")
    percent = _to_percent(number.group(1))
    if percent > 100:
        return FeedbackReading(percent=100, error=f"{_show(text.encode())} capped at 100%")
    return FeedbackReading(percent=percent)


def apply_reading(last_percent: int | None, reading: FeedbackReading) -> tuple[int | None, str]:
    """The percent to use now and why: a reading without a percent keeps the last good one.

    `last_percent` None means no feedback applied yet, i.e. the full configured weight.
    """
    if reading.percent is not None:
        now = f"weight at {reading.percent}%"
        if reading.error is None:
            return reading.percent, f"feedback reports {reading.percent}% idle; {now}"
        return reading.percent, f"{reading.error}; {now}"
    keeping = "keeping full weight"
    if last_percent is not None:
        keeping = f"keeping weight at {last_percent}%"
    cause = reading.error if reading.error is not None else "feedback reply has no percentage"
    return last_percent, f"{cause}; {keeping}"


def _host(address: IPAddress) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


def _connect_error(exc: OSError) -> str:
    if exc.errno == errno.ECONNREFUSED:
        return "connection refused"
    return f"connection failed: {exc.strerror or exc}"


async def _connect(address: IPAddress, port: int) -> trio.SocketStream:
    family = trio.socket.AF_INET6 if address.version == 6 else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        await sock.connect((str(address), port))
    except BaseException:
        # Also on cancellation: the caller's deadline must not leak a half-open socket.
        sock.close()
        raise
    return trio.SocketStream(sock)


def _no_answer(where: str, seconds: float, connected: bool, data: bytes) -> FeedbackReading:
    """The error of a fetch that ran out of time, saying how far it got."""
    if not connected:
        return FeedbackReading(error=f"{where}: no connection within {seconds:g} s")
    if not data:
        return FeedbackReading(error=f"{where}: did not answer within {seconds:g} s")
    return FeedbackReading(error=f"{where}: no complete reply within {seconds:g} s "
                                 f"(received so far: {_show(data)})")


async def read_agent(
    address: IPAddress | str, port: int, *, limit: int = AGENT_REPLY_LIMIT,
    seconds: float = math.inf,
) -> FeedbackReading:
    """Connect to a feedback agent, read its one-line reply and parse it.

    Sends nothing. Reads until a line end, EOF or `limit` bytes, for at most `seconds`.
    Network errors and a hung agent come back as the reading's `error`, prefixed with
    "feedback agent at ADDRESS:PORT".
    """
    address = ipaddress.ip_address(address)
    where = f"feedback agent at {_host(address)}:{port}"
    data = b""
    stream: trio.SocketStream | None = None
    with trio.move_on_after(seconds):
        try:
            stream = await _connect(address, port)
        except OSError as exc:
            return FeedbackReading(error=f"{where}: {_connect_error(exc)}")
        async with stream:
            try:
                while len(data) < limit and _LINE_END.search(data) is None:
                    chunk = await stream.receive_some(limit - len(data))
                    if not chunk:
                        break
                    data += chunk
            except trio.BrokenResourceError as exc:
                if _LINE_END.search(data) is None:
                    return FeedbackReading(
                        error=f"{where}: connection broken: {exc.__cause__ or exc}")
        reading = parse_agent_reply(data, limit=limit)
        return reading if reading.error is None \
            else replace(reading, error=f"{where}: {reading.error}")
    return _no_answer(where, seconds, stream is not None, data)


async def read_http(
    address: IPAddress | str,
    port: int,
    path: str,
    *,
    virtualhost: str | None = None,
    limit: int = HTTP_REPLY_LIMIT,
    seconds: float = math.inf,
) -> FeedbackReading:
    """GET `path` over HTTP/1.0 and parse the body as an idle percentage.

    HTTP/1.0 so that the server neither chunks the body nor keeps the connection open (the
    shared reader, lbha.http_exchange, copes with both). No redirects are followed (a 3xx is
    an error). A status line and headers, or a body, over `limit` bytes is an error. Network
    errors and a server silent for `seconds` come back as the reading's `error`, prefixed
    with "http feedback at URL".
    """
    address = ipaddress.ip_address(address)
    host = virtualhost or (_host(address) if port == 80 else f"{_host(address)}:{port}")
    where = f"http feedback at http://{_host(address)}:{port}{path}"
    # A path with whitespace or controls would let the config inject header lines.
    if not path.startswith("/") or not path.isascii() or any(c <= " " or c == "\x7f" for c in path):
        return FeedbackReading(error=f"{where}: invalid path {path!r}")
    request = (
        f"GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lbha-feedback\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii", "backslashreplace")
    progress = Tally()
    stream: trio.SocketStream | None = None
    with trio.move_on_after(seconds):
        try:
            stream = await _connect(address, port)
        except OSError as exc:
            return FeedbackReading(error=f"{where}: {_connect_error(exc)}")
        async with stream:
            try:
                await stream.send_all(request)
                response = await read_response(stream, where, "GET", progress,
                                                head_limit=limit, body_limit=limit)
            except HttpTooLong:
                return FeedbackReading(error=f"{where}: response longer than {limit} bytes")
            except HttpError as exc:
                return FeedbackReading(error=f"{where}: {exc.detail}")
            except trio.BrokenResourceError as exc:
                return FeedbackReading(
                    error=f"{where}: connection broken: {exc.__cause__ or exc}")
        reading = parse_http_reply(response.status, response.body)
        return reading if reading.error is None \
            else replace(reading, error=f"{where}: {reading.error}")
    if progress.received:
        return FeedbackReading(error=f"{where}: no complete reply within {seconds:g} s "
                                     f"({progress.received} bytes received)")
    return _no_answer(where, seconds, stream is not None, b"")
