"""`ping`: the real server answers an ICMP (IPv4) or ICMPv6 echo request.

An unprivileged datagram ICMP socket is used where the kernel allows it (the daemon's group
is in `net.ipv4.ping_group_range`, which governs IPv6 too); otherwise a raw socket, which
needs CAP_NET_RAW. With a datagram socket the kernel picks the identifier and only hands us
replies carrying it; a raw socket sees every ICMP packet the host receives, so the parser
below matches identifier, sequence and sender and ignores the rest.
"""

from __future__ import annotations

import errno
import ipaddress
import random
import socket
import struct
from collections.abc import Container
from dataclasses import dataclass
from types import MappingProxyType

import trio

from lbha import hookimpl
from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec, Target

#: Values of the `socket` option.
SOCKET_MODES: frozenset[str] = frozenset({"auto", "dgram", "raw"})

# Linux values; the socket module does not export them.
_IP_RECVERR = 11
_IPV6_RECVERR = 25

#: Same payload size as ping(8): 56 data bytes, 64 with the ICMP header.
PAYLOAD = b"lbha echo request".ljust(56, b".")


@dataclass(frozen=True)
class _Icmp:
    echo_request: int
    echo_reply: int
    unreachable: int
    time_exceeded: int
    unreachable_codes: MappingProxyType[int, str]
    time_exceeded_codes: MappingProxyType[int, str]


_ICMP4 = _Icmp(
    echo_request=8, echo_reply=0, unreachable=3, time_exceeded=11,
    unreachable_codes=MappingProxyType({
        0: "network unreachable", 1: "host unreachable", 2: "protocol unreachable",
        3: "port unreachable", 4: "fragmentation needed", 5: "source route failed",
        6: "destination network unknown", 7: "destination host unknown",
        8: "source host isolated", 9: "network administratively prohibited",
        10: "host administratively prohibited", 11: "network unreachable for TOS",
        12: "host unreachable for TOS", 13: "communication administratively prohibited",
        14: "host precedence violation", 15: "precedence cutoff in effect",
    }),
    time_exceeded_codes=MappingProxyType({
        0: "TTL exceeded in transit", 1: "fragment reassembly time exceeded",
    }),
)
_ICMP6 = _Icmp(
    echo_request=128, echo_reply=129, unreachable=1, time_exceeded=3,
    unreachable_codes=MappingProxyType({
        0: "no route to destination", 1: "communication administratively prohibited",
        2: "beyond scope of source address", 3: "address unreachable", 4: "port unreachable",
        5: "source address failed ingress/egress policy", 6: "reject route to destination",
    }),
    time_exceeded_codes=MappingProxyType({
        0: "hop limit exceeded in transit", 1: "fragment reassembly time exceeded",
    }),
)
_IPV6_HEADER = 40
_NEXT_HEADER_ICMPV6 = 58
_PROTO_ICMP = 1


@dataclass(frozen=True)
class Verdict:
    """What one received ICMP packet says about our echo request."""

    up: bool
    reason: str


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(version: int, ident: int, sequence: int, payload: bytes = PAYLOAD) -> bytes:
    """An echo request. ICMPv6 checksums cover a pseudo-header, so the kernel fills them."""
    icmp = _ICMP4 if version == 4 else _ICMP6
    header = struct.pack("!BBHHH", icmp.echo_request, 0, 0, ident, sequence)
    if version == 6:
        return header + payload
    return struct.pack(
        "!BBHHH", icmp.echo_request, 0, checksum(header + payload), ident, sequence
    ) + payload


def _strip_ipv4_header(packet: bytes, protocol: int) -> bytes | None:
    """The payload of an IPv4 packet carrying `protocol`, or None if it is not one."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != protocol:
        return None
    length = (packet[0] & 0x0F) * 4
    if length < 20 or len(packet) < length:
        return None
    return packet[length:]


def _quotes_our_request(
    quoted: bytes, version: int, ident: int, sequences: Container[int]
) -> bool:
    """True when an ICMP error quotes one of our echo requests (RFC 792/4443 quote it)."""
    icmp = _ICMP4 if version == 4 else _ICMP6
    if version == 4:
        inner = _strip_ipv4_header(quoted, _PROTO_ICMP)
    elif len(quoted) >= _IPV6_HEADER and quoted[6] == _NEXT_HEADER_ICMPV6:
        inner = quoted[_IPV6_HEADER:]
    else:
        inner = None
    if inner is None or len(inner) < 8 or inner[0] != icmp.echo_request:
        return False
    quoted_ident, quoted_sequence = struct.unpack("!HH", inner[4:8])
    return quoted_ident == ident and quoted_sequence in sequences


def parse_reply(
    packet: bytes, *, version: int, ip_header: bool, ident: int, sequences: Container[int]
) -> Verdict | None:
    """Judge one received packet; None when it is not about our echo requests.

    `ip_header` is true for raw IPv4 sockets, which deliver the IP header too. Never raises,
    whatever the bytes: packets come from the network.
    """
    icmp = _ICMP4 if version == 4 else _ICMP6
    if ip_header:
        stripped = _strip_ipv4_header(packet, _PROTO_ICMP)
        if stripped is None:
            return None
        packet = stripped
    if len(packet) < 8:
        return None
    kind, code = packet[0], packet[1]
    if kind == icmp.echo_reply:
        # A raw socket may see a corrupt packet before the kernel's ICMP code drops it.
        if version == 4 and checksum(packet) != 0:
            return None
        reply_ident, reply_sequence = struct.unpack("!HH", packet[4:8])
        if reply_ident == ident and reply_sequence in sequences:
            return Verdict(True, "echo reply")
        return None
    if kind == icmp.unreachable:
        table, fallback = icmp.unreachable_codes, "destination unreachable"
    elif kind == icmp.time_exceeded:
        table, fallback = icmp.time_exceeded_codes, "time exceeded"
    else:
        return None
    if not _quotes_our_request(packet[8:], version, ident, sequences):
        return None
    return Verdict(False, table.get(code, f"{fallback} (code {code})"))


def _error_text(exc: OSError) -> str:
    if exc.errno == errno.EPERM:
        return "blocked by a local firewall rule"
    if exc.errno == errno.EACCES:
        return "prohibited by a local route or firewall rule"
    if exc.errno == errno.EHOSTUNREACH:
        return "host unreachable"
    if exc.errno == errno.ENETUNREACH:
        return "network unreachable"
    return exc.strerror or str(exc)


def _open_socket(version: int, mode: str) -> tuple[trio.socket.SocketType, bool]:
    """An ICMP socket and whether it is raw; raises OSError with a readable message."""
    family, proto = (
        (socket.AF_INET, socket.IPPROTO_ICMP) if version == 4
        else (socket.AF_INET6, socket.IPPROTO_ICMPV6)
    )
    if mode != "raw":
        try:
            sock = trio.socket.socket(family, socket.SOCK_DGRAM, proto)
        except OSError as exc:
            # EACCES: our group is outside ping_group_range; EPROTONOSUPPORT: old kernel.
            if mode == "dgram":
                raise OSError(exc.errno, "datagram ICMP socket not allowed "
                              f"({exc.strerror}; see net.ipv4.ping_group_range)") from exc
        else:
            # Without RECVERR a connected ping socket ignores "host unreachable" (not
            # fatal in RFC 1122 terms); with it the error comes back from recv().
            if version == 4:
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
            return sock, False
    try:
        return trio.socket.socket(family, socket.SOCK_RAW, proto), True
    except OSError as exc:
        raise OSError(exc.errno, f"raw ICMP socket not allowed ({exc.strerror}; "
                      "needs CAP_NET_RAW or net.ipv4.ping_group_range)") from exc


def _same_host(sender: str, target: Target) -> bool:
    try:
        # recvfrom names IPv6 link-local senders with a "%zone" suffix.
        return ipaddress.ip_address(sender.partition("%")[0]) == target.rip
    except ValueError:
        return False


class PingCheck:
    name = "ping"
    negotiate = False
    spec_keys: frozenset[str] = frozenset()
    description = "ICMP / ICMPv6 echo request to the real server"
    options: MappingProxyType[str, OptionSpec] = MappingProxyType({
        "count": OptionSpec(
            type="int", default=1, minimum=1,
            help="echo requests sent within the deadline; the first reply means up",
        ),
        "socket": OptionSpec(
            default="auto", choices=("auto", "dgram", "raw"),
            help="auto (datagram ICMP socket if allowed, else raw), dgram or raw",
        ),
    })

    async def check(self, request: CheckRequest) -> CheckResult:
        count = request.options.get("count", 1)
        mode = request.options.get("socket", "auto")
        if not isinstance(count, int) or count < 1:
            return CheckResult.failure(f"ping option count must be 1 or more, got {count!r}")
        if mode not in SOCKET_MODES:
            return CheckResult.failure(
                f"ping option socket must be one of {', '.join(sorted(SOCKET_MODES))}, "
                f"got {mode!r}"
            )
        target = request.target
        try:
            sock, raw = _open_socket(target.rip.version, mode)
        except OSError as exc:
            return CheckResult.failure(f"cannot ping {target.rip}: {exc.strerror}")
        with sock:
            return await _ping(sock, raw, target, count, request)


async def _ping(
    sock: trio.socket.SocketType, raw: bool, target: Target, count: int, request: CheckRequest
) -> CheckResult:
    """Run the exchange; a local or ICMP-reported error ends it with a reason."""
    try:
        return await _exchange(sock, raw, target, count, request)
    except OSError as exc:
        reason = f"ping {target.rip}: {_error_text(exc)}"
        if request.transcript:
            request.transcript.note(reason)
        return CheckResult.failure(reason)


async def _exchange(
    sock: trio.socket.SocketType, raw: bool, target: Target, count: int, request: CheckRequest
) -> CheckResult:
    version, rip = target.rip.version, str(target.rip)
    transcript = request.transcript
    address = (rip, 0)
    if raw:
        # Raw sockets are not connected: a connected one would drop the ICMP errors that
        # routers (not the target) send about our request.
        ident = random.getrandbits(16)
    else:
        await sock.connect(address)
        # The kernel owns the identifier of a datagram ICMP socket (its "port").
        ident = sock.getsockname()[1]
    if transcript:
        kind = "raw" if raw else "datagram"
        transcript.note(f"{kind} {'ICMP' if version == 4 else 'ICMPv6'} socket, id {ident}")
    wait = request.own_budget / count
    for sequence in range(1, count + 1):
        packet = echo_request(version, ident, sequence)
        if transcript:
            transcript.sent(f"echo request to {rip} id {ident} seq {sequence}, "
                            f"{len(packet)} bytes")
        await sock.sendto(packet, address)
        with trio.move_on_after(wait):
            while True:
                data, sender = await sock.recvfrom(2048)
                verdict = parse_reply(
                    data, version=version, ip_header=raw and version == 4,
                    ident=ident, sequences=range(1, sequence + 1),
                )
                if verdict is None or (verdict.up and not _same_host(sender[0], target)):
                    continue
                if transcript:
                    transcript.received(f"{verdict.reason} from {sender[0]}")
                if verdict.up:
                    return CheckResult.success(f"echo reply from {rip}")
                return CheckResult.failure(
                    f"ping {rip}: {verdict.reason} (ICMP from {sender[0]})"
                )
    noun = "request" if count == 1 else "requests"
    return CheckResult.failure(
        f"no echo reply from {rip} to {count} {noun} in {wait * count:.3g} s"
    )


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(PingCheck())
