"""`lbha heartbeat`'s own transport: two daemons on loopback, keepalives on a plain thread."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

import pytest
import trio

from lbha.config import load_config_text
from lbha.events import Event
from lbha.heartbeat.daemon import Heartbeat
from lbha.heartbeat.errors import TransportError
from lbha.heartbeat.protocol import KeyRing, Verdict
from lbha.heartbeat.transport import ThreadedUdpTransport

from .test_daemon import FakeAddresses, World

ADDR = {"lb1": "127.0.0.1", "lb2": "127.0.0.2"}


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node(name: str, port: int, world: World) -> Heartbeat:
    peer = "lb2" if name == "lb1" else "lb1"
    config = load_config_text(f"""
[cluster]
node = "{name}"
role = "{'master' if name == 'lb1' else 'slave'}"
bind = ["{ADDR[name]}"]
udp_port = {port}
keepalive = "20ms"
warntime = "60ms"
deadtime = "200ms"
initdead = "300ms"
auth = "none"
garp_count = 0
floating_ips = ["198.18.0.10/24"]
[[cluster.peers]]
name = "{peer}"
addresses = ["{ADDR[peer]}"]
""")
    cluster = config.cluster
    assert cluster is not None
    transport = ThreadedUdpTransport(cluster.peers[0].addresses, port, cluster.bind)

    def ignore(event: Event) -> None:
        pass

    return Heartbeat(config, None, transport, FakeAddresses(name, world), ignore)


async def wait_until(condition: Callable[[], object], seconds: float) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"not true within {seconds} s")


@pytest.mark.wallclock
async def test_routine_keepalives_never_wake_the_daemon() -> None:
    port, world = free_udp_port(), World()
    lb1, lb2 = node("lb1", port, world), node("lb2", port, world)
    async with trio.open_nursery() as nursery:
        scope1 = trio.CancelScope()

        async def run_lb1(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope1:
                await lb1.run(task_status=task_status)

        await nursery.start(run_lb1)
        await nursery.start(lb2.run)
        await wait_until(lambda: lb1.state.active and lb2.state.links
                         and not lb2.state.active, 5)
        accepted, woken = lb2.pump.verdicts(), lb2._handled
        await trio.sleep(1.0)
        heard = lb2.pump.verdicts()["ok"] - accepted["ok"]
        # 50 keepalives a second arrive; the trio side wakes only near a deadline.
        assert heard >= 25
        assert lb2._handled - woken <= heard / 5
        status = await lb2.command("status", {})
        assert status["link"] == "up"
        assert status["peer_state"] == "active"
        assert status["last_keepalive_age"] < 0.1
        # A graceful stop still reaches the peer at once through the thread.
        scope1.cancel()
        await wait_until(lambda: lb2.state.active, 1)
        nursery.cancel_scope.cancel()
    assert not world.overlaps


@pytest.mark.wallclock
async def test_silence_is_noticed_at_the_deadline() -> None:
    port, world = free_udp_port(), World()
    lb1, lb2 = node("lb1", port, world), node("lb2", port, world)
    async with trio.open_nursery() as nursery:
        await nursery.start(lb1.run)
        await nursery.start(lb2.run)
        await wait_until(lambda: lb1.state.active and lb2.state.links, 5)
        # lb1 falls silent without a word (its thread stops sending, nothing says LEAVING).
        lb1.pump.interval = 3600.0
        start = trio.current_time()
        await wait_until(lambda: lb2.state.active, 2)
        assert trio.current_time() - start < 0.2 + 0.15
        nursery.cancel_scope.cancel()


async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        transport = ThreadedUdpTransport([ipaddress.ip_address("127.0.0.2")], port,
                                         [ipaddress.ip_address("127.0.0.1")])
        with pytest.raises(TransportError, match="another process"):
            await transport.open()


@pytest.mark.wallclock
async def test_frames_failing_authentication_reach_the_daemon_rarely() -> None:
    # lb1 signs nothing, lb2 expects a key: 50 failing frames a second from lb1's address.
    port, world = free_udp_port(), World()
    lb1, lb2 = node("lb1", port, world), node("lb2", port, world)
    lb2.pump.reconfigure(KeyRing({1: b"0123456789abcdef0123"}, 1), 0.02, 0.2)
    handed: list[tuple[Verdict, str]] = []
    lb2._warn_auth = lambda verdict, link: handed.append((verdict, link))  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(lb1.run)
        await nursery.start(lb2.run)
        await trio.sleep(1.5)
        nursery.cancel_scope.cancel()
    assert lb2.pump.verdicts()[Verdict.AUTH_MISMATCH] >= 25
    # Handed over at once, then at most once a second per kind (the daemon logs once a minute).
    assert 1 <= len(handed) <= 2
    assert handed[0] == (Verdict.AUTH_MISMATCH, "udp:127.0.0.1")
