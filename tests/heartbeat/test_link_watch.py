"""The link watch: what each kernel notification asks of the daemon (pure), and the driver
that reads them and tells the daemon (a scripted monitor; the real one: test_rtnetlink.py)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import trio
import trio.testing
from pyroute2.netlink.rtnl.ifinfmsg import IFF_LOWER_UP, IFF_RUNNING, IFF_UP

from lbha.heartbeat.errors import FloatingIPError
from lbha.heartbeat.link_watch import RETRY, LinkWatch, Verdict, Watched, decide, with_links
from lbha.heartbeat.rtnetlink import Address, AddressChange, Change, Link, LinkChange, Overflow

UP = IFF_UP | IFF_RUNNING | IFF_LOWER_UP
NO_CARRIER = IFF_UP  # administratively up, no carrier: not running
ETH0, ETH1 = Link(2, "eth0", UP), Link(3, "eth1", UP)
VIP, OTHER = "198.18.0.10", "198.18.0.1"


def watched(devices: frozenset[str] = frozenset({"eth0"})) -> Watched:
    return with_links(Watched(frozenset({VIP, "2001:db8::10"}), devices), [ETH0, ETH1])


def test_fresh_view_knows_every_link_and_which_cannot_serve() -> None:
    w = watched(frozenset({"eth0", "eth9"}))
    assert w.usable == {"eth0": True, "eth1": True}
    assert w.names == {2: "eth0", 3: "eth1"}
    assert w.no_carrier() == {"eth9"}  # configured but absent: cannot serve


def test_removal_of_a_floating_ip_asks_for_a_restore_and_nothing_else_does() -> None:
    w = watched()
    assert decide(w, AddressChange(False, Address(2, VIP, 24))) == (w, Verdict(restore=True))
    assert decide(w, AddressChange(False, Address(2, "2001:db8::10", 64)))[1].restore
    assert decide(w, AddressChange(False, Address(2, OTHER, 24))) == (w, Verdict())
    assert decide(w, AddressChange(True, Address(2, VIP, 24))) == (w, Verdict())


def test_carrier_loss_and_return_on_a_device_carrying_floating_ips() -> None:
    w, verdict = decide(watched(), LinkChange(ETH0._replace(flags=NO_CARRIER), False))
    assert verdict == Verdict()
    assert w.no_carrier() == {"eth0"}
    w, verdict = decide(w, LinkChange(ETH0._replace(flags=0), False))  # now admin down too
    assert w.no_carrier() == {"eth0"}
    assert verdict == Verdict()
    w, verdict = decide(w, LinkChange(ETH0, False))
    assert w.no_carrier() == frozenset()
    # Coming back up, addresses may have been flushed (IPv6 on down): look.
    assert verdict == Verdict(restore=True)
    # A repeated "up" (an MTU change, say) is no return.
    assert decide(w, LinkChange(ETH0, False))[1] == Verdict()


def test_other_devices_never_count() -> None:
    w, verdict = decide(watched(), LinkChange(ETH1._replace(flags=0), False))
    assert w.no_carrier() == frozenset()
    w, verdict = decide(w, LinkChange(ETH1, False))
    assert verdict == Verdict()


def test_device_removed_or_renamed_cannot_serve_until_it_is_back() -> None:
    w, verdict = decide(watched(), LinkChange(ETH0, True))
    assert w.no_carrier() == {"eth0"}
    assert verdict == Verdict()
    w, verdict = decide(w, LinkChange(Link(7, "eth0", UP), False))  # re-created, new index
    assert w.no_carrier() == frozenset()
    assert verdict.restore
    w, _ = decide(w, LinkChange(Link(7, "lan0", UP), False))  # renamed
    assert w.no_carrier() == {"eth0"}
    assert "eth0" not in w.usable


def test_lost_notifications_ask_for_a_fresh_read_and_a_restore() -> None:
    w = watched()
    assert decide(w, Overflow()) == (w, Verdict(restore=True, resync=True))


# ------------------------------------------------------------------- the driver


class ScriptedMonitor:
    """Stands in for rtnetlink.Monitor: readable when the test queues a batch."""

    def __init__(self) -> None:
        self._ours, self._theirs = socket.socketpair()
        self._ours.setblocking(False)
        self.batches: list[list[Change]] = []
        self.closed = False

    def push(self, *changes: Change) -> None:
        self.batches.append(list(changes))
        self._theirs.send(b"x")

    def fileno(self) -> int:
        return self._ours.fileno()

    def read(self, max_reads: int) -> list[Change]:
        try:
            self._ours.recv(1 << 16)
        except BlockingIOError:
            return []
        changes = [c for batch in self.batches for c in batch]
        self.batches.clear()
        return changes

    def close(self) -> None:
        self.closed = True
        self._ours.close()
        self._theirs.close()


@dataclass
class Recorder:
    told: list[object] = field(default_factory=list)

    async def on_carrier(self, down: frozenset[str]) -> None:
        await trio.lowlevel.checkpoint()
        self.told.append(set(down))

    async def on_address_lost(self) -> None:
        await trio.lowlevel.checkpoint()
        self.told.append("restore")


async def test_watch_tells_the_carrier_first_then_changes_once_per_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    monitor = ScriptedMonitor()
    links = [ETH0._replace(flags=NO_CARRIER), ETH1]
    devices = {"eth0"}
    dumps = 0
    fail = False

    async def targets() -> tuple[frozenset[str], frozenset[str]]:
        await trio.lowlevel.checkpoint()
        if fail:
            raise FloatingIPError("netlink: interrupted")
        return frozenset({VIP}), frozenset(devices)

    async def dump() -> list[Link]:
        nonlocal dumps
        await trio.lowlevel.checkpoint()
        dumps += 1
        return list(links)

    watch = LinkWatch(targets, dump, lambda: monitor)  # type: ignore[arg-type,return-value]
    sink = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run, sink)
        assert sink.told == [{"eth0"}]  # before anything else can happen
        # A flap inside one batch reports nothing; the return asks for a look at addresses.
        monitor.push(LinkChange(ETH0, False), LinkChange(ETH0._replace(flags=0), False),
                     LinkChange(ETH0, False))
        await trio.sleep(0.1)
        assert sink.told == [{"eth0"}, set(), "restore"]
        # Two removals of ours in a batch: one look.
        monitor.push(AddressChange(False, Address(2, VIP, 24)),
                     AddressChange(False, Address(2, VIP, 24)))
        await trio.sleep(0.1)
        assert sink.told[3:] == ["restore"]
        # A reload moves the floating IPs to eth1, which has no carrier: read afresh.
        devices = {"eth1"}
        links = [ETH0, ETH1._replace(flags=0)]
        watch.refresh()
        await trio.sleep(0.1)
        assert sink.told[4:] == [{"eth1"}, "restore"]
        # Lost notifications while netlink fails: logged, retried, then read afresh.
        fail = True
        before = dumps
        monitor.push(Overflow())
        await trio.sleep(0.5)
        assert dumps == before
        fail = False
        links = [ETH0, ETH1]
        await trio.sleep(RETRY)
        assert dumps == before + 1
        assert sink.told[6:] == ["restore", set(), "restore"]
        nursery.cancel_scope.cancel()
    assert monitor.closed
