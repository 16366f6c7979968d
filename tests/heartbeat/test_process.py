"""`lbha heartbeat` as a process: what it logs by default, and the keepalive thread's
scheduling policy under the shipped unit's settings.

systemd is not PID 1 where these tests run, so `systemd-run` cannot apply the unit. The
equivalent: `chrt` sets what the unit's CPUScheduling* lines set (read from the unit file),
and `setpriv` drops CAP_SYS_NICE from the bounding set as the unit's CapabilityBoundingSet
does. The unit's seccomp filter (SystemCallFilter=~@resources) is not reproduced: it fails
sched_setscheduler with the same EPERM as the missing capability, and the daemon must not
need the call at all under the unit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_process import HEARTBEAT, LBHA

from .netns import Lab, unavailable, wait_for
from .pair import KEY, NODES, config_text

pytestmark = pytest.mark.netns

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "lbha-heartbeat.service"
SCHED_OTHER, SCHED_RR = 0, 2


def unit_settings() -> dict[str, str]:
    settings = {}
    for line in UNIT.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("CPUScheduling"):
            settings[key] = value.strip()
    return settings


def chrt_for(settings: dict[str, str]) -> list[str]:
    """The chrt command line that gives a process what these unit settings give it."""
    policy = settings["CPUSchedulingPolicy"]
    argv = ["chrt", f"--{policy}"]
    if settings.get("CPUSchedulingResetOnFork", "no") in ("yes", "true", "1"):
        argv.append("--reset-on-fork")
    return [*argv, settings.get("CPUSchedulingPriority", "0")]


def thread_policies(pid: int) -> dict[int, int]:
    """tid -> scheduling policy of every thread of `pid`."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "sched").read_text().splitlines():
            if line.startswith("policy"):
                out[int(task.name)] = int(line.split(":")[1])
    return out


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    reason = unavailable() or next((f"`{tool}` is not installed" for tool in ("chrt", "setpriv")
                                    if shutil.which(tool) is None), None)
    if reason:
        pytest.skip(reason)
    lab = Lab()
    try:
        lab.add_host("lb1", [f"{NODES['lb1'][0]}/24", f"{NODES['lb1'][1]}/64"])
        keys = tmp_path / "authkeys"
        keys.write_text(KEY)
        os.chmod(keys, 0o600)
        (tmp_path / "lb1").mkdir()
        (tmp_path / "lb1.toml").write_text(config_text(
            "lb1", tmp_path, auto_failback=True, keepalive="20ms", warntime="60ms",
            deadtime="100ms", initdead="1s", ipv6_link=False))
        yield lab
    finally:
        lab.close()


def run_daemon(lab: Lab, tmp_path: Path, sched: list[str]) -> tuple[dict[int, int], str]:
    """Start `lbha heartbeat` under `sched` without CAP_SYS_NICE; its threads' policies
    once the keepalive thread runs, and its log."""
    log = tmp_path / "lb1.log"
    # chrt first (it needs the capability), then setpriv drops it for the daemon.
    proc = lab.start("lb1", [*sched, "setpriv", "--bounding-set", "-sys_nice",
                             *HEARTBEAT, "--log-level", "info", "heartbeat", "--config",
                             str(tmp_path / "lb1.toml")], log)
    assert wait_for(lambda: "started" in log.read_text() or proc.poll() is not None, 15, 0.05)
    assert proc.poll() is None, log.read_text()
    # `ip netns exec` execs the daemon: the process is the daemon itself.
    assert wait_for(lambda: len(thread_policies(proc.pid)) >= 2, 5, 0.05)
    policies = thread_policies(proc.pid)
    lab.stop(proc)
    return policies, log.read_text()


def test_the_units_settings_put_every_thread_at_real_time(lab: Lab, tmp_path: Path) -> None:
    settings = unit_settings()
    assert settings["CPUSchedulingPolicy"] == "rr"
    policies, log = run_daemon(lab, tmp_path, chrt_for(settings))
    # The main thread, the keepalive thread and the worker threads alike.
    assert set(policies.values()) == {SCHED_RR}, (policies, log)
    assert "cannot take real-time priority" not in log
    assert "real-time priority (SCHED_RR 10) set by the service manager" in log


def test_reset_on_fork_is_named_when_it_leaves_threads_at_normal_priority(
    lab: Lab, tmp_path: Path,
) -> None:
    # The unit as it shipped: threads start at normal priority, and without CAP_SYS_NICE the
    # daemon cannot lift them; the warning must say why.
    policies, log = run_daemon(lab, tmp_path, ["chrt", "--rr", "--reset-on-fork", "10"])
    assert SCHED_OTHER in policies.values()
    warning = next(line for line in log.splitlines() if "real-time priority" in line)
    assert "WARNING" in warning
    assert "CPUSchedulingResetOnFork" in warning
    assert "CAP_SYS_NICE" in warning


def test_without_a_service_manager_the_daemon_takes_it_itself(
    lab: Lab, tmp_path: Path,
) -> None:
    # Root with CAP_SYS_NICE, started at normal priority (`realtime = true`, the default).
    log = tmp_path / "lb1.log"
    proc = lab.start("lb1", [*HEARTBEAT, "--log-level", "info",
                             "heartbeat", "--config", str(tmp_path / "lb1.toml")], log)
    assert wait_for(lambda: "started" in log.read_text() or proc.poll() is not None, 15, 0.05)
    assert wait_for(lambda: len(thread_policies(proc.pid)) >= 2, 5, 0.05)
    policies = thread_policies(proc.pid)
    lab.stop(proc)
    assert set(policies.values()) == {SCHED_RR}, (policies, log.read_text())


def test_lbha_heartbeat_logs_its_lifecycle_by_default(lab: Lab, tmp_path: Path) -> None:
    # As the unit runs it: `lbha heartbeat`, no --log-level. Lifecycle lines are info.
    log = tmp_path / "lb1.log"
    proc = lab.start("lb1", [*LBHA, "heartbeat", "--config",
                             str(tmp_path / "lb1.toml")], log)
    assert wait_for(lambda: "announced floating IPs" in log.read_text()
                    or proc.poll() is not None, 15, 0.05), log.read_text()
    lab.stop(proc)
    text = log.read_text()
    assert "INFO lbha.heartbeat.daemon: lbha heartbeat lb1 (master) started" in text
    assert "lb1: takeover:" in text
    assert "stopping on SIGTERM" in text
    # --log-level still wins when given.
    quiet = tmp_path / "quiet.log"
    proc = lab.start("lb1", [*LBHA, "--log-level", "warning", "heartbeat",
                             "--config", str(tmp_path / "lb1.toml")], quiet)
    assert wait_for(lambda: "takeover" in quiet.read_text() or proc.poll() is not None, 15,
                    0.05), quiet.read_text()
    lab.stop(proc)
    assert "INFO" not in quiet.read_text()


def test_the_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # The binary is not installed here; everything else in the unit must check out.
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/bin/lbha", "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if UNIT.name in line]
    assert not ours, result.stdout + result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
