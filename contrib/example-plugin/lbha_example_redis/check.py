"""`redis`: a negotiate check speaking the Redis protocol (RESP).

Select it in a config with::

    [virtual.check]
    type = "negotiate"
    service = "redis"
    options = { password = "s3cret", database = 2 }

The check connects to the real server's check port (6379 when nothing else says so),
authenticates when a password is configured, selects a database when one is configured,
sends ``PING`` and requires the first reply line to be exactly ``expect`` ("+PONG").

It is written with lbha's check kit (`lbha.checkkit`): `run_exchange` keeps the deadline
and turns a stall into a reason naming the step ("waiting for the reply to PING from
198.18.1.11:6379 timed out after 2.9 s"), `open_tcp` connects (and words a refusal as every
lbha check does), `CheckFailed` carries a reason out of the conversation, `quote` shows the
server's bytes safely. ``async with stream`` closes the connection on every path out,
cancellation included.
"""

from __future__ import annotations

import dataclasses
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
)
from lbha.checkkit import CheckFailed, Progress, quote
from lbha.checkkit.tcp import open_tcp, run_exchange

DEFAULT_PORT = 6379
#: Longest reply line accepted; a server sending more without a line end is broken.
MAX_LINE = 4096


def _command(*words: str) -> bytes:
    """A command as a RESP array of bulk strings (safe for passwords with spaces)."""
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        raw = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class _LineReader:
    """Reads CRLF-terminated reply lines from a stream, keeping what follows a line."""

    def __init__(self, stream: trio.abc.ReceiveStream, progress: Progress) -> None:
        self._stream = stream
        self._progress = progress
        self._buffer = bytearray()

    async def line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line
            if len(self._buffer) > MAX_LINE:
                raise CheckFailed(f"{self._progress.step}: reply line longer than {MAX_LINE} "
                                  "bytes")
            chunk = await self._stream.receive_some(MAX_LINE)
            if not chunk:
                if self._buffer:
                    raise CheckFailed(f"{self._progress.step}: connection closed inside a "
                                      f"reply: {quote(bytes(self._buffer))}")
                raise CheckFailed(f"{self._progress.step}: connection closed without a reply")
            self._progress.received += len(chunk)
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
        if target.rport is None:
            target = dataclasses.replace(target, rport=DEFAULT_PORT)
        endpoint = target.endpoint
        expect: str = _option(options, "expect", "+PONG")
        username: str | None = _option(options, "username", spec.login)
        password: str | None = _option(options, "password", spec.password)
        database: int | None = _option(options, "database")
        if database is None and spec.database and spec.database.isdigit():
            database = int(spec.database)
        transcript = request.transcript
        progress = Progress(f"connect to {endpoint}")

        async def exchange() -> CheckResult:
            async with await open_tcp(target, progress, transcript) as stream:
                reader = _LineReader(stream, progress)

                async def ask(command: bytes, shown: str) -> bytes:
                    if transcript is not None:
                        transcript.sent(shown)
                    progress.step = f"sending {shown.split()[0]} to {endpoint}"
                    await stream.send_all(command)
                    progress.step = f"waiting for the reply to {shown.split()[0]} from {endpoint}"
                    reply = await reader.line()
                    if transcript is not None:
                        transcript.received(quote(reply, marks=False))
                    return reply

                if password:
                    words = (username, password) if username else (password,)
                    masked = "AUTH " + (f"{username} {REDACTED}" if username else REDACTED)
                    reply = await ask(_command("AUTH", *words), masked)
                    if reply != b"+OK":
                        raise CheckFailed(f"{endpoint} refused AUTH: {quote(reply)}")
                if database is not None:
                    reply = await ask(_command("SELECT", str(database)), f"SELECT {database}")
                    if reply != b"+OK":
                        raise CheckFailed(f"{endpoint} refused SELECT {database}: {quote(reply)}")
                reply = await ask(b"PING\r\n", "PING")
            if reply != expect.encode():
                raise CheckFailed(
                    f"{endpoint} answered PING with {quote(reply)}, expected {expect!r}")
            return CheckResult.success(f"{endpoint} answered PING with {expect!r}")

        return await run_exchange(request, progress, exchange)


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(RedisCheck())
