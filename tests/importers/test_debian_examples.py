"""The example files Debian 12 ships in its ldirectord and heartbeat packages."""

from __future__ import annotations

import re

import pytest

from lbha.importers import Severity, import_ldirectord

pytestmark = pytest.mark.slow


def test_ldirectord_example(debian_examples, validated):
    result = import_ldirectord(debian_examples["ldirectord.cf"], "ldirectord.cf")
    config = validated(result)
    (virtual,) = config.virtuals
    assert virtual.name == "Web Site"
    assert virtual.scheduler == "rr"
    assert [str(r.address) for r in virtual.reals] == [
        "192.168.6.2", "192.168.6.3", "192.168.6.6"]
    assert (virtual.check.request, virtual.check.receive) == ("/index.html", "Test Page")
    assert virtual.check.virtualhost == "www.x.y.z"
    assert virtual.check.port == 80
    assert (config.checks.interval, config.checks.timeout) == (1, 3)
    assert [(n.directive, n.severity) for n in result.notes if n.line == 16] == [
        ("autoreload", Severity.DROPPED)]


def test_ldirectord_example_with_every_sample_uncommented(debian_examples, validated):
    """Uncomment the sample virtual services; the importer must explain what it skips."""
    lines = []
    for line in debian_examples["ldirectord.cf"].splitlines():
        if re.match(r"^#(virtual6?\s*=|\t)", line):
            line = line[1:]
        lines.append(line)
    text = "\n".join(lines) + "\n"
    # Two samples share 192.168.6.240:80 (ldirectord refuses that too); keep the first.
    first_dup = text.index("virtual=192.168.6.240:80", text.index("virtual=192.168.6.240:80") + 1)
    text = text[:first_dup] + text[first_dup:].replace("virtual=192.168.6.240:80",
                                                       "virtual=192.168.6.241:80", 1)
    # The SIP sample writes "IP::PORT", which ldirectord misreads; fix it as its author meant.
    text = text.replace("::5060 gate", ":5060 gate")
    result = import_ldirectord(text, "ldirectord.cf")
    config = validated(result)
    assert len(config.virtuals) == 20
    # The SQL samples name their real servers by hostname (sql01->sql03): not importable.
    assert {n.message.split(" is a hostname")[0] for n in result.errors} == {
        "real server 'sql01'"}
    mark = next(v for v in config.virtuals if v.mark == 1)
    assert mark.check.service == "http"
    assert mark.check.port == 80
    ranged = config.virtuals[2]
    assert [str(r.address) for r in ranged.reals][:6] == [
        f"192.168.6.{i}" for i in range(2, 8)]


def test_heartbeat_examples(debian_examples, validated):
    """As shipped, ha.cf names no node: there is no cluster to import, and it says so."""
    result = import_ldirectord(
        debian_examples["ldirectord.cf"], "ldirectord.cf",
        ha_cf=(debian_examples["ha.cf"], "ha.cf"),
        haresources=(debian_examples["haresources"], "haresources"),
        authkeys=(debian_examples["authkeys"], "authkeys"),
    )
    assert validated(result).cluster is None
    assert [(n.file, n.directive) for n in result.errors] == [("ha.cf", "node")]
    assert {(n.directive, n.severity) for n in result.notes if n.file == "ha.cf"} >= {
        ("logfacility", Severity.DROPPED)}


def test_heartbeat_examples_uncommented(debian_examples, validated):
    """Enable the example directives a two-node LVS pair uses, as an operator would."""
    wanted = ("keepalive", "deadtime", "warntime", "initdead", "udpport", "baud",
              "serial\t/dev/ttyS0", "bcast\teth0", "ucast", "ping ", "ping_group",
              "respawn hacluster", "apiauth ipfail gid", "hopfudge", "deadping", "debugfile",
              "logfile")
    lines = []
    for line in debian_examples["ha.cf"].splitlines():
        if line.startswith("#") and line[1:].startswith(wanted):
            line = line[1:]
        lines.append(line)
    ha_cf = "\n".join([*lines, "node ken3", "node kathy"]) + "\n"
    haresources = debian_examples["haresources"] + "ken3 192.168.6.240 135.9.216.3/28/eth0\n"
    authkeys = debian_examples["authkeys"].replace("#auth 1", "auth 2").replace(
        "#2 sha1", "2 sha1")
    result = import_ldirectord(
        debian_examples["ldirectord.cf"], "ldirectord.cf", ha_cf=(ha_cf, "ha.cf"),
        haresources=(haresources, "haresources"), authkeys=(authkeys, "authkeys"),
    )
    cluster = validated(result).cluster
    assert (cluster.node, cluster.role.value, cluster.udp_port) == ("ken3", "master", 694)
    assert (cluster.keepalive, cluster.warntime, cluster.deadtime, cluster.initdead) == (
        2, 10, 30, 120)
    assert [str(a) for a in cluster.peers[0].addresses] == ["192.168.1.2"]
    # 10.10.10.254 is in `ping` and in `ping_group`: written once.
    assert [str(a) for a in cluster.ping_nodes] == ["10.10.10.254", "10.10.10.253"]
    assert [str(f.interface) for f in cluster.floating_ips] == ["135.9.216.3/28"]
    assert result.auth_key == "2 HI!\n"
