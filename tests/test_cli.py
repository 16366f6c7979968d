"""`lbha config check|show` as an operator runs them; how `lbha status` reads."""

from __future__ import annotations

import time
from pathlib import Path

from cli_process import lbha

from lbha.cli import format_status

GOOD = """\
[[virtual]]
name = "web"
address = "198.18.0.100"
ports = 80
[virtual.check]
service = "ftp"
login = "probe"
password = "never-shown"
[[virtual.real]]
address = "198.18.0.21"
"""


def test_config_check_good(tmp_path: Path) -> None:
    path = tmp_path / "lbha.toml"
    path.write_text(GOOD)
    out = lbha("config", "check", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{path}: OK (1 virtual services, 1 real servers)\n"


def test_config_check_bad_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "lbha.toml"
    path.write_text(GOOD.replace("ports = 80", "ports = 0") + "weight = 1e9\n")
    out = lbha("config", "check", str(path))
    assert out.returncode == 1
    assert "2 problems in configuration" in out.stderr
    assert f"{path}:4: virtual[0].ports: expected a port" in out.stderr
    assert f"{path}:11: virtual[0].real[0].weight: expected an integer" in out.stderr


def test_config_check_missing_file(tmp_path: Path) -> None:
    out = lbha("config", "check", str(tmp_path / "nope.toml"))
    assert out.returncode == 1
    assert "cannot read" in out.stderr


def test_config_show_fills_defaults_and_redacts(tmp_path: Path) -> None:
    path = tmp_path / "lbha.toml"
    path.write_text(GOOD)
    out = lbha("config", "show", str(path))
    assert out.returncode == 0, out.stderr
    assert "never-shown" not in out.stdout
    assert 'password = "****"' in out.stdout
    assert 'interval = "5s"' in out.stdout
    assert 'scheduler = "wlc"' in out.stdout


def test_usage_error_exit_code() -> None:
    assert lbha("config").returncode == 2


DATA = Path(__file__).parent / "importers" / "data"


def test_import_writes_toml_and_a_private_key_file(tmp_path: Path) -> None:
    key = tmp_path / "authkey"
    out = tmp_path / "lbha.toml"
    result = lbha("import", str(DATA / "full.cf"), "--ha-cf", str(DATA / "ha.cf"),
                  "--haresources", str(DATA / "haresources"), "--authkeys",
                  str(DATA / "authkeys"), "--authkey-out", str(key), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "note: " in result.stderr  # unsupported directives are reported, not dropped
    assert key.stat().st_mode & 0o777 == 0o600
    assert f'auth_key_file = "{key}"' in out.read_text()
    assert lbha("config", "check", str(out)).returncode == 0


def test_import_refuses_to_drop_a_key(tmp_path: Path) -> None:
    result = lbha("import", str(DATA / "full.cf"), "--ha-cf", str(DATA / "ha.cf"),
                  "--authkeys", str(DATA / "authkeys"))
    assert result.returncode == 2
    assert "--authkey-out" in result.stderr


def test_status_shows_what_each_backend_holds() -> None:
    status = {"virtuals": [], "backends": {
        "ipvs": {"in_sync": True, "services": 12, "last_full_reconcile": "2026-11-22 05:00:00",
                 "repaired": 1, "problems": []},
        "haproxy": {"in_sync": False, "sockets": 1, "backends": 2, "passes": 7,
                    "commands_sent": 30,
                    "problems": ["cannot connect to HAProxy runtime API /run/haproxy.sock"]},
    }}
    assert format_status(status).splitlines() == [
        "backend haproxy: NOT in sync  (sockets 1, backends 2, passes 7, commands sent 30)",
        "  problem: cannot connect to HAProxy runtime API /run/haproxy.sock",
        "backend ipvs: in sync  (services 12, last full reconcile 2026-11-22 05:00:00, "
        "repaired 1)",
    ]


def test_status_says_when_a_server_has_not_changed_since_the_start() -> None:
    real = {"name": "a", "address": "198.18.0.21", "port": 80, "state": "up", "admin": "online",
            "weight": 1, "configured_weight": 1, "reason": "ok", "last_check_age": 1.0}
    virtual = {"name": "web", "address": "198.18.0.100", "ports": "80", "protocol": "tcp",
               "layer": 4, "fallback_in_use": False}
    start = time.mktime((2026, 12, 4, 9, 30, 0, 0, 0, -1))
    status = {"virtuals": [{**virtual, "reals": [
        {**real, "since": start, "changed": False},
        {**real, "name": "b", "since": start + 60, "changed": True}]}],
        "state_problem": "damaged state file x; kept as y: every real server starts online"}
    lines = format_status(status).splitlines()
    assert lines[0] == "WARNING: damaged state file x; kept as y: every real server starts online"
    assert "since 2026-12-04 09:30:00 (daemon start)" in lines[2]
    assert "since 2026-12-04 09:31:00  checked" in lines[3]


def test_config_check_names_a_bad_damaged_state(tmp_path: Path) -> None:
    path = tmp_path / "lbha.toml"
    path.write_text('[paths]\ndamaged_state = "open"\n' + GOOD)
    out = lbha("config", "check", str(path))
    assert out.returncode == 1
    assert "paths.damaged_state: 'open' is not one of drain, halt, online" in out.stderr
