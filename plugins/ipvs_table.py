"""IPVS tables as plain values, and the diff "kernel table -> desired table" as operations.

No I/O: the IPVS plugin reads the kernel into a `Table`, builds the desired `Table` from the
engine's DesiredTable, and applies what `diff` returns (encoded by `ipvs_netlink`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lbha.desired import DesiredService, DesiredTable
from lbha.model import Forwarding

#: IPVS service flags lbha manages; the kernel adds HASHED and we leave the sh-* flags.
FLAG_PERSISTENT = 0x1
FLAG_HASHED = 0x2
FLAG_ONEPACKET = 0x4
MANAGED_FLAGS = FLAG_PERSISTENT | FLAG_ONEPACKET

#: IPVS forwarding methods (IP_VS_CONN_F_*), as the kernel and ipvsadm number them.
FWD_MASQ = 0
FWD_TUNNEL = 2
FWD_ROUTE = 3
FORWARDING_CODES: Mapping[Forwarding, int] = {
    Forwarding.NAT: FWD_MASQ, Forwarding.TUN: FWD_TUNNEL, Forwarding.DR: FWD_ROUTE,
}
_FWD_NAMES = {FWD_MASQ: "masq", FWD_TUNNEL: "tunnel", FWD_ROUTE: "route", 1: "local"}


# The value types are NamedTuples: a full reconcile hashes and compares ten thousands of them,
# and tuples do that in C.


class ServiceKey(NamedTuple):
    """What identifies an IPVS virtual service: protocol + address + port, or a fwmark."""

    family: int
    protocol: str
    address: str | None = None
    port: int = 0
    fwmark: int = 0

    def __str__(self) -> str:
        if self.protocol == "fwmark":
            return f"FWM {self.fwmark} IPv{self.family}"
        host = f"[{self.address}]" if self.family == 6 else self.address
        return f"{self.protocol.upper()} {host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, "protocol": self.protocol, "address": self.address,
                "port": self.port, "fwmark": self.fwmark}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServiceKey:
        return cls(int(data["family"]), str(data["protocol"]), data.get("address"),
                   int(data.get("port", 0)), int(data.get("fwmark", 0)))


class ServiceSettings(NamedTuple):
    scheduler: str
    persistent: bool = False
    one_packet: bool = False
    #: Persistence timeout in seconds (0 unless persistent).
    timeout: int = 0
    #: Persistence netmask (IPv4: dotted; IPv6: a prefix length, as ipvsadm prints them);
    #: "" unless persistent.
    netmask: str = ""

    def __str__(self) -> str:
        text = self.scheduler
        if self.persistent:
            text += f" persistent {self.timeout} mask {self.netmask}"
        if self.one_packet:
            text += " ops"
        return text


class DestKey(NamedTuple):
    address: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


class DestSettings(NamedTuple):
    forwarding: int
    weight: int
    upper: int = 0
    lower: int = 0

    def __str__(self) -> str:
        text = f"{_FWD_NAMES.get(self.forwarding, self.forwarding)} weight {self.weight}"
        if self.upper or self.lower:
            text += f" thresholds {self.upper}/{self.lower}"
        return text


@dataclass(frozen=True)
class Service:
    key: ServiceKey
    settings: ServiceSettings
    dests: Mapping[DestKey, DestSettings] = field(default_factory=dict)


Table = Mapping[ServiceKey, Service]


# ------------------------------------------------------------------ operations


@dataclass(frozen=True)
class AddService:
    service: ServiceKey
    settings: ServiceSettings

    def __str__(self) -> str:
        return f"add service {self.service} {self.settings}"


@dataclass(frozen=True)
class EditService:
    service: ServiceKey
    settings: ServiceSettings
    old: ServiceSettings

    def __str__(self) -> str:
        return f"edit service {self.service}: {self.old} -> {self.settings}"


@dataclass(frozen=True)
class DeleteService:
    service: ServiceKey

    def __str__(self) -> str:
        return f"delete service {self.service}"


@dataclass(frozen=True)
class AddDest:
    service: ServiceKey
    dest: DestKey
    settings: DestSettings

    def __str__(self) -> str:
        return f"add {self.service} -> {self.dest} {self.settings}"


@dataclass(frozen=True)
class EditDest:
    service: ServiceKey
    dest: DestKey
    settings: DestSettings
    old: DestSettings

    def __str__(self) -> str:
        return f"edit {self.service} -> {self.dest}: {self.old} -> {self.settings}"


@dataclass(frozen=True)
class DeleteDest:
    service: ServiceKey
    dest: DestKey

    def __str__(self) -> str:
        return f"delete {self.service} -> {self.dest}"


Operation = AddService | EditService | DeleteService | AddDest | EditDest | DeleteDest


def diff(kernel: Table, desired: Table, owned: Collection[ServiceKey],
         scope: Iterable[ServiceKey] | None = None) -> list[Operation]:
    """The operations that turn `kernel` into `desired` for the services lbha manages.

    lbha manages the desired services and those in `owned` (created by it earlier); a service
    in neither is foreign and never touched. Inside a managed service every destination is
    lbha's. `scope` limits the diff to some services (None: all). Deletions of services come
    first so that nothing else waits behind them.
    """
    if scope is None:
        keys = set(desired).union(owned)
    else:
        keys = {key for key in scope if key in desired or key in owned}
    ops: list[Operation] = []
    for key in sorted(keys - set(desired)):
        if key in kernel:
            ops.append(DeleteService(key))
    for key in sorted(keys & set(desired)):
        want = desired[key]
        have = kernel.get(key)
        if have is None:
            ops.append(AddService(key, want.settings))
            ops.extend(AddDest(key, d, want.dests[d]) for d in sorted(want.dests))
            continue
        if have.settings != want.settings:
            ops.append(EditService(key, want.settings, have.settings))
        ops.extend(DeleteDest(key, d) for d in sorted(set(have.dests) - set(want.dests)))
        for dest in sorted(want.dests):
            old = have.dests.get(dest)
            if old is None:
                ops.append(AddDest(key, dest, want.dests[dest]))
            elif old != want.dests[dest]:
                ops.append(EditDest(key, dest, want.dests[dest], old))
    return ops


def is_drift(op: Operation, applied: Table, desired: Table) -> bool:
    """True when `op` repairs the kernel rather than carrying a new desired state.

    `applied` is the desired table lbha last put into the kernel: a service whose desired
    state has not changed since then but still needs an operation was changed behind lbha's
    back (ipvsadm, another tool).
    """
    key = op.service
    return key in applied and applied.get(key) == desired.get(key)


# ------------------------------------------------------------------ desired side


def _family(service: DesiredService) -> int:
    return service.address.version if service.address is not None else service.family


def service_key(service: DesiredService) -> ServiceKey:
    family = _family(service)
    if service.protocol == "fwmark":
        return ServiceKey(family, "fwmark", fwmark=service.mark or 0)
    assert service.address is not None, "a tcp/udp service has an address"
    return ServiceKey(family, service.protocol, service.address.compressed, service.port)


def default_netmask(family: int) -> str:
    return "128" if family == 6 else "255.255.255.255"


def desired_service(service: DesiredService) -> Service:
    """One layer-4 DesiredService as the IPVS entry it must become."""
    key = service_key(service)
    persistent = service.persistence is not None
    settings = ServiceSettings(
        scheduler=service.scheduler,
        persistent=persistent,
        one_packet=service.one_packet,
        timeout=max(1, math.ceil(service.persistence)) if service.persistence else 0,
        netmask=(service.persistence_netmask or default_netmask(key.family)) if persistent
        else "",
    )
    dests: dict[DestKey, DestSettings] = {}
    for dest in service.destinations:
        dest_key = DestKey(dest.address.compressed, dest.port)
        # The same address:port twice (a real server that is also the fallback) is one entry.
        dests.setdefault(dest_key, DestSettings(
            forwarding=FORWARDING_CODES[dest.forwarding],
            weight=dest.weight,
            upper=dest.max_connections,
            lower=dest.min_connections,
        ))
    return Service(key, settings, dests)


def desired_table(table: DesiredTable) -> dict[ServiceKey, Service]:
    """The IPVS part (layer 4) of the engine's desired table."""
    services: dict[ServiceKey, Service] = {}
    for service in table.services:
        if service.layer != 4:
            continue
        wanted = desired_service(service)
        services.setdefault(wanted.key, wanted)
    return services
