"""Built-in IPVS backend: reconciles the kernel's IPVS table with the desired table.

Reconciliation, not replay: at start, after every new desired table and every
`[ipvs] reconcile_interval` the plugin reads the kernel table over netlink, diffs
it with the desired layer-4 services (`lbha.plugins.ipvs_table`) and applies only the
difference. After a new desired table only the services that changed are read and diffed; the
periodic pass reads everything, which is what repairs manual `ipvsadm` changes.

Ownership: services in the config, and services recorded in `<state_dir>/ipvs-services.json`
(those lbha created), are lbha's; every other service in the kernel is left alone. A service
whose config was deleted is removed because it is still recorded. `cleanstop` decides whether
lbha's services are removed when healthd stops.

Netlink goes through lbha's own codec (`lbha.plugins.ipvs_netlink`): a plain blocking socket
that any thread may use, one at a time. Each reconcile is one `trio.to_thread.run_sync` call
under a single-slot limiter (read, diff and apply together), so the trio thread never blocks
on netlink and a change costs one hand-off.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import compress, count
from operator import is_not
from pathlib import Path
from typing import Any, TypeVar

import trio

from lbha import hookimpl
from lbha.atomic_file import write_atomically
from lbha.desired import DesiredService, DesiredTable
from lbha.hookspecs import DaemonContext
from lbha.hookspecs import Service as DaemonService
from lbha.model import Config, IpvsConfig
from lbha.plugins.ipvs_netlink import (
    DestDecoder,
    IpvsNetlink,
    NetlinkDecodeError,
    NetlinkError,
    request,
)
from lbha.plugins.ipvs_table import (
    AddService,
    DeleteService,
    EditService,
    Operation,
    Service,
    ServiceKey,
    Table,
    desired_service,
    diff,
    is_drift,
)

log = logging.getLogger("lbha.ipvs")

STATE_FILE = "ipvs-services.json"
#: How long a stop may spend removing lbha's services (cleanstop) before giving up.
CLEANUP_SECONDS = 5.0
#: Retry delays while netlink is unavailable: doubling from the first to the last.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0

T = TypeVar("T")


class IpvsUnavailable(Exception):
    """The kernel's IPVS cannot be reached over netlink (module, permission)."""


#: What a broken or refusing netlink socket raises.
_NETLINK_ERRORS = (OSError, NetlinkError, NetlinkDecodeError)


def _explain(exc: BaseException) -> str:
    """An operator-actionable text for a netlink failure."""
    code = exc.code if isinstance(exc, NetlinkError) else getattr(exc, "errno", None)
    if code in (errno.EPERM, errno.EACCES):
        return f"{exc} (lbha needs root or CAP_NET_ADMIN to change IPVS)"
    if code == errno.ENOENT:
        return f"{exc} (is the ip_vs kernel module available? try `modprobe ip_vs`)"
    return f"{type(exc).__name__}: {exc}"


def _op_error(op: Operation, code: int) -> str:
    if isinstance(op, AddService | EditService) and code == errno.ENOENT:
        return (f"scheduler {op.settings.scheduler!r} is not available in this kernel "
                f"(no ip_vs_{op.settings.scheduler} module)")
    return os.strerror(code)


# ------------------------------------------------------------------ kernel side (worker thread)


class KernelIpvs:
    """The kernel IPVS table over lbha's own netlink codec. One thread at a time."""

    def __init__(self) -> None:
        self._sock: IpvsNetlink | None = None

    def _socket(self) -> IpvsNetlink:
        if self._sock is None:
            try:
                self._sock = IpvsNetlink()
            except _NETLINK_ERRORS as exc:
                raise IpvsUnavailable(f"cannot open the IPVS netlink socket: "
                                      f"{_explain(exc)}") from exc
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def read(self, scope: Iterable[ServiceKey] | None = None) -> dict[ServiceKey, Service]:
        """The kernel's services (all, or those of `scope` that exist) with destinations."""
        sock = self._socket()
        try:
            table: dict[ServiceKey, Service] = {}
            if scope is None:
                services = sock.services()
                dests = sock.dests_of([key for key, _ in services], DestDecoder())
                for key, settings in services:
                    table[key] = Service(key, settings, dests[key])
            else:
                for key in scope:
                    settings, service_dests = sock.service(key)
                    if settings is not None:
                        table[key] = Service(key, settings, service_dests)
            return table
        except _NETLINK_ERRORS as exc:  # a broken socket is re-opened next time
            self.close()
            raise IpvsUnavailable(f"cannot read the IPVS table: {_explain(exc)}") from exc

    def apply(self, ops: Sequence[Operation]) -> list[tuple[Operation, str]]:
        """Apply operations in order (batched); returns those that failed, with the reason."""
        sock = self._socket()
        try:
            codes = sock.execute([request(op) for op in ops])
        except _NETLINK_ERRORS as exc:  # the socket itself broke: re-open it on the next pass
            self.close()
            raise IpvsUnavailable(f"cannot change the IPVS table: {_explain(exc)}") from exc
        failures: list[tuple[Operation, str]] = []
        not_added: set[ServiceKey] = set()
        for op, code in zip(ops, codes, strict=True):
            if not code or (isinstance(op, DeleteService) and code == errno.ESRCH):
                continue  # done, or already gone: that is what we wanted
            if op.service in not_added:
                failures.append((op, "its service could not be added"))
                continue
            failures.append((op, _op_error(op, code)))
            if isinstance(op, AddService):
                not_added.add(op.service)
        return failures

    def delete(self, keys: Iterable[ServiceKey]) -> list[tuple[Operation, str]]:
        return self.apply([DeleteService(key) for key in keys])


def sync_kernel(kernel: KernelIpvs, desired: Table, owned: frozenset[ServiceKey],
                scope: list[ServiceKey] | None, record: Callable[[], None] | None
                ) -> tuple[list[Operation], list[tuple[Operation, str]]]:
    """Read, diff and apply in one go: one hand-off to the worker thread per reconcile.

    `record` (saving the ownership record) runs after the read and before any change, so a
    kernel without IPVS records nothing and a crash cannot orphan a service.
    """
    table = kernel.read(scope)
    if record is not None:
        record()
    ops = diff(table, desired, owned, scope)
    return ops, kernel.apply(ops) if ops else []


# ------------------------------------------------------------------ ownership record


def load_owned(path: Path) -> set[ServiceKey]:
    """The services recorded as lbha's; a missing file is none, a broken one is reported."""
    try:
        data = json.loads(path.read_text())
        return {ServiceKey.from_json(item) for item in data["services"]}
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("cannot read %s (%s): IPVS services lbha created before and no longer "
                  "configured will be left in the kernel; remove them with ipvsadm -D", path,
                  exc)
        return set()


def save_owned(path: Path, owned: Iterable[ServiceKey]) -> None:
    write_atomically(path, json.dumps({"version": 1, "services": [
        key.to_json() for key in sorted(owned)]}, indent=1) + "\n")


# ------------------------------------------------------------------ the backend


@dataclass
class ReconcileResult:
    """What one reconcile pass did (for logs, tests and the benchmark)."""

    full: bool
    operations: list[Operation] = field(default_factory=list)
    drift: list[Operation] = field(default_factory=list)
    failures: list[tuple[Operation, str]] = field(default_factory=list)


class IpvsBackend:
    """Keeps the kernel's IPVS table equal to the desired layer-4 services."""

    def __init__(self, settings: IpvsConfig, state_dir: Path) -> None:
        self.settings = settings
        self.state_path = state_dir / STATE_FILE
        self.kernel = KernelIpvs()
        self._limiter = trio.CapacityLimiter(1)
        self._table: DesiredTable | None = None
        self._have_table = trio.Event()
        self._wake = trio.Event()
        #: The services of the newest table converted, and their IPVS form (None: not
        #: layer 4), position by position.
        self._services: tuple[DesiredService, ...] = ()
        self._converted: list[Service | None] = []
        self._desired: dict[ServiceKey, Service] = {}
        self._unique = True
        self._desired_generation = -1
        #: Keys whose desired state changed since the last reconcile (None: not known).
        self._dirty: set[ServiceKey] | None = None
        #: Keys whose last reconcile failed: looked at again by the next one.
        self._retry: set[ServiceKey] = set()
        #: The desired state lbha last put into the kernel, per service.
        self.applied: dict[ServiceKey, Service] = {}
        self.owned: set[ServiceKey] = load_owned(self.state_path)
        self._reported: set[str] = set()
        #: Generation of the newest desired table that reached the kernel without failures.
        self.synced_generation = 0
        self._synced = trio.Event()
        #: For `lbha status`: wall-clock time of the last full pass, repairs of changes made
        #: outside lbha, and why netlink cannot be used (None: it can).
        self.last_full: float | None = None
        self.repairs = 0
        self.unavailable: str | None = None

    async def in_worker(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn in a worker thread, one call at a time (the socket has one user)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def close(self) -> None:
        self.kernel.close()

    def configure(self, config: Config) -> None:
        self.settings = config.ipvs
        self.state_path = config.paths.state_dir / STATE_FILE

    def apply(self, table: DesiredTable) -> None:
        """Remember the newest table and wake the service; never blocks."""
        self._table = table
        self._have_table.set()
        self._wake.set()

    def desired(self) -> dict[ServiceKey, Service]:
        """The newest desired table as IPVS services, converting only services that changed.

        The engine rebuilds only the virtual services that changed and reuses the other
        DesiredService objects, so identity tells what is new; the keys of what changed are
        collected in `_dirty`, so a reconcile after a change looks at those services only.
        """
        table = self._table
        if table is None or table.generation == self._desired_generation:
            return self._desired
        if not self._patch(table.services):
            self._rebuild(table.services)
        self._services = table.services
        self._desired_generation = table.generation
        return self._desired

    def _patch(self, services: tuple[DesiredService, ...]) -> bool:
        """Update the desired table at the positions whose service changed; False when that
        cannot be done (another length, or two services with one IPVS key), and the caller
        rebuilds it, which is correct whatever this left half-done.

        In place, without copies: nothing else holds the table between two reconciles.
        """
        if len(services) != len(self._services) or not self._unique or self._dirty is None:
            return False
        converted = self._converted
        removed: list[ServiceKey] = []
        added: list[Service] = []
        # In C: a change touches one service or a few of thousands.
        for i in compress(count(), map(is_not, services, self._services)):
            new = services[i]
            before = converted[i]
            after = converted[i] = desired_service(new) if new.layer == 4 else None
            if before is not None:
                removed.append(before.key)
            if after is not None:
                added.append(after)
        desired = self._desired
        for key in removed:
            del desired[key]
        for service in added:
            if service.key in desired:
                return False
            desired[service.key] = service
        self._dirty.update(removed)
        self._dirty.update(service.key for service in added)
        return True

    def _rebuild(self, services: tuple[DesiredService, ...]) -> None:
        previous = {id(s): (s, c) for s, c in zip(self._services, self._converted, strict=True)}
        converted: list[Service | None] = []
        desired: dict[ServiceKey, Service] = {}
        for service in services:
            hit = previous.get(id(service))
            if hit is not None and hit[0] is service:
                item = hit[1]
            else:
                item = desired_service(service) if service.layer == 4 else None
            converted.append(item)
            if item is not None:
                desired.setdefault(item.key, item)
        self._converted, self._desired = converted, desired
        self._unique = len(desired) == sum(c is not None for c in converted)
        self._dirty = None  # not known: the next reconcile compares every service

    async def wait_synced(self, generation: int) -> None:
        """Wait until the desired table `generation` (or a newer one) is in the kernel."""
        while self.synced_generation < generation:
            await self._synced.wait()

    def _mark_synced(self, generation: int) -> None:
        self.synced_generation = max(self.synced_generation, generation)
        self._synced.set()
        self._synced = trio.Event()

    async def reconcile(self, full: bool = True) -> ReconcileResult:
        """Read the kernel (all of it, or the services that changed), apply the difference.

        Raises IpvsUnavailable when netlink cannot be used at all.
        """
        desired = self.desired()
        generation = self._desired_generation
        result = ReconcileResult(full)
        if not desired and not self.owned and not self.applied:
            # No layer-4 service and none left from an earlier run: IPVS is not in use here
            # (a HAProxy-only pair, perhaps on a kernel without ip_vs): nothing to read.
            self._mark_synced(generation)
            return result
        if full:
            scope = None
        else:
            candidates = (desired.keys() | self.applied.keys() if self._dirty is None
                          else self._dirty)
            # What failed last time is tried again, a failed removal included.
            scope = self._retry | {key for key in candidates
                                   if desired.get(key) is not self.applied.get(key)
                                   and desired.get(key) != self.applied.get(key)}
            if not scope:
                self._dirty = set()
                self._mark_synced(generation)
                return result
        # Only what the diff looks at: after a change, the few services in scope.
        if scope is None:
            owned = frozenset(self.owned | desired.keys())
        else:
            owned = frozenset(key for key in scope if key in self.owned or key in desired)
        new_owned = owned - self.owned
        record = partial(save_owned, self.state_path, self.owned | new_owned) if new_owned \
            else None
        ops, result.failures = await self.in_worker(
            sync_kernel, self.kernel, desired, owned, None if scope is None else sorted(scope),
            record)
        self.owned |= new_owned
        result.operations = ops
        failed = {op.service for op, _ in result.failures}
        self._dirty, self._retry = set(), failed
        for op in ops:
            if is_drift(op, self.applied, desired):
                result.drift.append(op)
        self.repairs += len(result.drift)
        if full:
            self.last_full = time.time()
        self._log(result)
        considered = desired.keys() | self.applied.keys() if scope is None else scope
        for key in considered:
            if key in failed:
                self.applied.pop(key, None)
            elif key in desired:
                self.applied[key] = desired[key]
            else:
                self.applied.pop(key, None)
        kept = {op.service for op, _ in result.failures if isinstance(op, DeleteService)}
        if scope is None:
            gone = self.owned - desired.keys() - kept
        else:
            gone = {key for key in scope if key in self.owned and key not in desired
                    and key not in kept}
        if gone:
            self.owned -= gone
            save_owned(self.state_path, self.owned)
        if not result.failures:
            self._mark_synced(generation)
        return result

    def _log(self, result: ReconcileResult) -> None:
        drift = set(map(id, result.drift))
        for op in result.operations:
            if id(op) in drift:
                log.warning("IPVS %s changed outside lbha (ipvsadm?); repairing: %s",
                            op.service, op)
            else:
                log.info("IPVS %s", op)
        reported = set()
        for op, reason in result.failures:
            message = f"IPVS: cannot {op}: {reason}"
            reported.add(message)
            if message not in self._reported:
                log.error("%s; retrying at every reconcile", message)
        if result.full:
            self._reported = reported
        else:
            self._reported |= reported

    def status(self) -> dict[str, Any] | None:
        """The kernel side as lbha last saw it, for `lbha status` (None: IPVS not in use)."""
        if not self._desired and not self.owned and self.unavailable is None:
            return None
        problems = sorted(self._reported)
        if self.unavailable is not None:
            problems.insert(0, f"netlink unavailable: {self.unavailable}")
        last = "never" if self.last_full is None else \
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.last_full))
        return {
            "in_sync": self._desired_generation >= 0 and not problems
            and self.synced_generation >= self._desired_generation,
            "services": len(self.owned),
            "last_full_reconcile": last,
            "repaired": self.repairs,
            "problems": problems,
        }

    async def clean_stop(self) -> None:
        """Remove lbha's services when `cleanstop` is set; otherwise leave them running."""
        if not self.owned:
            return
        if not self.settings.cleanstop:
            log.info("IPVS: leaving %d services in the kernel (cleanstop = false)",
                     len(self.owned))
            return
        failures = await self.in_worker(self.kernel.delete, sorted(self.owned))
        for op, reason in failures:
            log.error("IPVS: cannot %s on stop: %s", op, reason)
        self.owned = {op.service for op, _ in failures}
        save_owned(self.state_path, self.owned)
        log.info("IPVS: removed lbha's services (cleanstop)")

    async def run(self) -> None:
        """Reconcile at start, on every change and periodically, until cancelled."""
        try:
            # Nothing is touched before the engine's first table: reconciling against an
            # empty table would remove every service a previous run left (cleanstop = false).
            await self._have_table.wait()
            await self._loop()
        finally:
            with trio.move_on_after(CLEANUP_SECONDS, shield=True) as scope:
                try:
                    await self.clean_stop()
                except IpvsUnavailable as exc:
                    log.error("IPVS: cannot clean up on stop: %s", exc)
            if scope.cancelled_caught:
                log.error("IPVS: clean-up on stop took more than %.0f s; gave up",
                          CLEANUP_SECONDS)
            self.close()

    async def _loop(self) -> None:
        next_full = trio.current_time()
        retry = RETRY_FIRST
        unavailable = False
        while True:
            full = trio.current_time() >= next_full
            self._wake = trio.Event()
            try:
                await self.reconcile(full=full)
            except (IpvsUnavailable, OSError) as exc:
                # OSError: the ownership record cannot be written, so nothing may be created.
                if not unavailable:
                    log.error("IPVS: %s; retrying (backing off up to %.0f s)", exc, RETRY_MAX)
                unavailable = True
                self.unavailable = str(exc)
                next_full = trio.current_time() + retry
                retry = min(retry * 2, RETRY_MAX)
            else:
                if unavailable:
                    log.info("IPVS: netlink works again; table reconciled")
                unavailable = False
                self.unavailable = None
                retry = RETRY_FIRST
                if full:
                    next_full = trio.current_time() + self.settings.reconcile_interval
            if unavailable:
                # Back off: new tables are picked up by the next retry, which is a full pass.
                await trio.sleep_until(next_full)
            else:
                with trio.move_on_at(next_full):
                    await self._wake.wait()


# ------------------------------------------------------------------ hooks

_config: Config | None = None
_backend: IpvsBackend | None = None


@hookimpl
def lbha_configure(config: Config) -> None:
    global _config
    _config = config
    if _backend is not None:
        _backend.configure(config)


@hookimpl
def lbha_start(context: DaemonContext) -> DaemonService | None:
    global _backend
    if context.daemon != "healthd":
        return None
    config = _config or context.config
    _backend = IpvsBackend(config.ipvs, config.paths.state_dir)
    return _backend.run


@hookimpl
def lbha_apply(desired: DesiredTable) -> None:
    if _backend is not None:
        _backend.apply(desired)


@hookimpl
def lbha_status() -> dict[str, Any] | None:
    state = _backend.status() if _backend is not None else None
    return {"ipvs": state} if state is not None else None

