"""smtp/submission against aiosmtpd; imap/imaps/pop/pops against dovecot; hostile servers.

All servers are real processes on 127.0.0.1 started here (or scripted servers in the test's
trio loop for the failure paths).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hostile import hostile_server, script, silent, tls_stall, trickle
from line_servers import (
    PASSWORD,
    USER,
    Dovecot,
    assert_no_fd_growth,
    cli_check,
    dovecot_server,
    down_in_time,
    make_cert,
    smtp_server,
    transcript_of,
)
from resources import closed_port

from lbha.checkapi import CheckRequest, CheckResult
from lbha.checkkit import CheckFailed
from lbha.checks.mail import imap_quoted
from lbha.testing import check_spec, installed_checks, run_check_now, target

#: A skip for want of the real server is a failure in CI (tests/conftest.py).
pytestmark = pytest.mark.real_server


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_cert(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def smtp_plain() -> Iterator[int]:
    with smtp_server() as port:
        yield port


@pytest.fixture(scope="module")
def smtp_tls(certs: tuple[Path, Path, Path]) -> Iterator[int]:
    with smtp_server(certs[1:]) as port:
        yield port


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    with dovecot_server() as servers:
        yield servers


@pytest.fixture
def fresh_dovecot() -> Iterator[Dovecot]:
    """A dovecot of its own: each failed login from 127.0.0.1 doubles dovecot's reply delay
    (its anvil penalty, 2 s and up), so a shared instance would slow every later failure."""
    with dovecot_server() as servers:
        yield servers


def test_all_six_registered_from_one_plugin() -> None:
    registry = installed_checks()
    for name in ("smtp", "submission", "imap", "imaps", "pop", "pops"):
        assert registry.get(name).negotiate
        assert registry.plugin_of(name) == "mail"
    assert set(registry.get("imap").options) == {"starttls"}
    assert set(registry.get("imaps").options) == set()
    assert set(registry.get("smtp").options) == {"starttls", "helo"}


# ---------------------------------------------------------------------------------- SMTP


@pytest.mark.parametrize("service", ["smtp", "submission"])
async def test_smtp_greeting_ehlo_quit(smtp_plain: int, service: str) -> None:
    result, lines = await transcript_of(service, smtp_plain)
    assert result.up, result.reason
    assert result.reason == f"SMTP 127.0.0.1:{smtp_plain}: greeting 220, EHLO accepted"
    assert lines[1].startswith("< 220 smtp.test")
    assert "> EHLO localhost.localdomain" in lines
    assert lines[-2:] == ["> QUIT", "< 221 Bye"]


async def test_smtp_helo_option(smtp_plain: int) -> None:
    result, lines = await transcript_of("smtp", smtp_plain, options={"helo": "lb1.example"})
    assert result.up, result.reason
    assert "> EHLO lb1.example" in lines


async def test_smtp_starttls(smtp_tls: int) -> None:
    result, lines = await transcript_of("smtp", smtp_tls, options={"starttls": True})
    assert result.up, result.reason
    assert result.reason == (f"SMTP 127.0.0.1:{smtp_tls}: greeting 220, STARTTLS, EHLO "
                             "accepted over TLS")
    tls = lines.index("> STARTTLS")
    assert lines[tls + 1].startswith("< 220")
    assert lines[tls + 2].startswith("* TLS ")
    assert lines[tls + 3] == "> EHLO localhost.localdomain"


async def test_smtp_starttls_verified_against_the_ca(smtp_tls: int, certs) -> None:
    ok = await run_check_now("smtp", rport=smtp_tls, options={"starttls": True},
                             verify_tls=True, ca_file=certs[0])
    assert ok.up, ok.reason
    untrusted = await run_check_now("smtp", rport=smtp_tls, options={"starttls": True},
                                    verify_tls=True)
    assert not untrusted.up
    assert untrusted.reason.startswith(
        f"TLS handshake with 127.0.0.1:{smtp_tls} failed: certificate verify failed: "
        "unable to get local issuer certificate")


async def test_smtp_starttls_not_offered_is_down(smtp_plain: int) -> None:
    result = await run_check_now("smtp", rport=smtp_plain, options={"starttls": True})
    assert not result.up
    assert result.reason == (f"SMTP server 127.0.0.1:{smtp_plain} does not offer STARTTLS "
                             "(after EHLO) and option starttls is set")


async def test_smtp_helo_fallback_when_ehlo_is_refused() -> None:
    server = script(b"220 old.test\r\n", None, b"502 what?\r\n", None, b"250 old.test\r\n")
    async with hostile_server(server) as port:
        result, lines = await transcript_of("smtp", port, negotiate_timeout=0.5)
    assert result.up, result.reason
    assert result.reason.endswith("greeting 220, HELO accepted")
    assert "> HELO localhost.localdomain" in lines


@pytest.mark.wallclock
async def test_smtp_stopped_server_is_refused() -> None:
    with closed_port() as port:
        assert await down_in_time("smtp", port) == f"connect to 127.0.0.1:{port} refused"


EHLO_TLS = b"250-smtp.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"


@pytest.mark.parametrize(("handler", "spec", "expected"), [
    (script(b"554 no service for you\r\n"), {},
     "SMTP greeting from 127.0.0.1:{port} is 554 'no service for you', not 220"),
    (script(b"421 busy\r\n"), {}, "SMTP greeting from 127.0.0.1:{port} is 421 'busy'"),
    (script(b"220 ok\r\n", None, b"421 shutting down\r\n"), {},
     "SMTP server 127.0.0.1:{port} answered EHLO with 421 'shutting down'"),
    (script(b"220 ok\r\n", None, b"502 no\r\n", None, b"502 no\r\n"), {},
     "SMTP server 127.0.0.1:{port} refused EHLO and HELO: 502 'no'"),
    (script(b"220 ok\r\n", None, EHLO_TLS, None, b"454 TLS not available\r\n"),
     {"options": {"starttls": True}},
     "SMTP server 127.0.0.1:{port} refused STARTTLS: 454 'TLS not available'"),
    (script(b"HTTP/1.1 400 Bad Request\r\n"), {},
     "SMTP server 127.0.0.1:{port} answered 'HTTP/1.1 400 Bad Request' while waiting for "
     "the greeting, which is not a valid SMTP reply"),
    (script(b"220-first\r\n" + b"220-more\r\n" * 200), {},
     "SMTP server 127.0.0.1:{port} sent more than 100 lines while waiting for the greeting"),
    (script(b"220 ok\r\n", None, b"250-smtp.test\r\n250-PIPE", close=True), {},
     "SMTP server 127.0.0.1:{port} closed the connection while waiting for the reply to "
     "EHLO after '250-PIPE'"),
    (silent(), {}, "SMTP 127.0.0.1:{port}: timed out after 0.45 s waiting for the greeting"),
    (trickle(b"220 slow\r\n"), {},
     "SMTP 127.0.0.1:{port}: timed out after 0.45 s waiting for the greeting (received so "
     "far: '2')"),
    (tls_stall(b"220 ok\r\n", None, EHLO_TLS, None, b"220 go ahead\r\n"),
     {"options": {"starttls": True}},
     "SMTP 127.0.0.1:{port}: timed out after 0.45 s in the TLS handshake"),
], ids=["554", "421", "ehlo-421", "ehlo-helo-refused", "starttls-refused", "garbage",
        "endless-reply", "close-mid", "silent", "trickle", "tls-stall"])
@pytest.mark.wallclock
async def test_smtp_hostile_servers_are_down_in_time(handler, spec, expected: str) -> None:
    async with hostile_server(handler) as port:
        reason = await down_in_time("smtp", port, **spec)
    assert reason.startswith(expected.format(port=port)), reason


# ---------------------------------------------------------------------------------- IMAP


def test_imap_quoting() -> None:
    assert imap_quoted('s3cr"et\\pw') == '"s3cr\\"et\\\\pw"'
    assert imap_quoted("") == '""'
    with pytest.raises(CheckFailed, match="CR, LF or NUL"):
        imap_quoted("a\r\nb LOGOUT")


async def test_imap_greeting_only(dovecot: Dovecot) -> None:
    result, lines = await transcript_of("imap", dovecot.imap)
    assert result.up, result.reason
    assert result.reason == f"IMAP 127.0.0.1:{dovecot.imap}: greeting OK"
    assert lines[1].startswith("< * OK ")
    assert lines[2] == "> a1 LOGOUT"


@pytest.mark.parametrize("service", ["imap", "imaps"])
async def test_imap_login(dovecot: Dovecot, service: str) -> None:
    port = getattr(dovecot, service)
    result, lines = await transcript_of(service, port, login=USER, password=PASSWORD)
    assert result.up, result.reason
    assert result.reason == f"IMAP 127.0.0.1:{port}: greeting OK, login as 'bob'"
    assert '> a1 LOGIN "bob" ****' in lines
    assert not any("s3cr" in line for line in lines)
    assert any(line.startswith("< a1 OK") for line in lines)
    assert lines[-1].startswith("< a2 OK")


async def test_imap_wrong_password_is_down(fresh_dovecot: Dovecot) -> None:
    dovecot = fresh_dovecot
    result, lines = await transcript_of("imap", dovecot.imap, login=USER, password="wrong",
                                        negotiate_timeout=3)
    assert not result.up
    assert result.reason.startswith(f"IMAP login as 'bob' on 127.0.0.1:{dovecot.imap} "
                                    "refused: NO '[AUTHENTICATIONFAILED]")
    assert not any("wrong" in line for line in lines)


async def test_imap_starttls_then_login(dovecot: Dovecot) -> None:
    result, lines = await transcript_of("imap", dovecot.imap, login=USER, password=PASSWORD,
                                        options={"starttls": True}, verify_tls=True,
                                        ca_file=dovecot.ca)
    assert result.up, result.reason
    assert result.reason.endswith("greeting OK, STARTTLS, login as 'bob'")
    assert lines.index("> a1 STARTTLS") < lines.index('> a2 LOGIN "bob" ****')


async def test_imaps_certificate_verification(dovecot: Dovecot) -> None:
    ok = await run_check_now("imaps", rport=dovecot.imaps, verify_tls=True, ca_file=dovecot.ca)
    assert ok.up, ok.reason
    bad = await run_check_now("imaps", rport=dovecot.imaps, verify_tls=True)
    assert not bad.up
    assert "unable to get local issuer certificate" in bad.reason


@pytest.mark.parametrize("service", ["imap", "imaps", "pop", "pops"])
@pytest.mark.wallclock
async def test_stopped_mail_server_is_refused(service: str) -> None:
    with closed_port() as port:
        assert await down_in_time(service, port) == f"connect to 127.0.0.1:{port} refused"


@pytest.mark.parametrize(("service", "handler", "spec", "expected"), [
    ("imap", script(b"* BYE too many connections\r\n"), {},
     "IMAP greeting from 127.0.0.1:{port} is '* BYE too many connections', not '* OK' or "
     "'* PREAUTH'"),
    ("imap", script(b"* OK hi\r\n", None, b"* BYE going down\r\n"),
     {"login": "bob", "password": "x"},
     "IMAP server 127.0.0.1:{port} closed the session after LOGIN: '* BYE going down'"),
    ("imap", script(b"* OK hi\r\n", None, b"garbage\r\n"), {"login": "bob", "password": "x"},
     "IMAP server 127.0.0.1:{port} answered LOGIN with 'garbage', which is not an IMAP "
     "response"),
    ("imap", script(b"* OK [CAPABILITY IMAP4rev1] hi\r\n"), {"options": {"starttls": True}},
     "IMAP server 127.0.0.1:{port} does not offer STARTTLS and option starttls is set"),
    ("imap", script(b"* OK hi\r\n", None, b"* OK [ALERT] still here\r\na1 O", close=True),
     {"login": "bob", "password": "x"},
     "IMAP server 127.0.0.1:{port} closed the connection while waiting for the reply to "
     "LOGIN after 'a1 O'"),
    ("imap", silent(), {}, "IMAP 127.0.0.1:{port}: timed out after 0.45 s waiting for the "
                         "greeting"),
    ("imap", trickle(b"* OK slow\r\n"), {},
     "IMAP 127.0.0.1:{port}: timed out after 0.45 s waiting for the greeting (received so "
     "far: '*')"),
    ("imap", tls_stall(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n", None, b"a1 OK go\r\n"),
     {"options": {"starttls": True}},
     "IMAP 127.0.0.1:{port}: timed out after 0.45 s in the TLS handshake"),
    ("imaps", tls_stall(), {},
     "IMAP 127.0.0.1:{port}: timed out after 0.45 s in the TLS handshake"),
    ("imaps", script(b"* OK not TLS at all\r\n"), {},
     "TLS handshake with 127.0.0.1:{port} failed: "),
    ("pop", script(b"-ERR [SYS/TEMP] maintenance\r\n"), {},
     "POP3 greeting from 127.0.0.1:{port} is '-ERR [SYS/TEMP] maintenance', not +OK"),
    ("pop", script(b"+OK hi\r\n", None, b"-ERR no such user\r\n"), {"login": "eve"},
     "POP3 server 127.0.0.1:{port} refused USER eve: '-ERR no such user'"),
    ("pop", script(b"+OK hi\r\n", None, b"-ERR not now\r\n"), {"options": {"starttls": True}},
     "POP3 server 127.0.0.1:{port} refused STLS: '-ERR not now'"),
    ("pop", script(b"+OK hi\r\n", None, b"+OK\r\n", None, b"+O", close=True),
     {"login": "bob", "password": "x"},
     "POP3 server 127.0.0.1:{port} closed the connection while waiting for the reply to "
     "PASS after '+O'"),
    ("pop", script(b"\x00\x01\x02" * 2000), {},
     "POP3 server 127.0.0.1:{port} sent a line longer than 4096 bytes"),
    ("pop", silent(), {}, "POP3 127.0.0.1:{port}: timed out after 0.45 s waiting for the "
                        "greeting"),
    ("pop", trickle(b"+OK slow\r\n"), {},
     "POP3 127.0.0.1:{port}: timed out after 0.45 s waiting for the greeting (received so "
     "far: '+')"),
    ("pop", tls_stall(b"+OK hi\r\n", None, b"+OK begin TLS\r\n"), {"options": {"starttls": True}},
     "POP3 127.0.0.1:{port}: timed out after 0.45 s in the TLS handshake"),
    ("pops", tls_stall(), {},
     "POP3 127.0.0.1:{port}: timed out after 0.45 s in the TLS handshake"),
], ids=["imap-bye", "imap-bye-after-login", "imap-garbage", "imap-no-starttls",
        "imap-close-mid", "imap-silent", "imap-trickle", "imap-starttls-stall",
        "imaps-stall", "imaps-plaintext", "pop-err", "pop-user-refused", "pop-stls-refused",
        "pop-close-mid", "pop-binary", "pop-silent", "pop-trickle", "pop-stls-stall",
        "pops-stall"])
@pytest.mark.wallclock
async def test_mail_hostile_servers_are_down_in_time(service: str, handler, spec,
                                                     expected: str) -> None:
    async with hostile_server(handler) as port:
        reason = await down_in_time(service, port, **spec)
    assert reason.startswith(expected.format(port=port)), reason
    assert "****" not in reason
    assert "x'" not in reason


# ---------------------------------------------------------------------------------- POP3


async def test_pop_greeting_only_without_login(dovecot: Dovecot) -> None:
    result, lines = await transcript_of("pop", dovecot.pop)
    assert result.up, result.reason
    assert result.reason == f"POP3 127.0.0.1:{dovecot.pop}: greeting +OK"
    assert lines[2:] == ["> QUIT", "< +OK Logging out"]


@pytest.mark.parametrize("service", ["pop", "pops"])
async def test_pop_login(dovecot: Dovecot, service: str) -> None:
    port = getattr(dovecot, service)
    result, lines = await transcript_of(service, port, login=USER, password=PASSWORD)
    assert result.up, result.reason
    assert result.reason == f"POP3 127.0.0.1:{port}: greeting +OK, login as 'bob'"
    assert lines[lines.index("> USER bob"):][:3] == ["> USER bob", "< +OK", "> PASS ****"]
    assert not any("s3cr" in line for line in lines)


async def test_pop_wrong_password_is_down(fresh_dovecot: Dovecot) -> None:
    dovecot = fresh_dovecot
    result = await run_check_now("pop", rport=dovecot.pop, login=USER, password="wrong",
                                 negotiate_timeout=3)
    assert not result.up
    assert result.reason.startswith(f"POP3 login as 'bob' on 127.0.0.1:{dovecot.pop} "
                                    "refused: '-ERR [AUTH]")


async def test_pop_stls_then_login(dovecot: Dovecot) -> None:
    result, lines = await transcript_of("pop", dovecot.pop, login=USER, password=PASSWORD,
                                        options={"starttls": True})
    assert result.up, result.reason
    assert result.reason.endswith("greeting +OK, STLS, login as 'bob'")
    assert lines.index("> STLS") < lines.index("> USER bob")


# ---------------------------------------------------------------------------------- fds


@pytest.mark.parametrize(("service", "spec"), [
    ("smtp", {}), ("smtp", {"options": {"starttls": True}}),
    ("imap", {"login": USER, "password": PASSWORD}), ("imaps", {}),
    ("pop", {"login": USER, "password": PASSWORD}), ("pops", {}),
], ids=["smtp", "smtp-starttls", "imap-login", "imaps", "pop-login", "pops"])
async def test_no_fd_growth_against_real_servers(request, service: str, spec) -> None:
    # 10,000 real checks per path; TLS handshakes and dovecot logins make this the slowest
    # test of the module (about three minutes in all).
    if service == "smtp":
        port = request.getfixturevalue("smtp_tls")
    else:
        port = getattr(request.getfixturevalue("dovecot"), service)

    async def run():
        return await run_check_now(service, rport=port, negotiate_timeout=10, **spec)
    await assert_no_fd_growth(run, up=True, count=10_000, batch=50)


@pytest.mark.parametrize(("service", "handler", "spec"), [
    ("smtp", script(b"554 no\r\n"), {}),
    ("imap", script(b"* OK hi\r\n", None, b"a1 NO [AUTHENTICATIONFAILED] no\r\n"),
     {"login": "bob", "password": "x"}),
    ("pop", script(b"+OK hi\r\n", None, b"+OK\r\n", None, b"+O", close=True),
     {"login": "bob", "password": "x"}),
    ("imaps", tls_stall(), {}),
    ("smtp", tls_stall(b"220 ok\r\n", None, EHLO_TLS, None, b"220 go ahead\r\n"),
     {"options": {"starttls": True}}),
], ids=["smtp-554", "imap-login-refused", "pop-close-mid", "imaps-tls-stall",
        "smtp-starttls-stall"])
async def test_no_fd_growth_on_failures(service: str, handler, spec) -> None:
    async with hostile_server(handler) as port:
        async def run():
            return await run_check_now(service, rport=port, negotiate_timeout=0.05, **spec)
        await assert_no_fd_growth(run, up=False)


# ---------------------------------------------------------------------------------- CLI

CREDENTIALS = f"login = \"{USER}\"\npassword = '{PASSWORD}'\n"


@pytest.mark.parametrize(("service", "check", "expected"), [
    ("smtp", "[virtual.check.options]\nstarttls = true\n",
     ["> EHLO localhost.localdomain", "> STARTTLS", "> QUIT", "< 221 Bye"]),
    ("imap", CREDENTIALS + "[virtual.check.options]\nstarttls = true\n",
     ["> a1 STARTTLS", '> a2 LOGIN "bob" ****', "> a3 LOGOUT"]),
    ("imaps", CREDENTIALS, ['> a1 LOGIN "bob" ****', "> a2 LOGOUT"]),
    ("pop", CREDENTIALS + "[virtual.check.options]\nstarttls = true\n",
     ["> STLS", "> USER bob", "> PASS ****", "> QUIT"]),
    ("pops", CREDENTIALS, ["> USER bob", "> PASS ****", "> QUIT"]),
])
def test_lbha_check_once_verbose_shows_the_exchange(request, tmp_path: Path, service: str,
                                                    check: str, expected: list[str]) -> None:
    if service == "smtp":
        port = request.getfixturevalue("smtp_tls")
    else:
        port = getattr(request.getfixturevalue("dovecot"), service)
    out = cli_check(tmp_path, f"mail-{service}", service, port, check=check)
    lines = out.splitlines()
    assert lines[0].startswith(f"mail-{service} real (127.0.0.1:{port}) {service}: UP: ")
    shown = [line.strip() for line in lines[1:]]
    for line in expected:
        assert line in shown
    assert "s3cr" not in out


# ---------------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize(("service", "handler", "spec"), [
    ("imap", silent(), {}),
    ("imaps", tls_stall(), {}),
    ("smtp", tls_stall(b"220 ok\r\n", None, EHLO_TLS, None, b"220 go ahead\r\n"),
     {"options": {"starttls": True}}),
], ids=["greeting", "tls-handshake", "starttls-handshake"])
async def test_cancelled_checks_close_everything(service: str, handler, spec) -> None:
    # The engine's deadline (a cancel scope) hits before the check's own 90 % budget; the
    # cancel times vary so it lands in connect, greeting wait and the handshake.
    check = installed_checks().get(service)
    the_spec = check_spec(service, **spec)
    async with hostile_server(handler) as port:
        request = CheckRequest(target(rport=port), the_spec, the_spec.options, 10.0)
        cancelled = 0

        async def run() -> CheckResult:
            nonlocal cancelled
            with trio.move_on_after(random.uniform(0.0, 0.02)) as scope:
                return await check.check(request)
            cancelled += scope.cancelled_caught
            return CheckResult.failure("cancelled")

        await assert_no_fd_growth(run, up=False, count=10_000)
    assert cancelled >= 9800
