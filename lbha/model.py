"""The validated configuration: frozen, typed objects built by `lbha.config`.

Durations are float seconds. Addresses are `ipaddress` objects. Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

#: Every scheduler the Linux IPVS code base ships (ipvsadm -s).
IPVS_SCHEDULERS: frozenset[str] = frozenset(
    {"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos"}
)

#: Negotiate services known to lbha (ldirectord's list plus `simpletcp`). Plugins may add more.
NEGOTIATE_SERVICES: frozenset[str] = frozenset(
    {
        "dns", "ftp", "http", "https", "http_proxy", "imap", "imaps", "ldap", "ldaps", "mysql",
        "nntp", "none", "oracle", "pgsql", "pop", "pops", "radius", "simpletcp", "sip", "smtp",
        "submission",
    }
)

#: Default negotiate service for a virtual port (ldirectord's table).
SERVICE_BY_PORT: MappingProxyType[int, str] = MappingProxyType(
    {
        21: "ftp", 25: "smtp", 53: "dns", 80: "http", 110: "pop", 119: "nntp", 143: "imap",
        389: "ldap", 443: "https", 587: "submission", 636: "ldaps", 993: "imaps", 995: "pops",
        1521: "oracle", 1812: "radius", 3128: "http_proxy", 3306: "mysql", 5060: "sip",
        5432: "pgsql",
    }
)

#: Default check port of a negotiate service (the table above, reversed).
PORT_BY_SERVICE: MappingProxyType[str, int] = MappingProxyType(
    {service: port for port, service in SERVICE_BY_PORT.items()}
)

#: Check types the engine itself understands; every other type comes from a check plugin.
ENGINE_CHECK_TYPES: frozenset[str] = frozenset({"negotiate", "on", "off"})

#: Check types built into lbha's own check plugins (connect, ping, external).
BUILTIN_CHECK_TYPES: frozenset[str] = frozenset({"connect", "ping", "external"})

SERIAL_BAUDS: frozenset[int] = frozenset(
    {1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400}
)


class Role(StrEnum):
    MASTER = "master"
    SLAVE = "slave"


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"
    TCP_UDP = "tcp+udp"
    FWMARK = "fwmark"
    #: UDP with IPVS one-packet scheduling.
    OPS = "ops"


class Forwarding(StrEnum):
    DR = "dr"
    NAT = "nat"
    TUN = "tun"


class FeedbackType(StrEnum):
    NONE = "none"
    AGENT = "agent"
    HTTP = "http"


class HttpMethod(StrEnum):
    GET = "GET"
    HEAD = "HEAD"


class InitialState(StrEnum):
    DOWN = "down"
    UP = "up"


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    def __len__(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class FloatingIP:
    interface: IPInterface
    device: str | None = None
    label: str | None = None

    @property
    def address(self) -> IPAddress:
        return self.interface.ip


@dataclass(frozen=True)
class Peer:
    name: str
    addresses: tuple[IPAddress, ...]


@dataclass(frozen=True)
class SerialLink:
    device: str
    baud: int = 19200


@dataclass(frozen=True)
class ClusterConfig:
    node: str
    role: Role
    peers: tuple[Peer, ...]
    cluster_id: str = "lbha"
    udp_port: int = 6694
    bind: tuple[IPAddress, ...] = ()
    serial: SerialLink | None = None
    keepalive: float = 1.0
    warntime: float = 5.0
    deadtime: float = 10.0
    initdead: float = 30.0
    ping_nodes: tuple[IPAddress, ...] = ()
    ping_timeout: float = 10.0
    auto_failback: bool = True
    auth: str = "hmac-sha256"
    auth_key_file: Path | None = None
    floating_ips: tuple[FloatingIP, ...] = ()
    garp_count: int = 5
    garp_interval: float = 0.2
    garp_refresh: float = 0.0
    #: Run the heartbeat daemon at real-time priority (ha.cf `realtime`), so a busy machine
    #: never delays a keepalive into a false failover.
    realtime: bool = True


@dataclass(frozen=True)
class CheckDefaults:
    interval: float = 5.0
    timeout: float = 3.0
    negotiate_timeout: float = 5.0
    failure_count: int = 2
    rise: int = 1
    quiescent: bool = False
    concurrency: int = 256
    initial_state: InitialState = InitialState.DOWN


@dataclass(frozen=True)
class Paths:
    run_dir: Path = Path("/run/lbha")
    state_dir: Path = Path("/var/lib/lbha")
    #: What every real server starts as when healthd's state file is damaged:
    #: "online" (fail open), "drain" or "halt" (fail closed).
    damaged_state: str = "online"

    @property
    def healthd_socket(self) -> Path:
        return self.run_dir / "healthd.sock"

    @property
    def heartbeat_socket(self) -> Path:
        return self.run_dir / "heartbeat.sock"


@dataclass(frozen=True)
class EmailAlerts:
    to: tuple[str, ...] = ()
    sender: str = "lbha@localhost"
    smtp_host: str = "localhost"
    smtp_port: int = 25
    starttls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    repeat: float = 0.0
    rate_limit: int = 60

    @property
    def enabled(self) -> bool:
        return bool(self.to)


@dataclass(frozen=True)
class SnmpTarget:
    host: IPAddress
    port: int = 162


@dataclass(frozen=True)
class SnmpAlerts:
    targets: tuple[SnmpTarget, ...] = ()
    community: str = field(default="public", repr=False)
    version: str = "2c"

    @property
    def enabled(self) -> bool:
        return bool(self.targets)


@dataclass(frozen=True)
class AlertsConfig:
    email: EmailAlerts = EmailAlerts()
    snmp: SnmpAlerts = SnmpAlerts()


@dataclass(frozen=True)
class IpvsConfig:
    cleanstop: bool = True
    reconcile_interval: float = 30.0


@dataclass(frozen=True)
class HaproxyConfig:
    socket: str | None = None
    reconcile_interval: float = 10.0


@dataclass(frozen=True)
class CheckSpec:
    """How one real server is checked; every timing field is already resolved."""

    type: str
    service: str | None
    port: int | None
    request: str | None
    receive: str | None
    regex: bool
    virtualhost: str | None
    method: HttpMethod
    login: str | None
    password: str | None = field(repr=False)
    database: str | None
    secret: str | None = field(repr=False)
    command: tuple[str, ...]
    connects_per_negotiate: int
    verify_tls: bool
    ca_file: Path | None
    interval: float
    timeout: float
    negotiate_timeout: float
    failure_count: int
    rise: int
    quiescent: bool
    options: MappingProxyType[str, Any]

    @property
    def check_name(self) -> str:
        """The check type that actually runs: the service for negotiate checks."""
        if self.type == "negotiate" and self.service is not None:
            return self.service
        return self.type


@dataclass(frozen=True)
class Feedback:
    type: FeedbackType = FeedbackType.NONE
    port: int = 3333
    path: str = "/"
    interval: float | None = None


@dataclass(frozen=True)
class Fallback:
    address: IPAddress
    port: int | None = None
    persistent: bool = False
    forwarding: Forwarding = Forwarding.DR


@dataclass(frozen=True)
class HaproxyBackend:
    backend: str
    socket: str


@dataclass(frozen=True)
class RealServer:
    name: str
    address: IPAddress
    port: int | None
    weight: int
    min_connections: int
    max_connections: int
    forwarding: Forwarding
    check: CheckSpec

    @property
    def family(self) -> int:
        return self.address.version


@dataclass(frozen=True)
class VirtualService:
    name: str
    layer: int
    address: IPAddress | None
    ports: tuple[PortRange, ...]
    all_ports: bool
    protocol: Protocol
    mark: int | None
    forwarding: Forwarding
    scheduler: str
    persistence: float | None
    persistence_netmask: str | None
    check: CheckSpec
    feedback: Feedback
    fallback: Fallback | None
    email: tuple[str, ...]
    haproxy: HaproxyBackend | None
    reals: tuple[RealServer, ...]

    @property
    def family(self) -> int:
        if self.address is not None:
            return self.address.version
        return self.reals[0].address.version if self.reals else 4

    @property
    def single_port(self) -> int | None:
        """The one port of the service, or None for ranges, lists, "*" and fwmark."""
        if self.all_ports or len(self.ports) != 1 or len(self.ports[0]) != 1:
            return None
        return self.ports[0].first


@dataclass(frozen=True)
class Config:
    source: Path | None
    cluster: ClusterConfig | None
    checks: CheckDefaults
    alerts: AlertsConfig
    paths: Paths
    ipvs: IpvsConfig
    haproxy: HaproxyConfig
    virtuals: tuple[VirtualService, ...]
    #: The operator allows a config with no virtual service and no cluster (`allow_empty`).
    allow_empty: bool = False

    def virtual(self, name: str) -> VirtualService:
        for virtual in self.virtuals:
            if virtual.name == name:
                return virtual
        raise KeyError(name)
