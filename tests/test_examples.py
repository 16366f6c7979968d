"""The example configs in contrib/examples validate and say what they claim to say."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbha.config import load_config
from lbha.config_show import render_config
from lbha.errors import Problem
from lbha.model import (
    Config,
    FeedbackType,
    Forwarding,
    IPAddress,
    PortRange,
    Protocol,
)
from lbha.plugin_manager import load_plugins

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "contrib" / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.toml"))

DOCUMENTATION_NETS = (
    ipaddress.ip_network("198.18.0.0/15"),
    ipaddress.ip_network("2001:db8::/32"),
    ipaddress.ip_network("127.0.0.0/8"),
)


def test_the_examples_are_there() -> None:
    names = {path.name for path in EXAMPLE_FILES}
    assert {"lbha.toml", "leostream.toml", "heartbeat-only.toml"} <= names


def test_heartbeat_only_example_is_a_pair_with_floating_ips_and_nothing_else() -> None:
    config = load_config(EXAMPLES / "heartbeat-only.toml")
    cluster = config.cluster
    assert cluster is not None
    assert config.virtuals == ()
    assert [p.name for p in cluster.peers] == ["lb2"]
    assert len(cluster.peers[0].addresses) == 2
    assert [str(f.interface) for f in cluster.floating_ips] == ["198.18.30.10/24",
                                                                "198.18.31.10/24"]
    assert cluster.floating_ips[1].device == "eth1"
    assert (cluster.keepalive, cluster.warntime, cluster.deadtime, cluster.initdead) == (
        1.0, 5.0, 10.0, 30.0)
    assert cluster.auth == "hmac-sha256"
    raw = tomllib.loads((EXAMPLES / "heartbeat-only.toml").read_text(encoding="utf-8"))
    assert set(raw) == {"cluster"}  # only the keys a heartbeat-only pair needs


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_validates_without_warnings(path: Path) -> None:
    warnings: list[Problem] = []
    config = load_config(path, warnings=warnings)  # raises ConfigError listing every problem
    assert config.virtuals or config.cluster is not None
    assert not config.allow_empty
    assert warnings == []


def _addresses(config: Config) -> Iterator[IPAddress]:
    if config.cluster is not None:
        yield from config.cluster.bind
        yield from config.cluster.ping_nodes
        for peer in config.cluster.peers:
            yield from peer.addresses
        for fip in config.cluster.floating_ips:
            yield fip.address
    for target in config.alerts.snmp.targets:
        yield target.host
    for virtual in config.virtuals:
        if virtual.address is not None:
            yield virtual.address
        if virtual.fallback is not None:
            yield virtual.fallback.address
        for real in virtual.reals:
            yield real.address


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_uses_documentation_addresses_only(path: Path) -> None:
    config = load_config(path)
    for address in _addresses(config):
        assert any(address in net for net in DOCUMENTATION_NETS), address


# ------------------------------------------------------------------ leostream.toml


def test_leostream_structure() -> None:
    config = load_config(EXAMPLES / "leostream.toml")
    assert len(config.virtuals) == 2
    gateway, broker = config.virtuals

    assert gateway.protocol is Protocol.TCP_UDP
    assert gateway.ports == tuple(
        PortRange(p, p) for p in (80, 443, 3389, 4172, 42966, 50001, 50002)
    )
    assert not gateway.all_ports
    assert gateway.forwarding is Forwarding.DR
    assert gateway.persistence == 300.0
    assert gateway.check.type == "negotiate"
    assert gateway.check.service == "https"
    assert gateway.check.check_name == "https"
    assert gateway.check.port == 443
    assert gateway.check.request == "/app/system/ping"
    assert gateway.check.receive == "OK"

    assert broker.protocol is Protocol.TCP
    assert broker.ports == (PortRange(80, 80), PortRange(443, 443))
    assert broker.forwarding is Forwarding.DR
    assert broker.check.type == "negotiate"
    assert broker.check.service == "https"
    assert broker.check.port == 443
    assert broker.check.request == "/index.pl?action=cb_status"
    assert broker.check.receive == "CB_IS_OK"

    for virtual in (gateway, broker):
        assert virtual.layer == 4
        assert virtual.address is not None
        assert virtual.address.version == 4
        assert len(virtual.reals) == 2
        assert len({real.name for real in virtual.reals}) == 2
        for real in virtual.reals:
            assert real.forwarding is Forwarding.DR
            # Each real server is checked exactly as its service says.
            assert real.check == virtual.check
    assert gateway.address != broker.address

    cluster = config.cluster
    assert cluster is not None
    assert cluster.role.value == "master"
    assert len(cluster.peers) == 1
    assert cluster.auth == "hmac-sha256"
    assert cluster.auth_key_file == Path("/etc/lbha/authkeys")


def _lbha_command() -> list[str]:
    script = Path(sys.executable).parent / "lbha"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from lbha.cli import main; sys.exit(main())"]


def test_lbha_config_check_accepts_leostream(tmp_path: Path) -> None:
    # config check also reads the key file, so point the copy at one that exists.
    key = tmp_path / "authkeys"
    key.write_text("1 " + "k" * 32 + "\n")
    key.chmod(0o600)
    config = tmp_path / "leostream.toml"
    config.write_text((EXAMPLES / "leostream.toml").read_text().replace(
        '"/etc/lbha/authkeys"', f'"{key}"'))
    proc = subprocess.run(
        [*_lbha_command(), "config", "check", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


# ------------------------------------------------------------------ lbha.toml coverage


def test_reference_config_covers_every_section() -> None:
    path = EXAMPLES / "lbha.toml"
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    assert {"cluster", "checks", "paths", "ipvs", "haproxy", "alerts", "virtual"} <= set(raw)
    # (not "serial": refused until serial links are implemented, issue 16)
    assert {"peers", "floating_ips", "auth_key_file"} <= set(raw["cluster"])
    assert {"email", "snmp"} <= set(raw["alerts"])
    assert set(raw["checks"]) == {
        "interval",
        "timeout",
        "negotiate_timeout",
        "failure_count",
        "rise",
        "quiescent",
        "concurrency",
        "initial_state",
    }

    config = load_config(path)
    virtuals = config.virtuals
    assert config.alerts.email.enabled
    assert config.alerts.snmp.enabled
    assert {v.protocol for v in virtuals} == set(Protocol)
    assert {v.layer for v in virtuals} == {4, 7}
    assert {v.family for v in virtuals} == {4, 6}
    assert {v.forwarding for v in virtuals} >= {Forwarding.DR, Forwarding.NAT}
    assert any(v.haproxy is not None for v in virtuals)
    assert any(v.mark is not None and v.protocol is Protocol.FWMARK for v in virtuals)
    assert any(v.all_ports and v.persistence for v in virtuals)
    assert any(
        v.persistence and v.persistence_netmask and any(len(r) > 1 for r in v.ports)
        for v in virtuals
    )
    assert any(v.feedback.type is FeedbackType.AGENT for v in virtuals)
    assert any(v.fallback is not None for v in virtuals)
    assert any(v.email for v in virtuals)
    check_types = {v.check.type for v in virtuals}
    assert {"negotiate", "connect", "external", "ping"} <= check_types
    services = {v.check.service for v in virtuals if v.check.type == "negotiate"}
    assert {"http", "https", "dns"} <= services
    assert any(v.check.command for v in virtuals if v.check.type == "external")
    assert any(v.check.regex for v in virtuals)
    assert any(v.check.connects_per_negotiate for v in virtuals)
    # A per-server check override differs from its service's check.
    assert any(r.check != v.check for v in virtuals for r in v.reals)


def test_reference_config_secrets_are_not_shown_by_config_show() -> None:
    shown = render_config(load_config(EXAMPLES / "lbha.toml"), load_plugins().checks)
    for secret in ("example-smtp-password", "example-community", "example-radius-secret"):
        assert secret not in shown
