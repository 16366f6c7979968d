"""`http`, `https`, `http_proxy`: one HTTP/1.1 request, the answer judged as ldirectord does.

Success is a status the option `status` accepts (default "2xx,3xx", as HAProxy's httpchk and
check_http) and, when `receive` is set, a body that contains it (or matches it as a regular
expression with `regex = true`); headers are never searched. Redirects are judged as they
are, not followed. Status line and headers are capped at 64 KiB, the body at 1 MiB:
more is a failure, so a server that streams forever cannot hold a check. `https` does not
verify certificates unless `verify_tls` (or `ca_file`) asks for it. `http_proxy` uses the
real server as a proxy and fetches the absolute URL in `request` through it.
"""

from __future__ import annotations

import functools
import re
import ssl
import urllib.parse
from dataclasses import dataclass
from types import MappingProxyType

import trio

from lbha import __version__, hookimpl
from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec, Transcript
from lbha.checks.tcpclient import (
    RECEIVE_SIZE,
    CheckFailed,
    Progress,
    matches,
    open_tcp,
    printable,
    quote,
    run_exchange,
    start_tls,
    tls_context,
)
from lbha.model import CheckSpec, HttpMethod

#: Status line plus headers (all interim 1xx responses included).
HEADER_LIMIT = 64 * 1024
#: Decoded body.
BODY_LIMIT = 1024 * 1024
#: One chunk-size line of a chunked body, extensions included.
_CHUNK_LINE_LIMIT = 4096
USER_AGENT = f"lbha/{__version__} health check"
#: Request-target characters sent as they are; everything else is percent-encoded.
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))
_STATUS_LINE = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?: [^\r\n]*)?\r\n")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_HOST = re.compile(r"[A-Za-z0-9.\-_~%!$&'()*+,;=:\[\]]+")
#: Response header lines shown by `lbha check -v`.
_TRANSCRIPT_HEADERS = 40
#: The statuses that are up unless the option `status` says otherwise: 2xx and 3xx, as
#: HAProxy's httpchk and check_http; ldirectord follows a redirect, so a migrated check on
#: a page that redirects (/ to /login) stays up.
DEFAULT_STATUS = "2xx,3xx"
_STATUS_ITEM = re.compile(r"([1-5])xx|(\d{3})(?:-(\d{3}))?", re.IGNORECASE)
_STATUS_HELP = 'a code (200), a class (2xx) or a range (200-399), comma-separated'


@dataclass(frozen=True, slots=True)
class StatusSet:
    """The HTTP statuses a check accepts, as inclusive ranges, and how to name them."""

    ranges: tuple[tuple[int, int], ...]
    text: str

    def __contains__(self, status: object) -> bool:
        return isinstance(status, int) and any(low <= status <= high
                                               for low, high in self.ranges)


@functools.lru_cache(maxsize=256)
def parse_status(text: str) -> StatusSet:
    """`"2xx, 301-302, 404"` as a StatusSet; ValueError naming the item that is none of
    a code, a class or a range of codes 100..599."""
    ranges = []
    items = [item.strip() for item in text.split(",")]
    for item in items:
        match = _STATUS_ITEM.fullmatch(item)
        if match is None:
            raise ValueError(f"{item!r} is not {_STATUS_HELP}" if item
                             else f"empty item in {text!r}: give {_STATUS_HELP}")
        if match.group(1):
            low = int(match.group(1)) * 100
            ranges.append((low, low + 99))
            continue
        low = int(match.group(2))
        high = int(match.group(3) or low)
        for code in (low, high):
            if not 100 <= code <= 599:
                raise ValueError(f"{item!r}: {code} is not an HTTP status code (100..599)")
        if low > high:
            raise ValueError(f"{item!r} is an empty range: {low} is above {high}")
        ranges.append((low, high))
    return StatusSet(tuple(ranges), ",".join(items))


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request built once per distinct (check, target): the bytes and what -v shows."""

    head: bytes
    lines: tuple[str, ...]
    sni: str | None
    verify_name: str


@dataclass(slots=True)
class Response:
    status: int
    status_line: str
    headers: list[tuple[str, str]]
    body: bytes
    framing: str

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def _request_head(method: str, target_form: str, host: str) -> tuple[bytes, tuple[str, ...]]:
    lines = (f"{method} {target_form} HTTP/1.1", f"Host: {host}", f"User-Agent: {USER_AGENT}",
             "Accept: */*", "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii"), lines


def _host_name(authority: str) -> str:
    """The host of an authority, without port or IPv6 brackets (for SNI / name checks)."""
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _authority(virtualhost: str) -> str:
    """The Host header for `virtualhost`, IDNA-encoded; CheckFailed when it cannot be one."""
    try:
        host = virtualhost.strip().encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise CheckFailed(f"virtualhost {quote(virtualhost)} is not a valid host name") \
            from exc
    if not _HOST.fullmatch(host):
        raise CheckFailed(f"virtualhost {quote(virtualhost)} is not a valid host name")
    return host


@functools.lru_cache(maxsize=4096)
def prepare(kind: str, method: str, request: str | None, virtualhost: str | None, rip: str,
            ipv6: bool, rport: int) -> Prepared | str:
    """The request for one check and target, or the reason it cannot be made."""
    try:
        return _prepare(kind, method, request, virtualhost, rip, ipv6, rport)
    except CheckFailed as exc:
        return exc.reason


def _prepare(kind: str, method: str, request: str | None, virtualhost: str | None, rip: str,
             ipv6: bool, rport: int) -> Prepared:
    raw = (request or "").strip()
    if kind == "http_proxy":
        url = urllib.parse.urlsplit(raw)
        if url.scheme.lower() != "http" or not url.netloc:
            if url.scheme.lower() == "https":
                raise CheckFailed(f"http_proxy checks only http:// URLs, not {quote(raw)}")
            raise CheckFailed("http_proxy needs an absolute URL in request "
                              "(like http://www.example.com/)")
        authority = _authority(url.netloc.rsplit("@", 1)[-1])
        path = urllib.parse.quote(url.path or "/", safe=_SAFE)
        query = f"?{urllib.parse.quote(url.query, safe=_SAFE)}" if url.query else ""
        head, lines = _request_head(method, f"http://{authority}{path}{query}", authority)
        return Prepared(head, lines, None, _host_name(authority))
    url_host = None
    if re.match(r"https?://", raw, re.IGNORECASE):
        # An absolute URL names the host to ask for; lbha still asks the real server.
        url = urllib.parse.urlsplit(raw)
        url_host = url.netloc.rsplit("@", 1)[-1] or None
        raw = url.path + (f"?{url.query}" if url.query else "")
    path = raw if raw.startswith("/") else "/" + raw
    target_form = urllib.parse.quote(path, safe=_SAFE)
    default_port = 443 if kind == "https" else 80
    if virtualhost or url_host:
        authority = _authority(virtualhost or url_host or "")
    else:
        authority = f"[{rip}]" if ipv6 else rip
        if rport != default_port:
            authority = f"{authority}:{rport}"
    name = _host_name(authority)
    sni = None if name == rip else name
    head, lines = _request_head(method, target_form, authority)
    return Prepared(head, lines, sni, name)


class _Reader:
    """Reads one HTTP response into a bytearray, never past the caps."""

    __slots__ = ("buf", "endpoint", "eof", "progress", "stream")

    def __init__(self, stream: trio.abc.ReceiveStream, endpoint: str,
                 progress: Progress) -> None:
        self.stream = stream
        self.endpoint = endpoint
        self.progress = progress
        self.buf = bytearray()
        self.eof = False

    async def more(self, what: str) -> None:
        """Receive more bytes; CheckFailed at end of stream."""
        data = await self.stream.receive_some(RECEIVE_SIZE)
        if not data:
            self.eof = True
            raise CheckFailed(f"{self.endpoint} closed the connection {what} "
                              f"({self.progress.received} bytes received)")
        self.progress.received += len(data)
        self.buf += data

    async def until(self, delimiter: bytes, start: int, limit: int, what: str,
                    too_long: str) -> int:
        """Index of `delimiter` at or after `start`, reading until it is there or `limit`."""
        scan = start
        while True:
            found = self.buf.find(delimiter, scan)
            if found >= 0:
                return found
            if len(self.buf) - start > limit:
                raise CheckFailed(too_long)
            scan = max(start, len(self.buf) - len(delimiter) + 1)
            await self.more(what)

    async def head(self) -> tuple[int, int]:
        """End of the status line and end of the headers of the final (non-1xx) response."""
        start = 0
        while True:
            self.progress.step = f"waiting for the HTTP status line from {self.endpoint}"
            while len(self.buf) - start < 5:
                await self.more("before sending a status line")
            if not self.buf.startswith(b"HTTP/", start):
                raise CheckFailed(f"{self.endpoint} did not answer HTTP: "
                                  f"{quote(printable(self.buf[start:start + 40], 40))}")
            self.progress.step = f"reading the HTTP headers from {self.endpoint}"
            end = await self.until(b"\r\n\r\n", start, HEADER_LIMIT - start,
                                   "in the middle of the HTTP headers",
                                   f"HTTP headers from {self.endpoint} exceed "
                                   f"{HEADER_LIMIT // 1024} KiB")
            match = _STATUS_LINE.match(self.buf, start)
            if match is None:
                line_end = self.buf.find(b"\r\n", start)
                raise CheckFailed(f"{self.endpoint} sent a malformed HTTP status line: "
                                  f"{quote(printable(self.buf[start:line_end], 60))}")
            status = int(match.group(3))
            if status >= 200 or status == 101:
                return start, end + 4
            # An interim response (100 Continue, 103 Early Hints): the real one follows.
            start = end + 4

    async def exactly(self, start: int, length: int, what: str) -> None:
        while len(self.buf) < start + length:
            await self.more(what)

    async def chunked(self, start: int) -> bytes:
        body = bytearray()
        pos = start
        while True:
            line_end = await self.until(b"\r\n", pos, _CHUNK_LINE_LIMIT,
                                        "in the middle of a chunked body",
                                        f"{self.endpoint} sent a chunk-size line over "
                                        f"{_CHUNK_LINE_LIMIT} bytes")
            size_field = bytes(self.buf[pos:line_end]).split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_field):
                raise CheckFailed(f"{self.endpoint} sent a malformed chunked body "
                                  f"(chunk size {quote(printable(size_field, 20))})")
            size = int(size_field, 16)
            pos = line_end + 2
            if size == 0:
                # Trailers are not needed to judge the answer.
                return bytes(body)
            if len(body) + size > BODY_LIMIT:
                raise CheckFailed(_body_too_long(self.endpoint))
            await self.exactly(pos, size + 2, "in the middle of a chunked body")
            body += self.buf[pos:pos + size]
            if self.buf[pos + size:pos + size + 2] != b"\r\n":
                raise CheckFailed(f"{self.endpoint} sent a malformed chunked body "
                                  "(chunk longer than its size)")
            # Keep the buffer as small as the body: drop what was decoded.
            del self.buf[:pos + size + 2]
            pos = 0

    async def until_close(self, start: int) -> bytes:
        while True:
            if len(self.buf) - start > BODY_LIMIT:
                raise CheckFailed(_body_too_long(self.endpoint))
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                return bytes(self.buf[start:])
            self.progress.received += len(data)
            self.buf += data


def _body_too_long(endpoint: str) -> str:
    return f"HTTP body from {endpoint} exceeds {BODY_LIMIT // (1024 * 1024)} MiB"


def _parse_headers(block: bytes) -> list[tuple[str, str]]:
    headers = []
    for line in block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            headers.append((name.strip().decode("latin-1"),
                            value.strip().decode("latin-1")))
    return headers


async def read_response(stream: trio.abc.ReceiveStream, endpoint: str, method: str,
                        progress: Progress) -> Response:
    """One HTTP/1.x response: content-length, chunked or read-until-close body, capped."""
    reader = _Reader(stream, endpoint, progress)
    start, body_start = await reader.head()
    buf = reader.buf
    line_end = buf.find(b"\r\n", start)
    status_line = printable(buf[start:line_end], 200)
    status = int(buf[start + 9:start + 12])
    headers = _parse_headers(bytes(buf[line_end + 2:body_start - 4]))
    response = Response(status, status_line, headers, b"", "none")
    progress.step = f"reading the HTTP body from {endpoint}"
    if method == "HEAD" or status < 200 or status in (204, 304):
        return response
    encoding = response.header("transfer-encoding")
    length = response.header("content-length")
    if encoding is not None:
        if encoding.lower().rsplit(",", 1)[-1].strip() == "chunked":
            response.body, response.framing = await reader.chunked(body_start), "chunked"
            return response
    elif length is not None:
        values = {v.strip() for v in length.split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise CheckFailed(f"{endpoint} sent an invalid Content-Length {quote(length)}")
        size = int(values.pop())
        if size > BODY_LIMIT:
            raise CheckFailed(f"HTTP body from {endpoint} is {size} bytes, over the "
                              f"{BODY_LIMIT // (1024 * 1024)} MiB cap")
        await reader.exactly(body_start, size, f"after {len(buf) - body_start} of {size} "
                                               "body bytes")
        response.body = bytes(buf[body_start:body_start + size])
        response.framing = "content-length"
        return response
    response.body, response.framing = await reader.until_close(body_start), "until close"
    return response


def judge(response: Response, spec: CheckSpec, method: str,
          accepted: StatusSet | None = None) -> CheckResult:
    """An accepted status (default 2xx, 3xx) and (no receive, or the body matches it);
    redirects are judged as they are."""
    accepted = accepted if accepted is not None else parse_status(DEFAULT_STATUS)
    receive = spec.receive or ""
    status = response.status
    shown = response.status_line.split(" ", 1)[1] if " " in response.status_line else ""
    note = ""
    if 300 <= status < 400:
        location = response.header("location")
        to = f" to {quote(location, 100)}" if location else ""
        note = f" (redirect{to}; redirects are not followed)"
    if status not in accepted:
        expected = f"expected {quote(receive)} with" if receive else "expected"
        return CheckResult.failure(f"{expected} status {accepted.text}, got HTTP {shown}{note}")
    if not receive:
        return CheckResult.success(f"HTTP {shown}")
    if method == "HEAD":
        return CheckResult.failure(f"HTTP {status} to HEAD has no body to match {quote(receive)} "
                                   "(use GET, or leave receive empty)")
    if matches(response.body, receive, spec.regex):
        how = "matches regex" if spec.regex else "contains"
        return CheckResult.success(f"HTTP {shown}, body {how} {quote(receive)}")
    how = "does not match regex" if spec.regex else "does not contain"
    return CheckResult.failure(f"HTTP {status} but body {how} {quote(receive)}{note}")


def _record_response(transcript: Transcript, response: Response) -> None:
    transcript.received(response.status_line)
    for name, value in response.headers[:_TRANSCRIPT_HEADERS]:
        transcript.received(printable(f"{name}: {value}".encode("latin-1", "replace"), 200))
    if len(response.headers) > _TRANSCRIPT_HEADERS:
        transcript.received(f"({len(response.headers) - _TRANSCRIPT_HEADERS} more headers)")
    if response.framing != "none":
        transcript.received(f"body: {len(response.body)} bytes ({response.framing}): "
                            f"{printable(response.body, 120)}")


class HttpCheck:
    """One of http, https, http_proxy: they differ in TLS and the request's form."""

    negotiate = True
    options: MappingProxyType[str, OptionSpec] = MappingProxyType({
        "status": OptionSpec(
            type="str", default=DEFAULT_STATUS, validate=parse_status,
            help=f"the HTTP statuses that are up: {_STATUS_HELP}; default 2xx and 3xx "
                 "(redirects are not followed)"),
    })

    def __init__(self, name: str, description: str) -> None:
        self.name = name
        self.description = description
        self._tls = name == "https"
        self.spec_keys = frozenset({"request", "receive", "regex", "virtualhost", "method"}) \
            | (frozenset({"verify_tls", "ca_file"}) if self._tls else frozenset())

    async def check(self, request: CheckRequest) -> CheckResult:
        target = request.target
        spec = request.spec
        if target.rport is None:
            return CheckResult.failure(f"no port to connect to on {target.rip}")
        method = spec.method.value if isinstance(spec.method, HttpMethod) else str(spec.method)
        prepared = prepare(self.name, method, spec.request, spec.virtualhost,
                           str(target.rip), target.rip.version == 6, target.rport)
        if isinstance(prepared, str):
            return CheckResult.failure(prepared)
        context = None
        if self._tls:
            try:
                context = tls_context(spec.verify_tls, spec.ca_file)
            except CheckFailed as exc:
                return CheckResult.failure(exc.reason)
        progress = Progress(f"connect to {target.endpoint}")
        return await run_exchange(
            request, progress,
            functools.partial(self._exchange, request, prepared, method, context, progress),
        )

    async def _exchange(self, request: CheckRequest, prepared: Prepared, method: str,
                        context: ssl.SSLContext | None, progress: Progress) -> CheckResult:
        target = request.target
        endpoint = target.endpoint
        transcript = request.transcript
        tcp = await open_tcp(target, progress, transcript)
        async with tcp:
            stream: trio.abc.Stream = tcp
            if context is not None:
                # The name checked is virtualhost's, else the IP (an IP is never sent as SNI).
                stream = await start_tls(tcp, context, prepared.sni or prepared.verify_name,
                                         endpoint, progress, transcript)
            progress.step = f"sending the HTTP request to {endpoint}"
            if transcript:
                for line in prepared.lines:
                    transcript.sent(line)
            await stream.send_all(prepared.head)
            response = await read_response(stream, endpoint, method, progress)
        if transcript:
            _record_response(transcript, response)
        return judge(response, request.spec, method,
                     parse_status(request.options.get("status") or DEFAULT_STATUS))


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(HttpCheck("http", "HTTP request; up on 2xx/3xx (option status) and receive "
                                   "found in the body"))
    registry.add(HttpCheck("https", "HTTPS request (certificate verified only with "
                                    "verify_tls); up on 2xx/3xx (option status) and receive "
                                    "found in the body"))
    registry.add(HttpCheck("http_proxy", "the real server as HTTP proxy: fetch the absolute "
                                         "URL in request through it; up on 2xx/3xx (option "
                                         "status) and receive"))
