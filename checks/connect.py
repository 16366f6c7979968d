"""`connect`: the real server accepts a TCP connection on the check port."""

from __future__ import annotations

import errno
from types import MappingProxyType

import trio

from lbha import hookimpl
from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec


class ConnectCheck:
    name = "connect"
    negotiate = False
    description = "TCP connect to the real server's check port"
    options: MappingProxyType[str, OptionSpec] = MappingProxyType({})

    async def check(self, request: CheckRequest) -> CheckResult:
        target = request.target
        if target.rport is None:
            return CheckResult.failure(f"no port to connect to on {target.rip}")
        endpoint = target.endpoint
        if request.transcript:
            request.transcript.note(f"connecting to {endpoint}")
        try:
            stream = await trio.open_tcp_stream(str(target.rip), target.rport)
        except OSError as exc:
            code = getattr(exc, "errno", None)
            cause = exc.__cause__ if code is None else exc
            if code is None and isinstance(cause, OSError):
                code = cause.errno
            if code == errno.ECONNREFUSED:
                return CheckResult.failure(f"connect to {endpoint} refused")
            return CheckResult.failure(f"connect to {endpoint} failed: {exc}")
        await stream.aclose()
        return CheckResult.success(f"connected to {endpoint}")


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(ConnectCheck())
