"""`ping`: the echo parser in isolation (hostile bytes included) and real echoes on loopback.

The datagram-socket path needs `net.ipv4.ping_group_range` to admit us; rather than change the
host's sysctl, those cases run in a private network namespace (`unshare --net`, root only)
whose only interface is its own loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from lbha.checkapi import Transcript
from lbha.checks.ping import (
    PingCheck,
    Verdict,
    checksum,
    echo_request,
    parse_reply,
)
from lbha.plugin_manager import PluginManager

CHECK = PingCheck()
ID, SEQ = 0x1234, 1


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _can_raw() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
needs_raw = pytest.mark.skipif(not _can_raw(), reason="raw ICMP sockets need CAP_NET_RAW")


# ------------------------------------------------------------------ packets, built by hand


def ipv4_header(payload_len: int, proto: int = 1, ihl: int = 5) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + payload_len, 0, 0, 64, proto, 0,
        bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]),
    )
    return header + b"\0" * (ihl * 4 - 20)


def ipv6_header(payload_len: int, next_header: int = 58) -> bytes:
    loopback = bytes(15) + b"\1"
    return struct.pack("!IHBB16s16s", 0x60000000, payload_len, next_header, 64,
                       loopback, loopback)


def icmp(kind: int, code: int, rest: bytes, body: bytes = b"", v4: bool = True) -> bytes:
    packet = struct.pack("!BBH", kind, code, 0) + rest + body
    if v4:
        packet = packet[:2] + struct.pack("!H", checksum(packet)) + packet[4:]
    return packet


def reply4(ident: int = ID, seq: int = SEQ) -> bytes:
    return icmp(0, 0, struct.pack("!HH", ident, seq), b"x" * 56)


def reply6(ident: int = ID, seq: int = SEQ) -> bytes:
    return icmp(129, 0, struct.pack("!HH", ident, seq), b"x" * 56, v4=False)


def error4(kind: int, code: int, ident: int = ID, seq: int = SEQ) -> bytes:
    request = echo_request(4, ident, seq)[:8]
    return icmp(kind, code, b"\0" * 4, ipv4_header(64) + request)


def error6(kind: int, code: int, ident: int = ID, seq: int = SEQ) -> bytes:
    request = echo_request(6, ident, seq)
    return icmp(kind, code, b"\0" * 4, ipv6_header(len(request)) + request, v4=False)


def parse4(packet: bytes, ip_header: bool = False) -> Verdict | None:
    return parse_reply(packet, version=4, ip_header=ip_header, ident=ID, sequences={SEQ})


def parse6(packet: bytes) -> Verdict | None:
    return parse_reply(packet, version=6, ip_header=False, ident=ID, sequences={SEQ})


# ------------------------------------------------------------------ parser


def test_checksum_matches_rfc1071_example() -> None:
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert checksum(b"\xff") == 0x00FF  # odd length is padded with a zero byte


def test_echo_request_v4_checks_out_and_v6_is_left_to_the_kernel() -> None:
    request = echo_request(4, ID, 7)
    assert len(request) == 64
    assert request[0] == 8
    assert struct.unpack("!HH", request[4:8]) == (ID, 7)
    assert checksum(request) == 0
    assert echo_request(6, ID, 7)[:4] == bytes([128, 0, 0, 0])


def test_matching_reply_is_up() -> None:
    assert parse4(reply4()) == Verdict(True, "echo reply")
    assert parse4(ipv4_header(64) + reply4(), ip_header=True) == Verdict(True, "echo reply")
    assert parse6(reply6()) == Verdict(True, "echo reply")


def test_reply_to_someone_else_is_ignored() -> None:
    assert parse4(reply4(ident=ID + 1)) is None
    assert parse4(reply4(seq=SEQ + 1)) is None
    assert parse6(reply6(ident=ID + 1)) is None
    assert parse6(reply6(seq=9)) is None


def test_any_of_our_sequences_counts() -> None:
    late = reply4(seq=1)
    assert parse_reply(late, version=4, ip_header=False, ident=ID, sequences=range(1, 4))


def test_corrupt_v4_reply_is_ignored() -> None:
    packet = bytearray(reply4())
    packet[-1] ^= 0xFF
    assert parse4(bytes(packet)) is None


def test_our_own_request_and_unrelated_icmp_are_ignored() -> None:
    # A raw socket on loopback sees its own echo request go by.
    assert parse4(echo_request(4, ID, SEQ)) is None
    assert parse4(ipv4_header(64) + echo_request(4, ID, SEQ), ip_header=True) is None
    assert parse4(icmp(13, 0, b"\0" * 16)) is None  # timestamp request
    assert parse6(icmp(135, 0, b"\0" * 20, v4=False)) is None  # neighbour solicitation


def test_destination_unreachable_quoting_our_request_is_down() -> None:
    assert parse4(error4(3, 1)) == Verdict(False, "host unreachable")
    assert parse4(error4(3, 13)) == Verdict(False, "communication administratively prohibited")
    assert parse4(ipv4_header(92) + error4(3, 0), ip_header=True) == Verdict(
        False, "network unreachable"
    )
    assert parse4(error4(3, 99)) == Verdict(False, "destination unreachable (code 99)")
    assert parse6(error6(1, 3)) == Verdict(False, "address unreachable")
    assert parse6(error6(1, 1)) == Verdict(False, "communication administratively prohibited")


def test_time_exceeded_is_down() -> None:
    assert parse4(error4(11, 0)) == Verdict(False, "TTL exceeded in transit")
    assert parse6(error6(3, 0)) == Verdict(False, "hop limit exceeded in transit")
    assert parse6(error6(3, 7)) == Verdict(False, "time exceeded (code 7)")


def test_unreachable_about_another_packet_is_ignored() -> None:
    assert parse4(error4(3, 1, ident=ID + 1)) is None
    assert parse4(error4(3, 1, seq=SEQ + 5)) is None
    assert parse6(error6(1, 3, ident=ID + 1)) is None
    # Quoting a UDP datagram, not an echo request.
    udp = icmp(3, 3, b"\0" * 4, ipv4_header(8, proto=17) + b"\0" * 8)
    assert parse4(udp) is None
    # Truncated quote.
    assert parse4(error4(3, 1)[:30]) is None
    assert parse6(error6(1, 3)[:50]) is None


def test_malformed_ip_headers_are_not_ours() -> None:
    assert parse4(b"", ip_header=True) is None
    assert parse4(ipv4_header(64, proto=6) + reply4(), ip_header=True) is None
    bad_ihl = bytearray(ipv4_header(64) + reply4())
    bad_ihl[0] = 0x43  # header length 12 < 20
    assert parse4(bytes(bad_ihl), ip_header=True) is None
    long_ihl = bytearray(ipv4_header(0))
    long_ihl[0] = 0x4F  # claims 60 bytes, has 20
    assert parse4(bytes(long_ihl), ip_header=True) is None


@given(
    packet=st.binary(max_size=200),
    version=st.sampled_from([4, 6]),
    ip_header=st.booleans(),
    ident=st.integers(0, 0xFFFF),
    first=st.integers(0, 0xFFFF),
)
def test_fuzz_parser_always_gives_a_verdict_or_not_ours(
    packet: bytes, version: int, ip_header: bool, ident: int, first: int
) -> None:
    verdict = parse_reply(packet, version=version, ip_header=ip_header, ident=ident,
                          sequences=range(first, first + 3))
    assert verdict is None or (isinstance(verdict, Verdict) and verdict.reason)


@given(
    base=st.sampled_from([reply4(), error4(3, 1), error4(11, 0), reply6(), error6(1, 4)]),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 200),
)
def test_fuzz_mutated_real_packets(base: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    packet = bytearray(base)
    for index, value in flips:
        if index < len(packet):
            packet[index] = value
    for version in (4, 6):
        verdict = parse_reply(bytes(packet[:cut]), version=version, ip_header=False,
                              ident=ID, sequences={SEQ})
        assert verdict is None or isinstance(verdict, Verdict)


# ------------------------------------------------------------------ real echoes, this netns


def test_registered_through_the_entry_point() -> None:
    manager = PluginManager()
    manager.load_entry_points()
    assert isinstance(manager.register_checks().get("ping"), PingCheck)


@needs_raw
async def test_raw_socket_ping_of_ipv4_loopback(make_request) -> None:
    transcript = Transcript()
    request = make_request("127.0.0.1", check_type="ping", options={"socket": "raw"},
                           transcript=transcript)
    result = await CHECK.check(request)
    assert result.up, result.reason
    assert result.reason == "echo reply from 127.0.0.1"
    assert transcript.lines[0].startswith("* raw ICMP socket, id ")
    assert transcript.lines[-1] == "< echo reply from 127.0.0.1"


@needs_raw
@needs_ipv6
async def test_raw_socket_ping_of_ipv6_loopback(make_request) -> None:
    transcript = Transcript()
    request = make_request("::1", check_type="ping", options={"socket": "raw"},
                           transcript=transcript)
    result = await CHECK.check(request)
    assert result.up, result.reason
    assert transcript.lines[0].startswith("* raw ICMPv6 socket, id ")


async def test_auto_mode_pings_with_whichever_socket_is_allowed(make_request) -> None:
    result = await CHECK.check(make_request("127.0.0.1", check_type="ping"))
    assert result.up, result.reason


async def test_bad_options_are_failures_with_reasons(make_request) -> None:
    zero = await CHECK.check(make_request(check_type="ping", options={"count": 0}))
    assert zero.reason == "ping option count must be 1 or more, got 0"
    mode = await CHECK.check(make_request(check_type="ping", options={"socket": "icmp"}))
    assert mode.reason == "ping option socket must be one of auto, dgram, raw, got 'icmp'"


async def test_cancelled_pings_leak_no_socket(make_request) -> None:
    request = make_request("127.0.0.1", check_type="ping")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(100):
        with trio.move_on_after(0):
            await CHECK.check(request)
    assert len(os.listdir("/proc/self/fd")) == before


# ------------------------------------------------------------------ private netns
# One namespace and one interpreter for every phase below: starting Python dominates the cost.

_NETNS_SCRIPT = textwrap.dedent("""
    import json, subprocess, sys, trio
    sys.path.insert(0, sys.argv[1])
    from conftest import _make_request
    from lbha.checkapi import Transcript
    from lbha.checks.ping import PingCheck

    async def main():
        out = {}
        for phase, setup, cases in json.loads(sys.argv[2]):
            subprocess.run(["sh", "-ec", setup], check=True)
            for name, rip, options, timeout in cases:
                transcript = Transcript()
                request = _make_request(rip, check_type="ping", options=options,
                                        timeout=timeout, transcript=transcript)
                result = await PingCheck().check(request)
                out[f"{phase}/{name}"] = [result.up, result.reason, transcript.lines]
        print(json.dumps(out))

    trio.run(main)
""")

ALLOW_PING_SOCKETS = "echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range"
DENY_PING_SOCKETS = "echo '1 0' > /proc/sys/net/ipv4/ping_group_range"

#: (phase, shell setup, cases); each phase builds on the state the previous one left.
PHASES = [
    ("allowed", ALLOW_PING_SOCKETS, [
        ("v4 dgram", "127.0.0.1", {"socket": "dgram"}, 1.0),
        ("v4 auto", "127.0.0.1", {}, 1.0),
        ("v6 dgram", "::1", {"socket": "dgram"}, 1.0),
        ("v4 raw", "127.0.0.1", {"socket": "raw"}, 1.0),
    ]),
    ("denied", DENY_PING_SOCKETS, [
        ("dgram", "127.0.0.1", {"socket": "dgram"}, 1.0),
        ("auto", "127.0.0.1", {}, 1.0),
    ]),
    # The loopback ignores echo requests: nothing ever answers.
    ("silent", f"{ALLOW_PING_SOCKETS}; echo 1 > /proc/sys/net/ipv4/icmp_echo_ignore_all", [
        ("dgram", "127.0.0.1", {"socket": "dgram", "count": 3}, 0.3),
        ("raw", "127.0.0.1", {"socket": "raw"}, 0.3),
    ]),
    # Policy rules ahead of the local table: 127.0.0.1 unreachable, ::1 prohibited.
    ("refused", (
        "ip rule add pref 100 lookup local; ip rule del pref 0; "
        "ip rule add to 127.0.0.1 unreachable pref 10; "
        "ip -6 rule add pref 100 lookup local; ip -6 rule del pref 0; "
        "ip -6 rule add to ::1 prohibit pref 10"
    ), [
        ("v4 dgram", "127.0.0.1", {"socket": "dgram"}, 0.5),
        ("v4 raw", "127.0.0.1", {"socket": "raw"}, 0.5),
        ("v6 dgram", "::1", {"socket": "dgram"}, 0.5),
        ("v6 raw", "::1", {"socket": "raw"}, 0.5),
    ]),
]


@pytest.fixture(scope="module")
def netns() -> dict[str, list]:
    """Results of PHASES, run in a fresh network namespace whose only link is loopback."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip for a private network namespace")
    command = f'ip link set lo up && exec "{sys.executable}" -c "$0" "$1" "$2"'
    proc = subprocess.run(
        ["unshare", "--net", "sh", "-c", command, _NETNS_SCRIPT,
         str(Path(__file__).parent), json.dumps(PHASES)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    if proc.returncode != 0 and "unshare" in proc.stderr:
        pytest.skip(f"cannot create a network namespace: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_datagram_socket_path_ipv4_and_ipv6(netns) -> None:
    for name in ("v4 dgram", "v4 auto", "v6 dgram", "v4 raw"):
        up, reason, _ = netns[f"allowed/{name}"]
        assert up, (name, reason)
    assert netns["allowed/v4 dgram"][2][0].startswith("* datagram ICMP socket, id ")
    assert netns["allowed/v4 auto"][2][0].startswith("* datagram ICMP socket, id ")
    assert netns["allowed/v6 dgram"][2][0].startswith("* datagram ICMPv6 socket, id ")
    assert netns["allowed/v4 raw"][2][0].startswith("* raw ICMP socket, id ")


def test_datagram_socket_refused_by_sysctl_falls_back_or_says_why(netns) -> None:
    assert netns["denied/dgram"][:2] == [
        False,
        "cannot ping 127.0.0.1: datagram ICMP socket not allowed (Permission denied; "
        "see net.ipv4.ping_group_range)",
    ]
    assert netns["denied/auto"][0]
    assert netns["denied/auto"][2][0].startswith("* raw ICMP socket")


def test_silence_is_down_after_every_attempt(netns) -> None:
    up, reason, lines = netns["silent/dgram"]
    assert not up
    assert reason == "no echo reply from 127.0.0.1 to 3 requests in 0.27 s"
    assert [line.split(" id ")[0] for line in lines[1:]] == ["> echo request to 127.0.0.1"] * 3
    assert netns["silent/raw"][:2] == [False, "no echo reply from 127.0.0.1 to 1 request in 0.27 s"]


def test_local_routing_refusal_is_down_with_the_reason(netns) -> None:
    for name in ("v4 dgram", "v4 raw"):
        assert netns[f"refused/{name}"][:2] == [False, "ping 127.0.0.1: network unreachable"]
    for name in ("v6 dgram", "v6 raw"):
        assert netns[f"refused/{name}"][:2] == [
            False, "ping ::1: prohibited by a local route or firewall rule",
        ]
