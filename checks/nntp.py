"""`nntp` negotiate check: the server greets with 200 or 201, then QUIT."""

from __future__ import annotations

from types import MappingProxyType

from lbha import hookimpl
from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec
from lbha.checkkit import CheckFailed, quote
from lbha.checkkit.lines import LineSession, run_session

_GREETINGS = MappingProxyType({200: "posting allowed", 201: "no posting"})


class NntpCheck:
    name = "nntp"
    negotiate = True
    spec_keys: frozenset[str] = frozenset()
    description = "NNTP: greeting 200 or 201 (service available), then QUIT"
    options: MappingProxyType[str, OptionSpec] = MappingProxyType({})

    async def check(self, request: CheckRequest) -> CheckResult:
        return await run_session(request, "NNTP", _dialogue, closing=_quit)


async def _dialogue(session: LineSession) -> str:
    session.expect("the greeting")
    code, text = await session.reply()
    if code not in _GREETINGS:
        raise CheckFailed(f"NNTP greeting from {session.endpoint} is {code} {quote(text)}, "
                          "not 200 or 201")
    return f"NNTP {session.endpoint}: greeting {code} ({_GREETINGS[code]})"


async def _quit(session: LineSession) -> None:
    await session.send("QUIT")
    await session.reply()


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(NntpCheck())
