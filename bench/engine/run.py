"""Benchmark of the health-check engine (issue 3, item 10).

10,000 real servers (1,000 virtual services x 10, every one its own loopback address
127.x.y.z) checked with `connect` every 5 s. Reports CPU % of one core and peak RSS of the
engine process over a steady window, lateness of checks against their schedule (p50/p99), and
the time from 100 servers going away to their state change.

    sudo .venv/bin/python bench/engine/run.py [--servers 10000] [--window 60]

As root it runs inside a network namespace of its own (only `lo`, removed afterwards), so
the listener it binds to the wildcard address is reachable from nowhere else.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

import trio

from lbha.config import load_config_text
from lbha.desired import DesiredTable
from lbha.engine import Engine
from lbha.events import Event, RealServerEvent
from lbha.plugin_manager import load_plugins

VICTIMS = 100


def listener_process(port: int) -> subprocess.Popen[bytes]:
    """A separate process accepting and closing connections, so its CPU is not counted."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('0.0.0.0', {port})); s.listen(4096); print('ready', flush=True)\n"
        "while True:\n"
        "    c,_=s.accept(); c.close()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def address(index: int) -> str:
    return f"127.{1 + index // (256 * 254)}.{index // 254 % 256}.{index % 254 + 1}"


def make_config(servers: int, port: int, victim_port: int, interval: str) -> str:
    lines = [f'[checks]\ninterval = "{interval}"\ntimeout = "3s"\nfailure_count = 2\n'
             "concurrency = 512\n"]
    for v in range(servers // 10):
        lines.append(f'[[virtual]]\nname = "v{v}"\naddress = "198.18.{v // 256}.{v % 256}"\n'
                     'ports = 80\nforwarding = "nat"\n[virtual.check]\ntype = "connect"\n')
        for r in range(10):
            index = v * 10 + r
            rport = victim_port if index < VICTIMS else port
            lines.append(f'[[virtual.real]]\nname = "r{r}"\naddress = "{address(index + 1)}"\n'
                         f"port = {rport}\n")
    return "\n".join(lines)


def rss_peak_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else 0.0


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    port, victim_port = free_port(), free_port()
    listener = listener_process(port)
    victim = listener_process(victim_port)
    try:
        started = time.monotonic()
        plugins = load_plugins()
        config = load_config_text(make_config(args.servers, port, victim_port, args.interval),
                                  checks=plugins.checks)
        loaded = time.monotonic() - started
        downs: dict[str, float] = {}
        all_down = trio.Event()
        tables: list[DesiredTable] = []

        def on_event(event: Event) -> None:
            if isinstance(event, RealServerEvent) and event.new_state == "down":
                downs.setdefault(f"{event.virtual}/{event.real}", trio.current_time())
                if len(downs) >= VICTIMS:
                    all_down.set()

        engine = Engine(config, plugins.checks, apply=tables.append, event=on_event)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            ready = time.monotonic() - started
            await trio.sleep(args.warmup)
            engine.stats.lateness.clear()
            checks0, cpu0, wall0 = engine.stats.checks, cpu_seconds(), time.monotonic()
            await trio.sleep(args.window)
            elapsed = time.monotonic() - wall0
            user, system = (b - a for a, b in zip(cpu0, cpu_seconds(), strict=True))
            cpu = (user + system) / elapsed * 100
            checks = engine.stats.checks - checks0
            lateness = list(engine.stats.lateness)
            up = sum(1 for s in engine.table.services for d in s.destinations if d.weight)
            gone_at = trio.current_time()
            victim.kill()
            victim.wait()
            with trio.move_on_after(float(args.interval.rstrip("s")) * 3 + 5):
                await all_down.wait()
            detection = [t - gone_at for t in downs.values()]
            nursery.cancel_scope.cancel()
    finally:
        for proc in (listener, victim):
            proc.kill()
            proc.wait()
    return {
        "servers": args.servers,
        "interval": args.interval,
        "config_load_s": round(loaded, 2),
        "start_to_running_s": round(ready, 2),
        "window_s": args.window,
        "servers_up_in_table": up,
        "checks_per_s": round(checks / args.window, 1),
        "cpu_percent_of_one_core": round(cpu, 1),
        "cpu_user_percent": round(user / args.window * 100, 1),
        "cpu_system_percent": round(system / args.window * 100, 1),
        "rss_peak_mb": round(rss_peak_mb(), 1),
        "lateness_p50_ms": round(percentile(lateness, 0.5) * 1000, 2),
        "lateness_p99_ms": round(percentile(lateness, 0.99) * 1000, 2),
        "skipped_busy": engine.stats.skipped_busy,
        "victims_detected": len(detection),
        "detection_p50_s": round(percentile(detection, 0.5), 2),
        "detection_max_s": round(max(detection, default=float("nan")), 2),
    }


def in_own_netns() -> None:
    """Re-run this script inside a fresh network namespace (as root), then remove it."""
    name = f"lbha-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        env = {**os.environ, "LBHA_BENCH_IN_NETNS": "1"}
        code = subprocess.run(["ip", "netns", "exec", name, sys.executable, *sys.argv],
                              env=env, check=False).returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    sys.exit(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=10_000)
    parser.add_argument("--interval", default="5s")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=60.0)
    args = parser.parse_args()
    if os.geteuid() == 0 and shutil.which("ip") and not os.environ.get("LBHA_BENCH_IN_NETNS"):
        in_own_netns()
    result = trio.run(bench, args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
