"""The IPVS plugin against a real kernel: runs INSIDE the qemu guest (tests/vm/ipvs_vm.py).

The host's test_ipvs_vm.py boots one VM and runs this module there with pytest. Every
behaviour is read back twice, independently of the plugin's own reader: raw pyroute2
attributes and `ipvsadm -Ln` (with --thresholds / --persistent-conn where they show more).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from lbha.desired import DesiredDestination, DesiredService, DesiredTable
from lbha.hookspecs import DaemonContext
from lbha.model import IPVS_SCHEDULERS, Forwarding, IpvsConfig
from lbha.plugins import ipvs as plugin
from lbha.plugins import ipvs_netlink as netlink
from lbha.plugins.ipvs import IpvsBackend
from lbha.plugins.ipvs_table import FLAG_ONEPACKET, FLAG_PERSISTENT, FWD_MASQ, FWD_ROUTE, FWD_TUNNEL

pytestmark = pytest.mark.skipif(os.environ.get("IPVS_VM_GUEST") != "1",
                                reason="runs inside the IPVS qemu guest (tests/vm/test_ipvs_vm.py)")

#: Schedulers the Debian 6.1 kernel ships as modules ("twos" is not built there).
KERNEL_SCHEDULERS = sorted(IPVS_SCHEDULERS - {"twos"})


# ------------------------------------------------------------------ desired tables


def dest(addr: str, port: int = 80, weight: int = 1, fwd: Forwarding = Forwarding.NAT,
         state: str = "up", lo: int = 0, hi: int = 0) -> DesiredDestination:
    return DesiredDestination(name=addr, address=ipaddress.ip_address(addr), port=port,
                              weight=weight, forwarding=fwd, min_connections=lo,
                              max_connections=hi, state=state)


def svc(addr: str | None, port: int, protocol: str, *dests: DesiredDestination,
        scheduler: str = "wlc", persistence: float | None = None, netmask: str | None = None,
        mark: int | None = None, ops: bool = False, virtual: str = "v") -> DesiredService:
    return DesiredService(
        virtual=virtual, layer=4, protocol=protocol,
        address=ipaddress.ip_address(addr) if addr else None, port=port, mark=mark,
        scheduler=scheduler, persistence=persistence, persistence_netmask=netmask,
        one_packet=ops, haproxy_backend=None, haproxy_socket=None, destinations=dests,
        family=_family_of(addr, dests))


def _family_of(addr: str | None, dests: tuple[DesiredDestination, ...]) -> int:
    """As the engine sets it: the VIP's family, else the real servers' (fwmark)."""
    if addr:
        return ipaddress.ip_address(addr).version
    return dests[0].address.version if dests else 4


_generation = 0


def desired(*services: DesiredService) -> DesiredTable:
    global _generation
    _generation += 1
    return DesiredTable(_generation, services)


# ------------------------------------------------------------------ read back, twice


def ipvsadm(*args: str) -> str:
    out = subprocess.run(["ipvsadm", *args], capture_output=True, text=True, timeout=30,
                         check=True)
    return out.stdout


def ipvsadm_table(*extra: str) -> dict[str, dict[str, Any]]:
    """`ipvsadm -Ln [extra]` as {"TCP 198.18.0.1:80 wlc ...": {"-> addr:port": [columns]}}."""
    table: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in ipvsadm("-Ln", *extra).splitlines():
        if re.match(r"^(TCP|UDP|FWM)\s", line):
            current = table.setdefault(" ".join(line.split()), {})
        elif line.strip().startswith("->") and current is not None and \
                not line.strip().startswith("-> RemoteAddress"):
            fields = line.split()
            current[fields[1]] = fields[2:]
    return table


def pyroute2_table() -> dict[tuple[Any, ...], tuple[dict[str, Any], dict[tuple[str, int], Any]]]:
    """Raw pyroute2 dump: {(af, proto, addr, port, fwmark): (attrs, {(addr, port): attrs})}."""
    from pyroute2 import IPVS, IPVSService

    sock = IPVS()
    try:
        out = {}
        for m in sock.service("dump"):
            attrs = dict(m.get_attr("IPVS_CMD_ATTR_SERVICE")["attrs"])
            key = (attrs["IPVS_SVC_ATTR_AF"], attrs.get("IPVS_SVC_ATTR_PROTOCOL"),
                   attrs.get("IPVS_SVC_ATTR_ADDR"), attrs.get("IPVS_SVC_ATTR_PORT"),
                   attrs.get("IPVS_SVC_ATTR_FWMARK"))
            lookup = IPVSService(af=key[0], fwmark=key[4]) if key[4] else IPVSService(
                af=key[0], protocol=key[1], addr=key[2], port=key[3])
            dests = {}
            for d in sock.dest("dump", service=lookup):
                da = dict(d.get_attr("IPVS_CMD_ATTR_DEST")["attrs"])
                dests[(da["IPVS_DEST_ATTR_ADDR"], da["IPVS_DEST_ATTR_PORT"])] = da
            out[key] = (attrs, dests)
        return out
    finally:
        sock.close()


def dest_view(da: dict[str, Any]) -> tuple[int, int, int, int]:
    """(fwd_method, weight, upper, lower) of a raw pyroute2 destination."""
    return (da["IPVS_DEST_ATTR_FWD_METHOD"], da["IPVS_DEST_ATTR_WEIGHT"],
            da["IPVS_DEST_ATTR_U_THRESH"], da["IPVS_DEST_ATTR_L_THRESH"])


TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
V4, V6 = socket.AF_INET, socket.AF_INET6


# ------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def clean_kernel() -> Iterator[None]:
    subprocess.run(["modprobe", "ip_vs"], check=True, timeout=30)
    ipvsadm("-C")
    yield
    ipvsadm("-C")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
async def backend(state_dir: Path):
    b = IpvsBackend(IpvsConfig(cleanstop=True, reconcile_interval=3600), state_dir)
    yield b
    b.close()


async def reconcile(b: IpvsBackend, table: DesiredTable,
                    full: bool = True) -> plugin.ReconcileResult:
    b.apply(table)
    result = await b.reconcile(full=full)
    assert result.failures == []
    return result


# ------------------------------------------------------------------ tests (item 1)


async def test_tcp_udp_fwmark_ops_ipv4_ipv6(backend: IpvsBackend):
    await reconcile(backend, desired(
        svc("198.18.0.1", 53, "tcp", dest("198.18.1.1", 53, 2)),
        svc("198.18.0.1", 53, "udp", dest("198.18.1.1", 53, 2)),  # tcp+udp: two services
        svc(None, 0, "fwmark", dest("198.18.1.2", 0, 1, Forwarding.DR), mark=7, scheduler="rr"),
        svc(None, 0, "fwmark", dest("2001:db8:1::2", 0, 1, Forwarding.DR), mark=8),
        svc("198.18.0.2", 5060, "udp", dest("198.18.1.3", 5060, 1), ops=True, scheduler="sh"),
        svc("2001:db8::1", 443, "tcp", dest("2001:db8:1::1", 8443, 4)),
    ))
    t = ipvsadm_table()
    assert t == {
        "TCP 198.18.0.1:53 wlc": {"198.18.1.1:53": ["Masq", "2", "0", "0"]},
        "UDP 198.18.0.1:53 wlc": {"198.18.1.1:53": ["Masq", "2", "0", "0"]},
        "FWM 7 rr": {"198.18.1.2:0": ["Route", "1", "0", "0"]},
        "FWM 8 IPv6 wlc": {"[2001:db8:1::2]:0": ["Route", "1", "0", "0"]},
        "UDP 198.18.0.2:5060 sh ops": {"198.18.1.3:5060": ["Masq", "1", "0", "0"]},
        "TCP [2001:db8::1]:443 wlc": {"[2001:db8:1::1]:8443": ["Masq", "4", "0", "0"]},
    }
    p = pyroute2_table()
    assert set(p) == {(V4, TCP, "198.18.0.1", 53, None), (V4, UDP, "198.18.0.1", 53, None),
                      (V4, None, None, None, 7), (V6, None, None, None, 8),
                      (V4, UDP, "198.18.0.2", 5060, None), (V6, TCP, "2001:db8::1", 443, None)}
    attrs, dests = p[(V4, UDP, "198.18.0.2", 5060, None)]
    assert attrs["IPVS_SVC_ATTR_FLAGS"]["flags"] & FLAG_ONEPACKET
    assert dest_view(dests[("198.18.1.3", 5060)]) == (FWD_MASQ, 1, 0, 0)
    assert dest_view(p[(V6, None, None, None, 8)][1][("2001:db8:1::2", 0)]) == (FWD_ROUTE, 1, 0, 0)
    # Nothing left to do: a second full pass reads the same table and changes nothing.
    assert (await backend.reconcile(full=True)).operations == []


async def test_every_scheduler_the_kernel_has(backend: IpvsBackend):
    services = [svc("198.18.0.10", 1000 + i, "tcp", dest("198.18.1.1", 80, 1), scheduler=s)
                for i, s in enumerate(sorted(IPVS_SCHEDULERS))]
    backend.apply(desired(*services))
    result = await backend.reconcile()
    # "twos" is not built in Debian's 6.1 kernel: a clear error, the others still land.
    failed: dict[str, str] = {}
    for op, reason in result.failures:  # the service's own failure, then its skipped dests
        failed.setdefault(str(op.service), reason)
    twos_port = 1000 + sorted(IPVS_SCHEDULERS).index("twos")
    assert failed[f"TCP 198.18.0.10:{twos_port}"].startswith("scheduler 'twos' is not available")
    assert len(failed) == 1
    got = {line.split()[1]: line.split()[2] for line in ipvsadm_table()}
    want = {f"198.18.0.10:{1000 + i}": s for i, s in enumerate(sorted(IPVS_SCHEDULERS))
            if s != "twos"}
    assert got == want
    assert sorted(a["IPVS_SVC_ATTR_SCHED_NAME"] for a, _ in pyroute2_table().values()) == \
        KERNEL_SCHEDULERS


async def test_persistence_timeout_and_netmask(backend: IpvsBackend):
    await reconcile(backend, desired(
        svc("198.18.0.3", 443, "tcp", dest("198.18.1.1", 443, 1, Forwarding.DR),
            persistence=300, netmask="255.255.255.0"),
        svc("2001:db8::3", 443, "tcp", dest("2001:db8:1::1", 443, 1, Forwarding.DR),
            persistence=120.5, netmask="64"),
        svc("198.18.0.4", 0, "tcp", dest("198.18.1.1", 0, 1, Forwarding.DR), persistence=60),
    ))
    assert set(ipvsadm_table()) == {
        "TCP 198.18.0.3:443 wlc persistent 300 mask 255.255.255.0",
        "TCP [2001:db8::3]:443 wlc persistent 121 mask 64",
        "TCP 198.18.0.4:0 wlc persistent 60",
    }
    assert set(ipvsadm_table("--persistent-conn")) == set(ipvsadm_table())
    p = pyroute2_table()
    a4 = p[(V4, TCP, "198.18.0.3", 443, None)][0]
    assert (a4["IPVS_SVC_ATTR_TIMEOUT"], a4["IPVS_SVC_ATTR_NETMASK"]) == (300, "255.255.255.0")
    assert a4["IPVS_SVC_ATTR_FLAGS"]["flags"] & FLAG_PERSISTENT
    assert p[(V6, TCP, "2001:db8::3", 443, None)][0]["IPVS_SVC_ATTR_TIMEOUT"] == 121
    # Persistence off again: edited in place, the destination stays.
    await reconcile(backend, desired(
        svc("198.18.0.3", 443, "tcp", dest("198.18.1.1", 443, 1, Forwarding.DR))))
    assert ipvsadm_table() == {"TCP 198.18.0.3:443 wlc": {"198.18.1.1:443": [
        "Route", "1", "0", "0"]}}


async def test_forwarding_weights_and_thresholds(backend: IpvsBackend):
    await reconcile(backend, desired(svc(
        "198.18.0.5", 80, "tcp",
        dest("198.18.1.1", 80, 5, Forwarding.DR, lo=10, hi=100),
        dest("198.18.1.2", 8080, 3, Forwarding.NAT, hi=50),
        dest("198.18.1.3", 80, 1, Forwarding.TUN, lo=1, hi=2),
        scheduler="wrr")))
    assert ipvsadm_table() == {"TCP 198.18.0.5:80 wrr": {
        "198.18.1.1:80": ["Route", "5", "0", "0"],
        "198.18.1.2:8080": ["Masq", "3", "0", "0"],
        "198.18.1.3:80": ["Tunnel", "1", "0", "0"]}}
    assert ipvsadm_table("--thresholds") == {"TCP 198.18.0.5:80 wrr": {
        "198.18.1.1:80": ["100", "10", "0", "0"],
        "198.18.1.2:8080": ["50", "0", "0", "0"],
        "198.18.1.3:80": ["2", "1", "0", "0"]}}
    dests = pyroute2_table()[(V4, TCP, "198.18.0.5", 80, None)][1]
    assert {k: dest_view(v) for k, v in dests.items()} == {
        ("198.18.1.1", 80): (FWD_ROUTE, 5, 100, 10), ("198.18.1.2", 8080): (FWD_MASQ, 3, 50, 0),
        ("198.18.1.3", 80): (FWD_TUNNEL, 1, 2, 1)}


async def test_quiescent_drain_halt_and_the_pyroute2_pitfalls(backend: IpvsBackend):
    """Weight-only changes keep Masq (pitfall 1); a forwarding change keeps the other
    destinations; no change is ever made by deleting and re-adding (pitfall 2)."""
    commands: list[int] = []
    sock = backend.kernel._socket()
    real_execute = sock.execute

    def recording_execute(requests: list[netlink.Request]) -> list[int]:
        commands.extend(r.command for r in requests)
        return real_execute(requests)

    sock.execute = recording_execute  # type: ignore[method-assign]
    reals = [dest("198.18.1.1", 8080, 3), dest("198.18.1.2", 8080, 2), dest("198.18.1.3", 8080, 4)]
    web = svc("198.18.0.6", 80, "tcp", *reals)
    await reconcile(backend, desired(web))
    # .1 fails with quiescent = weight 0 and state "quiesced"; .2 drained; .3 halted.
    result = await reconcile(backend, desired(svc(
        "198.18.0.6", 80, "tcp", dest("198.18.1.1", 8080, 0, state="quiesced"),
        dest("198.18.1.2", 8080, 0, state="drain"))), full=False)
    assert len(result.operations) == 3
    assert ipvsadm_table() == {"TCP 198.18.0.6:80 wlc": {
        "198.18.1.1:8080": ["Masq", "0", "0", "0"], "198.18.1.2:8080": ["Masq", "0", "0", "0"]}}
    dests = pyroute2_table()[(V4, TCP, "198.18.0.6", 80, None)][1]
    assert {dest_view(d)[:2] for d in dests.values()} == {(FWD_MASQ, 0)}
    # Back up, and .2 switches to tunnel forwarding: only that destination is edited.
    await reconcile(backend, desired(svc(
        "198.18.0.6", 80, "tcp", dest("198.18.1.1", 8080, 3),
        dest("198.18.1.2", 8080, 2, Forwarding.TUN))), full=False)
    assert ipvsadm_table() == {"TCP 198.18.0.6:80 wlc": {
        "198.18.1.1:8080": ["Masq", "3", "0", "0"], "198.18.1.2:8080": ["Tunnel", "2", "0", "0"]}}
    # Four weight or forwarding edits, all sets; the halted .3 is the only delete; nothing
    # is re-added.
    assert commands.count(netlink.IPVS_CMD_SET_DEST) == 4
    assert commands.count(netlink.IPVS_CMD_DEL_DEST) == 1
    assert netlink.IPVS_CMD_DEL_SERVICE not in commands
    assert commands.count(netlink.IPVS_CMD_NEW_DEST) == 3  # the first table only


async def test_foreign_services_are_never_touched(backend: IpvsBackend):
    ipvsadm("-A", "-t", "203.0.113.1:80", "-s", "rr")
    ipvsadm("-a", "-t", "203.0.113.1:80", "-r", "203.0.113.2:80", "-m", "-w", "7")
    ipvsadm("-A", "-f", "99", "-s", "sh")
    foreign = {k: v for k, v in ipvsadm_table().items()}
    await reconcile(backend, desired(svc("198.18.0.7", 80, "tcp", dest("198.18.1.1", 80))))
    await reconcile(backend, desired())  # our config is gone: only our service goes
    assert ipvsadm_table() == foreign
    assert len(pyroute2_table()) == 2


async def test_manual_change_is_repaired_and_logged(backend: IpvsBackend, caplog):
    await reconcile(backend, desired(svc(
        "198.18.0.8", 80, "tcp", dest("198.18.1.1", 80, 3, Forwarding.DR),
        dest("198.18.1.2", 80, 2, Forwarding.DR), scheduler="wrr")))
    want = ipvsadm_table()
    ipvsadm("-E", "-t", "198.18.0.8:80", "-s", "rr", "-p", "30")
    ipvsadm("-e", "-t", "198.18.0.8:80", "-r", "198.18.1.1:80", "-i", "-w", "9")
    ipvsadm("-d", "-t", "198.18.0.8:80", "-r", "198.18.1.2:80")
    ipvsadm("-a", "-t", "198.18.0.8:80", "-r", "198.18.1.9:80", "-g")
    assert ipvsadm_table() != want
    with caplog.at_level(logging.WARNING, logger="lbha.ipvs"):
        result = await backend.reconcile(full=True)  # the periodic pass
    assert ipvsadm_table() == want
    assert len(result.drift) == len(result.operations) == 4
    repaired = [r.getMessage() for r in caplog.records if "changed outside lbha" in r.getMessage()]
    assert len(repaired) == 4
    assert any("198.18.1.9:80" in m for m in repaired)
    dests = pyroute2_table()[(V4, TCP, "198.18.0.8", 80, None)][1]
    assert {k: dest_view(v) for k, v in dests.items()} == {
        ("198.18.1.1", 80): (FWD_ROUTE, 3, 0, 0), ("198.18.1.2", 80): (FWD_ROUTE, 2, 0, 0)}


async def test_deleted_service_is_removed_after_a_restart(state_dir: Path):
    ipvsadm("-A", "-u", "203.0.113.1:53")
    first = IpvsBackend(IpvsConfig(cleanstop=False), state_dir)
    await reconcile(first, desired(svc("198.18.0.9", 80, "tcp", dest("198.18.1.1", 80)),
                                   svc("198.18.0.9", 443, "tcp", dest("198.18.1.1", 443))))
    first.close()
    # A new healthd (cleanstop = false left both in the kernel) whose config lost port 443.
    second = IpvsBackend(IpvsConfig(cleanstop=False), state_dir)
    try:
        result = await reconcile(second, desired(
            svc("198.18.0.9", 80, "tcp", dest("198.18.1.1", 80))))
    finally:
        second.close()
    assert [str(op) for op in result.operations] == ["delete service TCP 198.18.0.9:443"]
    assert set(ipvsadm_table()) == {"TCP 198.18.0.9:80 wlc", "UDP 203.0.113.1:53 wlc"}
    assert {k[3] for k in pyroute2_table()} == {80, 53}


@pytest.mark.parametrize("cleanstop", [True, False])
async def test_service_hooks_propagate_changes_and_cleanstop(state_dir: Path, cleanstop: bool):
    """The hooks as healthd calls them: configure, start (healthd only), apply; stop."""
    from lbha.model import Config, Paths

    ipvsadm("-A", "-t", "203.0.113.1:80")
    config = Config(source=None, cluster=None, checks=None, alerts=None,  # type: ignore[arg-type]
                    paths=Paths(run_dir=state_dir, state_dir=state_dir),
                    ipvs=IpvsConfig(cleanstop=cleanstop, reconcile_interval=3600),
                    haproxy=None, virtuals=())  # type: ignore[arg-type]
    plugin.lbha_configure(config)
    assert plugin.lbha_start(DaemonContext("heartbeat", config)) is None
    service = plugin.lbha_start(DaemonContext("healthd", config))
    assert service is not None

    async def kernel_has(text: str) -> None:
        for _ in range(600):  # 30 s
            if any(text in line for line in ipvsadm_table()):
                return
            await trio.sleep(0.05)
        pytest.fail(f"{text!r} never reached the kernel: {ipvsadm_table()}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(service)
        plugin.lbha_apply(desired(svc("198.18.0.11", 80, "tcp", dest("198.18.1.1", 80))))
        await kernel_has("198.18.0.11:80 wlc")
        plugin.lbha_apply(desired(svc("198.18.0.11", 80, "tcp", dest("198.18.1.1", 80),
                                      scheduler="lc")))
        await kernel_has("198.18.0.11:80 lc")
        nursery.cancel_scope.cancel()
    ours = "TCP 198.18.0.11:80 lc"
    assert set(ipvsadm_table()) == ({"TCP 203.0.113.1:80 wlc"} |
                                    (set() if cleanstop else {ours}))
    assert len(pyroute2_table()) == (1 if cleanstop else 2)
