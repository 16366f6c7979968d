"""Two real heartbeat daemons, a client and an attacker in a namespace lab (tests and bench)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from cli_process import HEARTBEAT, LBHA, PYTHON

from .netns import Lab, wait_for

NODES = {"lb1": ("198.18.0.1", "2001:db8::1"), "lb2": ("198.18.0.2", "2001:db8::2")}
CLIENT = ("198.18.0.100", "2001:db8::100")
ATTACKER = ("198.18.0.66", "2001:db8::66")
VIP4, VIP6 = "198.18.0.10", "2001:db8::10"
KEY = "1 " + "5e" * 24 + "\n"


def config_text(node: str, tmp: Path, *, auto_failback: bool, keepalive: str, warntime: str,
                deadtime: str, initdead: str, extra: str = "", ipv6_link: bool = True) -> str:
    """Both nodes keep alive over IPv4 and (with `ipv6_link`) IPv6 too: two links."""
    peer = "lb2" if node == "lb1" else "lb1"
    links = 2 if ipv6_link else 1
    return f"""
[cluster]
node = "{node}"
role = "{'master' if node == 'lb1' else 'slave'}"
bind = {json.dumps(list(NODES[node][:links]))}
keepalive = "{keepalive}"
warntime = "{warntime}"
deadtime = "{deadtime}"
initdead = "{initdead}"
auth_key_file = "{tmp / 'authkeys'}"
auto_failback = {str(auto_failback).lower()}
garp_count = 3
garp_interval = "50ms"
floating_ips = ["{VIP4}", "{VIP6}"]
{extra}
[[cluster.peers]]
name = "{peer}"
addresses = {json.dumps(list(NODES[peer][:links]))}

[paths]
run_dir = "{tmp / node / 'run'}"
state_dir = "{tmp / node / 'state'}"
"""


class Pair:
    """lb1 (master) and lb2 (slave) on one bridge with a client and an attacker."""

    def __init__(self, tmp: Path, *, auto_failback: bool = True, keepalive: str = "50ms",
                 warntime: str = "150ms", deadtime: str = "300ms", initdead: str = "1s",
                 extra: str = "", log_level: str = "info", hub: bool = False,
                 ipv6_link: bool = True) -> None:
        self.tmp = tmp
        self.lab = Lab(hub=hub)
        self.log_level = log_level
        keys = tmp / "authkeys"
        keys.write_text(KEY)
        os.chmod(keys, 0o600)
        self.configs: dict[str, Path] = {}
        for node, addresses in NODES.items():
            self.lab.add_host(node, [f"{addresses[0]}/24", f"{addresses[1]}/64"])
            (tmp / node).mkdir(exist_ok=True)
            path = tmp / node / "lbha.toml"
            path.write_text(config_text(node, tmp, auto_failback=auto_failback,
                                        keepalive=keepalive, warntime=warntime,
                                        deadtime=deadtime, initdead=initdead, extra=extra,
                                        ipv6_link=ipv6_link))
            self.configs[node] = path
        self.lab.add_host("client", [f"{CLIENT[0]}/24", f"{CLIENT[1]}/64"])
        self.lab.add_host("attacker", [f"{ATTACKER[0]}/24", f"{ATTACKER[1]}/64"])
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}

    def close(self) -> None:
        self.lab.close()

    def start(self, node: str) -> subprocess.Popen[bytes]:
        proc = self.lab.start(node, [*HEARTBEAT, "--log-level",
                                     self.log_level, "heartbeat", "--config",
                                     str(self.configs[node])], self.tmp / f"{node}.log")
        self.daemons[node] = proc
        ok = wait_for(lambda: (self.tmp / node / "run" / "heartbeat.sock").exists()
                      or proc.poll() is not None, 15, 0.02)
        if not ok or proc.poll() is not None:
            raise RuntimeError(f"{node} daemon did not start:\n{self.log(node)}")
        return proc

    def log(self, node: str) -> str:
        return (self.tmp / f"{node}.log").read_text(errors="replace")

    def kill(self, node: str) -> None:
        self.lab.stop(self.daemons[node], signal.SIGKILL)

    def stop(self, node: str) -> int:
        return self.lab.stop(self.daemons[node], signal.SIGTERM)

    def link(self, node: str, up: bool) -> None:
        self.lab.ip("-n", self.lab.ns(node), "link", "set", "eth0", "up" if up else "down")

    def detach(self, node: str) -> None:
        """Silent partition: the switch port leaves the bridge; carrier stays up."""
        self.lab.ip("-n", self.lab.switch, "link", "set", "dev", f"p-{node}", "nomaster")

    def attach(self, node: str) -> None:
        self.lab.ip("-n", self.lab.switch, "link", "set", "dev", f"p-{node}", "master", "br0")

    def holds(self, node: str, address: str = VIP4) -> bool:
        return self.lab.has_address(node, address)

    def holders(self, address: str = VIP4) -> set[str]:
        return {node for node in NODES if self.holds(node, address)}

    def both_hold(self, address: str = VIP4) -> bool:
        """Whether both nodes surely held `address` at one moment.

        Reads of two namespaces are not atomic and a handoff takes a millisecond or two, so
        "lb1 then lb2" can see both across a clean handoff. Reading one node on both sides of
        a read of the other, (lb1, lb2, lb1) or (lb2, lb1, lb2), proves an overlap.
        """
        first, second = NODES
        a = self.holds(first, address)
        b = self.holds(second, address)
        a_again = self.holds(first, address)
        if a and b and a_again:
            return True
        return b and a_again and self.holds(second, address)

    def cli(self, node: str, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.lab.run(node, [*LBHA, command, "--config",
                                   str(self.configs[node]), *args])

    def status(self, node: str) -> dict[str, object]:
        result = self.cli(node, "cluster-status", "--json")
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def poke(self, address: str) -> None:
        """Client sends one datagram to `address`, so it has a neighbour entry for it."""
        family = "AF_INET6" if ":" in address else "AF_INET"
        code = (f"import socket; s = socket.socket(socket.{family}, socket.SOCK_DGRAM); "
                f"s.sendto(b'x', ('{address}', 9))")
        self.lab.run("client", [PYTHON, "-c", code])
        time.sleep(0.05)

    def client_sees(self, address: str = VIP4) -> str | None:
        return self.lab.neighbour("client", address)
