"""Floating-IP placement (pure, against a fixed address list), the GARP / NA frames, and
cancelling a stuck netlink request."""

from __future__ import annotations

import errno
import ipaddress
import struct
import threading

import pytest
import trio
import trio.testing
from pyroute2.netlink.exceptions import NetlinkError

from lbha.config import load_config_text
from lbha.heartbeat import floating_ips as floating_ips_module
from lbha.heartbeat.errors import FloatingIPError
from lbha.heartbeat.floating_ips import (
    NetlinkAddresses,
    Placement,
    _resolve,
    floating_ips,
    garp_frame,
    na_message,
)
from lbha.heartbeat.rtnetlink import Address
from lbha.model import FloatingIP

MAC = bytes.fromhex("020000000001")


NAMES = {1: "lo", 2: "eth0", 3: "a-very-long-nam"}
ADDRESSES = [Address(1, "127.0.0.1", 8), Address(2, "198.18.0.1", 24),
             Address(2, "2001:db8::1", 64), Address(3, "198.18.7.1", 24),
             Address(2, "198.18.0.10", 32)]


def resolve(ips: list[FloatingIP]) -> list[Placement]:
    placements, problems = _resolve(ips, ADDRESSES, NAMES, lambda _device: MAC)
    assert problems == []
    return placements


def fip(text: str, device: str | None = None, label: str | None = None) -> FloatingIP:
    return FloatingIP(ipaddress.ip_interface(text), device, label)


def test_placement_by_subnet_inherits_prefix_and_gets_a_label() -> None:
    placements = resolve([fip("198.18.0.10"), fip("198.18.0.11/32", label="eth0:web"),
                                fip("2001:db8::10"), fip("198.18.7.9")])
    assert [(str(p.interface), p.device, p.label) for p in placements] == [
        ("198.18.0.10/24", "eth0", "eth0:h0"),  # its own stale /32 copy is not its subnet
        ("198.18.0.11/24", "eth0", "eth0:web"),
        ("2001:db8::10/64", "eth0", None),
        ("198.18.7.9/24", "a-very-long-nam", "a-very-long-nam"),  # no room for a suffix
    ]
    assert placements[0].mac == MAC


def test_explicit_device_and_prefix_win() -> None:
    (p,) = resolve([fip("203.0.113.5/28", device="eth0")])
    assert (str(p.interface), p.device, p.index) == ("203.0.113.5/28", "eth0", 2)


@pytest.mark.parametrize(
    ("ip", "message"),
    [(fip("203.0.113.5"), "no interface has an address in its subnet"),
     (fip("198.18.0.10", device="eth9"), "device 'eth9' does not exist on this host")],
)
def test_unplaceable_ones_are_reported_and_the_others_still_placed(ip: FloatingIP,
                                                                   message: str) -> None:
    placements, problems = _resolve([ip, fip("198.18.0.11")], ADDRESSES, NAMES,
                                    lambda _device: MAC)
    assert [p.address for p in placements] == ["198.18.0.11"]
    assert len(problems) == 1
    assert message in problems[0]


def test_every_vip_plus_extra_floating_ips_once() -> None:
    config = load_config_text("""
[cluster]
node = "lb1"
role = "master"
auth = "none"
floating_ips = ["198.18.0.20/24", { address = "198.18.0.10/24", device = "eth0" }]
[[cluster.peers]]
name = "lb2"
addresses = ["198.18.0.2"]
[[virtual]]
address = "198.18.0.10"
ports = [80]
[[virtual]]
address = "2001:db8::10"
ports = [443]
""")
    assert [str(f.interface) for f in floating_ips(config)] == [
        "198.18.0.20/24", "198.18.0.10/24", "2001:db8::10/128"]
    assert floating_ips(config)[1].device == "eth0"


def test_garp_frame_layout() -> None:
    frame = garp_frame(MAC, ipaddress.IPv4Address("198.18.0.10"))
    assert len(frame) == 42
    assert frame[:6] == b"\xff" * 6
    assert frame[6:12] == MAC
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = struct.unpack(
        "!HHBBH6s4s6s4s", frame[14:])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
    assert sha == MAC
    assert spa == tpa == bytes([198, 18, 0, 10])  # gratuitous: sender = target
    assert tha == b"\0" * 6


def test_unsolicited_na_has_override_and_target_lladdr() -> None:
    address = ipaddress.IPv6Address("2001:db8::10")
    message = na_message(MAC, address)
    icmp_type, code, _checksum, flags = struct.unpack("!BBHI", message[:8])
    assert (icmp_type, code) == (136, 0)
    assert flags == 0x2000_0000  # Override only: not a router, not solicited
    assert message[8:24] == address.packed
    assert message[24:] == bytes([2, 1]) + MAC


def test_interface_gone_between_reads_is_a_clear_error() -> None:
    placements, problems = _resolve([fip("198.18.7.9")], ADDRESSES, {1: "lo", 2: "eth0"},
                                    lambda _device: MAC)
    assert placements == []
    assert problems == ["floating IP 198.18.7.9: interface 3 vanished while it was being "
                        "placed"]


class RefusingRtnetlink:
    """The kernel view of ADDRESSES, refusing to add one address; records what was added."""

    def __init__(self, refuse: str) -> None:
        self.refuse = refuse
        self.present = list(ADDRESSES)

    def addresses(self) -> list[Address]:
        return list(self.present)

    def add_address(self, index: int, address: str, prefixlen: int, *, label: str | None = None,
                    flags: int = 0) -> None:
        if address == self.refuse:
            raise NetlinkError(errno.EPERM, "Operation not permitted")
        if any(a.address == address for a in self.present):
            raise NetlinkError(errno.EEXIST, "File exists")
        self.present.append(Address(index, address, prefixlen))

    def hardware_address(self, device: str) -> bytes:
        return MAC

    def close(self) -> None:
        pass


async def test_acquire_places_what_it_can_and_announces_only_what_it_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernel = RefusingRtnetlink(refuse="198.18.0.12")
    monkeypatch.setattr(floating_ips_module, "Rtnetlink", lambda: kernel)
    monkeypatch.setattr(floating_ips_module.socket, "if_nameindex",
                        lambda: list(NAMES.items()))
    sent: list[str] = []
    monkeypatch.setattr(floating_ips_module, "send_garp",
                        lambda _sock, _device, _mac, address: sent.append(str(address)))
    addresses = NetlinkAddresses([fip("198.18.0.10"), fip("198.18.0.11"), fip("198.18.0.12"),
                                  fip("198.18.0.13", device="eth9")])
    try:
        with pytest.raises(FloatingIPError) as failed:
            await addresses.acquire()
        assert str(failed.value) == (
            "floating IP 198.18.0.13: device 'eth9' does not exist on this host; cannot add "
            "198.18.0.12/24 to eth0: (1, 'Operation not permitted')")
        assert await addresses.announce() == ["198.18.0.10", "198.18.0.11"]
        assert sent == ["198.18.0.10", "198.18.0.11"]
        # Added by this call vs already there: what the watch counts as restored.
        kernel.refuse = ""
        del kernel.present[-1]  # 198.18.0.11 removed behind our back
        addresses.reconfigure([fip("198.18.0.10"), fip("198.18.0.11"), fip("198.18.0.12")])
        assert await addresses.acquire() == ["198.18.0.11", "198.18.0.12"]
        assert await addresses.acquire() == []
        with pytest.raises(FloatingIPError, match="device 'eth9' does not exist"):
            await addresses.check([fip("198.18.0.13", device="eth9")])
        await addresses.check([fip("198.18.0.13", device="eth0")])
    finally:
        addresses.close()


async def test_a_stuck_netlink_request_gives_way_to_cancellation(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The daemon bounds its stop clean-up with a cancel scope; a worker thread stuck in the
    # kernel (another process holding the RTNL lock) must not hold that up, nor have its
    # socket closed under it.
    unstick = threading.Event()

    class StuckRtnetlink:
        def addresses(self) -> list[Address]:
            unstick.wait(30)
            return []

        def close(self) -> None:
            raise AssertionError("closed while a request was still using it")

    monkeypatch.setattr(floating_ips_module, "Rtnetlink", StuckRtnetlink)
    addresses = NetlinkAddresses([fip("198.18.0.10")])
    try:
        with trio.move_on_after(5) as scope:
            await addresses.release()
        assert scope.cancelled_caught
        addresses.close()
    finally:
        unstick.set()
