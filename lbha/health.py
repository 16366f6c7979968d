"""Real-server health: a pure state machine fed by check results.

failure_count consecutive failures take an up server down; rise consecutive successes bring
a down server back. A server not yet checked starts as `initial_state`; its first result
settles it at once (as ldirectord does), so rise applies to recovery after a failure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lbha.model import InitialState


@dataclass(frozen=True)
class Health:
    up: bool
    checked: bool = False
    failures: int = 0
    successes: int = 0
    reason: str = "not checked yet"
    since: float = 0.0

    @property
    def state(self) -> str:
        return "up" if self.up else "down"


@dataclass(frozen=True)
class Transition:
    """A change an operator hears about; `old` is "unchecked" for a server's first verdict."""

    old: str
    new: str
    reason: str


def initial_health(initial_state: InitialState, now: float) -> Health:
    return Health(up=initial_state is InitialState.UP, since=now)


def _settle(health: Health, new: Health, up: bool, now: float) -> tuple[Health, Transition | None]:
    old = health.state if health.checked else "unchecked"
    settled = replace(new, up=up, since=now if up != health.up else health.since)
    return settled, Transition(old, settled.state, new.reason)


def step(
    health: Health, ok: bool, reason: str, now: float, failure_count: int, rise: int
) -> tuple[Health, Transition | None]:
    """Apply one check result; return the new health and the transition, if any."""
    if ok:
        if health.up and health.checked and not health.failures and reason == health.reason:
            # The steady state of thousands of servers: nothing to remember but the time.
            return health, None
        new = replace(health, checked=True, failures=0, successes=health.successes + 1,
                      reason=reason)
        if not health.checked or (not health.up and new.successes >= rise):
            return _settle(health, new, True, now)
        return new, None
    new = replace(health, checked=True, failures=health.failures + 1, successes=0,
                  reason=reason)
    if (health.up and new.failures >= failure_count) or not (health.up or health.checked):
        return _settle(health, new, False, now)
    return new, None


def force(health: Health, up: bool, reason: str, now: float) -> tuple[Health, Transition | None]:
    """Set health without a check (check types `on` and `off`)."""
    new = replace(health, checked=True, failures=0, successes=0, reason=reason)
    if health.checked and health.up == up:
        return new, None
    return _settle(health, new, up, now)

