"""Time `load_config` on a generated config of many services and real servers.

    .venv/bin/python bench/config/load.py                       # 100..4,000 services, 10,000 reals
    .venv/bin/python bench/config/load.py --services 4000 --reals 1 --profile

Prints, per size, the file size and the seconds to read and validate it (best of --repeat).
"""

from __future__ import annotations

import argparse
import cProfile
import ipaddress
import pstats
import tempfile
import time
from pathlib import Path

from lbha.config import load_config
from lbha.plugin_manager import load_plugins


def generate(services: int, reals: int) -> str:
    """`services` HTTP services on 198.18.x.y:80, each with `reals` real servers."""
    parts = []
    base = int(ipaddress.IPv4Address("198.18.0.0"))
    real_base = int(ipaddress.IPv4Address("198.19.0.0"))
    n = 0
    for i in range(services):
        parts.append(f'[[virtual]]\naddress = "{ipaddress.IPv4Address(base + i)}"\nports = 80\n'
                     '[virtual.check]\nrequest = "/health"\nreceive = "OK"\n')
        for _ in range(reals):
            parts.append(f'[[virtual.real]]\naddress = "{ipaddress.IPv4Address(real_base + n)}"\n'
                         "weight = 1\n")
            n += 1
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, nargs="*",
                        default=[100, 1000, 4000, 10000])
    parser.add_argument("--reals", type=int, default=0,
                        help="real servers per service (default: 10,000 in all)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    checks = load_plugins().checks
    with tempfile.TemporaryDirectory() as tmp:
        for services in args.services:
            reals = args.reals or max(1, 10_000 // services)
            path = Path(tmp) / "lbha.toml"
            path.write_text(generate(services, reals))
            if args.profile:
                profile = cProfile.Profile()
                profile.runcall(load_config, path, checks=checks)
                pstats.Stats(profile).sort_stats("cumulative").print_stats(15)
            best = float("inf")
            for _ in range(args.repeat):
                start = time.perf_counter()
                load_config(path, checks=checks)
                best = min(best, time.perf_counter() - start)
            print(f"{services:>6} services x {reals:>4} reals = {services * reals:>6} servers, "
                  f"{path.stat().st_size / 2**20:5.2f} MiB: {best:6.2f} s")


if __name__ == "__main__":
    main()
