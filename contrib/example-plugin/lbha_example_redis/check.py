"""`redis`: a negotiate check speaking the Redis protocol (RESP).

Select it in a config with::

    [virtual.check]
    type = "negotiate"
    service = "redis"
    options = { password = "s3cret", database = 2 }

The check connects to the real server's check port (6379 when nothing else says so),
authenticates when a password is configured, selects a database when one is configured,
sends ``PING`` and requires the first reply line to be exactly ``expect`` ("+PONG").

The engine enforces the total deadline by cancelling this coroutine; ``async with stream``
closes the connection on every path out, cancellation included.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import trio

from lbha import hookimpl
from lbha.checkapi import (
    REDACTED,
    CheckRegistry,
    CheckRequest,
    CheckResult,
    OptionSpec,
    Transcript,
)

DEFAULT_PORT = 6379
#: Longest reply line accepted; a server sending more without a line end is broken.
MAX_LINE = 4096


class ProtocolError(Exception):
    """The server said something that is not a Redis reply."""


def _show(data: bytes, limit: int = 120) -> str:
    """A reply as printable text for reasons and transcripts (control bytes escaped)."""
    text = data[:limit].decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text + ("..." if len(data) > limit else "")


def _command(*words: str) -> bytes:
    """A command as a RESP array of bulk strings (safe for passwords with spaces)."""
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        raw = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class _LineReader:
    """Reads CRLF-terminated reply lines from a stream, keeping what follows a line."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line
            if len(self._buffer) > MAX_LINE:
                raise ProtocolError(f"reply line longer than {MAX_LINE} bytes")
            chunk = await self._stream.receive_some(MAX_LINE)
            if not chunk:
                if self._buffer:
                    raise ProtocolError(
                        f"connection closed inside a reply: {_show(bytes(self._buffer))!r}"
                    )
                raise ProtocolError("connection closed without a reply")
            self._buffer += chunk


def _option(options: Mapping[str, Any], name: str, fallback: Any = None) -> Any:
    """An option's value; the engine normally fills defaults in, but be lenient."""
    value = options.get(name)
    return fallback if value is None else value


class RedisCheck:
    name = "redis"
    negotiate = True
    description = "Redis: optional AUTH and SELECT, then PING must answer +PONG"
    options: Mapping[str, OptionSpec] = MappingProxyType(
        {
            "expect": OptionSpec(
                type="str", default="+PONG", help="the exact first reply line to PING"
            ),
            "username": OptionSpec(
                type="str", help="ACL user name for AUTH (Redis 6+); default: check login"
            ),
            "password": OptionSpec(
                type="str", secret=True, help="send AUTH first; default: check password"
            ),
            "database": OptionSpec(
                type="int", help="SELECT this database before PING; default: none"
            ),
        }
    )

    async def check(self, request: CheckRequest) -> CheckResult:
        target, spec, options = request.target, request.spec, request.options
        port = spec.port or target.rport or DEFAULT_PORT
        host = str(target.rip)
        endpoint = f"[{host}]:{port}" if target.rip.version == 6 else f"{host}:{port}"
        expect: str = _option(options, "expect", "+PONG")
        username: str | None = _option(options, "username", spec.login)
        password: str | None = _option(options, "password", spec.password)
        database: int | None = _option(options, "database")
        if database is None and spec.database and spec.database.isdigit():
            database = int(spec.database)
        transcript = request.transcript

        if transcript is not None:
            transcript.note(f"connecting to {endpoint}")
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            return CheckResult.failure(f"connect to {endpoint} failed: {exc}")

        async with stream:
            reader = _LineReader(stream)
            try:
                if password:
                    words = (username, password) if username else (password,)
                    masked = "AUTH " + (f"{username} {REDACTED}" if username else REDACTED)
                    reply = await _ask(stream, reader, _command("AUTH", *words), masked, transcript)
                    if reply != b"+OK":
                        return CheckResult.failure(f"{endpoint} refused AUTH: {_show(reply)!r}")
                if database is not None:
                    select = f"SELECT {database}"
                    reply = await _ask(
                        stream, reader, _command("SELECT", str(database)), select, transcript
                    )
                    if reply != b"+OK":
                        return CheckResult.failure(
                            f"{endpoint} refused SELECT {database}: {_show(reply)!r}"
                        )
                reply = await _ask(stream, reader, b"PING\r\n", "PING", transcript)
            except (ProtocolError, trio.BrokenResourceError, OSError) as exc:
                return CheckResult.failure(f"{endpoint}: {exc}")

        if reply != expect.encode():
            return CheckResult.failure(
                f"{endpoint} answered PING with {_show(reply)!r}, expected {expect!r}"
            )
        return CheckResult.success(f"{endpoint} answered PING with {expect!r}")


async def _ask(
    stream: trio.abc.Stream,
    reader: _LineReader,
    command: bytes,
    shown: str,
    transcript: Transcript | None,
) -> bytes:
    """Send one command and return the first line of its reply."""
    if transcript is not None:
        transcript.sent(shown)
    await stream.send_all(command)
    reply = await reader.line()
    if transcript is not None:
        transcript.received(_show(reply))
    return reply


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(RedisCheck())
