"""`ldap` and `ldaps`: bind, read one entry with a base-scope search, match its DN.

As ldirectord does: a simple bind as `login` / `password` (anonymous unless both are set), a
search with base `request` (default "", the root DSE), scope base, filter (objectClass=*);
up when exactly one entry comes back and, when `receive` is set, its DN matches it. `ldaps`
is LDAP over implicit TLS; `ldap` can upgrade with StartTLS (option `starttls`). TLS is not
verified unless `verify_tls` is set (then against `ca_file` or the system CAs).

ldap3 is synchronous, so each check runs in a worker thread (checks/blocking.py).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPException
from pyasn1.error import PyAsn1Error

from lbha import hookimpl
from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec, Transcript
from lbha.checkkit import matches, quote
from lbha.checkkit.blocking import (
    Interrupted,
    RunLimiter,
    Worker,
    run_blocking,
)

#: Worker threads the LDAP checks may occupy at once, abandoned ones included.
LIMITER = RunLimiter("lbha.checks.ldap", 16)
SEARCH_FILTER = "(objectClass=*)"
#: Characters of a server's diagnostic message quoted in a reason.
MESSAGE_LIMIT = 200

#: What a garbled reply makes ldap3's BER decoder raise besides its own exceptions.
_DECODE_ERRORS = (PyAsn1Error, ValueError, IndexError, KeyError, TypeError, UnicodeError)


@dataclass(frozen=True)
class LdapProbe:
    """One check run's parameters, built on the trio side for the worker thread."""

    host: str
    port: int
    endpoint: str
    ipv6: bool
    implicit_tls: bool
    starttls: bool
    tls: ldap3.Tls
    login: str | None
    password: str | None
    base: str
    receive: str | None
    regex: bool
    transcript: Transcript | None


def dn_matches(dn: str, receive: str | None, regex: bool) -> bool:
    """`receive` empty: any DN; else a substring of the DN, or a regex searched in it."""
    return not receive or matches(dn, receive, regex)


def _server_says(result: Mapping[str, Any] | None) -> str:
    """The server's result code and diagnostic message, printable and bounded."""
    if not result:
        return "no result"
    text = str(result.get("description") or f"result {result.get('result')}")
    message = str(result.get("message") or "").strip()
    if message:
        message = quote(message, MESSAGE_LIMIT, marks=False)
        text = f"{text} ({message})"
    return text


def _tls(request: CheckRequest) -> ldap3.Tls:
    spec = request.spec
    if not spec.verify_tls:
        return ldap3.Tls(validate=ssl.CERT_NONE)
    return ldap3.Tls(
        validate=ssl.CERT_REQUIRED,
        ca_certs_file=str(spec.ca_file) if spec.ca_file else None,
        valid_names=[spec.virtualhost] if spec.virtualhost else None,
    )


def probe_for(request: CheckRequest, implicit_tls: bool) -> LdapProbe:
    """The parameters of one run; `request` loses a leading "/" as in ldirectord."""
    spec, target = request.spec, request.target
    assert target.rport is not None
    base = spec.request or ""
    return LdapProbe(
        host=str(target.rip), port=target.rport, endpoint=target.endpoint,
        ipv6=target.rip.version == 6, implicit_tls=implicit_tls,
        starttls=bool(request.options.get("starttls", False)) and not implicit_tls,
        tls=_tls(request), login=spec.login, password=spec.password,
        base=base[1:] if base.startswith("/") else base,
        receive=spec.receive, regex=spec.regex, transcript=request.transcript,
    )


def run_probe(worker: Worker, probe: LdapProbe) -> CheckResult:
    """Connect, (StartTLS,) bind, search, unbind: the blocking part, in a worker thread."""
    transcript = probe.transcript
    worker.phase = f"connect to {probe.endpoint}"
    server = ldap3.Server(
        probe.host, port=probe.port, use_ssl=probe.implicit_tls, tls=probe.tls,
        get_info=ldap3.NONE, connect_timeout=worker.remaining(),
        mode=ldap3.IP_V6_ONLY if probe.ipv6 else ldap3.IP_V4_ONLY,
    )
    simple = bool(probe.login and probe.password)
    who = f"as {probe.login}" if simple else "anonymously"
    # receive_timeout stays None: ldap3 then keeps connect_timeout (our whole budget) on
    # the socket for every read, where it would otherwise need whole seconds.
    connection = ldap3.Connection(
        server, user=probe.login if simple else None, password=probe.password if simple
        else None, authentication=ldap3.SIMPLE if simple else ldap3.ANONYMOUS,
        auto_bind=ldap3.AUTO_BIND_NONE, auto_referrals=False, raise_exceptions=False,
        read_only=True,
    )
    try:
        connection.open(read_server_info=False)
        worker.watch(connection.socket)
        if probe.starttls:
            worker.phase = f"StartTLS on {probe.endpoint}"
            if transcript:
                transcript.sent("StartTLS")
            if not connection.start_tls(read_server_info=False):
                return CheckResult.failure(
                    f"StartTLS on {probe.endpoint} refused: {_server_says(connection.result)}"
                )
        worker.phase = f"bind {who} on {probe.endpoint}"
        if transcript:
            transcript.sent(f"bind {who}")
        if not connection.bind(read_server_info=False):
            return CheckResult.failure(
                f"bind {who} on {probe.endpoint} failed: {_server_says(connection.result)}"
            )
        worker.phase = f"search of {probe.base!r} on {probe.endpoint}"
        if transcript:
            transcript.sent(f"search base={probe.base!r} scope=base filter={SEARCH_FILTER}")
        connection.search(probe.base, SEARCH_FILTER, search_scope=ldap3.BASE,
                          attributes=ldap3.NO_ATTRIBUTES)
        entries = [r for r in connection.response or () if r.get("type") == "searchResEntry"]
        if transcript:
            for entry in entries:
                transcript.received(f"entry {entry.get('dn')!r}")
        return _verdict(probe, entries, connection.result)
    except Interrupted:
        return CheckResult.failure(f"{worker.phase} interrupted")
    except LDAPException as exc:
        return CheckResult.failure(f"{worker.phase} failed: {exc}")
    except _DECODE_ERRORS as exc:
        return CheckResult.failure(
            f"{worker.phase}: unreadable LDAP reply ({type(exc).__name__}: {exc})"
        )
    finally:
        with suppress(LDAPException, OSError, *_DECODE_ERRORS):  # the server may be gone
            connection.unbind()
        # unbind skips the close when its request cannot be sent (an interrupted socket):
        # left to ldap3, the socket would wait for the cycle collector.
        if connection.socket is not None:
            connection.socket.close()


def _verdict(probe: LdapProbe, entries: list[dict[str, Any]],
             result: Mapping[str, Any] | None) -> CheckResult:
    where = f"search of {probe.base!r} on {probe.endpoint}"
    if len(entries) != 1:
        if not entries and result and result.get("result"):
            return CheckResult.failure(f"{where} failed: {_server_says(result)}")
        return CheckResult.failure(f"{where} returned {len(entries)} entries, expected 1")
    dn = str(entries[0].get("dn", ""))
    if not dn_matches(dn, probe.receive, probe.regex):
        how = "does not match" if probe.regex else "does not contain"
        return CheckResult.failure(f"{where}: DN {dn!r} {how} {probe.receive!r}")
    return CheckResult.success(f"entry {dn!r}" if dn else "root DSE read")


class LdapCheck:
    """`ldap` (plain, optional StartTLS) or `ldaps` (implicit TLS)."""

    negotiate = True
    spec_keys = frozenset({"request", "receive", "regex", "login", "password", "verify_tls",
                           "ca_file", "virtualhost"})

    def __init__(self, name: str, implicit_tls: bool) -> None:
        self.name = name
        self.implicit_tls = implicit_tls
        self.description = (
            "LDAP over TLS: " if implicit_tls else "LDAP: "
        ) + "bind as login (or anonymously), base search of request, match the DN"
        self.options: MappingProxyType[str, OptionSpec] = MappingProxyType({} if implicit_tls
            else {"starttls": OptionSpec(type="bool", default=False,
                                         help="upgrade the connection with StartTLS")})

    async def check(self, request: CheckRequest) -> CheckResult:
        if request.target.rport is None:
            return CheckResult.failure(f"no port to connect to on {request.target.rip}")
        probe = probe_for(request, self.implicit_tls)
        return await run_blocking(request, lambda worker: run_probe(worker, probe), limiter=LIMITER)


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(LdapCheck("ldap", implicit_tls=False))
    registry.add(LdapCheck("ldaps", implicit_tls=True))
