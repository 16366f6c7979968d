"""Events both daemons emit through the `lbha_event` hook (alerts, traps, metrics, logs)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True, kw_only=True)
class Event:
    """Something an operator may want to hear about; `message` is one readable line."""

    kind: str
    message: str
    severity: Severity = Severity.INFO
    node: str | None = None
    time: float = field(default_factory=time.time)


@dataclass(frozen=True, kw_only=True)
class RealServerEvent(Event):
    """A real server changed state in one virtual service."""

    virtual: str
    real: str
    address: str
    port: int | None
    old_state: str
    new_state: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class ClusterEvent(Event):
    """The pair changed: failover, takeover, standby, link down/up, peer dead, split brain,
    floating IP restored, carrier lost/back (kinds listed in README.md)."""

    old_state: str
    new_state: str
    peer: str | None
    reason: str
