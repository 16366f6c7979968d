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

from lbha import __version__, hookimpl, http_exchange
from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec, Transcript
from lbha.checks.tcpclient import (
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
from lbha.http_exchange import Response
from lbha.model import CheckSpec, HttpMethod

#: Status line plus headers (all interim 1xx responses included).
HEADER_LIMIT = 64 * 1024
#: Decoded body.
BODY_LIMIT = 1024 * 1024
USER_AGENT = f"lbha/{__version__} health check"
#: Request-target characters sent as they are; everything else is percent-encoded.
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))
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


async def read_response(stream: trio.abc.ReceiveStream, endpoint: str, method: str,
                        progress: Progress) -> Response:
    """One HTTP/1.x response, head and body capped; CheckFailed when it is none."""
    try:
        return await http_exchange.read_response(stream, endpoint, method, progress,
                                                 head_limit=HEADER_LIMIT,
                                                 body_limit=BODY_LIMIT)
    except http_exchange.HttpError as exc:
        raise CheckFailed(exc.reason) from exc


def judge(response: Response, spec: CheckSpec, method: str,
          accepted: StatusSet | None = None) -> CheckResult:
    """An accepted status (default 2xx, 3xx) and (no receive, or the body matches it);
    redirects are judged as they are."""
    accepted = accepted if accepted is not None else parse_status(DEFAULT_STATUS)
    receive = spec.receive or ""
    status = response.status
    shown = response.status_text
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
