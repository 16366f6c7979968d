"""The pure IPVS diff: kernel table + desired table + ownership -> operations (no kernel)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from lbha.desired import DesiredDestination, DesiredService, DesiredTable
from lbha.model import Forwarding
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
    Operation,
    Service,
    ServiceKey,
    ServiceSettings,
    desired_table,
    diff,
    is_drift,
)


def dest(addr: str, port: int = 80, weight: int = 1, fwd: Forwarding = Forwarding.NAT,
         state: str = "up", lo: int = 0, hi: int = 0) -> DesiredDestination:
    return DesiredDestination(name=addr, address=ipaddress.ip_address(addr), port=port,
                              weight=weight, forwarding=fwd, min_connections=lo,
                              max_connections=hi, state=state)


def svc(addr: str | None = "198.18.0.1", port: int = 80, protocol: str = "tcp",
        *dests: DesiredDestination, scheduler: str = "wlc", persistence: float | None = None,
        netmask: str | None = None, mark: int | None = None, ops: bool = False,
        layer: int = 4) -> DesiredService:
    return DesiredService(
        virtual="v", layer=layer, protocol=protocol,
        address=ipaddress.ip_address(addr) if addr else None, port=port, mark=mark,
        scheduler=scheduler, persistence=persistence, persistence_netmask=netmask,
        one_packet=ops, haproxy_backend=None, haproxy_socket=None, destinations=dests,
        family=_family_of(addr, dests))


def _family_of(addr: str | None, dests: tuple[DesiredDestination, ...]) -> int:
    """As the engine sets it: the VIP's family, else the real servers' (fwmark)."""
    if addr:
        return ipaddress.ip_address(addr).version
    return dests[0].address.version if dests else 4


def table(*services: DesiredService) -> dict[ServiceKey, Service]:
    return desired_table(DesiredTable(1, services))


def apply_ops(kernel: dict[ServiceKey, Service], ops: list[Operation]) -> dict:
    """What the kernel would hold after `ops` (a model of IPVS add/set/del)."""
    out = {k: Service(k, v.settings, dict(v.dests)) for k, v in kernel.items()}
    for op in ops:
        match op:
            case AddService():
                assert op.service not in out, "add of an existing service"
                out[op.service] = Service(op.service, op.settings, {})
            case EditService():
                out[op.service] = Service(op.service, op.settings, out[op.service].dests)
            case DeleteService():
                del out[op.service]
            case AddDest():
                assert op.dest not in out[op.service].dests
                out[op.service].dests[op.dest] = op.settings
            case EditDest():
                assert op.dest in out[op.service].dests
                out[op.service].dests[op.dest] = op.settings
            case DeleteDest():
                del out[op.service].dests[op.dest]
    return out


WEB = svc("198.18.0.1", 80, "tcp", dest("198.18.1.1", 8080, 3), dest("198.18.1.2", 8080, 2))


def test_empty_kernel_gets_service_then_every_destination():
    want = table(WEB)
    ops = diff({}, want, owned=())
    key = ServiceKey(4, "tcp", "198.18.0.1", 80)
    assert ops == [
        AddService(key, ServiceSettings("wlc")),
        AddDest(key, DestKey("198.18.1.1", 8080), DestSettings(FWD_MASQ, 3)),
        AddDest(key, DestKey("198.18.1.2", 8080), DestSettings(FWD_MASQ, 2)),
    ]
    assert apply_ops({}, ops) == want


def test_identical_table_needs_nothing():
    want = table(WEB)
    assert diff(want, want, owned=want.keys()) == []


def test_weight_only_change_is_one_edit_that_keeps_masq_forwarding():
    """pyroute2 pitfall 1: a weight change must carry fwd_method, or the dest becomes DR."""
    kernel = table(WEB)
    want = table(replace(WEB, destinations=(dest("198.18.1.1", 8080, 0, state="drain"),
                                            dest("198.18.1.2", 8080, 2))))
    ops = diff(kernel, want, owned=kernel.keys())
    assert len(ops) == 1
    assert isinstance(ops[0], EditDest)
    # The edit carries the whole destination (test_ipvs_netlink: and so does its request).
    assert ops[0].settings == DestSettings(FWD_MASQ, 0, 0, 0)


def test_forwarding_change_edits_one_dest_and_leaves_the_others():
    """Changing a real server's forwarding must not recreate the service (dropping others)."""
    base = svc("198.18.0.1", 80, "tcp", dest("198.18.1.1", 80, 1, Forwarding.DR),
               dest("198.18.1.2", 80, 1, Forwarding.DR))
    kernel = table(base)
    want = table(replace(base, destinations=(dest("198.18.1.1", 80, 1, Forwarding.TUN),
                                             dest("198.18.1.2", 80, 1, Forwarding.DR))))
    ops = diff(kernel, want, owned=kernel.keys())
    assert ops == [EditDest(next(iter(want)), DestKey("198.18.1.1", 80),
                            DestSettings(FWD_TUNNEL, 1), DestSettings(FWD_ROUTE, 1))]


def test_nat_to_dr_moves_the_destination_port():
    kernel = table(svc("198.18.0.1", 80, "tcp", dest("198.18.1.1", 8080, 1, Forwarding.NAT)))
    want = table(svc("198.18.0.1", 80, "tcp", dest("198.18.1.1", 80, 1, Forwarding.DR)))
    ops = diff(kernel, want, owned=kernel.keys())
    assert [type(op) for op in ops] == [DeleteDest, AddDest]
    assert apply_ops(kernel, ops) == want


def test_foreign_services_are_never_touched():
    foreign = table(svc("203.0.113.9", 443, "tcp", dest("203.0.113.10", 443, 5)))
    kernel = {**foreign, **table(WEB)}
    # Not desired, not owned: left alone even though lbha's own table is empty.
    assert diff(kernel, {}, owned=table(WEB).keys()) == [DeleteService(next(iter(table(WEB))))]
    assert diff(kernel, table(WEB), owned=table(WEB).keys()) == []
    assert diff(kernel, {}, owned=()) == []


def test_deleted_config_removes_an_owned_service_only():
    kernel = table(WEB)
    assert diff(kernel, {}, owned=kernel.keys()) == [DeleteService(next(iter(kernel)))]
    # Already gone from the kernel: nothing to do.
    assert diff({}, {}, owned=kernel.keys()) == []


def test_extra_destination_in_a_managed_service_is_removed():
    kernel = table(replace(WEB, destinations=(*WEB.destinations, dest("198.18.1.9", 8080))))
    ops = diff(kernel, table(WEB), owned=kernel.keys())
    assert ops == [DeleteDest(next(iter(kernel)), DestKey("198.18.1.9", 8080))]


def test_scheduler_or_persistence_change_edits_the_service_in_place():
    kernel = table(WEB)
    want = table(replace(WEB, scheduler="sh", persistence=299.5,
                         persistence_netmask="255.255.0.0"))
    ops = diff(kernel, want, owned=kernel.keys())
    assert len(ops) == 1
    assert isinstance(ops[0], EditService)
    assert ops[0].settings == ServiceSettings("sh", True, False, 300, "255.255.0.0")


def test_quiesced_drained_and_halted_real_servers():
    base = svc("198.18.0.1", 80, "tcp", dest("198.18.1.1", 8080, 3), dest("198.18.1.2", 8080, 2),
               dest("198.18.1.3", 8080, 4))
    kernel = table(base)
    # .1 failed with quiescent (weight 0), .2 drained (weight 0), .3 halted (absent).
    want = table(replace(base, destinations=(dest("198.18.1.1", 8080, 0, state="quiesced"),
                                             dest("198.18.1.2", 8080, 0, state="drain"))))
    ops = diff(kernel, want, owned=kernel.keys())
    assert sorted(map(str, ops)) == sorted([
        "delete TCP 198.18.0.1:80 -> 198.18.1.3:8080",
        "edit TCP 198.18.0.1:80 -> 198.18.1.1:8080: masq weight 3 -> masq weight 0",
        "edit TCP 198.18.0.1:80 -> 198.18.1.2:8080: masq weight 2 -> masq weight 0",
    ])


def test_keys_for_every_kind_of_service():
    t = table(
        svc("198.18.0.1", 53, "tcp"), svc("198.18.0.1", 53, "udp"),
        svc(None, 0, "fwmark", dest("2001:db8::7", 0, fwd=Forwarding.DR), mark=7),
        svc(None, 0, "fwmark", mark=8),
        svc("198.18.0.2", 5060, "udp", ops=True),
        svc("2001:db8::1", 443, "tcp", persistence=60, netmask="64"),
        svc("198.18.0.3", 80, "tcp", layer=7),
    )
    assert sorted(map(str, t)) == ["FWM 7 IPv6", "FWM 8 IPv4", "TCP 198.18.0.1:53",
                                   "TCP [2001:db8::1]:443", "UDP 198.18.0.1:53",
                                   "UDP 198.18.0.2:5060"]
    ops_service = t[ServiceKey(4, "udp", "198.18.0.2", 5060)]
    assert ops_service.settings.one_packet
    v6 = t[ServiceKey(6, "tcp", "2001:db8::1", 443)]
    assert v6.settings == ServiceSettings("wlc", True, False, 60, "64")


def test_scope_limits_the_diff_to_changed_services():
    other = svc("198.18.0.2", 80, "tcp", dest("198.18.1.1", 80, fwd=Forwarding.DR))
    kernel = table(WEB)  # `other` is missing from the kernel too
    want = table(WEB, other)
    web_key = ServiceKey(4, "tcp", "198.18.0.1", 80)
    assert diff(kernel, want, owned=(), scope=[web_key]) == []
    assert len(diff(kernel, want, owned=(), scope=None)) == 2


def test_drift_is_a_change_lbha_did_not_ask_for():
    want = table(WEB)
    key = next(iter(want))
    op = EditDest(key, DestKey("198.18.1.1", 8080), DestSettings(FWD_MASQ, 3),
                  DestSettings(FWD_MASQ, 9))
    assert is_drift(op, applied=want, desired=want)
    assert not is_drift(op, applied={}, desired=want)
    changed = table(replace(WEB, scheduler="rr"))
    assert not is_drift(op, applied=want, desired=changed)


def test_duplicate_address_and_port_in_one_service_is_one_destination():
    t = table(svc("198.18.0.1", 80, "tcp", dest("198.18.1.1", 80, 2, Forwarding.DR),
                  dest("198.18.1.1", 80, 1, Forwarding.DR, state="fallback")))
    assert list(next(iter(t.values())).dests.values()) == [DestSettings(FWD_ROUTE, 2)]


# ------------------------------------------------------------------ property

ADDRS = [f"198.18.0.{i}" for i in range(1, 4)] + ["2001:db8::1"]
services = st.builds(
    lambda addr, port, proto, sched, dests: svc(addr, port, proto, *dests, scheduler=sched),
    st.sampled_from(ADDRS), st.sampled_from([80, 443]), st.sampled_from(["tcp", "udp"]),
    st.sampled_from(["wlc", "rr", "sh"]),
    st.lists(st.builds(lambda a, w, f: dest(a, 80, w, f),
                       st.sampled_from(["198.18.1.1", "198.18.1.2", "198.18.1.3"]),
                       st.integers(0, 5), st.sampled_from(list(Forwarding))), max_size=3),
)
tables = st.lists(services, max_size=4).map(lambda s: table(*s))


@settings(max_examples=300, deadline=None)
@given(kernel_lbha=tables, foreign=tables, want=tables)
def test_applying_the_diff_reaches_the_desired_table_and_spares_foreign(
        kernel_lbha, foreign, want):
    foreign = {k: v for k, v in foreign.items() if k not in kernel_lbha and k not in want}
    kernel = {**foreign, **kernel_lbha}
    ops = diff(kernel, want, owned=kernel_lbha.keys())
    after = apply_ops(kernel, ops)
    assert {k: after[k] for k in want} == want
    assert {k: v for k, v in after.items() if k not in want} == foreign
    # Reconciling again finds nothing to do.
    assert diff(after, want, owned=want.keys()) == []


def test_an_ipv6_fwmark_service_without_servers_keeps_its_family():
    empty = DesiredService(
        virtual="v", layer=4, protocol="fwmark", address=None, port=0, mark=9, scheduler="rr",
        persistence=None, persistence_netmask=None, one_packet=False, haproxy_backend=None,
        haproxy_socket=None, destinations=(), family=6)
    assert next(iter(table(empty))) == ServiceKey(6, "fwmark", fwmark=9)
