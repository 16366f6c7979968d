"""Two heartbeat daemons on a fake network under trio's MockClock: no sockets, no netlink."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from lbha.config import load_config_text
from lbha.errors import ControlError
from lbha.events import ClusterEvent, Event
from lbha.heartbeat.daemon import Heartbeat
from lbha.heartbeat.floating_ips import AddressManager
from lbha.heartbeat.generation import FILE_NAME, GenerationStore
from lbha.heartbeat.protocol import Flags, Frame, KeyRing, PeerState, Verdict, encode
from lbha.model import FloatingIP

from .fakenet import FakeNet, FakeNetTransport

KEYS = KeyRing({1: b"0123456789abcdef0123"}, 1)
ADDR = {"lb1": "198.18.0.1", "lb2": "198.18.0.2"}
KEEPALIVE, DEADTIME = 0.05, 0.3


def config_text(node: str, auto_failback: bool = True) -> str:
    peer = "lb2" if node == "lb1" else "lb1"
    return f"""
[cluster]
node = "{node}"
role = "{'master' if node == 'lb1' else 'slave'}"
bind = ["{ADDR[node]}"]
keepalive = "50ms"
warntime = "150ms"
deadtime = "300ms"
initdead = "1s"
auth = "none"
auto_failback = {str(auto_failback).lower()}
garp_count = 3
garp_interval = "100ms"
floating_ips = ["198.18.0.10/24"]
[[cluster.peers]]
name = "{peer}"
addresses = ["{ADDR[peer]}"]
"""


@dataclass
class World:
    """Who holds the floating IP, over (virtual) time; checks there is never an overlap."""

    holders: set[str] = field(default_factory=set)
    overlaps: list[float] = field(default_factory=list)
    history: list[tuple[float, str, str]] = field(default_factory=list)
    #: Nodes cut off from the LAN: what they hold is invisible to clients.
    ignore: set[str] = field(default_factory=set)
    changed: trio.Event = field(default_factory=trio.Event)

    async def until_held_by(self, node: str) -> float:
        """Wait until `node` holds the IP; return the time it took."""
        start = trio.current_time()
        while node not in self.holders:
            await self.changed.wait()
        return trio.current_time() - start

    def record(self, node: str, what: str) -> None:
        self.history.append((trio.current_time(), node, what))
        if node in self.ignore:
            return
        if what == "acquire":
            self.holders.add(node)
        elif what == "release":
            self.holders.discard(node)
        if len(self.holders) > 1:
            self.overlaps.append(trio.current_time())
        self.changed.set()
        self.changed = trio.Event()


class FakeAddresses(AddressManager):
    def __init__(self, node: str, world: World) -> None:
        self.node = node
        self.world = world
        self.announcements: list[float] = []

    async def acquire(self) -> None:
        await trio.sleep(0.001)  # netlink takes a moment
        self.world.record(self.node, "acquire")

    async def release(self) -> None:
        await trio.sleep(0.001)
        self.world.record(self.node, "release")

    async def remove(self, addresses: Collection[str]) -> None:
        await trio.lowlevel.checkpoint()

    async def held(self) -> list[str]:
        await trio.lowlevel.checkpoint()
        return ["198.18.0.10"] if self.node in self.world.holders else []

    async def announce(self) -> None:
        await trio.lowlevel.checkpoint()
        self.announcements.append(trio.current_time())
        self.world.record(self.node, "announce")

    def reconfigure(self, ips: Sequence[FloatingIP]) -> None:
        pass

    def close(self) -> None:
        self.world.record(self.node, "close")


class Cluster:
    def __init__(self, nursery: trio.Nursery, net: FakeNet, auto_failback: bool = True) -> None:
        self.nursery = nursery
        self.net = net
        self.world = World()
        self.auto_failback = auto_failback
        self.nodes: dict[str, Heartbeat] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self.events: list[ClusterEvent] = []
        self.addresses: dict[str, FakeAddresses] = {}
        self.finished: dict[str, trio.Event] = {}

    async def start(self, name: str, generations: GenerationStore | None = None) -> Heartbeat:
        config = load_config_text(config_text(name, self.auto_failback))
        assert config.cluster is not None
        cluster = config.cluster
        transport = FakeNetTransport(cluster.peers[0].addresses, cluster.udp_port,
                                     cluster.bind)
        self.addresses[name] = FakeAddresses(name, self.world)

        def emit(event: Event) -> None:
            assert isinstance(event, ClusterEvent)
            self.events.append(event)

        node = Heartbeat(config, None, transport, self.addresses[name], emit, generations)
        scope = trio.CancelScope()
        finished = self.finished[name] = trio.Event()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await node.run(task_status=task_status)
            finally:
                finished.set()

        await self.nursery.start(run)
        self.nodes[name], self.scopes[name] = node, scope
        return node

    async def stop(self, name: str) -> None:
        # Wait for the daemon itself to finish, not only a virtual delay: a state-file fsync
        # in a worker thread lets the autojump clock race past any delay while the old node
        # still holds its socket. Then give the peer its moment to take over.
        self.scopes[name].cancel()
        await self.finished[name].wait()
        await trio.sleep(0.05)

    def active(self) -> set[str]:
        return {name for name, node in self.nodes.items() if node.state.active
                and not self.scopes[name].cancel_called}

    def kinds(self, node: str) -> list[str]:
        return [e.kind for e in self.events if e.node == node]


@asynccontextmanager
async def cluster(seed: int = 0, auto_failback: bool = True,
                  **faults: object) -> AsyncIterator[Cluster]:
    net = FakeNet(seed, **faults)  # type: ignore[arg-type]
    net.install()
    async with trio.open_nursery() as nursery:
        c = Cluster(nursery, net, auto_failback)
        yield c
        nursery.cancel_scope.cancel()
    assert not c.world.overlaps, f"both nodes held the floating IP at {c.world.overlaps}"


@asynccontextmanager
async def settled(auto_failback: bool = True) -> AsyncIterator[Cluster]:
    """Both daemons started and past start-up: lb1 active, lb2 passive."""
    async with cluster(auto_failback=auto_failback) as c:
        await c.start("lb1")
        await c.start("lb2")
        await trio.sleep(0.5)
        yield c


async def test_startup_master_takes_the_ips(autojump_clock: trio.testing.MockClock) -> None:
    async with settled() as c:
        assert c.active() == {"lb1"}
        assert "takeover" in c.kinds("lb1")
        status = await c.nodes["lb2"].command("status", {})
        assert status["state"] == "passive"
        assert status["link"] == "up"
        assert status["peer_state"] == "active"
        assert status["last_keepalive_age"] <= KEEPALIVE


async def test_events_are_left_to_the_event_hook_to_log(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    # The built-in log plugin logs every lbha_event; the daemon logging them too doubled
    # every line an operator reads.
    with caplog.at_level(logging.DEBUG):
        async with settled() as c:
            c.scopes["lb1"].cancel()
            await c.world.until_held_by("lb2")
            await trio.sleep(0.1)
    messages = {e.message for e in c.events}
    assert {"takeover", "failover"} <= {e.kind for e in c.events}
    assert not [r.getMessage() for r in caplog.records if r.getMessage() in messages]


async def test_quiet_keepalives_are_not_taken_for_a_dead_peer_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Routine keepalives are only timed by the transport; when something does happen after
    # a quiet spell far longer than deadtime (a status query, a takeover), the state machine
    # must not read that spell as silence: no link down, no peer dead, no re-announcement.
    async with settled() as c:
        before = len(c.events)
        announced = len(c.addresses["lb1"].announcements)
        await trio.sleep(30 * DEADTIME)
        await c.nodes["lb1"].command("status", {})
        await c.nodes["lb2"].command("status", {})
        await c.nodes["lb2"].command("takeover", {})
        await trio.sleep(0.1)
        assert [(e.node, e.kind) for e in c.events[before:]] == [
            ("lb1", "standby"), ("lb2", "takeover")]
        assert len(c.addresses["lb1"].announcements) == announced


async def test_lone_node_waits_initdead(autojump_clock: trio.testing.MockClock) -> None:
    async with cluster() as c:
        await c.start("lb2")
        await trio.sleep(0.99)
        assert c.active() == set()
        await trio.sleep(0.02)
        assert c.active() == {"lb2"}
        assert c.kinds("lb2") == ["takeover"]


async def test_peer_death_takeover_within_deadtime(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with settled() as c:
        # Cut lb1 off entirely (daemon killed + link down, as lb2 sees it).
        c.net.partition(ADDR["lb1"], ADDR["lb2"])
        c.world.ignore.add("lb1")
        c.world.holders.discard("lb1")
        outage = await c.world.until_held_by("lb2")
        assert DEADTIME - KEEPALIVE <= outage <= DEADTIME + 0.01
        # The takeover goes on once the addresses are up: announcement, then its events.
        await trio.testing.wait_all_tasks_blocked()
        event = next(e for e in c.events if e.node == "lb2" and e.kind == "failover")
        assert "lb1" in event.reason
        assert event.old_state == "passive"
        assert event.new_state == "active"
        assert c.kinds("lb2")[-3:] == ["link_down", "peer_dead", "failover"]


async def test_graceful_stop_hands_over_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async with settled() as c:
        c.scopes["lb1"].cancel()
        assert await c.world.until_held_by("lb2") < 0.01
        assert "lb1" not in c.world.holders
        await trio.sleep(0.1)
        lb1 = [what for _, node, what in c.world.history if node == "lb1"]
        assert lb1[-2:] == ["release", "close"]  # announcing sockets closed after the release


@pytest.mark.parametrize("auto_failback", [True, False])
async def test_master_comes_back(autojump_clock: trio.testing.MockClock,
                                 auto_failback: bool) -> None:
    async with settled(auto_failback=auto_failback) as c:
        await c.stop("lb1")
        assert c.active() == {"lb2"}
        await c.start("lb1")
        await trio.sleep(0.5)
        assert c.active() == ({"lb1"} if auto_failback else {"lb2"})


async def test_the_first_announcement_precedes_the_rest_of_a_takeover(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as c:
        await c.start("lb1")
        lb2 = await c.start("lb2")
        await trio.sleep(0.5)
        announced: list[tuple[str, int]] = []
        emit = lb2.emit

        def watch(event: Event) -> None:
            assert isinstance(event, ClusterEvent)
            announced.append((event.kind, len(c.addresses["lb2"].announcements)))
            emit(event)

        lb2.emit = watch
        before = len(c.addresses["lb2"].announcements)
        await lb2.command("takeover", {})
        # Clients follow the announcement; events, logs and our frame come after it.
        assert ("takeover", before + 1) in announced
        await trio.sleep(1.0)
        assert len(c.addresses["lb2"].announcements) == before + 3  # garp_count


async def test_manual_takeover_and_standby(autojump_clock: trio.testing.MockClock) -> None:
    async with settled() as c:
        reply = await c.nodes["lb2"].command("takeover", {})
        assert reply["message"] == "now active"
        assert c.active() == {"lb2"}
        await trio.sleep(1.0)
        assert c.active() == {"lb2"}  # lb1 yielded: no failback
        reply = await c.nodes["lb2"].command("standby", {})
        await trio.sleep(0.1)
        assert c.active() == {"lb1"}
        with pytest.raises(ControlError, match="unknown command"):
            await c.nodes["lb1"].command("dance", {})


async def test_partition_heal_one_steps_down_keeper_announces(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with settled() as c:
        c.net.partition(ADDR["lb1"], ADDR["lb2"])
        c.world.ignore.add("lb2")  # each side holds it in its own half of the LAN
        await trio.sleep(15)
        assert c.active() == {"lb1", "lb2"}
        c.world.ignore.clear()
        before = len(c.addresses["lb1"].announcements)
        c.net.heal()
        healed = trio.current_time()
        releases_lb1 = [h for h in c.world.history if h[1:] == ("lb1", "release")]
        await trio.sleep(0.5)
        assert c.active() == {"lb1"}
        assert [h for h in c.world.history if h[1:] == ("lb1", "release")] == releases_lb1
        first = c.addresses["lb1"].announcements[before]
        assert first - healed <= KEEPALIVE + 0.002
        assert "split_brain" in c.kinds("lb2") or "split_brain" in c.kinds("lb1")


async def test_partition_heal_loser_serves_until_the_keeper_has_announced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The heal the bench found: lb1's frames reach lb2 at once, lb2's wait (its neighbour
    # entry for lb1 failed during the partition). lb2 must not leave its clients, which
    # still point at it, before lb1 has heard it and announced the address.
    async with settled() as c:
        c.net.partition(ADDR["lb1"], ADDR["lb2"])
        c.world.ignore.add("lb2")
        await trio.sleep(15)
        assert c.active() == {"lb1", "lb2"}
        c.world.ignore.clear()
        before = len(c.addresses["lb1"].announcements)
        c.net.heal()
        c.net.block_one_way(ADDR["lb2"], ADDR["lb1"])
        await trio.sleep(0.8)
        assert c.active() == {"lb1", "lb2"}  # lb2 still serves its half
        assert len(c.addresses["lb1"].announcements) == before
        c.net.heal()
        opened = trio.current_time()
        await c.world.until_held_by("lb1")
        await trio.sleep(0.5)
        assert c.active() == {"lb1"}
        announced = c.addresses["lb1"].announcements[before]
        assert announced - opened <= KEEPALIVE + 0.002
        released = [t for t, node, what in c.world.history if (node, what) == ("lb2", "release")]
        assert released[-1] >= announced
        assert c.kinds("lb2").count("split_brain") == 1


async def test_the_nodes_fall_into_step(autojump_clock: trio.testing.MockClock) -> None:
    # The keepalive loop answers a frame at once when its own keepalive is due within half an
    # interval: each node then wakes once a keepalive, not twice (bench/README.md, idle CPU).
    async with settled() as c:
        c.net.sent_at.clear()
        await trio.sleep(2.0)
        sent = {name: [t for t, host in c.net.sent_at if host == ADDR[name]]
                for name in ("lb1", "lb2")}
    assert len(sent["lb1"]) >= 2.0 / KEEPALIVE - 1
    assert len(sent["lb2"]) >= 2.0 / KEEPALIVE - 1
    # No delay on this network: the answer leaves at the instant the frame arrived.
    assert set(sent["lb2"]) <= set(sent["lb1"])


async def test_frames_failing_authentication_reach_the_daemon_once_a_second(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 20 failing frames a second from the peer's address; the daemon only warns (once a
    # minute), so the keepalive loop hands it one a second, not every frame.
    async with cluster() as c:
        c.world.ignore.update(("lb1", "lb2"))
        await c.start("lb1")
        lb2 = await c.start("lb2")
        lb2.pump.reconfigure(KEYS, KEEPALIVE, DEADTIME)
        handed: list[tuple[float, Verdict, str]] = []
        lb2._warn_auth = lambda verdict, link: handed.append(  # type: ignore[method-assign]
            (trio.current_time(), verdict, link))
        await trio.sleep(10)
    assert lb2.pump.verdicts()[Verdict.AUTH_MISMATCH] >= 10 / KEEPALIVE - 1
    assert {(verdict, link) for _, verdict, link in handed} == {
        (Verdict.AUTH_MISMATCH, f"udp:{ADDR['lb1']}")}
    assert 10 <= len(handed) <= 11
    assert all(b - a >= 1.0 for (a, *_), (b, *_) in itertools.pairwise(handed))


@pytest.mark.parametrize("seed", range(5))
async def test_no_false_failover_on_a_terrible_network(
    autojump_clock: trio.testing.MockClock, seed: int,
) -> None:
    async with cluster(seed, drop=0.1, duplicate=0.1, delay=(0.0, 0.03)) as c:
        await c.start("lb1")
        await c.start("lb2")
        await trio.sleep(60)
        assert c.active() == {"lb1"}
        assert "failover" not in c.kinds("lb2")
        dropped = c.nodes["lb2"].receiver.counts
        assert dropped[Verdict.REPLAY] > 0  # duplicates and reordered frames were refused
        assert c.net.dropped > 0


async def test_forged_and_replayed_frames_change_nothing(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    async with cluster() as c:
        await c.start("lb1")
        node2 = await c.start("lb2")
        await trio.sleep(0.5)
        for node in c.nodes.values():
            node.pump.reconfigure(KEYS, KEEPALIVE, DEADTIME)
        await trio.sleep(0.2)
        attacker = ("198.18.0.66", 6694)
        spoofed = (ADDR["lb1"], 6694)  # the attacker forges lb1's source address
        target = (ADDR["lb2"], 6694)
        evil = Frame("lbha", "lb1", 1, 10**9, PeerState.LEAVING, Flags.MASTER)
        forged = encode(evil, KeyRing({1: b"guessed-key-000000000"}, 1))
        replay = encode(Frame("lbha", "lb1", c.nodes["lb1"].generation, 1, PeerState.LEAVING),
                        KEYS)
        for i in range(100):
            c.net.inject(attacker, target, forged)
            c.net.inject(spoofed, target, replay)
            c.net.inject(attacker, target, replay)
            c.net.inject(attacker, target, bytes([i]) * 40)
            await trio.sleep(0.01)
        assert c.active() == {"lb1"}
        counts = node2.receiver.counts
        assert counts[Verdict.BAD_MAC] == 100
        assert counts[Verdict.REPLAY] == 100
        assert counts[Verdict.UNKNOWN_LINK] == 100
        assert counts[Verdict.MALFORMED] == 100
        assert (await node2.command("status", {}))["frames_dropped"]["bad_mac"] == 100
        # A forgery with lb1's own address, while lb1 is heard: not taken for a key mismatch.
        with caplog.at_level(logging.WARNING):
            c.net.inject(spoofed, target, forged)
            await trio.sleep(0.01)
        assert "frames with the address of lb1 on udp:198.18.0.1 fail authentication " \
               "(bad_mac) while its frames are still valid: forged frames" in caplog.text
        assert "key files differ" not in caplog.text


@pytest.mark.parametrize(("lb1_keys", "lb2_keys", "cause"), [
    (KEYS, KeyRing({1: b"another-key-0123456789"}, 1), "the key files differ"),
    (KeyRing({2: b"0123456789abcdef0123"}, 2), KEYS, "a key id missing"),
    (None, KEYS, 'auth = "none"'),
], ids=["other-key", "unknown-key-id", "auth-none"])
async def test_frames_failing_authentication_from_the_peer_are_warned_about(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
    lb1_keys: KeyRing | None, lb2_keys: KeyRing, cause: str,
) -> None:
    # Different keys: both nodes go active, and "peer dead" alone would hide why.
    async with cluster() as c:
        c.world.ignore.update(("lb1", "lb2"))  # both hold the IP: the defect, not the test's
        await c.start("lb1")
        await c.start("lb2")
        c.nodes["lb1"].pump.reconfigure(lb1_keys, KEEPALIVE, DEADTIME)
        c.nodes["lb2"].pump.reconfigure(lb2_keys, KEEPALIVE, DEADTIME)
        # An attacker's forgeries from its own address are counted, not warned about.
        forged = encode(Frame("lbha", "lb1", 1, 1, PeerState.ACTIVE), KeyRing({1: b"x" * 20}, 1))
        c.net.inject(("198.18.0.66", 6694), (ADDR["lb2"], 6694), forged)
        with caplog.at_level(logging.WARNING):
            await trio.sleep(130)
        assert c.active() == {"lb1", "lb2"}
    warnings = [r for r in caplog.records if r.name == "lbha.heartbeat.daemon"
                and "fail authentication" in r.getMessage()
                and r.getMessage().startswith("frames from lb1")]
    # Rate-limited: at once, then once a minute.
    assert len(warnings) == 3, [w.getMessage() for w in warnings]
    assert all(w.levelno == logging.WARNING for w in warnings)
    assert cause in warnings[0].getMessage()
    assert "198.18.0.66" not in caplog.text


@pytest.mark.parametrize("stored", [True, False])
async def test_restart_with_the_clock_stepped_back(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, stored: bool,
) -> None:
    # With its generation on disk, a node restarted with its clock 1,000 s behind still speaks
    # a newer generation and is heard; with the clock alone its peer drops it as stale.
    def store() -> GenerationStore | None:
        return GenerationStore(tmp_path / "lb2" / FILE_NAME) if stored else None

    async with cluster() as c:
        await c.start("lb1", GenerationStore(tmp_path / "lb1" / FILE_NAME))
        await c.start("lb2", store())
        await trio.sleep(2)
        before = c.nodes["lb2"].generation
        await c.stop("lb2")
        monkeypatch.setattr(time, "time_ns", lambda: (before - 10**9) * 1000)
        again = await c.start("lb2", store())
        await trio.sleep(2)
        stale = c.nodes["lb1"].receiver.counts[Verdict.STALE_GENERATION]
        peer_state = (await c.nodes["lb1"].command("status", {}))["peer_state"]
        if stored:
            assert again.generation == before + 1
            assert stale == 0
            assert peer_state == "passive"
        else:
            assert again.generation < before
            assert stale > 0
            assert peer_state == "dead"
            # The operator is told once (not once per frame) what to do.
            warnings = [r.getMessage() for r in caplog.records
                        if "older generation of lb2" in r.getMessage()]
            assert len(warnings) == 1
            assert str(tmp_path / "lb1" / FILE_NAME) in warnings[0]
        assert c.active() == {"lb1"}
