"""IPVS generic netlink replies built the way the 6.1 kernel builds them (ip_vs_genl_fill_service
/ _dest: 16-byte addresses, HASHED flag, statistics), for the codec tests and bench/ipvs/codec.py.

The attribute numbers and flags come from lbha's codec and table modules, their one home; what
is checked independently of them is the layout (order, sizes, nesting), and the tests also read
lbha's requests back with pyroute2's IPVS message class.
"""

from __future__ import annotations

import socket
import struct

from lbha.plugins import ipvs_netlink as nl
from lbha.plugins.ipvs_table import (
    FLAG_HASHED,
    FLAG_ONEPACKET,
    FLAG_PERSISTENT,
    DestKey,
    DestSettings,
    ServiceKey,
    ServiceSettings,
)


def nla(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _stats(size: int) -> bytes:
    """A nested statistics attribute's payload: ten counters of `size` bytes."""
    return nla(1, b"\0" * size) * 10


def kernel_service(key: ServiceKey, s: ServiceSettings, hashed: bool = True,
                   af: int | None = None, port: bool = True) -> bytes:
    """A GET_SERVICE reply's genl payload, shaped like ip_vs_genl_fill_service's."""
    real_af = socket.AF_INET6 if key.family == 6 else socket.AF_INET
    attrs = nla(nl.SVC_AF, struct.pack("=H", af or real_af))
    if key.protocol == "fwmark":
        attrs += nla(nl.SVC_FWMARK, struct.pack("=I", key.fwmark))
    else:
        attrs += (nla(nl.SVC_PROTOCOL, struct.pack("=H", nl._protocol_number(key.protocol)))
                  + nla(nl.SVC_ADDR, socket.inet_pton(real_af, key.address or "").ljust(16, b"\0"))
                  + (nla(nl.SVC_PORT, struct.pack("!H", key.port)) if port else b""))
    flags = ((FLAG_PERSISTENT if s.persistent else 0) | (FLAG_ONEPACKET if s.one_packet else 0)
             | (FLAG_HASHED if hashed else 0))
    netmask = s.netmask or ("128" if key.family == 6 else "255.255.255.255")
    attrs += (nla(nl.SVC_SCHED_NAME, s.scheduler.encode() + b"\0")
              + nla(nl.SVC_FLAGS, struct.pack("=II", flags, 0xFFFFFFFF))
              + nla(nl.SVC_TIMEOUT, struct.pack("=I", s.timeout))
              + nla(nl.SVC_NETMASK, nl.encode_netmask(key.family, netmask))
              + nla(nl.SVC_STATS | nl.NLA_F_NESTED, _stats(4)))
    return struct.pack("=BBH", nl.IPVS_CMD_NEW_SERVICE, 1, 0) + nla(nl.IPVS_CMD_ATTR_SERVICE,
                                                                     attrs)


def kernel_dest(dest: DestKey, s: DestSettings, conn_flags: int = 0,
                order: list[int] | None = None) -> bytes:
    """A GET_DEST reply's genl payload in ip_vs_genl_fill_dest's order (or in `order`)."""
    af = socket.AF_INET6 if ":" in dest.address else socket.AF_INET
    attrs = [nla(nl.DEST_ADDR, socket.inet_pton(af, dest.address).ljust(16, b"\0")),
             nla(nl.DEST_PORT, struct.pack("!H", dest.port)),
             nla(nl.DEST_FWD_METHOD, struct.pack("=I", s.forwarding | conn_flags)),
             nla(nl.DEST_WEIGHT, struct.pack("=I", s.weight)),
             nla(nl.DEST_TUN_TYPE, b"\0"), nla(nl.DEST_TUN_PORT, b"\0\0"),
             nla(nl.DEST_TUN_FLAGS, b"\0\0"),
             nla(nl.DEST_U_THRESH, struct.pack("=I", s.upper)),
             nla(nl.DEST_L_THRESH, struct.pack("=I", s.lower)),
             # Connection counts: not compared.
             nla(nl.DEST_ACTIVE_CONNS, struct.pack("=I", 5)),
             nla(nl.DEST_INACT_CONNS, struct.pack("=I", 6)),
             nla(nl.DEST_PERSIST_CONNS, struct.pack("=I", 7)),
             nla(nl.DEST_ADDR_FAMILY, struct.pack("=H", af)),
             nla(nl.DEST_STATS, _stats(4)), nla(nl.DEST_STATS64, _stats(8))]
    if order is not None:
        attrs = [attrs[i] for i in order]
    return struct.pack("=BBH", nl.IPVS_CMD_NEW_DEST, 1, 0) + nla(nl.IPVS_CMD_ATTR_DEST,
                                                                  b"".join(attrs))
