"""`mysql` against a real MariaDB started here, and scripted hostile servers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pymysql
import pytest
import trio
import trustme
from cli_runs import lbha, virtual, write_config
from hostile import hostile_server, script, silent, trickle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from resources import free_port, ten_thousand_logins

from lbha.checkapi import Transcript
from lbha.checks.mysql import LIMITER, MysqlCheck
from lbha.plugin_manager import PluginManager
from lbha.testing import run_check_now

#: A skip for want of the real server is a failure in CI (tests/conftest.py).
pytestmark = pytest.mark.real_server

USER, PASSWORD, DATABASE = "lbha", "check-pw", "app"
#: Accounts whose password is one letter, and a word the transcript carries.
SHORT_USER, SHORT_PASSWORD = "short", "e"
WORD_USER, WORD_PASSWORD = "word", "login"
MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"


@dataclass(frozen=True)
class Mariadb:
    port: int
    greeting: bytes
    ca_file: Path


def _wait_socket(path: Path, process: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mariadbd exited with {process.returncode} before listening")
        try:
            pymysql.connect(unix_socket=str(path), user="root", connect_timeout=1).close()
            return
        except pymysql.MySQLError:
            time.sleep(0.1)
    raise RuntimeError(f"mariadbd not answering on {path} after {seconds} s")


def _greeting(port: int) -> bytes:
    """The server's first packet, for a fake server that greets and then says nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        head = sock.recv(4, socket.MSG_WAITALL)
        return head + sock.recv(int.from_bytes(head[:3], "little"), socket.MSG_WAITALL)


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mariadb]:
    if not Path(MARIADBD).exists():
        pytest.skip("mariadbd not installed (scripts/install-system-packages installs it)")
    tmp = tmp_path_factory.mktemp("mariadb")
    data, sock = tmp / "data", tmp / "mysqld.sock"
    subprocess.run([INSTALL_DB, "--no-defaults", f"--datadir={data}", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db"],
                   check=True, capture_output=True, timeout=120)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    port = free_port()
    process = subprocess.Popen(
        [MARIADBD, "--no-defaults", f"--datadir={data}", f"--socket={sock}", f"--port={port}",
         "--bind-address=127.0.0.1", "--user=root", f"--pid-file={tmp}/mysqld.pid",
         f"--log-error={tmp}/error.log", "--skip-log-bin", "--skip-name-resolve",
         "--innodb-buffer-pool-size=16M", "--max-connections=500", "--thread-cache-size=64",
         f"--ssl-cert={tmp}/cert.pem", f"--ssl-key={tmp}/key.pem", f"--ssl-ca={tmp}/ca.pem"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_socket(sock, process)
        admin = pymysql.connect(unix_socket=str(sock), user="root", autocommit=True)
        with admin.cursor() as cursor:
            for statement in (
                f"CREATE DATABASE {DATABASE}",
                f"CREATE TABLE {DATABASE}.t (id INT)",
                f"CREATE TABLE {DATABASE}.empty (id INT)",
                f"INSERT INTO {DATABASE}.t VALUES (42)",
                f"CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'",
                f"GRANT SELECT ON {DATABASE}.* TO '{USER}'@'%'",
                f"CREATE USER '{SHORT_USER}'@'%' IDENTIFIED BY '{SHORT_PASSWORD}'",
                f"GRANT SELECT ON {DATABASE}.* TO '{SHORT_USER}'@'%'",
                f"CREATE USER '{WORD_USER}'@'%' IDENTIFIED BY '{WORD_PASSWORD}'",
                f"GRANT SELECT ON {DATABASE}.* TO '{WORD_USER}'@'%'",
            ):
                cursor.execute(statement)
        admin.close()
        yield Mariadb(port, _greeting(port), tmp / "ca.pem")
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


async def timed(**kwargs: object) -> tuple[object, float]:
    start = trio.current_time()
    result = await run_check_now("mysql", **kwargs)
    return result, trio.current_time() - start


def login(port: int, **overrides: object) -> dict[str, object]:
    return {"rport": port, "login": USER, "password": PASSWORD, "database": DATABASE,
            **overrides}


def test_registered_through_the_entry_point() -> None:
    manager = PluginManager()
    manager.load_entry_points()
    assert isinstance(manager.register_checks().get("mysql"), MysqlCheck)


async def test_default_query_is_up(mariadb: Mariadb) -> None:
    transcript = Transcript()
    result = await run_check_now("mysql", **login(mariadb.port), transcript=transcript)
    assert result.up, result.reason
    assert result.reason == "query returned (1,)"
    assert transcript.lines == [f"> login as {USER} to database {DATABASE}", "> SELECT 1",
                                "< (1,)"]


async def test_operator_query_is_up(mariadb: Mariadb) -> None:
    # An imported ldirectord request keeps its "/"; the query is what follows it.
    result = await run_check_now("mysql", **login(mariadb.port, request="/SELECT id FROM t"))
    assert result.up, result.reason
    assert result.reason == "query returned (42,)"


async def test_without_database(mariadb: Mariadb) -> None:
    result = await run_check_now("mysql", **login(mariadb.port, database=None,
                                                  request="SELECT id FROM app.t"))
    assert result.up, result.reason


async def test_tls_when_asked(mariadb: Mariadb) -> None:
    result = await run_check_now("mysql", **login(mariadb.port), options={"tls": True})
    assert result.up, result.reason
    result = await run_check_now("mysql", **login(mariadb.port), verify_tls=True,
                                 ca_file=mariadb.ca_file)
    assert result.up, result.reason


async def test_tls_verified_against_system_cas_is_down(mariadb: Mariadb) -> None:
    result = await run_check_now("mysql", **login(mariadb.port), verify_tls=True)
    assert not result.up
    assert result.reason.startswith(f"login as {USER} to database {DATABASE} on "
                                    f"127.0.0.1:{mariadb.port} failed:")
    assert "CERTIFICATE_VERIFY_FAILED" in result.reason


async def test_no_rows_is_down(mariadb: Mariadb) -> None:
    result = await run_check_now("mysql", **login(mariadb.port, request="SELECT id FROM empty"))
    assert not result.up
    assert result.reason == f"query on 127.0.0.1:{mariadb.port} returned no rows"
    result = await run_check_now("mysql", **login(mariadb.port, request="DO 1"))
    assert not result.up
    assert result.reason == f"query on 127.0.0.1:{mariadb.port} returned no result set: 'DO 1'"


async def test_bad_query_is_down_with_the_servers_word(mariadb: Mariadb) -> None:
    result = await run_check_now("mysql", **login(mariadb.port, request="SELECT * FROM nope"))
    assert not result.up
    assert result.reason.startswith(f"query on 127.0.0.1:{mariadb.port} failed: (1146) Table")


@pytest.mark.wallclock
async def test_wrong_password_is_down(mariadb: Mariadb) -> None:
    result, elapsed = await timed(**login(mariadb.port, password="wrong"))
    assert not result.up
    assert result.reason.startswith(
        f"login as {USER} to database {DATABASE} on 127.0.0.1:{mariadb.port} failed: "
        f"(1045) Access denied for user '{USER}'")
    assert elapsed < 1


async def test_wrong_database_is_down(mariadb: Mariadb) -> None:
    result = await run_check_now("mysql", **login(mariadb.port, database="mysql"))
    assert not result.up
    assert "(1044) Access denied" in result.reason


async def test_missing_login_is_down() -> None:
    result = await run_check_now("mysql", rport=3306)
    assert result == result.failure("mysql check has no login: set login (and password)")


@pytest.mark.wallclock
async def test_stopped_server_is_down_at_once() -> None:
    port = free_port()
    result, elapsed = await timed(**login(port))
    assert not result.up
    assert result.reason == f"connect to 127.0.0.1:{port} refused"
    assert elapsed < 0.5


# --------------------------------------------------------------------------- hostile servers

@pytest.mark.parametrize(("name", "handler", "phase"), [
    ("silent", silent(), "login as"),
    ("greets, then silent", "greeting", "login as"),
    ("trickles its greeting", "trickle", "login as"),
    ("garbage", script(b"\x00\xff\xfe garbage \x01" * 30),
     "login as"),
    ("garbage, then closes", script(b"\x07\x00\x00\x00garbage" * 3, close=True), "login as"),
    ("truncated greeting", "truncated", "login as"),
    ("closes", script(close=True), "login as"),
])
@pytest.mark.wallclock
async def test_hostile_server_is_down_within_the_deadline(mariadb: Mariadb, name, handler,
                                                          phase) -> None:
    if handler == "greeting":
        handler = script(mariadb.greeting)
    elif handler == "trickle":
        handler = trickle(mariadb.greeting, 0.05)
    elif handler == "truncated":
        handler = script(mariadb.greeting[:20], close=True)
    async with hostile_server(handler) as port:
        result, elapsed = await timed(**login(port), negotiate_timeout=0.6)
    assert not result.up
    assert result.reason.startswith(f"{phase} {USER} to database {DATABASE} on 127.0.0.1:{port}"), \
        result.reason
    assert elapsed < 0.7, (name, elapsed)


@pytest.mark.slow
async def test_ten_thousand_checks_leave_no_threads_or_sockets(mariadb: Mariadb) -> None:
    await ten_thousand_logins(
        lambda password: run_check_now("mysql", **login(mariadb.port, password=password)),
        PASSWORD, LIMITER)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(greeting=st.binary(max_size=64), close=st.booleans())
async def test_fuzz_any_server_bytes_get_a_verdict_from_the_check(greeting: bytes, close) -> None:
    """Whatever a server sends, the check itself answers (no exception for the engine)."""
    async with hostile_server(script(greeting, close=close)) as port:
        result = await run_check_now("mysql", **login(port), negotiate_timeout=0.2)
    assert not result.up
    assert result.reason.startswith(f"login as {USER}"), result.reason


# ----------------------------------------------------------------- secrets in `lbha check -v`


@pytest.mark.parametrize(("login", "password"), [(SHORT_USER, SHORT_PASSWORD),
                                                 (WORD_USER, WORD_PASSWORD)],
                         ids=["one-letter", "common-word"])
def test_a_short_or_common_password_leaves_check_output_whole(
    mariadb: Mariadb, tmp_path: Path, login: str, password: str,
) -> None:
    check = f'login = "{login}"\npassword = "{password}"\ndatabase = "{DATABASE}"'
    config = write_config(tmp_path, virtual(tmp_path, "db", 1, "mysql", mariadb.port, check))
    out = lbha("check", str(config), "db", "-v")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == [
        f"db r (127.0.0.1:{mariadb.port}) mysql: UP: query returned (1,)",
        f"    > login as {login} to database {DATABASE}",
        "    > SELECT 1",
        "    < (1,)",
    ]


@pytest.mark.parametrize("password", [PASSWORD, "wrong-db-pw"], ids=["up", "down"])
def test_no_password_in_check_output_or_config_show(mariadb: Mariadb, tmp_path: Path,
                                                    password: str) -> None:
    check = f'login = "{USER}"\npassword = "{password}"\ndatabase = "{DATABASE}"'
    config = write_config(tmp_path, virtual(tmp_path, "db", 1, "mysql", mariadb.port, check))
    out = lbha("check", str(config), "db", "-v")
    assert out.returncode == (0 if password == PASSWORD else 1), out.stdout
    assert f"    > login as {USER} to database {DATABASE}" in out.stdout.splitlines()
    shown = lbha("config", "show", str(config))
    assert 'password = "****"' in shown.stdout
    for output in (out.stdout, out.stderr, shown.stdout, shown.stderr):
        assert password not in output
