"""Floating-IP placement (pure, against a fixed address list), the GARP / NA frames, and
cancelling a stuck netlink request."""

from __future__ import annotations

import ipaddress
import struct
import threading

import pytest
import trio
import trio.testing

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
    return _resolve(ips, ADDRESSES, NAMES, lambda _device: MAC)


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
     (fip("198.18.0.10", device="eth9"), "device 'eth9' does not exist")],
)
def test_unplaceable(ip: FloatingIP, message: str) -> None:
    with pytest.raises(FloatingIPError, match=message):
        resolve([ip])


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
    with pytest.raises(FloatingIPError, match="interface 3 vanished"):
        _resolve([fip("198.18.7.9")], ADDRESSES, {1: "lo", 2: "eth0"}, lambda _device: MAC)


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
