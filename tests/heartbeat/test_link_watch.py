"""The link watch's decision: what each kernel notification asks of the daemon (pure)."""

from __future__ import annotations

from pyroute2.netlink.rtnl.ifinfmsg import IFF_LOWER_UP, IFF_RUNNING, IFF_UP

from lbha.heartbeat.link_watch import Verdict, Watched, decide, with_links
from lbha.heartbeat.rtnetlink import Address, AddressChange, Link, LinkChange, Overflow

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
