"""The health-check engine: schedules checks, keeps real-server state, publishes the table.

One Job per distinct check (a real server shared by several virtual services with the same
check is checked once per interval); one Member per (virtual, real) pair with its own state
machine. Jobs sit in a heap ordered by due time; a single scheduler task starts each due
check under a capacity limiter, so a hung server only ever holds its own slot. The status
reply built from this state lives in `lbha.engine_status`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from lbha.admin_state import Actions, AdminStore, DamagedStateFile, StateFileError
from lbha.checkapi import (
    BatchCheckType,
    CheckRegistry,
    CheckRequest,
    CheckResult,
    Target,
    Transcript,
)
from lbha.desired import DesiredService, DesiredTable
from lbha.engine_status import status_reply
from lbha.events import Event, RealServerEvent, Severity
from lbha.feedback import apply_reading, read_agent, read_http
from lbha.health import Health, Transition, force, initial_health, step
from lbha.model import (
    PORT_BY_SERVICE,
    CheckSpec,
    Config,
    FeedbackType,
    Protocol,
    RealServer,
    VirtualService,
)
from lbha.table import Admin, RealView, virtual_services

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], None]

#: Lateness samples kept for `lbha status --json` and the benchmark.
LATENESS_SAMPLES = 10_000
#: Scheduler granularity: checks due within one tick start together. Every wake-up of an
#: idle trio loop costs ~0.3 ms of CPU on the 2-core VM (bench/engine): 20 ms halves that
#: against 10 ms and keeps lateness within 20 ms, small beside check intervals of seconds.
TICK = 0.02


class EngineError(Exception):
    """An operator request the engine cannot carry out (unknown VIP or RIP, ...)."""


def check_port(virtual: VirtualService, real: RealServer, spec: CheckSpec) -> int | None:
    """The port a check talks to: check port, real port, virtual port, service's port."""
    if spec.port is not None:
        return spec.port
    if real.port is not None:
        return real.port
    if virtual.ports and not virtual.all_ports:
        return virtual.ports[0].first
    return PORT_BY_SERVICE.get(spec.service or "")


def make_target(virtual: VirtualService, real: RealServer) -> Target:
    protocol = "udp" if virtual.protocol in (Protocol.UDP, Protocol.OPS) else "tcp"
    return Target(
        virtual=virtual.name,
        vip=virtual.address,
        vport=virtual.single_port,
        protocol=protocol,
        rip=real.address,
        rport=check_port(virtual, real, real.check),
        mark=virtual.mark,
    )


def _job_key(target: Target, spec: CheckSpec) -> tuple[Any, ...]:
    # State-machine parameters belong to each member; everything else decides what runs.
    neutral = replace(spec, failure_count=1, rise=1, quiescent=False, options=None)  # type: ignore[arg-type]
    per_vip = (target.vip, target.vport) if spec.type == "external" else ()
    return (neutral, tuple(sorted(spec.options.items())), target.rip, target.rport,
            target.protocol, *per_vip)


@dataclass(eq=False)
class Member:
    """One real server in one virtual service."""

    virtual: VirtualService
    real: RealServer
    health: Health
    admin: Admin = Admin.ONLINE
    feedback_percent: int | None = None
    feedback_reason: str | None = None
    #: The feedback agent said "down" / "maint" (HAProxy agent words) and not "up" since.
    agent_down: bool = False
    last_check: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.virtual.name, self.real.name

    def view(self) -> RealView:
        return RealView(self.health.up and not self.agent_down, self.admin,
                        self.feedback_percent)


@dataclass(eq=False)
class Job:
    """One distinct check, run every interval for all members that share it."""

    target: Target
    spec: CheckSpec
    members: list[Member]
    generation: int
    running: bool = False
    cycle: int = 0
    due: float = 0.0
    feedback: bool = False
    interval: float = 0.0
    _requests: dict[float, CheckRequest] = field(default_factory=dict)

    def request(self, seconds: float) -> CheckRequest:
        """The (immutable) request for a deadline, built once: thousands are made a second."""
        request = self._requests.get(seconds)
        if request is None:
            request = CheckRequest(self.target, self.spec, self.spec.options, seconds)
            self._requests[seconds] = request
        return request

    def next_check(self) -> tuple[str, float]:
        """Name and deadline of the check to run now ("N connects then 1 negotiate")."""
        spec = self.spec
        if spec.type == "negotiate" and spec.connects_per_negotiate:
            position = self.cycle % (spec.connects_per_negotiate + 1)
            self.cycle += 1
            if position < spec.connects_per_negotiate:
                return "connect", spec.timeout
        if spec.type == "negotiate":
            return spec.check_name, spec.negotiate_timeout
        return spec.type, spec.timeout


@dataclass
class EngineStats:
    checks: int = 0
    failures: int = 0
    skipped_busy: int = 0
    lateness: deque[float] = field(default_factory=lambda: deque(maxlen=LATENESS_SAMPLES))


async def run_check(
    registry: CheckRegistry, name: str, target: Target, spec: CheckSpec, seconds: float,
    transcript: Transcript | None = None,
) -> CheckResult:
    """Run one check for at most `seconds`; any exception or overrun is a failure."""
    if name == "none":
        return CheckResult.success("service 'none': not checked, always up")
    if name not in registry:
        return CheckResult.failure(f"no installed plugin provides check {name!r}")
    request = CheckRequest(target, spec, spec.options, seconds, transcript)
    result: CheckResult | None = None
    with trio.move_on_after(seconds):
        try:
            result = await registry.get(name).check(request)
        except Exception as exc:  # a buggy check must not stop the engine
            log.debug("check %s of %s raised", name, target.endpoint, exc_info=True)
            result = CheckResult.failure(f"check {name!r} failed: {type(exc).__name__}: {exc}")
    if result is None:
        return CheckResult.failure(f"timeout after {seconds:.1f} s")
    if not isinstance(result, CheckResult):
        return CheckResult.failure(f"check {name!r} returned {result!r}, not a CheckResult")
    return result


async def run_batch(
    check: Any, name: str, requests: list[CheckRequest], seconds: float
) -> list[CheckResult]:
    """Run `check.check_batch`; the check keeps its own budget, the engine the deadline."""
    results: Any = None
    with trio.move_on_after(seconds):
        try:
            results = await check.check_batch(requests)
        except Exception as exc:  # a buggy check must not stop the engine
            log.debug("batch check %s raised", name, exc_info=True)
            failure = CheckResult.failure(f"check {name!r} failed: {type(exc).__name__}: {exc}")
            return [failure] * len(requests)
    if results is None:
        return [CheckResult.failure(f"timeout after {seconds:.1f} s")] * len(requests)
    if not isinstance(results, list) or len(results) != len(requests) or not all(
            isinstance(r, CheckResult) for r in results):
        return [CheckResult.failure(f"check {name!r} returned a malformed batch")] * len(requests)
    return results


class Engine:
    """Owns every member's state and the desired table; driven by `run()`."""

    def __init__(
        self,
        config: Config,
        registry: CheckRegistry,
        *,
        apply: Callable[[DesiredTable], None],
        event: Callable[[Event], None],
        admin_store: AdminStore | None = None,
    ) -> None:
        self.registry = registry
        self._apply = apply
        self._event = event
        self._admin_store = admin_store
        self.stats = EngineStats()
        self.generation = 0
        self.table = DesiredTable(0, ())
        self._members: dict[tuple[str, str], Member] = {}
        self._by_virtual: dict[str, tuple[VirtualService, list[Member]]] = {}
        self._jobs: list[Job] = []
        self._services: dict[str, tuple[DesiredService, ...]] = {}
        self._fallback_used: dict[str, bool] = {}
        self._dirty: set[str] = set()
        self._changed = trio.Event()
        self._reloaded = trio.Event()
        #: Every drain / halt in force, also for servers absent from the current config (they
        #: get it back when a reload brings them back); what the state file holds.
        self._admin: Actions = {}
        #: Why the saved actions could not be restored at start (a damaged state file).
        self.state_problem: str | None = None
        #: trio time `run()` started: a server that has not changed state since shows this.
        self._started: float | None = None
        # Checks in flight, bounded by `concurrency`; only the scheduler waits for a slot.
        self._in_flight = 0
        self._slot_free = trio.Event()
        self.config = config
        self._build(config, carry=False)

    # ------------------------------------------------------------------ set-up and reload

    def _build(self, config: Config, *, carry: bool) -> None:
        now = trio.current_time() if carry else 0.0
        old = self._members
        members: dict[tuple[str, str], Member] = {}
        if not carry:
            self._restore_admin(config)
        for virtual in config.virtuals:
            for real in virtual.reals:
                previous = old.get((virtual.name, real.name)) if carry else None
                if previous is not None and previous.real == real and \
                        make_target(previous.virtual, previous.real) == \
                        make_target(virtual, real):
                    member = Member(virtual, real, previous.health, previous.admin,
                                    previous.feedback_percent, previous.feedback_reason,
                                    previous.agent_down)
                else:
                    member = Member(virtual, real, initial_health(config.checks.initial_state,
                                                                  now))
                member.admin = self._admin.get(member.key, Admin.ONLINE)
                members[member.key] = member
        self._members = members
        self._by_virtual = {
            v.name: (v, [members[(v.name, r.name)] for r in v.reals]) for v in config.virtuals
        }
        self.generation += 1
        self._jobs = self._make_jobs(config)
        self.config = config
        # Ordered like the config, so the table is too.
        self._services = {v.name: () for v in config.virtuals}
        self._fallback_used = {v.name: self._fallback_used.get(v.name, False) and carry
                               for v in config.virtuals}
        self._dirty = {v.name for v in config.virtuals}
        self._force_static(now)

    def _restore_admin(self, config: Config) -> None:
        """Load the saved actions; a damaged file gives every server `paths.damaged_state`."""
        if self._admin_store is None:
            return
        try:
            self._admin = self._admin_store.load()
            return
        except DamagedStateFile as exc:
            problem = str(exc)
        fallback = Admin(config.paths.damaged_state)
        self._admin = {(v.name, r.name): fallback for v in config.virtuals for r in v.reals
                       if fallback is not Admin.ONLINE}
        self.state_problem = f"{problem}: every real server starts {fallback} " \
                             f"(paths.damaged_state)"
        log.error("%s", self.state_problem)
        if self._admin:
            # Saved so that a restart keeps failing closed instead of finding no file.
            try:
                self._admin_store.save(self._admin)
            except StateFileError as err:
                log.error("%s: a restart will not find these actions", err)

    def _make_jobs(self, config: Config) -> list[Job]:
        jobs: dict[tuple[Any, ...], Job] = {}
        feedback_jobs: dict[tuple[Any, ...], Job] = {}
        for member in self._members.values():
            spec = member.real.check
            if spec.type not in ("on", "off"):
                target = make_target(member.virtual, member.real)
                key = _job_key(target, spec)
                job = jobs.get(key)
                if job is None:
                    job = jobs[key] = Job(target, spec, [], self.generation)
                job.members.append(member)
            fb = member.virtual.feedback
            if fb.type is not FeedbackType.NONE:
                target = replace(make_target(member.virtual, member.real), rport=fb.port)
                key = (fb, target.rip, spec.interval, spec.timeout)
                job = feedback_jobs.get(key)
                if job is None:
                    job = feedback_jobs[key] = Job(target, spec, [], self.generation,
                                                   feedback=True)
                job.members.append(member)
        all_jobs = [*jobs.values(), *feedback_jobs.values()]
        # Spread first runs evenly over each job's interval: no thundering herd at start.
        count = max(len(all_jobs), 1)
        for index, job in enumerate(all_jobs):
            job.interval = self._interval(job)
            job.due = job.interval * index / count
        return all_jobs

    @staticmethod
    def _interval(job: Job) -> float:
        if job.feedback:
            return job.members[0].virtual.feedback.interval or job.spec.interval
        return job.spec.interval

    def _force_static(self, now: float) -> None:
        for member in self._members.values():
            kind = member.real.check.type
            if kind in ("on", "off"):
                up = kind == "on"
                health, transition = force(member.health, up, f"check type {kind!r}", now)
                self._update(member, health, transition)

    def reload(self, config: Config) -> None:
        """Switch to a new, already validated config; unchanged servers keep their state."""
        self._build(config, carry=True)
        self._reloaded.set()
        self._changed.set()
        self._emit(Event(kind="reload", message=f"configuration reloaded: "
                         f"{len(config.virtuals)} virtual services, {len(self._members)} "
                         "real servers"))

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check and publish until cancelled."""
        self._started = trio.current_time()
        if self.state_problem:
            # Here, not at load: the sinks are configured by the time the daemon runs.
            self._emit(Event(kind="admin", severity=Severity.CRITICAL,
                             message=self.state_problem))
        async with trio.open_nursery() as nursery:
            self._changed.set()  # backends get the starting table at once, before any check
            nursery.start_soon(self._publisher)
            task_status.started()
            while True:
                self._reloaded = trio.Event()
                async with trio.open_nursery() as generation:
                    generation.start_soon(self._scheduler, generation)
                    await self._reloaded.wait()
                    generation.cancel_scope.cancel()

    async def _scheduler(self, nursery: trio.Nursery) -> None:
        start = trio.current_time()
        order = itertools.count()
        heap = [(start + job.due, next(order), job) for job in self._jobs]
        heapq.heapify(heap)
        concurrency = self.config.checks.concurrency
        lateness = self.stats.lateness
        batchable = {n for n in self.registry if isinstance(self.registry.get(n), BatchCheckType)}
        while heap:
            # Wake on a TICK grid and start everything due: one wake-up per tick instead of
            # one per check keeps the CPU cost per check low at thousands of checks a second.
            tick = math.ceil(heap[0][0] / TICK) * TICK
            await trio.sleep_until(tick)
            now = trio.current_time()
            batches: dict[tuple[str, float], list[Job]] = {}
            while heap and heap[0][0] <= now:
                due, _, job = heapq.heappop(heap)
                interval = job.interval
                next_due = due + interval
                if next_due < now:  # fell a whole interval behind: skip, do not stack up
                    next_due = now + interval
                heapq.heappush(heap, (next_due, next(order), job))
                if job.running:
                    self.stats.skipped_busy += 1
                    continue
                started = now
                if self._in_flight >= concurrency:
                    # Jobs held for a batch own slots too: start them before waiting for one.
                    self._start_batches(nursery, batches)
                    while self._in_flight >= concurrency:
                        self._slot_free = trio.Event()
                        await self._slot_free.wait()
                    started = trio.current_time()
                lateness.append(started - due)
                job.running = True
                self._in_flight += 1
                if job.feedback:
                    nursery.start_soon(self._run_feedback_job, job)
                    continue
                name, seconds = job.next_check()
                if name in batchable:
                    batches.setdefault((name, seconds), []).append(job)
                else:
                    nursery.start_soon(self._run_job, job, name, seconds)
            self._start_batches(nursery, batches)

    def _start_batches(self, nursery: trio.Nursery, batches: dict[tuple[str, float], list[Job]]
                       ) -> None:
        for (name, seconds), jobs in batches.items():
            nursery.start_soon(self._run_batch, name, seconds, jobs)
        batches.clear()

    def _finished(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            job.running = False
            self._in_flight -= 1
        self._slot_free.set()

    async def _run_job(self, job: Job, name: str, seconds: float) -> None:
        try:
            result = await run_check(self.registry, name, job.target, job.spec, seconds)
            self.stats.checks += 1
            if job.generation == self.generation:
                self.record(job.members, result)
        finally:
            self._finished((job,))

    async def _run_batch(self, name: str, seconds: float, jobs: list[Job]) -> None:
        """Jobs due in the same tick whose check type judges many servers in one call."""
        try:
            requests = [j.request(seconds) for j in jobs]
            results = await run_batch(self.registry.get(name), name, requests, seconds)
            self.stats.checks += len(jobs)
            now = trio.current_time()
            for job, result in zip(jobs, results, strict=True):
                if job.generation == self.generation:
                    self.record(job.members, result, now)
        finally:
            self._finished(jobs)

    async def _run_feedback_job(self, job: Job) -> None:
        try:
            await self._run_feedback(job)
        finally:
            self._finished((job,))

    async def _run_feedback(self, job: Job) -> None:
        fb = job.members[0].virtual.feedback
        target = job.target
        # The fetch bounds itself, so a hung agent is a reading whose reason status shows.
        if fb.type is FeedbackType.AGENT:
            reading = await read_agent(target.rip, fb.port, seconds=job.spec.timeout)
        else:
            reading = await read_http(target.rip, fb.port, fb.path,
                                      virtualhost=job.spec.virtualhost,
                                      seconds=job.spec.timeout)
        if job.generation != self.generation:
            return
        for member in job.members:
            percent, reason = apply_reading(member.feedback_percent, reading)
            agent_down = member.agent_down if reading.state is None \
                else reading.state == "down"
            if agent_down != member.agent_down:
                self._emit(Event(
                    kind="feedback", severity=Severity.WARNING if agent_down
                    else Severity.INFO,
                    message=f"{member.virtual.name}: feedback agent of {member.real.name} "
                            f"says {'down' if agent_down else 'up'}"))
            if percent != member.feedback_percent or agent_down != member.agent_down:
                self._dirty.add(member.virtual.name)
                self._changed.set()
            member.feedback_percent, member.feedback_reason = percent, reason
            member.agent_down = agent_down

    def record(
        self, members: Iterable[Member], result: CheckResult, now: float | None = None
    ) -> None:
        """Feed one check result to the state machine of every member sharing it."""
        if now is None:
            now = trio.current_time()
        if not result.up:
            self.stats.failures += 1
        for member in members:
            spec = member.real.check
            health, transition = step(member.health, result.up, result.reason, now,
                                      spec.failure_count, spec.rise)
            member.last_check = now
            self._update(member, health, transition)

    def _update(self, member: Member, health: Health, transition: Transition | None) -> None:
        member.health = health
        if transition is None:
            return
        self._dirty.add(member.virtual.name)
        self._changed.set()
        real = member.real
        severity = Severity.INFO if transition.new == "up" else Severity.WARNING
        self._emit(RealServerEvent(
            kind="real-server",
            message=f"{member.virtual.name}: real server {real.name} is {transition.new}: "
                    f"{transition.reason}",
            severity=severity,
            virtual=member.virtual.name,
            real=real.name,
            address=str(real.address),
            port=real.port,
            old_state=transition.old,
            new_state=transition.new,
            reason=transition.reason,
        ))

    def _emit(self, event: Event) -> None:
        self._event(event)

    async def _publisher(self) -> None:
        while True:
            await self._changed.wait()
            self._changed = trio.Event()
            self.publish()

    def publish(self) -> DesiredTable:
        """Recompute the changed virtual services and hand the table to the backends."""
        if not self._dirty and self.table.generation:
            return self.table
        for name in self._dirty:
            virtual, members = self._by_virtual[name]
            was_used = self._fallback_used.get(name, False)
            services, used = virtual_services(virtual, [m.view() for m in members], was_used)
            if used != was_used:
                self._emit(Event(kind="fallback", message=f"{name}: fallback server "
                                 f"{'in use' if used else 'no longer in use'}",
                                 severity=Severity.WARNING if used else Severity.INFO))
            self._fallback_used[name] = used
            self._services[name] = services
        self._dirty.clear()
        services = tuple(itertools.chain.from_iterable(self._services.values()))
        self.table = DesiredTable(self.table.generation + 1, services)
        self._apply(self.table)
        return self.table

    # ------------------------------------------------------------------ operator actions

    def members_for(self, vip: str | None, rip: str) -> list[Member]:
        """Members matching a real server (name, address or address:port) in one VIP or all.

        `vip` is a virtual service name or address (None: every VIP holding that server).
        """
        virtuals = [v for v in self.config.virtuals
                    if vip is None or vip in (v.name, str(v.address))]
        if not virtuals:
            raise EngineError(f"no virtual service named or addressed {vip!r}")
        found = [
            self._members[(v.name, r.name)] for v in virtuals for r in v.reals
            if rip in (r.name, str(r.address), f"{r.address}:{r.port}")
        ]
        if not found:
            where = f"virtual service {vip!r}" if vip else "any virtual service"
            raise EngineError(f"no real server {rip!r} in {where}")
        return found

    def set_admin(self, action: Admin, vip: str | None, rip: str) -> list[tuple[str, str]]:
        """Drain, halt or bring online; saved first, so it is applied only if it is durable.

        Raises EngineError (no such server) or StateFileError (not saved, nothing changed).
        """
        members = self.members_for(vip, rip)
        admin = dict(self._admin)
        for member in members:
            if action is Admin.ONLINE:
                admin.pop(member.key, None)
            else:
                admin[member.key] = action
        if self._admin_store is not None and admin != self._admin:
            self._admin_store.save(admin)
        self._admin = admin
        for member in members:
            if member.admin is action:
                continue
            member.admin = action
            self._dirty.add(member.virtual.name)
            self._emit(Event(kind="admin", message=f"{member.virtual.name}: real server "
                             f"{member.real.name} set {action} by operator"))
        self._changed.set()
        return [m.key for m in members]

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """Everything `lbha status` shows, JSON-ready."""
        return status_reply(
            self.config, self.table, self._members, self._fallback_used, self.stats,
            jobs=len(self._jobs), started=self._started, state_problem=self.state_problem,
        )
