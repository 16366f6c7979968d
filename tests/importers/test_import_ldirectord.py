"""ldirectord.cf import: lexical rules, the mapping of every directive, and error cases."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from lbha.importers import ImportFormatError, ImportResult, Severity, import_ldirectord

DATA = Path(__file__).parent / "data"


def convert(text: str) -> ImportResult:
    return import_ldirectord(text, "ld.cf")


def notes_for(result: ImportResult, directive: str) -> list[str]:
    return [f"{n.line}:{n.severity}:{n.message}" for n in result.notes
            if n.directive == directive]


def virtuals(result: ImportResult) -> list[dict]:
    return tomllib.loads(result.toml).get("virtual", [])


def test_minimal_example_from_the_spec(validated):
    text = (
        "checktimeout=3\ncheckinterval=5\nquiescent=yes\n\nvirtual=192.0.2.10:80\n"
        "\treal=10.0.0.11:80 gate 100\n\treal=10.0.0.12:80 gate 100\n"
        "\tfallback=127.0.0.1:80 gate\n\tservice=http\n\trequest=\"health.html\"\n"
        "\treceive=\"OK\"\n\tvirtualhost=\"www.example.com\"\n\tscheduler=wlc\n"
        "\tpersistent=300\n"
    )
    result = convert(text)
    config = validated(result)
    (virtual,) = config.virtuals
    assert str(virtual.address) == "192.0.2.10"
    assert virtual.single_port == 80
    assert virtual.scheduler == "wlc"
    assert virtual.persistence == 300
    assert [(str(r.address), r.weight) for r in virtual.reals] == [
        ("10.0.0.11", 100), ("10.0.0.12", 100)]
    assert virtual.check.request == "/health.html"
    assert virtual.check.receive == "OK"
    assert not virtual.check.regex
    assert virtual.check.virtualhost == "www.example.com"
    assert str(virtual.fallback.address) == "127.0.0.1"
    # ldirectord's effective timings, not lbha's defaults.
    assert (config.checks.interval, config.checks.timeout) == (5, 3)
    assert config.checks.negotiate_timeout == 3
    assert config.checks.failure_count == 1
    assert config.checks.quiescent is True
    assert notes_for(result, "failurecount") == [
        "None:changed:not set: wrote ldirectord's default 1 explicitly (lbha's default is 2)"]


def test_full_file_maps_every_directive(validated):
    result = import_ldirectord((DATA / "full.cf").read_text(), "full.cf")
    config = validated(result)
    assert config.checks.interval == 6
    assert config.checks.failure_count == 3
    assert (config.checks.timeout, config.checks.negotiate_timeout) == (4, 20)
    assert config.ipvs.cleanstop is False
    email = config.alerts.email
    assert email.to == ("ops@example.com", "oncall@example.com")
    assert (email.sender, email.smtp_host, email.repeat) == (
        "lb@example.com", "mail.example.com", 3600)
    web = config.virtual("Web")
    assert [str(r.address) for r in web.reals][:3] == ["198.18.1.1", "198.18.1.2", "198.18.1.3"]
    masq = web.reals[3]
    assert (masq.port, masq.weight, masq.forwarding.value) == (8080, 5, "nat")
    assert (masq.min_connections, masq.max_connections) == (10, 50)
    assert (masq.check.request, masq.check.receive) == ("/health.html", "OK")
    # Per-real request with a leading '/': ldirectord ignores the pair, so does the import.
    assert web.reals[4].check.request == "/index.html"
    assert web.check.regex
    assert web.check.method.value == "HEAD"
    assert (web.check.timeout, web.check.negotiate_timeout) == (2, 2)
    assert web.check.interval == 7
    assert web.check.failure_count == 2
    assert web.check.quiescent is False
    assert web.email == ("web@example.com",)
    assert web.persistence_netmask == "255.255.255.0"
    assert (web.fallback.port, web.fallback.forwarding.value) == (8080, "nat")
    dns, ftp, mysql, radius, ext, perl, udp, mark, allports, off, v6 = config.virtuals[1:]
    assert dns.protocol.value == "ops"
    assert dns.check.request == "example.com"
    assert (dns.check.timeout, dns.check.negotiate_timeout) == (9, 9)
    assert (ftp.check.login, ftp.check.password, ftp.check.port) == (
        "anonymous", "ldirectord@localhost", 2121)
    assert (mysql.check.connects_per_negotiate, mysql.check.database) == (3, "portal")
    assert (radius.protocol.value, radius.check.secret) == ("udp", "radius-secret")
    assert ext.check.command == ("/usr/local/bin/check ssh",)
    assert perl.check.type == "external"
    assert perl.check.command == ("/usr/local/bin/check.pl",)
    assert udp.check.type == "ping"
    assert mark.mark == 7
    assert mark.fallback is None
    assert mark.reals[1].port is None
    assert mark.reals[1].check.port == 443
    assert allports.all_ports
    assert allports.check.type == "on"
    assert off.check.type == "off"
    assert v6.persistence_netmask == "64"
    assert v6.reals[1].forwarding.value == "nat"
    assert (mysql.check.password, radius.check.password) == ("secret-pw", "probe-pw")


@pytest.mark.parametrize(
    ("directive", "line", "severity"),
    [
        ("checkcount", 5, Severity.DROPPED), ("fallbackcommand", 9, Severity.DROPPED),
        ("autoreload", 10, Severity.DROPPED), ("callback", 11, Severity.DROPPED),
        ("logfile", 12, Severity.DROPPED), ("execute", 13, Severity.DROPPED),
        ("fork", 14, Severity.DROPPED), ("supervised", 15, Severity.DROPPED),
        ("readdquiescent", 17, Severity.DROPPED), ("emailalertstatus", 20, Severity.DROPPED),
        ("maintenancedir", 24, Severity.DROPPED), ("comment", 28, Severity.DROPPED),
        ("schedflags", 45, Severity.DROPPED), ("fallbackcommand", 48, Severity.DROPPED),
        ("cleanstop", 49, Severity.DROPPED), ("emailalert", 50, Severity.CHANGED),
        ("emailalertfreq", 51, Severity.DROPPED), ("emailalertstatus", 52, Severity.DROPPED),
        ("smtp", 53, Severity.DROPPED), ("monitorfile", 54, Severity.DROPPED),
        ("load", 55, Severity.DROPPED), ("checkcount", 56, Severity.DROPPED),
        ("real", 31, Severity.WARNING), ("checktype", 97, Severity.CHANGED),
        ("checktype", 102, Severity.CHANGED), ("virtual", 110, Severity.CHANGED),
    ],
)
def test_full_file_notes_name_directive_and_line(directive, line, severity):
    result = import_ldirectord((DATA / "full.cf").read_text(), "full.cf")
    found = [n for n in result.notes if n.directive == directive and n.line == line]
    assert [n.severity for n in found] == [severity]
    assert found[0].file == "full.cf"
    # ... and every note is also a comment in the generated file.
    assert found[0].as_comment() in result.toml


def test_dropped_directive_comment_format():
    result = convert("fork = yes\n")
    assert "# not imported (ld.cf:1): fork = yes -- lbha always checks concurrently" in (
        result.toml)
    assert str(result.notes[-1]) == "ld.cf:1: dropped: fork: lbha always checks concurrently"


def test_defaults_written_explicitly(validated):
    config = validated(convert("virtual=198.18.0.1:80\n\treal=198.18.0.2 gate\n"))
    assert config.checks.interval == 10
    assert config.checks.failure_count == 1
    assert (config.checks.timeout, config.checks.negotiate_timeout) == (5, 30)
    assert config.virtuals[0].scheduler == "wrr"


@pytest.mark.parametrize(
    ("globals_", "virtual", "expected"),
    [
        ("", "", (5, 30)),
        ("checktimeout=3\n", "", (3, 3)),
        ("negotiatetimeout=20\n", "", (20, 20)),
        ("checktimeout=3\n", "\tnegotiatetimeout=20\n", (20, 20)),
        ("checktimeout=3\nnegotiatetimeout=9\n", "\tchecktimeout=4\n", (4, 4)),
        ("checktimeout=3\nnegotiatetimeout=9\n", "\tchecktimeout=4\n\tnegotiatetimeout=7\n",
         (4, 7)),
    ],
)
def test_timeout_resolution(validated, globals_, virtual, expected):
    text = f"{globals_}virtual=198.18.0.1:80\n\treal=198.18.0.2:80 gate\n{virtual}"
    check = validated(convert(text)).virtuals[0].check
    assert (check.timeout, check.negotiate_timeout) == expected


def test_lexical_rules(validated):
    text = (
        "# comment\n"
        "checktimeout=3 # digits before a comment are fine\n"
        "quiescent=no \n"
        "virtual=198.18.0.1:80\n"
        "    real=198.18.0.2:80 gate # trailing comment\n"
        "  # an indented comment does not end the block\n"
        "\treceive=\"a#b\"\n"
        "\tquiescent=yes # c\n"
        "\n"
        "failurecount=2.5\n"
    )
    result = convert(text)
    virtual = validated(result).virtuals[0]
    assert len(virtual.reals) == 1
    assert virtual.check.receive == "a#b"
    assert virtual.check.quiescent is True
    # Line 7 also gets the note on redirects (port 80 is an http check).
    assert [n.severity for n in result.notes if n.line in (3, 7, 8)] == [
        Severity.WARNING, Severity.WARNING, Severity.CHANGED, Severity.WARNING]
    assert notes_for(result, "failurecount") == [
        "10:changed:ldirectord reads only the first digits: 2"]


def test_crlf_file_is_accepted_with_a_warning(validated):
    text = "quiescent=yes\r\nvirtual=198.18.0.1:80\r\n\treal=198.18.0.2:80 gate\r\n"
    result = convert(text)
    assert validated(result).checks.quiescent is True
    assert notes_for(result, "(file)")[0].startswith("1:warning:CRLF line endings")


def test_service_names_fwmark_quirk_and_ranges(validated):
    text = (
        "virtual=198.18.0.1:http\n\treal=198.18.0.2->198.18.0.4:www gate\n\n"
        "virtual=198.18.0.9\n\treal=198.18.0.10 gate\n"
    )
    result = convert(text)
    web, mark = validated(result).virtuals
    assert web.single_port == 80
    assert [r.port for r in web.reals] == [80, 80, 80]
    assert mark.mark == 198
    assert mark.name == "fwmark-198"
    assert any("read as firewall mark 198" in n.message for n in result.notes)


def test_hostnames_are_error_notes_not_guesses(validated):
    text = (
        "virtual=www.example.com:80\n\treal=198.18.0.2:80 gate\n\n"
        "virtual=198.18.0.1:80\n\treal=sql01->sql03:80 gate\n\treal=198.18.0.3:80 gate\n"
    )
    result = convert(text)
    (virtual,) = validated(result).virtuals
    assert [str(r.address) for r in virtual.reals] == ["198.18.0.3"]
    assert [(n.line, n.directive) for n in result.errors] == [(1, "virtual"), (5, "real")]
    assert "NOT IMPORTED (error) (ld.cf:5): real=sql01->sql03:80 gate" in result.toml


def test_gate_real_with_other_port_keeps_it_for_the_check(validated):
    text = "virtual=198.18.0.1:80\n\treal=198.18.0.2:8080 gate\n\tchecktype=connect\n"
    (real,) = validated(convert(text)).virtuals[0].reals
    assert real.port is None
    assert real.check.port == 8080


def test_real_without_port_is_checked_on_the_service_default_port(validated):
    text = "virtual=198.18.0.1:8080\n\treal=198.18.0.2 gate\n\tservice=http\n"
    result = convert(text)
    (real,) = validated(result).virtuals[0].reals
    assert real.check.port == 80
    assert notes_for(result, "real")[0].startswith("2:warning:ldirectord checks a real server")


def test_per_real_regex_and_http_url(validated):
    text = ('virtual=198.18.0.1:80\n\treal=198.18.0.2:80 gate 1 "a", "^OK$"\n'
            '\treal=198.18.0.3:80 gate 1 "http://x/y", "OK"\n')
    result = convert(text)
    first, second = validated(result).virtuals[0].reals
    assert first.check.regex
    assert first.check.request == "/a"
    assert second.check.request == "/http://x/y"
    assert any("absolute URL" in note for note in notes_for(result, "real"))


def test_ldirectord_rejects_deprecated_timeouts():
    result = convert("connecttimeout=3\ntimeout=4\n")
    assert [(n.line, n.directive, n.severity) for n in result.errors] == [
        (1, "connecttimeout", Severity.ERROR), (2, "timeout", Severity.ERROR)]


def test_uncompilable_regex_becomes_a_substring(validated):
    text = 'virtual=198.18.0.1:80\n\treal=198.18.0.2:80 gate\n\treceive="a\\Qb(\\E"\n'
    result = convert(text)
    assert not validated(result).virtuals[0].check.regex
    assert result.errors[0].directive == "receive"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("virtual=198.18.0.1:80\n\treal=198.18.0.2:80 bridge\n",
         "ld.cf:2: real: forward method must be gate, masq or ipip"),
        ("virtual=198.18.0.1:80\n\treal=198.18.0.2:80 gate 5 junk\n",
         "ld.cf:2: real: invalid real server line, around 'junk'"),
        ("virtual=198.18.0.1:80\n\treal=:80\n",
         "ld.cf:2: real: invalid real server line (wrong format): ':80'"),
        ("virtual=198.18.0.1:80\n\treal=198.18.0.9->198.18.0.2 gate\n",
         "ld.cf:2: real: invalid range 198.18.0.9->198.18.0.2"),
        ("frobnicate=yes\n", "ld.cf:1: unknown directive 'frobnicate'"),
        ("virtual=198.18.0.1:80\n\tfrobnicate=1\n",
         "ld.cf:2: unknown directive 'frobnicate' in a virtual block"),
        (" checktimeout=3\n", "ld.cf:1: indented line outside a virtual block (global "
         "directives start in column 0)"),
        ("virtual=198.18.0.1:80\n\treal=198.18.0.2:80 gate\n\n\tservice=http\n",
         "ld.cf:4: indented line outside a virtual block (a blank line ended the virtual "
         "block above)"),
        ("virtual=198.18.0.1:80\n  service=http\n",
         "ld.cf:2: indented line outside a virtual block (virtual block lines need >= 4 "
         "spaces or a tab)"),
        ("quiescent=maybe\n", "ld.cf:1: quiescent: must be 'yes' or 'no', got 'maybe'"),
        ("virtual=198.18.0.1:80\n\trequest=index.html\n",
         "ld.cf:2: request: needs a non-empty value in double quotes"),
        ("virtual=198.18.0.1:80\n\tchecktype=sometimes\n",
         "ld.cf:2: checktype: checktype must be connect"),
        ("virtual=198.18.0.1:80\n\treal6=[2001:db8::1]:80 gate\n",
         "ld.cf:2: real6: use real in a virtual block"),
        ("virtual=198.18.0.1:80\n\nvirtual=198.18.0.1:80\n",
         "ld.cf:3: duplicate virtual server"),
        ("virtual=[2001:db8::1]:80\n", "ld.cf:1: virtual: IPv6 virtual services need virtual6="),
        ("virtual6=[2001:db8::1]:80\n\treal6=[2001:db8::2]->[2001:db8::3] gate\n",
         "ld.cf:2: real6: address ranges are not supported for IPv6 real servers"),
        ("virtual=198.18.0.1:nosuchservice\n",
         "ld.cf:1: virtual: unknown service name 'nosuchservice' for a port"),
    ],
)
def test_syntax_errors(text, message):
    with pytest.raises(ImportFormatError) as caught:
        convert(text)
    assert message in str(caught.value)


def test_all_syntax_errors_are_reported_at_once():
    with pytest.raises(ImportFormatError) as caught:
        convert("bogus=1\nfork=perhaps\n")
    assert [(p.line, p.file) for p in caught.value.problems] == [(1, "ld.cf"), (2, "ld.cf")]


def test_http_checks_keep_ldirectord_s_verdict_on_redirects(validated):
    text = (
        "virtual=198.18.0.1:80\n\treal=198.18.0.2:80 gate\n\tservice=http\n"
        "\trequest=\"/\"\n"
        "virtual=198.18.0.3:443\n\treal=198.18.0.4:443 gate\n\tservice=https\n"
        "\trequest=\"/check.html\"\n\treceive=\"OK\"\n"
        "virtual=198.18.0.5:21\n\treal=198.18.0.6:21 gate\n\tservice=ftp\n"
        "\trequest=\"x\"\n\treceive=\"OK\"\n"
    )
    result = convert(text)
    config = validated(result)
    # No receive: lbha's http checks accept a 3xx as ldirectord (following it) does, so
    # nothing is written or said.
    assert "status" not in config.virtuals[0].check.options
    assert [n for n in result.notes if n.line in (1, 2, 3, 4)] == []
    # With receive, lbha matches the redirect's own body: said on the receive line.
    assert notes_for(result, "receive") == [
        "9:changed:ldirectord follows redirects and looks for receive in the page they lead "
        "to; lbha judges the answer to request itself (a redirect is up only if its own body "
        "contains receive): make request the final URL"]
