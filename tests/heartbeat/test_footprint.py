"""The heartbeat process carries no check library and no backend (DESIGN.md: it loads event
plugins only). Asked of a real running heartbeat: its sys.modules, written when it exits."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from cli_process import PYTHON

from lbha.control import request

CONFIG = """\
[paths]
run_dir = "{tmp}/run"
state_dir = "{tmp}/state"

# No floating IPs and a long initdead: nothing is added to the host's addresses.
[cluster]
node = "lb1"
role = "master"
auth = "none"
udp_port = {port}
bind = ["127.0.0.1"]
realtime = false
initdead = "60s"
[[cluster.peers]]
name = "lb2"
addresses = ["127.0.0.2"]

# A service with a check whose library (ldap3) the heartbeat must not import, a check type
# no installed plugin provides (healthd's to judge, not the heartbeat's) and an IPVS backend.
# Firewall-mark services: no VIP, so no floating IP to place on this host.
[[virtual]]
name = "directory"
protocol = "fwmark"
mark = 1
[virtual.check]
type = "negotiate"
service = "ldap"
[[virtual.real]]
address = "198.18.1.1"

[[virtual]]
name = "cache"
protocol = "fwmark"
mark = 2
[virtual.check]
type = "negotiate"
service = "redis"
[[virtual.real]]
address = "198.18.1.2"
"""

#: Modules of check libraries, of checks and of the backends; pyroute2's families the
#: heartbeat does not use (its package __init__ imports them all).
FORBIDDEN = ("pyroute2.ndb", "pyroute2.ipdb", "pyroute2.conntrack", "pyroute2.nftables",
             "ldap3", "pymysql", "dns", "pyrad", "pysnmp", "aiosmtplib", "cryptography",
             "lbha.checks", "lbha.plugins.ipvs", "lbha.plugins.haproxy", "lbha.engine",
             "lbha.healthd", "lbha.cli")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: The heartbeat program (python -m lbha.heartbeat), writing its sys.modules to argv[1] at exit.
PROGRAM = """\
import atexit, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
from lbha.heartbeat.cli import main
sys.exit(main())
"""


def test_heartbeat_imports_no_check_library_nor_backend(tmp_path: Path) -> None:
    config = tmp_path / "lbha.toml"
    config.write_text(CONFIG.format(tmp=tmp_path, port=free_udp_port()))
    sock = tmp_path / "run" / "heartbeat.sock"
    modules_file = tmp_path / "modules"
    argv = [PYTHON, "-P", "-c", PROGRAM, str(modules_file), "heartbeat", "--config", str(config)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert request(sock, "status")["node"] == "lb1"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr[-2000:]
    modules = set(modules_file.read_text().split())
    assert "lbha.heartbeat.daemon" in modules
    assert "lbha.plugins.log_sink" in modules  # the event plugins are loaded
    bad = sorted(m for m in modules
                 if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"the heartbeat imported {bad}"
