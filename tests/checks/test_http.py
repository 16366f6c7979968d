"""`http`, `https`, `http_proxy` against real servers on loopback: nginx (HTTP and HTTPS with
a trustme certificate), tinyproxy as the proxy, scripted trio servers for exact wire shapes,
and the hostile servers of tests/checks/hostile.py."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import pytest
import trio
from cli_process import LBHA
from cli_runs import lbha, virtual, write_config
from hostile import endless, garbage, hostile_server, script, silent, tls_stall, trickle
from resources import closed_port, free_port, open_fds

from lbha.checkapi import (
    CheckRegistry,
    CheckRequest,
    CheckResult,
    OptionSpec,
    Transcript,
)
from lbha.checks import http as http_module
from lbha.errors import PluginError
from lbha.importers import import_ldirectord
from lbha.model import HttpMethod
from lbha.plugin_manager import PluginManager
from lbha.testing import run_check_now

trustme = pytest.importorskip("trustme", reason="trustme missing: pip install -e '.[test]'")

DEADLINE = 0.5
#: What "within the deadline" tolerates: scheduling on a loaded 2-core machine.
SLACK = 0.1


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def wait_listening(proc: subprocess.Popen[bytes], ports: list[int]) -> bool:
    """True once every port accepts; False if the server exited (a port taken meanwhile)."""
    deadline = time.monotonic() + 10
    for port in ports:
        while True:
            if proc.poll() is not None:
                return False
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"server not listening on {port} after 10 s")
            time.sleep(0.05)
    return True


def start_server(command: list[str], write_config: Callable[[list[int]], None], nports: int,
                 log: Path) -> tuple[subprocess.Popen[bytes], list[int]]:
    """Start a server on free ports; retried with new ports if one was taken meanwhile."""
    for _ in range(3):
        ports = [free_port() for _ in range(nports)]
        write_config(ports)
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait_listening(proc, ports):
            return proc, ports
        proc.wait(timeout=5)
    pytest.fail(f"{command[0]} did not start: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@dataclass(frozen=True)
class Nginx:
    http: int
    https: int
    ca_file: Path
    other_ca_file: Path
    ipv6: bool


NGINX_CONF = """\
user root;
worker_processes 1;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
    ssl_certificate {d}/server.pem;
    ssl_certificate_key {d}/server.pem;
    server {{
        listen 127.0.0.1:{http} default_server;
        {listen6}
        listen 127.0.0.1:{https} ssl default_server;
        root {d}/www;
        location = /health {{ return 200 "OK from nginx\\n"; }}
        location = /down {{ return 503; }}
        location = /moved {{ return 302 /health; }}
        location = /echo {{ return 200 "host=$http_host sni=$ssl_server_name\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{http};
        listen 127.0.0.1:{https} ssl;
        server_name www.example.test;
        location / {{ return 200 "vhost www.example.test sni=$ssl_server_name\\n"; }}
    }}
}}
"""


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        pytest.skip("nginx not installed (scripts/install-system-packages installs nginx-light)")
    d = tmp_path_factory.mktemp("nginx")
    (d / "tmp").mkdir()
    www = d / "www"
    www.mkdir()
    (www / "index.html").write_text("root page\n")
    (www / "big.bin").write_bytes(b"b" * (2 * 1024 * 1024))
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1", "::1", "localhost", "www.example.test") \
        .private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(d / "other-ca.pem"))
    ipv6 = has_ipv6_loopback()
    log = d / "error.log"
    log.touch()

    def configure(ports: list[int]) -> None:
        (d / "nginx.conf").write_text(NGINX_CONF.format(
            d=d, http=ports[0], https=ports[1],
            listen6=f"listen [::1]:{ports[0]};" if ipv6 else ""))

    proc, (http, https) = start_server(
        [binary, "-p", str(d), "-e", str(log), "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
        configure, 2, log)
    try:
        yield Nginx(http, https, d / "ca.pem", d / "other-ca.pem", ipv6)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def tinyproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    binary = shutil.which("tinyproxy")
    if binary is None:
        pytest.skip("tinyproxy not installed (scripts/install-system-packages installs it)")
    d = tmp_path_factory.mktemp("tinyproxy")
    log = d / "tinyproxy.log"
    log.touch()

    def configure(ports: list[int]) -> None:
        (d / "tinyproxy.conf").write_text(
            f"Port {ports[0]}\nListen 127.0.0.1\nTimeout 10\nAllow 127.0.0.1\n"
            f"MaxClients 1000\nLogLevel Warning\nLogFile \"{log}\"\n")

    proc, (port,) = start_server([binary, "-d", "-c", str(d / "tinyproxy.conf")], configure, 1,
                                 log)
    try:
        yield port
    finally:
        stop(proc)


async def timed(check: str, **spec: object) -> tuple[bool, str, float]:
    """Run a check with the short deadline; (up, reason, elapsed seconds)."""
    spec.setdefault("negotiate_timeout", DEADLINE)
    start = time.monotonic()
    result = await run_check_now(check, **spec)  # type: ignore[arg-type]
    return result.up, result.reason, time.monotonic() - start


def test_registered_through_one_entry_point() -> None:
    manager = PluginManager()
    manager.load_entry_points()
    registry = manager.register_checks()
    for name in ("http", "https", "http_proxy"):
        assert registry.plugin_of(name) == "http"
        assert registry.get(name).negotiate
    assert registry.plugin_of("simpletcp") == "simpletcp"


# ------------------------------------------------------------------ item 1: http against nginx

async def test_http_receive_found(nginx: Nginx) -> None:
    transcript = Transcript()
    result = await run_check_now("http", rport=nginx.http, request="health", receive="OK",
                                 transcript=transcript)
    assert result.up, result.reason
    assert result.reason == "HTTP 200 OK, body contains 'OK'"
    lines = transcript.lines
    assert "> GET /health HTTP/1.1" in lines
    assert f"> Host: 127.0.0.1:{nginx.http}" in lines
    assert "< HTTP/1.1 200 OK" in lines
    assert "< Server: nginx/" in " ".join(lines)
    assert any(line.startswith("< body: 14 bytes (content-length): OK from nginx")
               for line in lines)


async def test_http_default_request_is_the_root(nginx: Nginx) -> None:
    transcript = Transcript()
    result = await run_check_now("http", rport=nginx.http, receive="root page",
                                 transcript=transcript)
    assert result.up, result.reason
    assert transcript.lines[1] == "> GET / HTTP/1.1"


async def test_http_empty_receive_means_2xx_or_3xx(nginx: Nginx) -> None:
    assert (await run_check_now("http", rport=nginx.http, request="/health")).up
    down = await run_check_now("http", rport=nginx.http, request="/down")
    assert not down.up
    assert down.reason == "expected status 2xx,3xx, got HTTP 503 Service Temporarily Unavailable"
    missing = await run_check_now("http", rport=nginx.http, request="/nope", receive="OK")
    assert missing.reason == "expected 'OK' with status 2xx,3xx, got HTTP 404 Not Found"


async def test_http_body_mismatch_and_regex(nginx: Nginx) -> None:
    result = await run_check_now("http", rport=nginx.http, request="/health", receive="FAIL")
    assert not result.up
    assert result.reason == "HTTP 200 but body does not contain 'FAIL'"
    up = await run_check_now("http", rport=nginx.http, request="/health",
                             receive=r"^OK from \w+$", regex=True)
    assert up.up, up.reason
    assert up.reason == r"HTTP 200 OK, body matches regex '^OK from \w+$'"
    # Without regex the same text is a literal substring, and does not occur.
    literal = await run_check_now("http", rport=nginx.http, request="/health",
                                  receive=r"OK from \w+")
    assert not literal.up


async def test_headers_are_not_searched(nginx: Nginx) -> None:
    result = await run_check_now("http", rport=nginx.http, request="/health", receive="nginx/")
    assert result.reason == "HTTP 200 but body does not contain 'nginx/'"


async def test_redirect_is_not_followed(nginx: Nginx) -> None:
    result = await run_check_now("http", rport=nginx.http, request="/moved", receive="OK")
    assert not result.up
    assert result.reason == (
        f"HTTP 302 but body does not contain 'OK' (redirect to "
        f"'http://127.0.0.1:{nginx.http}/health'; redirects are not followed)")


async def test_a_redirect_without_receive_is_up_by_default(nginx: Nginx) -> None:
    # As ldirectord (which follows it to a 2xx), HAProxy's httpchk and check_http.
    result = await run_check_now("http", rport=nginx.http, request="/moved")
    assert result.up, result.reason
    assert result.reason == "HTTP 302 Moved Temporarily"


@pytest.mark.parametrize(("status", "request_path", "up", "reason"), [
    ("2xx", "/moved", False, "expected status 2xx, got HTTP 302 Moved Temporarily (redirect "
                             "to 'http://127.0.0.1:{port}/health'; redirects are not followed)"),
    ("200", "/health", True, "HTTP 200 OK"),
    ("200, 302", "/moved", True, "HTTP 302 Moved Temporarily"),
    ("2xx,503", "/down", True, "HTTP 503 Service Temporarily Unavailable"),
    ("500-599", "/health", False, "expected status 500-599, got HTTP 200 OK"),
    ("3XX", "/nope", False, "expected status 3XX, got HTTP 404 Not Found"),
], ids=["2xx-only", "one-code", "list", "class-and-code", "range", "upper-case-class"])
async def test_the_status_option_says_which_answers_are_up(
    nginx: Nginx, status: str, request_path: str, up: bool, reason: str,
) -> None:
    result = await run_check_now("http", rport=nginx.http, request=request_path,
                                 options={"status": status})
    assert (result.up, result.reason) == (up, reason.format(port=nginx.http))


@pytest.mark.parametrize(("status", "message"), [
    ("", "empty item in '': give a code (200), a class (2xx) or a range (200-399), "
         "comma-separated"),
    ("2xx,,3xx", "empty item in '2xx,,3xx'"),
    ("ok", "'ok' is not a code (200), a class (2xx) or a range (200-399), comma-separated"),
    ("6xx", "'6xx' is not a code (200), a class (2xx)"),
    ("200-600", "'200-600': 600 is not an HTTP status code (100..599)"),
    ("399-200", "'399-200' is an empty range: 399 is above 200"),
    ("20", "'20' is not a code (200)"),
], ids=["empty", "empty-item", "word", "class-6", "range-high", "range-reversed", "short"])
def test_a_bad_status_option_is_refused_by_config_check(tmp_path: Path, status: str,
                                                        message: str) -> None:
    config = write_config(tmp_path, virtual(tmp_path, "web", 1, "http", 80,
                                            f'options = {{ status = "{status}" }}'))
    out = lbha("config", "check", str(config))
    assert out.returncode == 1, out.stdout
    assert "virtual[0].check.options.status" in out.stderr
    assert message in out.stderr, out.stderr


def test_a_status_option_that_is_no_string_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, virtual(tmp_path, "web", 1, "http", 80,
                                            "options = { status = 302 }"))
    out = lbha("config", "check", str(config))
    assert out.returncode == 1
    assert "virtual[0].check.options.status" in out.stderr
    assert "expected str, got an integer 302" in out.stderr


def test_lbha_check_applies_the_status_option_from_the_config(nginx: Nginx,
                                                              tmp_path: Path) -> None:
    check = 'request = "/moved"\noptions = {{ status = "{status}" }}'
    config = write_config(
        tmp_path,
        virtual(tmp_path, "default", 1, "http", nginx.http, 'request = "/moved"'),
        virtual(tmp_path, "strict", 2, "http", nginx.http, check.format(status="2xx")),
    )
    up = lbha("check", str(config), "default")
    assert up.returncode == 0, up.stdout + up.stderr
    assert up.stdout == (f"default r (127.0.0.1:{nginx.http}) http: UP: "
                         "HTTP 302 Moved Temporarily\n")
    down = lbha("check", str(config), "strict")
    assert down.returncode == 1, down.stdout + down.stderr
    assert down.stdout.startswith(f"strict r (127.0.0.1:{nginx.http}) http: DOWN: expected "
                                  "status 2xx, got HTTP 302 Moved Temporarily")
    shown = lbha("config", "show", str(config))
    assert 'options = { status = "2xx" }' in shown.stdout, shown.stdout


async def test_virtualhost_is_the_host_header(nginx: Nginx) -> None:
    transcript = Transcript()
    result = await run_check_now("http", rport=nginx.http, virtualhost="www.example.test",
                                 receive="vhost www.example.test", transcript=transcript)
    assert result.up, result.reason
    assert "> Host: www.example.test" in transcript.lines


async def test_head_method(nginx: Nginx) -> None:
    transcript = Transcript()
    result = await run_check_now("http", rport=nginx.http, request="/health",
                                 method=HttpMethod.HEAD, transcript=transcript)
    assert result.up, result.reason
    assert transcript.lines[1] == "> HEAD /health HTTP/1.1"
    assert not any(line.startswith("< body") for line in transcript.lines)
    with_receive = await run_check_now("http", rport=nginx.http, request="/health",
                                       method=HttpMethod.HEAD, receive="OK")
    assert with_receive.reason == ("HTTP 200 to HEAD has no body to match 'OK' "
                                   "(use GET, or leave receive empty)")


async def test_body_over_the_cap_is_down(nginx: Nginx) -> None:
    result = await run_check_now("http", rport=nginx.http, request="/big.bin")
    assert not result.up
    assert result.reason == (f"HTTP body from 127.0.0.1:{nginx.http} is 2097152 bytes, over "
                             "the 1 MiB cap")


async def test_ipv6_host_header_is_bracketed(nginx: Nginx) -> None:
    if not nginx.ipv6:
        pytest.skip("no IPv6 loopback")
    transcript = Transcript()
    result = await run_check_now("http", rip="::1", rport=nginx.http, request="/echo",
                                 receive=f"host=[::1]:{nginx.http}", transcript=transcript)
    assert result.up, result.reason


async def test_refused_port() -> None:
    with closed_port() as port:
        result = await run_check_now("http", rport=port)
    assert result.reason == f"connect to 127.0.0.1:{port} refused"


# ------------------------------------------------------ item 1: exact wire shapes, trio servers

def recording(response: bytes, seen: list[bytes]) -> object:
    """A server that records the request it gets and answers `response`, then closes."""
    async def behave(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        seen.append(data)
        await stream.send_all(response)
    return behave


async def test_request_bytes_on_the_wire() -> None:
    seen: list[bytes] = []
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK"
    async with hostile_server(recording(ok, seen)) as port:  # type: ignore[arg-type]
        result = await run_check_now("http", rport=port, request="status page?x=1",
                                     receive="OK")
    assert result.up, result.reason
    assert seen == [
        b"GET /status%20page?x=1 HTTP/1.1\r\n"
        b"Host: 127.0.0.1:" + str(port).encode() + b"\r\n"
        b"User-Agent: lbha/0.1.0 health check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ]


async def test_default_port_is_left_out_of_host() -> None:
    prepared = http_module.prepare("http", "GET", None, None, "198.18.0.21", False, 80)
    assert isinstance(prepared, http_module.Prepared)
    assert "Host: 198.18.0.21" in prepared.lines
    tls = http_module.prepare("https", "GET", None, None, "2001:db8::1", True, 443)
    assert isinstance(tls, http_module.Prepared)
    assert "Host: [2001:db8::1]" in tls.lines
    assert tls.sni is None


async def test_absolute_url_asks_the_real_server_for_that_host() -> None:
    seen: list[bytes] = []
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK"
    async with hostile_server(recording(ok, seen)) as port:  # type: ignore[arg-type]
        result = await run_check_now("http", rport=port, request="http://www.example.test/x")
    assert result.up, result.reason
    assert seen[0].startswith(b"GET /x HTTP/1.1\r\nHost: www.example.test\r\n")


@pytest.mark.parametrize(("response", "reason"), [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabc\r\n4;ext=1\r\nd OK\r\n0\r\nX-Trailer: 1\r\n\r\n",
     "HTTP 200 OK, body contains 'OK'"),
    (b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nread until close, OK",
     "HTTP 200 OK, body contains 'OK'"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Fine\r\nContent-Length: 2\r\n\r\nOK",
     "HTTP 200 Fine, body contains 'OK'"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", "HTTP 204 but body does not contain 'OK'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nOK", "HTTP 200 OK, body contains 'OK'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nOK", "sent an invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunked body"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nOKxx\r\n",
     "chunk longer than its size"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed HTTP status line: 'HTTP/1.1 2000 OK'"),
])
async def test_response_shapes(response: bytes, reason: str) -> None:
    async with hostile_server(script(None, response, close=True)) as port:
        up, got, _ = await timed("http", rport=port, receive="OK")
    assert got.startswith(reason) or reason in got, got
    assert up == got.startswith("HTTP 200 OK") or up == got.startswith("HTTP 200 Fine")


@pytest.mark.wallclock
async def test_chunked_body_over_the_cap() -> None:
    chunk = b"10000\r\n" + b"c" * 0x10000 + b"\r\n"
    async with hostile_server(endless(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                      chunk)) as port:
        up, reason, elapsed = await timed("http", rport=port)
    assert not up
    assert reason == f"HTTP body from 127.0.0.1:{port} exceeds 1 MiB"
    assert elapsed < DEADLINE


# ---------------------------------------------------------------- item 1: https with trustme

async def test_https_self_signed_is_up_by_default(nginx: Nginx) -> None:
    transcript = Transcript()
    result = await run_check_now("https", rport=nginx.https, request="/health", receive="OK",
                                 transcript=transcript)
    assert result.up, result.reason
    assert any(line.startswith("* TLS TLSv1.") and line.endswith("certificate not verified")
               for line in transcript.lines), transcript.lines
    assert f"> Host: 127.0.0.1:{nginx.https}" in transcript.lines


async def test_https_virtualhost_is_host_and_sni(nginx: Nginx) -> None:
    result = await run_check_now("https", rport=nginx.https, virtualhost="www.example.test",
                                 receive="vhost www.example.test sni=www.example.test")
    assert result.up, result.reason
    # Without virtualhost no SNI is sent: the address is an IP.
    bare = await run_check_now("https", rport=nginx.https, request="/echo",
                               receive="sni=\n")
    assert bare.up, bare.reason


async def test_https_verified_against_the_ca_file(nginx: Nginx) -> None:
    transcript = Transcript()
    result = await run_check_now("https", rport=nginx.https, request="/health", receive="OK",
                                 verify_tls=True, ca_file=nginx.ca_file, transcript=transcript)
    assert result.up, result.reason
    assert any(line.endswith("certificate verified") for line in transcript.lines)
    named = await run_check_now("https", rport=nginx.https, virtualhost="www.example.test",
                                verify_tls=True, ca_file=nginx.ca_file)
    assert named.up, named.reason


async def test_https_wrong_ca_is_down(nginx: Nginx) -> None:
    result = await run_check_now("https", rport=nginx.https, verify_tls=True,
                                 ca_file=nginx.other_ca_file)
    assert not result.up
    assert result.reason == (f"TLS handshake with 127.0.0.1:{nginx.https} failed: certificate "
                             "verify failed: unable to get local issuer certificate")


async def test_https_name_mismatch_is_down(nginx: Nginx) -> None:
    result = await run_check_now("https", rport=nginx.https, virtualhost="wrong.example.test",
                                 verify_tls=True, ca_file=nginx.ca_file)
    assert not result.up
    assert "certificate verify failed: Hostname mismatch" in result.reason


async def test_https_system_store_rejects_a_private_ca(nginx: Nginx) -> None:
    result = await run_check_now("https", rport=nginx.https, verify_tls=True)
    assert "certificate verify failed" in result.reason


async def test_https_missing_ca_file(nginx: Nginx, tmp_path: Path) -> None:
    result = await run_check_now("https", rport=nginx.https, ca_file=tmp_path / "none.pem")
    missing = tmp_path / "none.pem"
    assert result.reason == f"cannot read ca_file {missing}: No such file or directory"


async def test_https_to_a_plain_http_port(nginx: Nginx) -> None:
    up, reason, _ = await timed("https", rport=nginx.http)
    assert not up
    assert reason.startswith(f"TLS handshake with 127.0.0.1:{nginx.http} failed: ")


# ------------------------------------------------------------- item 2: http_proxy via tinyproxy

async def test_proxy_fetches_the_absolute_url(nginx: Nginx, tinyproxy: int) -> None:
    transcript = Transcript()
    url = f"http://127.0.0.1:{nginx.http}/health"
    result = await run_check_now("http_proxy", rport=tinyproxy, request=url, receive="OK",
                                 transcript=transcript)
    assert result.up, result.reason
    assert f"> GET {url} HTTP/1.1" in transcript.lines
    assert f"> Host: 127.0.0.1:{nginx.http}" in transcript.lines
    down = await run_check_now("http_proxy", rport=tinyproxy,
                               request=f"http://127.0.0.1:{nginx.http}/down")
    assert down.reason == "expected status 2xx,3xx, got HTTP 503 Service Temporarily Unavailable"


async def test_proxy_reports_an_unreachable_origin(tinyproxy: int) -> None:
    with closed_port() as port:
        result = await run_check_now("http_proxy", rport=tinyproxy,
                                     request=f"http://127.0.0.1:{port}/")
    assert not result.up
    assert result.reason.startswith("expected status 2xx,3xx, got HTTP 50")


async def test_proxy_needs_an_absolute_url() -> None:
    for request in (None, "/health", "health"):
        result = await run_check_now("http_proxy", rport=3128, request=request)
        assert result.reason == ("http_proxy needs an absolute URL in request "
                                 "(like http://www.example.com/)")
    tls = await run_check_now("http_proxy", rport=3128, request="https://x.example/")
    assert tls.reason == "http_proxy checks only http:// URLs, not 'https://x.example/'"


# -------------------------------------------- item 7: hostile servers, down within the deadline

OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
HOSTILE = [
    ("silent", silent(), "waiting for the HTTP status line from {ep} timed out after 0.45 s "
                         "(0 bytes received)"),
    ("trickle", trickle(OK_HEAD + b"OK"), "waiting for the HTTP status line from {ep} timed "
                                          "out after 0.45 s (1 bytes received)"),
    ("trickle-body", trickle(b"OK" * 50, prefix=OK_HEAD),
     "reading the HTTP body from {ep} timed out after 0.45 s"),
    ("garbage", garbage(), "{ep} did not answer HTTP: '\\x15\\x03\\x01\\x00\\x02\\x02P"),
    ("close-mid-headers", script(None, b"HTTP/1.1 200 OK\r\nContent-Le", close=True),
     "{ep} closed the connection in the middle of the HTTP headers (27 bytes received)"),
    ("close-mid-body", script(None, OK_HEAD + b"0123456789", close=True),
     "{ep} closed the connection after 10 of 100 body bytes"),
    ("close-before-status", script(None, b"", close=True),
     "{ep} closed the connection before sending a status line (0 bytes received)"),
    ("reset", script(None, b"HTTP/1.1 2", reset=True), "failed: connection reset by the server"),
    ("endless-body", endless(b"HTTP/1.1 200 OK\r\n\r\n"), "HTTP body from {ep} exceeds 1 MiB"),
    ("endless-headers", endless(b"HTTP/1.1 200 OK\r\n", b"X-Pad: " + b"p" * 1000 + b"\r\n"),
     "HTTP headers from {ep} exceed 64 KiB"),
    ("header-flood", endless(b"HTTP/1.1 200 OK\r\n", b"X: y\r\n" * 10000),
     "HTTP headers from {ep} exceed 64 KiB"),
    # Whole in one send, the head over the cap: the cap holds however the bytes arrive.
    ("oversized-head", script(None, b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 70000
                              + b"\r\nContent-Length: 2\r\n\r\nOK"),
     "HTTP headers from {ep} exceed 64 KiB"),
    ("interim-flood", endless(b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 1000),
     "HTTP headers from {ep} exceed 64 KiB"),
    ("garbage-status-line", script(None, b"HTTP/1.1 OK fine\r\nContent-Length: 2\r\n\r\nOK"),
     "{ep} sent a malformed HTTP status line: 'HTTP/1.1 OK fine'"),
    ("bad-chunk-size", script(None, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"-2\r\nOK\r\n0\r\n\r\n"),
     "{ep} sent a malformed chunked body (chunk size '-2')"),
    ("endless-chunk-size", endless(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                   b"0" * 1000),
     "{ep} sent a chunk-size line over 4096 bytes"),
    ("close-mid-chunk", script(None, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"64\r\nOK", close=True),
     "{ep} closed the connection in the middle of a chunked body"),
]


@pytest.mark.parametrize(("behaviour", "reason"), [h[1:] for h in HOSTILE],
                         ids=[h[0] for h in HOSTILE])
@pytest.mark.parametrize("check", ["http", "http_proxy"])
@pytest.mark.wallclock
async def test_hostile_http_server(check: str, behaviour: object, reason: str) -> None:
    request = "http://origin.example/" if check == "http_proxy" else None
    async with hostile_server(behaviour) as port:  # type: ignore[arg-type]
        up, got, elapsed = await timed(check, rport=port, request=request)
    assert not up
    assert reason.format(ep=f"127.0.0.1:{port}") in got
    assert elapsed < DEADLINE + SLACK


HOSTILE_TLS = [
    ("silent", silent(), "TLS handshake with {ep} timed out after 0.45 s"),
    ("stalled-handshake", tls_stall(), "TLS handshake with {ep} timed out after 0.45 s"),
    ("garbage", garbage(), "TLS handshake with {ep} failed: "),
    ("close", script(None, b"", close=True),
     "TLS handshake with {ep} failed: connection closed by the server"),
    ("trickle", trickle(b"\x16\x03\x03\x00\x64\x02\x00"),
     "TLS handshake with {ep} timed out after 0.45 s"),
]


@pytest.mark.parametrize(("behaviour", "reason"), [h[1:] for h in HOSTILE_TLS],
                         ids=[h[0] for h in HOSTILE_TLS])
@pytest.mark.wallclock
async def test_hostile_https_server(behaviour: object, reason: str) -> None:
    async with hostile_server(behaviour) as port:  # type: ignore[arg-type]
        up, got, elapsed = await timed("https", rport=port)
    assert not up
    assert got.startswith(reason.format(ep=f"127.0.0.1:{port}")), got
    assert elapsed < DEADLINE + SLACK


@pytest.mark.wallclock
async def test_https_silent_after_the_handshake() -> None:
    """A TLS server that completes the handshake, then never answers the request."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(server_context)

    async def tls_silent(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        await tls.do_handshake()
        while await tls.receive_some(65536):
            pass

    async with hostile_server(tls_silent) as port:
        up, got, elapsed = await timed("https", rport=port)
    assert not up
    assert got == (f"waiting for the HTTP status line from 127.0.0.1:{port} timed out after "
                   "0.45 s (0 bytes received)")
    assert elapsed < DEADLINE + SLACK


# ------------------------------------------------- item 6: no descriptor growth over 10,000 checks

async def run_many(count: int, batch: int, cut: float | None = None, **spec: object) -> set[bool]:
    """`count` checks, `batch` at a time; `cut` cancels each from outside (the engine's way)."""
    verdicts: set[bool] = set()

    async def one() -> None:
        if cut is None:
            verdicts.add((await run_check_now(**spec)).up)  # type: ignore[arg-type]
            return
        with trio.move_on_after(cut):
            verdicts.add((await run_check_now(**spec)).up)  # type: ignore[arg-type]

    for first in range(0, count, batch):
        async with trio.open_nursery() as nursery:
            for _ in range(min(batch, count - first)):
                nursery.start_soon(one)
    return verdicts


N = 10_000


async def test_no_fd_growth_real_servers(nginx: Nginx, tinyproxy: int) -> None:
    """10,000 checks per server kind: answers up and down, TLS failures, checks cancelled
    from outside at random points (connect, handshake, reading), refused connections."""
    await run_check_now("https", rport=nginx.https)  # warm-up: contexts, caches
    before = open_fds()
    half = N // 2
    assert await run_many(half, 250, check="http", rport=nginx.http, request="/health",
                          receive="OK") == {True}
    assert await run_many(half // 2, 250, check="http", rport=nginx.http,
                          request="/down") == {False}
    await run_many(half // 2, 250, cut=0.001, check="http", rport=nginx.http)
    assert await run_many(half, 250, check="https", rport=nginx.https, request="/health",
                          receive="OK") == {True}
    assert await run_many(half // 2, 250, check="https", rport=nginx.https, verify_tls=True,
                          ca_file=nginx.other_ca_file) == {False}
    await run_many(half // 2, 250, cut=0.002, check="https", rport=nginx.https)
    assert await run_many(N, 250, check="http_proxy", rport=tinyproxy, receive="OK",
                          request=f"http://127.0.0.1:{nginx.http}/health") == {True}
    with closed_port() as refused:
        assert await run_many(N, 1000, check="http", rport=refused) == {False}
    assert open_fds() == before


@pytest.mark.parametrize(("check", "behaviour", "negotiate_timeout"), [
    ("http", silent(), 0.1),
    ("https", tls_stall(), 0.1),
    ("http", garbage(), 1.0),
    ("http", script(None, OK_HEAD + b"0123", close=True), 1.0),
    ("http", endless(b"HTTP/1.1 200 OK\r\n\r\n", b"x" * 262144), 2.0),
], ids=["silent", "tls-stall", "garbage", "close-mid-body", "endless-body"])
async def test_no_fd_growth_hostile(check: str, behaviour: object,
                                    negotiate_timeout: float) -> None:
    """10,000 checks per misbehaviour (1,000 for the 1 MiB endless body): half run to their
    own verdict, half are cut by an outer deadline (the engine's) in mid-exchange."""
    count = 1_000 if negotiate_timeout == 2.0 else N
    before = open_fds()
    async with hostile_server(behaviour) as port:  # type: ignore[arg-type]
        verdicts = await run_many(count // 2, 1_000, check=check, rport=port,
                                  negotiate_timeout=negotiate_timeout)
        await run_many(count // 2, 1_000, cut=0.05, check=check, rport=port,
                       negotiate_timeout=negotiate_timeout)
    assert verdicts == {False}
    assert open_fds() == before


# ------------------------------------------------------ item 8: lbha check --once -v, for real

def test_lbha_check_shows_the_exchange(nginx: Nginx, tmp_path: Path) -> None:
    config = tmp_path / "lbha.toml"
    config.write_text(f"""\
[[virtual]]
name = "web"
address = "198.18.0.100"
ports = {nginx.http}
[virtual.check]
service = "http"
request = "health"
receive = "OK"
[[virtual.real]]
address = "127.0.0.1"
""")
    out = subprocess.run([*LBHA, "check", str(config), "198.18.0.100",
                          "--once", "-v"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == (f"web 127.0.0.1 (127.0.0.1:{nginx.http}) http: UP: HTTP 200 OK, "
                        "body contains 'OK'")
    assert "    > GET /health HTTP/1.1" in lines
    assert f"    > Host: 127.0.0.1:{nginx.http}" in lines
    assert "    < HTTP/1.1 200 OK" in lines
    assert "    < body: 14 bytes (content-length): OK from nginx\\n" in lines


def test_a_migrated_ldirectord_check_on_a_redirecting_page_stays_up(nginx: Nginx,
                                                                    tmp_path: Path) -> None:
    # ldirectord follows /moved to /health (200) and calls it up; so must the import.
    imported = import_ldirectord(
        f"virtual=198.18.0.1:80\n\treal=127.0.0.1:{nginx.http} masq\n\tservice=http\n"
        f"\trequest=\"/moved\"\n", "ldirectord.cf")
    config = tmp_path / "lbha.toml"
    config.write_text(f'[paths]\nrun_dir = "{tmp_path}/run"\n' + imported.toml)
    out = lbha("check", str(config), "198.18.0.1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.endswith(": UP: HTTP 302 Moved Temporarily\n"), out.stdout


def test_a_plugin_whose_default_fails_its_own_syntax_is_refused() -> None:
    class Broken:
        name = "broken-http"
        negotiate = True
        description = "a status default that is not one"
        options = MappingProxyType({"status": OptionSpec(default="2yy",
                                                         validate=http_module.parse_status)})

        async def check(self, request: CheckRequest) -> CheckResult:
            return CheckResult.success()

    with pytest.raises(PluginError, match="the default of option 'status' is not valid: "
                                          "'2yy' is not a code"):
        CheckRegistry().add(Broken())
