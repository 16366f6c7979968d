"""Configs that validate yet cannot work: empty ones, timers below their floors, odd VIPs,
oversized or special files. Each is refused with a message naming the key or the file."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from cli_process import lbha

from lbha.config import MAX_CONFIG_BYTES, load_config, load_config_text
from lbha.errors import ConfigError
from lbha.healthd import Healthd
from lbha.plugin_manager import PluginManager

SERVICE = """\
[paths]
run_dir = "{tmp}/run"
state_dir = "{tmp}/state"

[[virtual]]
name = "web"
address = "198.18.0.100"
ports = 80
[virtual.check]
type = "on"
[[virtual.real]]
address = "198.18.0.21"
"""

CLUSTER = """\
[cluster]
node = "lb1"
role = "master"
auth = "none"
{extra}
[[cluster.peers]]
name = "lb2"
addresses = ["198.18.0.2"]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent(text), "lbha.toml")
    return [str(p) for p in info.value.problems]


# ----------------------------------------------------------------------------- empty configs


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "[checks]\ninterval = \"2s\"\n",
                                  "virtual = []\n"])
def test_a_config_that_manages_nothing_is_refused(text: str) -> None:
    found = problems(text)
    assert any("this config manages nothing" in p and "allow_empty = true" in p for p in found)


def test_allow_empty_says_so_explicitly() -> None:
    config = load_config_text("allow_empty = true\n")
    assert config.virtuals == ()
    assert config.cluster is None
    assert config.allow_empty


def test_allow_empty_must_be_a_boolean() -> None:
    assert any("allow_empty: expected true or false" in p
               for p in problems('allow_empty = "yes"\n'))


def test_a_cluster_alone_or_a_service_alone_is_enough(tmp_path: Path) -> None:
    assert load_config_text(CLUSTER.format(extra="")).cluster is not None
    assert len(load_config_text(SERVICE.format(tmp=tmp_path)).virtuals) == 1


def test_config_check_refuses_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "lbha.toml"
    path.write_text("")
    out = lbha("config", "check", str(path))
    assert out.returncode == 1
    assert "this config manages nothing" in out.stderr
    path.write_text("allow_empty = true\n")
    out = lbha("config", "check", str(path))
    assert out.returncode == 0, out.stderr
    assert "OK (0 virtual services" in out.stdout


def test_healthd_does_not_start_on_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "lbha.toml"
    path.write_text("\n")
    out = lbha("healthd", "--config", str(path))
    assert out.returncode == 1
    assert "this config manages nothing" in out.stderr


def test_healthd_reload_to_an_empty_file_keeps_the_services(tmp_path: Path) -> None:
    path = tmp_path / "lbha.toml"
    path.write_text(SERVICE.format(tmp=tmp_path))
    plugins = PluginManager()  # no backend plugin: nothing outside the test is touched
    plugins.register_checks()
    daemon = Healthd(path, load_config(path, checks=plugins.checks), plugins)
    before = daemon.config
    path.write_text("")
    with pytest.raises(ConfigError, match="manages nothing"):
        daemon.reload()
    assert daemon.config is before
    assert [v.name for v in daemon.engine.config.virtuals] == ["web"]


def test_show_writes_allow_empty_back() -> None:
    from lbha.config_show import render_config

    text = render_config(load_config_text("allow_empty = true\n"))
    assert load_config_text(text).allow_empty


# ----------------------------------------------------------------------------- timer floors


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('keepalive = "1ms"\nwarntime = "3ms"\ndeadtime = "5ms"\ninitdead = "5ms"',
         "cluster.keepalive: '1ms' is below the floor of 10ms"),
        ('keepalive = "10ms"\nwarntime = "15ms"\ndeadtime = "19ms"\ninitdead = "1s"',
         "deadtime 0.019s must be at least twice keepalive"),
        ('ping_timeout = "1ms"', "cluster.ping_timeout: '1ms' is below the floor of 10ms"),
        ('garp_interval = "0.5ms"', "cluster.garp_interval: '0.5ms' is below the floor"),
        ('garp_refresh = "10ms"', "cluster.garp_refresh: '10ms' is below the floor of 100ms"),
        ('deadtime = "10s"\ninitdead = "9s"', "initdead 9s must not be shorter than deadtime"),
    ],
)
def test_cluster_timers_below_their_floor_are_refused(extra: str, expected: str) -> None:
    found = problems(CLUSTER.format(extra=extra))
    assert any(expected in p for p in found), found


def test_the_fastest_documented_timers_are_accepted() -> None:
    config = load_config_text(CLUSTER.format(
        extra='keepalive = "10ms"\nwarntime = "15ms"\ndeadtime = "20ms"\ninitdead = "20ms"\n'
              'garp_refresh = "0s"'))
    assert config.cluster is not None
    assert (config.cluster.keepalive, config.cluster.deadtime) == (0.01, 0.02)


@pytest.mark.parametrize(
    ("section", "key"),
    [("[checks]", "interval"), ("[checks]", "timeout"), ("[checks]", "negotiate_timeout"),
     ("[virtual.check]", "interval"), ("[virtual.check]", "timeout"),
     ("[virtual.feedback]", "interval"), ("[ipvs]", "reconcile_interval"),
     ("[haproxy]", "reconcile_interval")],
)
def test_check_and_reconcile_timers_below_their_floor_are_refused(
    tmp_path: Path, section: str, key: str
) -> None:
    text = SERVICE.format(tmp=tmp_path)
    if section == "[virtual.check]":
        text = text.replace('type = "on"', f'type = "on"\n{key} = "1ms"')
    elif section == "[virtual.feedback]":
        text += f'[virtual.feedback]\ntype = "agent"\n{key} = "1ms"\n'
    else:
        text = f'{section}\n{key} = "1ms"\n' + text
    found = problems(text)
    assert any(f"{key}: '1ms' is below the floor" in p for p in found), found


# ----------------------------------------------------------------------------- reading limits


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "lbha.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_device_is_refused(device: str) -> None:
    with pytest.raises(ConfigError, match=f"{device}: cannot read: not a regular file"):
        load_config(device)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_a_file_over_the_cap_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "lbha.toml"
    with path.open("wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)  # sparse: nothing is written or read
    with pytest.raises(ConfigError, match="over the limit of 16 MiB"):
        load_config(path)


def test_a_file_at_the_cap_is_read(tmp_path: Path) -> None:
    path = tmp_path / "lbha.toml"
    head = b"allow_empty = true\n"
    path.write_bytes(head + b"#" * (MAX_CONFIG_BYTES - len(head) - 1) + b"\n")
    assert load_config(path).allow_empty


def test_config_check_names_the_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "lbha.toml"
    os.mkfifo(fifo)
    out = lbha("config", "check", str(fifo))
    assert out.returncode == 1
    assert f"{fifo}: cannot read: not a regular file" in out.stderr


def test_binary_garbage_is_refused_as_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "lbha.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


# ----------------------------------------------------------------------------- validation cost


def services(count: int, *, same_address: bool = False) -> str:
    """`count` services, each with one real server; on one address (ports differ) or many."""
    out = []
    for i in range(count):
        address = "198.18.0.1" if same_address else f"198.18.{i // 250}.{i % 250 + 1}"
        port = 1000 + i if same_address else 80
        out.append(f'[[virtual]]\naddress = "{address}"\nports = {port}\n'
                   f'[[virtual.real]]\naddress = "198.19.{i // 250}.{i % 250 + 1}"\n')
    return "".join(out)


def calls_to_load(text: str) -> int:
    """Python function calls made validating `text` (deterministic, unlike a timing)."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.runcall(load_config_text, text)
    return int(pstats.Stats(profile).total_calls)  # type: ignore[attr-defined]


@pytest.mark.parametrize("same_address", [False, True])
def test_validation_work_grows_linearly_with_the_services(same_address: bool) -> None:
    small = calls_to_load(services(300, same_address=same_address))
    large = calls_to_load(services(1200, same_address=same_address))
    # Four times the services: four times the work, with slack for n log n (the pairwise
    # comparison this replaced made it 9 to 16 times).
    assert large < 5 * small, (small, large)


def test_a_long_port_list_costs_linear_work() -> None:
    def text(count: int) -> str:
        ports = ", ".join(str(p) for p in range(1, count + 1))
        return f'[[virtual]]\naddress = "198.18.0.1"\nports = [{ports}]\n'

    assert calls_to_load(text(8000)) < 5 * calls_to_load(text(2000))


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ('ports = 80', 'ports = 80', "198.18.0.1:80/tcp is also served by virtual[0]"),
        ('ports = "1000-2000"', 'ports = [5, "1500-1600"]', "198.18.0.1:1500/tcp"),
        ('ports = "*"\npersistence = "5m"', 'ports = 443', "198.18.0.1:*/tcp"),
        ('ports = 53\nprotocol = "tcp+udp"', 'ports = 53\nprotocol = "udp"',
         "198.18.0.1:53/udp"),
        ('protocol = "fwmark"\nmark = 7\naddress = "198.18.0.9"',
         'protocol = "fwmark"\nmark = 7\naddress = "198.18.0.10"', "fwmark 7"),
    ],
)
def test_overlapping_services_are_still_found(a: str, b: str, expected: str) -> None:
    def service(keys: str, name: str) -> str:
        address = "" if "address" in keys else 'address = "198.18.0.1"\n'
        return f'[[virtual]]\nname = "{name}"\n{address}{keys}\n'

    text = service(a, "first") + service('address = "198.18.0.2"\nports = 9', "other") \
        + service(b, "second")
    found = problems(text)
    assert any(f"virtual[2]: {expected}" in p for p in found), found
    assert len(found) == 1, found


@pytest.mark.parametrize(
    ("a", "b"),
    [('ports = 80', 'ports = 81'), ('ports = 53\nprotocol = "tcp"', 'ports = 53\nprotocol = "udp"'),
     ('ports = "1-100"', 'ports = "101-200"')],
)
def test_services_side_by_side_do_not_clash(a: str, b: str) -> None:
    text = "".join(f'[[virtual]]\naddress = "198.18.0.1"\n{keys}\n' for keys in (a, b))
    assert len(load_config_text(text).virtuals) == 2


def test_overlapping_ports_of_one_service_are_found_in_any_order() -> None:
    found = problems('[[virtual]]\naddress = "198.18.0.1"\nports = [9000, "10-20", 15, 8]\n')
    assert found == ["lbha.toml:3: virtual[0].ports[2]: port 15 overlaps port 10-20 of the "
                     "same service"]


# ----------------------------------------------------------------------------- VIP addresses


@pytest.mark.parametrize(
    ("address", "expected"),
    [("224.0.0.18", "224.0.0.18 is a multicast address"),
     ("ff02::1", "ff02::1 is a multicast address"),
     ("169.254.10.1", "169.254.10.1 is link-local: it exists on every interface, so it cannot "
                      "be a virtual service address"),
     ("fe80::10", "fe80::10 is link-local"),
     ("0.0.0.0", "0.0.0.0 is not a host address"),
     ("255.255.255.255", "255.255.255.255 is not a host address")],
)
def test_a_virtual_address_that_cannot_float_is_refused(
    tmp_path: Path, address: str, expected: str
) -> None:
    text = SERVICE.format(tmp=tmp_path).replace("198.18.0.100", address)
    text = text.replace("198.18.0.21", "fe80::21" if ":" in address else "198.18.0.21")
    found = problems(text)
    assert any(f"virtual[0].address: {expected}" in p for p in found), found


@pytest.mark.parametrize(
    ("entry", "expected"),
    [('"239.1.1.1/32"', "239.1.1.1 is a multicast address"),
     ('{ address = "ff05::2/128", device = "eth0" }', "ff05::2 is a multicast address"),
     ('"fe80::10/64"', "fe80::10 is link-local: it exists on every interface, so it needs one:"
                       " write it as a table with `device`"),
     ('{ address = "169.254.1.1/16" }', "169.254.1.1 is link-local"),
     ('"::/0"', ":: is not a host address")],
)
def test_a_floating_ip_that_cannot_float_is_refused(entry: str, expected: str) -> None:
    found = problems(CLUSTER.format(extra=f"floating_ips = [{entry}]"))
    assert any(f"cluster.floating_ips[0]: {expected}" in p for p in found), found


def test_a_link_local_floating_ip_on_a_named_device_is_accepted() -> None:
    config = load_config_text(CLUSTER.format(
        extra='floating_ips = [{ address = "fe80::10/64", device = "eth0" }, '
              '{ address = "169.254.1.1/16", device = "eth1" }]'))
    assert config.cluster is not None
    assert [(str(f.address), f.device) for f in config.cluster.floating_ips] == [
        ("fe80::10", "eth0"), ("169.254.1.1", "eth1")]
