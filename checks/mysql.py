"""`mysql`: log in as `login` / `password` to `database`, run `request`, want a row back.

As ldirectord does, minus its defects: the query (default `SELECT 1`) runs once, not
twice; the whole check has a deadline (ldirectord set none); `receive` is ignored. A query
that returns no row, or no result set at all, is down. The connection is always closed.
TLS only when asked (option `tls`, or `verify_tls` to verify against `ca_file`).

pymysql is synchronous, so each check runs in a worker thread (checks/blocking.py). We open
the TCP socket ourselves and hand it to pymysql, so it can be shut down from the trio side
whatever pymysql is doing when the budget runs out.
"""

from __future__ import annotations

import socket
import ssl
import struct
from contextlib import suppress
from dataclasses import dataclass
from types import MappingProxyType

import pymysql

from lbha import hookimpl
from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec, Transcript
from lbha.checkkit import CheckFailed, describe_error, quote
from lbha.checkkit.blocking import (
    Interrupted,
    RunLimiter,
    Worker,
    run_blocking,
)
from lbha.checkkit.tcp import tls_context

#: Worker threads the MySQL checks may occupy at once, abandoned ones included.
LIMITER = RunLimiter("lbha.checks.mysql", 16)
DEFAULT_QUERY = "SELECT 1"
#: Characters of a server message or a row quoted in a reason or the transcript.
QUOTE_LIMIT = 200

#: What a garbled server packet makes pymysql raise besides its own errors.
_DECODE_ERRORS = (struct.error, ValueError, IndexError, KeyError, TypeError, UnicodeError,
                  AttributeError)


@dataclass(frozen=True)
class MysqlProbe:
    """One check run's parameters, built on the trio side for the worker thread."""

    host: str
    port: int
    endpoint: str
    family: int
    login: str
    password: str
    database: str | None
    query: str
    tls: ssl.SSLContext | None
    transcript: Transcript | None


def _printable(text: str) -> str:
    return quote(text, QUOTE_LIMIT, marks=False)


def describe_mysql_error(exc: pymysql.MySQLError) -> str:
    """"(1045) Access denied for user ..." from pymysql's (code, message) arguments."""
    if len(exc.args) >= 2:
        return f"({exc.args[0]}) {_printable(str(exc.args[1]))}"
    return _printable(str(exc)) or type(exc).__name__


def run_query(worker: Worker, probe: MysqlProbe) -> CheckResult:
    """Connect, log in, query, close: the blocking part, in a worker thread."""
    transcript = probe.transcript
    worker.phase = f"connect to {probe.endpoint}"
    sock = socket.socket(probe.family, socket.SOCK_STREAM)
    connection: pymysql.Connection | None = None
    try:
        worker.watch(sock)
        sock.settimeout(worker.remaining())
        try:
            sock.connect((probe.host, probe.port))
        except OSError as exc:
            return CheckResult.failure(describe_error("connect to", probe.endpoint, exc))
        where = f" to database {probe.database}" if probe.database else ""
        worker.phase = f"login as {probe.login}{where} on {probe.endpoint}"
        if transcript:
            transcript.sent(f"login as {probe.login}{where}")
        timeout = worker.remaining()
        connection = pymysql.Connection(
            host=probe.host, port=probe.port, user=probe.login, password=probe.password,
            database=probe.database, connect_timeout=timeout, read_timeout=timeout,
            write_timeout=timeout, autocommit=True, defer_connect=True,
            # Without either, pymysql would build a fresh TLS context for every check.
            **({"ssl": probe.tls} if probe.tls else {"ssl_disabled": True}),
        )
        connection.connect(sock)
        worker.phase = f"query on {probe.endpoint}"
        if transcript:
            transcript.sent(probe.query)
        with connection.cursor() as cursor:
            cursor.execute(probe.query)
            if cursor.description is None:
                return CheckResult.failure(
                    f"query on {probe.endpoint} returned no result set: {probe.query!r}")
            row = cursor.fetchone()
        if row is None:
            return CheckResult.failure(f"query on {probe.endpoint} returned no rows")
        if transcript:
            transcript.received(_printable(repr(row)))
        return CheckResult.success(f"query returned {_printable(repr(row))}")
    except Interrupted:
        return CheckResult.failure(f"{worker.phase} interrupted")
    except pymysql.MySQLError as exc:
        return CheckResult.failure(f"{worker.phase} failed: {describe_mysql_error(exc)}")
    except OSError as exc:
        return CheckResult.failure(f"{worker.phase} failed: {exc.strerror or exc}")
    except _DECODE_ERRORS as exc:
        return CheckResult.failure(
            f"{worker.phase}: unreadable server reply ({type(exc).__name__}: {exc})"
        )
    finally:
        if connection is not None and connection.open:
            # COM_QUIT; a server that is gone or stuck just gets the socket closed.
            with suppress(pymysql.MySQLError, OSError):
                connection.close()
        sock.close()


def probe_for(request: CheckRequest) -> MysqlProbe:
    """The parameters of one run; `request` loses a leading "/" as in ldirectord."""
    spec, target = request.spec, request.target
    assert target.rport is not None
    assert spec.login
    query = (spec.request or "").strip()
    query = query[1:] if query.startswith("/") else query
    return MysqlProbe(
        host=str(target.rip), port=target.rport, endpoint=target.endpoint,
        family=target.family,
        login=spec.login, password=spec.password or "", database=spec.database or None,
        query=query or DEFAULT_QUERY, transcript=request.transcript,
        tls=tls_context(spec.verify_tls, spec.ca_file)
        if spec.verify_tls or request.options.get("tls", False) else None,
    )


class MysqlCheck:
    name = "mysql"
    negotiate = True
    spec_keys = frozenset({"login", "password", "database", "request", "verify_tls", "ca_file"})
    required_spec_keys = MappingProxyType({"login": "the MySQL user to log in as"})
    description = "MySQL/MariaDB: log in as login to database, run request, want a row back"
    options: MappingProxyType[str, OptionSpec] = MappingProxyType({
        "tls": OptionSpec(type="bool", default=False,
                          help="require TLS (verified only with verify_tls, which implies it)"),
    })

    async def check(self, request: CheckRequest) -> CheckResult:
        if request.target.rport is None:
            return CheckResult.failure(f"no port to connect to on {request.target.rip}")
        if not request.spec.login:
            return CheckResult.failure("mysql check has no login: set login (and password)")
        try:
            probe = probe_for(request)
        except CheckFailed as exc:  # an unreadable ca_file
            return CheckResult.failure(exc.reason)
        return await run_blocking(request, lambda worker: run_query(worker, probe), limiter=LIMITER)


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(MysqlCheck())
