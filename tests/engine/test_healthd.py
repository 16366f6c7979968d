"""`lbha healthd` as a process: real listeners on loopback, the CLI, signals, reload."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_process import LBHA

CONFIG = """\
[paths]
run_dir = "{tmp}/run"
state_dir = "{tmp}/state"

[checks]
interval = "200ms"
timeout = "1s"
failure_count = 2

[[virtual]]
name = "web"
address = "198.18.0.100"
ports = 80
forwarding = "nat"
[virtual.check]
type = "connect"
{reals}
"""


def real(name: str, port: int) -> str:
    return f'[[virtual.real]]\nname = "{name}"\naddress = "127.0.0.1"\nport = {port}\n'


def listener() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def lbha(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*LBHA, *args], capture_output=True, text=True,
                         timeout=30, check=False)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def wait_for(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


class Daemon:
    def __init__(self, tmp: Path, reals: str, paths: str = "") -> None:
        self.tmp = tmp
        self.config = tmp / "lbha.toml"
        self.paths = paths
        self.write(reals)
        self.log = (tmp / "healthd.log").open("w+")
        self.proc = subprocess.Popen(
            [*LBHA, "--log-level", "info", "healthd", "--config",
             str(self.config)], stderr=self.log, stdout=self.log)
        wait_for(lambda: (tmp / "run" / "healthd.sock").exists())

    def write(self, reals: str) -> None:
        text = CONFIG.format(tmp=self.tmp, reals=reals)
        self.config.write_text(text.replace("\n\n[checks]", f"\n{self.paths}\n[checks]", 1))

    def status(self) -> dict:
        out = lbha("status", "--json", "--config", str(self.config))
        return {r["name"]: r for r in json.loads(out.stdout)["healthd"]["virtuals"][0]["reals"]}

    def logs(self) -> str:
        self.log.flush()
        return (self.tmp / "healthd.log").read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=10)


@pytest.fixture
def servers() -> Iterator[list[socket.socket]]:
    socks = [listener(), listener()]
    yield socks
    for sock in socks:
        sock.close()


def test_healthd_end_to_end(tmp_path: Path, servers: list[socket.socket]) -> None:
    ports = [s.getsockname()[1] for s in servers]
    reals = real("a", ports[0]) + real("b", ports[1])
    daemon = Daemon(tmp_path, reals)
    try:
        wait_for(lambda: all(r["state"] == "up" for r in daemon.status().values()))
        status = daemon.status()
        assert status["a"]["weight"] == 1
        assert status["a"]["reason"] == f"connected to 127.0.0.1:{ports[0]}"

        servers[1].close()
        wait_for(lambda: daemon.status()["b"]["state"] == "down")
        assert daemon.status()["b"]["reason"] == f"connect to 127.0.0.1:{ports[1]} refused"
        assert daemon.status()["b"]["weight"] is None
        assert "real server b is down" in daemon.logs()

        assert lbha("drain", "web", "a", "--config", str(daemon.config)).stdout == "drain: web/a\n"
        assert daemon.status()["a"]["weight"] == 0
        state = json.loads((tmp_path / "state" / "healthd-state.json").read_text())
        assert state["admin"] == [{"virtual": "web", "real": "a", "action": "drain"}]
        bad = lbha("halt", "web", "zz", "--config", str(daemon.config), check=False)
        assert bad.returncode == 1
        assert "no real server 'zz' in virtual service 'web'" in bad.stderr

        text = lbha("status", "--config", str(daemon.config)).stdout
        assert "web  198.18.0.100:80/tcp  layer 4" in text
        assert "drain" in text
        # The IPVS backend says what it holds (here: no IPVS in this kernel, or in sync).
        assert re.search(r"^backend ipvs: (NOT )?in sync", text, re.MULTILINE), text

        # A bad config is refused and the old one keeps running.
        daemon.config.write_text(daemon.config.read_text().replace('"200ms"', '"fast"'))
        refused = lbha("reload", "--config", str(daemon.config), check=False)
        assert refused.returncode == 1
        assert "reload refused, old config kept running" in refused.stderr
        assert "checks.interval: expected a duration" in refused.stderr
        assert set(daemon.status()) == {"a", "b"}

        # SIGHUP with a good config: the new server is checked, unchanged ones keep state.
        since = daemon.status()["a"]["since"]
        extra = listener()
        daemon.write(reals + real("c", extra.getsockname()[1]))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: daemon.status().get("c", {}).get("state") == "up")
        assert daemon.status()["a"]["since"] == pytest.approx(since, abs=0.5)
        assert daemon.status()["a"]["admin"] == "drain"
        extra.close()
    finally:
        assert daemon.stop() == 0
    assert not (tmp_path / "run" / "healthd.sock").exists()
    # The operator's drain survives a restart.
    again = Daemon(tmp_path, reals)
    try:
        assert again.status()["a"]["admin"] == "drain"
    finally:
        again.stop()


def test_lbha_check_once_verbose(tmp_path: Path, servers: list[socket.socket]) -> None:
    port = servers[0].getsockname()[1]
    config = tmp_path / "lbha.toml"
    config.write_text(CONFIG.format(tmp=tmp_path, reals=real("a", port) + real("b", 1)))
    out = lbha("check", str(config), "web", "--once", "-v", check=False)
    assert out.returncode == 1  # b is down
    assert f"web a (127.0.0.1:{port}) connect: UP: connected to 127.0.0.1:{port}" in out.stdout
    assert "web b (127.0.0.1:1) connect: DOWN: connect to 127.0.0.1:1 refused" in out.stdout
    assert f"    * TCP connect to 127.0.0.1:{port}" in out.stdout
    one = lbha("check", str(config), "198.18.0.100", "a", check=False)
    assert one.returncode == 0, one.stdout


def test_status_without_daemon_says_so(tmp_path: Path) -> None:
    config = tmp_path / "lbha.toml"
    config.write_text(CONFIG.format(tmp=tmp_path, reals=real("a", 1)))
    out = lbha("status", "--config", str(config), check=False)
    assert out.returncode == 1
    assert "does not exist: is the daemon running?" in out.stderr


@pytest.mark.wallclock
def test_sigterm_stops_cleanly_within_a_second(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, real("a", 1))
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 1.0


def test_a_second_healthd_on_the_same_run_dir_is_refused_and_the_first_stays_reachable(
        tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, real("a", 1))
    sock = tmp_path / "run" / "healthd.sock"
    try:
        inode = sock.stat().st_ino
        second = lbha("healthd", "--config", str(daemon.config), check=False)
        assert second.returncode == 1
        assert f"another lbha healthd is already running with run_dir {tmp_path / 'run'} " \
               f"(pid {daemon.proc.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        # The first daemon's socket is the same file and still answers.
        assert sock.stat().st_ino == inode
        assert set(daemon.status()) == {"a"}
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0
    assert not sock.exists()
    # A clean exit releases the run dir: the next daemon starts.
    again = Daemon(tmp_path, real("a", 1))
    try:
        assert set(again.status()) == {"a"}
    finally:
        assert again.stop() == 0


def test_an_unusable_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "lbha.toml"
    config.write_text(CONFIG.format(tmp=tmp_path, reals=real("a", 1)))
    (tmp_path / "run").write_text("a file where the run dir should be")
    out = lbha("healthd", "--config", str(config), check=False)
    assert out.returncode == 1
    assert f"lbha healthd: cannot use {tmp_path}/run/healthd.pid (paths.run_dir = " \
           f"'{tmp_path}/run')" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_regular_file_at_the_socket_path_is_a_clear_error_and_kept(tmp_path: Path) -> None:
    config = tmp_path / "lbha.toml"
    config.write_text(CONFIG.format(tmp=tmp_path, reals=real("a", 1)))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "healthd.sock").write_text("not mine to delete")
    out = lbha("healthd", "--config", str(config), check=False)
    assert out.returncode == 1
    assert f"lbha healthd: {tmp_path}/run/healthd.sock exists and is not a socket" in out.stderr
    assert "Traceback" not in out.stderr
    assert (tmp_path / "run" / "healthd.sock").read_text() == "not mine to delete"


def test_a_socket_path_that_cannot_be_bound_is_named(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)  # past the 108 bytes a unix socket path may hold
    config = tmp_path / "lbha.toml"
    config.write_text(CONFIG.format(tmp=tmp_path, reals=real("a", 1))
                      .replace(f'run_dir = "{tmp_path}/run"', f'run_dir = "{deep}"'))
    out = lbha("healthd", "--config", str(config), check=False)
    assert out.returncode == 1
    assert f"lbha healthd: cannot make the control socket {deep}/healthd.sock" in out.stderr
    assert "Traceback" not in out.stderr


def test_reload_with_a_broken_config_file_says_what_is_wrong(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, real("a", 1))
    try:
        good = daemon.config.read_text()
        daemon.config.write_text(good + "\n[[virtual]\n")
        out = lbha("reload", "--config", str(daemon.config), check=False)
        assert out.returncode == 1
        assert "is the daemon running" not in out.stderr
        assert "reload refused, old config kept running" in out.stderr
        assert f"{daemon.config}:" in out.stderr
        assert "TOML" in out.stderr
        daemon.config.write_text(good)
        assert set(daemon.status()) == {"a"}
    finally:
        assert daemon.stop() == 0


def in_private_mount_namespace() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], check=False).returncode == 0


@pytest.mark.skipif(not in_private_mount_namespace(),
                    reason="needs root and unshare to mount the state dir read-only")
def test_an_action_on_a_read_only_state_dir_is_neither_applied_nor_reported_applied(
        tmp_path: Path) -> None:
    # The daemon runs in its own mount namespace where state_dir is a read-only bind mount
    # (read-only for root too); the CLI outside reaches it through the run dir.
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "lbha.toml"
    config.write_text(CONFIG.format(tmp=tmp_path, reals=real("a", 1) + real("b", 2)))
    script = (f"mount --bind {state} {state} && mount -o remount,bind,ro {state} && "
              f"exec {shlex.join(LBHA)} healthd --config {config}")
    log = (tmp_path / "healthd.log").open("w")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script], stdout=log, stderr=log)
    try:
        wait_for(lambda: (tmp_path / "run" / "healthd.sock").exists())
        out = lbha("halt", "web", "a", "--config", str(config), check=False)
        assert out.returncode == 1
        assert "cannot save operator actions" in out.stderr
        assert "Read-only file system" in out.stderr
        assert out.stdout == ""
        status = lbha("status", "--json", "--config", str(config)).stdout
        reals = json.loads(status)["healthd"]["virtuals"][0]["reals"]
        assert {r["name"]: r["admin"] for r in reals} == {"a": "online", "b": "online"}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        log.close()
    assert list(state.iterdir()) == []


def test_damaged_state_halt_fails_closed_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "healthd-state.json").write_text('{"version": 1, "admin": [{"vi')
    daemon = Daemon(tmp_path, real("a", 1), paths='damaged_state = "halt"\n')
    try:
        assert daemon.status()["a"]["admin"] == "halt"
        kept = list((tmp_path / "state").glob("healthd-state.json.damaged-*"))
        assert len(kept) == 1
        text = lbha("status", "--config", str(daemon.config)).stdout
        assert text.startswith(f"WARNING: damaged state file {tmp_path}/state/healthd-state.json")
        assert f"kept as {kept[0]}" in text
        assert "every real server starts halt (paths.damaged_state)" in text
        logged = [line for line in daemon.logs().splitlines() if f"kept as {kept[0]}" in line]
        assert logged
        assert "ERROR" in logged[0]
    finally:
        assert daemon.stop() == 0


def test_drain_and_halt_come_back_after_a_reload_without_the_servers(tmp_path: Path) -> None:
    reals = real("a", 1) + real("b", 2) + real("c", 3)
    daemon = Daemon(tmp_path, reals)
    try:
        lbha("drain", "web", "a", "--config", str(daemon.config))
        lbha("halt", "web", "b", "--config", str(daemon.config))
        daemon.write(real("c", 3))
        assert lbha("reload", "--config", str(daemon.config)).returncode == 0
        assert set(daemon.status()) == {"c"}
        daemon.write(reals)
        assert lbha("reload", "--config", str(daemon.config)).returncode == 0
        status = daemon.status()
        assert {name: r["admin"] for name, r in status.items()} == {
            "a": "drain", "b": "halt", "c": "online"}
    finally:
        assert daemon.stop() == 0
