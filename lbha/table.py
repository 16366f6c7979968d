"""The desired table: check results + operator actions -> what IPVS / HAProxy must hold.

Pure functions, computed per virtual service so the engine recomputes only what changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from lbha.desired import DesiredDestination, DesiredService
from lbha.model import Forwarding, Protocol, RealServer, VirtualService


class Admin(StrEnum):
    """What an operator asked for a real server."""

    ONLINE = "online"
    #: Weight 0: existing connections continue, no new ones.
    DRAIN = "drain"
    #: Out of the table: connections dropped where the backend can.
    HALT = "halt"


@dataclass(frozen=True)
class RealView:
    """What the table needs to know of one real server in one virtual service."""

    up: bool
    admin: Admin = Admin.ONLINE
    #: Idle capacity from a feedback agent, in percent; None when there is no feedback.
    feedback_percent: int | None = None


def effective_weight(weight: int, percent: int | None) -> int:
    """Configured weight scaled by feedback, rounded down as HAProxy does."""
    return weight if percent is None else weight * percent // 100


def _destination(real: RealServer, view: RealView, port: int) -> DesiredDestination | None:
    if view.admin is Admin.HALT:
        return None
    if not view.up:
        if not real.check.quiescent:
            return None
        weight, state = 0, "quiesced"
    elif view.admin is Admin.DRAIN:
        weight, state = 0, "drain"
    else:
        weight, state = effective_weight(real.weight, view.feedback_percent), "up"
    return DesiredDestination(
        name=real.name,
        address=real.address,
        port=port,
        weight=weight,
        forwarding=real.forwarding,
        min_connections=real.min_connections,
        max_connections=real.max_connections,
        state=state,
    )


def _service_ports(virtual: VirtualService) -> list[int]:
    if virtual.protocol is Protocol.FWMARK or virtual.all_ports:
        return [0]
    return [port for rng in virtual.ports for port in range(rng.first, rng.last + 1)]


def _protocols(virtual: VirtualService) -> tuple[str, ...]:
    if virtual.layer == 7:
        return ("tcp",)
    return {
        Protocol.TCP: ("tcp",), Protocol.UDP: ("udp",), Protocol.OPS: ("udp",),
        Protocol.TCP_UDP: ("tcp", "udp"), Protocol.FWMARK: ("fwmark",),
    }[virtual.protocol]


def virtual_services(
    virtual: VirtualService, views: Sequence[RealView], fallback_was_used: bool
) -> tuple[tuple[DesiredService, ...], bool]:
    """The services of one virtual, and whether its fallback is (still) in use.

    `views` is aligned with `virtual.reals`. The fallback enters at weight 1 when no real
    server is up and online; when one returns it leaves, or stays at weight 0 when persistent.
    """
    available = any(v.up and v.admin is Admin.ONLINE for v in views)
    fallback = virtual.fallback
    fallback_weight: int | None = None
    if fallback is not None and not available:
        fallback_weight = 1
    elif fallback is not None and fallback.persistent and fallback_was_used:
        fallback_weight = 0
    ports = [virtual.ports[0].first] if virtual.layer == 7 else _service_ports(virtual)
    services = []
    for port in ports:
        destinations = []
        for real, view in zip(virtual.reals, views, strict=True):
            nat = real.forwarding is Forwarding.NAT or virtual.layer == 7
            dest = _destination(real, view, (real.port or port) if nat else port)
            if dest is not None:
                destinations.append(dest)
        if fallback is not None and fallback_weight is not None:
            destinations.append(DesiredDestination(
                name="fallback",
                address=fallback.address,
                port=fallback.port or port,
                weight=fallback_weight,
                forwarding=fallback.forwarding,
                state="fallback" if fallback_weight else "fallback-quiesced",
            ))
        dest_tuple = tuple(destinations)
        for protocol in _protocols(virtual):
            services.append(DesiredService(
                virtual=virtual.name,
                layer=virtual.layer,
                protocol=protocol,
                address=virtual.address,
                port=port,
                mark=virtual.mark,
                scheduler=virtual.scheduler,
                persistence=virtual.persistence,
                persistence_netmask=virtual.persistence_netmask,
                one_packet=virtual.protocol is Protocol.OPS,
                haproxy_backend=virtual.haproxy.backend if virtual.haproxy else None,
                haproxy_socket=virtual.haproxy.socket if virtual.haproxy else None,
                destinations=dest_tuple,
                family=virtual.family,
            ))
    return tuple(services), fallback_weight is not None
