"""TCP and TLS client plumbing shared by the negotiate checks that hold a conversation.

A check runs its exchange under `run_exchange`, which gives it a budget a little shorter than
the engine's deadline: when the budget runs out the check still reports *which step* the
server failed to finish ("waiting for the status line from 198.18.0.21:80 timed out after
4.9 s (0 bytes received)") instead of the engine's bare "timeout after 5.0 s". Failures found
on the way are raised as `CheckFailed` and become the reason.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import re
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from lbha.checkapi import CheckRequest, CheckResult, Target, Transcript
from lbha.checks.connect import describe_error

#: l_onoff=1, l_linger=0: close() resets the connection, so checks leave no TIME_WAIT
#: sockets on the director (as the connect check and HAProxy's checks do).
_LINGER_RESET = struct.pack("ii", 1, 0)
#: Bytes asked for per receive.
RECEIVE_SIZE = 65536
_OPENSSL_LOCATION = re.compile(r"\s*\(_ssl\.c:\d+\)$")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class CheckFailed(Exception):
    """The server failed the check; the message is the operator's reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Progress:
    """The step a check is in and what it has received, so a timeout can name the step."""

    __slots__ = ("received", "step")

    def __init__(self, step: str) -> None:
        self.step = step
        self.received = 0

    def timeout_reason(self, seconds: float) -> str:
        if self.step.startswith(("connect to", "TLS handshake")):
            return f"{self.step} timed out after {seconds:.3g} s"
        return f"{self.step} timed out after {seconds:.3g} s ({self.received} bytes received)"


async def run_exchange(
    request: CheckRequest, progress: Progress, exchange: Callable[[], Awaitable[CheckResult]],
) -> CheckResult:
    """Run `exchange` within the budget; CheckFailed, broken streams and timeouts are reasons."""
    seconds = request.own_budget
    transcript = request.transcript
    with trio.move_on_after(seconds):
        try:
            return await exchange()
        except CheckFailed as exc:
            reason = exc.reason
        except trio.BrokenResourceError as exc:
            reason = f"{progress.step} failed: {describe_broken(exc)}"
        if transcript:
            transcript.note(reason)
        return CheckResult.failure(reason)
    reason = progress.timeout_reason(seconds)
    if transcript:
        transcript.note(reason)
    return CheckResult.failure(reason)


def describe_broken(exc: BaseException) -> str:
    """What broke a trio stream: "connection reset", a TLS alert, ..."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return describe_tls_error(cause)
    if isinstance(cause, OSError) and cause.errno is not None:
        if cause.errno in (errno.ECONNRESET, errno.EPIPE):
            return "connection reset by the server"
        return os.strerror(cause.errno)
    return str(cause or exc) or type(exc).__name__


def describe_tls_error(exc: ssl.SSLError) -> str:
    """An OpenSSL error without its source location: "certificate verify failed: ..."."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "connection closed by the server"
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return _OPENSSL_LOCATION.sub("", text)


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
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
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


def quote(text: str, limit: int = 60) -> str:
    """A short, single-line rendering of operator text for a reason: 'OK'."""
    text = _UNPRINTABLE.sub("?", text)
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"'{text}'"


def printable(data: bytes | bytearray | memoryview, limit: int = 160) -> str:
    """Received bytes as bounded one-line text for a transcript or reason."""
    text = bytes(data[:limit]).decode("utf-8", "replace")
    text = _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)
    return text + ("..." if len(data) > limit else "")


@functools.lru_cache(maxsize=256)
def _pattern(receive: str) -> re.Pattern[bytes] | re.Pattern[str]:
    """`receive` as a bytes regex (Perl matched bytes too); str when bytes cannot express it."""
    try:
        return re.compile(receive.encode("utf-8"))
    except re.error:
        return re.compile(receive)


def matches(data: bytes, receive: str, regex: bool) -> bool:
    """`receive` found in `data`: a substring, or a regex search with `regex`."""
    if not regex:
        return receive.encode("utf-8") in data
    pattern = _pattern(receive)
    if isinstance(pattern.pattern, bytes):
        return pattern.search(data) is not None  # type: ignore[arg-type]
    return pattern.search(data.decode("utf-8", "replace")) is not None  # type: ignore[arg-type]
