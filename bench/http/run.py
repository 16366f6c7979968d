"""HTTP and HTTPS checks per second per core, lbha against curl, in the same run.

    .venv/bin/python bench/http/run.py [--count 3000] [--concurrency 50] [--reader h11]

Starts nginx on 127.0.0.1 (HTTPS with a throwaway trustme certificate) and measures, for
`GET /health` with a body match:

- lbha: `--count` checks through the engine's `run_check` (sequential, and `--concurrency`
  at a time in one trio process);
- curl, as a shell loop runs it: one `curl` process per request;
- curl, one process for all requests with `Connection: close` and `--no-sessionid`, so
  every request opens its own TCP (and full TLS) connection as a check does.

"Per core" = requests per CPU-second of the client (user + system, from getrusage), so load
on the machine does not skew the comparison; wall-clock rates are printed too. The ratio is
lbha's sequential checks per CPU-second over each curl figure. Needs nginx-light and curl
(scripts/install-system-packages). `--reader h11` runs the checks on the h11 response reader
of h11_reader.py instead of lbha's own (needs h11: pip install -e '.[test]').
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
import trustme

from lbha import http_exchange
from lbha.engine import run_check
from lbha.testing import check_spec, installed_checks, target

NGINX_CONF = """\
user root;
worker_processes 1;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
    uwsgi_temp_path {d}; scgi_temp_path {d};
    server {{
        listen 127.0.0.1:{http};
        listen 127.0.0.1:{https} ssl;
        ssl_certificate {d}/server.pem;
        ssl_certificate_key {d}/server.pem;
        location = /health {{ return 200 "OK\\n"; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def start_nginx(d: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(d / "server.pem"))
    http, https = free_port(), free_port()
    (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, http=http, https=https))
    proc = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(d), "-e",
                             str(d / "error.log"), "-c", str(d / "nginx.conf"), "-g",
                             "daemon off;"])
    deadline = time.monotonic() + 10
    for port in (http, https):
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit("nginx did not start: " + (d / "error.log").read_text())
            time.sleep(0.05)
    return proc, http, https


def lbha_rate(check: str, port: int, count: int, concurrency: int) -> tuple[float, float]:
    """(checks per CPU-second, checks per wall-second) for `count` checks."""
    registry = installed_checks()
    spec = check_spec(check, request="/health", receive="OK")
    tgt = target("127.0.0.1", port)
    failures = 0

    async def one() -> None:
        nonlocal failures
        result = await run_check(registry, check, tgt, spec, 5.0)
        failures += not result.up

    async def main() -> None:
        for first in range(0, count, concurrency):
            async with trio.open_nursery() as nursery:
                for _ in range(min(concurrency, count - first)):
                    nursery.start_soon(one)

    trio.run(one)  # warm-up: plugin loading, TLS context
    cpu0, wall0 = cpu(resource.RUSAGE_SELF), time.perf_counter()
    trio.run(main)
    used, wall = cpu(resource.RUSAGE_SELF) - cpu0, time.perf_counter() - wall0
    if failures:
        sys.exit(f"lbha {check}: {failures} of {count} checks failed")
    return count / used, count / wall


def curl_loop_rate(url: str, count: int) -> tuple[float, float]:
    """One curl process per request, as `while ...; do curl ...; done` runs it."""
    cpu0, wall0 = cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    for _ in range(count):
        out = subprocess.run(["curl", "-sfk", "-o", "/dev/null", "-H", "Connection: close",
                              url], check=False)
        if out.returncode:
            sys.exit(f"curl {url} failed: exit {out.returncode}")
    used, wall = cpu(resource.RUSAGE_CHILDREN) - cpu0, time.perf_counter() - wall0
    return count / used, count / wall


def curl_batch_rate(url: str, count: int, d: Path) -> tuple[float, float]:
    """One curl for all requests, a new connection (and full TLS handshake) for each."""
    urls = d / "urls.txt"
    urls.write_text("".join(f'url = "{url}"\noutput = "/dev/null"\n' for _ in range(count)))
    cpu0, wall0 = cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    out = subprocess.run(["curl", "-sfk", "--no-sessionid", "-H", "Connection: close",
                          "-K", str(urls)], check=False)
    used, wall = cpu(resource.RUSAGE_CHILDREN) - cpu0, time.perf_counter() - wall0
    if out.returncode:
        sys.exit(f"curl -K {urls} failed: exit {out.returncode}")
    return count / used, count / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--reader", choices=["lbha", "h11"], default="lbha",
                        help="the HTTP response parser the checks use")
    args = parser.parse_args()
    if args.reader == "h11":
        import h11_reader

        http_exchange.read_response = h11_reader.read_response
    if shutil.which("curl") is None:
        sys.exit("curl not installed")
    with tempfile.TemporaryDirectory(prefix="lbha-bench-http-") as tmp:
        d = Path(tmp)
        os.chmod(d, 0o755)
        proc, http, https = start_nginx(d)
        try:
            print(f"{os.cpu_count()} cores, {args.count} requests each, {args.reader} "
                  "response parser; rates are requests per CPU-second of the client "
                  "(per wall-second)")
            for check, port, scheme in (("http", http, "http"), ("https", https, "https")):
                url = f"{scheme}://127.0.0.1:{port}/health"
                seq = lbha_rate(check, port, args.count, 1)
                conc = lbha_rate(check, port, args.count, args.concurrency)
                loop = curl_loop_rate(url, max(args.count // 5, 100))
                batch = curl_batch_rate(url, args.count, d)
                print(f"\n{check}:")
                print(f"  lbha, sequential              {seq[0]:8.0f} /cpu-s ({seq[1]:6.0f} /s)")
                print(f"  lbha, {args.concurrency:3d} concurrent          "
                      f"{conc[0]:8.0f} /cpu-s ({conc[1]:6.0f} /s)")
                print(f"  curl, a process per request   {loop[0]:8.0f} /cpu-s ({loop[1]:6.0f} /s)"
                      f"   lbha/curl = {seq[0] / loop[0]:.1f}")
                print(f"  curl, one process, new conns  {batch[0]:8.0f} /cpu-s ({batch[1]:6.0f} /s)"
                      f"   lbha/curl = {seq[0] / batch[0]:.2f}")
        finally:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
