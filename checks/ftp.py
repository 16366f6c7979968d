"""`ftp` negotiate check: log in, and when `request` is set fetch it in passive mode.

Greeting 220, USER/PASS (anonymous / `lbha@` unless `login` is set), then with a `request`:
TYPE I, PASV (EPSV over IPv6), RETR over the data connection and `receive` matched against
the content (substring, or regex with `regex`). QUIT always. docs/checks.md has the details.
"""

from __future__ import annotations

import re
from types import MappingProxyType

import trio

from lbha import hookimpl
from lbha.checkapi import REDACTED, CheckRegistry, CheckRequest, CheckResult, OptionSpec
from lbha.checkkit import CheckFailed, matches, quote
from lbha.checkkit.lines import LineSession, run_session

DEFAULT_LOGIN = "anonymous"
#: The anonymous password, by convention an e-mail address (ldirectord: ldirectord@HOST).
DEFAULT_PASSWORD = "lbha@"
#: Most of a file read and matched; the rest is not transferred.
MAX_DATA = 1 << 20

_PASV = re.compile(r"(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})")
_EPSV = re.compile(r"\|\|\|(\d{1,5})\|")


class FtpCheck:
    name = "ftp"
    negotiate = True
    spec_keys = frozenset({"login", "password", "request", "receive", "regex"})
    description = "FTP: greeting 220, login, and RETR of `request` in passive mode matched " \
                  "against `receive`"
    options: MappingProxyType[str, OptionSpec] = MappingProxyType({})

    async def check(self, request: CheckRequest) -> CheckResult:
        return await run_session(request, "FTP", _dialogue, closing=_quit)


async def _command(session: LineSession, line: str, ok: tuple[int, ...], what: str,
                   *, shown: str | None = None) -> tuple[int, str]:
    await session.send(line, shown=shown)
    code, text = await session.reply()
    if code not in ok:
        raise CheckFailed(f"FTP server {session.endpoint} refused {what}: {code} {quote(text)}")
    return code, text


async def _dialogue(session: LineSession) -> str:
    spec = session.request.spec
    session.expect("the greeting")
    code, text = await session.reply()
    if code != 220:
        raise CheckFailed(f"FTP greeting from {session.endpoint} is {code} {quote(text)}, "
                          "not 220")
    login = spec.login or DEFAULT_LOGIN
    password = spec.password if spec.login else DEFAULT_PASSWORD
    if any(c in login + (password or "") for c in "\r\n\0"):
        raise CheckFailed("FTP login or password contains CR, LF or NUL")
    code, _ = await _command(session, f"USER {login}", (230, 331), f"USER {login}")
    if code == 331:
        await _command(session, f"PASS {password or ''}", (230, 202),
                       f"the login as {login!r}", shown=f"PASS {REDACTED}")
    done = f"FTP {session.endpoint}: login as {login!r}"
    if not spec.request:
        if spec.receive:
            session.note("receive is ignored: no request to fetch")
        return done
    content = await _retrieve(session, spec.request)
    if not spec.receive:
        return f"{done}, RETR {spec.request}: {len(content)} bytes"
    if not matches(content, spec.receive, spec.regex):
        kind = "regex" if spec.regex else "string"
        raise CheckFailed(f"FTP RETR {spec.request} from {session.endpoint}: {len(content)} "
                          f"bytes do not contain the receive {kind} {spec.receive!r} "
                          f"(start: {quote(content[:60])})")
    return f"{done}, RETR {spec.request}: {len(content)} bytes matching {spec.receive!r}"


async def _passive_port(session: LineSession) -> int:
    """The data port from PASV (IPv4) or EPSV (IPv6); the address is always the real server's.

    Ignoring the advertised address (as curl does by default) keeps a hostile or NATed
    server from pointing the data connection anywhere else.
    """
    if session.request.target.rip.version == 6:
        _, text = await _command(session, "EPSV", (229,), "EPSV")
        match = _EPSV.search(text)
        port = int(match.group(1)) if match else 0
    else:
        _, text = await _command(session, "PASV", (227,), "PASV")
        match = _PASV.search(text)
        port = int(match.group(5)) * 256 + int(match.group(6)) if match else 0
        if match and ".".join(match.group(1, 2, 3, 4)) != str(session.request.target.rip):
            session.note(f"PASV advertised {'.'.join(match.group(1, 2, 3, 4))}; the data "
                         f"connection goes to {session.request.target.rip}")
    if not 0 < port < 65536:
        raise CheckFailed(f"FTP server {session.endpoint} gave no usable passive port: "
                          f"{quote(text)}")
    return port


async def _retrieve(session: LineSession, path: str) -> bytes:
    """RETR `path` over a passive data connection; at most MAX_DATA bytes."""
    await _command(session, "TYPE I", (200,), "TYPE I")
    port = await _passive_port(session)
    session.step = "connecting the data connection"
    session.note(f"data connection to port {port}")
    try:
        data = await session.connect(port)
    except CheckFailed as failed:
        raise CheckFailed(f"FTP passive data connection: {failed.reason}") from None
    await _command(session, f"RETR {path}", (125, 150), f"RETR {path}")
    session.step = f"receiving the data of RETR {path}"
    content = bytearray()
    while len(content) < MAX_DATA:
        try:
            chunk = await data.receive_some(65536)
        except trio.BrokenResourceError as exc:
            raise CheckFailed(f"FTP data connection from {session.endpoint} broke during "
                              f"RETR {path}: {exc.__cause__ or exc}") from None
        if not chunk:
            break
        content += chunk
    else:
        session.note(f"first {MAX_DATA} bytes kept; transfer not finished")
        return bytes(content[:MAX_DATA])
    await trio.aclose_forcefully(data)
    session.note(f"{len(content)} bytes received")
    session.expect(f"the end of the transfer of {path}")
    code, text = await session.reply()
    if not 200 <= code < 300:
        raise CheckFailed(f"FTP transfer of {path} from {session.endpoint} failed: {code} "
                          f"{quote(text)}")
    return bytes(content)


async def _quit(session: LineSession) -> None:
    await session.send("QUIT")
    await session.reply()


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(FtpCheck())
