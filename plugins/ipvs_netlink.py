"""IPVS over generic netlink without pyroute2: one blocking socket and a struct-based codec.

Only what the IPVS backend needs: services and destinations added, set and deleted, a service
read by key, every service dumped, the destinations of one service dumped. Requests carry
every field the kernel would otherwise default (a destination "set" replaces the entry, so a
missing forwarding method would become DR); nothing is ever "updated" by deleting it. Replies
are parsed for the attributes the diff compares and nothing else (no statistics).

Attribute numbers and types: include/uapi/linux/ip_vs.h and net/netfilter/ipvs/ip_vs_ctl.c
(the kernel's netlink policy), checked against pyroute2's pyroute2/netlink/generic/ipvs.py.
Ours rather than pyroute2's IPVS message classes: those cost 17-35x more per destination, about
2.8 s to decode a full reconcile's 11,000 (bench/ipvs/README.md, "The codec").

The socket is not bound to a thread: any one thread at a time may use it. Every read is
bounded (SO_RCVTIMEO per recv, a deadline per exchange), so a kernel that never answers
cannot hang the caller.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter
from typing import NamedTuple

from lbha.plugins.ipvs_table import (
    FLAG_ONEPACKET,
    FLAG_PERSISTENT,
    MANAGED_FLAGS,
    AddDest,
    AddService,
    DeleteDest,
    DeleteService,
    DestKey,
    DestSettings,
    EditDest,
    EditService,
    Operation,
    ServiceKey,
    ServiceSettings,
    default_netmask,
)

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
SO_RCVBUFFORCE = 33

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_GENL = struct.Struct("=BBH")  # command, version, reserved
_NLA = struct.Struct("=HH")  # length, type
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_BE16 = struct.Struct("!H")
_I32 = struct.Struct("=i")
_FLAGS = struct.Struct("=II")  # struct ip_vs_flags: flags, mask
_HEADERS = _NLMSG.size + _GENL.size

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2

IPVS_GENL_NAME = "IPVS"
IPVS_GENL_VERSION = 1

IPVS_CMD_NEW_SERVICE = 1
IPVS_CMD_SET_SERVICE = 2
IPVS_CMD_DEL_SERVICE = 3
IPVS_CMD_GET_SERVICE = 4
IPVS_CMD_NEW_DEST = 5
IPVS_CMD_SET_DEST = 6
IPVS_CMD_DEL_DEST = 7
IPVS_CMD_GET_DEST = 8

IPVS_CMD_ATTR_SERVICE = 1
IPVS_CMD_ATTR_DEST = 2

SVC_AF = 1
SVC_PROTOCOL = 2
SVC_ADDR = 3
SVC_PORT = 4
SVC_FWMARK = 5
SVC_SCHED_NAME = 6
SVC_FLAGS = 7
SVC_TIMEOUT = 8
SVC_NETMASK = 9
SVC_STATS = 10

DEST_ADDR = 1
DEST_PORT = 2
DEST_FWD_METHOD = 3
DEST_WEIGHT = 4
DEST_U_THRESH = 5
DEST_L_THRESH = 6
DEST_ACTIVE_CONNS = 7
DEST_INACT_CONNS = 8
DEST_PERSIST_CONNS = 9
DEST_STATS = 10
DEST_ADDR_FAMILY = 11
DEST_STATS64 = 12
DEST_TUN_TYPE = 13
DEST_TUN_PORT = 14
DEST_TUN_FLAGS = 15

#: IP_VS_CONN_F_FWD_MASK: the forwarding method in a destination's connection flags.
FWD_MASK = 0x7

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
#: Address family number -> IP version, and protocol number -> the name lbha uses.
FAMILY_VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}
_PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTOCOL_NAMES = {number: name for name, number in _PROTOCOLS.items()}

#: Send at most this many bytes of requests per sendmsg (well under the socket's buffers, so
#: the error replies of a whole batch always fit in the receive buffer).
BATCH_BYTES = 64 * 1024
RECV_BUFFER = 64 * 1024
SOCKET_BUFFERS = 1 << 20
TIMEOUT = 5.0


class NetlinkError(Exception):
    """The kernel refused a request; `code` is the errno it answered with."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"{what}: {os.strerror(code)}")
        self.code = code


class NetlinkDecodeError(Exception):
    """A netlink reply that the IPVS protocol does not allow (truncated, missing attribute)."""


class Request(NamedTuple):
    """One IPVS request: a command and its encoded attributes."""

    command: int
    attrs: bytes


# ------------------------------------------------------------------ encoding


def _nla(kind: int, payload: bytes) -> bytes:
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def _address(family: int, address: str) -> bytes:
    """union nf_inet_addr: 16 bytes, an IPv4 address in the first four."""
    return socket.inet_pton(_AF[family], address).ljust(16, b"\0")


def encode_netmask(family: int, netmask: str) -> bytes:
    """The netmask attribute: IPv4 a mask in network order, IPv6 a prefix length.

    For IPv6 the kernel reads the 32-bit field as a prefix length in host byte order, the way
    ipvsadm fills it.
    """
    if family == 6:
        return _U32.pack(int(netmask))
    return socket.inet_aton(netmask)


def decode_netmask(family: int, value: bytes) -> str:
    if family == 6:
        return str(_U32.unpack(value)[0])
    return socket.inet_ntoa(value)


def _protocol_number(name: str) -> int:
    # A foreign service may use a protocol lbha has no name for; it is read back as digits.
    return _PROTOCOLS[name] if name in _PROTOCOLS else int(name)


def service_key_attrs(key: ServiceKey) -> bytes:
    """The attributes that identify a service (nested in IPVS_CMD_ATTR_SERVICE)."""
    attrs = _nla(SVC_AF, _U16.pack(_AF[key.family]))
    if key.protocol == "fwmark":
        return attrs + _nla(SVC_FWMARK, _U32.pack(key.fwmark))
    assert key.address is not None, "a tcp/udp service has an address"
    return (attrs + _nla(SVC_PROTOCOL, _U16.pack(_protocol_number(key.protocol)))
            + _nla(SVC_ADDR, _address(key.family, key.address))
            + _nla(SVC_PORT, _BE16.pack(key.port)))


def service_attrs(key: ServiceKey, settings: ServiceSettings) -> bytes:
    """Every attribute of a service add/set: the kernel requires them all for both."""
    flags = (FLAG_PERSISTENT if settings.persistent else 0) | (
        FLAG_ONEPACKET if settings.one_packet else 0)
    netmask = settings.netmask if settings.persistent else default_netmask(key.family)
    return (service_key_attrs(key)
            + _nla(SVC_SCHED_NAME, settings.scheduler.encode("ascii") + b"\0")
            + _nla(SVC_FLAGS, _FLAGS.pack(flags, MANAGED_FLAGS))
            + _nla(SVC_TIMEOUT, _U32.pack(settings.timeout if settings.persistent else 0))
            + _nla(SVC_NETMASK, encode_netmask(key.family, netmask)))


def _dest_family(dest: DestKey) -> int:
    return 6 if ":" in dest.address else 4


def dest_key_attrs(dest: DestKey) -> bytes:
    family = _dest_family(dest)
    return (_nla(DEST_ADDR, _address(family, dest.address))
            + _nla(DEST_PORT, _BE16.pack(dest.port))
            + _nla(DEST_ADDR_FAMILY, _U16.pack(_AF[family])))


def dest_attrs(dest: DestKey, settings: DestSettings) -> bytes:
    """Every attribute of a destination add/set: a set replaces the whole entry."""
    return (dest_key_attrs(dest)
            + _nla(DEST_FWD_METHOD, _U32.pack(settings.forwarding))
            + _nla(DEST_WEIGHT, _U32.pack(settings.weight))
            + _nla(DEST_U_THRESH, _U32.pack(settings.upper))
            + _nla(DEST_L_THRESH, _U32.pack(settings.lower))
            + _nla(DEST_TUN_TYPE, b"\0")
            + _nla(DEST_TUN_PORT, _BE16.pack(0))
            + _nla(DEST_TUN_FLAGS, _U16.pack(0)))


def _in_service(key: ServiceKey, inner: bytes = b"") -> bytes:
    return _nla(IPVS_CMD_ATTR_SERVICE, inner or service_key_attrs(key))


def request(op: Operation) -> Request:
    """The netlink request that carries out one operation of the diff."""
    match op:
        case AddService():
            return Request(IPVS_CMD_NEW_SERVICE,
                           _in_service(op.service, service_attrs(op.service, op.settings)))
        case EditService():
            return Request(IPVS_CMD_SET_SERVICE,
                           _in_service(op.service, service_attrs(op.service, op.settings)))
        case DeleteService():
            return Request(IPVS_CMD_DEL_SERVICE, _in_service(op.service))
        case AddDest():
            return Request(IPVS_CMD_NEW_DEST, _in_service(op.service)
                           + _nla(IPVS_CMD_ATTR_DEST, dest_attrs(op.dest, op.settings)))
        case EditDest():
            return Request(IPVS_CMD_SET_DEST, _in_service(op.service)
                           + _nla(IPVS_CMD_ATTR_DEST, dest_attrs(op.dest, op.settings)))
        case DeleteDest():
            return Request(IPVS_CMD_DEL_DEST, _in_service(op.service)
                           + _nla(IPVS_CMD_ATTR_DEST, dest_key_attrs(op.dest)))
    raise TypeError(f"not an IPVS operation: {op!r}")


def message(family: int, flags: int, seq: int, command: int, attrs: bytes,
            version: int = IPVS_GENL_VERSION) -> bytes:
    """One generic netlink message."""
    return (_NLMSG.pack(_HEADERS + len(attrs), family, flags, seq, 0)
            + _GENL.pack(command, version, 0) + attrs)


# ------------------------------------------------------------------ decoding

Buffer = bytes | bytearray | memoryview


def messages(buf: Buffer, size: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, payload start, payload end) of each message in buf[:size]."""
    offset = 0
    while offset < size:
        if size - offset < _NLMSG.size:
            raise NetlinkDecodeError(f"truncated netlink header ({size - offset} bytes)")
        length, kind, flags, seq, _ = _NLMSG.unpack_from(buf, offset)
        if length < _NLMSG.size or offset + length > size:
            raise NetlinkDecodeError(f"netlink message length {length} does not fit "
                                     f"the {size - offset} bytes received")
        yield kind, flags, seq, offset + _NLMSG.size, offset + length
        offset += (length + 3) & ~3


def attributes(buf: Buffer, start: int, end: int) -> dict[int, tuple[int, int]]:
    """{attribute type: (payload start, payload end)} of the attributes in buf[start:end]."""
    found: dict[int, tuple[int, int]] = {}
    while end - start >= _NLA.size:
        length, kind = _NLA.unpack_from(buf, start)
        if length < _NLA.size or start + length > end:
            raise NetlinkDecodeError(f"attribute {kind & NLA_TYPE_MASK} of length {length} "
                                     f"does not fit the {end - start} bytes left")
        found[kind & NLA_TYPE_MASK] = (start + _NLA.size, start + length)
        start += (length + 3) & ~3
    return found


def _span(attrs: dict[int, tuple[int, int]], kind: int, size: int, what: str) -> int:
    """The start of attribute `kind`, which must hold at least `size` bytes."""
    span = attrs.get(kind)
    if span is None:
        raise NetlinkDecodeError(f"{what}: attribute {kind} missing")
    if span[1] - span[0] < size:
        raise NetlinkDecodeError(f"{what}: attribute {kind} has {span[1] - span[0]} bytes, "
                                 f"needs {size}")
    return span[0]


def _int(buf: Buffer, attrs: dict[int, tuple[int, int]], kind: int, fmt: struct.Struct,
         what: str, default: int | None = None) -> int:
    if default is not None and kind not in attrs:
        return default
    value: int = fmt.unpack_from(buf, _span(attrs, kind, fmt.size, what))[0]
    return value


def _ip(buf: Buffer, start: int, family: int) -> str:
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, bytes(buf[start:start + 4]))
    # ipaddress's compressed form, which is what the desired side uses.
    return ipaddress.IPv6Address(bytes(buf[start:start + 16])).compressed


def _family(af: int, what: str) -> int:
    family = FAMILY_VERSION.get(af)
    if family is None:
        raise NetlinkDecodeError(f"{what}: address family {af} is neither IPv4 nor IPv6")
    return family


def _nested(buf: Buffer, start: int, end: int, kind: int,
            what: str) -> dict[int, tuple[int, int]]:
    """The attributes nested in top-level attribute `kind` of a genl payload."""
    if end - start < _GENL.size:
        raise NetlinkDecodeError(f"{what}: no generic netlink header")
    outer = attributes(buf, start + _GENL.size, end)
    span = outer.get(kind)
    if span is None:
        raise NetlinkDecodeError(f"{what}: attribute {kind} missing")
    return attributes(buf, *span)


def decode_service(buf: Buffer, start: int, end: int) -> tuple[ServiceKey, ServiceSettings]:
    """A service from a GET_SERVICE reply's genl payload buf[start:end]."""
    what = "IPVS service"
    attrs = _nested(buf, start, end, IPVS_CMD_ATTR_SERVICE, what)
    family = _family(_int(buf, attrs, SVC_AF, _U16, what), what)
    fwmark = _int(buf, attrs, SVC_FWMARK, _U32, what, 0)
    if fwmark:
        key = ServiceKey(family, "fwmark", fwmark=fwmark)
    else:
        protocol = _int(buf, attrs, SVC_PROTOCOL, _U16, what)
        address = _ip(buf, _span(attrs, SVC_ADDR, 4 if family == 4 else 16, what), family)
        key = ServiceKey(family, PROTOCOL_NAMES.get(protocol, str(protocol)), address,
                         _int(buf, attrs, SVC_PORT, _BE16, what))
    flags = _FLAGS.unpack_from(buf, _span(attrs, SVC_FLAGS, _FLAGS.size, what))[0]
    name_start, name_end = attrs.get(SVC_SCHED_NAME, (0, 0))
    try:
        scheduler = bytes(buf[name_start:name_end]).split(b"\0", 1)[0].decode("ascii")
    except UnicodeDecodeError as exc:
        raise NetlinkDecodeError(f"{what}: scheduler name is not ASCII") from exc
    persistent = bool(flags & FLAG_PERSISTENT)
    # Timeout and netmask mean nothing without persistence; compare them only with it.
    netmask = ""
    if persistent:
        at = _span(attrs, SVC_NETMASK, 4, what)
        netmask = decode_netmask(family, bytes(buf[at:at + 4]))
    settings = ServiceSettings(
        scheduler=scheduler, persistent=persistent, one_packet=bool(flags & FLAG_ONEPACKET),
        timeout=_int(buf, attrs, SVC_TIMEOUT, _U32, what) if persistent else 0,
        netmask=netmask)
    return key, settings


#: Destination attributes the diff needs: slot in DestDecoder's table, smallest payload.
_DEST_SLOTS = {DEST_ADDR: 0, DEST_PORT: 1, DEST_FWD_METHOD: 2, DEST_WEIGHT: 3,
               DEST_U_THRESH: 4, DEST_L_THRESH: 5, DEST_ADDR_FAMILY: 6}
_DEST_SIZES = (4, 2, 4, 4, 4, 4, 2)
_DEST_REQUIRED = 6  # every slot before this one; the address family may be absent


#: A GET_DEST reply laid out as Linux (3.18 to 6.x) fills it, ip_vs_genl_fill_dest: genl
#: header, the nest, then ADDR PORT FWD_METHOD WEIGHT TUN_TYPE TUN_PORT TUN_FLAGS U_THRESH
#: L_THRESH ACTIVE_CONNS INACT_CONNS PERSIST_CONNS ADDR_FAMILY (statistics follow). Such a
#: reply is decoded with one unpack once its attribute headers are checked; any other
#: layout takes the attribute-by-attribute path.
_KERNEL_DEST = struct.Struct("=BBH HH HH16s HHH2x HHI HHI HHB3x HHH2x HHH2x HHI HHI HHI HHI HHI"
                             " HHH2x".replace(" ", ""))
_KERNEL_DEST_HEADERS = (4, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42)
_KERNEL_DEST_EXPECTED = (
    20, DEST_ADDR, 6, DEST_PORT, 8, DEST_FWD_METHOD, 8, DEST_WEIGHT,
    5, DEST_TUN_TYPE, 6, DEST_TUN_PORT, 6, DEST_TUN_FLAGS, 8, DEST_U_THRESH, 8, DEST_L_THRESH,
    8, 7, 8, 8, 8, 9, 6, DEST_ADDR_FAMILY)
_kernel_dest_headers = itemgetter(*[i for h in _KERNEL_DEST_HEADERS[1:] for i in (h - 1, h)])


class DestDecoder:
    """Destinations of GET_DEST replies (a full read decodes ten thousands): the kernel's own
    layout in one unpack, anything else attribute by attribute. Equal values are shared:
    addresses and settings repeat across services, so most destinations create nothing."""

    def __init__(self) -> None:
        self._keys: dict[tuple[bytes, int], DestKey] = {}
        self._settings: dict[tuple[int, int, int, int], DestSettings] = {}
        #: How many replies needed the attribute-by-attribute path (tests, diagnostics).
        self.slow = 0

    def decode(self, buf: Buffer, start: int, end: int,
               service_family: int) -> tuple[DestKey, DestSettings]:
        """A destination from a GET_DEST reply's genl payload buf[start:end]."""
        if end - start >= _KERNEL_DEST.size:
            v = _KERNEL_DEST.unpack_from(buf, start)
            if (v[4] == IPVS_CMD_ATTR_DEST and v[3] <= end - start - _GENL.size
                    and v[3] >= _KERNEL_DEST.size - _GENL.size
                    and _kernel_dest_headers(v) == _KERNEL_DEST_EXPECTED
                    and v[43] in FAMILY_VERSION):
                family = FAMILY_VERSION[v[43]]
                ident = (v[7][:4] if family == 4 else v[7], socket.ntohs(v[10]))
                key = self._keys.get(ident)
                if key is None:
                    key = self._keys[ident] = DestKey(_ip(ident[0], 0, family), ident[1])
                values = (v[13] & FWD_MASK, v[16], v[28], v[31])
                settings = self._settings.get(values)
                if settings is None:
                    settings = self._settings[values] = DestSettings(*values)
                return key, settings
        self.slow += 1
        return self._decode_attributes(buf, start, end, service_family)

    def _decode_attributes(self, buf: Buffer, start: int, end: int,
                           service_family: int) -> tuple[DestKey, DestSettings]:
        what = "IPVS destination"
        if end - start < _GENL.size:
            raise NetlinkDecodeError(f"{what}: no generic netlink header")
        span = attributes(buf, start + _GENL.size, end).get(IPVS_CMD_ATTR_DEST)
        if span is None:
            raise NetlinkDecodeError(f"{what}: attribute {IPVS_CMD_ATTR_DEST} missing")
        offset, stop = span
        at = [-1] * len(_DEST_SIZES)
        address_size = 0
        slots, unpack = _DEST_SLOTS, _NLA.unpack_from
        while stop - offset >= _NLA.size:
            length, kind = unpack(buf, offset)
            if length < _NLA.size or offset + length > stop:
                raise NetlinkDecodeError(f"{what}: attribute {kind & NLA_TYPE_MASK} of length "
                                         f"{length} does not fit the {stop - offset} bytes left")
            slot = slots.get(kind & NLA_TYPE_MASK)
            if slot is not None:
                if length - _NLA.size < _DEST_SIZES[slot]:
                    raise NetlinkDecodeError(f"{what}: attribute {kind & NLA_TYPE_MASK} has "
                                             f"{length - _NLA.size} bytes, too few")
                at[slot] = offset + _NLA.size
                if slot == 0:
                    address_size = length - _NLA.size
            offset += (length + 3) & ~3
        if min(at[:_DEST_REQUIRED]) < 0:
            missing = [k for k, v in _DEST_SLOTS.items() if v < _DEST_REQUIRED and at[v] < 0]
            raise NetlinkDecodeError(f"{what}: attribute {missing[0]} missing")
        af = _U16.unpack_from(buf, at[6])[0] if at[6] >= 0 else _AF[service_family]
        family = _family(af, what)
        size = 4 if family == 4 else 16
        if address_size < size:
            raise NetlinkDecodeError(f"{what}: {address_size}-byte address for IPv{family}")
        ident = (bytes(buf[at[0]:at[0] + size]), _BE16.unpack_from(buf, at[1])[0])
        key = self._keys.get(ident)
        if key is None:
            key = self._keys[ident] = DestKey(_ip(ident[0], 0, family), ident[1])
        u32 = _U32.unpack_from
        values = (u32(buf, at[2])[0] & FWD_MASK, u32(buf, at[3])[0], u32(buf, at[4])[0],
                  u32(buf, at[5])[0])
        settings = self._settings.get(values)
        if settings is None:
            settings = self._settings[values] = DestSettings(*values)
        return key, settings


def error_code(buf: Buffer, start: int, end: int) -> int:
    """The errno of an NLMSG_ERROR payload (0: an acknowledgement)."""
    if end - start < _I32.size:
        raise NetlinkDecodeError("truncated netlink error message")
    return -_I32.unpack_from(buf, start)[0]


def decode_family_id(buf: Buffer, start: int, end: int) -> int:
    """The family id from a CTRL_CMD_GETFAMILY reply's genl payload."""
    if end - start < _GENL.size:
        raise NetlinkDecodeError("generic netlink controller: no genl header")
    attrs = attributes(buf, start + _GENL.size, end)
    return _int(buf, attrs, CTRL_ATTR_FAMILY_ID, _U16, "generic netlink controller")


# ------------------------------------------------------------------ the socket

#: Called for each reply message of an exchange: (type, flags, seq, start, end) over the
#: receive buffer; returns True when the exchange is complete.
Handler = Callable[[int, int, int, int, int], bool]
#: Sequence numbers run 1..SEQ_MAX, then start again at 1.
SEQ_MAX = 0x7FFFFFFF


class IpvsNetlink:
    """A blocking generic netlink socket talking to the kernel's IPVS. One caller at a time."""

    def __init__(self, timeout: float = TIMEOUT, kernel: socket.socket | None = None) -> None:
        """Open the socket and look the IPVS family up. `kernel`: a connected datagram
        socket that stands in for the kernel (tests)."""
        self._timeout = timeout
        self._seq = 0
        self._buf = bytearray(RECV_BUFFER)
        self._sock = kernel or socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                                             NETLINK_GENERIC)
        try:
            if kernel is None:
                self._configure_netlink()
            # Blocking, bounded by SO_RCVTIMEO: a Python socket timeout would add a poll()
            # before every recv, and a full read makes thousands.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                  struct.pack("=qq", int(timeout), int(timeout % 1 * 1e6)))
            self.family = self._resolve_family()
        except BaseException:
            self._sock.close()
            raise

    def _configure_netlink(self) -> None:
        try:  # beyond net.core.rmem_max: root, as changing IPVS needs anyway
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFERS)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFERS)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFERS)
        # Error replies without a copy of the request: smaller, and we match by sequence.
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self._sock.bind((0, 0))

    def close(self) -> None:
        self._sock.close()

    def _seqs(self, count: int = 1) -> int:
        """Reserve `count` consecutive sequence numbers; the first of them.

        Never across the wrap: an exchange matches its replies by first <= seq <= last.
        """
        if self._seq + count > SEQ_MAX:
            self._seq = 0
        first = self._seq + 1
        self._seq += count
        return first

    def _exchange(self, data: bytes, first: int, last: int, handle: Handler) -> None:
        """Send data (requests first..last) in one sendmsg; feed replies to handle until done.

        Replies to older sequence numbers (an exchange abandoned by an exception) are dropped.
        """
        self._sock.send(data)
        deadline = time.monotonic() + self._timeout
        buf = self._buf
        while True:
            # Bounded twice: SO_RCVTIMEO per recv, the deadline for replies that keep coming
            # without the last one.
            try:
                size = self._sock.recv_into(buf, len(buf), socket.MSG_TRUNC)
            except BlockingIOError:
                size = -1
            if size < 0 or time.monotonic() > deadline:
                raise TimeoutError(f"no complete netlink reply within {self._timeout} s "
                                   f"(the kernel's IPVS does not answer)")
            if size > len(buf):
                raise NetlinkDecodeError(f"netlink reply of {size} bytes does not fit the "
                                         f"{len(buf)}-byte buffer")
            for kind, flags, seq, start, end in messages(buf, size):
                if first <= seq <= last and handle(kind, flags, seq, start, end):
                    return

    def _resolve_family(self) -> int:
        seq = self._seqs()
        found: list[int] = []

        def handle(kind: int, _flags: int, _seq: int, start: int, end: int) -> bool:
            if kind == NLMSG_ERROR:
                code = error_code(self._buf, start, end)
                if code:
                    raise NetlinkError(code, "generic netlink family IPVS")
                return False
            found.append(decode_family_id(self._buf, start, end))
            return True

        self._exchange(message(GENL_ID_CTRL, NLM_F_REQUEST, seq, CTRL_CMD_GETFAMILY,
                               _nla(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME.encode() + b"\0"),
                               version=1), seq, seq, handle)
        return found[0]

    def execute(self, requests: Sequence[Request]) -> list[int]:
        """Send requests in order, batched; the errno of each (0: done).

        Only the last request of a batch asks for an acknowledgement: the kernel handles a
        batch in order and answers a failed request with an error whether asked or not, so
        that acknowledgement closes the batch.
        """
        codes = [0] * len(requests)
        index = 0
        while index < len(requests):
            stop, size = index, 0
            while stop < len(requests) and (size < BATCH_BYTES or stop == index):
                size += _HEADERS + len(requests[stop].attrs)
                stop += 1
            first = self._seqs(stop - index)
            data = b"".join(
                message(self.family, NLM_F_REQUEST | (NLM_F_ACK if n == stop - 1 else 0),
                        first + n - index, requests[n].command, requests[n].attrs)
                for n in range(index, stop))
            base, last = index - first, first + stop - index - 1

            def handle(kind: int, _flags: int, seq: int, start: int, end: int,
                       base: int = base, last: int = last) -> bool:
                if kind != NLMSG_ERROR:
                    return False
                codes[base + seq] = error_code(self._buf, start, end)
                return seq == last

            self._exchange(data, first, last, handle)
            index = stop
        return codes

    def _dump_end(self, kind: int, start: int, end: int, what: str) -> bool:
        """True at the end of a dump; raises if the kernel refused or aborted it."""
        if kind == NLMSG_DONE:
            # NLMSG_DONE carries the dump's own result (0, or a negative errno).
            _raise(error_code(self._buf, start, end), what)
            return True
        if kind == NLMSG_ERROR:
            _raise(error_code(self._buf, start, end) or errno.EPROTO, what)
        return False

    def services(self) -> list[tuple[ServiceKey, ServiceSettings]]:
        """Every IPVS service in the kernel."""
        found: list[tuple[ServiceKey, ServiceSettings]] = []
        seq = self._seqs()

        def handle(kind: int, _flags: int, _seq: int, start: int, end: int) -> bool:
            if self._dump_end(kind, start, end, "IPVS service dump"):
                return True
            found.append(decode_service(self._buf, start, end))
            return False

        self._exchange(message(self.family, NLM_F_REQUEST | NLM_F_DUMP, seq,
                               IPVS_CMD_GET_SERVICE, b""), seq, seq, handle)
        return found

    def service(self, key: ServiceKey
                ) -> tuple[ServiceSettings | None, dict[DestKey, DestSettings]]:
        """One service's settings (None: not in the kernel) and its destinations.

        The lookup and the destination dump go out in one sendmsg: one round trip.
        """
        settings: list[ServiceSettings | None] = []
        dests: dict[DestKey, DestSettings] = {}
        decoder = DestDecoder()
        get = self._seqs(2)
        dump = get + 1
        what = f"IPVS destinations of {key}"

        def handle(kind: int, _flags: int, seq: int, start: int, end: int) -> bool:
            if seq == get:
                if kind == NLMSG_ERROR:
                    code = error_code(self._buf, start, end)
                    if code != errno.ESRCH:
                        _raise(code or errno.EPROTO, f"IPVS get service {key}")
                    settings.append(None)
                else:
                    settings.append(decode_service(self._buf, start, end)[1])
                return False
            if self._dump_end(kind, start, end, what):
                if not settings:
                    raise NetlinkDecodeError(f"no reply to the lookup of {key}")
                return True
            dest, values = decoder.decode(self._buf, start, end, key.family)
            dests[dest] = values
            return False

        attrs = _in_service(key)
        self._exchange(
            message(self.family, NLM_F_REQUEST, get, IPVS_CMD_GET_SERVICE, attrs)
            + message(self.family, NLM_F_REQUEST | NLM_F_DUMP, dump, IPVS_CMD_GET_DEST, attrs),
            get, dump, handle)
        return settings[0], dests

    def dests_of(self, keys: Sequence[ServiceKey], decoder: DestDecoder
                 ) -> dict[ServiceKey, dict[DestKey, DestSettings]]:
        """The destinations of many services ({} for one that does not exist).

        One dump after the other: the kernel runs one dump per socket at a time and ends a
        dump only in the recvmsg after its first reply, so batched dump requests would all
        but the first fail with EBUSY.
        """
        found: dict[ServiceKey, dict[DestKey, DestSettings]] = {}
        for key in keys:
            dests: dict[DestKey, DestSettings] = {}
            seq = self._seqs()
            what = f"IPVS destinations of {key}"

            def handle(kind: int, _flags: int, _seq: int, start: int, end: int,
                       key: ServiceKey = key, dests: dict[DestKey, DestSettings] = dests,
                       what: str = what) -> bool:
                if self._dump_end(kind, start, end, what):
                    return True
                dest, values = decoder.decode(self._buf, start, end, key.family)
                dests[dest] = values
                return False

            self._exchange(message(self.family, NLM_F_REQUEST | NLM_F_DUMP, seq,
                                   IPVS_CMD_GET_DEST, _in_service(key)), seq, seq, handle)
            found[key] = dests
        return found


def _raise(code: int, what: str) -> None:
    if code:
        raise NetlinkError(code, what)
