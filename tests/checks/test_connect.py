"""`connect`: real TCP/UDP sockets on 127.0.0.1 and ::1 only."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
from resources import closed_port, free_port, open_fds

from lbha.checkapi import Transcript
from lbha.checks.connect import ConnectCheck
from lbha.plugin_manager import PluginManager

CHECK = ConnectCheck()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")


@contextmanager
def tcp_listener(host: str = "127.0.0.1", backlog: int = 16) -> Iterator[socket.socket]:
    """A listening socket that never accepts: the kernel completes handshakes alone."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        s.listen(backlog)
        yield s


def test_registered_through_the_entry_point() -> None:
    manager = PluginManager()
    manager.load_entry_points()
    registry = manager.register_checks()
    assert isinstance(registry.get("connect"), ConnectCheck)
    assert registry.plugin_of("connect") == "connect"


async def test_listening_port_is_up(make_request) -> None:
    transcript = Transcript()
    with tcp_listener() as listener:
        port = listener.getsockname()[1]
        result = await CHECK.check(make_request("127.0.0.1", port, transcript=transcript))
    assert result.up, result.reason
    assert result.reason == f"connected to 127.0.0.1:{port}"
    assert transcript.lines == [
        f"* TCP connect to 127.0.0.1:{port}", "* connected; closed with RST",
    ]


async def test_closed_port_is_refused(make_request) -> None:
    transcript = Transcript()
    with closed_port() as port:
        result = await CHECK.check(make_request("127.0.0.1", port, transcript=transcript))
    assert not result.up
    assert result.reason == f"connect to 127.0.0.1:{port} refused"
    assert transcript.lines[-1] == f"* connect to 127.0.0.1:{port} refused"


@needs_ipv6
async def test_ipv6_up_and_refused(make_request) -> None:
    with tcp_listener("::1") as listener:
        port = listener.getsockname()[1]
        up = await CHECK.check(make_request("::1", port))
    assert up.up, up.reason
    assert up.reason == f"connected to [::1]:{port}"
    with closed_port("::1") as port:
        down = await CHECK.check(make_request("::1", port))
    assert down.reason == f"connect to [::1]:{port} refused"


async def test_no_port_is_a_failure_not_a_crash(make_request) -> None:
    result = await CHECK.check(make_request("127.0.0.1", None))
    assert not result.up
    assert result.reason == "no port to connect to on 127.0.0.1"


@contextmanager
def full_backlog_listener() -> Iterator[int]:
    """A listener whose accept queue is full: the kernel drops further SYNs silently."""
    with tcp_listener(backlog=0) as listener:
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(3):
                filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            yield port
        finally:
            for filler in fillers:
                filler.close()


async def test_full_backlog_is_left_to_the_deadline(make_request) -> None:
    # A SYN nobody answers: the check neither returns nor blocks; the deadline cancels it.
    with full_backlog_listener() as port:
        start = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            await CHECK.check(make_request("127.0.0.1", port))
    assert scope.cancelled_caught
    assert trio.current_time() - start < 1.0


async def test_cancelled_checks_leak_no_socket(make_request, autojump_clock) -> None:
    with full_backlog_listener() as port:
        request = make_request("127.0.0.1", port)
        before = open_fds()
        for _ in range(200):
            with trio.move_on_after(3) as scope:
                await CHECK.check(request)
            assert scope.cancelled_caught
        after = open_fds()
    assert after == before


async def test_cancelled_udp_probes_leak_no_socket(make_request, autojump_clock) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        request = make_request("127.0.0.1", server.getsockname()[1], protocol="udp")
        before = open_fds()
        for _ in range(100):
            with trio.move_on_after(0.1):  # inside the probe's own wait of 1 s
                await CHECK.check(request)
        after = open_fds()
    assert after == before


async def test_udp_silence_is_up_and_says_it_proves_little(make_request, autojump_clock) -> None:
    transcript = Transcript()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        start = trio.current_time()
        result = await CHECK.check(
            make_request("127.0.0.1", port, protocol="udp", transcript=transcript)
        )
        # The probe really arrived: one empty datagram.
        assert server.recvfrom(16, socket.MSG_DONTWAIT)[0] == b""
    assert result.up, result.reason
    assert result.reason == (
        f"UDP 127.0.0.1:{port}: no port unreachable within 1 s (silence, not proof of life)"
    )
    assert trio.current_time() - start == pytest.approx(1.0)
    assert transcript.lines[0] == f"> empty UDP datagram to 127.0.0.1:{port}"


async def test_udp_wait_is_capped_at_half_the_deadline(make_request, autojump_clock) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        request = make_request(
            "127.0.0.1", server.getsockname()[1], protocol="ops", timeout=0.5,
            options={"udp_wait": 2.0},
        )
        start = trio.current_time()
        result = await CHECK.check(request)
    assert result.up
    assert trio.current_time() - start == pytest.approx(0.25)


async def test_udp_reply_is_up(make_request) -> None:
    transcript = Transcript()
    server = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with server:
        await server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]

        async def echo() -> None:
            data, peer = await server.recvfrom(512)
            await server.sendto(b"pong" + data, peer)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            result = await CHECK.check(
                make_request("127.0.0.1", port, protocol="udp", transcript=transcript)
            )
    assert result.up
    assert result.reason == f"UDP reply from 127.0.0.1:{port}"
    assert transcript.lines[-1] == "< 4 bytes: b'pong'"


async def test_udp_closed_port_is_down(make_request) -> None:
    port = free_port(socket.SOCK_DGRAM)
    result = await CHECK.check(make_request("127.0.0.1", port, protocol="udp"))
    assert not result.up
    assert result.reason == f"UDP port 127.0.0.1:{port} unreachable (ICMP port unreachable)"


@needs_ipv6
async def test_udp_ipv6_closed_and_open(make_request, autojump_clock) -> None:
    port = free_port(socket.SOCK_DGRAM, "::1")
    down = await CHECK.check(make_request("::1", port, protocol="udp"))
    assert down.reason == f"UDP port [::1]:{port} unreachable (ICMP port unreachable)"
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as server:
        server.bind(("::1", 0))
        up = await CHECK.check(make_request("::1", server.getsockname()[1], protocol="udp"))
    assert up.up, up.reason


async def test_tcp_udp_service_is_checked_with_tcp(make_request) -> None:
    with tcp_listener() as listener:
        port = listener.getsockname()[1]
        result = await CHECK.check(make_request("127.0.0.1", port, protocol="tcp+udp"))
    assert result.reason == f"connected to 127.0.0.1:{port}"


@pytest.mark.wallclock
async def test_batch_keeps_each_verdict_and_times_out_only_the_silent(make_request) -> None:
    with tcp_listener() as up, closed_port() as closed, full_backlog_listener() as silent, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        up_port = up.getsockname()[1]
        requests = [
            make_request("127.0.0.1", up_port, timeout=0.4),
            make_request("127.0.0.1", closed, timeout=0.4),
            make_request("127.0.0.1", silent, timeout=0.4),
            make_request("127.0.0.1", udp.getsockname()[1], protocol="udp", timeout=0.4),
            make_request("127.0.0.1", None, timeout=0.4),
        ]
        before = open_fds()
        start = trio.current_time()
        results = await CHECK.check_batch(requests)
        elapsed = trio.current_time() - start
        after = open_fds()
    assert [r.up for r in results] == [True, False, False, True, False]
    assert results[0].reason == f"connected to 127.0.0.1:{up_port}"
    assert results[1].reason == f"connect to 127.0.0.1:{closed} refused"
    assert results[2].reason == "timeout after 0.4 s"
    assert results[4].reason == "no port to connect to on 127.0.0.1"
    assert elapsed < 0.5
    assert after == before


async def test_cancelled_batches_leak_no_socket(make_request) -> None:
    with full_backlog_listener() as port:
        requests = [make_request("127.0.0.1", port, timeout=5.0) for _ in range(20)]
        before = open_fds()
        for _ in range(20):
            with trio.move_on_after(0.01):
                await CHECK.check_batch(requests)
        assert open_fds() == before
