"""The one line-protocol session of the check kit (ftp, smtp, imap, pop, nntp use it).

A `LineSession` is one TCP connection (optionally TLS, implicit or upgraded) with a bounded
line reader, a transcript and the step the check is in. `run_session()` runs a check's
dialogue under a deadline slightly shorter than the engine's, so that a stalled server gets
a reason naming the step it stalled in ("timed out after 0.45 s waiting for the reply to
EHLO") rather than the engine's bare timeout, and closes the connection on every path.

Failures inside a dialogue raise `CheckFailed`; socket errors are turned into reasons here.
A server that answers something that is not the protocol at all raises `NotTheProtocol`:
it gets no goodbye (QUIT, LOGOUT) and no wait for one, its connection is closed at once.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Awaitable, Callable

import trio

from lbha.checkapi import CheckRequest, CheckResult, Transcript
from lbha.checkkit.deadline import run_within
from lbha.checkkit.errors import CheckFailed, describe_broken, describe_error
from lbha.checkkit.tcp import tls_context
from lbha.checkkit.text import quote

#: Longest line accepted from a server; a longer one is garbage or an attack.
MAX_LINE = 4096
#: Most lines in one multi-line reply (EHLO capabilities, CAPA, IMAP untagged data).
MAX_LINES = 100
#: Longest wait for the goodbye (QUIT, LOGOUT) once the verdict is known, and its share
#: of the deadline: a server that ignores QUIT must not hold a verdict back for long.
CLOSE_WAIT = 1.0
CLOSE_SHARE = 0.2
#: Longest quoted server text in a reason.
QUOTE_LIMIT = 200

_REPLY = re.compile(r"(\d{3})([ -]|$)")


class NotTheProtocol(CheckFailed):
    """The server does not speak the protocol (garbage, an endless line): no goodbye."""


class LineSession:
    """One connection to the real server, read line by line with hard limits."""

    def __init__(self, request: CheckRequest, protocol: str) -> None:
        self.request = request
        self.protocol = protocol
        self.endpoint = request.target.endpoint
        self.transcript: Transcript | None = request.transcript
        #: What the dialogue is waiting for; named in the reason when the deadline hits.
        self.step = "connecting"
        self.stream: trio.abc.Stream | None = None
        self._buffer = bytearray()
        self._streams: list[trio.abc.Stream] = []

    # ------------------------------------------------------------------ transcript

    def note(self, text: str) -> None:
        if self.transcript:
            self.transcript.note(text)

    # ------------------------------------------------------------------ connection

    async def connect(self, port: int | None = None) -> trio.SocketStream:
        """Open a TCP connection to the real server (another port for FTP data)."""
        target = self.request.target
        port = target.rport if port is None else port
        sock = trio.socket.socket(target.family, socket.SOCK_STREAM)
        endpoint = f"[{target.rip}]:{port}" if target.family == socket.AF_INET6 \
            else f"{target.rip}:{port}"
        try:
            await sock.connect((str(target.rip), port))
        except OSError as exc:
            sock.close()
            raise CheckFailed(describe_error("connect to", endpoint, exc)) from None
        except BaseException:
            sock.close()
            raise
        stream = trio.SocketStream(sock)
        self._streams.append(stream)
        return stream

    async def open(self, *, implicit_tls: bool = False) -> None:
        """Connect the control connection; TLS at once for the implicit-TLS variants."""
        self.step = "connecting"
        self.note(f"TCP connect to {self.endpoint}")
        self.stream = await self.connect()
        if implicit_tls:
            await self.start_tls()

    async def start_tls(self) -> None:
        """TLS handshake on the control connection (implicit TLS, or after STARTTLS/STLS)."""
        assert self.stream is not None
        spec = self.request.spec
        self.step = "in the TLS handshake"
        hostname = spec.virtualhost or str(self.request.target.rip)
        tls = trio.SSLStream(
            self.stream, tls_context(spec.verify_tls, spec.ca_file),
            server_hostname=hostname if spec.verify_tls or spec.virtualhost else None,
        )
        self._streams.append(tls)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            raise CheckFailed(f"TLS handshake with {self.endpoint} failed: "
                              f"{describe_broken(exc)}") from None
        self.stream = tls
        self._buffer.clear()  # nothing sent in clear text before the handshake counts
        self.note(f"TLS {tls.cipher()[1]} {tls.cipher()[0]} established")

    async def aclose(self) -> None:
        """Close every stream opened, at once (no waiting for a peer that may be hostile)."""
        for stream in reversed(self._streams):
            await trio.aclose_forcefully(stream)
        self._streams.clear()

    # ------------------------------------------------------------------ I/O

    async def send(self, line: str, *, shown: str | None = None, tagged: bool = False) -> None:
        """Send one command line (CRLF added); `shown` is what the transcript records.

        `tagged`: the line starts with an IMAP tag, so the command is its second word.
        """
        assert self.stream is not None
        if self.transcript:
            self.transcript.sent(line if shown is None else shown)
        words = line.split(" ", 2)
        what = words[1] if tagged and len(words) > 1 else words[0]
        self.step = f"sending {what}"
        try:
            await self.stream.send_all(line.encode("utf-8") + b"\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise CheckFailed(
                f"{self.protocol} server {self.endpoint} closed the connection while we sent "
                f"{what}"
            ) from None
        self.step = f"waiting for the reply to {what}"

    def expect(self, what: str) -> None:
        """Name what the next reads wait for ("the greeting"), for timeout reasons."""
        self.step = f"waiting for {what}"

    async def readline(self) -> str:
        """One line without its line end; at most MAX_LINE bytes, EOF before it is a failure."""
        stream = self.stream
        assert stream is not None
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                raw = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                line = raw.rstrip(b"\r").decode("utf-8", "replace")
                if self.transcript:
                    self.transcript.received(quote(line, QUOTE_LIMIT, marks=False))
                return line
            if len(self._buffer) > MAX_LINE:
                raise NotTheProtocol(
                    f"{self.protocol} server {self.endpoint} sent a line longer than "
                    f"{MAX_LINE} bytes while {self.step}: "
                    f"{quote(bytes(self._buffer))}"
                )
            try:
                data = await stream.receive_some(MAX_LINE)
            except trio.BrokenResourceError as exc:
                raise CheckFailed(
                    f"{self.protocol} connection to {self.endpoint} broke while {self.step}: "
                    f"{describe_broken(exc)}"
                ) from None
            if not data:
                got = f" after {quote(bytes(self._buffer), QUOTE_LIMIT)}" if self._buffer else ""
                raise CheckFailed(
                    f"{self.protocol} server {self.endpoint} closed the connection while "
                    f"{self.step}{got}"
                )
            self._buffer += data

    async def reply(self) -> tuple[int, str]:
        """A numeric reply (SMTP, FTP, NNTP): its code and text, multi-line replies joined.

        A first line that is not `NNN text` is garbage; a multi-line reply (`NNN-`) ends at
        the line starting `NNN `, after at most MAX_LINES lines.
        """
        line = await self.readline()
        match = _REPLY.match(line)
        if match is None:
            raise NotTheProtocol(
                f"{self.protocol} server {self.endpoint} answered {quote(line, QUOTE_LIMIT)} while "
                f"{self.step}, which is not a valid {self.protocol} reply"
            )
        code = match.group(1)
        lines = [line[4:]]
        if match.group(2) == "-":
            for _ in range(MAX_LINES):
                line = await self.readline()
                if line.startswith(code + " ") or line == code:
                    lines.append(line[4:])
                    break
                lines.append(line[4:] if line.startswith(code + "-") else line)
            else:
                raise NotTheProtocol(
                    f"{self.protocol} server {self.endpoint} sent more than {MAX_LINES} lines "
                    f"while {self.step}"
                )
        return int(code), "\n".join(lines)

    def pending(self) -> bytes:
        """Bytes received but not yet returned as a line (for timeout reasons)."""
        return bytes(self._buffer)


Dialogue = Callable[[LineSession], Awaitable[str]]


async def run_session(
    request: CheckRequest, protocol: str, dialogue: Dialogue, *, implicit_tls: bool = False,
    closing: Callable[[LineSession], Awaitable[None]] | None = None,
) -> CheckResult:
    """Open a session, run `dialogue` (returns the success reason) under the deadline.

    `closing` (QUIT, LOGOUT) runs after the dialogue, success or failure, best effort and
    within the same deadline, unless the server did not speak the protocol (NotTheProtocol):
    waiting for its answer to QUIT would only hold the verdict back. The connection is
    closed on every path, cancellation included.
    """
    if request.target.rport is None:
        return CheckResult.failure(f"no port to check {protocol} on {request.target.rip}")
    session = LineSession(request, protocol)

    async def converse() -> CheckResult:
        polite = True
        try:
            await session.open(implicit_tls=implicit_tls)
            result = CheckResult.success(await dialogue(session))
        except CheckFailed as failed:
            result = CheckResult.failure(failed.reason)
            polite = not isinstance(failed, NotTheProtocol)
        if closing is not None and session.stream is not None and polite:
            # Bounded by the budget too: a verdict reached before it stands even when the
            # goodbye does not finish.
            wait = min(CLOSE_WAIT, request.timeout * CLOSE_SHARE)
            with trio.move_on_at(min(trio.current_time() + wait,
                                     trio.current_effective_deadline())):
                try:
                    await closing(session)
                except CheckFailed as failed:
                    session.note(f"closing: {failed.reason}")
        return result

    def timed_out(budget: float) -> str:
        pending = session.pending()
        got = f" (received so far: {quote(pending, QUOTE_LIMIT)})" if pending else ""
        return f"{protocol} {session.endpoint}: timed out after {budget:.2f} s {session.step}{got}"

    try:
        return await run_within(request, converse, timed_out=timed_out)
    finally:
        await session.aclose()
