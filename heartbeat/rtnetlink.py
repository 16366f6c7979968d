"""A small rtnetlink client on pyroute2's message codec: requests and notifications.

Why not pyroute2's IPRoute: it runs an asyncio loop per call and decodes every attribute of
every link, ~5 ms to place one address on this VM, on the path where clients lose packets
during a takeover. This socket, kept open, does a dump plus an add in ~0.5 ms.

Blocking on purpose: the kernel handles a request inside send() under the RTNL lock, which
another process may hold for a while, so callers run it in a worker thread, one at a time.

`Monitor` is the other half: a socket subscribed to the kernel's address and link
notifications, never blocking, so the trio thread can wait for it to be readable and read it.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import socket
import struct
from typing import Any, NamedTuple

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import IFF_RUNNING, IFF_UP, ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

#: A reply never takes this long unless the kernel is stuck; then the caller gets an error.
REPLY_TIMEOUT = 5.0
#: Reads per request: a dump of tens of thousands of addresses fits many times over.
MAX_READS = 10_000
#: Tries of a dump that the kernel flags as interrupted by a concurrent change.
DUMP_TRIES = 3
_SIOCGIFHWADDR = 0x8927
#: Room for a burst of notifications (an interface flushing thousands of addresses) before
#: the kernel drops some and says so (ENOBUFS); the watcher then reads the state afresh.
MONITOR_BUFFER = 1 << 20


class Address(NamedTuple):
    """One address as the kernel lists it."""

    index: int
    address: str
    prefixlen: int


class Link(NamedTuple):
    """One network interface as the kernel lists it."""

    index: int
    name: str
    flags: int

    @property
    def usable(self) -> bool:
        """Up and running: administratively up with carrier (keepalived's test)."""
        return bool(self.flags & IFF_UP and self.flags & IFF_RUNNING)


class AddressChange(NamedTuple):
    """An address was added (RTM_NEWADDR) or removed (RTM_DELADDR)."""

    added: bool
    address: Address


class LinkChange(NamedTuple):
    """An interface changed (RTM_NEWLINK) or went away (RTM_DELLINK, `removed`)."""

    link: Link
    removed: bool


class Overflow(NamedTuple):
    """The kernel dropped notifications (the socket's buffer was full): read the state
    afresh."""


Change = AddressChange | LinkChange | Overflow


class Rtnetlink:
    """Requests to the kernel's routing netlink, from one thread at a time."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.settimeout(REPLY_TIMEOUT)
        self._sock.bind((0, 0))
        self._seq = itertools.count(1)
        self._marshal = MarshalRtnl()

    def close(self) -> None:
        self._sock.close()

    def addresses(self) -> list[Address]:
        """Every address on every interface."""
        for _ in range(DUMP_TRIES):
            msg = ifaddrmsg()
            msg["family"] = socket.AF_UNSPEC
            replies, interrupted = self._request(msg, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP)
            if not interrupted:
                break
        else:
            raise NetlinkError(errno.EAGAIN, "address dump interrupted by changes "
                                             f"{DUMP_TRIES} times in a row")
        return [_address(r) for r in replies]

    def links(self) -> list[Link]:
        """Every network interface."""
        for _ in range(DUMP_TRIES):
            msg = ifinfmsg()
            msg["family"] = socket.AF_UNSPEC
            replies, interrupted = self._request(msg, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP)
            if not interrupted:
                return [_link(r) for r in replies]
        raise NetlinkError(errno.EAGAIN, f"link dump interrupted by changes {DUMP_TRIES} "
                                         "times in a row")

    def add_address(self, index: int, address: str, prefixlen: int, *,
                    label: str | None = None, flags: int = 0) -> None:
        """Add an address; NetlinkError(EEXIST) if it is there already."""
        msg = _address_msg(index, address, prefixlen)
        msg["flags"] = flags
        if label is not None:
            msg["attrs"].append(("IFA_LABEL", label))
        self._request(msg, RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)

    def delete_address(self, index: int, address: str, prefixlen: int) -> None:
        """Remove an address; NetlinkError(EADDRNOTAVAIL) if it is not there."""
        self._request(_address_msg(index, address, prefixlen), RTM_DELADDR,
                      NLM_F_REQUEST | NLM_F_ACK)

    def hardware_address(self, device: str) -> bytes:
        """The link-layer address of a device (six zero bytes when it has none)."""
        request = struct.pack("16s16x", device.encode())
        reply = fcntl.ioctl(self._sock.fileno(), _SIOCGIFHWADDR, request)
        return reply[18:24]

    def _request(self, msg: Any, kind: int, flags: int) -> tuple[list[Any], bool]:
        seq = next(self._seq)
        msg["header"]["type"] = kind
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = seq
        msg.encode()
        self._sock.send(msg.data)
        replies: list[Any] = []
        interrupted = False
        for _ in range(MAX_READS):
            for reply in self._marshal.parse(self._sock.recv(1 << 16)):
                header = reply["header"]
                if header["sequence_number"] != seq:
                    continue  # the late answer to a request that timed out
                interrupted = interrupted or bool(header["flags"] & NLM_F_DUMP_INTR)
                if header["type"] == NLMSG_ERROR:
                    if header["error"] is not None:
                        raise header["error"]
                    return replies, interrupted
                if header["type"] == NLMSG_DONE:
                    return replies, interrupted
                replies.append(reply)
        raise NetlinkError(errno.EMSGSIZE, f"no end to the kernel's reply in {MAX_READS} reads")


class Monitor:
    """Address (IPv4, IPv6) and link notifications, read without blocking."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self._sock.setblocking(False)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MONITOR_BUFFER)
            self._sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        except OSError:
            self._sock.close()
            raise
        self._marshal = MarshalRtnl()

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def read(self, max_reads: int) -> list[Change]:
        """The notifications waiting, in order (up to `max_reads` datagrams; [] when none)."""
        changes: list[Change] = []
        for _ in range(max_reads):
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                changes.append(Overflow())
                continue
            for msg in self._marshal.parse(data):
                kind = msg["header"]["type"]
                if kind in (RTM_NEWADDR, RTM_DELADDR):
                    changes.append(AddressChange(kind == RTM_NEWADDR, _address(msg)))
                elif kind in (RTM_NEWLINK, RTM_DELLINK):
                    changes.append(LinkChange(_link(msg), kind == RTM_DELLINK))
        return changes


def _address(msg: Any) -> Address:
    # For IPv4 IFA_LOCAL is the interface's own address (IFA_ADDRESS is the far end on a
    # point-to-point link); IPv6 lists only IFA_ADDRESS unless point-to-point.
    return Address(msg["index"], msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS"),
                   msg["prefixlen"])


def _link(msg: Any) -> Link:
    return Link(msg["index"], msg.get("IFLA_IFNAME") or "", msg["flags"])


def _address_msg(index: int, address: str, prefixlen: int) -> Any:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    msg = ifaddrmsg()
    msg["family"] = family
    msg["prefixlen"] = prefixlen
    msg["index"] = index
    msg["attrs"] = [("IFA_ADDRESS", address)]
    if family == socket.AF_INET:
        msg["attrs"].append(("IFA_LOCAL", address))
    return msg
