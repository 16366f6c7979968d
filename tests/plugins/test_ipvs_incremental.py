"""The backend's per-change path against an in-memory kernel: after every change the kernel
equals the desired table, although only the services that changed are read and diffed.

Random sequences (seeded) of weight flips, added and removed services, layer-7 services,
two virtuals with one IPVS key, reordering, several tables between two reconciles, and
injected failures; a full reconcile after each step must find nothing left to do.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import pytest

from lbha.desired import DesiredDestination, DesiredService, DesiredTable
from lbha.model import Forwarding, IpvsConfig
from lbha.plugins.ipvs import IpvsBackend
from lbha.plugins.ipvs_table import (
    AddDest,
    AddService,
    DeleteDest,
    DeleteService,
    EditDest,
    EditService,
    Operation,
    Service,
    ServiceKey,
    desired_table,
)


class MemoryKernel:
    """KernelIpvs's read/apply contract over a dict; `fail` picks operations to refuse."""

    def __init__(self) -> None:
        self.table: dict[ServiceKey, Service] = {}
        self.reads: list[list[ServiceKey] | None] = []
        self.fail: set[ServiceKey] = set()

    def read(self, scope: Collection[ServiceKey] | None = None) -> dict[ServiceKey, Service]:
        self.reads.append(None if scope is None else list(scope))
        keys = self.table.keys() if scope is None else [k for k in scope if k in self.table]
        return {k: Service(k, self.table[k].settings, dict(self.table[k].dests)) for k in keys}

    def apply(self, ops: list[Operation]) -> list[tuple[Operation, str]]:
        failures: list[tuple[Operation, str]] = []
        for op in ops:
            if op.service in self.fail:
                failures.append((op, "refused by the test"))
                continue
            match op:
                case AddService() | EditService():
                    old = self.table.get(op.service)
                    self.table[op.service] = Service(op.service, op.settings,
                                                     dict(old.dests) if old else {})
                case DeleteService():
                    del self.table[op.service]
                case AddDest() | EditDest():
                    self.table[op.service].dests[op.dest] = op.settings  # type: ignore[index]
                case DeleteDest():
                    del self.table[op.service].dests[op.dest]  # type: ignore[attr-defined]
        return failures

    def delete(self, keys: Collection[ServiceKey]) -> list[tuple[Operation, str]]:
        return self.apply([DeleteService(k) for k in keys])

    def close(self) -> None:
        pass


def service(i: int, weights: tuple[int, ...], layer: int = 4, port: int = 80) -> DesiredService:
    return DesiredService(
        virtual=f"v{i}", layer=layer, protocol="tcp",
        address=ipaddress.ip_address("198.18.0.0") + i, port=port, mark=None, scheduler="wrr",
        persistence=None, persistence_netmask=None, one_packet=False, haproxy_backend=None,
        haproxy_socket=None, destinations=tuple(
            DesiredDestination(f"r{j}", ipaddress.ip_address("198.19.0.1") + j, 80, w,
                               Forwarding.DR) for j, w in enumerate(weights)))


def mutate(rng: random.Random, services: list[DesiredService]) -> str:
    """One change as the engine or a reload makes it; returns what it did."""
    kind = rng.choice(["weight"] * 6 + ["add", "remove", "layer7", "duplicate", "reorder"])
    i = rng.randrange(len(services))
    old = services[i]
    match kind:
        case "weight":
            dests = list(old.destinations)
            j = rng.randrange(len(dests))
            dests[j] = replace(dests[j], weight=1 - dests[j].weight)
            services[i] = replace(old, destinations=tuple(dests))
        case "add":
            services.append(service(1000 + rng.randrange(50), (1, 1, 0)))
        case "remove" if len(services) > 2:
            del services[i]
        case "layer7":
            services[i] = replace(old, layer=7 if old.layer == 4 else 4)
        case "duplicate":  # another virtual that lands on an existing IPVS service
            services[i] = replace(services[rng.randrange(len(services))], virtual=f"dup{i}")
        case "reorder":
            rng.shuffle(services)
    return kind


@pytest.mark.parametrize("seed", range(6))
async def test_every_change_reaches_the_kernel_and_nothing_else_is_read(
        tmp_path: Path, seed: int):
    rng = random.Random(seed)
    backend = IpvsBackend(IpvsConfig(), tmp_path)
    kernel = MemoryKernel()
    backend.kernel = kernel  # type: ignore[assignment]
    services = [service(i, (1, 1, 1)) for i in range(30)]
    generation = 1
    backend.apply(DesiredTable(generation, tuple(services)))
    await backend.reconcile(full=True)
    for step in range(150):
        what = []
        for _ in range(rng.choice([1, 1, 1, 3])):  # sometimes several tables per reconcile
            what.append(mutate(rng, services))
            generation += 1
            backend.apply(DesiredTable(generation, tuple(services)))
        kernel.fail = {rng.choice(list(kernel.table))} if rng.random() < 0.1 else set()
        kernel.reads.clear()
        retrying = bool(backend._retry)
        result = await backend.reconcile(full=False)
        want = desired_table(DesiredTable(generation, tuple(services)))
        if kernel.fail:
            kernel.fail = set()
            continue  # the next reconcile must retry what was refused
        assert kernel.table == want, (seed, step, what)
        scoped = [scope for scope in kernel.reads if scope is not None]
        assert len(kernel.reads) == len(scoped) <= 1, "a change must not read the whole table"
        if what == ["weight"] and not retrying:  # (none if the service was layer 7)
            assert all(len(scope) == 1 for scope in scoped)
        assert not result.failures
        assert (await backend.reconcile(full=True)).operations == [], (seed, step, what)
    assert backend.owned == set(want)
