"""ha.cf + haresources + authkeys import: cluster mapping, notes, secrets, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_process import LBHA

from lbha.importers import (
    ImportFormatError,
    Severity,
    import_files,
    import_ldirectord,
    import_paths,
)

DATA = Path(__file__).parent / "data"
LD = "virtual=198.18.0.10:80\n\treal=198.18.1.1:80 gate\n"
HA = "node lb1 lb2\nucast eth0 198.18.0.2\nauto_failback on\n"


def convert(ha_cf=HA, haresources=None, authkeys="auth 1\n1 sha1 k\n", node=None):
    return import_ldirectord(
        LD, "ld.cf", ha_cf=(ha_cf, "ha.cf"),
        haresources=None if haresources is None else (haresources, "haresources"),
        authkeys=None if authkeys is None else (authkeys, "authkeys"), node=node,
    )


def test_data_files(validated):
    result = import_paths(DATA / "full.cf", ha_cf=DATA / "ha.cf",
                          haresources=DATA / "haresources", authkeys=DATA / "authkeys")
    cluster = validated(result).cluster
    assert (cluster.node, cluster.role.value, cluster.cluster_id) == ("lb1", "master", "lvs-pair")
    assert cluster.udp_port == 1694
    assert (cluster.keepalive, cluster.warntime, cluster.deadtime, cluster.initdead) == (
        0.5, 4, 10, 60)
    assert [str(a) for a in cluster.ping_nodes] == [
        "198.18.0.254", "198.18.0.253", "198.18.0.252"]
    assert cluster.ping_timeout == 20
    assert cluster.auto_failback is True
    (peer,) = cluster.peers
    assert peer.name == "lb2"
    assert [str(a) for a in peer.addresses] == [
        "198.18.0.2", "198.18.0.1"]
    assert cluster.serial is None  # not implemented yet (issue 16): a comment, see below
    floating = [(str(f.interface), f.device, f.label) for f in cluster.floating_ips]
    assert floating == [("198.18.0.50/24", "eth0", "eth0:vip"), ("198.18.0.51/32", None, None),
                        ("198.18.0.52/25", None, None)]
    assert cluster.auth == "hmac-sha256"
    assert str(cluster.auth_key_file) == "/etc/lbha/authkey"
    assert result.auth_key == "2 S3cr3tSha1Key-0f-heartbeat\n3 0ldMd5Key-0f-heartbeat\n"
    for secret in ("S3cr3tSha1Key-0f-heartbeat", "0ldMd5Key-0f-heartbeat", "mysecretpassword"):
        assert secret not in result.toml
        assert all(secret not in str(n) and secret not in n.as_comment() for n in result.notes)


@pytest.mark.parametrize(
    ("directive", "line", "severity"),
    [
        ("debugfile", 2, Severity.DROPPED), ("logfile", 3, Severity.DROPPED),
        ("logfacility", 4, Severity.DROPPED), ("use_logd", 5, Severity.DROPPED),
        ("bcast", 13, Severity.DROPPED), ("mcast", 14, Severity.DROPPED),
        ("auto_failback", 17, Severity.CHANGED), ("ping_group", 21, Severity.CHANGED),
        ("respawn", 23, Severity.DROPPED), ("respawn", 24, Severity.DROPPED),
        ("apiauth", 25, Severity.DROPPED), ("hopfudge", 26, Severity.DROPPED),
        ("msgfmt", 27, Severity.DROPPED), ("realtime", 28, Severity.DROPPED),
        ("debug", 29, Severity.DROPPED), ("coredumps", 30, Severity.DROPPED),
        ("compression", 31, Severity.DROPPED), ("compression_threshold", 32, Severity.DROPPED),
        ("autojoin", 34, Severity.DROPPED), ("uuidfrom", 35, Severity.DROPPED),
        ("watchdog", 36, Severity.DROPPED), ("stonith", 37, Severity.DROPPED),
        ("stonith_host", 38, Severity.DROPPED), ("memreserve", 39, Severity.DROPPED),
        ("max_rexmit_delay", 40, Severity.DROPPED), ("serial", 12, Severity.DROPPED),
    ],
)
def test_ha_cf_notes_name_directive_and_line(directive, line, severity):
    result = import_paths(DATA / "full.cf", ha_cf=DATA / "ha.cf",
                          haresources=DATA / "haresources", authkeys=DATA / "authkeys")
    found = [n for n in result.notes
             if n.directive == directive and n.line == line and n.file.endswith("ha.cf")]
    assert [n.severity for n in found] == [severity]
    assert found[0].as_comment() in result.toml


def test_serial_links_stay_comments_until_implemented(validated):
    # lbha refuses [cluster.serial] (it would do nothing): the import must still validate.
    result = convert(HA + "baud 115200\nserial /dev/ttyS0\n")
    assert validated(result).cluster.serial is None
    assert "[cluster.serial]" not in result.toml
    (note,) = [n for n in result.notes if n.directive == "serial"]
    assert note.severity is Severity.DROPPED
    assert "not implemented yet (issue 16)" in note.message
    assert "serial /dev/ttyS0" in note.as_comment()
    assert any(n.directive == "baud" and "issue 16" in n.message for n in result.notes)


def test_a_serial_only_pair_is_an_error_naming_the_missing_addresses():
    result = convert("node lb1 lb2\nserial /dev/ttyS0\nauto_failback on\n")
    assert any(n.directive == "ucast" and n.severity is Severity.ERROR
               and "add the peer's addresses by hand" in n.message for n in result.notes)


def test_ipfail_note():
    result = convert(HA + "respawn hacluster /usr/lib/heartbeat/ipfail\n")
    (note,) = [n for n in result.notes if n.directive == "respawn"]
    assert "lbha watches the ping nodes itself" in note.message


def test_heartbeat_defaults_and_port_are_kept(validated):
    result = convert()
    cluster = validated(result).cluster
    assert cluster.udp_port == 694
    assert (cluster.keepalive, cluster.warntime, cluster.deadtime, cluster.initdead) == (
        1, 15, 30, 30)
    assert any(n.directive == "udpport" and "694" in n.message for n in result.notes)


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ("keepalive 2\ndeadtime 8\n", (2, 4, 8, 16)),
        ("keepalive 1\ndeadtime 5\n", (1, 2.5, 5, 12)),
        ("keepalive 1500ms\ndeadtime 20\nwarntime 10\ninitdead 120\n", (1.5, 10, 20, 120)),
        ("keepalive 250000us\ndeadtime 1.5\n", (0.25, 0.75, 1.5, 12)),
    ],
)
def test_time_syntax_and_derived_defaults(validated, times, expected):
    cluster = validated(convert(HA + times)).cluster
    assert (cluster.keepalive, cluster.warntime, cluster.deadtime, cluster.initdead) == expected


def test_udpport_after_the_first_medium_is_not_used(validated):
    result = convert("node lb1 lb2\nucast eth0 198.18.0.2\nudpport 1000\n")
    assert validated(result).cluster.udp_port == 694
    assert any(n.severity is Severity.WARNING and n.directive == "udpport"
               for n in result.notes)


def test_role_follows_haresources_preferred_node(validated):
    resources = "lb2 198.18.0.10 198.18.0.60/24\n"
    default = validated(convert(haresources=resources)).cluster
    assert (default.node, default.role.value) == ("lb2", "master")
    assert [p.name for p in default.peers] == ["lb1"]
    other = validated(convert(haresources=resources, node="lb1")).cluster
    assert (other.node, other.role.value) == ("lb1", "slave")
    # The VIP of a virtual service is floating already; only the extra IP is listed.
    assert [str(f.interface) for f in other.floating_ips] == ["198.18.0.60/24"]


def test_nice_failback_and_crc(validated):
    result = convert(HA.replace("auto_failback on", "nice_failback on"),
                     authkeys="auth 1\n1 crc\n")
    cluster = validated(result).cluster
    assert cluster.auto_failback is False
    assert cluster.auth == "none"
    assert result.auth_key is None
    assert any(n.directive == "crc" and n.severity is Severity.WARNING for n in result.notes)


def test_crm_mode_ignores_haresources(validated):
    result = convert(HA + "crm respawn\n", haresources="lb2 198.18.0.60/24\n")
    cluster = validated(result).cluster
    assert cluster.floating_ips == ()
    assert cluster.node == "lb1"
    assert [(n.line, n.directive) for n in result.errors] == [(4, "crm")]


def test_no_node_means_no_cluster(validated):
    result = convert("auto_failback on\n")
    assert validated(result).cluster is None
    assert [n.directive for n in result.errors] == ["node"]


def test_missing_authkeys_keeps_the_key_file_setting(validated):
    result = convert(authkeys=None)
    assert str(validated(result).cluster.auth_key_file) == "/etc/lbha/authkey"
    assert any(n.directive == "auth" and n.severity is Severity.WARNING for n in result.notes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ha_cf": HA + "keepalive 2s\n"}, "ha.cf:4: keepalive: invalid time '2s'"),
        ({"ha_cf": HA + "frobnicate on\n"}, "ha.cf:4: illegal directive 'frobnicate'"),
        ({"ha_cf": HA + "baud 12345\n"}, "ha.cf:4: baud: unsupported rate '12345'"),
        ({"ha_cf": HA.replace("on", "sometimes")},
         "ha.cf:3: auto_failback: expected a boolean or legacy"),
        ({"node": "lb3"}, "ha.cf: node 'lb3' is not listed in ha.cf (nodes: lb1, lb2)"),
        ({"authkeys": "auth 1\n1 sha1\n"}, "authkeys:2: method 'sha1' needs a key"),
        ({"authkeys": "auth 1\n1 crc key\n"}, "authkeys:2: method 'crc' takes no key"),
        ({"authkeys": "auth 3\n1 sha1 k\n"}, "authkeys: no 'auth N' line naming a listed"),
        ({"authkeys": "auth 1\n1 sha256 k\n"}, "authkeys:2: unknown method 'sha256'"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(ImportFormatError) as caught:
        convert(**kwargs)
    assert message in str(caught.value)


def test_authkeys_errors_never_echo_keys():
    with pytest.raises(ImportFormatError) as caught:
        convert(authkeys="auth 1\n1 sha1 k\nsecret-junk-line\n")
    assert "secret-junk-line" not in str(caught.value)


def test_ha_cf_alone_is_imported(validated):
    result = import_paths(None, ha_cf=DATA / "ha.cf", haresources=DATA / "haresources",
                          authkeys=DATA / "authkeys")
    config = validated(result)
    assert config.virtuals == ()
    assert config.cluster.node == "lb1"
    # Without an ldirectord.cf no haresources address is a VIP: each one floats.
    assert {str(f.address) for f in config.cluster.floating_ips} == {
        "198.18.0.10", "198.18.0.50", "198.18.0.51", "198.18.0.52"}
    ldirectord = [n for n in result.notes if n.directive.startswith("ldirectord::")]
    assert len(ldirectord) == 1
    assert ldirectord[0].severity is Severity.WARNING
    assert "full.cf, which is not imported" in ldirectord[0].message


def test_nothing_to_import_is_refused():
    with pytest.raises(ValueError, match="nothing to import"):
        import_files(None)


def test_cli_imports_ha_cf_alone(tmp_path):
    import subprocess

    out = tmp_path / "lbha.toml"
    key = tmp_path / "authkey"
    run = subprocess.run(
        [*LBHA, "import", "--ha-cf", str(DATA / "ha.cf"),
         "--authkeys", str(DATA / "authkeys"), "-o", str(out), "--authkey-out", str(key)],
        capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode in (0, 1), run.stderr  # 1: some ha.cf directives are not imported
    assert "[cluster]" in out.read_text()
    assert "[[virtual]]" not in out.read_text()
    usage = subprocess.run([*LBHA, "import"], capture_output=True,
                           text=True, timeout=60, check=False)
    assert usage.returncode == 2
    assert "give an ldirectord.cf, --ha-cf FILE, or both" in usage.stderr


def test_a_ping_node_in_ping_and_a_ping_group_is_written_once(validated):
    result = convert(ha_cf=HA + "ping 198.18.0.254 198.18.0.253\n"
                     "ping_group g 198.18.0.253 198.18.0.252 198.18.0.254\n")
    cluster = validated(result).cluster
    assert [str(a) for a in cluster.ping_nodes] == ["198.18.0.254", "198.18.0.253",
                                                   "198.18.0.252"]
    (line,) = [t for t in result.toml.splitlines() if t.startswith("ping_nodes")]
    assert line.count("198.18.0.254") == 1
    assert any("listed more than once" in n.message for n in result.notes)


def test_a_key_too_short_for_lbha_is_a_warning():
    result = convert(authkeys="auth 1\n1 sha1 short-key\n")
    (short,) = [n for n in result.notes if "shorter than 16 characters" in n.message]
    assert short.severity is Severity.WARNING
    assert short.line == 2
