"""`connect`: the real server accepts a TCP connection on the check port.

For UDP services a connected UDP socket sends one empty datagram and listens briefly: an ICMP
port unreachable (ECONNREFUSED on the socket) means down; a reply or silence means up. Silence
cannot prove that a UDP service is alive, only that nothing said it is dead (docs/checks.md).
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Sequence
from types import MappingProxyType

import trio

from lbha import hookimpl
from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec, Target
from lbha.checkkit import describe_error
from lbha.checkkit.tcp import LINGER_RESET

#: Protocols probed with UDP; everything else (tcp, tcp+udp, fwmark) gets a TCP connect.
UDP_PROTOCOLS: frozenset[str] = frozenset({"udp", "ops"})

class ConnectCheck:
    name = "connect"
    negotiate = False
    spec_keys: frozenset[str] = frozenset()
    description = (
        "TCP connect to the real server's check port; UDP services: empty datagram, "
        "down on ICMP port unreachable"
    )
    options: MappingProxyType[str, OptionSpec] = MappingProxyType({
        "udp_wait": OptionSpec(
            type="duration", default=1.0,
            help="UDP only: how long to listen for a port unreachable (capped at half the "
                 "timeout)",
        ),
    })

    async def check(self, request: CheckRequest) -> CheckResult:
        target = request.target
        if target.rport is None:
            return CheckResult.failure(f"no port to connect to on {target.rip}")
        if target.protocol in UDP_PROTOCOLS:
            # Half the deadline at most, so our own verdict arrives before the engine's.
            wait = min(float(request.options.get("udp_wait", 1.0)), request.timeout / 2)
            return await udp_probe(target, wait, request)
        return await tcp_connect(target, request)

    async def check_batch(self, requests: Sequence[CheckRequest]) -> list[CheckResult]:
        """Many connects at once: TCP ones share one epoll set and one trio wake-up."""
        results: list[CheckResult | None] = [None] * len(requests)
        tcp = []
        async with trio.open_nursery() as nursery:
            for index, request in enumerate(requests):
                if request.target.protocol in UDP_PROTOCOLS or request.target.rport is None:
                    nursery.start_soon(_one, self, request, results, index)
                else:
                    tcp.append(index)
            await _tcp_batch(requests, tcp, results)
        return [r if r is not None else CheckResult.failure("not checked") for r in results]


async def _one(check: ConnectCheck, request: CheckRequest, results: list[CheckResult | None],
               index: int) -> None:
    results[index] = await check.check(request)


async def _tcp_batch(requests: Sequence[CheckRequest], indexes: list[int],
                     results: list[CheckResult | None]) -> None:
    """Connect to every target at once; the caller's deadline bounds the wait."""
    pending: dict[int, tuple[int, socket.socket]] = {}
    epoll = select.epoll()
    try:
        for index in indexes:
            target = requests[index].target
            # Non-blocking from birth: one system call fewer per check than setblocking().
            sock = socket.socket(target.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            code = sock.connect_ex((target.host, target.rport))
            if code == errno.EINPROGRESS:
                pending[sock.fileno()] = (index, sock)
                epoll.register(sock.fileno(), select.EPOLLOUT)
            else:
                results[index] = _verdict(target, sock, code)
        # Our own budget, so the servers that did answer keep their verdicts.
        seconds = min((requests[i].own_budget for i in indexes), default=0.0)
        with trio.move_on_after(seconds):
            ready = epoll.poll(0) if pending else []
            while pending:
                # Loopback and near peers often finish the handshake inside connect(): look
                # before sleeping, so such a batch needs no second wake-up.
                if not ready:
                    await trio.lowlevel.wait_readable(epoll.fileno())
                    ready = epoll.poll(0)
                for fd, events in ready:
                    # Closing the socket (in _verdict) takes it out of the epoll set.
                    index, sock = pending.pop(fd)
                    # Writable without an error flag means connected: no SO_ERROR to ask.
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) \
                        if events & (select.EPOLLERR | select.EPOLLHUP) else 0
                    results[index] = _verdict(requests[index].target, sock, code)
                ready = []
        for index, _sock in pending.values():
            results[index] = CheckResult.failure(f"timeout after {seconds:.1f} s")
        await trio.lowlevel.checkpoint()
    finally:
        for _index, sock in pending.values():
            sock.close()
        epoll.close()


def _verdict(target: Target, sock: socket.socket, code: int) -> CheckResult:
    """Judge a finished connect and close the socket (with RST when it connected)."""
    try:
        if code:
            return CheckResult.failure(
                describe_error("connect to", target.endpoint, OSError(code, os.strerror(code))))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        return CheckResult.success(f"connected to {target.endpoint}")
    finally:
        sock.close()


async def tcp_connect(target: Target, request: CheckRequest) -> CheckResult:
    """Open and at once reset a TCP connection to the target.

    A plain non-blocking socket and trio's wait_writable, not a trio socket: the engine runs
    thousands of these a second and the wrapper's address resolution is pure overhead for a
    literal IP address.
    """
    endpoint = target.endpoint
    transcript = request.transcript
    if transcript:
        transcript.note(f"TCP connect to {endpoint}")
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        code = sock.connect_ex((target.host, target.rport))
        if code == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            await trio.lowlevel.checkpoint()
        if code:
            reason = describe_error("connect to", endpoint, OSError(code, os.strerror(code)))
            if transcript:
                transcript.note(reason)
            return CheckResult.failure(reason)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    finally:
        sock.close()
    if transcript:
        transcript.note("connected; closed with RST")
    return CheckResult.success(f"connected to {endpoint}")


async def udp_probe(target: Target, wait: float, request: CheckRequest) -> CheckResult:
    """Send one empty datagram and listen `wait` seconds for a reply or an ICMP error."""
    endpoint = target.endpoint
    transcript = request.transcript
    with trio.socket.socket(target.family, socket.SOCK_DGRAM) as sock:
        try:
            # A connected UDP socket is what turns a later ICMP error into ECONNREFUSED.
            await sock.connect((str(target.rip), target.rport))
            if transcript:
                transcript.sent(f"empty UDP datagram to {endpoint}")
            await sock.send(b"")
            with trio.move_on_after(wait):
                data = await sock.recv(512)
                if transcript:
                    transcript.received(f"{len(data)} bytes: {data[:64]!r}")
                return CheckResult.success(f"UDP reply from {endpoint}")
        except OSError as exc:
            reason = describe_error("UDP probe of", endpoint, exc, udp="")
            if transcript:
                transcript.note(reason)
            return CheckResult.failure(reason)
    if transcript:
        transcript.note(f"no reply and no ICMP error within {wait:g} s")
    return CheckResult.success(
        f"UDP {endpoint}: no port unreachable within {wait:g} s (silence, not proof of life)"
    )


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(ConnectCheck())
