"""A throwaway lab of network namespaces: a switch namespace holding a bridge, and hosts.

Nothing touches the root namespace: each veth pair is created inside the switch namespace with
its far end moved straight into the host's namespace. Names carry a per-run prefix, so parallel
runs never collide, and clean-up deletes exactly the namespaces and processes this lab made.
With `hub=True` the bridge floods every frame to every port, so a sniffer in any namespace sees
all traffic (a mirror port on a real LAN). Addresses: 198.18.0.0/24 and 2001:db8::/64.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pyroute2 import IPRoute


def unavailable() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"lbhaprobe{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True,
                       timeout=10)
        subprocess.run(["ip", "netns", "del", probe], check=True, capture_output=True,
                       timeout=10)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"`ip netns` does not work here: {exc}"
    return None


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    """Poll `check` until it is true or `timeout` passes (bounded: never loops forever)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


class Lab:
    def __init__(self, hub: bool = False) -> None:
        self.prefix = f"lbha{os.getpid()}x{random.randrange(16**4):04x}"
        self.switch = f"{self.prefix}sw"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self._netlink: dict[str, IPRoute] = {}
        self._add_namespace(self.switch)
        # A switch forwards frames; it does not run them through netfilter (the kernel's
        # default for a bridge). With veth, that work would land in the sender's send call.
        subprocess.run(["ip", "netns", "exec", self.switch, "sysctl", "-qw",
                        "net.bridge.bridge-nf-call-iptables=0",
                        "net.bridge.bridge-nf-call-ip6tables=0",
                        "net.bridge.bridge-nf-call-arptables=0"], check=True, timeout=10)
        # A hub (MAC ageing 0) floods every frame to every port, so a sniffer sees it all.
        self.ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "ageing_time",
                "0" if hub else "30000", "stp_state", "0")
        self.ip("-n", self.switch, "link", "set", "br0", "up")

    def ns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    @staticmethod
    def ip(*args: str) -> str:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def _add_namespace(self, name: str) -> None:
        self.ip("netns", "add", name)
        self.namespaces.append(name)
        self.ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, host: str, addresses: Sequence[str]) -> str:
        """A namespace with eth0 plugged into the bridge on switch port `p-HOST`."""
        ns = self.ns(host)
        self._add_namespace(ns)
        # Keep IPv6 addresses across link down/up, like IPv4 ones (the kernel default drops them).
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                        "net.ipv6.conf.all.keep_addr_on_down=1",
                        "net.ipv6.conf.default.keep_addr_on_down=1"], check=True, timeout=10)
        port = f"p-{host}"
        self.ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", ns)
        self.ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        for address in addresses:
            extra = ["nodad"] if ":" in address else []
            self.ip("-n", ns, "addr", "add", address, "dev", "eth0", *extra)
        self.ip("-n", ns, "link", "set", "eth0", "up")
        return ns

    def netlink(self, host: str) -> IPRoute:
        if host not in self._netlink:
            self._netlink[host] = IPRoute(netns=self.ns(host))
        return self._netlink[host]

    def mac(self, host: str) -> str:
        link = self.netlink(host).get_links(ifname="eth0")[0]
        return str(link.get("IFLA_ADDRESS"))

    def has_address(self, host: str, address: str) -> bool:
        return any(a.get("IFA_ADDRESS") == address for a in self.netlink(host).get_addr())

    def neighbour(self, host: str, address: str) -> str | None:
        """The MAC `host` has for `address` (any usable state), or None."""
        for entry in self.netlink(host).get_neighbours():
            if entry.get("NDA_DST") == address and entry.get("NDA_LLADDR"):
                return str(entry.get("NDA_LLADDR"))
        return None

    def start(self, host: str, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv],
                                    stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[str],
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns(host), *argv],
                              capture_output=True, text=True, timeout=timeout)

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
             timeout: float = 10) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def close(self) -> None:
        for proc in self.processes:
            self.stop(proc, signal.SIGKILL)
        for ipr in self._netlink.values():
            ipr.close()
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        self.namespaces.clear()
