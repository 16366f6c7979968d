"""One HTTP/1.1 response reader for every HTTP client in lbha: the `http`, `https` and
`http_proxy` checks and the HTTP feedback agent.

It reads the status line, skips interim 1xx responses, and reads a Content-Length, chunked or
close-delimited body (none after HEAD, 204 or 304), with caps on the head and on the body so
a server that streams forever cannot hold a reader; it records the step a timeout names, and
raises reasons an operator can act on. The caller owns the stream, the request bytes it sends
and the deadline: a server that trickles is stopped by the caller's deadline, not here.

Hand-written rather than h11: h11 costs about 35 us more per response, 19-30 % of the
checks per CPU-second (bench/http/README.md, issue 14). It belongs in the public check kit
(lbha/checkkit/) once that exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import trio

#: Bytes asked for per receive.
RECEIVE_SIZE = 65536
#: One chunk-size line of a chunked body, extensions included.
CHUNK_LINE_LIMIT = 4096
#: Longest piece of server text quoted in a reason.
_SHOWN = 60
_STATUS_LINE = re.compile(rb"HTTP/(\d\.\d) (\d{3})(?: ([^\r\n]*))?\r\n")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


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



class _Reader:
    """Reads one HTTP response into a bytearray, never past the caps."""

    __slots__ = ("body_limit", "buf", "endpoint", "head_limit", "progress", "stream")

    def __init__(self, stream: trio.abc.ReceiveStream, endpoint: str, progress: Progress,
                 head_limit: int, body_limit: int) -> None:
        self.stream = stream
        self.endpoint = endpoint
        self.progress = progress
        self.head_limit = head_limit
        self.body_limit = body_limit
        self.buf = bytearray()

    def fail(self, detail: str) -> HttpError:
        return HttpError(self.endpoint, detail)

    def body_too_long(self, detail: str) -> HttpTooLong:
        return HttpTooLong(self.endpoint, f"HTTP body {detail}",
                           f"HTTP body from {self.endpoint} {detail}")

    async def more(self, what: str) -> None:
        """Receive more bytes; HttpError at end of stream."""
        data = await self.stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise self.fail(f"closed the connection {what} "
                            f"({self.progress.received} bytes received)")
        self.progress.received += len(data)
        self.buf += data

    async def until(self, delimiter: bytes, start: int, limit: int, what: str,
                    too_long: HttpError) -> int:
        """Index of `delimiter` at or after `start`, reading until it is there or `limit`."""
        scan = start
        while True:
            found = self.buf.find(delimiter, scan)
            if found - start > limit or (found < 0 and len(self.buf) - start > limit):
                # Also when it is there: one receive can bring more than the limit.
                raise too_long
            if found >= 0:
                return found
            scan = max(start, len(self.buf) - len(delimiter) + 1)
            await self.more(what)

    async def head(self) -> tuple[re.Match[bytes], int]:
        """The status line and the end of the headers of the final (non-1xx) response."""
        start = 0
        endpoint = self.endpoint
        while True:
            self.progress.step = f"waiting for the HTTP status line from {endpoint}"
            while len(self.buf) - start < 5:
                await self.more("before sending a status line")
            if not self.buf.startswith(b"HTTP/", start):
                raise self.fail(f"did not answer HTTP: {show(self.buf[start:start + 40])}")
            self.progress.step = f"reading the HTTP headers from {endpoint}"
            end = await self.until(
                b"\r\n\r\n", start, self.head_limit - start,
                "in the middle of the HTTP headers",
                HttpTooLong(endpoint, f"HTTP headers exceed {_size(self.head_limit)}",
                            f"HTTP headers from {endpoint} exceed {_size(self.head_limit)}"))
            match = _STATUS_LINE.match(self.buf, start)
            if match is None:
                line_end = self.buf.find(b"\r\n", start)
                raise self.fail(f"sent a malformed HTTP status line: "
                                f"{show(self.buf[start:line_end])}")
            status = int(match.group(2))
            if status >= 200 or status == 101:
                return match, end + 4
            # An interim response (100 Continue, 103 Early Hints): the real one follows.
            start = end + 4

    async def exactly(self, start: int, length: int, what: str) -> None:
        while len(self.buf) < start + length:
            await self.more(what)

    async def chunked(self, start: int) -> bytes:
        body = bytearray()
        pos = start
        while True:
            line_end = await self.until(
                b"\r\n", pos, CHUNK_LINE_LIMIT, "in the middle of a chunked body",
                self.fail(f"sent a chunk-size line over {CHUNK_LINE_LIMIT} bytes"))
            size_field = bytes(self.buf[pos:line_end]).split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_field):
                raise self.fail(f"sent a malformed chunked body "
                                f"(chunk size {show(size_field[:20])})")
            size = int(size_field, 16)
            pos = line_end + 2
            if size == 0:
                # Trailers are not needed to judge the answer.
                return bytes(body)
            if len(body) + size > self.body_limit:
                raise self.body_too_long(f"exceeds {_size(self.body_limit)}")
            await self.exactly(pos, size + 2, "in the middle of a chunked body")
            body += self.buf[pos:pos + size]
            if self.buf[pos + size:pos + size + 2] != b"\r\n":
                raise self.fail("sent a malformed chunked body (chunk longer than its size)")
            # Keep the buffer as small as the body: drop what was decoded.
            del self.buf[:pos + size + 2]
            pos = 0

    async def until_close(self, start: int) -> bytes:
        while True:
            if len(self.buf) - start > self.body_limit:
                raise self.body_too_long(f"exceeds {_size(self.body_limit)}")
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                return bytes(self.buf[start:])
            self.progress.received += len(data)
            self.buf += data


def _text(data: bytes) -> str:
    """Header or reason-phrase bytes as one line of text, control characters escaped."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], data.decode("latin-1"))


def _parse_headers(block: bytes) -> list[tuple[str, str]]:
    headers = []
    for line in block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            headers.append((name.strip().decode("latin-1"),
                            value.strip().decode("latin-1")))
    return headers


async def read_response(stream: trio.abc.ReceiveStream, endpoint: str, method: str,
                        progress: Progress, *, head_limit: int,
                        body_limit: int) -> Response:
    """Read one HTTP/1.x response to `method`, interim 1xx responses skipped.

    Raises HttpError (HttpTooLong over `head_limit` bytes of status lines and headers, or over
    `body_limit` bytes of body) with a reason naming what the server did wrong; trio's own
    errors (a reset) pass through.
    """
    reader = _Reader(stream, endpoint, progress, head_limit, body_limit)
    match, body_start = await reader.head()
    buf = reader.buf
    version, code, phrase = match.groups()
    status = int(code)
    headers = _parse_headers(bytes(buf[match.end():body_start - 4]))
    response = Response(status, _text(phrase[:200]) if phrase else "", version.decode(),
                        headers, b"", "none")
    progress.step = f"reading the HTTP body from {endpoint}"
    if method == "HEAD" or status < 200 or status in (204, 304):
        return response
    encoding = response.header("transfer-encoding")
    length = response.header("content-length")
    if encoding is not None:
        if encoding.lower().rsplit(",", 1)[-1].strip() == "chunked":
            response.body, response.framing = await reader.chunked(body_start), "chunked"
            return response
        # Not chunked last: the body runs until the server closes (RFC 9112 6.3).
    elif length is not None:
        values = {v.strip() for v in length.split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise reader.fail(f"sent an invalid Content-Length {show(length.encode('latin-1'))}")
        size = int(values.pop())
        if size > body_limit:
            raise reader.body_too_long(f"is {size} bytes, over the {_size(body_limit)} cap")
        while len(buf) < body_start + size:
            await reader.more(f"after {len(buf) - body_start} of {size} body bytes")
        response.body = bytes(buf[body_start:body_start + size])
        response.framing = "content-length"
        return response
    response.body, response.framing = await reader.until_close(body_start), "until close"
    return response
