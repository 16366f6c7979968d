"""The CLI and a real `lbha healthd` on one-real configs, to see what they print and log.

The services are layer 7 with a HAProxy socket that does not exist, so the daemon touches
no kernel table: its HAProxy backend just reports that it cannot reach HAProxy.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cli_process import LBHA, lbha

VIRTUAL = """\
[[virtual]]
name = "{name}"
layer = 7
address = "198.18.0.{host}"
ports = 80
[virtual.haproxy]
backend = "be"
socket = "{tmp}/haproxy.sock"
[[virtual.real]]
name = "r"
address = "127.0.0.1"
[virtual.check]
type = "negotiate"
service = "{service}"
port = {port}
{check}
"""


def virtual(tmp: Path, name: str, host: int, service: str, port: int, check: str = "") -> str:
    """One service checked with `service` on 127.0.0.1:`port`; `check` adds check keys."""
    return VIRTUAL.format(name=name, host=host, tmp=tmp, service=service, port=port,
                          check=check)


def write_config(tmp: Path, *virtuals: str, checks: str = "") -> Path:
    config = tmp / "lbha.toml"
    config.write_text(f'[paths]\nrun_dir = "{tmp}/run"\nstate_dir = "{tmp}/state"\n'
                      f"[checks]\n{checks}\n" + "\n".join(virtuals))
    return config


@contextmanager
def healthd(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`lbha --log-level debug healthd` on `config`, logging to `log`; stopped by PID."""
    with log.open("w") as out:
        process = subprocess.Popen(
            [*LBHA, "--log-level", "debug", "healthd", "--config",
             str(config)], stdout=out, stderr=out)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def wait_status(config: Path, done: Callable[[dict[str, Any]], bool],
                seconds: float = 20.0) -> dict[str, Any]:
    """Poll `lbha status --json` until `done(healthd status)`; that status."""
    deadline = time.monotonic() + seconds
    last: object = None
    while time.monotonic() < deadline:
        out = lbha("status", "--json", "--config", str(config))
        if out.returncode == 0:
            last = json.loads(out.stdout)["healthd"]
            assert isinstance(last, dict)
            if done(last):
                return last
        time.sleep(0.2)
    raise AssertionError(f"status not reached in {seconds} s: {last}")


def reals(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The one real server of each virtual service, by service name."""
    return {v["name"]: v["reals"][0] for v in status["virtuals"]}
