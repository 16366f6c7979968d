"""`lbha config check` and `cluster-status` on the node: floating IPs that cannot be placed or
are not held here."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cli_process import lbha

from lbha.cli import format_cluster_status as format_status

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
    return lbha("config", "check", str(path))


def test_missing_device_is_a_warning_naming_it(tmp_path: Path) -> None:
    out = config_check(tmp_path, "lbhanodev0")
    assert out.returncode == 0, out.stderr  # the file may be checked on another machine
    assert ("floating IP 198.18.0.10: device 'lbhanodev0' does not exist on this host "
            "(lbha heartbeat refuses to start on this host)") in out.stderr


def test_existing_device_passes_quietly(tmp_path: Path) -> None:
    out = config_check(tmp_path, "lo")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_cluster_status_says_what_is_not_held_and_why() -> None:
    status = {"role": "master", "state": "active", "link": "up", "node": "lb1", "peer": "lb2",
              "peer_state": "passive", "last_keepalive_age": 0.01, "floating_ips": [],
              "floating_ip_error": "floating IP 198.18.0.10: device 'eth9' does not exist on "
                                   "this host",
              "floating_ips_restored": 2, "no_carrier": ["eth0"]}
    lines = format_status(status).splitlines()
    assert lines[2:] == [
        "  floating IPs held: none",
        "  floating IPs NOT held: floating IP 198.18.0.10: device 'eth9' does not exist on "
        "this host",
        "  no carrier on eth0: cannot serve",
        "  floating IPs restored after removal: 2",
    ]
