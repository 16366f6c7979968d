"""The response reader of lbha.http_exchange written on h11, for `run.py --reader h11` and
`parsers.py`: the same interface, caps and reasons, so the figures compare the parsers only.

lbha ships its own parser; this is the h11 alternative issue 14 asked to measure (it passed
tests/checks/test_http.py, all but the 10,000-check fd tests, which were not
run, when it was the product's reader in commit 8761c24).
"""

from __future__ import annotations

import functools
import re

import h11
import trio

from lbha.http_exchange import (
    RECEIVE_SIZE,
    HttpError,
    HttpTooLong,
    Progress,
    Response,
    _size,
    show,
)

_SHOWN = 60
#: h11 quotes the offending bytes as `bytearray(b'...')`; a reason shows just '...'.
_H11_BYTES = re.compile(r"bytearray\(b(['\"].*?['\"])\)|\bb(['\"].*?['\"])")


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
