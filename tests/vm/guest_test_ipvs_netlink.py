"""lbha's IPVS netlink codec against a real kernel: runs INSIDE the qemu guest.

Whatever the codec writes is read back by pyroute2 and by `ipvsadm -Ln`; whatever ipvsadm
writes, the codec must read as pyroute2 does. Errors come back as the errno the kernel gives.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from lbha.plugins import ipvs_netlink as nl
from lbha.plugins.ipvs_table import (
    FLAG_ONEPACKET,
    FLAG_PERSISTENT,
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

pytestmark = pytest.mark.skipif(os.environ.get("IPVS_VM_GUEST") != "1",
                                reason="runs inside the IPVS qemu guest (tests/vm/test_ipvs_vm.py)")

def ipvsadm(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(["ipvsadm", *args], capture_output=True, text=True, timeout=60,
                          check=True, input=stdin).stdout


@pytest.fixture(autouse=True)
def clean_kernel() -> Iterator[None]:
    subprocess.run(["modprobe", "ip_vs"], check=True, timeout=30)
    ipvsadm("-C")
    yield
    ipvsadm("-C")


@pytest.fixture
def sock() -> Iterator[nl.IpvsNetlink]:
    s = nl.IpvsNetlink()
    yield s
    s.close()


def codec_table(sock: nl.IpvsNetlink) -> dict[ServiceKey, tuple[ServiceSettings, dict]]:
    """As the backend reads it: one service dump, destination dumps in batches."""
    services = sock.services()
    decoder = nl.DestDecoder()
    dests = sock.dests_of([key for key, _ in services], decoder)
    assert decoder.slow == 0, "the kernel's replies must take the one-unpack path"
    return {key: (settings, dests[key]) for key, settings in services}


def pyroute2_table() -> dict[ServiceKey, tuple[ServiceSettings, dict]]:
    """The same model, built from pyroute2's own parsing of the kernel's replies."""
    from pyroute2 import IPVS, IPVSService

    ipvs = IPVS()
    try:
        out = {}
        for m in ipvs.service("dump"):
            a: dict[str, Any] = dict(m.get_attr("IPVS_CMD_ATTR_SERVICE")["attrs"])
            family = nl.FAMILY_VERSION[a["IPVS_SVC_ATTR_AF"]]
            if a.get("IPVS_SVC_ATTR_FWMARK"):
                key = ServiceKey(family, "fwmark", fwmark=a["IPVS_SVC_ATTR_FWMARK"])
                lookup = IPVSService(af=a["IPVS_SVC_ATTR_AF"], fwmark=key.fwmark)
            else:
                key = ServiceKey(family, nl.PROTOCOL_NAMES[a["IPVS_SVC_ATTR_PROTOCOL"]],
                                 ipaddress.ip_address(a["IPVS_SVC_ATTR_ADDR"]).compressed,
                                 a["IPVS_SVC_ATTR_PORT"])
                lookup = IPVSService(af=a["IPVS_SVC_ATTR_AF"],
                                     protocol=a["IPVS_SVC_ATTR_PROTOCOL"],
                                     addr=a["IPVS_SVC_ATTR_ADDR"], port=key.port)
            flags = a["IPVS_SVC_ATTR_FLAGS"]["flags"]
            persistent = bool(flags & FLAG_PERSISTENT)
            netmask = ""
            if persistent:
                raw = socket.inet_aton(a["IPVS_SVC_ATTR_NETMASK"])
                netmask = nl.decode_netmask(family, raw)
            settings = ServiceSettings(a["IPVS_SVC_ATTR_SCHED_NAME"], persistent,
                                       bool(flags & FLAG_ONEPACKET),
                                       a["IPVS_SVC_ATTR_TIMEOUT"] if persistent else 0, netmask)
            dests = {}
            for d in ipvs.dest("dump", service=lookup):
                da = dict(d.get_attr("IPVS_CMD_ATTR_DEST")["attrs"])
                dests[DestKey(ipaddress.ip_address(da["IPVS_DEST_ATTR_ADDR"]).compressed,
                              da["IPVS_DEST_ATTR_PORT"])] = DestSettings(
                    da["IPVS_DEST_ATTR_FWD_METHOD"] & nl.FWD_MASK, da["IPVS_DEST_ATTR_WEIGHT"],
                    da["IPVS_DEST_ATTR_U_THRESH"], da["IPVS_DEST_ATTR_L_THRESH"])
            out[key] = (settings, dests)
        return out
    finally:
        ipvs.close()


def ipvsadm_lines(*extra: str) -> list[str]:
    return [" ".join(line.split()) for line in ipvsadm("-Ln", *extra).splitlines()[3:]]


TCP4 = ServiceKey(4, "tcp", "198.18.0.1", 80)
UDP6 = ServiceKey(6, "udp", "2001:db8::1", 53)
FWM4 = ServiceKey(4, "fwmark", fwmark=7)
FWM6 = ServiceKey(6, "fwmark", fwmark=8)
PERSIST4 = ServiceSettings("wrr", True, False, 300, "255.255.255.0")
PERSIST6 = ServiceSettings("sh", True, True, 60, "64")

TABLE = {
    TCP4: (PERSIST4, {DestKey("198.18.1.1", 8080): DestSettings(FWD_MASQ, 3, 100, 10),
                      DestKey("198.18.1.2", 80): DestSettings(FWD_ROUTE, 0),
                      DestKey("198.18.1.3", 80): DestSettings(FWD_TUNNEL, 5, 0, 0)}),
    UDP6: (PERSIST6, {DestKey("2001:db8:1::1", 53): DestSettings(FWD_MASQ, 2, 50, 0)}),
    FWM4: (ServiceSettings("rr", one_packet=True), {
        DestKey("198.18.1.4", 0): DestSettings(FWD_ROUTE, 1, 7, 3)}),
    FWM6: (ServiceSettings("wlc"), {DestKey("2001:db8:1::2", 0): DestSettings(FWD_TUNNEL, 9)}),
}

IPVSADM_VIEW = [
    "TCP 198.18.0.1:80 wrr persistent 300 mask 255.255.255.0",
    "-> 198.18.1.1:8080 Masq 3 0 0",
    "-> 198.18.1.2:80 Route 0 0 0",
    "-> 198.18.1.3:80 Tunnel 5 0 0",
    "UDP [2001:db8::1]:53 sh persistent 60 mask 64 ops",
    "-> [2001:db8:1::1]:53 Masq 2 0 0",
    "FWM 7 rr ops",
    "-> 198.18.1.4:0 Route 1 0 0",
    "FWM 8 IPv6 wlc",
    "-> [2001:db8:1::2]:0 Tunnel 9 0 0",
]


def write_table(sock: nl.IpvsNetlink) -> list[int]:
    ops: list[Any] = []
    for key, (settings, dests) in TABLE.items():
        ops.append(AddService(key, settings))
        ops += [AddDest(key, d, s) for d, s in dests.items()]
    return sock.execute([nl.request(op) for op in ops])


def test_what_the_codec_writes_pyroute2_and_ipvsadm_read_back(sock: nl.IpvsNetlink):
    assert write_table(sock) == [0] * 10
    assert pyroute2_table() == TABLE
    assert sorted(ipvsadm_lines()) == sorted(IPVSADM_VIEW)
    thresholds = ipvsadm_lines("--thresholds")
    assert "-> 198.18.1.1:8080 100 10 0 0" in thresholds
    assert "-> 198.18.1.4:0 7 3 0 0" in thresholds
    assert codec_table(sock) == TABLE
    # A lookup by key gives the same, and a missing service is None, not an error.
    assert sock.service(UDP6) == TABLE[UDP6]
    assert sock.service(ServiceKey(4, "udp", "198.18.0.1", 80)) == (None, {})


def test_what_ipvsadm_writes_the_codec_reads_as_pyroute2_does(sock: nl.IpvsNetlink):
    ipvsadm("-R", stdin="\n".join([
        "-A -t 198.18.0.1:80 -s wrr -p 300 -M 255.255.255.0",
        "-a -t 198.18.0.1:80 -r 198.18.1.1:8080 -m -w 3 -x 100 -y 10",
        "-a -t 198.18.0.1:80 -r 198.18.1.2:80 -g -w 0",
        "-a -t 198.18.0.1:80 -r 198.18.1.3:80 -i -w 5",
        "-A -u [2001:db8::1]:53 -s sh -o -p 60 -M 64",
        "-a -u [2001:db8::1]:53 -r [2001:db8:1::1]:53 -m -w 2 -x 50",
        "-A -f 7 -s rr -o",
        "-a -f 7 -r 198.18.1.4:0 -g -w 1 -x 7 -y 3",
        "-A -f 8 -6 -s wlc",
        "-a -f 8 -6 -r [2001:db8:1::2]:0 -i -w 9",
    ]) + "\n")
    assert sorted(ipvsadm_lines()) == sorted(IPVSADM_VIEW)
    assert codec_table(sock) == pyroute2_table() == TABLE


def test_set_replaces_every_field_and_nothing_is_deleted(sock: nl.IpvsNetlink):
    assert write_table(sock) == [0] * 10
    masq = DestKey("198.18.1.1", 8080)
    codes = sock.execute([nl.request(op) for op in [
        # A weight-only edit that sends the whole spec keeps Masq and the thresholds.
        EditDest(TCP4, masq, DestSettings(FWD_MASQ, 0, 100, 10), TABLE[TCP4][1][masq]),
        EditDest(FWM6, DestKey("2001:db8:1::2", 0), DestSettings(FWD_ROUTE, 4),
                 DestSettings(FWD_TUNNEL, 9)),
        EditService(TCP4, ServiceSettings("lc"), PERSIST4),  # persistence off, in place
        EditService(FWM4, ServiceSettings("rr"), TABLE[FWM4][0]),  # one-packet off
    ]])
    assert codes == [0, 0, 0, 0]
    want = dict(TABLE)
    want[TCP4] = (ServiceSettings("lc"), {**TABLE[TCP4][1], masq: DestSettings(FWD_MASQ, 0,
                                                                                100, 10)})
    want[FWM6] = (TABLE[FWM6][0], {DestKey("2001:db8:1::2", 0): DestSettings(FWD_ROUTE, 4)})
    want[FWM4] = (ServiceSettings("rr"), TABLE[FWM4][1])
    assert pyroute2_table() == want == codec_table(sock)
    assert "TCP 198.18.0.1:80 lc" in ipvsadm_lines()
    assert "-> 198.18.1.1:8080 Masq 0 0 0" in ipvsadm_lines()
    assert "FWM 7 rr" in ipvsadm_lines()


def test_errors_come_back_per_request_and_the_rest_of_the_batch_still_applies(
        sock: nl.IpvsNetlink):
    assert write_table(sock) == [0] * 10
    missing = ServiceKey(4, "tcp", "198.18.9.9", 80)
    new = ServiceKey(4, "tcp", "198.18.0.2", 443)
    codes = sock.execute([nl.request(op) for op in [
        DeleteService(missing),
        AddService(TCP4, PERSIST4),  # exists
        AddService(new, ServiceSettings("nosuchsched")),  # no ip_vs_nosuchsched module
        AddDest(missing, DestKey("198.18.1.1", 80), DestSettings(FWD_ROUTE, 1)),
        DeleteDest(TCP4, DestKey("198.18.1.99", 80)),
        AddDest(TCP4, DestKey("198.18.1.1", 8080), DestSettings(FWD_MASQ, 1)),  # exists
        AddService(new, ServiceSettings("wlc")),
        AddDest(new, DestKey("198.18.1.5", 443), DestSettings(FWD_MASQ, 1)),
        DeleteService(FWM6),
    ]])
    assert codes == [errno.ESRCH, errno.EEXIST, errno.ENOENT, errno.ESRCH, errno.ENOENT,
                     errno.EEXIST, 0, 0, 0]
    assert "TCP 198.18.0.2:443 wlc" in ipvsadm_lines()
    assert "-> 198.18.1.5:443 Masq 1 0 0" in ipvsadm_lines()
    got = pyroute2_table()
    assert FWM6 not in got
    assert got[new] == (ServiceSettings("wlc"), {DestKey("198.18.1.5", 443): DestSettings(
        FWD_MASQ, 1)})
    assert codec_table(sock) == got


def test_multi_part_dumps_of_a_large_table(sock: nl.IpvsNetlink):
    """400 services x 10 destinations, and three with 600 (a dump of several replies):
    everything is read, and equals pyroute2's reading."""
    lines = []
    for i in range(400):
        vip = f"198.18.{i // 250}.{i % 250 + 1}"
        lines.append(f"-A -t {vip}:80 -s wrr")
        lines += [f"-a -t {vip}:80 -r 198.19.0.{j + 1}:80 -m -w {(i + j) % 5}"
                  for j in range(10)]
    for i in (3, 4, 17):
        lines.append(f"-A -u 198.18.3.{i}:53 -s rr")
        lines += [f"-a -u 198.18.3.{i}:53 -r 198.20.{j // 200}.{j % 200 + 1}:53 -g -w 2"
                  for j in range(600)]
    ipvsadm("-R", stdin="\n".join(lines) + "\n")
    mine = codec_table(sock)
    assert len(mine) == 403
    assert sum(len(d) for _, d in mine.values()) == 4000 + 3 * 600
    assert mine == pyroute2_table()
    big = [ServiceKey(4, "udp", f"198.18.3.{i}", 53) for i in (3, 4, 17)]
    for key in big:
        del mine[key]
    # Writes in batches larger than one sendmsg: 4000 weight sets, all acknowledged.
    ops = [EditDest(key, d, DestSettings(FWD_MASQ, 7), s) for key, (_, dests) in mine.items()
           for d, s in dests.items()]
    assert sock.execute([nl.request(op) for op in ops]) == [0] * 4000
    assert {s.weight for key, (_, d) in codec_table(sock).items() if key not in big
            for s in d.values()} == {7}
    assert sum(line.endswith("Masq 7 0 0") for line in ipvsadm_lines()) == 4000


def test_a_malformed_request_is_refused_and_the_socket_keeps_working(sock: nl.IpvsNetlink):
    assert sock.execute([nl.Request(nl.IPVS_CMD_NEW_SERVICE, b"")]) == [errno.EINVAL]
    assert write_table(sock) == [0] * 10
    assert codec_table(sock) == TABLE
