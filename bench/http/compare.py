"""Interleaved A/B of HTTP check cost: lbha's response parser, h11's, and optionally the
check as an older commit wrote it, in one process against one nginx.

    .venv/bin/python bench/http/compare.py [--rounds 5] [--count 3000]
    git show 7b6158a:checks/http.py > /tmp/http_before.py
    .venv/bin/python bench/http/compare.py --before /tmp/http_before.py

run.py measures each variant once, minutes apart; on a shared, loaded machine its figures
for one variant move by a third from run to run. Here the variants take turns, `--rounds`
times, sequential and `--concurrency` at a time, and the median of each is printed, so they
see the same load. Rates are `http` checks (GET /health, body match) per CPU-second.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import h11_reader
import run
import trio

from lbha import http_exchange
from lbha.checkapi import CheckRegistry
from lbha.checks import http as http_check
from lbha.engine import run_check
from lbha.testing import check_spec, target


def load_before(path: str) -> ModuleType:
    """An older checks/http.py, loaded beside the current one."""
    spec = importlib.util.spec_from_file_location("lbha.checks.http_before", path)
    if spec is None or spec.loader is None:
        sys.exit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rate(registry: CheckRegistry, port: int, count: int, concurrency: int) -> float:
    spec = check_spec("http", request="/health", receive="OK")
    tgt = target("127.0.0.1", port)

    async def one() -> None:
        result = await run_check(registry, "http", tgt, spec, 5.0)
        if not result.up:
            sys.exit(f"check failed: {result.reason}")

    async def main() -> None:
        for first in range(0, count, concurrency):
            async with trio.open_nursery() as nursery:
                for _ in range(min(concurrency, count - first)):
                    nursery.start_soon(one)

    trio.run(one)
    cpu0 = run.cpu(resource.RUSAGE_SELF)
    trio.run(main)
    return count / (run.cpu(resource.RUSAGE_SELF) - cpu0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--before", help="an older checks/http.py to measure too")
    args = parser.parse_args()
    ours = http_exchange.read_response
    variants: dict[str, tuple[ModuleType, object]] = {
        "lbha parser": (http_check, ours), "h11 parser": (http_check, h11_reader.read_response)}
    if args.before:
        variants["before"] = (load_before(args.before), ours)
    rates: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="lbha-bench-http-") as tmp:
        d = Path(tmp)
        os.chmod(d, 0o755)
        proc, port, _ = run.start_nginx(d)
        try:
            for _ in range(args.rounds):
                for name, (module, reader) in variants.items():
                    http_exchange.read_response = reader  # type: ignore[assignment]
                    registry = CheckRegistry()
                    module.lbha_register_checks(registry)
                    for concurrency in (1, args.concurrency):
                        rates.setdefault((name, concurrency), []).append(
                            rate(registry, port, args.count, concurrency))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"http checks per CPU-second, median of {args.rounds} interleaved rounds of "
          f"{args.count} (min..max)")
    for name in variants:
        line = f"  {name:12}"
        for concurrency in (1, args.concurrency):
            values = rates[(name, concurrency)]
            line += (f"   {'sequential' if concurrency == 1 else f'{concurrency} concurrent'}"
                     f" {statistics.median(values):6.0f} ({min(values):.0f}..{max(values):.0f})")
        print(line)


if __name__ == "__main__":
    main()
