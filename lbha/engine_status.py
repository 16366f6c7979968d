"""The engine's status reply (`lbha status`): every real server's state, weight and
feedback per virtual service, and the scheduler's counters, JSON-ready."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

from lbha.desired import DesiredTable
from lbha.model import Config

if TYPE_CHECKING:
    from lbha.engine import EngineStats, Member


def status_reply(
    config: Config,
    table: DesiredTable,
    members: Mapping[tuple[str, str], Member],
    fallback_used: Mapping[str, bool],
    stats: EngineStats,
    *,
    jobs: int,
    started: float | None,
    state_problem: str | None,
) -> dict[str, Any]:
    """`started`: trio time the engine's `run()` began (None: not yet)."""
    now, wall = trio.current_time(), time.time()
    # Until its first change a server's state dates from the start (its `since` predates
    # the clock the engine runs on, which is no date at all).
    started = now if started is None else started
    weights = {(s.virtual, d.name): d.weight for s in table.services
               for d in s.destinations}
    virtuals = []
    for virtual in config.virtuals:
        reals = []
        for real in virtual.reals:
            member = members[(virtual.name, real.name)]
            health = member.health
            reals.append({
                "name": real.name,
                "address": str(real.address),
                "port": real.port,
                "state": health.state if health.checked else f"{health.state} (unchecked)",
                "admin": str(member.admin),
                "weight": weights.get((virtual.name, real.name)),
                "configured_weight": real.weight,
                "feedback": member.feedback_percent,
                "agent_down": member.agent_down,
                "feedback_reason": member.feedback_reason,
                "reason": health.reason,
                "since": wall - (now - max(health.since, started)),
                "changed": health.since > started,
                "last_check_age": None if member.last_check is None
                else now - member.last_check,
                "check": real.check.check_name,
            })
        fallback = fallback_used.get(virtual.name, False)
        virtuals.append({
            "name": virtual.name,
            "address": str(virtual.address) if virtual.address else None,
            "ports": "*" if virtual.all_ports else ",".join(map(str, virtual.ports)),
            "protocol": str(virtual.protocol),
            "layer": virtual.layer,
            "fallback_in_use": fallback,
            "reals": reals,
        })
    lateness = sorted(stats.lateness)
    return {
        "generation": table.generation,
        "started": wall - (now - started),
        "state_problem": state_problem,
        "virtuals": virtuals,
        "stats": {
            "checks": stats.checks,
            "failures": stats.failures,
            "skipped_busy": stats.skipped_busy,
            "jobs": jobs,
            "lateness_p50": lateness[len(lateness) // 2] if lateness else None,
            "lateness_p99": lateness[int(len(lateness) * 0.99)] if lateness else None,
        },
    }

