"""`ldap` / `ldaps` against a real OpenLDAP slapd started here, and scripted hostile servers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme
from cli_runs import lbha, virtual, write_config
from hostile import hostile_server, script, silent, trickle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from resources import free_port, ten_thousand_logins

from lbha.checkapi import Transcript
from lbha.checks.ldap import LIMITER, LdapCheck, dn_matches
from lbha.plugin_manager import PluginManager
from lbha.testing import run_check_now

#: A skip for want of the real server is a failure in CI (tests/conftest.py).
pytestmark = pytest.mark.real_server

SUFFIX = "dc=example,dc=org"
ADMIN = f"cn=admin,{SUFFIX}"
ADMIN_PASSWORD = "s3cret-admin"
ALICE = f"uid=alice,ou=people,{SUFFIX}"
ALICE_PASSWORD = "alice-pw"
#: Accounts whose password is one letter, and a word the transcript carries.
SHORT, SHORT_PASSWORD = f"uid=short,ou=people,{SUFFIX}", "e"
WORD, WORD_PASSWORD = f"uid=word,ou=people,{SUFFIX}", "search"
SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"


@dataclass(frozen=True)
class Slapd:
    port: int
    tls_port: int
    ca_file: Path
    process: subprocess.Popen[bytes]


def _wait_listening(port: int, process: subprocess.Popen[bytes], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server not listening on port {port} after {seconds} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    if not Path(SLAPD).exists():
        pytest.skip("slapd not installed (scripts/install-system-packages installs it)")
    tmp = tmp_path_factory.mktemp("slapd")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "ldap.test")
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    (tmp / "db").mkdir()
    conf = tmp / "slapd.conf"
    conf.write_text(textwrap.dedent(f"""\
        include /etc/ldap/schema/core.schema
        include /etc/ldap/schema/cosine.schema
        include /etc/ldap/schema/inetorgperson.schema
        pidfile {tmp}/slapd.pid
        modulepath /usr/lib/ldap
        moduleload back_mdb
        TLSCertificateFile {tmp}/cert.pem
        TLSCertificateKeyFile {tmp}/key.pem
        database mdb
        maxsize 10485760
        suffix "{SUFFIX}"
        rootdn "{ADMIN}"
        rootpw {ADMIN_PASSWORD}
        directory {tmp}/db
        """))
    ldif = tmp / "data.ldif"
    ldif.write_text(textwrap.dedent(f"""\
        dn: {SUFFIX}
        objectClass: dcObject
        objectClass: organization
        dc: example
        o: Example

        dn: ou=people,{SUFFIX}
        objectClass: organizationalUnit
        ou: people

        dn: {ALICE}
        objectClass: inetOrgPerson
        uid: alice
        cn: Alice
        sn: Example
        userPassword: {ALICE_PASSWORD}

        dn: {SHORT}
        objectClass: inetOrgPerson
        uid: short
        cn: Short
        sn: Example
        userPassword: {SHORT_PASSWORD}

        dn: {WORD}
        objectClass: inetOrgPerson
        uid: word
        cn: Word
        sn: Example
        userPassword: {WORD_PASSWORD}
        """))
    subprocess.run([SLAPADD, "-f", str(conf), "-l", str(ldif)], check=True,
                   capture_output=True, timeout=30)
    port, tls_port = free_port(), free_port()
    urls = f"ldap://127.0.0.1:{port}/ ldaps://127.0.0.1:{tls_port}/ ldap://[::1]:{port}/"
    process = subprocess.Popen([SLAPD, "-d", "0", "-h", urls, "-f", str(conf)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, process)
        _wait_listening(tls_port, process)
        yield Slapd(port, tls_port, tmp / "ca.pem", process)
    finally:
        _stop(process)


async def timed(check: str, **kwargs: object) -> tuple[object, float]:
    start = trio.current_time()
    result = await run_check_now(check, **kwargs)
    return result, trio.current_time() - start


def test_registered_through_the_entry_point() -> None:
    manager = PluginManager()
    manager.load_entry_points()
    checks = manager.register_checks()
    assert isinstance(checks.get("ldap"), LdapCheck)
    assert isinstance(checks.get("ldaps"), LdapCheck)
    assert checks.get("ldaps").implicit_tls


def test_dn_matching() -> None:
    assert dn_matches(ALICE, None, False)
    assert dn_matches(ALICE, "", True)
    assert dn_matches(ALICE, "ou=people", False)
    assert not dn_matches(ALICE, "ou=People", False)  # case-sensitive, as ldirectord
    assert dn_matches(ALICE, r"^uid=\w+,ou=people", True)
    assert not dn_matches(ALICE, r"^ou=", True)


# --------------------------------------------------------------------------- real slapd


async def test_anonymous_root_dse_is_up(slapd: Slapd) -> None:
    transcript = Transcript()
    result = await run_check_now("ldap", rport=slapd.port, transcript=transcript)
    assert result.up, result.reason
    assert result.reason == "root DSE read"
    assert transcript.lines[:2] == ["> bind anonymously",
                                    "> search base='' scope=base filter=(objectClass=*)"]


async def test_bind_and_search_with_receive_is_up(slapd: Slapd) -> None:
    transcript = Transcript()
    result = await run_check_now("ldap", rport=slapd.port, login=ADMIN, password=ADMIN_PASSWORD,
                                 request=SUFFIX, receive="dc=example", transcript=transcript)
    assert result.up, result.reason
    assert result.reason == f"entry {SUFFIX!r}"
    assert f"> bind as {ADMIN}" in transcript.lines
    assert f"< entry {SUFFIX!r}" in transcript.lines
    assert not any(ADMIN_PASSWORD in line for line in transcript.lines)


async def test_user_bind_regex_receive_and_leading_slash(slapd: Slapd) -> None:
    # An imported ldirectord request keeps its "/"; the DN is what follows it.
    result = await run_check_now("ldap", rport=slapd.port, login=ALICE, password=ALICE_PASSWORD,
                                 request=f"/{ALICE}", receive=r"^uid=alice,ou=people,",
                                 regex=True)
    assert result.up, result.reason


async def test_login_without_password_binds_anonymously(slapd: Slapd) -> None:
    transcript = Transcript()
    result = await run_check_now("ldap", rport=slapd.port, login=ADMIN, request=SUFFIX,
                                 transcript=transcript)
    assert result.up, result.reason
    assert transcript.lines[0] == "> bind anonymously"


async def test_ipv6_real_server_is_up(slapd: Slapd) -> None:
    result = await run_check_now("ldap", rip="::1", rport=slapd.port, request=SUFFIX)
    assert result.up, result.reason


@pytest.mark.wallclock
async def test_wrong_password_is_down(slapd: Slapd) -> None:
    result, elapsed = await timed("ldap", rport=slapd.port, login=ADMIN, password="wrong",
                                  request=SUFFIX)
    assert not result.up
    assert result.reason == (f"bind as {ADMIN} on 127.0.0.1:{slapd.port} failed: "
                             "invalidCredentials")
    assert elapsed < 1


async def test_unexpected_dn_is_down(slapd: Slapd) -> None:
    result = await run_check_now("ldap", rport=slapd.port, request=SUFFIX, receive="dc=other")
    assert not result.up
    assert result.reason == (f"search of {SUFFIX!r} on 127.0.0.1:{slapd.port}: DN {SUFFIX!r} "
                             "does not contain 'dc=other'")
    result = await run_check_now("ldap", rport=slapd.port, request=SUFFIX, receive="^ou=",
                                 regex=True)
    assert not result.up
    assert "does not match '^ou='" in result.reason


async def test_missing_base_is_down_with_the_servers_word(slapd: Slapd) -> None:
    result = await run_check_now("ldap", rport=slapd.port, request=f"ou=nobody,{SUFFIX}")
    assert not result.up
    assert result.reason.startswith(
        f"search of 'ou=nobody,{SUFFIX}' on 127.0.0.1:{slapd.port} failed: noSuchObject")


async def test_ldaps_without_verification_is_up(slapd: Slapd) -> None:
    result = await run_check_now("ldaps", rport=slapd.tls_port, login=ADMIN,
                                 password=ADMIN_PASSWORD, request=SUFFIX, receive=SUFFIX)
    assert result.up, result.reason


async def test_ldaps_verified_against_the_ca_is_up(slapd: Slapd) -> None:
    result = await run_check_now("ldaps", rport=slapd.tls_port, verify_tls=True,
                                 ca_file=slapd.ca_file, request=SUFFIX)
    assert result.up, result.reason


async def test_ldaps_verified_against_system_cas_is_down(slapd: Slapd) -> None:
    result = await run_check_now("ldaps", rport=slapd.tls_port, verify_tls=True)
    assert not result.up
    assert result.reason.startswith(f"connect to 127.0.0.1:{slapd.tls_port} failed:")
    assert "CERTIFICATE_VERIFY_FAILED" in result.reason


@pytest.mark.wallclock
async def test_ldaps_on_the_plain_port_is_down(slapd: Slapd) -> None:
    result, elapsed = await timed("ldaps", rport=slapd.port, negotiate_timeout=1.0)
    assert not result.up
    assert f"127.0.0.1:{slapd.port}" in result.reason
    assert elapsed < 1.1


async def test_starttls_is_up_and_verifies(slapd: Slapd) -> None:
    transcript = Transcript()
    result = await run_check_now("ldap", rport=slapd.port, options={"starttls": True},
                                 verify_tls=True, ca_file=slapd.ca_file, request=SUFFIX,
                                 login=ADMIN, password=ADMIN_PASSWORD, transcript=transcript)
    assert result.up, result.reason
    assert transcript.lines[0] == "> StartTLS"
    result = await run_check_now("ldap", rport=slapd.port, options={"starttls": True},
                                 verify_tls=True)
    assert not result.up
    assert "StartTLS" in result.reason


@pytest.mark.wallclock
async def test_stopped_server_is_down_at_once(slapd: Slapd) -> None:
    port = free_port()
    result, elapsed = await timed("ldap", rport=port, negotiate_timeout=1.0)
    assert not result.up
    assert result.reason.startswith(f"connect to 127.0.0.1:{port} failed:")
    assert "refused" in result.reason
    assert elapsed < 0.5


# --------------------------------------------------------------------------- hostile servers

# A bind response (messageID 1, resultCode success) cut short, and a whole one.
BIND_OK = bytes.fromhex("300c02010161070a010004000400")


@pytest.mark.parametrize(("name", "handler", "phase"), [
    ("silent", silent(), "bind anonymously"),
    ("trickle", trickle(BIND_OK * 20, 0.05), "bind anonymously"),
    ("garbage", script(None, b"\x00\xff garbage \xfe" * 40), "bind anonymously"),
    ("garbage at once", script(b"HTTP/1.0 200 OK\r\n\r\n" * 4),
     "bind anonymously"),
    ("truncated", script(None, BIND_OK[:7], close=True), "bind anonymously"),
    ("truncated, held", script(None, BIND_OK[:7]), "bind anonymously"),
    ("closes", script(None, close=True), "bind anonymously"),
])
@pytest.mark.wallclock
async def test_hostile_server_is_down_within_the_deadline(name, handler, phase) -> None:
    async with hostile_server(handler) as port:
        result, elapsed = await timed("ldap", rport=port, negotiate_timeout=0.6)
    assert not result.up
    assert result.reason.startswith(f"{phase} on 127.0.0.1:{port}"), result.reason
    assert elapsed < 0.7, (name, elapsed)


@pytest.mark.slow
async def test_ten_thousand_checks_leave_no_threads_or_sockets(slapd: Slapd) -> None:
    await ten_thousand_logins(
        lambda password: run_check_now("ldap", rport=slapd.port, login=ADMIN,
                                       password=password, request=SUFFIX),
        ADMIN_PASSWORD, LIMITER)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reply=st.binary(max_size=64), close=st.booleans())
async def test_fuzz_any_server_bytes_get_a_verdict_from_the_check(reply: bytes, close) -> None:
    """Whatever a server sends, the check itself answers (no exception for the engine)."""
    async with hostile_server(script(None, BIND_OK[:2] + reply, close=close)) as port:
        result = await run_check_now("ldap", rport=port, negotiate_timeout=0.2)
    assert not result.up
    assert result.reason.startswith("bind anonymously on 127.0.0.1:"), result.reason


# ----------------------------------------------------------------- secrets in `lbha check -v`


@pytest.mark.parametrize(("login", "password"), [(SHORT, SHORT_PASSWORD), (WORD, WORD_PASSWORD)],
                         ids=["one-letter", "common-word"])
def test_a_short_or_common_password_leaves_check_output_whole(
    slapd: Slapd, tmp_path: Path, login: str, password: str,
) -> None:
    check = f'login = "{login}"\npassword = "{password}"\nrequest = "{SUFFIX}"'
    config = write_config(tmp_path, virtual(tmp_path, "dir", 1, "ldap", slapd.port, check))
    out = lbha("check", str(config), "dir", "-v")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == [
        f"dir r (127.0.0.1:{slapd.port}) ldap: UP: entry {SUFFIX!r}",
        f"    > bind as {login}",
        f"    > search base={SUFFIX!r} scope=base filter=(objectClass=*)",
        f"    < entry {SUFFIX!r}",
    ]


@pytest.mark.parametrize("password", [ADMIN_PASSWORD, "wrong-admin-pw"], ids=["up", "down"])
def test_no_password_in_check_output_or_config_show(slapd: Slapd, tmp_path: Path,
                                                    password: str) -> None:
    check = f'login = "{ADMIN}"\npassword = "{password}"\nrequest = "{SUFFIX}"'
    config = write_config(tmp_path, virtual(tmp_path, "dir", 1, "ldap", slapd.port, check))
    out = lbha("check", str(config), "dir", "-v")
    assert out.returncode == (0 if password == ADMIN_PASSWORD else 1), out.stdout
    assert f"    > bind as {ADMIN}" in out.stdout.splitlines()
    shown = lbha("config", "show", str(config))
    assert 'password = "****"' in shown.stdout
    for output in (out.stdout, out.stderr, shown.stdout, shown.stderr):
        assert password not in output
