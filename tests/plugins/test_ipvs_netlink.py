"""lbha's IPVS generic netlink codec without a kernel: encoding, decoding, fuzzing, batching.

Requests are checked by decoding them with pyroute2's IPVS message class (an independent
reading of the attribute numbers and types); replies are built the way the 6.1 kernel builds
them (`ipvs_replies`: 16-byte addresses, HASHED flag, statistics) and decoded.
The socket logic (batches, acknowledgements, dumps, stale replies, errors) runs against a fake
kernel on a socket pair.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ipvs_replies import kernel_dest, kernel_service, nla

from lbha.plugins import ipvs_netlink as nl
from lbha.plugins.ipvs_table import (
    FWD_MASQ,
    FWD_ROUTE,
    FWD_TUNNEL,
    AddDest,
    AddService,
    DeleteDest,
    DeleteService,
    DestKey,
    DestSettings,
    EditDest,
    EditService,
    ServiceKey,
    ServiceSettings,
)

FAMILY = 0x23  # the IPVS family id the fake controller hands out


def pyroute2_view(data: bytes) -> dict:
    """A request as pyroute2 decodes it: {"cmd": n, "service": {...}, "dest": {...}}."""
    from pyroute2.netlink.generic.ipvs import ipvsmsg

    msg = ipvsmsg(data)
    msg.decode()
    out: dict = {"cmd": msg["cmd"]}
    for name, part in (("IPVS_CMD_ATTR_SERVICE", "service"), ("IPVS_CMD_ATTR_DEST", "dest")):
        nested = msg.get_attr(name)
        if nested is not None:
            out[part] = {k.split("_ATTR_")[1].lower(): v for k, v in nested["attrs"]}
    return out


def encoded(op: object) -> dict:
    req = nl.request(op)  # type: ignore[arg-type]
    return pyroute2_view(nl.message(FAMILY, nl.NLM_F_REQUEST, 1, req.command, req.attrs))


# ------------------------------------------------------------------ requests


def test_dest_set_sends_every_field_so_nothing_falls_back_to_dr():
    """The kernel's SET replaces a destination: weight-only edits must still say Masq."""
    op = EditDest(ServiceKey(4, "tcp", "198.18.0.1", 80), DestKey("198.18.1.1", 8080),
                  DestSettings(FWD_MASQ, 0), DestSettings(FWD_MASQ, 3))
    view = encoded(op)
    assert view["cmd"] == nl.IPVS_CMD_SET_DEST
    assert view["service"] == {"af": socket.AF_INET, "protocol": socket.IPPROTO_TCP,
                               "addr": "198.18.0.1", "port": 80}
    assert view["dest"] == {"addr": "198.18.1.1", "port": 8080, "addr_family": socket.AF_INET,
                            "fwd_method": FWD_MASQ, "weight": 0, "u_thresh": 0, "l_thresh": 0,
                            "tun_type": 0, "tun_port": 0, "tun_flags": 0}


def test_every_operation_maps_to_its_command_never_to_a_delete_and_re_add():
    key = ServiceKey(6, "fwmark", fwmark=7)
    d = DestKey("2001:db8::5", 0)
    cases = [
        (AddService(key, ServiceSettings("rr")), nl.IPVS_CMD_NEW_SERVICE),
        (EditService(key, ServiceSettings("wlc"), ServiceSettings("rr")),
         nl.IPVS_CMD_SET_SERVICE),
        (DeleteService(key), nl.IPVS_CMD_DEL_SERVICE),
        (AddDest(key, d, DestSettings(FWD_TUNNEL, 7, 100, 10)), nl.IPVS_CMD_NEW_DEST),
        (EditDest(key, d, DestSettings(FWD_ROUTE, 1), DestSettings(FWD_TUNNEL, 7)),
         nl.IPVS_CMD_SET_DEST),
        (DeleteDest(key, d), nl.IPVS_CMD_DEL_DEST),
    ]
    for op, command in cases:
        view = encoded(op)
        assert view["cmd"] == command, op
        assert view["service"]["af"] == socket.AF_INET6
        assert view["service"]["fwmark"] == 7
        assert "addr" not in view["service"]
    assert encoded(cases[3][0])["dest"]["fwd_method"] == FWD_TUNNEL
    assert encoded(cases[5][0])["dest"] == {"addr": "2001:db8::5", "port": 0,
                                            "addr_family": socket.AF_INET6}


def test_service_add_and_set_carry_scheduler_flags_timeout_and_netmask():
    persistent = ServiceSettings("sh", persistent=True, one_packet=True, timeout=300,
                                 netmask="255.255.255.0")
    view = encoded(AddService(ServiceKey(4, "udp", "198.18.0.2", 5060), persistent))["service"]
    assert view == {"af": socket.AF_INET, "protocol": socket.IPPROTO_UDP, "addr": "198.18.0.2",
                    "port": 5060, "sched_name": "sh", "flags": {"flags": 5, "mask": 5},
                    "timeout": 300, "netmask": "255.255.255.0"}
    # Persistence off: the flag is cleared through the mask; host netmask, no timeout.
    view = encoded(EditService(ServiceKey(6, "tcp", "2001:db8::1", 443),
                               ServiceSettings("wlc"), persistent))["service"]
    assert (view["flags"], view["timeout"]) == ({"flags": 0, "mask": 5}, 0)
    assert nl.decode_netmask(6, socket.inet_aton(view["netmask"])) == "128"


def test_ipv6_netmask_is_a_host_order_prefix_length():
    for prefix in ("1", "64", "128"):
        assert nl.encode_netmask(6, prefix) == struct.pack("=I", int(prefix))
        assert nl.decode_netmask(6, nl.encode_netmask(6, prefix)) == prefix
    assert nl.encode_netmask(4, "255.255.255.0") == b"\xff\xff\xff\x00"


# ------------------------------------------------------------------ replies, as the kernel sends


addresses4 = st.ip_addresses(v=4).map(str)
addresses6 = st.ip_addresses(v=6).map(lambda a: a.compressed)
ports = st.integers(0, 65535)


@st.composite
def services(draw: st.DrawFn) -> tuple[ServiceKey, ServiceSettings]:
    family = draw(st.sampled_from([4, 6]))
    kind = draw(st.sampled_from(["tcp", "udp", "fwmark"]))
    if kind == "fwmark":
        key = ServiceKey(family, "fwmark", fwmark=draw(st.integers(1, 2**32 - 1)))
    else:
        key = ServiceKey(family, kind, draw(addresses4 if family == 4 else addresses6),
                         draw(ports))
    persistent = draw(st.booleans())
    netmask = ""
    if persistent:
        prefix = draw(st.integers(1, 128 if family == 6 else 32))
        netmask = str(prefix) if family == 6 else socket.inet_ntoa(
            struct.pack("!I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))
    return key, ServiceSettings(
        draw(st.sampled_from(["rr", "wrr", "lc", "wlc", "sh", "dh", "mh", "lblcr"])),
        persistent, draw(st.booleans()), draw(st.integers(1, 2**31)) if persistent else 0,
        netmask)


dests = st.tuples(
    st.builds(DestKey, st.one_of(addresses4, addresses6), ports),
    st.builds(DestSettings, st.sampled_from([FWD_MASQ, FWD_TUNNEL, FWD_ROUTE]),
              st.integers(0, 65535), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)))


@settings(max_examples=300, deadline=None)
@given(services())
def test_service_round_trip(service: tuple[ServiceKey, ServiceSettings]):
    key, want = service
    payload = kernel_service(key, want)
    assert nl.decode_service(payload, 0, len(payload)) == (key, want)
    # What we send for an add is itself a well-formed reply of the same service.
    req = nl.request(AddService(key, want))
    sent = struct.pack("=BBH", req.command, 1, 0) + req.attrs
    assert nl.decode_service(sent, 0, len(sent)) == (key, want)


@settings(max_examples=300, deadline=None)
@given(dests, st.sampled_from([4, 6]), st.sampled_from([0, 0x100, 0x80]),
       st.permutations(range(15)))
def test_dest_round_trip(dest: tuple[DestKey, DestSettings], family: int, conn_flags: int,
                         order: list[int]):
    """The kernel's layout takes the one-unpack path, any other order gives the same; the
    connection flags above the forwarding bits (e.g. IP_VS_CONN_F_NOOUTPUT) are ignored."""
    key, want = dest
    decoder = nl.DestDecoder()
    payload = kernel_dest(key, want, conn_flags)
    assert decoder.decode(payload, 0, len(payload), family) == (key, want)
    assert decoder.slow == 0
    payload = kernel_dest(key, want, conn_flags, order)
    assert nl.DestDecoder().decode(payload, 0, len(payload), family) == (key, want)
    req = nl.request(AddDest(ServiceKey(family, "fwmark", fwmark=1), key, want))
    sent = struct.pack("=BBH", req.command, 1, 0) + req.attrs
    assert nl.DestDecoder().decode(sent, 0, len(sent), family) == (key, want)


def test_equal_destinations_share_their_values():
    decoder = nl.DestDecoder()
    payload = kernel_dest(DestKey("2001:db8:0:0:1::1", 80), DestSettings(FWD_ROUTE, 1))
    first = decoder.decode(payload, 0, len(payload), 6)
    second = decoder.decode(payload, 0, len(payload), 6)
    assert first[0] is second[0]
    assert first[1] is second[1]
    assert first[0].address == "2001:db8::1:0:0:1"  # the form ipaddress gives the desired side


def test_replies_missing_what_the_diff_needs_are_refused():
    key, s = ServiceKey(4, "tcp", "198.18.0.1", 80), ServiceSettings("wlc")
    good = kernel_service(key, s)
    without_port = kernel_service(key, s, port=False)
    with pytest.raises(nl.NetlinkDecodeError, match="attribute 4 missing"):
        nl.decode_service(without_port, 0, len(without_port))
    other_family = kernel_service(key, s, af=7)
    with pytest.raises(nl.NetlinkDecodeError, match="neither IPv4 nor IPv6"):
        nl.decode_service(other_family, 0, len(other_family))
    with pytest.raises(nl.NetlinkDecodeError, match="does not fit"):
        nl.decode_service(good, 0, len(good) - 3)


DECODERS: list[Callable[[bytes], object]] = [
    lambda b: nl.decode_service(b, 0, len(b)),
    lambda b: nl.DestDecoder().decode(b, 0, len(b), 4),
    lambda b: nl.DestDecoder().decode(b, 0, len(b), 6),
    lambda b: nl.decode_family_id(b, 0, len(b)),
    lambda b: nl.error_code(b, 0, len(b)),
    lambda b: list(nl.messages(b, len(b))),
]
VALID = [kernel_service(ServiceKey(6, "tcp", "2001:db8::1", 443),
                        ServiceSettings("wlc", True, False, 60, "64")),
         kernel_service(ServiceKey(4, "fwmark", fwmark=3), ServiceSettings("rr")),
         kernel_dest(DestKey("198.18.1.1", 80), DestSettings(FWD_MASQ, 3, 10, 2))]


@settings(max_examples=1500, deadline=None)
@given(st.one_of(
    st.binary(max_size=400),
    # Valid replies, cut and with bytes overwritten: deep paths, not only the first check.
    st.tuples(st.sampled_from(VALID), st.integers(0, 400),
              st.lists(st.tuples(st.integers(0, 399), st.integers(0, 255)), max_size=6)).map(
        lambda t: bytes(_mutate(t[0], t[1], t[2])))),
    st.sampled_from(DECODERS))
def test_decoders_raise_only_netlink_decode_error(data: bytes,
                                                  decode: Callable[[bytes], object]):
    with contextlib.suppress(nl.NetlinkDecodeError):
        decode(data)


def _mutate(data: bytes, cut: int, writes: list[tuple[int, int]]) -> bytearray:
    out = bytearray(data[:cut] if cut < len(data) else data)
    for at, value in writes:
        if out:
            out[at % len(out)] = value
    return out


# ------------------------------------------------------------------ the socket, fake kernel


class FakeKernel:
    """The kernel end of a datagram socket pair: answers like generic netlink does.

    Requests are handled in order; a failed one gets an NLMSG_ERROR whether it asked for an
    acknowledgement or not; a dump answers with its messages and NLMSG_DONE; `before` lets a
    test slip stale replies in front.
    """

    def __init__(self, fail: Callable[[int, int], int] | None = None,
                 dump: Callable[[int, bytes], list[bytes]] | None = None) -> None:
        self.user, self.end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.fail = fail or (lambda _cmd, _n: 0)
        self.dump = dump or (lambda _cmd, _attrs: [])
        self.before: list[bytes] = []
        self.silent = False
        self.requests: list[tuple[int, int, int]] = []  # (command, flags, seq)
        self.sendmsgs = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _reply(self, kind: int, flags: int, seq: int, payload: bytes) -> None:
        self.end.send(struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload)

    def _serve(self) -> None:
        while True:
            try:
                data = self.end.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            self.sendmsgs += 1
            if self.silent:
                continue
            for msg in self.before:
                self.end.send(msg)
            self.before = []
            for kind, flags, seq, start, end in nl.messages(data, len(data)):
                command = data[start]
                attrs = data[start + 4:end]
                if kind == nl.GENL_ID_CTRL:
                    self._reply(kind, 0, seq, struct.pack("=BBH", 1, 2, 0) + nla(
                        nl.CTRL_ATTR_FAMILY_ID, struct.pack("=H", FAMILY)))
                    continue
                self.requests.append((command, flags, seq))
                if flags & nl.NLM_F_DUMP == nl.NLM_F_DUMP:
                    for part in self.dump(command, attrs):
                        self._reply(FAMILY, 2, seq, part)
                    self._reply(nl.NLMSG_DONE, 2, seq, struct.pack("=i", 0))
                    continue
                code = self.fail(command, len(self.requests) - 1)
                if code or flags & nl.NLM_F_ACK:
                    self._reply(nl.NLMSG_ERROR, 0, seq, struct.pack("=i", -code) + data[
                        start - 16:start])

    def socket(self, timeout: float = 2.0) -> nl.IpvsNetlink:
        return nl.IpvsNetlink(timeout, kernel=self.user)

    def close(self) -> None:
        self.user.close()
        self.end.close()
        self._thread.join(2)


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeKernel]]:
    made: list[FakeKernel] = []

    def make(**kw: object) -> FakeKernel:
        made.append(FakeKernel(**kw))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for kernel in made:
        kernel.close()


def test_family_is_resolved_through_the_controller(fake):
    assert fake().socket().family == FAMILY


def test_a_batch_asks_one_ack_and_maps_each_error_to_its_request(fake):
    kernel = fake(fail=lambda _cmd, n: errno.ESRCH if n in (1, 3) else 0)
    sock = kernel.socket()
    ops = [nl.request(DeleteService(ServiceKey(4, "tcp", f"198.18.0.{i}", 80)))
           for i in range(5)]
    assert sock.execute(ops) == [0, errno.ESRCH, 0, errno.ESRCH, 0]
    assert kernel.sendmsgs == 2  # the family lookup, then one batch
    assert [bool(flags & nl.NLM_F_ACK) for _, flags, _ in kernel.requests] == [
        False, False, False, False, True]


def test_large_batches_are_split_and_every_part_is_acknowledged(fake):
    kernel = fake(fail=lambda _cmd, n: errno.EEXIST if n == 1500 else 0)
    sock = kernel.socket()
    ops = [nl.request(AddDest(ServiceKey(4, "tcp", "198.18.0.1", 80),
                              DestKey("198.18.1.1", port), DestSettings(FWD_ROUTE, 1)))
           for port in range(2000)]
    codes = sock.execute(ops)
    assert codes[1500] == errno.EEXIST
    assert codes.count(0) == 1999
    batches = kernel.sendmsgs - 1
    assert batches >= 2
    assert sum(bool(flags & nl.NLM_F_ACK) for _, flags, _ in kernel.requests) == batches


def test_sequence_numbers_never_wrap_inside_an_exchange(fake):
    # Replies are matched by first <= seq <= last: a batch or a lookup + dump pair that
    # straddled the wrap would match nothing and time out.
    kernel = fake(fail=lambda _cmd, n: errno.ESRCH if n == 2 else 0)
    sock = kernel.socket()
    key = ServiceKey(4, "tcp", "198.18.0.1", 80)
    sock._seq = nl.SEQ_MAX - 2
    ops = [nl.request(DeleteService(ServiceKey(4, "tcp", f"198.18.0.{i}", 80)))
           for i in range(5)]
    assert sock.execute(ops) == [0, 0, errno.ESRCH, 0, 0]
    assert [seq for _, _, seq in kernel.requests] == [1, 2, 3, 4, 5]
    sock._seq = nl.SEQ_MAX - 1
    kernel.fail = lambda _cmd, _n: errno.ESRCH
    assert sock.service(key) == (None, {})
    assert [seq for _, _, seq in kernel.requests[-2:]] == [1, 2]


def test_dumps_and_the_service_lookup_share_one_round_trip(fake):
    key = ServiceKey(4, "tcp", "198.18.0.1", 80)
    want = {DestKey(f"198.18.1.{i}", 80): DestSettings(FWD_MASQ, i) for i in range(1, 4)}

    def dump(command: int, _attrs: bytes) -> list[bytes]:
        if command == nl.IPVS_CMD_GET_SERVICE:
            return [kernel_service(key, ServiceSettings("wrr"))]
        return [kernel_dest(d, s) for d, s in want.items()]

    kernel = fake(dump=dump)
    sock = kernel.socket()
    assert sock.services() == [(key, ServiceSettings("wrr"))]
    assert sock.dests_of([key], nl.DestDecoder()) == {key: want}
    sendmsgs = kernel.sendmsgs
    # The lookup is not a dump: the fake answers it with an error, so "no such service".
    kernel.fail = lambda _cmd, _n: errno.ESRCH
    assert sock.service(key) == (None, want)
    assert kernel.sendmsgs == sendmsgs + 1


def test_stale_replies_from_an_abandoned_exchange_are_skipped(fake):
    kernel = fake(fail=lambda _cmd, _n: 0)
    sock = kernel.socket()
    # Replies to sequence numbers before this exchange (an earlier one that raised).
    kernel.before = [struct.pack("=IHHII", 20, nl.NLMSG_ERROR, 0, sock._seq, 0) +
                     struct.pack("=i", -errno.EIO),
                     struct.pack("=IHHII", 20, nl.NLMSG_DONE, 2, sock._seq, 0) + b"\0" * 4]
    assert sock.execute([nl.request(DeleteService(ServiceKey(4, "fwmark", fwmark=1)))]) == [0]


def test_a_refused_dump_raises_a_typed_error(fake):
    kernel = fake()
    sock = kernel.socket()
    kernel.dump = lambda _cmd, _attrs: [b"\0\0"]  # shorter than a genl header
    with pytest.raises(nl.NetlinkDecodeError, match="no generic netlink header"):
        sock.services()


def test_a_silent_kernel_times_out(fake):
    kernel = fake()
    sock = kernel.socket(timeout=0.2)
    kernel.silent = True
    with pytest.raises(TimeoutError, match="no complete netlink reply"):
        sock.dests_of([ServiceKey(4, "fwmark", fwmark=1)], nl.DestDecoder())
