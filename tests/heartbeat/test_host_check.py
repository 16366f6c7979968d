"""`lbha config check` on the node: a floating IP that cannot be placed on this host."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFIG = """
[cluster]
node = "lb1"
role = "master"
auth = "none"
floating_ips = [{{ address = "198.18.0.10/24", device = "{device}" }}]
[[cluster.peers]]
name = "lb2"
addresses = ["198.18.0.2"]
"""


def config_check(tmp_path: Path, device: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "lbha.toml"
    path.write_text(CONFIG.format(device=device))
    return subprocess.run([sys.executable, "-m", "lbha", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_missing_device_is_a_warning_naming_it(tmp_path: Path) -> None:
    out = config_check(tmp_path, "lbhanodev0")
    assert out.returncode == 0, out.stderr  # the file may be checked on another machine
    assert ("floating IP 198.18.0.10: device 'lbhanodev0' does not exist on this host "
            "(lbha heartbeat refuses to start on this host)") in out.stderr


def test_existing_device_passes_quietly(tmp_path: Path) -> None:
    out = config_check(tmp_path, "lo")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
