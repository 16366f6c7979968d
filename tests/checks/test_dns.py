"""`dns`: a real dnsmasq serving a test zone, and scripted hostile servers on loopback."""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rrset
import pytest
import trio
from cli_process import LBHA
from hostile import Answer, serve_udp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from resources import open_fds, timed

from lbha.checkapi import CheckRequest, CheckResult, Transcript
from lbha.checks.dns import (
    DnsCheck,
    Ignored,
    Truncated,
    build_question,
    describe_message,
    judge_reply,
)
from lbha.plugin_manager import PluginManager
from lbha.testing import check_spec, run_check_now, target

#: A skip for want of the real server is a failure in CI (tests/conftest.py).
pytestmark = pytest.mark.real_server

DEADLINE = 0.5
#: What the issue allows past the deadline for a verdict.
SLACK = 0.1

ZONE_HOSTS = "".join(f"198.18.1.{i} big.example.test\n" for i in range(1, 61))


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (the server binds it right after)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


class Dnsmasq:
    """dnsmasq serving example.test on 127.0.0.1:PORT (UDP and TCP), stopped by PID."""

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        if not os.access(binary, os.X_OK):
            pytest.skip("dnsmasq is not installed: run scripts/install-system-packages")
        hosts = tmp / "hosts"
        hosts.write_text(ZONE_HOSTS)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--no-daemon", "--conf-file=/dev/null", "--pid-file=",
             f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
             "--no-resolv", "--no-hosts", "--local=/example.test/",
             f"--addn-hosts={hosts}",
             "--host-record=www.example.test,192.0.2.10,2001:db8::10",
             "--txt-record=txt.example.test,no-address-here"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        query = dns.message.make_query("www.example.test", "A")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"dnsmasq exited: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.2)
                return
            except (OSError, dns.exception.Timeout):
                time.sleep(0.05)
        pytest.fail("dnsmasq did not answer within 5 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    server = Dnsmasq(tmp_path_factory.mktemp("dnsmasq"))
    yield server
    server.stop()


async def dns_check(port: int, *, protocol: str = "udp", deadline: float = DEADLINE,
                    transcript: Transcript | None = None, **spec: object) -> CheckResult:
    return await run_check_now("dns", rport=port, protocol=protocol, transcript=transcript,
                               negotiate_timeout=deadline, **spec)


def test_registered_through_the_entry_point() -> None:
    manager = PluginManager()
    manager.load_entry_points()
    assert isinstance(manager.register_checks().get("dns"), DnsCheck)


# ---------------------------------------------------------------- against dnsmasq


async def test_a_record_matches_receive(dnsmasq: Dnsmasq) -> None:
    transcript = Transcript()
    result = await dns_check(dnsmasq.port, request="/www.example.test", receive="192.0.2.10",
                             transcript=transcript)
    assert result == CheckResult(True, "A www.example.test = 192.0.2.10 matches '192.0.2.10'")
    assert transcript.lines[0].startswith("> query id ")
    assert transcript.lines[0].endswith(f"A www.example.test (UDP to 127.0.0.1:{dnsmasq.port})")
    assert "IN A 192.0.2.10" in transcript.lines[1]


async def test_regex_receive_and_aaaa(dnsmasq: Dnsmasq) -> None:
    result = await dns_check(dnsmasq.port, request="www.example.test", receive=r"^192\.0\.2\.\d+$",
                             regex=True)
    assert result.up, result.reason
    aaaa = await dns_check(dnsmasq.port, request="www.example.test", receive="2001:db8::10",
                           options={"type": "AAAA"})
    assert aaaa == CheckResult(True, "AAAA www.example.test = 2001:db8::10 matches '2001:db8::10'")


async def test_address_request_asks_ptr(dnsmasq: Dnsmasq) -> None:
    v4 = await dns_check(dnsmasq.port, request="/192.0.2.10", receive="www.example.test")
    assert v4 == CheckResult(
        True, "PTR 10.2.0.192.in-addr.arpa = www.example.test matches 'www.example.test'"
    )
    v6 = await dns_check(dnsmasq.port, request="2001:db8::10", receive="www.example")
    assert v6.up, v6.reason
    assert v6.reason.startswith("PTR 0.1.0.0.0.0.0.0.")


async def test_empty_receive_accepts_any_answer_of_the_type(dnsmasq: Dnsmasq) -> None:
    result = await dns_check(dnsmasq.port, request="www.example.test")
    assert result == CheckResult(True, "A www.example.test = 192.0.2.10")


async def test_wrong_expected_answer_is_down(dnsmasq: Dnsmasq) -> None:
    result = await dns_check(dnsmasq.port, request="www.example.test", receive="198.18.0.99")
    assert result == CheckResult(
        False, "A www.example.test = 192.0.2.10, which does not match '198.18.0.99'"
    )


async def test_nxdomain_and_empty_answer_are_down(dnsmasq: Dnsmasq) -> None:
    missing = await dns_check(dnsmasq.port, request="nope.example.test")
    assert missing == CheckResult(
        False, f"NXDOMAIN from 127.0.0.1:{dnsmasq.port}: nope.example.test does not exist"
    )
    nodata = await dns_check(dnsmasq.port, request="txt.example.test")
    assert nodata == CheckResult(
        False, f"127.0.0.1:{dnsmasq.port} has no A txt.example.test record (empty answer)"
    )
    refused = await dns_check(dnsmasq.port, request="www.elsewhere.test")
    assert refused == CheckResult(
        False, f"127.0.0.1:{dnsmasq.port} answered REFUSED for A www.elsewhere.test"
    )


async def test_truncated_udp_answer_is_asked_again_over_tcp(dnsmasq: Dnsmasq) -> None:
    transcript = Transcript()
    result = await dns_check(dnsmasq.port, request="big.example.test", receive="198.18.1.60",
                             transcript=transcript)
    assert result == CheckResult(True, "A big.example.test = 198.18.1.60 matches '198.18.1.60'")
    assert "TC" in transcript.lines[1]
    assert transcript.lines[2] == "* reply truncated (TC): asking again over TCP"
    assert transcript.lines[3].endswith(f"(TCP to 127.0.0.1:{dnsmasq.port})")


async def test_tcp_service_asks_over_tcp(dnsmasq: Dnsmasq) -> None:
    transcript = Transcript()
    result = await dns_check(dnsmasq.port, protocol="tcp", request="www.example.test",
                             transcript=transcript)
    assert result.up, result.reason
    assert transcript.lines[0].endswith(f"(TCP to 127.0.0.1:{dnsmasq.port})")
    forced = Transcript()
    assert (await dns_check(dnsmasq.port, protocol="tcp", request="www.example.test",
                            options={"transport": "udp"}, transcript=forced)).up
    assert "(UDP to" in forced.lines[0]


async def test_bad_configuration_is_down_with_its_reason(dnsmasq: Dnsmasq) -> None:
    assert (await dns_check(dnsmasq.port)).reason == \
        "no name to query: set request to a host name or an address"
    assert (await dns_check(dnsmasq.port, request="www.example.test",
                            options={"type": "MX"})).reason == \
        "option type = 'MX': expected A or AAAA"
    bad = await dns_check(dnsmasq.port, request="a" * 64 + ".example.test")
    assert not bad.up
    assert bad.reason.startswith(f"request '{'a' * 64}.example.test' is not a valid DNS name")


@pytest.mark.wallclock
async def test_stopped_server_is_down_at_once(tmp_path: Path) -> None:
    server = Dnsmasq(tmp_path)
    port = server.port
    assert (await dns_check(port, request="www.example.test")).up
    server.stop()
    udp, elapsed = await timed(dns_check(port, request="www.example.test", deadline=3.0))
    assert udp == CheckResult(
        False, f"DNS: UDP port 127.0.0.1:{port} unreachable (ICMP port unreachable)"
    )
    assert elapsed < 0.5
    tcp = await dns_check(port, protocol="tcp", request="www.example.test", deadline=3.0)
    assert tcp == CheckResult(False, f"DNS query to 127.0.0.1:{port} refused")


# ---------------------------------------------------------------- hostile servers

def response_to(wire: bytes, *, address: str = "192.0.2.10") -> dns.message.Message:
    query = dns.message.from_wire(wire)
    reply = dns.message.make_response(query)
    name = query.question[0].name
    reply.answer.append(dns.rrset.from_text(name, 60, "IN", "A", address))
    return reply


async def hostile(answer: Answer, **spec: object) -> tuple[CheckResult, float]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_udp, answer)
        outcome = await timed(dns_check(port, request="www.example.test", **spec))
        nursery.cancel_scope.cancel()
    return outcome


def assert_in_time(elapsed: float) -> None:
    assert elapsed <= DEADLINE + SLACK


async def test_garbage_is_ignored_until_the_deadline() -> None:
    def garbage(wire: bytes) -> list[bytes]:
        other_id = struct.pack("!H", (struct.unpack("!H", wire[:2])[0] + 1) & 0xFFFF)
        return [b"HTTP/1.1 400 Bad Request\r\n", b"\x00\x01junk", other_id + b"\xff" * 38]

    result, elapsed = await hostile(garbage)
    assert not result.up
    assert result.reason.startswith("no DNS reply for A www.example.test")
    assert "; ignored 3 (last: reply id " in result.reason
    assert_in_time(elapsed)


async def test_wrong_id_is_ignored_and_the_right_one_counts() -> None:
    def spoofed_first(wire: bytes) -> list[bytes]:
        reply = response_to(wire)
        good = reply.to_wire()
        reply.id ^= 0x5A5A
        return [reply.to_wire(), good]

    transcript = Transcript()
    result, _ = await hostile(spoofed_first, transcript=transcript)
    assert result.up, result.reason
    assert any(line.startswith("* ignored: reply id ") for line in transcript.lines)

    def only_spoofed(wire: bytes) -> list[bytes]:
        reply = response_to(wire)
        reply.id ^= 0x5A5A
        return [reply.to_wire()]

    result, elapsed = await hostile(only_spoofed)
    assert not result.up
    assert "ignored 1 (last: reply id" in result.reason
    assert_in_time(elapsed)


async def test_reply_for_another_question_is_ignored() -> None:
    def other_question(wire: bytes) -> list[bytes]:
        query = dns.message.from_wire(wire)
        other = dns.message.make_query("evil.example.test", "A")
        other.id = query.id
        return [response_to(other.to_wire()).to_wire()]

    result, elapsed = await hostile(other_question)
    assert not result.up
    assert "(last: reply for another question (evil.example.test. IN A))" in result.reason
    assert_in_time(elapsed)


@pytest.mark.wallclock
async def test_cut_reply_is_malformed() -> None:
    result, elapsed = await hostile(lambda wire: [response_to(wire).to_wire()[:-3]])
    assert not result.up
    assert result.reason.startswith("malformed DNS reply from 127.0.0.1:")
    assert elapsed < DEADLINE


async def test_servfail_is_down() -> None:
    def servfail(wire: bytes) -> list[bytes]:
        reply = dns.message.make_response(dns.message.from_wire(wire))
        reply.set_rcode(dns.rcode.SERVFAIL)
        return [reply.to_wire()]

    result, _ = await hostile(servfail)
    assert not result.up
    assert result.reason.endswith("answered SERVFAIL for A www.example.test")


def truncated(wire: bytes) -> list[bytes]:
    reply = dns.message.make_response(dns.message.from_wire(wire))
    reply.flags |= dns.flags.TC
    return [reply.to_wire()]


TcpServer = Callable[[trio.SocketStream], Awaitable[None]]


async def udp_and_tcp_on_one_port() -> tuple[trio.socket.SocketType, trio.socket.SocketType,
                                             int]:
    """A bound UDP socket and a listening TCP socket on the same free port."""
    for _ in range(50):
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            await udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            await tcp.bind(("127.0.0.1", port))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(8)
        return udp, tcp, port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


async def tc_then_tcp(tcp_handler: TcpServer) -> tuple[CheckResult, float, Transcript]:
    """UDP answers TC; TCP on the same port runs `tcp_handler`."""
    udp, tcp, port = await udp_and_tcp_on_one_port()
    with udp, tcp:

        async def udp_loop() -> None:
            while True:
                wire, peer = await udp.recvfrom(65535)
                for datagram in truncated(wire):
                    await udp.sendto(datagram, peer)

        async def tcp_loop() -> None:
            while True:
                conn, _ = await tcp.accept()
                nursery.start_soon(tcp_handler, trio.SocketStream(conn))

        transcript = Transcript()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(udp_loop)
            nursery.start_soon(tcp_loop)
            result, elapsed = await timed(
                dns_check(port, request="www.example.test", transcript=transcript)
            )
            nursery.cancel_scope.cancel()
    return result, elapsed, transcript


async def read_query(stream: trio.SocketStream) -> bytes:
    data = b""
    while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
        data += await stream.receive_some(4096)
    return data[2:]


async def test_tc_reply_then_good_tcp_answer() -> None:
    async def good(stream: trio.SocketStream) -> None:
        async with stream:
            reply = response_to(await read_query(stream)).to_wire()
            await stream.send_all(struct.pack("!H", len(reply)) + reply)

    result, _, transcript = await tc_then_tcp(good)
    assert result == CheckResult(True, "A www.example.test = 192.0.2.10")
    assert "* reply truncated (TC): asking again over TCP" in transcript.lines


@pytest.mark.wallclock
async def test_tcp_closed_mid_reply_is_down() -> None:
    async def half(stream: trio.SocketStream) -> None:
        async with stream:
            reply = response_to(await read_query(stream)).to_wire()
            await stream.send_all(struct.pack("!H", len(reply)) + reply[:10])

    result, elapsed, _ = await tc_then_tcp(half)
    assert not result.up
    assert result.reason.endswith("closed the TCP connection before a complete reply "
                                  "(10 bytes of it)")
    assert elapsed < DEADLINE


async def test_tcp_trickle_is_down_at_the_deadline() -> None:
    async def trickle(stream: trio.SocketStream) -> None:
        async with stream:
            reply = response_to(await read_query(stream)).to_wire()
            for byte in struct.pack("!H", len(reply)) + reply:
                await stream.send_all(bytes([byte]))
                await trio.sleep(0.1)

    result, elapsed, _ = await tc_then_tcp(trickle)
    assert not result.up
    assert result.reason.startswith("no DNS reply for A www.example.test")
    assert_in_time(elapsed)


@pytest.mark.wallclock
async def test_udp_retransmits_within_the_deadline() -> None:
    seen: list[bytes] = []

    def second_time_lucky(wire: bytes) -> list[bytes]:
        seen.append(wire)
        return [response_to(wire).to_wire()] if len(seen) == 2 else []

    transcript = Transcript()
    result, elapsed = await hostile(second_time_lucky, deadline=2.0, transcript=transcript)
    assert result.up, result.reason
    assert 1.0 <= elapsed < 1.5
    assert seen[0] == seen[1]
    assert "retransmission 1" in transcript.lines[1]


# ---------------------------------------------------------------- no socket growth


async def test_ten_thousand_checks_leave_no_socket_behind(dnsmasq: Dnsmasq) -> None:
    """Up, mismatch, refused, silent (own deadline) and cancelled from outside, concurrently."""
    dead_port = free_port()
    rng = random.Random(7)
    counts = {"up": 0, "down": 0, "cancelled": 0, "finished first": 0}

    async def one(kind: int, silent_port: int) -> None:
        if kind == 4:
            with trio.move_on_after(rng.uniform(0, 0.02)):
                await dns_check(dnsmasq.port, request="www.example.test")
                counts["finished first"] += 1
                return
            counts["cancelled"] += 1
            return
        port = {0: dnsmasq.port, 1: dnsmasq.port, 2: dead_port, 3: silent_port}[kind]
        receive = "198.18.0.99" if kind == 1 else None
        result = await dns_check(port, request="www.example.test", receive=receive,
                                 deadline=0.2 if kind == 3 else 3.0)
        counts["up" if result.up else "down"] += 1
        assert result.up == (kind == 0), result.reason

    async with trio.open_nursery() as servers:
        silent_port = await servers.start(serve_udp, lambda wire: [])
        before = open_fds()
        limiter = trio.CapacityLimiter(200)

        async def limited(kind: int) -> None:
            async with limiter:
                await one(kind, silent_port)

        async with trio.open_nursery() as nursery:
            for i in range(10_000):
                nursery.start_soon(limited, i % 5 if i % 25 else 3)
        after = open_fds()
        servers.cancel_scope.cancel()
    assert sum(counts.values()) == 10_000
    assert counts["up"] == 1600
    assert after == before, f"{after - before} descriptors leaked"


# ---------------------------------------------------------------- fuzzing the reply handling


def _query() -> dns.message.Message:
    return dns.message.make_query("www.example.test", "A", use_edns=False)


QUERY = _query()
QUESTION = build_question("www.example.test")
GOOD = response_to(QUERY.to_wire()).to_wire()
HEADER = GOOD[:12]


def _judge(wire: bytes, *, tcp: bool, receive: str | None = "192.0.2") -> object:
    outcome = judge_reply(QUERY, QUESTION, wire, receive, False, "127.0.0.1:53", tcp=tcp)
    assert isinstance(outcome, CheckResult | Ignored | Truncated)
    assert describe_message(wire)
    return outcome


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=600), st.booleans())
def test_fuzz_any_bytes_get_a_verdict(wire: bytes, tcp: bool) -> None:
    _judge(wire, tcp=tcp)


@FUZZ
@given(st.binary(max_size=600), st.booleans())
def test_fuzz_our_header_with_any_body(body: bytes, tcp: bool) -> None:
    _judge(HEADER + body, tcp=tcp)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), max_size=8),
       st.integers(12, len(GOOD)), st.booleans())
def test_fuzz_mutated_good_replies(flips: list[tuple[int, int]], cut: int, tcp: bool) -> None:
    wire = bytearray(GOOD)
    for index, value in flips:
        wire[index] = value
    outcome = _judge(bytes(wire[:cut]), tcp=tcp)
    if not flips and cut == len(GOOD):
        assert outcome == CheckResult(True, "A www.example.test = 192.0.2.10 matches '192.0.2'")


# ---------------------------------------------------------------- the CLI

CLI_CONFIG = """\
[paths]
run_dir = "{tmp}/run"
state_dir = "{tmp}/state"

[[virtual]]
name = "resolver"
address = "198.18.0.53"
ports = 53
protocol = "udp"
forwarding = "nat"
[virtual.check]
type = "negotiate"
service = "dns"
request = "www.example.test"
receive = "192.0.2.10"
negotiate_timeout = "1s"
[[virtual.real]]
name = "good"
address = "127.0.0.1"
port = {port}
[[virtual.real]]
name = "gone"
address = "127.0.0.1"
port = {dead}
"""


def test_lbha_check_once_verbose_shows_the_exchange(dnsmasq: Dnsmasq, tmp_path: Path) -> None:
    dead = free_port()
    config = tmp_path / "lbha.toml"
    config.write_text(CLI_CONFIG.format(tmp=tmp_path, port=dnsmasq.port, dead=dead))
    out = subprocess.run([*LBHA, "check", str(config), "resolver",
                          "--once", "-v"], capture_output=True, text=True, timeout=30,
                         check=False)
    assert out.returncode == 1, out.stderr  # "gone" is down
    good = f"resolver good (127.0.0.1:{dnsmasq.port}) dns: UP: " \
        "A www.example.test = 192.0.2.10 matches '192.0.2.10'"
    assert good in out.stdout
    assert f"resolver gone (127.0.0.1:{dead}) dns: DOWN: DNS: UDP port 127.0.0.1:{dead} " \
        "unreachable (ICMP port unreachable)" in out.stdout
    assert f"A www.example.test (UDP to 127.0.0.1:{dnsmasq.port})" in out.stdout
    assert "IN A 192.0.2.10" in out.stdout


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=300), max_size=4), st.booleans())
async def test_fuzz_end_to_end_no_exception_escapes(datagrams: list[bytes],
                                                   our_id: bool) -> None:
    """The check itself (not the engine's safety net) turns any datagrams into a verdict."""
    def answer(wire: bytes) -> list[bytes]:
        return [wire[:2] + d[2:] if our_id else d for d in datagrams]

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_udp, answer)
        spec = check_spec("dns", request="www.example.test")
        request = CheckRequest(target(rport=port, protocol="udp"), spec, spec.options, 0.1,
                               Transcript())
        result = await DnsCheck().check(request)
        nursery.cancel_scope.cancel()
    assert isinstance(result, CheckResult)
    assert result.reason
