"""The rtnetlink client against the real kernel, in a namespace of its own."""

from __future__ import annotations

import errno
import select
import socket
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWADDR
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD
from pyroute2.netns import setns

from lbha.heartbeat.rtnetlink import (
    Address,
    AddressChange,
    Change,
    LinkChange,
    Monitor,
    Overflow,
    Rtnetlink,
    _address_msg,
)

from .netns import Lab, unavailable

pytestmark = [pytest.mark.netns]

SKIP = unavailable()
T = TypeVar("T")


class Host:
    """One namespace with eth0 (198.18.0.1/24, 2001:db8::1/64) and a client for it."""

    def __init__(self) -> None:
        self.lab = Lab()
        self.ns = self.lab.add_host("lb", ["198.18.0.1/24", "2001:db8::1/64"])
        self.index = int(self.lab.ip("-n", self.ns, "-o", "link", "show", "eth0").split(":")[0])
        self.rtnl = self._open(Rtnetlink)

    def _open(self, factory: Callable[[], T]) -> T:
        # A socket stays in the namespace it was made in; setns moves only the thread that
        # calls it, here a throwaway one.
        def open_inside() -> T:
            setns(f"/run/netns/{self.ns}", flags=0)
            return factory()

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(open_inside).result(timeout=10)

    def show(self, *args: str) -> str:
        return self.lab.ip("-n", self.ns, *args)

    def close(self) -> None:
        self.rtnl.close()
        self.lab.close()


@pytest.fixture
def host() -> Iterator[Host]:
    if SKIP:
        pytest.skip(SKIP)
    h = Host()
    try:
        yield h
    finally:
        h.close()


def test_add_list_and_delete_an_ipv4_address_with_its_label(host: Host) -> None:
    host.rtnl.add_address(host.index, "198.18.0.10", 24, label="eth0:h0")
    assert Address(host.index, "198.18.0.10", 24) in host.rtnl.addresses()
    assert "198.18.0.10/24" in host.show("-4", "addr", "show", "label", "eth0:h0")
    with pytest.raises(NetlinkError) as exists:
        host.rtnl.add_address(host.index, "198.18.0.10", 24, label="eth0:h0")
    assert exists.value.code == errno.EEXIST

    host.rtnl.delete_address(host.index, "198.18.0.10", 24)
    assert "198.18.0.10" not in {a.address for a in host.rtnl.addresses()}
    with pytest.raises(NetlinkError) as absent:
        host.rtnl.delete_address(host.index, "198.18.0.10", 24)
    assert absent.value.code == errno.EADDRNOTAVAIL


def test_ipv6_address_added_without_dad_is_usable_at_once(host: Host) -> None:
    host.rtnl.add_address(host.index, "2001:db8::10", 64, flags=IFA_F_NODAD)
    assert Address(host.index, "2001:db8::10", 64) in host.rtnl.addresses()
    line = host.show("-6", "addr", "show", "to", "2001:db8::10/128")
    assert "2001:db8::10/64" in line
    assert "tentative" not in line


def test_point_to_point_address_is_listed_by_its_local_side(host: Host) -> None:
    host.show("addr", "add", "198.18.5.1", "peer", "198.18.5.2", "dev", "eth0")
    listed = {a.address for a in host.rtnl.addresses()}
    assert "198.18.5.1" in listed
    assert "198.18.5.2" not in listed


def test_missing_device_is_a_netlink_error(host: Host) -> None:
    with pytest.raises(NetlinkError) as missing:
        host.rtnl.add_address(99999, "198.18.0.10", 24)
    assert missing.value.code == errno.ENODEV
    with pytest.raises(OSError, match="No such device"):
        host.rtnl.hardware_address("nosuchdev")


def test_hardware_address_is_the_link_mac(host: Host) -> None:
    mac = host.show("-o", "link", "show", "eth0").split("link/ether ")[1].split()[0]
    assert host.rtnl.hardware_address("eth0") == bytes.fromhex(mac.replace(":", ""))
    assert host.rtnl.hardware_address("lo") == b"\0" * 6


def test_late_replies_to_an_abandoned_request_are_skipped(host: Host) -> None:
    # A request whose caller gave up leaves its answer queued on the socket; the next request
    # must read past it to its own.
    host.rtnl._sock.send(_add_request(host.index, "198.18.0.10", sequence=4_000_000))
    assert Address(host.index, "198.18.0.10", 24) in host.rtnl.addresses()
    host.rtnl.delete_address(host.index, "198.18.0.10", 24)


def _add_request(index: int, address: str, sequence: int) -> bytes:
    msg = _address_msg(index, address, 24)
    msg["header"]["type"] = RTM_NEWADDR
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
    msg["header"]["sequence_number"] = sequence
    msg.encode()
    return bytes(msg.data)


def test_links_tell_carrier_from_the_flags(host: Host) -> None:
    links = {link.name: link for link in host.rtnl.links()}
    assert links["eth0"].index == host.index
    assert links["eth0"].usable
    # The switch end going down takes the carrier from eth0: up, but not running.
    host.lab.ip("-n", host.lab.switch, "link", "set", "p-lb", "down")
    eth0 = next(link for link in host.rtnl.links() if link.name == "eth0")
    assert not eth0.usable


def read_until(monitor: Monitor, done: Callable[[list[Change]], bool]) -> list[Change]:
    """Notifications until `done` says enough (bounded: 5 s)."""
    seen: list[Change] = []
    for _ in range(100):
        if done(seen):
            break
        select.select([monitor], [], [], 0.05)
        seen += monitor.read(64)
    return seen


def test_monitor_reports_address_and_carrier_changes_without_blocking(host: Host) -> None:
    monitor = host._open(Monitor)
    try:
        assert monitor.read(64) == []  # nothing waiting: returns at once
        host.show("addr", "add", "198.18.0.10/24", "dev", "eth0")
        host.show("addr", "del", "198.18.0.10/24", "dev", "eth0")
        vip = Address(host.index, "198.18.0.10", 24)
        seen = read_until(monitor, lambda s: AddressChange(False, vip) in s)
        assert [c for c in seen if isinstance(c, AddressChange)] == [
            AddressChange(True, vip), AddressChange(False, vip)]

        host.lab.ip("-n", host.lab.switch, "link", "set", "p-lb", "down")
        seen = read_until(monitor, lambda s: any(
            isinstance(c, LinkChange) and c.link.name == "eth0" and not c.link.usable
            for c in s))
        eth0 = [c for c in seen if isinstance(c, LinkChange) and c.link.name == "eth0"]
        assert eth0[-1].link.index == host.index
        assert not eth0[-1].link.usable
        assert not eth0[-1].removed

        host.lab.ip("-n", host.lab.switch, "link", "set", "p-lb", "up")
        seen = read_until(monitor, lambda s: any(
            isinstance(c, LinkChange) and c.link.name == "eth0" and c.link.usable for c in s))
        assert any(isinstance(c, LinkChange) and c.link.usable for c in seen)
    finally:
        monitor.close()


def test_monitor_reports_notifications_the_kernel_dropped(host: Host) -> None:
    monitor = host._open(Monitor)
    try:
        # A tiny buffer and a burst it cannot hold: the kernel drops notifications and says
        # so once (ENOBUFS); the watch then reads the state afresh.
        monitor._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        batch = "".join(f"addr add 198.18.1.{i}/32 dev eth0\n" for i in range(1, 201))
        subprocess.run(["ip", "-n", host.ns, "-batch", "-"], input=batch, text=True,
                       check=True, timeout=30)
        seen = read_until(monitor, lambda s: Overflow() in s)
        assert Overflow() in seen
        assert len([c for c in seen if isinstance(c, AddressChange)]) < 200
        host.show("addr", "add", "198.18.0.10/24", "dev", "eth0")
        vip = AddressChange(True, Address(host.index, "198.18.0.10", 24))
        assert vip in read_until(monitor, lambda s: vip in s)  # and it keeps reporting
    finally:
        monitor.close()
