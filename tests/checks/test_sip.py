"""`sip`: a real SIP UAS (sipp with OPTIONS scenarios) and scripted hostile servers."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
from cli_process import LBHA
from hostile import Answer, serve_udp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from resources import free_port, open_fds, timed

from lbha.checkapi import CheckRequest, CheckResult, Transcript
from lbha.checks.sip import (
    MAX_HEAD,
    Ignored,
    Provisional,
    SipCheck,
    SipParseError,
    Transaction,
    build_options,
    judge_response,
    parse_response,
    split_message,
)
from lbha.plugin_manager import PluginManager
from lbha.testing import check_spec, run_check_now, target

#: A skip for want of the real server is a failure in CI (tests/conftest.py).
pytestmark = pytest.mark.real_server

DEADLINE = 0.5
#: What the issue allows past the deadline for a verdict.
SLACK = 0.1
USER = "alice@example.test"

#: Answers OPTIONS for alice with 200 and anybody else with 403 Forbidden.
UAS = """\
<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="options-uas">
  <recv request="OPTIONS">
    <action>
      <ereg regexp="sip:alice@" search_in="hdr" header="To:" assign_to="known"/>
    </action>
  </recv>
  <nop next="ok" test="known"/>
  <send><![CDATA[
SIP/2.0 403 Forbidden
[last_Via:]
[last_From:]
[last_To:];tag=[pid]T[call_number]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
  <nop next="end"/>
  <label id="ok"/>
  <send><![CDATA[
SIP/2.0 100 Trying
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=[pid]T[call_number]
[last_Call-ID:]
[last_CSeq:]
Contact: <sip:[local_ip]:[local_port];transport=[transport]>
Allow: OPTIONS
Content-Length: 0

]]></send>
  <label id="end"/>
</scenario>
"""

#: Answers every OPTIONS with 404 Not Found.
NOT_FOUND = """\
<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="options-404">
  <recv request="OPTIONS"/>
  <send><![CDATA[
SIP/2.0 404 Not Found
[last_Via:]
[last_From:]
[last_To:];tag=[pid]T[call_number]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
</scenario>
"""


def options_probe() -> bytes:
    return build_options(Transaction.new(), USER, ("127.0.0.1", 9), "UDP")


class Sipp:
    """sipp running one scenario on 127.0.0.1:PORT (UDP, or TCP), stopped by PID."""

    def __init__(self, tmp: Path, scenario: str, *, tcp: bool = False) -> None:
        binary = shutil.which("sipp")
        if binary is None:
            pytest.skip("sipp is not installed (package sip-tester): run "
                        "scripts/install-system-packages")
        tmp.mkdir(parents=True, exist_ok=True)
        xml = tmp / "scenario.xml"
        xml.write_text(scenario)
        self.tcp = tcp
        self.port = free_port(socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
        self.proc = subprocess.Popen(
            [binary, "-sf", str(xml), "-i", "127.0.0.1", "-p", str(self.port), "-nostdin",
             *(["-t", "t1"] if tcp else [])],
            cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"sipp exited with {self.proc.returncode}")
            try:
                if self.tcp:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                    return
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(0.2)
                    sock.connect(("127.0.0.1", self.port))
                    sock.send(options_probe())
                    sock.recv(4096)
                    return
            except OSError:
                time.sleep(0.05)
        pytest.fail("sipp did not answer within 5 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def sipp_udp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sipp]:
    server = Sipp(tmp_path_factory.mktemp("sipp-udp"), UAS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sipp_tcp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sipp]:
    server = Sipp(tmp_path_factory.mktemp("sipp-tcp"), UAS, tcp=True)
    yield server
    server.stop()


async def sip_check(port: int, *, protocol: str = "udp", deadline: float = DEADLINE,
                    login: str | None = USER, transcript: Transcript | None = None,
                    **spec: object) -> CheckResult:
    return await run_check_now("sip", rport=port, protocol=protocol, login=login,
                               transcript=transcript, negotiate_timeout=deadline, **spec)


def test_registered_through_the_entry_point() -> None:
    manager = PluginManager()
    manager.load_entry_points()
    assert isinstance(manager.register_checks().get("sip"), SipCheck)


# ---------------------------------------------------------------- against sipp


async def test_options_over_udp_is_up_after_skipping_1xx(sipp_udp: Sipp) -> None:
    transcript = Transcript()
    result = await sip_check(sipp_udp.port, transcript=transcript)
    assert result == CheckResult(True, f"SIP 200 OK from 127.0.0.1:{sipp_udp.port}")
    sent = [line[4:] for line in transcript.lines if line.startswith(">   ")]
    assert sent[0] == f"OPTIONS sip:{USER} SIP/2.0"
    via = sent[1]
    assert via.startswith("Via: SIP/2.0/UDP 127.0.0.1:")
    assert ";branch=z9hG4bK" in via
    assert via.endswith(";rport")
    assert "Max-Forwards: 70" in sent
    assert f"To: <sip:{USER}>" in sent
    assert any(line.startswith(f"From: <sip:{USER}>;tag=") for line in sent)
    assert any(line.startswith("Call-ID: ") for line in sent)
    assert any(line.startswith("CSeq: ") and line.endswith(" OPTIONS") for line in sent)
    assert any(line.startswith("Contact: <sip:alice@127.0.0.1:") for line in sent)
    assert sent[-1] == "Content-Length: 0"
    received = [line for line in transcript.lines if line.startswith("< ")]
    assert received[0].startswith("< SIP/2.0 100 Trying")
    assert received[1].startswith("< SIP/2.0 200 OK")


async def test_options_over_tcp_for_a_tcp_service(sipp_tcp: Sipp) -> None:
    transcript = Transcript()
    result = await sip_check(sipp_tcp.port, protocol="tcp", transcript=transcript)
    assert result == CheckResult(True, f"SIP 200 OK from 127.0.0.1:{sipp_tcp.port}")
    assert transcript.lines[0] == f"> OPTIONS over TCP to 127.0.0.1:{sipp_tcp.port}:"
    assert transcript.lines[2].startswith(">   Via: SIP/2.0/TCP 127.0.0.1:")


async def test_wrong_user_is_down_with_the_status(sipp_udp: Sipp, sipp_tcp: Sipp) -> None:
    udp = await sip_check(sipp_udp.port, login="mallory@example.test")
    assert udp == CheckResult(False, f"SIP 403 Forbidden from 127.0.0.1:{sipp_udp.port}")
    tcp = await sip_check(sipp_tcp.port, protocol="tcp", login="sip:mallory@example.test")
    assert tcp == CheckResult(False, f"SIP 403 Forbidden from 127.0.0.1:{sipp_tcp.port}")


async def test_default_login_is_lbha_at_this_host(sipp_udp: Sipp) -> None:
    transcript = Transcript()
    result = await sip_check(sipp_udp.port, login=None, transcript=transcript)
    assert not result.up  # the scenario only knows alice
    assert transcript.lines[1] == f">   OPTIONS sip:lbha@{socket.gethostname()} SIP/2.0"


async def test_not_found_is_down(tmp_path: Path) -> None:
    server = Sipp(tmp_path, NOT_FOUND)
    try:
        result = await sip_check(server.port)
    finally:
        server.stop()
    assert result == CheckResult(False, f"SIP 404 Not Found from 127.0.0.1:{server.port}")


@pytest.mark.wallclock
async def test_stopped_server_is_down_at_once(tmp_path: Path) -> None:
    server = Sipp(tmp_path, UAS)
    port = server.port
    assert (await sip_check(port)).up
    server.stop()
    result, elapsed = await timed(sip_check(port, deadline=3.0))
    assert result == CheckResult(
        False, f"SIP: UDP port 127.0.0.1:{port} unreachable (ICMP port unreachable)"
    )
    assert elapsed < 0.5
    tcp = await sip_check(port, protocol="tcp", deadline=3.0)
    assert tcp == CheckResult(False, f"SIP OPTIONS to 127.0.0.1:{port} refused")


@pytest.mark.wallclock
async def test_bad_login_and_option_are_down_with_their_reason() -> None:
    assert (await sip_check(9, login="alice smith@example.test")).reason == \
        "login 'alice smith@example.test' is not a SIP user@host"
    assert (await sip_check(9, options={"transport": "sctp"})).reason == \
        "option transport = 'sctp': expected auto, udp or tcp"


# ---------------------------------------------------------------- hostile servers


def header(request: bytes, name: str) -> str:
    for line in request.decode().split("\r\n"):
        if line.lower().startswith(name.lower() + ":"):
            return line
    raise AssertionError(f"no {name} in {request!r}")


def response(request: bytes, status: str = "200 OK", **replace: str) -> bytes:
    """A response to `request`, with some of its headers replaced (name -> whole line)."""
    lines = [f"SIP/2.0 {status}"]
    for name in ("Via", "From", "To", "Call-ID", "CSeq"):
        lines.append(replace.get(name.replace("-", "_"), header(request, name)))
    return ("\r\n".join([*lines, "Content-Length: 0", "", ""])).encode()


async def hostile(answer: Answer, **spec: object) -> tuple[CheckResult, float]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_udp, answer)
        outcome = await timed(sip_check(port, **spec))
        nursery.cancel_scope.cancel()
    return outcome


def assert_in_time(elapsed: float) -> None:
    assert elapsed <= DEADLINE + SLACK


async def test_garbage_and_cut_responses_are_ignored() -> None:
    def junk(request: bytes) -> list[bytes]:
        return [b"\x00\xff garbage", b"SIP/2.0 200 OK\r\n", response(request)[:40]]

    result, elapsed = await hostile(junk)
    assert not result.up
    assert "; ignored 3 (last: response for another call (Call-ID 'missing'))" in result.reason
    assert_in_time(elapsed)


async def test_response_to_another_call_is_ignored() -> None:
    def other_call(request: bytes) -> list[bytes]:
        return [response(request, Call_ID="Call-ID: somebody-else")]

    result, elapsed = await hostile(other_call)
    assert not result.up
    assert "(last: response for another call (Call-ID 'somebody-else'))" in result.reason
    assert_in_time(elapsed)

    def other_then_ours(request: bytes) -> list[bytes]:
        return [response(request, Call_ID="Call-ID: somebody-else"),
                response(request, CSeq="CSeq: 1 OPTIONS"),
                response(request, Via="Via: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKother"),
                b"OPTIONS sip:lbha@director SIP/2.0\r\nContent-Length: 0\r\n\r\n",
                response(request)]

    transcript = Transcript()
    result, _ = await hostile(other_then_ours, transcript=transcript)
    assert result.up, result.reason
    ignored = [line for line in transcript.lines if line.startswith("* ignored: ")]
    assert ignored == [
        "* ignored: response for another call (Call-ID 'somebody-else')",
        "* ignored: response for another request (CSeq '1 OPTIONS')",
        "* ignored: response for another transaction (Via branch 'z9hG4bKother')",
        "* ignored: not a SIP response: a OPTIONS request, not a response",
    ]


async def test_provisional_only_is_down_at_the_deadline() -> None:
    result, elapsed = await hostile(lambda request: [response(request, "180 Ringing")])
    assert not result.up
    assert result.reason.endswith("; only 180 Ringing")
    assert_in_time(elapsed)


@pytest.mark.wallclock
async def test_flood_of_non_final_responses_is_bounded() -> None:
    result, elapsed = await hostile(lambda request: [response(request, "100 Trying")] * 70)
    assert not result.up
    assert result.reason.startswith("64 messages from 127.0.0.1:")
    assert result.reason.endswith("and no final response to our OPTIONS (last: 100 Trying)")
    assert elapsed < DEADLINE


async def test_tcp_keepalive_flood_does_not_pile_up() -> None:
    async def crlf(stream: trio.SocketStream) -> None:
        async with stream:
            await read_request(stream)
            for _ in range(2000):
                await stream.send_all(b"\r\n" * 512)
                await trio.sleep(0.001)

    result, elapsed = await tcp_hostile(crlf)
    assert not result.up
    assert result.reason.startswith("no final SIP response from 127.0.0.1:")
    assert_in_time(elapsed)


async def test_authentication_challenge_is_down_with_a_hint() -> None:
    result, _ = await hostile(lambda request: [response(request, "401 Unauthorized")])
    assert not result.up
    assert result.reason.endswith(
        "SIP 401 Unauthorized from 127.0.0.1:{} (the sip check does not authenticate: let "
        "the director's OPTIONS through)".format(result.reason.split(":")[1].split(" ")[0])
    )


@pytest.mark.wallclock
async def test_udp_retransmits_per_timer_e() -> None:
    seen: list[bytes] = []

    def third_time_lucky(request: bytes) -> list[bytes]:
        seen.append(request)
        return [response(request)] if len(seen) == 3 else []

    transcript = Transcript()
    result, elapsed = await hostile(third_time_lucky, deadline=3.0, transcript=transcript)
    assert result.up, result.reason
    assert 1.5 <= elapsed < 2.0  # sent at 0, T1 = 0.5 and 0.5 + 2 * T1 = 1.5
    assert seen[0] == seen[1] == seen[2]
    assert "> retransmission 2 of the OPTIONS" in transcript.lines


TcpHandler = Callable[[trio.SocketStream], Awaitable[None]]


async def tcp_hostile(handler: TcpHandler) -> tuple[CheckResult, float]:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]

        async def accept_loop() -> None:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(handler, trio.SocketStream(conn))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_loop)
            outcome = await timed(sip_check(port, protocol="tcp"))
            nursery.cancel_scope.cancel()
    return outcome


async def read_request(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(4096)
    return data


@pytest.mark.wallclock
async def test_tcp_close_mid_response_is_down() -> None:
    async def half(stream: trio.SocketStream) -> None:
        async with stream:
            request = await read_request(stream)
            await stream.send_all(response(request, "100 Trying") + response(request)[:30])

    result, elapsed = await tcp_hostile(half)
    assert not result.up
    assert result.reason.endswith("closed the TCP connection without a final response after "
                                  "100 Trying (30 bytes of a message)")
    assert elapsed < DEADLINE


async def test_tcp_trickle_is_down_at_the_deadline() -> None:
    async def trickle(stream: trio.SocketStream) -> None:
        async with stream:
            for byte in response(await read_request(stream)):
                await stream.send_all(bytes([byte]))
                await trio.sleep(0.05)

    result, elapsed = await tcp_hostile(trickle)
    assert not result.up
    assert result.reason.startswith("no final SIP response from 127.0.0.1:")
    assert_in_time(elapsed)


@pytest.mark.wallclock
async def test_tcp_endless_header_is_garbage() -> None:
    async def endless(stream: trio.SocketStream) -> None:
        async with stream:
            await read_request(stream)
            await stream.send_all(b"SIP/2.0 200 OK\r\n" + b"X-Filler: " + b"x" * MAX_HEAD)
            await trio.sleep_forever()

    result, elapsed = await tcp_hostile(endless)
    assert not result.up
    assert result.reason.endswith(f"no end of the header section within {MAX_HEAD} bytes")
    assert elapsed < DEADLINE


async def test_tcp_response_with_a_body_and_keepalives_is_framed() -> None:
    async def chatty(stream: trio.SocketStream) -> None:
        async with stream:
            request = await read_request(stream)
            provisional = response(request, "100 Trying").replace(
                b"Content-Length: 0", b"Content-Length: 5") + b"hello"
            await stream.send_all(b"\r\n\r\n" + provisional + b"\r\n" + response(request))

    result, _ = await tcp_hostile(chatty)
    assert result.up, result.reason


# ---------------------------------------------------------------- no socket growth


async def test_ten_thousand_checks_leave_no_socket_behind(sipp_udp: Sipp,
                                                          sipp_tcp: Sipp) -> None:
    """UDP and TCP up, 403, refused, silent and cancelled from outside, concurrently."""
    dead_port = free_port(socket.SOCK_DGRAM)
    rng = random.Random(11)
    counts = {"up": 0, "down": 0, "cancelled": 0, "finished first": 0}

    async def one(kind: int, silent_port: int) -> None:
        if kind == 5:
            with trio.move_on_after(rng.uniform(0, 0.02)):
                await sip_check(sipp_udp.port, deadline=3.0)
                counts["finished first"] += 1
                return
            counts["cancelled"] += 1
            return
        if kind == 1:
            result = await sip_check(sipp_tcp.port, protocol="tcp", deadline=3.0)
        else:
            port = {0: sipp_udp.port, 2: sipp_udp.port, 3: dead_port, 4: silent_port}[kind]
            login = "mallory@example.test" if kind == 2 else USER
            result = await sip_check(port, login=login, deadline=0.2 if kind == 4 else 3.0)
        counts["up" if result.up else "down"] += 1
        assert result.up == (kind in (0, 1)), result.reason

    async with trio.open_nursery() as servers:
        silent_port = await servers.start(serve_udp, lambda request: [])
        before = open_fds()
        limiter = trio.CapacityLimiter(100)

        async def limited(kind: int) -> None:
            async with limiter:
                await one(kind, silent_port)

        async with trio.open_nursery() as nursery:
            for i in range(10_000):
                nursery.start_soon(limited, i % 6 if i % 30 else 4)
        after = open_fds()
        servers.cancel_scope.cancel()
    assert sum(counts.values()) == 10_000
    assert counts["up"] == 3000
    assert after == before, f"{after - before} descriptors leaked"


# ---------------------------------------------------------------- fuzzing the parser

TX = Transaction("call-1", 42, "z9hG4bKours", "tag")
REQUEST = build_options(TX, USER, ("127.0.0.1", 5062), "UDP")
GOOD = response(REQUEST)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def verdict(data: bytes) -> object:
    outcome = judge_response(TX, data, "127.0.0.1:5060")
    assert isinstance(outcome, CheckResult | Ignored | Provisional)
    return outcome


def test_our_own_response_is_up() -> None:
    assert verdict(GOOD) == CheckResult(True, "SIP 200 OK from 127.0.0.1:5060")
    compact = GOOD.replace(b"Call-ID:", b"i:").replace(b"Via:", b"v:")
    assert verdict(compact) == CheckResult(True, "SIP 200 OK from 127.0.0.1:5060")
    folded = GOOD.replace(b"CSeq: 42", b"CSeq:\r\n 42")
    assert verdict(folded) == CheckResult(True, "SIP 200 OK from 127.0.0.1:5060")


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_any_bytes_get_a_verdict(data: bytes) -> None:
    verdict(data)
    with contextlib.suppress(SipParseError):
        split_message(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(GOOD)))
def test_fuzz_mutated_responses(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(GOOD)
    for index, value in flips:
        data[index] = value
    outcome = verdict(bytes(data[:cut]))
    if not flips and cut == len(GOOD):
        assert outcome == CheckResult(True, "SIP 200 OK from 127.0.0.1:5060")


@FUZZ
@given(st.text(max_size=40), st.lists(st.tuples(st.text(max_size=20), st.text(max_size=80)),
                                      max_size=12), st.binary(max_size=200))
def test_fuzz_structured_responses(status: str, headers: list[tuple[str, str]],
                                   body: bytes) -> None:
    lines = [f"SIP/2.0 {status}", *(f"{name}: {value}" for name, value in headers)]
    data = "\r\n".join([*lines, "", ""]).encode("utf-8", errors="surrogatepass") + body
    verdict(data)
    try:
        parsed = parse_response(data)
    except SipParseError:
        return
    assert 100 <= parsed.code <= 699
    try:
        framed = split_message(data)
    except SipParseError:
        return
    assert framed is None or framed[1] <= len(data)


# ---------------------------------------------------------------- the CLI

CLI_CONFIG = """\
[paths]
run_dir = "{tmp}/run"
state_dir = "{tmp}/state"

[[virtual]]
name = "voice"
address = "198.18.0.60"
ports = 5060
protocol = "udp"
forwarding = "nat"
[virtual.check]
type = "negotiate"
service = "sip"
login = "{user}"
negotiate_timeout = "1s"
[[virtual.real]]
name = "pbx"
address = "127.0.0.1"
port = {port}
[[virtual.real]]
name = "gone"
address = "127.0.0.1"
port = {dead}
"""


def test_lbha_check_once_verbose_shows_the_exchange(sipp_udp: Sipp, tmp_path: Path) -> None:
    dead = free_port(socket.SOCK_DGRAM)
    config = tmp_path / "lbha.toml"
    config.write_text(CLI_CONFIG.format(tmp=tmp_path, user=USER, port=sipp_udp.port, dead=dead))
    out = subprocess.run([*LBHA, "check", str(config), "voice",
                          "--once", "-v"], capture_output=True, text=True, timeout=30,
                         check=False)
    assert out.returncode == 1, out.stderr  # "gone" is down
    assert f"voice pbx (127.0.0.1:{sipp_udp.port}) sip: UP: SIP 200 OK from " \
        f"127.0.0.1:{sipp_udp.port}" in out.stdout
    assert f"voice gone (127.0.0.1:{dead}) sip: DOWN: SIP: UDP port 127.0.0.1:{dead} " \
        "unreachable (ICMP port unreachable)" in out.stdout
    assert f"OPTIONS sip:{USER} SIP/2.0" in out.stdout
    assert "< SIP/2.0 100 Trying" in out.stdout
    assert "< SIP/2.0 200 OK" in out.stdout


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(st.binary(max_size=300),
                          st.sampled_from([GOOD, GOOD[:50], b"SIP/2.0 100 Trying\r\n\r\n"])),
                max_size=4))
async def test_fuzz_end_to_end_no_exception_escapes(datagrams: list[bytes]) -> None:
    """The check itself (not the engine's safety net) turns any datagrams into a verdict."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_udp, lambda request: datagrams)
        spec = check_spec("sip", login=USER)
        request = CheckRequest(target(rport=port, protocol="udp"), spec, spec.options, 0.1,
                               Transcript())
        result = await SipCheck().check(request)
        nursery.cancel_scope.cancel()
    assert isinstance(result, CheckResult)
    assert result.reason
