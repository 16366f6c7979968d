"""Floating IPs: add / remove them with pyroute2 and announce them with GARP / unsolicited NA.

Netlink requests go through one kept-open rtnetlink socket (rtnetlink.py) in a worker thread
(`trio.to_thread.run_sync` behind a one-slot limiter, never on the trio thread): the kernel may
make a request wait for its RTNL lock. Each acquire and release lists the addresses afresh, so
a takeover places the floating IPs by the interfaces as they are at that moment.

Placement: an explicit `device` wins; otherwise the interface holding an address whose subnet
contains the floating IP. A floating IP written without a prefix (/32, /128) takes the prefix
of that subnet, so it sits as a secondary address beside the primary. IPv4 addresses get a
label (`DEVICE:hN` unless configured); IPv6 ones are added with NODAD so they answer at once.

Announcements are raw frames: a gratuitous ARP request (sender = target = the VIP) on an
AF_PACKET socket for IPv4; an unsolicited neighbour advertisement with the Override flag to
ff02::1 (ICMPv6, hop limit 255) for IPv6. Both update existing neighbour entries at once.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import trio
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from lbha.heartbeat.errors import FloatingIPError
from lbha.heartbeat.link_watch import LinkWatch, Sink
from lbha.heartbeat.rtnetlink import Address, Link, Rtnetlink
from lbha.model import Config, FloatingIP, IPInterface

log = logging.getLogger(__name__)

T = TypeVar("T")
_ETH_P_ARP = 0x0806
_BROADCAST = b"\xff" * 6


def floating_ips(config: Config) -> tuple[FloatingIP, ...]:
    """Every virtual service address plus the cluster's extra floating IPs, each once."""
    seen: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, FloatingIP] = {}
    extra = config.cluster.floating_ips if config.cluster is not None else ()
    for fip in extra:
        seen.setdefault(fip.address, fip)
    for virtual in config.virtuals:
        if virtual.address is not None and virtual.address not in seen:
            seen[virtual.address] = FloatingIP(ipaddress.ip_interface(virtual.address))
    return tuple(seen.values())


@dataclass(frozen=True)
class Placement:
    """Where one floating IP goes, resolved against the interfaces at hand."""

    interface: IPInterface
    index: int
    device: str
    label: str | None
    mac: bytes

    @property
    def address(self) -> str:
        return str(self.interface.ip)


class AddressManager(ABC):
    """What the daemon needs from the floating-IP layer (tests substitute a fake)."""

    @abstractmethod
    async def acquire(self) -> list[str]:
        """Add every floating IP (already present is fine); return those this call added.
        Places every one it can, then raises FloatingIPError naming the others."""

    @abstractmethod
    async def release(self) -> None:
        """Remove every floating IP wherever it is (absent is fine)."""

    @abstractmethod
    async def remove(self, addresses: Collection[str]) -> None:
        """Remove these addresses (ones a reload dropped from the config)."""

    @abstractmethod
    async def held(self) -> list[str]:
        """The floating IPs present on this host now."""

    @abstractmethod
    async def announce(self) -> list[str]:
        """Send one round of GARP / NA for the floating IPs held; return those announced."""

    @abstractmethod
    def reconfigure(self, ips: Sequence[FloatingIP]) -> None:
        """Use a new list of floating IPs from now on (after a reload)."""

    @abstractmethod
    def close(self) -> None:
        """Close what announcing keeps open (at daemon stop)."""

    async def check(self, ips: Sequence[FloatingIP]) -> None:
        """Raise FloatingIPError unless every one of `ips` can be placed on this host (its
        device exists, or an interface holds its subnet). Changes nothing."""
        await trio.lowlevel.checkpoint()

    async def watch(self, sink: Sink, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled: tell `sink` when a floating IP is removed behind our back and
        when the devices carrying them lose or regain carrier (nothing to watch here)."""
        task_status.started()
        await trio.sleep_forever()


def _default_label(device: str, n: int) -> str | None:
    label = f"{device}:h{n}"
    return label if len(label) <= 15 else device


def _resolve(ips: Sequence[FloatingIP], addresses: Sequence[Address],
             names: Mapping[int, str], mac: Callable[[str], bytes],
             ) -> tuple[list[Placement], list[str]]:
    """Where each floating IP goes, and why the others cannot be placed."""
    indexes = {name: index for index, name in names.items()}
    ours = {fip.address for fip in ips}
    subnets = []
    for a in addresses:
        address = ipaddress.ip_address(a.address)
        if address not in ours and not address.is_link_local:
            subnets.append((ipaddress.ip_interface(f"{address}/{a.prefixlen}"), a.index))
    placements = []
    problems = []
    per_device: dict[str, int] = {}
    for fip in ips:
        full = fip.interface.network.prefixlen == fip.interface.max_prefixlen
        interface = fip.interface
        if fip.device is not None:
            index = indexes.get(fip.device)
            if index is None:
                problems.append(f"floating IP {fip.address}: device {fip.device!r} does not "
                                "exist on this host")
                continue
            if full:
                interface = next((ipaddress.ip_interface(f"{fip.address}/{net.network.prefixlen}")
                                  for net, i in subnets
                                  if i == index and fip.address in net.network), interface)
        else:
            match = [(net, i) for net, i in subnets if fip.address in net.network]
            if not match:
                problems.append(f"floating IP {fip.address}: no interface has an address in "
                                "its subnet; configure one or give the floating IP an "
                                "explicit device")
                continue
            net, index = max(match, key=lambda m: m[0].network.prefixlen)
            if full:
                interface = ipaddress.ip_interface(f"{fip.address}/{net.network.prefixlen}")
        device = names.get(index)
        if device is None:  # the interface went away between two netlink reads
            problems.append(f"floating IP {fip.address}: interface {index} vanished while it "
                            "was being placed")
            continue
        label = None
        if fip.address.version == 4:
            n = per_device.get(device, 0)
            per_device[device] = n + 1
            label = fip.label or _default_label(device, n)
        placements.append(Placement(interface, index, device, label, mac(device)))
    return placements, problems


def _no_mac(_device: str) -> bytes:
    return b""


def _targets(rtnl: Rtnetlink, ips: Sequence[FloatingIP]) -> tuple[list[Placement], list[str]]:
    """Where the floating IPs would go now, and why some could not (nothing is changed)."""
    return _resolve(ips, rtnl.addresses(), dict(socket.if_nameindex()), _no_mac)


def placement_problems(ips: Sequence[FloatingIP]) -> list[str]:
    """Why some of `ips` could not be placed on this host now (empty: every one can)."""
    try:
        rtnl = Rtnetlink()
    except OSError as exc:
        return [f"cannot read this host's interfaces: {exc}"]
    try:
        return _targets(rtnl, ips)[1]
    except (NetlinkError, OSError) as exc:
        return [f"cannot read this host's interfaces: {exc}"]
    finally:
        rtnl.close()


@dataclass(frozen=True)
class Placed:
    """The outcome of placing the floating IPs: those held now, those this call added (the
    others were there already), and why the rest are not held."""

    held: list[Placement]
    added: list[str]
    problems: list[str]


def _place(rtnl: Rtnetlink, ips: Sequence[FloatingIP]) -> Placed:
    placements, problems = _resolve(ips, rtnl.addresses(), dict(socket.if_nameindex()),
                                    rtnl.hardware_address)
    held, added = [], []
    for p in placements:
        try:
            rtnl.add_address(p.index, p.address, p.interface.network.prefixlen, label=p.label,
                             flags=0 if p.label else IFA_F_NODAD)
            added.append(p.address)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                problems.append(f"cannot add {p.interface} to {p.device}: {exc}")
                continue
        held.append(p)
    return Placed(held, added, problems)


def _present(rtnl: Rtnetlink, addresses: set[str]) -> list[Address]:
    return [a for a in rtnl.addresses() if a.address in addresses]


def _delete(rtnl: Rtnetlink, addresses: set[str]) -> list[str]:
    removed = []
    for a in _present(rtnl, addresses):
        try:
            rtnl.delete_address(*a)
        except NetlinkError as exc:
            if exc.code != errno.EADDRNOTAVAIL:
                raise FloatingIPError(f"cannot remove {a.address}: {exc}") from None
        removed.append(a.address)
    return removed


def garp_frame(mac: bytes, address: ipaddress.IPv4Address) -> bytes:
    """A gratuitous ARP request: who-has VIP tell VIP, broadcast."""
    ip = address.packed
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, b"\0" * 6, ip)
    return _BROADCAST + mac + struct.pack("!H", _ETH_P_ARP) + arp


def na_message(mac: bytes, address: ipaddress.IPv6Address) -> bytes:
    """An unsolicited neighbour advertisement, Override set, with the target link-layer address
    option; the kernel fills in the ICMPv6 checksum."""
    return struct.pack("!BBHI16sBB6s", 136, 0, 0, 0x2000_0000, address.packed, 2, 1, mac)


def packet_socket() -> socket.socket:
    """A send-only AF_PACKET socket (protocol 0 receives nothing).

    Kept open for the daemon's life: closing a packet socket waits for an RCU grace period
    (6-15 ms measured here), which would stall the trio thread after every announcement.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.setblocking(False)
    return sock


def send_garp(sock: socket.socket, device: str, mac: bytes,
              address: ipaddress.IPv4Address) -> None:
    sock.sendto(garp_frame(mac, address), (device, _ETH_P_ARP))


def send_na(index: int, mac: bytes, address: ipaddress.IPv6Address) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.bind((str(address), 0, 0, index))
        sock.sendto(na_message(mac, address), ("ff02::1", 0, 0, index))


class NetlinkAddresses(AddressManager):
    """The real thing: netlink in one worker thread, raw sockets for the announcements."""

    def __init__(self, ips: Sequence[FloatingIP]) -> None:
        self._ips = tuple(ips)
        self._placements: list[Placement] = []
        self._limiter = trio.CapacityLimiter(1)
        self._packet: socket.socket | None = None
        self._rtnl: Rtnetlink | None = None
        self._watch = LinkWatch(self._watched, self._links)

    def close(self) -> None:
        if self._packet is not None:
            self._packet.close()
            self._packet = None
        if self._rtnl is not None and not self._limiter.borrowed_tokens:
            self._rtnl.close()  # else an abandoned request still uses it: left to the exit
            self._rtnl = None

    def reconfigure(self, ips: Sequence[FloatingIP]) -> None:
        self._ips = tuple(ips)
        self._placements = []
        self._watch.refresh()

    async def _netlink(self, work: Callable[[Rtnetlink], T]) -> T:
        def call() -> T:
            try:
                if self._rtnl is None:
                    self._rtnl = Rtnetlink()
                return work(self._rtnl)
            except NetlinkError as exc:
                raise FloatingIPError(f"netlink: {exc}") from None
            except OSError as exc:
                # A timed-out dump may still be running on that socket: start afresh.
                if self._rtnl is not None:
                    self._rtnl.close()
                    self._rtnl = None
                raise FloatingIPError(f"netlink: {exc}") from None

        # Abandoned when cancelled, so the daemon's bounded stop holds even while a request
        # waits on another process's RTNL lock; the limiter stays taken until the thread is
        # done, so no two threads ever use the socket.
        return await trio.to_thread.run_sync(call, limiter=self._limiter, abandon_on_cancel=True)

    async def acquire(self) -> list[str]:
        ips = self._ips
        placed = await self._netlink(lambda rtnl: _place(rtnl, ips))
        self._placements = placed.held
        if placed.problems:
            raise FloatingIPError("; ".join(placed.problems))
        return placed.added

    async def check(self, ips: Sequence[FloatingIP]) -> None:
        _placements, problems = await self._netlink(lambda rtnl: _targets(rtnl, ips))
        if problems:
            raise FloatingIPError("; ".join(problems))

    async def watch(self, sink: Sink, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._watch.run(sink, task_status=task_status)

    async def _watched(self) -> tuple[frozenset[str], frozenset[str]]:
        ips = self._ips
        placements, _problems = await self._netlink(lambda rtnl: _targets(rtnl, ips))
        # A configured device that does not exist (any more) cannot serve: watched as such.
        devices = {p.device for p in placements} | {f.device for f in ips if f.device}
        return frozenset(str(f.address) for f in ips), frozenset(devices)

    async def _links(self) -> list[Link]:
        return await self._netlink(lambda rtnl: rtnl.links())

    async def release(self) -> None:
        await self.remove({str(fip.address) for fip in self._ips})

    async def remove(self, addresses: Collection[str]) -> None:
        wanted = set(addresses)
        removed = await self._netlink(lambda rtnl: _delete(rtnl, wanted))
        if removed:
            log.info("removed floating IPs %s", ", ".join(removed))

    async def held(self) -> list[str]:
        addresses = {str(fip.address) for fip in self._ips}
        present = await self._netlink(lambda rtnl: _present(rtnl, addresses))
        return sorted({a.address for a in present})

    async def announce(self) -> list[str]:
        announced = []
        for p in self._placements:
            try:
                if isinstance(p.interface, ipaddress.IPv4Interface):
                    if self._packet is None:
                        self._packet = packet_socket()
                    send_garp(self._packet, p.device, p.mac, p.interface.ip)
                else:
                    send_na(p.index, p.mac, p.interface.ip)
            except OSError as exc:
                log.warning("cannot announce %s on %s: %s", p.address, p.device, exc)
                continue
            announced.append(p.address)
        return announced
