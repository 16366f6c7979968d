"""`dns`: ask the real server for a name (A or AAAA) or an address (PTR) and match the answer.

dnspython builds the query and parses the reply; the exchange itself is trio sockets, so a
cancelled check closes its socket at once and every datagram is judged here: replies with
another id, without the QR bit or for another question are ignored (spoofed or late), not
trusted. UDP (retransmitted within the deadline) with a switch to TCP when the reply is
truncated; TCP from the start for a TCP virtual service, as ldirectord does.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from types import MappingProxyType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import trio

from lbha import hookimpl
from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec
from lbha.checkkit import CheckFailed, describe_error, matches, printable, run_within, udp

#: Record types a name may be asked for (option `type`); an address is always asked as PTR.
RECORD_TYPES: MappingProxyType[str, dns.rdatatype.RdataType] = MappingProxyType(
    {"A": dns.rdatatype.A, "AAAA": dns.rdatatype.AAAA}
)
#: Replies that are not ours (wrong id, other question) tolerated before giving up.
MAX_IGNORED = 64
#: UDP retransmissions: the first after 1 s, then doubling (1, 2, 4 s ...).
RETRANSMIT = udp.backoff(1.0)
#: Longest reason text quoted from an answer.
_QUOTE = 120

_HEADER = struct.Struct("!HH")
_TC_BIT = 0x0200
_QR_BIT = 0x8000


class DnsRequestError(ValueError):
    """The check's configuration cannot make a query (no name, bad name, bad option)."""


@dataclass(frozen=True)
class Question:
    """What is asked: a name and a record type."""

    name: dns.name.Name
    rdtype: dns.rdatatype.RdataType

    def __str__(self) -> str:
        return f"{dns.rdatatype.to_text(self.rdtype)} {self.name.to_text(omit_final_dot=True)}"


@dataclass(frozen=True)
class Ignored:
    """A datagram that is not the reply to our query; keep waiting."""

    why: str


@dataclass(frozen=True)
class Truncated:
    """Our reply, with TC set: ask again over TCP."""


#: What one received message means for the check.
Outcome = CheckResult | Ignored | Truncated


def build_question(request: str | None, record_type: str = "A") -> Question:
    """The question for `request`: an IPv4/IPv6 address is a PTR query, a name A or AAAA."""
    text = (request or "").lstrip("/").strip()
    if not text:
        raise DnsRequestError("no name to query: set request to a host name or an address")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is not None:
        return Question(dns.reversename.from_address(str(address)), dns.rdatatype.PTR)
    wanted = record_type.upper()
    if wanted not in RECORD_TYPES:
        raise DnsRequestError(f"option type = {record_type!r}: expected A or AAAA")
    try:
        name = dns.name.from_text(text)
    except dns.exception.DNSException as exc:
        raise DnsRequestError(f"request {text!r} is not a valid DNS name: {exc}") from exc
    return Question(name, RECORD_TYPES[wanted])


def answer_values(reply: dns.message.Message, question: Question) -> list[str]:
    """The answer's records of the asked type: addresses, or PTR targets without the dot."""
    values: list[str] = []
    for rrset in reply.answer:
        if rrset.rdtype != question.rdtype or rrset.rdclass != dns.rdataclass.IN:
            continue
        for rdata in rrset:
            if question.rdtype == dns.rdatatype.PTR:
                values.append(rdata.target.to_text(omit_final_dot=True))
            else:
                values.append(rdata.address)
    return values


def _quote(text: str) -> str:
    return printable(text, _QUOTE)


def judge_reply(
    query: dns.message.Message,
    question: Question,
    wire: bytes,
    receive: str | None,
    regex: bool,
    endpoint: str,
    *,
    tcp: bool,
) -> Outcome:
    """Judge one received message; never raises, whatever the bytes."""
    if len(wire) < 12:
        return Ignored(f"{len(wire)}-byte message, shorter than a DNS header")
    ident, flags = _HEADER.unpack_from(wire)
    if ident != query.id:
        return Ignored(f"reply id {ident}, expected {query.id}")
    if not flags & _QR_BIT:
        return Ignored("a query, not a response (QR bit clear)")
    if flags & _TC_BIT and not tcp:
        return Truncated()
    try:
        reply = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError) as exc:
        return CheckResult.failure(f"malformed DNS reply from {endpoint}: {_quote(str(exc))}")
    if not query.is_response(reply):
        asked = ", ".join(_quote(q.to_text()) for q in reply.question[:2]) or "nothing"
        return Ignored(f"reply for another question ({asked})")
    rcode = reply.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return CheckResult.failure(
            f"NXDOMAIN from {endpoint}: {question.name.to_text(omit_final_dot=True)} "
            "does not exist"
        )
    if rcode != dns.rcode.NOERROR:
        return CheckResult.failure(
            f"{endpoint} answered {dns.rcode.to_text(rcode)} for {question}"
        )
    values = answer_values(reply, question)
    if not values:
        return CheckResult.failure(f"{endpoint} has no {question} record (empty answer)")
    shown = _quote(", ".join(values))
    if not receive:
        return CheckResult.success(f"{question} = {shown}")
    for value in values:
        if matches(value, receive, regex):
            return CheckResult.success(f"{question} = {_quote(value)} matches {receive!r}")
    return CheckResult.failure(f"{question} = {shown}, which does not match {receive!r}")


def describe_message(wire: bytes) -> str:
    """One transcript line for a received message (best effort, never raises)."""
    try:
        reply = dns.message.from_wire(wire, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError) as exc:
        return f"{len(wire)} bytes, not parsed ({_quote(str(exc))}): {wire[:48]!r}"
    records = "; ".join(
        _quote(rrset.to_text().replace("\n", "; ")) for rrset in reply.answer[:4]
    ) or "no answer"
    return (
        f"id {reply.id} {dns.rcode.to_text(reply.rcode())} "
        f"[{dns.flags.to_text(reply.flags)}] {records}"
    )


class _Exchange:
    """One query to one server over UDP and/or TCP; counts what it had to ignore."""

    def __init__(self, request: CheckRequest, question: Question) -> None:
        self.target = request.target
        self.endpoint = request.target.endpoint
        self.address = (str(request.target.rip), request.target.rport)
        self.transcript = request.transcript
        self.question = question
        self.receive = request.spec.receive
        self.regex = request.spec.regex
        # RD set, no EDNS: what ldirectord's Net::DNS sends.
        self.query = dns.message.make_query(question.name, question.rdtype, use_edns=False)
        self.wire = self.query.to_wire()
        self.ignored: list[str] = []
        self.over_tcp = False

    def _judge(self, wire: bytes, *, tcp: bool) -> Outcome:
        if self.transcript:
            self.transcript.received(describe_message(wire))
        outcome = judge_reply(self.query, self.question, wire, self.receive, self.regex,
                              self.endpoint, tcp=tcp)
        if isinstance(outcome, Ignored):
            self.ignored.append(outcome.why)
            if self.transcript:
                self.transcript.note(f"ignored: {outcome.why}")
        return outcome

    def _too_many(self) -> CheckResult:
        return CheckResult.failure(
            f"{len(self.ignored)} replies from {self.endpoint} were not for our query "
            f"(last: {self.ignored[-1]})"
        )

    def _sent(self, sends: int) -> None:
        if self.transcript:
            self.transcript.sent(
                f"query id {self.query.id} {self.question} (UDP to {self.endpoint}"
                + (f", retransmission {sends - 1}" if sends > 1 else "") + ")"
            )

    def _judge_datagram(self, wire: bytes) -> CheckResult | Truncated | None:
        outcome = self._judge(wire, tcp=False)
        return None if isinstance(outcome, Ignored) else outcome

    async def udp(self) -> CheckResult | Truncated:
        async with udp.udp_socket(self.target) as sock:
            outcome = await udp.exchange(sock, self.wire, self._judge_datagram, RETRANSMIT,
                                         max_datagrams=MAX_IGNORED, sent=self._sent)
        return self._too_many() if outcome is None else outcome

    async def tcp(self) -> CheckResult:
        self.over_tcp = True
        with trio.socket.socket(self.target.family, socket.SOCK_STREAM) as sock:
            await sock.connect(self.address)
            stream = trio.SocketStream(sock)
            if self.transcript:
                self.transcript.sent(
                    f"query id {self.query.id} {self.question} (TCP to {self.endpoint})"
                )
            await stream.send_all(struct.pack("!H", len(self.wire)) + self.wire)
            buffer = bytearray()
            while len(self.ignored) < MAX_IGNORED:
                header = await _read_exact(stream, buffer, 2)
                if header is None:
                    return self._closed(buffer)
                message = await _read_exact(stream, buffer, struct.unpack("!H", header)[0])
                if message is None:
                    return self._closed(buffer)
                outcome = self._judge(message, tcp=True)
                if isinstance(outcome, CheckResult):
                    return outcome
            return self._too_many()

    def _closed(self, partial: bytearray) -> CheckResult:
        if self.transcript:
            self.transcript.note(f"connection closed with {len(partial)} bytes pending")
        return CheckResult.failure(
            f"{self.endpoint} closed the TCP connection before a complete reply "
            f"({len(partial)} bytes of it)"
        )


async def _read_exact(stream: trio.SocketStream, buffer: bytearray, size: int) -> bytes | None:
    """`size` bytes from the stream (after what `buffer` holds); None at end of stream."""
    while len(buffer) < size:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buffer += chunk
    data = bytes(buffer[:size])
    del buffer[:size]
    return data


class DnsCheck:
    name = "dns"
    negotiate = True
    spec_keys = frozenset({"request", "receive", "regex"})
    required_spec_keys = MappingProxyType({"request": "the name or address to query"})
    description = (
        "DNS query for request (A/AAAA, or PTR for an address) over UDP with TCP fallback; "
        "up when an answer of that type matches receive"
    )
    options: MappingProxyType[str, OptionSpec] = MappingProxyType({
        "type": OptionSpec(
            default="A", help="record type asked for a name: A or AAAA (addresses: PTR)",
        ),
        "transport": OptionSpec(
            default="auto", choices=udp.TRANSPORTS,
            help="auto (UDP, TCP on truncation; TCP for protocol = \"tcp\"), udp or tcp",
        ),
    })

    async def check(self, request: CheckRequest) -> CheckResult:
        target = request.target
        if target.rport is None:
            return CheckResult.failure(f"no port to query on {target.rip}")
        try:
            use_tcp = udp.over_tcp(request)
        except CheckFailed as exc:
            return CheckResult.failure(exc.reason)
        try:
            question = build_question(request.spec.request,
                                      str(request.options.get("type", "A")))
        except DnsRequestError as exc:
            return CheckResult.failure(str(exc))
        exchange = _Exchange(request, question)

        async def ask() -> CheckResult:
            if request.spec.receive and request.spec.regex:
                matches("", request.spec.receive, True)  # an invalid regex fails at once
            if not use_tcp:
                outcome = await exchange.udp()
                if isinstance(outcome, CheckResult):
                    return outcome
                if request.transcript:
                    request.transcript.note("reply truncated (TC): asking again over TCP")
            return await exchange.tcp()

        def timed_out(budget: float) -> str:
            seen = f"; ignored {len(exchange.ignored)} (last: {exchange.ignored[-1]})" \
                if exchange.ignored else ""
            return f"no DNS reply for {question} from {exchange.endpoint} within " \
                f"{budget:.2f} s{seen}"

        return await run_within(
            request, ask, timed_out=timed_out,
            error=lambda exc: describe_error("DNS query to", exchange.endpoint, exc,
                                             udp=None if exchange.over_tcp else "DNS: "),
        )


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(DnsCheck())
