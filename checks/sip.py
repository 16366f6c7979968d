"""`sip`: send an OPTIONS request and wait for a 200 response to that very transaction.

The request is well formed (RFC 3261: Via with a z9hG4bK branch and rport, From tag, To,
Call-ID, CSeq, Max-Forwards, Contact, Content-Length), over UDP with retransmissions per
timer E, or over TCP for a TCP virtual service. Responses are parsed here by a small bounded
parser; anything that is not a response to our transaction (other Call-ID, CSeq or branch,
requests, garbage) is ignored until the deadline, provisional 1xx responses are skipped, and
any other final response is down with its status line.
"""

from __future__ import annotations

import functools
import re
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import trio

from lbha import hookimpl
from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec
from lbha.checkkit import CheckFailed, describe_error, printable, run_within, udp

#: Largest message accepted (a UDP datagram cannot be larger).
MAX_MESSAGE = 65535
#: Largest header section of a message read from a TCP stream.
MAX_HEAD = 16384
MAX_HEADER_LINES = 128
#: Messages that are not the final response to our transaction tolerated before giving up.
MAX_MESSAGES = 64
#: RFC 3261 timer E: first retransmission after T1, doubling up to T2 (17.1.2.2).
T1 = 0.5
T2 = 4.0
TIMER_E = udp.backoff(T1, cap=T2)
#: Longest text quoted from a response in a reason.
_QUOTE = 100

#: RFC 3261 7.3.3 compact header names.
_COMPACT: MappingProxyType[str, str] = MappingProxyType({
    "i": "call-id", "v": "via", "f": "from", "t": "to", "l": "content-length",
    "m": "contact", "c": "content-type", "e": "content-encoding", "k": "supported",
    "s": "subject",
})
_STATUS_LINE = re.compile(r"SIP/2\.0 ([1-6][0-9][0-9])(?: (.*))?", re.IGNORECASE)
_REQUEST_LINE = re.compile(r"([A-Za-z]+) \S+ SIP/2\.0", re.IGNORECASE)
_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+")
_LINE_BREAK = re.compile(r"\r?\n")
_LINE_BREAK_BYTES = re.compile(rb"\r?\n")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
#: What a login may contain: a SIP URI's user@host part, nothing that breaks a header.
_LOGIN = re.compile(r"[^\s<>\"]+")


class SipParseError(ValueError):
    """Bytes that are not a SIP response (the reason says why)."""


class SipLoginError(ValueError):
    """`login` cannot be the user@host of a SIP URI."""


@dataclass(frozen=True)
class SipResponse:
    """A parsed response: status and headers (lower-case full names, values in order)."""

    code: int
    phrase: str
    headers: Mapping[str, tuple[str, ...]]

    def first(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[0] if values else None

    @property
    def status(self) -> str:
        return f"{self.code} {self.phrase}".rstrip()


@dataclass(frozen=True)
class Transaction:
    """What identifies our OPTIONS transaction in a response (RFC 3261 17.1.3)."""

    call_id: str
    cseq: int
    branch: str
    tag: str

    @classmethod
    def new(cls) -> Transaction:
        return cls(
            call_id=secrets.token_hex(16),
            cseq=secrets.randbelow(2**31 - 1) + 1,
            branch="z9hG4bK" + secrets.token_hex(12),
            tag=secrets.token_hex(8),
        )


@dataclass(frozen=True)
class Ignored:
    """A message that is not a response to our transaction; keep waiting."""

    why: str


@dataclass(frozen=True)
class Provisional:
    """A 1xx response to our transaction; the final one is still to come."""

    status: str


#: What one received message means for the check.
Outcome = CheckResult | Ignored | Provisional


def quote(text: str) -> str:
    """Response text made safe for a one-line reason: printable and bounded."""
    return printable(text, _QUOTE)


def parse_response(data: bytes) -> SipResponse:
    """Parse one SIP response (status line and headers; the body is not looked at)."""
    if len(data) > MAX_MESSAGE:
        raise SipParseError(f"{len(data)} bytes, more than a SIP message may have")
    # A datagram without the blank line is read as all headers: the transaction match
    # below, not the framing, is what makes a response ours.
    end = _HEAD_END.search(data)
    head = data[: end.start()] if end else data
    lines = _LINE_BREAK.split(head.decode("utf-8", errors="replace"))
    if len(lines) > MAX_HEADER_LINES:
        raise SipParseError(f"more than {MAX_HEADER_LINES} header lines")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        request = _REQUEST_LINE.fullmatch(lines[0])
        if request:
            raise SipParseError(f"a {quote(request.group(1))} request, not a response")
        raise SipParseError(f"not a SIP status line: {quote(lines[0])!r}")
    headers: dict[str, list[str]] = {}
    last: list[str] | None = None
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":
            if last is None:
                raise SipParseError("header section starts with a continuation line")
            last[-1] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if not colon or not _TOKEN.fullmatch(name):
            raise SipParseError(f"malformed header line {quote(line)!r}")
        last = headers.setdefault(_COMPACT.get(name, name), [])
        last.append(value.strip())
    return SipResponse(
        code=int(status.group(1)),
        phrase=(status.group(2) or "").strip(),
        headers=MappingProxyType({k: tuple(v) for k, v in headers.items()}),
    )


def split_message(buffer: bytes | bytearray) -> tuple[bytes, int] | None:
    """One complete message at the start of a TCP stream buffer and the bytes it used.

    None when more bytes are needed; SipParseError when the stream cannot be framed.
    Leading CRLFs (RFC 5626 keep-alives) are skipped.
    """
    start = len(buffer) - len(bytes(buffer).lstrip(b"\r\n"))
    end = _HEAD_END.search(buffer, start)
    if end is None:
        if len(buffer) - start > MAX_HEAD:
            raise SipParseError(f"no end of the header section within {MAX_HEAD} bytes")
        return None
    if end.start() - start > MAX_HEAD:
        raise SipParseError(f"header section longer than {MAX_HEAD} bytes")
    length = content_length(bytes(buffer[start:end.start()]))
    if end.end() - start + length > MAX_MESSAGE:
        raise SipParseError(f"Content-Length {length} is more than a SIP message may have")
    total = end.end() + length
    if len(buffer) < total:
        return None
    return bytes(buffer[start:total]), total


def content_length(head: bytes) -> int:
    """The Content-Length of a header section (0 when absent, as RFC 3261 18.3 allows)."""
    for line in _LINE_BREAK_BYTES.split(head)[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() in (b"content-length", b"l"):
            text = value.strip()
            if not text.isdigit() or len(text) > 6:
                raise SipParseError(f"bad Content-Length {quote(text.decode('latin-1'))!r}")
            return int(text)
    return 0


def via_branch(via: str) -> str | None:
    """The branch parameter of a Via value (its first entry when comma-separated)."""
    top = via.split(",", 1)[0]
    for param in top.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "branch":
            return value.strip()
    return None


def judge_response(tx: Transaction, data: bytes, endpoint: str) -> Outcome:
    """Judge one received message against our transaction; never raises."""
    try:
        response = parse_response(data)
    except SipParseError as exc:
        return Ignored(f"not a SIP response: {exc}")
    call_id = response.first("call-id")
    if call_id != tx.call_id:
        return Ignored(f"response for another call (Call-ID {quote(call_id or 'missing')!r})")
    cseq = (response.first("cseq") or "").split()
    if cseq != [str(tx.cseq), "OPTIONS"]:
        return Ignored(f"response for another request (CSeq {quote(' '.join(cseq))!r})")
    branch = via_branch(response.first("via") or "")
    if branch != tx.branch:
        return Ignored(f"response for another transaction (Via branch {quote(branch or '')!r})")
    if response.code < 200:
        return Provisional(quote(response.status))
    if response.code == 200:
        return CheckResult.success(f"SIP {quote(response.status)} from {endpoint}")
    reason = f"SIP {quote(response.status)} from {endpoint}"
    if response.code in (401, 407):
        reason += " (the sip check does not authenticate: let the director's OPTIONS through)"
    return CheckResult.failure(reason)


@functools.cache
def local_host_name() -> str:
    return socket.gethostname() or "localhost"


def sip_login(login: str | None) -> str:
    """The user@host of the request URI, To and From: `login`, else lbha@<this host>."""
    text = (login or "").strip()
    for scheme in ("sip:", "sips:"):
        if text.lower().startswith(scheme):
            text = text[len(scheme):]
    if not text:
        return f"lbha@{local_host_name()}"
    if not _LOGIN.fullmatch(text):
        raise SipLoginError(f"login {text!r} is not a SIP user@host")
    return text


def build_options(tx: Transaction, login: str, local: tuple[str, int], transport: str) -> bytes:
    """The OPTIONS request, sent from `local` (address, port) over "UDP" or "TCP"."""
    host = f"[{local[0]}]" if ":" in local[0] else local[0]
    user = login.partition("@")[0] if "@" in login else "lbha"
    lines = [
        f"OPTIONS sip:{login} SIP/2.0",
        f"Via: SIP/2.0/{transport} {host}:{local[1]};branch={tx.branch};rport",
        "Max-Forwards: 70",
        f"To: <sip:{login}>",
        f"From: <sip:{login}>;tag={tx.tag}",
        f"Call-ID: {tx.call_id}",
        f"CSeq: {tx.cseq} OPTIONS",
        f"Contact: <sip:{user}@{host}:{local[1]};transport={transport.lower()}>",
        "Accept: application/sdp",
        "User-Agent: lbha",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class _Exchange:
    """One OPTIONS transaction with one server; remembers what it ignored and saw."""

    def __init__(self, request: CheckRequest, login: str) -> None:
        self.target = request.target
        self.endpoint = request.target.endpoint
        self.address = (str(request.target.rip), request.target.rport)
        self.transcript = request.transcript
        self.login = login
        self.tx = Transaction.new()
        self.ignored: list[str] = []
        self.provisional: str | None = None
        self.messages = 0

    def _judge(self, data: bytes) -> Outcome:
        self.messages += 1
        if self.transcript:
            first = data.split(b"\n", 1)[0].decode("utf-8", errors="replace").strip()
            self.transcript.received(f"{quote(first)} ({len(data)} bytes)")
        outcome = judge_response(self.tx, data, self.endpoint)
        if isinstance(outcome, Ignored):
            self.ignored.append(outcome.why)
            if self.transcript:
                self.transcript.note(f"ignored: {outcome.why}")
        elif isinstance(outcome, Provisional):
            self.provisional = outcome.status
        return outcome

    def _sent(self, message: bytes, how: str) -> None:
        if self.transcript:
            self.transcript.sent(f"{how} to {self.endpoint}:")
            for line in message.decode().split("\r\n")[:-2]:
                self.transcript.sent(f"  {line}")

    def _too_many(self) -> CheckResult:
        last = self.ignored[-1] if self.ignored else self.provisional
        return CheckResult.failure(
            f"{self.messages} messages from {self.endpoint} and no final response to our "
            f"OPTIONS (last: {last})"
        )

    def _schedule(self, sends: int) -> float:
        # After a provisional response, retransmit every T2 (17.1.2.2).
        return T2 if self.provisional else TIMER_E(sends)

    def _judge_datagram(self, data: bytes) -> CheckResult | None:
        outcome = self._judge(data)
        return outcome if isinstance(outcome, CheckResult) else None

    async def udp(self) -> CheckResult:
        async with udp.udp_socket(self.target) as sock:
            message = build_options(self.tx, self.login, sock.getsockname()[:2], "UDP")

            def sent(sends: int) -> None:
                if sends == 1:
                    self._sent(message, "OPTIONS over UDP")
                elif self.transcript:
                    self.transcript.sent(f"retransmission {sends - 1} of the OPTIONS")

            outcome = await udp.exchange(sock, message, self._judge_datagram, self._schedule,
                                         max_datagrams=MAX_MESSAGES, sent=sent,
                                         size=MAX_MESSAGE)
        return self._too_many() if outcome is None else outcome

    async def tcp(self) -> CheckResult:
        with trio.socket.socket(self.target.family, socket.SOCK_STREAM) as sock:
            await sock.connect(self.address)
            stream = trio.SocketStream(sock)
            message = build_options(self.tx, self.login, sock.getsockname()[:2], "TCP")
            self._sent(message, "OPTIONS over TCP")
            await stream.send_all(message)
            buffer = bytearray()
            while self.messages < MAX_MESSAGES:
                # Keep-alive CRLFs between messages must not pile up.
                del buffer[: len(buffer) - len(buffer.lstrip(b"\r\n"))]
                try:
                    framed = split_message(buffer)
                except SipParseError as exc:
                    return CheckResult.failure(f"garbage from {self.endpoint}: {exc}")
                if framed is None:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return self._closed(buffer)
                    buffer += chunk
                    continue
                data, used = framed
                del buffer[:used]
                outcome = self._judge(data)
                if isinstance(outcome, CheckResult):
                    return outcome
            return self._too_many()

    def _closed(self, pending: bytearray) -> CheckResult:
        if self.transcript:
            self.transcript.note(f"connection closed with {len(pending)} bytes pending")
        after = f" after {self.provisional}" if self.provisional else ""
        return CheckResult.failure(
            f"{self.endpoint} closed the TCP connection without a final response{after}"
            + (f" ({len(pending)} bytes of a message)" if pending.strip() else "")
        )


class SipCheck:
    name = "sip"
    negotiate = True
    spec_keys = frozenset({"login"})
    description = (
        "SIP OPTIONS (UDP, or TCP for a TCP service) as login; up on a 200 response to "
        "that transaction"
    )
    options: MappingProxyType[str, OptionSpec] = MappingProxyType({
        "transport": OptionSpec(
            default="auto", choices=udp.TRANSPORTS,
            help="auto (TCP for protocol = \"tcp\", else UDP), udp or tcp",
        ),
    })

    async def check(self, request: CheckRequest) -> CheckResult:
        target = request.target
        if target.rport is None:
            return CheckResult.failure(f"no port to send OPTIONS to on {target.rip}")
        try:
            use_tcp = udp.over_tcp(request)
        except CheckFailed as exc:
            return CheckResult.failure(exc.reason)
        try:
            login = sip_login(request.spec.login)
        except SipLoginError as exc:
            return CheckResult.failure(str(exc))
        exchange = _Exchange(request, login)

        def timed_out(budget: float) -> str:
            if exchange.provisional:
                seen = f"; only {exchange.provisional}"
            elif exchange.ignored:
                seen = f"; ignored {len(exchange.ignored)} (last: {exchange.ignored[-1]})"
            else:
                seen = ""
            return f"no final SIP response from {exchange.endpoint} within {budget:.2f} s{seen}"

        return await run_within(
            request, exchange.tcp if use_tcp else exchange.udp, timed_out=timed_out,
            error=lambda exc: describe_error("SIP OPTIONS to", exchange.endpoint, exc,
                                             udp=None if use_tcp else "SIP: "),
        )


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(SipCheck())
