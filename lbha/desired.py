"""The desired table the engine computes and backends (IPVS, HAProxy) reconcile to."""

from __future__ import annotations

from dataclasses import dataclass

from lbha.model import Forwarding, IPAddress


@dataclass(frozen=True)
class DesiredDestination:
    """One real server (or the fallback server) as it must appear in a backend."""

    name: str
    address: IPAddress
    port: int
    weight: int
    forwarding: Forwarding
    min_connections: int = 0
    max_connections: int = 0
    #: "up", "quiesced" (failed, kept at weight 0), "drain", "fallback".
    state: str = "up"


@dataclass(frozen=True)
class DesiredService:
    """One kernel IPVS service (layer 4) or one HAProxy backend (layer 7)."""

    virtual: str
    layer: int
    protocol: str
    address: IPAddress | None
    port: int
    mark: int | None
    scheduler: str
    persistence: float | None
    persistence_netmask: str | None
    one_packet: bool
    haproxy_backend: str | None
    haproxy_socket: str | None
    destinations: tuple[DesiredDestination, ...]
    #: 4 or 6; what tells a fwmark service's family, which has no address.
    family: int = 4


@dataclass(frozen=True)
class DesiredTable:
    """Everything lbha manages; `generation` grows by one with every change."""

    generation: int
    services: tuple[DesiredService, ...]
