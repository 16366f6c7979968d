"""One HTTP/1.1 response reader, on h11, for every HTTP client in lbha: the `http`, `https`
and `http_proxy` checks and the HTTP feedback agent.

h11 parses (status line, headers, interim 1xx responses, Content-Length, chunked and
close-delimited bodies, no body after HEAD, 204 and 304); this module adds what a health
check needs around it: caps on the head and on the body, the step a timeout names, and
reasons an operator can act on. The caller owns the stream, the request bytes it sends and
the deadline: a server that trickles is stopped by the caller's deadline, not here.

It belongs in the public check kit (lbha/checkkit/) once that exists.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Protocol

import h11
import trio

#: Bytes asked for per receive.
RECEIVE_SIZE = 65536
#: Longest piece of server text quoted in a reason.
_SHOWN = 60
#: h11 quotes the offending bytes as `bytearray(b'...')`; a reason shows just '...'.
_H11_BYTES = re.compile(r"bytearray\(b(['\"].*?['\"])\)|\bb(['\"].*?['\"])")


class HttpError(Exception):
    """The server's answer is no usable HTTP response.

    `reason` names the endpoint (a check's verdict); `detail` is the same without it, for a
    caller that names the server its own way (the feedback agent).
    """

    def __init__(self, endpoint: str, detail: str, reason: str | None = None) -> None:
        self.detail = detail
        self.reason = reason if reason is not None else f"{endpoint} {detail}"
        super().__init__(self.reason)


class HttpTooLong(HttpError):
    """The head or the body is over its cap."""


class Progress(Protocol):
    """Where a read is, so that a timeout can name the step (the checks' Progress is one)."""

    step: str
    received: int


@dataclass(slots=True)
class Tally:
    """A Progress for a caller that keeps none of its own."""

    step: str = ""
    received: int = 0


@dataclass(slots=True)
class Response:
    """A final (non-1xx) response; `framing` is how the body was delimited, for transcripts."""

    status: int
    phrase: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    framing: str

    @property
    def status_line(self) -> str:
        return f"HTTP/{self.version} {self.status_text}"

    @property
    def status_text(self) -> str:
        """`200 OK`, or `200` when the server sent no reason phrase."""
        return f"{self.status} {self.phrase}" if self.phrase else str(self.status)

    def header(self, name: str) -> str | None:
        """The first value of header `name` (lower case), None when absent."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def show(data: bytes | bytearray) -> str:
    """Server bytes quoted for a reason: bounded, non-printable bytes escaped."""
    return repr(bytes(data[:_SHOWN]))[1:] + ("..." if len(data) > _SHOWN else "")


def _size(limit: int) -> str:
    if limit % (1024 * 1024) == 0:
        return f"{limit // (1024 * 1024)} MiB"
    if limit % 1024 == 0:
        return f"{limit // 1024} KiB"
    return f"{limit} bytes"


def _h11_detail(exc: h11.RemoteProtocolError) -> str:
    """h11's message, bounded, its byte reprs shown as quotes."""
    text = _H11_BYTES.sub(lambda m: m.group(1) or m.group(2), str(exc))
    return text if len(text) <= 2 * _SHOWN else text[:2 * _SHOWN] + "..."


@functools.cache
def _announce(method: str) -> h11.Request:
    """What h11 is told was sent: the method (a HEAD answer has no body) and that the
    connection closes after the response. The bytes on the wire are the caller's, built once
    per check (the feedback agent's are HTTP/1.0, which h11 does not write)."""
    return h11.Request(method=method, target="/", headers=[("Host", "lbha"),
                                                            ("Connection", "close")])


def _framing(method: str, response: h11.Response) -> str:
    """How h11 delimits this body (RFC 9112 6.3), named for the transcript."""
    if method == "HEAD" or response.status_code in (204, 304):
        return "none"
    names = {name for name, _ in response.headers}
    if b"transfer-encoding" in names:
        return "chunked"
    return "content-length" if b"content-length" in names else "until close"


def _content_length(response: h11.Response) -> int:
    for name, value in response.headers:
        if name == b"content-length":
            # h11 checked it: digits, and equal values when the server repeated it.
            return int(value.split(b",")[0])
    raise AssertionError("framing said content-length")


async def read_response(stream: trio.abc.ReceiveStream, endpoint: str, method: str,
                        progress: Progress, *, head_limit: int,
                        body_limit: int) -> Response:
    """Read one HTTP/1.x response to `method`, interim 1xx responses skipped.

    Raises HttpError (HttpTooLong over `head_limit` bytes of status lines and headers, or over
    `body_limit` bytes of body) with a reason naming what the server did wrong; trio's own
    errors (a reset) pass through.
    """
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=head_limit)
    conn.send(_announce(method))
    progress.step = f"waiting for the HTTP status line from {endpoint}"
    start = progress.received
    first = b""  # the start of the response, quoted when it is no HTTP
    sniffed = False
    final: h11.Response | None = None
    framing = "none"
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _protocol_error(exc, conn, endpoint, first, final, framing, body,
                                  progress.received - start, head_limit) from exc
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_SIZE)
            progress.received += len(data)
            if len(first) < 256:
                first = (first + data)[:256]
            if not sniffed:
                # h11 would wait for a whole head; a server that is no HTTP fails at once.
                if not data:
                    raise HttpError(endpoint, "closed the connection before sending a status "
                                              f"line ({progress.received - start} bytes "
                                              "received)")
                if len(first) < 5:
                    continue
                if not first.startswith(b"HTTP/"):
                    raise HttpError(endpoint, f"did not answer HTTP: {show(first[:40])}")
                sniffed = True
                progress.step = f"reading the HTTP headers from {endpoint}"
            if final is None and progress.received - start > head_limit:
                # Each head is capped by h11; this caps a stream of interim 1xx heads.
                raise _head_too_long(endpoint, head_limit)
            conn.receive_data(data)
        elif type(event) is h11.Data:
            if len(body) + len(event.data) > body_limit:
                raise HttpTooLong(endpoint, f"HTTP body exceeds {_size(body_limit)}",
                                  f"HTTP body from {endpoint} exceeds {_size(body_limit)}")
            body += event.data
        elif type(event) is h11.Response:
            final = event
            framing = _framing(method, event)
            progress.step = f"reading the HTTP body from {endpoint}"
            if framing == "content-length" and (size := _content_length(event)) > body_limit:
                detail = f"is {size} bytes, over the {_size(body_limit)} cap"
                raise HttpTooLong(endpoint, f"HTTP body {detail}",
                                  f"HTTP body from {endpoint} {detail}")
        elif type(event) is h11.EndOfMessage:
            assert final is not None
            return Response(
                final.status_code, final.reason.decode("utf-8", "replace")[:200],
                final.http_version.decode("ascii"),
                [(name.decode("latin-1"), value.decode("latin-1"))
                 for name, value in final.headers.raw_items()],
                bytes(body), framing)
        # An InformationalResponse (100 Continue, 103 Early Hints): the real one follows.


def _head_too_long(endpoint: str, head_limit: int) -> HttpTooLong:
    return HttpTooLong(endpoint, f"HTTP headers exceed {_size(head_limit)}",
                       f"HTTP headers from {endpoint} exceed {_size(head_limit)}")


def _protocol_error(exc: h11.RemoteProtocolError, conn: h11.Connection, endpoint: str, first: bytes,
                    final: h11.Response | None, framing: str, body: bytearray, received: int,
                    head_limit: int) -> HttpError:
    """The reason for what h11 refused, by where in the response it happened."""
    # h11 refuses an end of stream only where the response is incomplete.
    closed = conn.trailing_data[1]
    if final is None:
        if exc.error_status_hint == 431:
            return _head_too_long(endpoint, head_limit)
        if closed:
            return HttpError(endpoint, "closed the connection in the middle of the HTTP "
                                       f"headers ({received} bytes received)")
        if str(exc).startswith("illegal status line"):
            line = first.split(b"\n", 1)[0].rstrip(b"\r")
            return HttpError(endpoint, f"sent a malformed HTTP status line: {show(line)}")
        if "Content-Length" in str(exc):
            return HttpError(endpoint, f"sent an invalid Content-Length ({_h11_detail(exc)})")
        return HttpError(endpoint, f"sent a malformed HTTP head: {_h11_detail(exc)}")
    if framing == "content-length" and closed:
        return HttpError(endpoint, f"closed the connection after {len(body)} of "
                                   f"{_content_length(final)} body bytes")
    if closed:
        return HttpError(endpoint, "closed the connection in the middle of a chunked body "
                                   f"({received} bytes received)")
    if exc.error_status_hint == 431:
        return HttpError(endpoint, f"sent a chunked-body line over {_size(head_limit)}")
    detail = _h11_detail(exc)
    if detail.startswith("malformed chunk footer"):
        detail = "chunk longer than its size"
    elif detail.startswith("illegal chunk header: "):
        detail = f"chunk size {detail.removeprefix('illegal chunk header: ')}"
    return HttpError(endpoint, f"sent a malformed chunked body ({detail})")
