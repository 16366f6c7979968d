"""IPVS propagation and full-reconcile figures (issue 5, item 7, kernel half).

    .venv/bin/python bench/ipvs/run.py --vm            # in the qemu guest (real IPVS, TCG)
    .venv/bin/python bench/ipvs/run.py --fake-kernel   # on the host: lbha's own CPU cost only
    sudo .venv/bin/python bench/ipvs/run.py --native   # a host whose kernel has IPVS

A table of N services x M destinations is put into the kernel, then C changes are made one
at a time, as the engine makes them (one real server's weight flips in one service, the other
DesiredService objects are reused). Each change is timed from `lbha_apply` to the end of the
reconcile that put it into the kernel (netlink requests are acknowledged, so the kernel holds
it then); a sample of changes is read back independently with ipvsadm. Then a full reconcile
of the unchanged table (read everything, diff, nothing to apply) is timed a few times.

`--fake-kernel` swaps netlink for an in-memory table, to separate lbha's own work (conversion,
diff, bookkeeping, the hand-off to the worker thread) from netlink and emulation costs; it
needs no IPVS and no VM. In the guest, `ipvsadm -Ln` and `ipvsadm-save -n` of the same table
are timed too, as a same-run yardstick for the emulation's slowness. `--native` runs in a fresh
network namespace made for the run: IPVS tables are per namespace, so the host's own services
are never seen or touched (needs root, ipvsadm, and `modprobe ip_vs` done).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

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
)

REPO = Path(__file__).resolve().parents[2]


def make_service(i: int, dests: int, weights: tuple[int, ...]) -> DesiredService:
    vip = ipaddress.ip_address("198.18.0.0") + i
    return DesiredService(
        virtual=f"v{i}", layer=4, protocol="tcp", address=vip, port=80, mark=None,
        scheduler="wrr", persistence=None, persistence_netmask=None, one_packet=False,
        haproxy_backend=None, haproxy_socket=None,
        destinations=tuple(DesiredDestination(
            f"r{j}", ipaddress.ip_address("198.19.0.0") + j + 1, 80, weights[j], Forwarding.DR)
            for j in range(dests)))


class FakeKernel:
    """An in-memory stand-in for KernelIpvs (same read/apply contract)."""

    def __init__(self) -> None:
        self.table: dict[ServiceKey, Service] = {}

    def read(self, scope=None) -> dict[ServiceKey, Service]:
        keys = self.table.keys() if scope is None else [k for k in scope if k in self.table]
        return {k: Service(k, self.table[k].settings, dict(self.table[k].dests)) for k in keys}

    def apply(self, ops: list[Operation]) -> list:
        for op in ops:
            if isinstance(op, AddService | EditService):
                old = self.table.get(op.service)
                self.table[op.service] = Service(op.service, op.settings,
                                                 dict(old.dests) if old else {})
            elif isinstance(op, DeleteService):
                del self.table[op.service]
            elif isinstance(op, AddDest | EditDest):
                self.table[op.service].dests[op.dest] = op.settings  # type: ignore[index]
            elif isinstance(op, DeleteDest):
                del self.table[op.service].dests[op.dest]  # type: ignore[attr-defined]
        return []

    def delete(self, keys) -> list:
        return self.apply([DeleteService(k) for k in keys])

    def close(self) -> None:
        pass


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ipvsadm_weight(vip: str, rip: str) -> str:
    out = subprocess.run(["ipvsadm", "-Ln", "-t", f"{vip}:80"], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        if f"{rip}:80" in line:
            return line.split()[3]
    return "absent"


async def bench(args: argparse.Namespace) -> None:
    rng = random.Random(5)
    state = Path(tempfile.mkdtemp(prefix="lbha-ipvs-bench."))
    # cleanstop off: the full-reconcile part below starts from the table this part leaves.
    backend = IpvsBackend(IpvsConfig(cleanstop=False, reconcile_interval=3600), state)
    weights = [tuple([1] * args.dests) for _ in range(args.services)]
    services = [make_service(i, args.dests, weights[i]) for i in range(args.services)]
    generation = 1
    if args.fake_kernel:
        backend.kernel = FakeKernel()  # type: ignore[assignment]
    else:
        # Set-up, not measured: ipvsadm -R loads the table far faster than 11,000 requests
        # from Python under emulation; the first reconcile then finds nothing to do.
        await trio.run_process(["modprobe", "ip_vs"])
        await trio.run_process(["ipvsadm", "-R"], stdin=restore_script(services).encode())

    latencies: list[float] = []
    checked = 0
    async with trio.open_nursery() as nursery:
        # The service's own first pass (a full one, at start) is the initial reconcile.
        t0 = time.perf_counter()
        backend.apply(DesiredTable(generation, tuple(services)))
        nursery.start_soon(backend.run)
        await backend.wait_synced(generation)
        print(f"initial full reconcile: {args.services} services x {args.dests} destinations "
              f"in {time.perf_counter() - t0:.2f} s",
              flush=True)
        for n in range(args.changes):
            i = rng.randrange(args.services)
            j = rng.randrange(args.dests)
            w = list(weights[i])
            w[j] = 0 if w[j] else 1  # a real server goes down (quiescent) or comes back
            weights[i] = tuple(w)
            services[i] = make_service(i, args.dests, weights[i])
            generation += 1
            start = time.perf_counter()
            backend.apply(DesiredTable(generation, tuple(services)))
            await backend.wait_synced(generation)
            latencies.append(time.perf_counter() - start)
            if not args.fake_kernel and n % max(1, args.changes // 20) == 0:
                vip = str(ipaddress.ip_address("198.18.0.0") + i)
                rip = str(ipaddress.ip_address("198.19.0.0") + j + 1)
                got = ipvsadm_weight(vip, rip)
                assert got == str(w[j]), f"change {n}: ipvsadm shows {got}, want {w[j]}"
                checked += 1
        nursery.cancel_scope.cancel()
    ms = [v * 1000 for v in latencies]
    print(f"propagation over {len(ms)} changes: p50 {pct(ms, 50):.2f} ms, p99 {pct(ms, 99):.2f} "
          f"ms, max {max(ms):.2f} ms, mean {statistics.fmean(ms):.2f} ms "
          f"({checked} checked with ipvsadm)", flush=True)

    backend = IpvsBackend(IpvsConfig(cleanstop=True, reconcile_interval=3600), state)
    if args.fake_kernel:
        backend.kernel = FakeKernel()  # type: ignore[assignment]
        backend.kernel.table = dict(first_table(services))  # type: ignore[attr-defined]
    backend.apply(DesiredTable(generation, tuple(services)))
    times = []
    for _ in range(args.full_runs):
        start = time.perf_counter()
        result = await backend.reconcile(full=True)
        times.append(time.perf_counter() - start)
        assert not result.operations or not times[1:], result.operations[:3]
    ms = [t * 1000 for t in times[1:] or times]
    print(f"full reconcile of the unchanged table ({args.services} x {args.dests}), "
          f"{len(ms)} runs after a warm-up: median {statistics.median(ms):.1f} ms, "
          f"max {max(ms):.1f} ms", flush=True)
    if not args.fake_kernel:
        reference(args.full_runs)
        yard = await python_yardstick(args)
        print(f"yardstick: full reconcile against the in-memory kernel (lbha's Python only): "
              f"median {yard:.1f} ms", flush=True)
    await backend.clean_stop()
    backend.close()


async def python_yardstick(args: argparse.Namespace) -> float:
    """Median ms of a full reconcile of the same table against the in-memory kernel.

    Pure Python and lbha's own code, so its guest / host ratio is this run's emulation
    slowdown for the kind of work the real reconcile does.
    """
    services = [make_service(i, args.dests, (1,) * args.dests) for i in range(args.services)]
    backend = IpvsBackend(IpvsConfig(reconcile_interval=3600),
                          Path(tempfile.mkdtemp(prefix="lbha-ipvs-yardstick.")))
    backend.kernel = FakeKernel()  # type: ignore[assignment]
    backend.kernel.table = dict(first_table(services))  # type: ignore[attr-defined]
    backend.apply(DesiredTable(1, tuple(services)))
    times = []
    for _ in range(max(3, args.full_runs)):
        start = time.perf_counter()
        await backend.reconcile(full=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[1:])


def run_in_vm(args: argparse.Namespace, argv: list[str]) -> int:
    """Run this benchmark in the qemu guest; estimate native speed with the yardstick."""
    host = trio.run(python_yardstick, args)
    print(f"host load average before: {load()}", flush=True)
    print(f"host yardstick: {host:.1f} ms", flush=True)
    cmd = [sys.executable, str(REPO / "tests/vm/ipvs_vm.py"), "run", "--timing",
           "--cwd", str(REPO), "--", sys.executable, str(Path(__file__).resolve()), *argv]
    figures: dict[str, float] = {}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as guest:
        assert guest.stdout is not None
        for line in guest.stdout:
            print(line, end="", flush=True)
            for name, pattern in FIGURES.items():
                match = re.search(pattern, line)
                if match:
                    figures[name] = float(match.group(1))
    print(f"host load average after: {load()}", flush=True)
    if "yardstick" in figures:
        factor = figures["yardstick"] / host
        print(f"emulation factor for lbha's Python in this run: {factor:.1f}x; guest figures "
              f"divided by it (an estimate of native speed, not a measurement):")
        for name, value in figures.items():
            if name != "yardstick":
                print(f"  {name}: {value / factor:.2f} ms")
    return guest.returncode


#: Figures the guest prints, picked out for the native estimate.
FIGURES = {
    "change p50": r"propagation .*: p50 ([\d.]+) ms",
    "change p99": r"propagation .*, p99 ([\d.]+) ms",
    "full reconcile": r"full reconcile of the unchanged .*median ([\d.]+) ms",
    "yardstick": r"^yardstick: .*median ([\d.]+) ms",
}


def reference(runs: int) -> None:
    """The same table read by ipvsadm (C, libnl) in the same run: a yardstick for how much
    slower than native this guest is, and for what reading the table costs at all."""
    for cmd in (["ipvsadm", "-Ln"], ["ipvsadm-save", "-n"]):
        times = []
        for _ in range(max(2, runs)):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            times.append((time.perf_counter() - start) * 1000)
        print(f"reference: `{' '.join(cmd)}` of the same table: median "
              f"{statistics.median(times):.1f} ms, min {min(times):.1f} ms "
              f"({len(times)} runs, process start included)", flush=True)


def restore_script(services: list[DesiredService]) -> str:
    lines = []
    for s in services:
        lines.append(f"-A -t {s.address}:80 -s wrr")
        lines += [f"-a -t {s.address}:80 -r {d.address}:80 -g -w {d.weight}"
                  for d in s.destinations]
    return "\n".join(lines) + "\n"


def first_table(services: list[DesiredService]) -> dict[ServiceKey, Service]:
    from lbha.plugins.ipvs_table import desired_table

    return desired_table(DesiredTable(0, tuple(services)))


IN_NETNS = "LBHA_BENCH_IN_NETNS"


def in_own_netns() -> int:
    """Re-run this script inside a fresh network namespace, then remove it."""
    if not Path("/proc/net/ip_vs").exists():
        print("bench/ipvs --native: this kernel has no IPVS loaded (try `modprobe ip_vs`; "
              "without IPVS use --vm)", file=sys.stderr)
        return 2
    name = f"lbha-bench-ipvs-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return subprocess.run(["ip", "netns", "exec", name, sys.executable, *sys.argv],
                              env={**os.environ, IN_NETNS: "1"}, check=False).returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--dests", type=int, default=10)
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--full-runs", type=int, default=4)
    parser.add_argument("--fake-kernel", action="store_true")
    parser.add_argument("--vm", action="store_true",
                        help="boot the qemu VM (tests/vm/ipvs_vm.py) and run there")
    parser.add_argument("--native", action="store_true",
                        help="this host's kernel has IPVS: run in a fresh network namespace")
    args, rest = parser.parse_known_args()
    if args.vm:
        argv = [a for a in sys.argv[1:] if a != "--vm"]
        sys.exit(run_in_vm(args, argv))
    if rest:
        parser.error(f"unknown arguments {rest}")
    if args.native and not os.environ.get(IN_NETNS):
        sys.exit(in_own_netns())
    if not args.fake_kernel and os.environ.get("IPVS_VM_GUEST") != "1" \
            and not os.environ.get(IN_NETNS):
        parser.error("needs a kernel with IPVS: use --vm (qemu guest), --native (this host "
                     "has IPVS) or --fake-kernel")
    if args.fake_kernel:
        print(f"host load average before: {load()}", flush=True)
    trio.run(bench, args)
    if args.fake_kernel:
        print(f"host load average after: {load()}", flush=True)


if __name__ == "__main__":
    main()
