"""One daemon per run dir: the run lock, and a real second `lbha heartbeat` refused by it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cli_process import LBHA

from lbha.control import request
from lbha.run_lock import RunLock, RunLockError


def test_a_second_holder_is_refused_with_the_owners_pid(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run", "healthd") as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunLockError, match=rf"another lbha healthd is already running with "
                           rf"run_dir {tmp_path}/run \(pid {os.getpid()}, holding "):
            RunLock(tmp_path / "run", "healthd")
        RunLock(tmp_path / "run", "heartbeat").release()  # the other daemon has its own lock
    # Released (and emptied, never deleted): the next one takes it.
    assert lock.path.read_text() == ""
    RunLock(tmp_path / "run", "healthd").release()


def test_a_dropped_holder_releases_the_lock(tmp_path: Path) -> None:
    RunLock(tmp_path, "healthd")  # never released: the file closes when it is collected
    RunLock(tmp_path, "healthd").release()


def test_an_unusable_run_dir_is_named(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("a file")
    with pytest.raises(RunLockError, match=rf"cannot use {tmp_path}/run/healthd.pid"):
        RunLock(tmp_path / "run", "healthd")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


HEARTBEAT = """\
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
keepalive = "200ms"
warntime = "1s"
deadtime = "2s"
initdead = "60s"
[[cluster.peers]]
name = "lb2"
addresses = ["127.0.0.2"]
"""


def test_a_second_heartbeat_on_the_same_run_dir_is_refused_and_the_first_stays_reachable(
        tmp_path: Path) -> None:
    config = tmp_path / "lbha.toml"
    config.write_text(HEARTBEAT.format(tmp=tmp_path, port=free_udp_port()))
    sock = tmp_path / "run" / "heartbeat.sock"
    command = [*LBHA, "heartbeat", "--config", str(config)]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert request(sock, "status")["node"] == "lb1"
        generation = (tmp_path / "state" / "heartbeat-generation.json").read_text()
        inode = sock.stat().st_ino

        second = subprocess.run(command, capture_output=True, text=True, timeout=30,
                                check=False)
        assert second.returncode == 1
        assert f"another lbha heartbeat is already running with run_dir {tmp_path}/run (pid " \
               f"{first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        # The first one's socket, state and service are untouched.
        assert sock.stat().st_ino == inode
        assert (tmp_path / "state" / "heartbeat-generation.json").read_text() == generation
        assert request(sock, "status")["node"] == "lb1"
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=15) == 0
        log.close()
    assert not sock.exists()


@pytest.mark.parametrize("where", ["run_dir is a file", "a file at the socket path"])
def test_heartbeat_start_up_errors_are_one_clear_line(tmp_path: Path, where: str) -> None:
    config = tmp_path / "lbha.toml"
    config.write_text(HEARTBEAT.format(tmp=tmp_path, port=free_udp_port()))
    if where == "run_dir is a file":
        (tmp_path / "run").write_text("a file")
        expected = f"error: cannot use {tmp_path}/run/heartbeat.pid"
    else:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "heartbeat.sock").write_text("keep me")
        expected = f"error: {tmp_path}/run/heartbeat.sock exists and is not a socket"
    out = subprocess.run([*LBHA, "heartbeat", "--config", str(config)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 1
    assert expected in out.stderr
    assert "Traceback" not in out.stderr
