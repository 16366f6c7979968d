"""Good configs load into the expected model; show round-trips; plugin options are validated."""

from __future__ import annotations

import ipaddress
from types import MappingProxyType

import pytest

from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec
from lbha.config import load_config_text
from lbha.config_show import render_config
from lbha.durations import format_duration, parse_duration
from lbha.errors import ConfigError, Problem
from lbha.model import Forwarding, PortRange, Protocol, Role
from lbha.testing import installed_checks

FULL = """\
[cluster]
node = "lb1"
role = "slave"
auth_key_file = "/etc/lbha/authkey"
keepalive = "200ms"
deadtime = "2s"
floating_ips = ["198.18.0.50/24", { address = "2001:db8::50/64", device = "eth1" }]
[[cluster.peers]]
name = "lb2"
addresses = ["198.18.0.2", "2001:db8::2"]

[checks]
failure_count = 3
quiescent = true

[[virtual]]
name = "gateway"
address = "198.18.0.100"
ports = [80, 443, "50001-50002"]
protocol = "tcp+udp"
persistence = "300s"
persistence_netmask = 24
[virtual.check]
service = "https"
port = 443
request = "/app/system/ping"
receive = "OK"
password = "s3cret-pw"
[[virtual.real]]
address = "198.18.0.21"
weight = 100
[[virtual.real]]
name = "gw2"
address = "198.18.0.22"
max_connections = 500
[virtual.real.check]
receive = "FINE"

[[virtual]]
address = "2001:db8::100"
ports = 8080
forwarding = "nat"
[virtual.check]
type = "connect"
timeout = "500ms"
[[virtual.real]]
address = "2001:db8::21"
port = 80

[[virtual]]
protocol = "fwmark"
mark = 7
[[virtual.real]]
address = "198.18.0.31"

[[virtual]]
address = "198.18.0.101"
ports = "*"
persistence = "2m"
[[virtual.real]]
address = "198.18.0.41"

[[virtual]]
name = "web-l7"
layer = 7
address = "198.18.0.102"
ports = 80
[virtual.haproxy]
backend = "be_web"
socket = "/run/haproxy/admin.sock"
[[virtual.real]]
name = "web1"
address = "198.18.0.51"
port = 8080
"""


def test_full_config_loads_into_typed_objects() -> None:
    config = load_config_text(FULL, "full.toml")
    cluster = config.cluster
    assert cluster is not None
    assert cluster.role is Role.SLAVE
    assert (cluster.keepalive, cluster.deadtime) == (0.2, 2.0)
    assert cluster.warntime == 1.0  # derived: deadtime / 2
    assert cluster.initdead == 30.0  # derived: max(3 x deadtime, 30 s)
    assert cluster.peers[0].addresses[1] == ipaddress.ip_address("2001:db8::2")
    assert cluster.floating_ips[1].device == "eth1"
    gateway, v6, fwmark, star, l7 = config.virtuals
    assert gateway.protocol is Protocol.TCP_UDP
    assert gateway.ports == (PortRange(80, 80), PortRange(443, 443), PortRange(50001, 50002))
    assert gateway.persistence == 300.0
    assert gateway.persistence_netmask == "255.255.255.0"
    assert gateway.check.service == "https"
    assert gateway.check.failure_count == 3
    assert gateway.check.quiescent is True
    assert gateway.reals[0].name == "198.18.0.21"
    assert gateway.reals[1].check.receive == "FINE"
    assert gateway.reals[1].check.request == "/app/system/ping"
    assert gateway.reals[0].check.receive == "OK"
    assert v6.name == "2001:db8::100:8080/tcp"
    assert v6.reals[0].forwarding is Forwarding.NAT
    assert v6.check.timeout == 0.5
    assert v6.check.service is None
    assert fwmark.mark == 7
    assert fwmark.family == 4
    assert fwmark.check.service == "none"
    assert star.all_ports
    assert l7.haproxy is not None
    assert l7.haproxy.backend == "be_web"
    assert l7.check.service == "http"  # from port 80


def test_defaults_from_the_appliance_manual() -> None:
    config = load_config_text("allow_empty = true\n")
    assert config.cluster is None
    checks = config.checks
    assert (checks.interval, checks.timeout, checks.negotiate_timeout) == (5.0, 3.0, 5.0)
    assert (checks.failure_count, checks.rise, checks.quiescent) == (2, 1, False)


def test_secrets_are_collected_and_redacted_by_show() -> None:
    text = FULL.replace("[checks]", '[alerts.email]\nto = ["ops@example.org"]\n'
                        'password = "mail-pw"\n\n[checks]')
    config = load_config_text(text)
    assert config.alerts.email.password == "mail-pw"
    shown = render_config(config)
    assert "s3cret-pw" not in shown
    assert "mail-pw" not in shown
    assert 'password = "****"' in shown


def test_show_round_trips_to_the_same_model() -> None:
    config = load_config_text(FULL)
    again = load_config_text(render_config(config).replace('"****"', '"s3cret-pw"'))
    assert again.virtuals == config.virtuals
    assert again.cluster == config.cluster
    assert again.checks == config.checks


def test_floating_vip_duplicate_is_a_warning() -> None:
    warnings: list[Problem] = []
    text = FULL.replace('"198.18.0.50/24"', '"198.18.0.100/24"')
    load_config_text(text, warnings=warnings)
    assert any("already floating" in str(w) for w in warnings)


class RedisCheck:
    name = "redis"
    negotiate = True
    description = "test"
    options = MappingProxyType({
        "expect": OptionSpec("str", default="+PONG"),
        "db": OptionSpec("int", default=0),
        "token": OptionSpec("str", secret=True),
        "grace": OptionSpec("duration", default=1.0),
        "mode": OptionSpec("str", required=True, choices=("x", "y")),
        "count": OptionSpec("int", default=1, minimum=1, maximum=10),
    })

    async def check(self, request: CheckRequest) -> CheckResult:
        return CheckResult.success()


def registry_with_redis() -> CheckRegistry:
    registry = CheckRegistry()
    registry.current_plugin = "redis-plugin"
    registry.add(RedisCheck())
    return registry


REDIS = """\
[[virtual]]
address = "198.18.0.100"
ports = 6379
[virtual.check]
service = "redis"
[virtual.check.options]
{options}
[[virtual.real]]
address = "198.18.0.21"
"""


def test_plugin_options_validated_against_schema() -> None:
    text = REDIS.format(options='mode = "x"\ndb = 3\ntoken = "tok-123"\ngrace = "250ms"')
    config = load_config_text(text, checks=registry_with_redis())
    options = config.virtuals[0].check.options
    assert options == {"expect": "+PONG", "db": 3, "token": "tok-123", "grace": 0.25,
                       "mode": "x", "count": 1}
    assert "tok-123" not in render_config(config, registry_with_redis())


@pytest.mark.parametrize(("options", "message"), [
    ('mode = "x"\ndbb = 1', "check.options.dbb: unknown key 'dbb'; did you mean 'db'?"),
    ('mode = "x"\ndb = "one"', "check.options.db: expected int, got a string 'one'"),
    ('db = 1', "check 'redis' needs option 'mode'"),
    ('mode = "x"\ngrace = "soon"', "check.options.grace: expected a duration"),
    ('mode = "z"', "check.options.mode: 'z' is not one of 'x', 'y'"),
    ('mode = "x"\ncount = 0', "check.options.count: 0 is below the minimum 1"),
    ('mode = "x"\ncount = 11', "check.options.count: 11 is above the maximum 10"),
])
def test_bad_plugin_options(options: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(REDIS.format(options=options), checks=registry_with_redis())
    assert message in str(info.value)


def test_service_unknown_without_its_plugin() -> None:
    with pytest.raises(ConfigError, match="unknown negotiate service 'redis'"):
        load_config_text(REDIS.format(options=""), checks=CheckRegistry())


def test_known_but_unprovided_check_is_a_warning() -> None:
    warnings: list[Problem] = []
    load_config_text(REDIS.format(options="").replace("redis", "https"),
                     checks=CheckRegistry(), warnings=warnings)
    assert any("no installed plugin provides check 'https'" in str(w) for w in warnings)


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("3s", 3.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5), (4, 4.0),
    ("10", 10.0),
])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "3 sec", "-1s", "1d", True, "nan", "1e3s"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_lines_are_found_in_multiline_strings_and_quoted_keys() -> None:
    text = ('[checks]\n"interval" = "1s"\n[[virtual]]\naddress = "198.18.0.1"\nports = 80\n'
            '[virtual.check]\nrequest = """\nline\n"""\n[[virtual.real]]\naddress = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "m.toml")
    assert str(info.value.problems[0]).startswith("m.toml:11: virtual[0].real[0].address")


@pytest.mark.parametrize("service", ["dns", "sip"])
def test_builtin_transport_option_refused_at_load(service: str) -> None:
    text = f"""
[[virtual]]
name = "svc"
address = "198.18.0.10"
ports = 53
protocol = "udp"
[virtual.check]
type = "negotiate"
service = "{service}"
request = "example.org"
options = {{ transport = "sctp" }}
[[virtual.real]]
address = "198.18.0.21"
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, checks=installed_checks())
    assert "check.options.transport: 'sctp' is not one of 'auto', 'udp', 'tcp'" in \
        str(info.value)
