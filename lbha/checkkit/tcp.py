"""The one TCP exchange of the check kit: connect, TLS, and a conversation under the deadline.

`run_exchange` is `run_within` for a conversation that tracks its step in a `Progress`: a
broken stream is "STEP failed: connection reset by the server", a timeout names the step.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from lbha.checkapi import CheckRequest, CheckResult, Target, Transcript
from lbha.checkkit.deadline import Progress, run_within
from lbha.checkkit.errors import CheckFailed, describe_broken, describe_error, describe_tls_error

#: l_onoff=1, l_linger=0: close() resets the connection, so checks leave no TIME_WAIT
#: sockets on the director (HAProxy closes its checks the same way).
LINGER_RESET = struct.pack("ii", 1, 0)
#: Bytes asked for per receive.
RECEIVE_SIZE = 65536


async def run_exchange(
    request: CheckRequest, progress: Progress, exchange: Callable[[], Awaitable[CheckResult]],
) -> CheckResult:
    """Run `exchange` within the budget; CheckFailed, broken streams and timeouts are reasons."""
    return await run_within(
        request, exchange, timed_out=progress.timeout_reason,
        error=lambda exc: f"{progress.step} failed: {describe_broken(exc)}",
    )


async def open_tcp(target: Target, progress: Progress,
                   transcript: Transcript | None) -> trio.SocketStream:
    """Connect to RIP:RPORT; raises CheckFailed with the connect check's reasons.

    A plain non-blocking connect (no address resolution: RIP is a literal) wrapped into a
    trio stream once connected. The socket is closed on every path that does not return it.
    """
    endpoint = target.endpoint
    progress.step = f"connect to {endpoint}"
    if transcript:
        transcript.note(f"TCP connect to {endpoint}")
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        code = sock.connect_ex((str(target.rip), target.rport))
        if code == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise CheckFailed(describe_error("connect to", endpoint,
                                             OSError(code, os.strerror(code))))
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    except BaseException:
        sock.close()
        raise


async def start_tls(stream: trio.SocketStream, context: ssl.SSLContext,
                    server_hostname: str | None, endpoint: str, progress: Progress,
                    transcript: Transcript | None) -> trio.SSLStream[trio.SocketStream]:
    """Complete a TLS handshake over `stream`; raises CheckFailed naming what went wrong.

    `https_compatible`: closing only closes the TCP stream (no close_notify to wait on) and a
    server that closes without close_notify is not an error, as for every HTTPS client.
    """
    progress.step = f"TLS handshake with {endpoint}"
    tls = trio.SSLStream(stream, context, server_hostname=server_hostname,
                         https_compatible=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        raise CheckFailed(f"TLS handshake with {endpoint} failed: {describe_broken(exc)}") \
            from exc
    if transcript:
        version = tls.version()
        cipher = tls.cipher()
        verified = "verified" if context.verify_mode == ssl.CERT_REQUIRED else "not verified"
        sni = server_hostname if server_hostname and not _is_ip(server_hostname) else None
        transcript.note(f"TLS {version} {cipher[0] if cipher else ''}, "
                        f"SNI {sni or '(none)'}, certificate {verified}")
    return tls


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


_contexts: dict[tuple[bool, str, int], ssl.SSLContext] = {}


def tls_context(verify: bool, ca_file: Path | None) -> ssl.SSLContext:
    """A client context, cached: unverified, or verified against `ca_file` / the system CAs.

    Keyed on the CA file's modification time, so a renewed CA file is read again.
    """
    verify = verify or ca_file is not None
    mtime = 0
    if verify and ca_file is not None:
        try:
            mtime = ca_file.stat().st_mtime_ns
        except OSError as exc:
            raise CheckFailed(f"cannot read ca_file {ca_file}: {exc.strerror}") from exc
    key = (verify, str(ca_file) if verify and ca_file else "", mtime)
    context = _contexts.get(key)
    if context is None:
        try:
            context = ssl.create_default_context(
                cafile=str(ca_file) if verify and ca_file else None)
        except ssl.SSLError as exc:
            raise CheckFailed(f"ca_file {ca_file} holds no usable CA certificate: "
                              f"{describe_tls_error(exc)}") from exc
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if len(_contexts) > 64:
            _contexts.clear()
        _contexts[key] = context
    return context
