"""Control socket under load: `status` latency with busy, idle and silent clients.

Starts a real `lbha healthd` (check type "on": no network traffic) in a temporary directory
and measures, against its control socket:

- `sequential`: 50 `status` requests one after another (the baseline);
- `concurrent`: N threads each sending one `status` at once (the CLI's own client code,
  `lbha.control.request`), latency of each and how many failed;
- `idle`: `status` while N connections are open and send nothing;
- `non-readers`: `status` while 16 clients keep sending requests and never read a reply.

    .venv/bin/python bench/control/run.py                 # 200 clients, 3 rounds
    .venv/bin/python bench/control/run.py --clients 200 --rounds 5 --json out.json

A `status` that gets no reply within --limit seconds (default 30) counts as "> limit".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lbha.control import request
from lbha.errors import ControlError

CONFIG = """\
[paths]
run_dir = "{tmp}/run"
state_dir = "{tmp}/state"

{virtuals}
"""


def virtuals(count: int, reals: int) -> str:
    out = []
    for v in range(count):
        out.append(f'[[virtual]]\nname = "v{v}"\naddress = "198.18.1.{v + 1}"\nports = 80\n'
                   '[virtual.check]\ntype = "on"\n')
        out.extend(f'[[virtual.real]]\nname = "r{r}"\naddress = "198.18.2.{r + 1}"\n'
                   for r in range(reals))
    return "\n".join(out)


def timed_status(path: Path, limit: float) -> float:
    """Seconds one `status` took; `inf` when it failed or took longer than `limit`."""
    started = time.perf_counter()
    try:
        request(path, "status", timeout=limit)
    except ControlError:
        return float("inf")
    return time.perf_counter() - started


def summary(samples: list[float]) -> dict[str, Any]:
    ok = sorted(s for s in samples if s != float("inf"))
    if not ok:
        return {"n": len(samples), "failed": len(samples)}
    return {"n": len(samples), "failed": len(samples) - len(ok),
            "p50_ms": round(1000 * ok[len(ok) // 2], 1),
            "p99_ms": round(1000 * ok[min(len(ok) - 1, int(len(ok) * 0.99))], 1),
            "max_ms": round(1000 * ok[-1], 1)}


def sequential(path: Path, limit: float) -> list[float]:
    return [timed_status(path, limit) for _ in range(50)]


def concurrent(path: Path, clients: int, limit: float) -> list[float]:
    barrier = threading.Barrier(clients)
    results: list[float] = [float("inf")] * clients

    def one(index: int) -> None:
        barrier.wait()
        results[index] = timed_status(path, limit)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(limit + 5)
    return results


def connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def with_idle(path: Path, clients: int, limit: float) -> tuple[float, int]:
    socks = [s for s in (connect(path) for _ in range(clients)) if s is not None]
    try:
        time.sleep(0.2)
        return timed_status(path, limit), len(socks)
    finally:
        for sock in socks:
            sock.close()


def with_non_readers(path: Path, limit: float) -> float:
    socks = [s for s in (connect(path) for _ in range(16)) if s is not None]
    line = json.dumps({"cmd": "status"}).encode() + b"\n"
    try:
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            for _ in range(10_000):  # bounded: stop when the daemon stops reading
                try:
                    sock.send(line)
                except BlockingIOError:
                    break
                time.sleep(0.0005)
        return timed_status(path, limit)
    finally:
        for sock in socks:
            sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--virtuals", type=int, default=10)
    parser.add_argument("--reals", type=int, default=10)
    parser.add_argument("--limit", type=float, default=30.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lbha-bench-control-"))
    config = tmp / "lbha.toml"
    config.write_text(CONFIG.format(tmp=tmp, virtuals=virtuals(args.virtuals, args.reals)))
    path = tmp / "run" / "healthd.sock"
    log = (tmp / "healthd.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "lbha", "healthd", "--config", str(config)],
                            stdout=log, stderr=log)
    results: dict[str, Any] = {"load": os.getloadavg(), "clients": args.clients, "rounds": []}
    try:
        deadline = time.monotonic() + 20
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        status_bytes = len(json.dumps(request(path, "status")))
        print(f"status reply {status_bytes} bytes, load {os.getloadavg()[0]:.2f}")
        for round_ in range(args.rounds):
            idle, held = with_idle(path, args.clients, args.limit)
            row = {
                "sequential": summary(sequential(path, args.limit)),
                "concurrent": summary(concurrent(path, args.clients, args.limit)),
                "idle_ms": round(1000 * idle, 1), "idle_connections": held,
                "non_readers_ms": round(1000 * with_non_readers(path, args.limit), 1),
            }
            results["rounds"].append(row)
            print(f"round {round_ + 1}: {json.dumps(row)}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    results["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
