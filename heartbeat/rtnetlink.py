"""A small blocking rtnetlink client: one NETLINK_ROUTE socket, pyroute2's message codec.

Why not pyroute2's IPRoute: it runs an asyncio loop per call and decodes every attribute of
every link, ~5 ms to place one address on this VM, on the path where clients lose packets
during a takeover. This socket, kept open, does a dump plus an add in ~0.5 ms.

Blocking on purpose: the kernel handles a request inside send() under the RTNL lock, which
another process may hold for a while, so callers run it in a worker thread, one at a time.
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
from pyroute2.netlink.rtnl import RTM_DELADDR, RTM_GETADDR, RTM_NEWADDR
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

#: A reply never takes this long unless the kernel is stuck; then the caller gets an error.
REPLY_TIMEOUT = 5.0
#: Reads per request: a dump of tens of thousands of addresses fits many times over.
MAX_READS = 10_000
#: Tries of a dump that the kernel flags as interrupted by a concurrent change.
DUMP_TRIES = 3
_SIOCGIFHWADDR = 0x8927


class Address(NamedTuple):
    """One address as the kernel lists it."""

    index: int
    address: str
    prefixlen: int


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
        # For IPv4 IFA_LOCAL is the interface's own address (IFA_ADDRESS is the far end on a
        # point-to-point link); IPv6 lists only IFA_ADDRESS unless point-to-point.
        return [Address(r["index"], r.get("IFA_LOCAL") or r.get("IFA_ADDRESS"), r["prefixlen"])
                for r in replies]

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
