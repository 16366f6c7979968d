"""One qemu VM per test session for every real-kernel IPVS test (see ipvs_vm.py).

The host has no IPVS; the guest boots Debian's stock kernel (ip_vs as modules) with the host
filesystem shared read-only, and runs the guest test modules with this repo's venv. The VM is
booted once, by the first test that needs it; the guest writes a JUnit report through a
read-write share and every host test reads its verdict from there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOOL = HERE / "ipvs_vm.py"
#: Guest test modules, run together in the one VM.
GUEST_MODULES = ("tests/vm/guest_test_ipvs.py", "tests/vm/guest_test_ipvs_netlink.py")
#: The whole guest session (boot + pytest under TCG) must finish within this.
VM_TIMEOUT = 900
#: Host tools the harness needs, and the Debian package that brings each.
TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "busybox": "busybox-static",
         "depmod": "kmod", "ipvsadm": "ipvsadm", "ip": "iproute2", "dpkg-deb": "dpkg",
         "apt-get": "apt"}


@dataclass
class GuestRun:
    returncode: int
    output: str
    #: test id (e.g. "test_foo[True]") -> None if passed, else the failure text.
    verdicts: dict[str, str | None]


def _missing_tools() -> list[str]:
    return [f"{tool} (Debian package {pkg})" for tool, pkg in TOOLS.items()
            if shutil.which(tool) is None]


def _kernel_ready() -> bool:
    out = subprocess.run([sys.executable, str(TOOL), "info"], capture_output=True, text=True,
                         timeout=60, check=False)
    return "(vmlinux: yes)" in out.stdout


def _setup_kernel() -> None:
    """Download and unpack the stock kernel into the cache dir (first use only)."""
    resolvable = subprocess.run(["apt-cache", "depends", "linux-image-amd64"],
                                capture_output=True, text=True, timeout=120, check=False)
    if "linux-image-" not in resolvable.stdout.replace("linux-image-amd64", ""):
        pytest.skip("the IPVS VM needs Debian's linux-image-amd64 package, which apt cannot "
                    "resolve here (run `apt-get update`, or use a Debian 12 machine)")
    out = subprocess.run([sys.executable, str(TOOL), "setup"], capture_output=True, text=True,
                         timeout=900, check=False)
    if out.returncode != 0:
        pytest.fail(f"IPVS VM set-up failed (rc {out.returncode}):\n{out.stdout}\n{out.stderr}")


def _verdicts(report: Path) -> dict[str, str | None]:
    verdicts: dict[str, str | None] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        problem = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        text = None
        if problem is not None:
            text = f"{problem.tag}: {problem.get('message', '')}\n{problem.text or ''}"
        name = case.get("name", "?")
        # A fixture error in teardown adds a second entry: keep the worst.
        verdicts[name] = verdicts.get(name) or text
    return verdicts


@pytest.fixture(scope="session")
def ipvs_guest(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    """Boot the VM once and run every guest test module in it."""
    if os.environ.get("IPVS_VM_GUEST") == "1":
        pytest.skip("already inside the IPVS VM")
    missing = _missing_tools()
    if missing:
        pytest.skip("the IPVS VM needs " + ", ".join(missing) +
                    "; scripts/install-system-packages installs them (as root)")
    if not _kernel_ready():
        _setup_kernel()
    reports = tmp_path_factory.mktemp("ipvs-vm")
    report = reports / "junit.xml"
    cmd = [sys.executable, str(TOOL), "run", "--rw", str(reports), "--timeout",
           str(VM_TIMEOUT), "--timing", "--cwd", str(REPO), "--",
           sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
           "addopts=-ra --strict-markers", "--junitxml", str(report), *GUEST_MODULES]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=VM_TIMEOUT + 60,
                         check=False)
    output = f"$ {' '.join(cmd)}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
    if out.returncode == 125 or not report.exists():
        pytest.fail(f"the IPVS VM did not run the guest tests (rc {out.returncode}):\n{output}")
    return GuestRun(out.returncode, output, _verdicts(report))
