"""`simpletcp`: send `request`, then read the answer line by line until one matches `receive`.

As ldirectord does: the two characters `\\n` in `request` become a line feed (nothing else is
translated; a TOML string can carry any byte itself), the connection is half-closed after
sending, and each received line is matched on its own, so a pattern cannot span lines. An
empty `receive` means up once the connection is made and the request sent. At most 64 KiB
are read.
"""

from __future__ import annotations

import functools
from types import MappingProxyType

from lbha import hookimpl
from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec
from lbha.checkkit import CheckFailed, Progress, matches, printable, quote
from lbha.checkkit.tcp import RECEIVE_SIZE, open_tcp, run_exchange

#: Bytes read before giving up on finding a matching line.
READ_LIMIT = 64 * 1024
#: Received lines shown by `lbha check -v`.
_TRANSCRIPT_LINES = 20


def request_bytes(request: str | None) -> bytes:
    """What is sent: `request` with each two-character `\\n` turned into a line feed."""
    return (request or "").replace("\\n", "\n").encode("utf-8")


def _line_text(line: bytes) -> bytes:
    """A line without its end (LF, or CR LF)."""
    if line.endswith(b"\n"):
        line = line[:-1]
    return line[:-1] if line.endswith(b"\r") else line


class SimpleTcpCheck:
    name = "simpletcp"
    negotiate = True
    spec_keys = frozenset({"request", "receive", "regex"})
    description = "send request, up when a line of the answer matches receive"
    options: MappingProxyType[str, OptionSpec] = MappingProxyType({})

    async def check(self, request: CheckRequest) -> CheckResult:
        target = request.target
        if target.rport is None:
            return CheckResult.failure(
                f"simpletcp needs a port: set the real server's port or check.port "
                f"({target.rip})")
        if target.protocol in ("udp", "ops"):
            return CheckResult.failure("simpletcp over UDP is not supported; use protocol tcp "
                                       "or an external check")
        progress = Progress(f"connect to {target.endpoint}")
        return await run_exchange(request, progress,
                                  functools.partial(self._exchange, request, progress))

    async def _exchange(self, request: CheckRequest, progress: Progress) -> CheckResult:
        target = request.target
        endpoint = target.endpoint
        spec = request.spec
        transcript = request.transcript
        receive = spec.receive or ""
        payload = request_bytes(spec.request)
        stream = await open_tcp(target, progress, transcript)
        async with stream:
            progress.step = f"sending the request to {endpoint}"
            if transcript:
                transcript.sent(f"{len(payload)} bytes: {printable(payload, 200)}")
            if payload:
                await stream.send_all(payload)
            await stream.send_eof()
            if not receive:
                return CheckResult.success(f"connected to {endpoint} and sent "
                                           f"{len(payload)} bytes (no receive to match)")
            progress.step = f"waiting for a line matching {quote(receive)} from {endpoint}"
            buf = bytearray()
            start = 0  # first byte of the line not yet matched
            lines = 0
            while True:
                data = await stream.receive_some(RECEIVE_SIZE)
                progress.received += len(data)
                buf += data
                end = len(buf) if not data else buf.rfind(b"\n") + 1
                for line in bytes(buf[start:end]).splitlines(keepends=True):
                    lines += 1
                    text = _line_text(line)
                    if transcript and lines <= _TRANSCRIPT_LINES:
                        transcript.received(printable(text, 200))
                    if matches(text, receive, spec.regex):
                        return CheckResult.success(f"line {lines} from {endpoint} matches "
                                                   f"{quote(receive)}: "
                                                   f"{quote(printable(text, 60), 60)}")
                start = max(start, end)
                if not data:
                    raise CheckFailed(f"{endpoint} closed the connection without a line "
                                      f"matching {quote(receive)} ({lines} lines, "
                                      f"{progress.received} bytes)")
                if len(buf) >= READ_LIMIT:
                    raise CheckFailed(f"no line matching {quote(receive)} in the first "
                                      f"{READ_LIMIT // 1024} KiB from {endpoint}")


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(SimpleTcpCheck())
