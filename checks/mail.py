"""Mail negotiate checks: `smtp`, `submission`, `imap`, `imaps`, `pop`, `pops`.

Each speaks just enough of the protocol to see the server answer as a healthy one does:
SMTP greeting 220 and EHLO (HELO fallback), IMAP `* OK`/`* PREAUTH` and LOGIN when
credentials are configured, POP3 `+OK` and USER/PASS when a login is configured. The
plain-text variants can upgrade with STARTTLS/STLS (option `starttls`); imaps and pops use
implicit TLS. Passwords never reach reasons or transcripts. docs/checks.md has the details.
"""

from __future__ import annotations

import re
from types import MappingProxyType

from lbha import hookimpl
from lbha.checkapi import REDACTED, CheckRegistry, CheckRequest, CheckResult, OptionSpec
from lbha.checkkit import CheckFailed, quote
from lbha.checkkit.lines import MAX_LINES, LineSession, NotTheProtocol, run_session

#: The name ldirectord's Net::SMTP sends; servers that check HELO names accept it.
DEFAULT_HELO = "localhost.localdomain"

#: With STARTTLS / STLS or implicit TLS: certificate checking and the name to check.
_TLS_KEYS = frozenset({"verify_tls", "ca_file", "virtualhost"})
_STARTTLS_HELP = (
    "upgrade with {verb} and finish the check over TLS; down when the server does not offer "
    "it (certificate checked only with verify_tls)"
)


# ---------------------------------------------------------------------------------- SMTP


class SmtpCheck:
    """Greeting 220, EHLO (HELO when EHLO is refused), optional STARTTLS, QUIT."""

    negotiate = True
    spec_keys = _TLS_KEYS
    options: MappingProxyType[str, OptionSpec] = MappingProxyType({
        "starttls": OptionSpec(type="bool", default=False,
                               help=_STARTTLS_HELP.format(verb="STARTTLS")),
        "helo": OptionSpec(type="str", default=DEFAULT_HELO,
                           help="the name sent with EHLO/HELO"),
    })

    def __init__(self, name: str) -> None:
        self.name = name
        self.description = f"{name.upper()}: greeting 220 and EHLO/HELO accepted, optional " \
                           "STARTTLS"

    async def check(self, request: CheckRequest) -> CheckResult:
        return await run_session(request, "SMTP", self._dialogue, closing=_smtp_quit)

    async def _dialogue(self, session: LineSession) -> str:
        options = session.request.options
        helo = str(options.get("helo") or DEFAULT_HELO)
        session.expect("the greeting")
        code, text = await session.reply()
        if code != 220:
            raise CheckFailed(f"SMTP greeting from {session.endpoint} is {code} {quote(text)}, "
                              "not 220")
        verb, capabilities = await _hello(session, helo)
        if not options.get("starttls", False):
            return f"SMTP {session.endpoint}: greeting 220, {verb} accepted"
        if "STARTTLS" not in capabilities:
            raise CheckFailed(f"SMTP server {session.endpoint} does not offer STARTTLS "
                              f"(after {verb}) and option starttls is set")
        await session.send("STARTTLS")
        code, text = await session.reply()
        if code != 220:
            raise CheckFailed(f"SMTP server {session.endpoint} refused STARTTLS: {code} "
                              f"{quote(text)}")
        await session.start_tls()
        verb, _ = await _hello(session, helo)
        return f"SMTP {session.endpoint}: greeting 220, STARTTLS, {verb} accepted over TLS"


async def _hello(session: LineSession, helo: str) -> tuple[str, frozenset[str]]:
    """EHLO, or HELO when EHLO is refused with 5xx; the verb that worked and the extensions."""
    await session.send(f"EHLO {helo}")
    code, text = await session.reply()
    if code == 250:
        extensions = frozenset(line.split(" ", 1)[0].upper() for line in text.split("\n")[1:])
        return "EHLO", extensions
    if not 500 <= code < 600:
        raise CheckFailed(f"SMTP server {session.endpoint} answered EHLO with {code} "
                          f"{quote(text)}")
    await session.send(f"HELO {helo}")
    code, text = await session.reply()
    if code != 250:
        raise CheckFailed(f"SMTP server {session.endpoint} refused EHLO and HELO: {code} "
                          f"{quote(text)}")
    return "HELO", frozenset()


async def _smtp_quit(session: LineSession) -> None:
    await session.send("QUIT")
    await session.reply()


# ---------------------------------------------------------------------------------- IMAP

_IMAP_GREETING = re.compile(r"\*\s+(OK|PREAUTH)\b", re.IGNORECASE)
_IMAP_CAPABILITY = re.compile(r"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)


def imap_quoted(value: str) -> str:
    """An IMAP quoted string (RFC 3501): backslash and double quote escaped."""
    if any(c in value for c in "\r\n\0"):
        raise CheckFailed("IMAP login or password contains CR, LF or NUL, which an IMAP "
                          "quoted string cannot carry")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Tags:
    """IMAP command tags a1, a2, … for one session."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self) -> str:
        self._next += 1
        return f"a{self._next}"


async def _tagged(session: LineSession, tag: str, command: str) -> tuple[str, str]:
    """Read past untagged lines to the tagged reply; its status (OK/NO/BAD) and text."""
    for _ in range(MAX_LINES):
        line = await session.readline()
        if line.startswith(tag + " "):
            status, _, text = line[len(tag) + 1:].partition(" ")
            return status.upper(), text
        if line[:5].upper() == "* BYE" and command != "LOGOUT":
            raise CheckFailed(f"IMAP server {session.endpoint} closed the session after "
                              f"{command}: {quote(line)}")
        if not line.startswith(("*", "+")):
            raise NotTheProtocol(f"IMAP server {session.endpoint} answered {command} with "
                                 f"{quote(line)}, which is not an IMAP response")
    raise CheckFailed(f"IMAP server {session.endpoint} sent more than {MAX_LINES} lines "
                      f"before its reply to {command}")


class ImapCheck:
    """Greeting `* OK`/`* PREAUTH`, optional STARTTLS, LOGIN when configured, LOGOUT."""

    negotiate = True
    spec_keys = _TLS_KEYS | {"login", "password"}

    def __init__(self, name: str, *, implicit_tls: bool) -> None:
        self.name = name
        self.implicit_tls = implicit_tls
        tls = "over TLS, " if implicit_tls else ""
        self.description = f"IMAP {tls}greeting * OK, LOGIN when login/password are set"
        self.options: MappingProxyType[str, OptionSpec] = MappingProxyType(
            {} if implicit_tls else {
                "starttls": OptionSpec(type="bool", default=False,
                                       help=_STARTTLS_HELP.format(verb="STARTTLS")),
            })

    async def check(self, request: CheckRequest) -> CheckResult:
        tags = _Tags()

        async def dialogue(session: LineSession) -> str:
            return await self._dialogue(session, tags)

        async def logout(session: LineSession) -> None:
            tag = tags()
            await session.send(f"{tag} LOGOUT", tagged=True)
            await _tagged(session, tag, "LOGOUT")

        return await run_session(request, "IMAP", dialogue, implicit_tls=self.implicit_tls,
                                 closing=logout)

    async def _dialogue(self, session: LineSession, tags: _Tags) -> str:
        request = session.request
        session.expect("the greeting")
        greeting = await session.readline()
        match = _IMAP_GREETING.match(greeting)
        if match is None:
            # "* BYE" is IMAP (the server is closing); anything else is not.
            failure = CheckFailed if greeting.startswith("*") else NotTheProtocol
            raise failure(f"IMAP greeting from {session.endpoint} is {quote(greeting)}, "
                          "not '* OK' or '* PREAUTH'")
        preauth = match.group(1).upper() == "PREAUTH"
        done = [f"greeting {match.group(1).upper()}"]
        if request.options.get("starttls", False):
            if preauth:
                raise CheckFailed(f"IMAP server {session.endpoint} greeted PREAUTH, so "
                                  "STARTTLS (option starttls) is not possible")
            if "STARTTLS" not in await _imap_capabilities(session, greeting, tags):
                raise CheckFailed(f"IMAP server {session.endpoint} does not offer STARTTLS "
                                  "and option starttls is set")
            tag = tags()
            await session.send(f"{tag} STARTTLS", tagged=True)
            status, text = await _tagged(session, tag, "STARTTLS")
            if status != "OK":
                raise CheckFailed(f"IMAP server {session.endpoint} refused STARTTLS: "
                                  f"{status} {quote(text)}")
            await session.start_tls()
            done.append("STARTTLS")
        login = request.spec.login
        if login and preauth:
            session.note("PREAUTH greeting: already authenticated, LOGIN skipped")
        elif login:
            user = imap_quoted(login)
            password = imap_quoted(request.spec.password or "")
            tag = tags()
            await session.send(f"{tag} LOGIN {user} {password}",
                                shown=f"{tag} LOGIN {user} {REDACTED}", tagged=True)
            status, text = await _tagged(session, tag, "LOGIN")
            if status != "OK":
                raise CheckFailed(f"IMAP login as {login!r} on {session.endpoint} refused: "
                                  f"{status} {quote(text)}")
            done.append(f"login as {login!r}")
        return f"IMAP {session.endpoint}: {', '.join(done)}"


async def _imap_capabilities(session: LineSession, greeting: str, tags: _Tags) -> set[str]:
    """The capabilities in the greeting's response code, else from a CAPABILITY command."""
    match = _IMAP_CAPABILITY.search(greeting)
    if match:
        return set(match.group(1).upper().split())
    tag = tags()
    await session.send(f"{tag} CAPABILITY", tagged=True)
    capabilities: set[str] = set()
    for _ in range(MAX_LINES):
        line = await session.readline()
        if line.upper().startswith("* CAPABILITY "):
            capabilities.update(line[13:].upper().split())
        elif line.startswith(tag + " "):
            return capabilities
    raise CheckFailed(f"IMAP server {session.endpoint} sent more than {MAX_LINES} lines "
                      "before its reply to CAPABILITY")


# ---------------------------------------------------------------------------------- POP3


class PopCheck:
    """Greeting `+OK`, optional STLS, USER/PASS when a login is configured, QUIT."""

    negotiate = True
    spec_keys = _TLS_KEYS | {"login", "password"}

    def __init__(self, name: str, *, implicit_tls: bool) -> None:
        self.name = name
        self.implicit_tls = implicit_tls
        tls = "over TLS, " if implicit_tls else ""
        self.description = f"POP3 {tls}greeting +OK, USER/PASS when a login is set"
        self.options: MappingProxyType[str, OptionSpec] = MappingProxyType(
            {} if implicit_tls else {
                "starttls": OptionSpec(type="bool", default=False,
                                       help=_STARTTLS_HELP.format(verb="STLS")),
            })

    async def check(self, request: CheckRequest) -> CheckResult:
        return await run_session(request, "POP3", self._dialogue,
                                 implicit_tls=self.implicit_tls, closing=_pop_quit)

    async def _dialogue(self, session: LineSession) -> str:
        request = session.request
        session.expect("the greeting")
        greeting = await session.readline()
        if not greeting.startswith("+OK"):
            raise _pop_failure(greeting)(f"POP3 greeting from {session.endpoint} is "
                                         f"{quote(greeting)}, not +OK")
        done = ["greeting +OK"]
        if request.options.get("starttls", False):
            await session.send("STLS")
            answer = await session.readline()
            if not answer.startswith("+OK"):
                raise _pop_failure(answer)(f"POP3 server {session.endpoint} refused STLS: "
                                           f"{quote(answer)}")
            await session.start_tls()
            done.append("STLS")
        login = request.spec.login
        if login:
            if any(c in login + (request.spec.password or "") for c in "\r\n\0"):
                raise CheckFailed("POP3 login or password contains CR, LF or NUL")
            await session.send(f"USER {login}")
            answer = await session.readline()
            if not answer.startswith("+OK"):
                raise _pop_failure(answer)(f"POP3 server {session.endpoint} refused USER "
                                           f"{login}: {quote(answer)}")
            await session.send(f"PASS {request.spec.password or ''}", shown=f"PASS {REDACTED}")
            answer = await session.readline()
            if not answer.startswith("+OK"):
                raise _pop_failure(answer)(f"POP3 login as {login!r} on {session.endpoint} "
                                           f"refused: {quote(answer)}")
            done.append(f"login as {login!r}")
        return f"POP3 {session.endpoint}: {', '.join(done)}"


def _pop_failure(answer: str) -> type[CheckFailed]:
    """-ERR is POP3 (QUIT politely); any other answer is not."""
    return CheckFailed if answer.startswith("-ERR") else NotTheProtocol


async def _pop_quit(session: LineSession) -> None:
    await session.send("QUIT")
    await session.readline()


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(SmtpCheck("smtp"))
    registry.add(SmtpCheck("submission"))
    registry.add(ImapCheck("imap", implicit_tls=False))
    registry.add(ImapCheck("imaps", implicit_tls=True))
    registry.add(PopCheck("pop", implicit_tls=False))
    registry.add(PopCheck("pops", implicit_tls=True))
