"""`radius`: an Access-Request for `login` / `password` with the shared `secret`.

As ldirectord (Authen::Radius) does: up only on an Access-Accept whose Response
Authenticator proves it came from a server that knows the secret; an Access-Reject is down
(the server is alive, but the test account no longer works, and that is what the check is
for). lbha adds what ldirectord lacked: a Message-Authenticator on the request and its
check on the reply (BlastRADIUS, CVE-2024-3596), retransmission of the same request within
the deadline (UDP loses packets), and replies that fail verification are ignored, as RFC
2865 wants, rather than believed.

The packet is built and verified with pyrad; the UDP exchange is the check kit's, on a trio
socket, so there is no thread and cancellation is immediate.
"""

from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass
from types import MappingProxyType

from pyrad.dictionary import Dictionary
from pyrad.packet import AccessAccept, AccessChallenge, AccessReject, AuthPacket, PacketError

from lbha import hookimpl
from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec
from lbha.checkkit import describe_error, quote, run_within, udp

#: The attributes we send or quote, so no dictionary file has to be installed.
DICTIONARY = """\
ATTRIBUTE User-Name 1 string
ATTRIBUTE User-Password 2 string encrypt=1
ATTRIBUTE NAS-IP-Address 4 ipaddr
ATTRIBUTE Reply-Message 18 string
ATTRIBUTE NAS-Identifier 32 string
ATTRIBUTE Message-Authenticator 80 octets
"""
REPLY_MESSAGE = 18
#: Largest RADIUS packet (RFC 2865 section 3).
MAX_PACKET = 4096
#: Datagrams one check reads at most; a flood of junk ends the check rather than the CPU.
MAX_DATAGRAMS = 100
#: Characters of a Reply-Message quoted in a reason.
QUOTE_LIMIT = 200
#: pyrad decodes attribute values while parsing; these are what a garbled packet raises.
_DECODE_ERRORS = (PacketError, struct.error, ValueError, IndexError, KeyError, TypeError,
                  UnicodeError)


@functools.cache
def radius_dictionary() -> Dictionary:
    return Dictionary(io.StringIO(DICTIONARY))


@dataclass(frozen=True)
class Judgement:
    """What one received datagram means: a verdict, or why it was ignored."""

    result: CheckResult | None
    note: str


def access_request(login: str, password: str, secret: bytes, nas_identifier: str) -> AuthPacket:
    """An Access-Request with a fresh id and Request Authenticator, signed."""
    packet = AuthPacket(secret=secret, dict=radius_dictionary())
    packet["User-Name"] = login
    packet["User-Password"] = packet.PwCrypt(password)
    packet["NAS-Identifier"] = nas_identifier
    packet.add_message_authenticator()
    return packet


def _reply_message(reply: AuthPacket) -> str:
    # Read the raw octets: pyrad's decoding of a string would fail on invalid UTF-8.
    raw = b"".join(v for v in dict.get(reply, REPLY_MESSAGE, ()) if isinstance(v, bytes))
    text = quote(raw.strip(), QUOTE_LIMIT, marks=False)
    return f": {text}" if text else ""


def judge_reply(request: AuthPacket, data: bytes, user: str) -> Judgement:
    """Judge one datagram received for `request`; never raises."""
    if len(data) < 20:
        return Judgement(None, f"ignored a {len(data)}-byte datagram (too short for RADIUS)")
    if data[1] != request.id:
        return Judgement(None, f"ignored a reply to another request (id {data[1]}, "
                               f"ours is {request.id})")
    try:
        reply = request.CreateReply(packet=data)
        verified = request.VerifyReply(reply, data)
    except _DECODE_ERRORS as exc:
        return Judgement(None, f"ignored a malformed reply ({exc})")
    if not verified:
        return Judgement(None, "ignored a reply whose authenticator does not verify "
                               "(wrong secret?)")
    if reply.code == AccessAccept:
        return Judgement(CheckResult.success(f"Access-Accept for {user}"), "Access-Accept")
    if reply.code == AccessReject:
        return Judgement(CheckResult.failure(f"Access-Reject for {user}{_reply_message(reply)}"),
                         "Access-Reject")
    if reply.code == AccessChallenge:
        return Judgement(CheckResult.failure(
            f"Access-Challenge for {user}: the server wants more than a password "
            f"(use a PAP test account){_reply_message(reply)}"), "Access-Challenge")
    return Judgement(None, f"ignored a reply with code {reply.code}, not an answer to "
                           "an Access-Request")


class RadiusCheck:
    name = "radius"
    negotiate = True
    spec_keys = frozenset({"login", "password", "secret"})
    required_spec_keys = MappingProxyType({
        "secret": "the shared secret the server knows this balancer by",
        "login": "the user name of the Access-Request",
    })
    description = "RADIUS Access-Request for login/password with secret; up on Access-Accept"
    options: MappingProxyType[str, OptionSpec] = MappingProxyType({
        "attempts": OptionSpec(type="int", default=3, minimum=1, maximum=10,
                               help="Access-Requests sent at most, evenly spread over the "
                                    "timeout (the same request: the server may answer any)"),
        "nas_identifier": OptionSpec(default="lbha",
                                     help="NAS-Identifier sent, for the server's logs and "
                                          "client matching"),
    })

    async def check(self, request: CheckRequest) -> CheckResult:
        target, spec = request.target, request.spec
        if target.rport is None:
            return CheckResult.failure(f"no port to send to on {target.rip}")
        if not spec.secret:
            return CheckResult.failure("radius check has no secret: set secret")
        if not spec.login:
            return CheckResult.failure("radius check has no login: set login and password")
        try:
            packet = access_request(spec.login, spec.password or "",
                                    spec.secret.encode(),
                                    str(request.options.get("nas_identifier", "lbha")))
        except ValueError as exc:  # a password over 128 octets, a name over 253
            return CheckResult.failure(f"cannot build the Access-Request: {exc}")
        attempts = int(request.options.get("attempts", 3))
        # The same request up to `attempts` times, evenly within the budget; after the last,
        # listen until the budget runs out.
        schedule = udp.backoff(request.own_budget / attempts, factor=1.0, sends=attempts)
        user, endpoint, transcript = spec.login, target.endpoint, request.transcript
        notes: list[str] = []
        sent = 0

        def note_sent(sends: int) -> None:
            nonlocal sent
            sent = sends
            if transcript:
                transcript.sent(f"Access-Request id={packet.id} User-Name={user} "
                                f"(attempt {sends} of {attempts})")

        def judge(data: bytes) -> CheckResult | None:
            judgement = judge_reply(packet, data, user)
            if transcript:
                transcript.received(judgement.note)
            notes.append(judgement.note)
            return judgement.result

        async def ask() -> CheckResult:
            async with udp.udp_socket(target) as sock:
                result = await udp.exchange(sock, packet.RequestPacket(), judge, schedule,
                                            max_datagrams=MAX_DATAGRAMS, sent=note_sent,
                                            size=MAX_PACKET)
            if result is None:
                return CheckResult.failure(f"{endpoint} sent {len(notes)} datagrams, none a "
                                           f"valid reply (last: {notes[-1]})")
            return result

        def timed_out(budget: float) -> str:
            # A server drops a request whose Message-Authenticator does not verify, and one
            # from an address it has no client entry for, without a word: say so.
            why = notes[-1] if notes else \
                "is this director a client of the server, with the same secret?"
            return (f"no valid reply from {endpoint} within {budget:.1f} s "
                    f"({sent} Access-Request{'s' if sent > 1 else ''} sent; {why})")

        return await run_within(
            request, ask, timed_out=timed_out,
            error=lambda exc: describe_error("RADIUS request to", endpoint, exc),
        )


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(RadiusCheck())
