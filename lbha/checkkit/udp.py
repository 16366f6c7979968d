"""The one UDP request/retransmit exchange of the check kit (DNS, SIP and RADIUS use it).

UDP loses datagrams, so a request is sent again on a schedule until a datagram judged to
be the answer arrives. The schedule is the protocol's (DNS: 1 s doubling; SIP: RFC 3261
timer E; RADIUS: evenly spread attempts). Everything else is the same for all: a connected
socket (the kernel drops other senders and reports ICMP port unreachable as ECONNREFUSED,
which `describe_error(..., udp=...)` words), every datagram judged, datagrams that are not
the answer ignored up to a bound, the caller's deadline (`run_within`) around it all.
"""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from lbha.checkapi import CheckRequest, Target
from lbha.checkkit.errors import CheckFailed

R = TypeVar("R")
#: Option `transport` of a protocol spoken over UDP or TCP (DNS, SIP): "auto" is TCP for a
#: TCP virtual service, else UDP.
TRANSPORTS: tuple[str, ...] = ("auto", "udp", "tcp")
#: Seconds from the n-th send (1-based) to the next; math.inf sends no more.
Schedule = Callable[[int], float]
#: Largest datagram read.
MAX_DATAGRAM = 65535


def backoff(first: float, *, factor: float = 2.0, cap: float = math.inf,
            sends: int | None = None) -> Schedule:
    """`first`, then `factor` times longer each time up to `cap`; at most `sends` sends."""
    def schedule(sent: int) -> float:
        if sends is not None and sent >= sends:
            return math.inf
        return min(first * factor ** (sent - 1), cap)
    return schedule


def over_tcp(request: CheckRequest) -> bool:
    """Whether option `transport` (TRANSPORTS) says TCP; CheckFailed for another value."""
    transport = str(request.options.get("transport", "auto")).lower()
    if transport not in TRANSPORTS:
        raise CheckFailed(f"option transport = {transport!r}: expected auto, udp or tcp")
    return transport == "tcp" or (transport == "auto" and request.target.protocol == "tcp")


@asynccontextmanager
async def udp_socket(target: Target) -> AsyncIterator[trio.socket.SocketType]:
    """A UDP socket connected to the target's check port, closed on every path."""
    with trio.socket.socket(target.family, socket.SOCK_DGRAM) as sock:
        await sock.connect((target.host, target.rport))
        yield sock


async def exchange(
    sock: trio.socket.SocketType, message: bytes, judge: Callable[[bytes], R | None],
    schedule: Schedule, *, max_datagrams: int, sent: Callable[[int], None] | None = None,
    size: int = MAX_DATAGRAM,
) -> R | None:
    """Send `message` on `schedule` until `judge` returns a verdict for a datagram.

    `judge` returns None for a datagram to ignore; `sent(n)` is told of the n-th send (for
    the transcript). None after `max_datagrams` ignored datagrams. The caller bounds the time.
    """
    sends = 0
    send_at = trio.current_time()
    received = 0
    while received < max_datagrams:
        if trio.current_time() >= send_at:
            sends += 1
            if sent is not None:
                sent(sends)
            await sock.send(message)
            send_at = trio.current_time() + schedule(sends)
        with trio.move_on_at(send_at):
            while received < max_datagrams:
                data = await sock.recv(size)
                received += 1
                verdict = judge(data)
                if verdict is not None:
                    return verdict
    return None
