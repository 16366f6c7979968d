"""Benchmark of the HAProxy backend plugin (issue 5, item 7, HAProxy half).

A real haproxy 2.6 (Debian package) on loopback with BACKENDS x SERVERS servers; the plugin
runs as in healthd. Measures:

* propagation: time from `lbha_apply` of a table where one server changed (weight, drain,
  removal or return) to HAProxy having accepted the command (the plugin's pass finished);
  every change is then read back from HAProxy with `get weight` / `show servers state`
  by an independent client and must match (p50/p99 over --changes);
* a full reconcile of an unchanged table (all backends read and diffed, no command sent);
* the transport choice: one connection per command vs one `prompt` session.

    .venv/bin/python bench/haproxy/run.py [--backends 10 --servers 100] [--changes 1000]
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "plugins"))
from haproxy_lab import Backend, HaproxyLab, haproxy_missing

from lbha.desired import DesiredDestination, DesiredService, DesiredTable
from lbha.model import Forwarding
from lbha.plugins.haproxy import HaproxyBackendPlugin

LOOPBACK = ipaddress.ip_address("127.0.0.1")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def build_table(sock: str, backends: int, servers: int) -> DesiredTable:
    services = []
    for b in range(backends):
        dests = tuple(DesiredDestination(f"s{i}", LOOPBACK, 9, 10, Forwarding.NAT)
                      for i in range(servers))
        services.append(DesiredService(
            virtual=f"v{b}", layer=7, protocol="tcp", address=LOOPBACK, port=80, mark=None,
            scheduler="wrr", persistence=None, persistence_netmask=None, one_packet=False,
            haproxy_backend=f"be{b}", haproxy_socket=sock, destinations=dests))
    return DesiredTable(1, tuple(services))


def changed(table: DesiredTable, rng: random.Random) -> tuple[DesiredTable, str, str, str]:
    """`table` with one server changed; returns (table, backend, server, expected)."""
    index = rng.randrange(len(table.services))
    service = table.services[index]
    dests = {d.name: d for d in service.destinations}
    name = f"s{rng.randrange(len(service.destinations) + len(_removed(service)))}"
    if name not in dests:  # a removed server returns
        dests[name] = DesiredDestination(name, LOOPBACK, 9, 10, Forwarding.NAT)
        expected = "ready 10"
    else:
        kind = rng.random()
        if kind < 0.7:
            weight = rng.choice([w for w in range(1, 257) if w != dests[name].weight])
            dests[name] = replace(dests[name], weight=weight, state="up")
            expected = f"ready {weight}"
        elif kind < 0.85:
            dests[name] = replace(dests[name], weight=0, state="drain")
            expected = "drain"
        else:
            del dests[name]
            expected = "maint"
    ordered = tuple(sorted(dests.values(), key=lambda d: int(d.name[1:])))
    new_service = replace(service, destinations=ordered)
    services = (*table.services[:index], new_service, *table.services[index + 1:])
    return DesiredTable(table.generation + 1, services), service.haproxy_backend or "", name, \
        expected


_ALL_NAMES: dict[str, int] = {}


def _removed(service: DesiredService) -> list[str]:
    total = _ALL_NAMES[service.haproxy_backend or ""]
    present = {d.name for d in service.destinations}
    return [f"s{i}" for i in range(total) if f"s{i}" not in present]


def observed(lab: HaproxyLab, backend: str, server: str) -> str:
    """What HAProxy shows for one server, read by an independent client."""
    for line in lab.admin(f"show servers state {backend}").splitlines()[2:]:
        fields = line.split()
        if fields[3] == server:
            admin, weight = int(fields[6]), int(fields[7])
            if admin & 1:
                return "maint"
            return "drain" if admin & 8 else f"ready {weight}"
    return "absent"


async def propagation(lab: HaproxyLab, plugin: HaproxyBackendPlugin, table: DesiredTable,
                      changes: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    latencies = []
    mismatches = 0
    for _ in range(changes):
        table, backend, server, expected = changed(table, rng)
        start = time.perf_counter()
        plugin.apply(table)
        await plugin.wait_reconciled(table.generation)
        latencies.append(time.perf_counter() - start)
        if observed(lab, backend, server) != expected:
            mismatches += 1
    if mismatches or plugin.problems:
        raise SystemExit(f"{mismatches} changes not reflected; problems: {plugin.problems}")
    return latencies


async def full_reconcile(plugin: HaproxyBackendPlugin, rounds: int) -> list[float]:
    sent = plugin.commands_sent
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await plugin.reconcile(full=True)
        times.append(time.perf_counter() - start)
    if plugin.commands_sent != sent or plugin.problems:
        raise SystemExit("an unchanged table sent commands or met problems")
    return times


def transport(lab: HaproxyLab, count: int) -> tuple[float, float]:
    """Mean seconds per `get weight` with a connection each, and in one prompt session."""
    start = time.perf_counter()
    for _ in range(count):
        lab.admin("get weight be0/s0")
    per_connection = (time.perf_counter() - start) / count
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(lab.admin_sock))
        s.sendall(b"prompt\n")
        _read_prompt(s)
        start = time.perf_counter()
        for _ in range(count):
            s.sendall(b"get weight be0/s0\n")
            _read_prompt(s)
        in_session = (time.perf_counter() - start) / count
    return per_connection, in_session


def _read_prompt(s: socket.socket) -> bytes:
    data = b""
    for _ in range(1000):
        data += s.recv(65536)
        if data.endswith(b"\n> "):
            return data
    raise RuntimeError("no prompt")


async def measure(args: argparse.Namespace, workdir: Path) -> None:
    lab = HaproxyLab(workdir, [Backend(f"be{b}", [(f"s{i}", 9, 10) for i in range(args.servers)])
                               for b in range(args.backends)])
    lab.start()
    try:
        sock = str(lab.admin_sock)
        table = build_table(sock, args.backends, args.servers)
        for service in table.services:
            _ALL_NAMES[service.haproxy_backend or ""] = len(service.destinations)
        plugin = HaproxyBackendPlugin()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(plugin.run)
            plugin.apply(table)
            await plugin.wait_reconciled(1)
            latencies = await propagation(lab, plugin, table, args.changes, args.seed)
            nursery.cancel_scope.cancel()
        full = await full_reconcile(plugin, args.rounds)
        per_connection, in_session = transport(lab, 1000)
    finally:
        lab.stop()
    total = args.backends * args.servers
    ms = 1000.0
    print(f"haproxy 2.6, {args.backends} backends x {args.servers} servers = {total}")
    print(f"propagation over {len(latencies)} changes: p50 {percentile(latencies, .5) * ms:.2f}"
          f" ms, p99 {percentile(latencies, .99) * ms:.2f} ms, max {max(latencies) * ms:.2f} ms")
    print(f"full reconcile of the unchanged table ({args.rounds} rounds): median "
          f"{statistics.median(full) * ms:.1f} ms, max {max(full) * ms:.1f} ms")
    print(f"runtime API per command: own connection {per_connection * 1e6:.0f} us, "
          f"prompt session {in_session * 1e6:.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", type=int, default=10)
    parser.add_argument("--servers", type=int, default=100, help="servers per backend")
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20, help="full reconciles timed")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    if (reason := haproxy_missing()) is not None:
        raise SystemExit(reason)
    with tempfile.TemporaryDirectory(prefix="lbha-bench-haproxy-") as workdir:
        trio.run(measure, args, Path(workdir))


if __name__ == "__main__":
    main()
