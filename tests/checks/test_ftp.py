"""`ftp` against a real pyftpdlib server on 127.0.0.1 and against hostile servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hostile import hostile_server, script, silent, trickle
from line_servers import (
    PASSWORD,
    USER,
    assert_no_fd_growth,
    cli_check,
    down_in_time,
    ftp_server,
    transcript_of,
)
from resources import closed_port

from lbha.testing import installed_checks, run_check_now

#: A skip for want of the real server is a failure in CI (tests/conftest.py).
pytestmark = pytest.mark.real_server

CONTENT = b"lbha health page: all systems OK\n"


@pytest.fixture(scope="module")
def ftp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    root = tmp_path_factory.mktemp("ftproot")
    (root / "health.txt").write_bytes(CONTENT)
    (root / "empty.txt").write_bytes(b"")
    with ftp_server(root) as port:
        yield port


def test_registered_as_a_negotiate_service() -> None:
    assert installed_checks().get("ftp").negotiate
    assert installed_checks().plugin_of("ftp") == "ftp"


async def test_anonymous_login_without_request(ftp: int) -> None:
    result, lines = await transcript_of("ftp", ftp)
    assert result.up, result.reason
    assert result.reason == f"FTP 127.0.0.1:{ftp}: login as 'anonymous'"
    assert lines[1] == "< 220 lbha test FTP ready"
    assert lines[2:6] == ["> USER anonymous", "< 331 Username ok, send password.",
                          "> PASS ****", "< 230 Login successful."]
    assert lines[-2:] == ["> QUIT", "< 221 Goodbye."]


async def test_login_and_passive_retr_matching_receive(ftp: int) -> None:
    result, lines = await transcript_of("ftp", ftp, login=USER, password=PASSWORD,
                                        request="/health.txt", receive="all systems OK")
    assert result.up, result.reason
    assert result.reason == (f"FTP 127.0.0.1:{ftp}: login as 'bob', RETR /health.txt: "
                             f"{len(CONTENT)} bytes matching 'all systems OK'")
    assert "> PASS ****" in lines
    assert not any("s3cr" in line for line in lines)
    assert "> PASV" in lines
    assert any(line.startswith("* data connection to port ") for line in lines)
    assert "> RETR /health.txt" in lines
    assert f"* {len(CONTENT)} bytes received" in lines
    assert any(line.startswith("< 226") for line in lines)
    assert lines[-2] == "> QUIT"


async def test_regex_receive(ftp: int) -> None:
    up = await run_check_now("ftp", rport=ftp, request="/health.txt",
                             receive=r"^lbha .* OK$", regex=True)
    assert up.up, up.reason
    literal = await run_check_now("ftp", rport=ftp, request="/health.txt",
                                  receive=r"^lbha .* OK$")
    assert not literal.up


async def test_request_without_receive_means_the_transfer_worked(ftp: int) -> None:
    result = await run_check_now("ftp", rport=ftp, request="/empty.txt")
    assert result.up, result.reason
    assert result.reason.endswith("RETR /empty.txt: 0 bytes")


async def test_receive_mismatch_is_down(ftp: int) -> None:
    result = await run_check_now("ftp", rport=ftp, request="/health.txt", receive="DEGRADED")
    assert not result.up
    assert result.reason == (
        f"FTP RETR /health.txt from 127.0.0.1:{ftp}: {len(CONTENT)} bytes do not contain the "
        "receive string 'DEGRADED' (start: 'lbha health page: all systems OK?')")


async def test_missing_file_is_down(ftp: int) -> None:
    result = await run_check_now("ftp", rport=ftp, request="/nope.txt", receive="x")
    assert not result.up
    assert result.reason.startswith(f"FTP server 127.0.0.1:{ftp} refused RETR /nope.txt: 550")


async def test_wrong_password_is_down(ftp: int) -> None:
    result, lines = await transcript_of("ftp", ftp, login=USER, password="wrong",
                                        negotiate_timeout=0.5)
    assert not result.up
    assert result.reason == (f"FTP server 127.0.0.1:{ftp} refused the login as 'bob': 530 "
                             "'Authentication failed.'")
    assert not any("wrong" in line for line in lines)


@pytest.mark.wallclock
async def test_stopped_server_is_down_even_with_empty_receive() -> None:
    # ldirectord reported this up: its empty receive matched whatever came before.
    with closed_port() as port:
        reason = await down_in_time("ftp", port, request="/health.txt")
    assert reason == f"connect to 127.0.0.1:{port} refused"


def _ftp_script(pasv: bytes, *, after_retr: bytes | None = None,
                data: bytes | None = None) -> object:
    """Greeting, anonymous login, TYPE I, then `pasv` (with {port} of a data listener)."""
    async def handler(stream: trio.SocketStream) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with listeners[0] as listener:
            port = listener.socket.getsockname()[1]
            await stream.send_all(b"220 hostile ftp\r\n")
            for answer in (b"331 pass\r\n", b"230 ok\r\n", b"200 binary\r\n",
                           pasv.replace(b"{port}", f"{port // 256},{port % 256}".encode())):
                await stream.receive_some(4096)
                await stream.send_all(answer)
            if after_retr is None:
                while await stream.receive_some(4096):
                    pass
                return
            # Bounded: a client that gave up before connecting must not leave us waiting.
            with trio.move_on_after(1):
                connection = await listener.accept()
                async with connection:
                    await stream.receive_some(4096)
                    await stream.send_all(after_retr)
                    if data is not None:
                        await connection.send_all(data)
                        await connection.aclose()
                        await stream.send_all(b"226 done\r\n")
                    while await stream.receive_some(4096):
                        pass
    return handler


@pytest.mark.parametrize(("handler", "spec", "expected"), [
    (script(b"421 too many users\r\n"), {},
     "FTP greeting from 127.0.0.1:{port} is 421 'too many users', not 220"),
    (script(b"SSH-2.0-OpenSSH_9.2\r\n"), {},
     "FTP server 127.0.0.1:{port} answered 'SSH-2.0-OpenSSH_9.2' while waiting for the "
     "greeting, which is not a valid FTP reply"),
    (script(b"220 hi\r\n", None, b"331 pass\r\n", None, b"530 no\r\n"), {},
     "FTP server 127.0.0.1:{port} refused the login as 'anonymous': 530 'no'"),
    (script(b"220-welcome\r\n220-to the", close=True), {},
     "FTP server 127.0.0.1:{port} closed the connection while waiting for the greeting "
     "after '220-to the'"),
    (silent(), {}, "FTP 127.0.0.1:{port}: timed out after 0.45 s waiting for the greeting"),
    (trickle(b"220 slow\r\n"), {},
     "FTP 127.0.0.1:{port}: timed out after 0.45 s waiting for the greeting (received so "
     "far: '2')"),
    (_ftp_script(b"227 Entering Passive Mode (1,2,3)\r\n"), {"request": "/f"},
     "FTP server 127.0.0.1:{port} gave no usable passive port: 'Entering Passive Mode "
     "(1,2,3)'"),
    (_ftp_script(b"227 Entering Passive Mode (127,0,0,1,0,1)\r\n"), {"request": "/f"},
     "FTP passive data connection: connect to 127.0.0.1:1 refused"),
    (_ftp_script(b"227 Entering Passive Mode (127,0,0,1,{port})\r\n",
                 after_retr=b"150 here it comes\r\n"), {"request": "/f"},
     "FTP 127.0.0.1:{port}: timed out after 0.45 s receiving the data of RETR /f"),
    (_ftp_script(b"227 Entering Passive Mode (127,0,0,1,{port})\r\n",
                 after_retr=b"150 here it comes\r\n", data=b"\x00garbage"),
     {"request": "/f", "receive": "OK"},
     "FTP RETR /f from 127.0.0.1:{port}: 8 bytes do not contain the receive string 'OK' "
     "(start: '?garbage')"),
    (_ftp_script(b"227 Entering Passive Mode (127,0,0,1,{port})\r\n",
                 after_retr=b"550 permission denied\r\n"), {"request": "/f"},
     "FTP server 127.0.0.1:{port} refused RETR /f: 550 'permission denied'"),
], ids=["421", "garbage", "login-refused", "close-mid", "silent", "trickle", "bad-pasv",
        "pasv-refused", "data-stall", "data-garbage", "retr-refused"])
@pytest.mark.wallclock
async def test_hostile_servers_are_down_in_time(handler, spec, expected: str) -> None:
    async with hostile_server(handler) as port:
        reason = await down_in_time("ftp", port, **spec)
    assert reason.startswith(expected.format(port=port)), reason


async def test_pasv_address_is_ignored_for_the_data_connection() -> None:
    # The server points the data connection elsewhere (FTP bounce); we go to the real server.
    handler = _ftp_script(b"227 Entering Passive Mode (198,18,0,99,{port})\r\n",
                          after_retr=b"150 ok\r\n", data=b"fine")
    async with hostile_server(handler) as port:
        result, lines = await transcript_of("ftp", port, request="/f",
                                            negotiate_timeout=0.5)
    assert "* PASV advertised 198.18.0.99; the data connection goes to 127.0.0.1" in lines
    assert result.up, result.reason
    assert result.reason == f"FTP 127.0.0.1:{port}: login as 'anonymous', RETR /f: 4 bytes"


async def test_no_fd_growth_against_pyftpdlib(ftp: int) -> None:
    # Each check is two connections (control, data) through a single-threaded Python server.
    async def run():
        return await run_check_now("ftp", rport=ftp, negotiate_timeout=10,
                                   request="/health.txt", receive="OK")
    await assert_no_fd_growth(run, up=True, count=10_000, batch=50)


@pytest.mark.parametrize("kind", ["refused", "silent", "data-stall", "mismatch"])
async def test_no_fd_growth_on_failures(kind: str, ftp: int) -> None:
    async def run_against(port: int, seconds: float = 0.05, **spec) -> None:
        async def run():
            return await run_check_now("ftp", rport=port, negotiate_timeout=seconds, **spec)
        await assert_no_fd_growth(run, up=False, count=10_000)

    if kind == "refused":
        with closed_port() as port:
            await run_against(port)
    elif kind == "mismatch":
        await run_against(ftp, 10, request="/health.txt", receive="DEGRADED")
    else:
        handler = silent() if kind == "silent" else _ftp_script(
            b"227 Entering Passive Mode (127,0,0,1,{port})\r\n", after_retr=b"150 ok\r\n")
        async with hostile_server(handler) as port:
            # The data stall needs time to get through login and PASV first.
            await run_against(port, 0.05 if kind == "silent" else 0.2, request="/f")


def test_lbha_check_once_verbose_shows_the_exchange(ftp: int, tmp_path: Path) -> None:
    check = (f"login = \"{USER}\"\npassword = '{PASSWORD}'\nrequest = \"/health.txt\"\n"
             "receive = \"systems OK\"\n")
    out = cli_check(tmp_path, "files", "ftp", ftp, vport=21, check=check)
    lines = [line.strip() for line in out.splitlines()]
    assert lines[0] == (f"files real (127.0.0.1:{ftp}) ftp: UP: FTP 127.0.0.1:{ftp}: login "
                        f"as 'bob', RETR /health.txt: {len(CONTENT)} bytes matching "
                        "'systems OK'")
    for line in ("> USER bob", "> PASS ****", "> TYPE I", "> PASV", "> RETR /health.txt",
                 "> QUIT"):
        assert line in lines
    assert "s3cr" not in out
