"""The daemon's side of the link watch, on the fake network under MockClock: what it does when
a floating IP goes missing or a carrier drops, and how it reports floating IPs it cannot place.
The watch itself against the kernel: test_rtnetlink.py, test_netns.py."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from lbha.config import load_config_text
from lbha.heartbeat.daemon import Heartbeat
from lbha.heartbeat.errors import FloatingIPError
from lbha.heartbeat.link_watch import Sink
from lbha.model import FloatingIP

from . import test_daemon
from .fakenet import FakeNetTransport
from .test_daemon import Cluster, FakeAddresses, World, config_text, settled

VIP = "198.18.0.10"


class WatchedAddresses(FakeAddresses):
    """FakeAddresses that know what is present, refuse on demand, and hand out the sink."""

    def __init__(self, node: str, world: World) -> None:
        super().__init__(node, world)
        self.present: set[str] = set()
        self.sink: Sink | None = None
        self.problem: str | None = None

    async def check(self, ips: Sequence[FloatingIP]) -> None:
        await trio.lowlevel.checkpoint()
        if self.problem is not None:
            raise FloatingIPError(self.problem)

    async def acquire(self) -> list[str]:
        await super().acquire()
        if self.problem is not None:
            raise FloatingIPError(self.problem)
        added = sorted({VIP} - self.present)
        self.present.add(VIP)
        return added

    async def release(self) -> None:
        await super().release()
        self.present.clear()

    async def held(self) -> list[str]:
        await trio.lowlevel.checkpoint()
        return sorted(self.present)

    async def announce(self) -> list[str]:
        await super().announce()
        return sorted(self.present)

    async def watch(self, sink: Sink, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.sink = sink
        task_status.started()
        await trio.sleep_forever()


@pytest.fixture(autouse=True)
def watched_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_daemon, "FakeAddresses", WatchedAddresses)


def fake(c: Cluster, node: str) -> WatchedAddresses:
    addresses = c.addresses[node]
    assert isinstance(addresses, WatchedAddresses)
    return addresses


async def test_missing_address_is_restored_announced_and_counted_by_the_active_node_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with settled() as c:
        lb1, lb2 = fake(c, "lb1"), fake(c, "lb2")
        assert lb1.sink is not None
        assert lb2.sink is not None
        announced = len(lb1.announcements)
        lb1.present.discard(VIP)  # `ip addr del` behind the daemon's back
        await lb1.sink.on_address_lost()
        assert lb1.present == {VIP}
        assert len(lb1.announcements) == announced + 1  # the first GARP at once
        await trio.sleep(1.0)
        assert len(lb1.announcements) == announced + 3  # then the rest of garp_count
        restored = [e for e in c.events if e.kind == "floating_ip_restored"]
        assert [(e.node, e.old_state, e.new_state) for e in restored] == [
            ("lb1", "missing", "held")]
        assert f"{VIP} removed behind lbha's back" in restored[0].reason
        status = await c.nodes["lb1"].command("status", {})
        assert status["floating_ips_restored"] == 1
        # A notification with nothing missing (our own add, a late echo) restores nothing.
        await lb1.sink.on_address_lost()
        assert (await c.nodes["lb1"].command("status", {}))["floating_ips_restored"] == 1
        # The passive node never adds anything.
        await lb2.sink.on_address_lost()
        assert lb2.present == set()
        assert c.active() == {"lb1"}


async def test_our_own_release_is_never_fought(autojump_clock: trio.testing.MockClock) -> None:
    async with settled() as c:
        lb1 = fake(c, "lb1")
        assert lb1.sink is not None
        sink = lb1.sink
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.nodes["lb1"].command, "standby", {})
            await trio.sleep(0.0005)  # the release is under way (it takes 1 ms here)
            # The kernel reports the removal while the release runs: it waits for the lock,
            # then finds this node passive.
            nursery.start_soon(sink.on_address_lost)
        await trio.sleep(0.1)
        assert c.active() == {"lb2"}
        assert lb1.present == set()
        assert "floating_ip_restored" not in c.kinds("lb1")


async def test_carrier_loss_hands_over_and_its_return_takes_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with settled() as c:  # the cluster asserts no overlap, ever
        lb1 = fake(c, "lb1")
        assert lb1.sink is not None
        await lb1.sink.on_carrier(frozenset({"eth0"}))
        assert "lb1" not in c.world.holders
        await c.world.until_held_by("lb2")  # told over a link that still works
        status = await c.nodes["lb1"].command("status", {})
        assert status["no_carrier"] == ["eth0"]
        assert status["state"] == "passive"
        await trio.sleep(1.0)
        assert c.active() == {"lb2"}
        await lb1.sink.on_carrier(frozenset())
        await c.world.until_held_by("lb1")  # the master fails back by the usual rules
        assert c.active() == {"lb1"}
        assert [k for k in c.kinds("lb1") if k.startswith("carrier")] == [
            "carrier_lost", "carrier_back"]


async def test_floating_ips_not_placed_are_reported_never_announced(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    async with settled() as c:
        lb2 = fake(c, "lb2")
        lb2.problem = "floating IP 198.18.0.10: device 'eth9' does not exist on this host"
        with caplog.at_level(logging.INFO):
            await c.stop("lb1")  # lb2 takes over, but cannot place the address
            await trio.sleep(1.0)
            status = await c.nodes["lb2"].command("status", {})
            assert status["state"] == "active"
            assert status["floating_ips"] == []
            assert status["floating_ip_error"] == lb2.problem
            assert lb2.sink is not None
            await lb2.sink.on_address_lost()  # still failing: nothing counted
            status = await c.nodes["lb2"].command("status", {})
            assert status["floating_ips_restored"] == 0
        assert "floating_ip_restored" not in c.kinds("lb2")
        assert "announced" not in caplog.text
        assert f"floating IPs (lb1 stopped gracefully): {lb2.problem}" in caplog.text
        lb2.problem = None  # the device appears: the next look places and announces it
        await lb2.sink.on_address_lost()
        status = await c.nodes["lb2"].command("status", {})
        assert status["floating_ips"] == [VIP]
        assert status["floating_ip_error"] is None
        assert status["floating_ips_restored"] == 1


async def test_start_and_reload_refused_when_a_floating_ip_cannot_be_placed(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    async with settled() as c:
        node = c.nodes["lb1"]
        lb1 = fake(c, "lb1")
        lb1.problem = "floating IP 198.18.0.11: device 'eth9' does not exist on this host"
        new = load_config_text(config_text("lb1").replace("198.18.0.10/24", "198.18.0.11/24"))
        with caplog.at_level(logging.ERROR):
            await node.reconfigure(new, None)
        assert "reload refused, the running configuration stays: floating IP 198.18.0.11" \
            in caplog.text
        assert lb1.present == {VIP}
        assert c.active() == {"lb1"}

        config = load_config_text(config_text("lb2"))
        assert config.cluster is not None
        transport = FakeNetTransport(config.cluster.peers[0].addresses, 6694,
                                     config.cluster.bind)
        fresh = Heartbeat(config, None, transport, lb1, lambda _event: None)
        history = len(c.world.history)
        with pytest.raises(FloatingIPError, match="device 'eth9'"):
            await fresh.run()
        assert c.world.history[history:] == []  # nothing released, nothing closed
