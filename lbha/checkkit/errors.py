"""Failures a check raises on its way, and the one describer of network errors for operators."""

from __future__ import annotations

import errno
import os
import re
import ssl
from types import MappingProxyType

_REASONS: MappingProxyType[int, str] = MappingProxyType({
    errno.ECONNREFUSED: "refused",
    errno.ECONNRESET: "reset",
    errno.EHOSTUNREACH: "failed: host unreachable",
    errno.ENETUNREACH: "failed: network unreachable",
    errno.ETIMEDOUT: "timed out in the kernel",
    errno.EADDRNOTAVAIL: "failed: no local address to send from",
    errno.EACCES: "prohibited by a local route or firewall rule",
    errno.EPERM: "blocked by a local firewall rule",
    errno.EPROTO: "failed: protocol error (ICMP parameter problem)",
})
_OPENSSL_LOCATION = re.compile(r"\s*\(_ssl\.c:\d+\)$")


class CheckFailed(Exception):
    """The server failed the check; the message is the operator's reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe_error(action: str, endpoint: str, exc: BaseException, *,
                   udp: str | None = None) -> str:
    """An operator's reason for a socket error: "connect to 198.18.0.21:443 refused".

    `exc` is an OSError or a broken trio stream (whose cause says what broke). `udp`: the
    socket is a connected UDP socket, on which ECONNREFUSED is an ICMP port unreachable; the
    text is the prefix of that reason ("DNS: " gives "DNS: UDP port ... unreachable").
    """
    if not isinstance(exc, OSError):
        return f"{action} {endpoint} failed: {describe_broken(exc)}"
    code = exc.errno
    if udp is not None and code == errno.ECONNREFUSED:
        return f"{udp}UDP port {endpoint} unreachable (ICMP port unreachable)"
    if code in _REASONS:
        return f"{action} {endpoint} {_REASONS[code]}"
    detail = os.strerror(code) if code is not None else str(exc)
    return f"{action} {endpoint} failed: {detail}"


def describe_broken(exc: BaseException) -> str:
    """What broke a trio stream: "connection reset by the server", a TLS alert, ..."""
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
