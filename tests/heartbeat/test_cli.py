"""Heartbeat commands of the `lbha` CLI and the heartbeat program: parsing, status text,
errors when the daemon is away."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_process import lbha

from lbha.cli import build_parser, cluster_status_json
from lbha.cli import format_cluster_status as format_status
from lbha.config import load_config_text
from lbha.errors import ControlError
from lbha.logs import log_level

STATUS = {
    "node": "lb2", "role": "slave", "state": "passive", "link": "up", "peer": "lb1",
    "peer_state": "active", "last_keepalive_age": 0.0123, "floating_ips": [],
    "frames_dropped": {"bad_mac": 3},
}


def test_commands_parse() -> None:
    args = build_parser().parse_args(["cluster-status", "--json", "--config", "x.toml"])
    assert args.json
    assert args.config == Path("x.toml")
    for command in ("heartbeat", "takeover", "standby"):
        assert callable(build_parser().parse_args([command]).func)


def test_status_text() -> None:
    text = format_status(STATUS)
    assert text.splitlines()[0] == "Slave  Passive  Link up"
    assert "peer lb1 (active), last keepalive 0.012s ago" in text
    assert "floating IPs held: none" in text
    assert "bad_mac 3" in text
    active = format_status({**STATUS, "role": "master", "state": "active",
                            "floating_ips": ["198.18.0.10"], "last_keepalive_age": None})
    assert active.startswith("Master  Active  Link up")
    assert "198.18.0.10" in active
    assert "last keepalive never" in active


def test_status_without_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = f"""
[cluster]
node = "lb1"
role = "master"
auth = "none"
[[cluster.peers]]
name = "lb2"
addresses = ["198.18.0.2"]
[paths]
run_dir = "{tmp_path}"
"""
    with pytest.raises(ControlError, match="is the daemon running"):
        cluster_status_json(load_config_text(text))
    config = tmp_path / "lbha.toml"
    config.write_text(text)
    args = build_parser().parse_args(["cluster-status", "--config", str(config)])
    assert args.func(args) == 1
    assert "is the daemon running" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("timers", "message"),
    [('keepalive = "200ms"\nwarntime = "100ms"\ndeadtime = "1s"', "keepalive < warntime"),
     ('keepalive = "50ms"\nwarntime = "400ms"\ndeadtime = "300ms"', "keepalive < warntime"),
     ('keepalive = "50ms"\nwarntime = "150ms"\ndeadtime = "300ms"\ninitdead = "100ms"',
      "initdead")],
)
def test_timer_order_is_enforced_by_config(timers: str, message: str) -> None:
    from lbha.errors import ConfigError

    text = f"""
[cluster]
node = "lb1"
role = "master"
auth = "none"
{timers}
[[cluster.peers]]
name = "lb2"
addresses = ["198.18.0.2"]
"""
    with pytest.raises(ConfigError, match=message):
        load_config_text(text)


def test_sub_second_timers_load() -> None:
    config = load_config_text("""
[cluster]
node = "lb1"
role = "master"
auth = "none"
keepalive = "20ms"
warntime = "60ms"
deadtime = "100ms"
initdead = "1s"
[[cluster.peers]]
name = "lb2"
addresses = ["198.18.0.2"]
""")
    assert config.cluster is not None
    assert (config.cluster.keepalive, config.cluster.deadtime) == (0.02, 0.1)


@pytest.mark.parametrize(("argv", "level"), [
    (["heartbeat"], "info"),
    (["healthd"], "info"),
    (["--log-level", "warning", "heartbeat"], "warning"),
    (["--log-level", "debug", "healthd"], "debug"),
    (["config", "check"], "warning"),
    (["cluster-status"], "warning"),
])
def test_daemons_log_their_lifecycle_unless_told_otherwise(argv: list[str], level: str) -> None:
    # `lbha --log-level` defaulted to warning for every command, so `lbha heartbeat` under
    # the unit never logged that it started, took over or stood by.
    assert log_level(build_parser().parse_args(argv)) == level


def test_python_m_lbha_heartbeat_has_the_same_defaults() -> None:
    from lbha.heartbeat.cli import build_parser as heartbeat_parser

    assert log_level(heartbeat_parser().parse_args(["heartbeat"])) == "info"
    assert log_level(heartbeat_parser().parse_args(["check-host"])) == "warning"
    assert log_level(heartbeat_parser().parse_args(["--log-level", "error", "heartbeat"])) \
        == "error"


def test_a_serial_link_is_refused_at_config_check_and_at_start(tmp_path: Path) -> None:
    # It used to be accepted and ignored: a pair cabled only by serial started with both
    # nodes active, and nothing said so.
    config = tmp_path / "lbha.toml"
    config.write_text(f"""
[paths]
run_dir = "{tmp_path}/run"
state_dir = "{tmp_path}/state"
[cluster]
node = "lb1"
role = "master"
auth = "none"
realtime = false
[[cluster.peers]]
name = "lb2"
addresses = ["127.0.0.2"]
[cluster.serial]
device = "/dev/ttyS0"
""")
    for argv in (["config", "check", str(config)], ["heartbeat", "--config", str(config)]):
        out = lbha(*argv)
        assert out.returncode == 1, (argv, out.stderr)
        assert "cluster.serial: serial heartbeat links are not implemented yet (issue 16)" \
            in out.stderr, argv
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "heartbeat.sock").exists()
