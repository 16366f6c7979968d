"""ldirectord.cf -> lbha tables ([checks], [ipvs], [alerts.email], [[virtual]]).

The lexer follows ldirectord 4.12's `read_config` (see docs/spec ldirectord-cf.md): column-0
globals, virtual blocks indented by >= 4 spaces or a tab, a blank line ends a block, '#' rules,
quoting, first-digit-run numbers. It is lenient where ldirectord is needlessly strict (trailing
blanks after yes/no, CRLF) and says so in a warning note.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections import Counter
from dataclasses import dataclass, field

from lbha.durations import format_duration
from lbha.importers.report import Collector, ImportNote, Severity
from lbha.importers.toml_writer import Table, TomlValue
from lbha.model import IPVS_SCHEDULERS, PORT_BY_SERVICE, SERVICE_BY_PORT

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: ldirectord's code defaults where they differ from lbha's (docs/config.md).
LD_CHECKINTERVAL = 10
LD_FAILURECOUNT = 1
LD_CHECKTIMEOUT = 5
LD_NEGOTIATETIMEOUT = 30
LD_SCHEDULER = "wrr"

FORWARDING = {"gate": "dr", "masq": "nat", "ipip": "tun"}

LD_SERVICES = frozenset(
    {
        "dns", "ftp", "http", "https", "http_proxy", "imap", "imaps", "ldap", "ldaps", "mysql",
        "nntp", "none", "oracle", "pgsql", "pop", "pops", "radius", "simpletcp", "sip", "smtp",
        "submission",
    }
)
#: Services whose check strips the '/' ldirectord prepends to `request` (negotiate-checks 1.3).
_STRIP_SLASH = frozenset({"dns", "mysql", "pgsql", "oracle", "ldap", "ldaps", "simpletcp"})
#: ldirectord follows redirects (LWP) and judges the page they lead to; lbha judges the first
#: answer. Without receive the two agree (lbha's http checks accept 3xx by default); with
#: receive a redirect's own body is matched, so the operator is told.
_HTTP_SERVICES = frozenset({"http", "https", "http_proxy"})
_REDIRECT_NOTE = (
    "ldirectord follows redirects and looks for receive in the page they lead to; lbha "
    "judges the answer to request itself (a redirect is up only if its own body contains "
    "receive): make request the final URL"
)

#: /etc/services names, for hosts without that file (containers often lack it).
_PORT_NAMES = {
    "ftp": 21, "ssh": 22, "telnet": 23, "smtp": 25, "domain": 53, "http": 80, "www": 80,
    "pop3": 110, "nntp": 119, "ntp": 123, "imap": 143, "imap2": 143, "snmp": 161, "ldap": 389,
    "https": 443, "submission": 587, "ldaps": 636, "imaps": 993, "pop3s": 995,
    "ms-sql-s": 1433, "radius": 1812, "mysql": 3306, "sip": 5060, "postgresql": 5432,
    "http-alt": 8080,
}

_REGEX_META = re.compile(r"[.^$*+?()\[\]{}|\\]")
_YES_NO = {"yes": True, "no": False}
_EMAIL_STATUSES = frozenset({"all", "none", "starting", "running", "stopping", "reloading"})
_HOST = r"\d+\.\d+\.\d+\.\d+|[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]"
_REAL = re.compile(rf"^({_HOST})(?:->({_HOST}))?(?::(\d+|[A-Za-z0-9_-]+))?\s+(.*)$")

#: Global directives lbha has no equivalent for, and why.
_GLOBAL_DROPPED = {
    "autoreload": "lbha does not watch its config file; reload with SIGHUP or `lbha reload`",
    "callback": "lbha runs no command when its config changes",
    "logfile": "lbha logs to stderr / the systemd journal",
    "execute": "lbha runs one instance per config file; import that instance's file separately",
    "fork": "lbha always checks concurrently",
    "supervised": "lbha always runs in the foreground under systemd",
    "readdquiescent": "lbha reconciles the whole IPVS table and always re-adds missing servers",
    "maintenancedir": "use `lbha drain` / `lbha halt` for maintenance instead of marker files",
    "fallbackcommand": "lbha runs no command when a service loses its last server; "
    "a plugin can react to the event instead",
    "checkcount": "deprecated in ldirectord (ping attempts only); lbha pings once per check",
}
_VIRTUAL_DROPPED = {
    "load": "accepted but unused by ldirectord",
    "schedflags": "lbha has no IPVS scheduler flags (-b)",
    "monitorfile": "lbha records state changes in its log and events, not a monitor file",
    "fallbackcommand": _GLOBAL_DROPPED["fallbackcommand"],
    "checkcount": _GLOBAL_DROPPED["checkcount"],
    "cleanstop": "lbha's cleanstop is global ([ipvs] cleanstop); the global value applies",
    "smtp": "lbha has one SMTP relay ([alerts.email] smtp_host); the global value applies",
    "emailalertfreq": "lbha has one repeat interval ([alerts.email] repeat)",
    "emailalertstatus": "lbha has no per-service alert filter",
}
_GLOBALS = frozenset(
    {
        "checktimeout", "negotiatetimeout", "connecttimeout", "timeout", "checkinterval",
        "failurecount", "fallback", "fallback6", "quiescent", "emailalert", "emailalertfreq",
        "emailalertstatus", "emailalertfrom", "smtp", "cleanstop", *_GLOBAL_DROPPED,
    }
)
_VIRTUALS = frozenset(
    {
        "real", "real6", "checktype", "service", "request", "receive", "checkport",
        "checkcommand", "checktimeout", "negotiatetimeout", "connecttimeout", "failurecount",
        "checkinterval", "httpmethod", "virtualhost", "login", "passwd", "database", "secret",
        "scheduler", "persistent", "netmask", "protocol", "ops", "fallback", "fallback6",
        "quiescent", "emailalert", "servicename", "comment", *_VIRTUAL_DROPPED,
    }
)


@dataclass
class Line:
    """One `name = value` directive; `raw` is the value before '#' comments were cut."""

    name: str
    value: str
    number: int
    text: str
    raw: str | None = None
    #: A global written without '=' (only `supervised` may be).
    bare: bool = False


@dataclass
class Block:
    head: Line
    lines: list[Line] = field(default_factory=list)


@dataclass
class Real:
    address: IPAddress
    port: int
    forwarding: str
    weight: int
    request: str | None
    receive: str | None
    lower: int
    upper: int
    line: Line


@dataclass
class Fallback:
    address: IPAddress
    port: int | None
    forwarding: str
    line: Line


@dataclass
class _Globals:
    """What virtual services inherit from the global section."""

    checktimeout: int | None = None
    negotiatetimeout: int | None = None
    fork: bool = False
    fallback: Fallback | None = None
    fallback6: Fallback | None = None
    scheduler_default_used: bool = False


@dataclass
class LdirectordImport:
    """The converted file: tables in output order and every VIP (for the heartbeat importer)."""

    tables: list[Table]
    vips: set[IPAddress]
    global_comments: list[ImportNote]


def _lex(text: str, source: str, out: Collector) -> tuple[list[Line], list[Block]]:
    """Split the file into global lines and virtual blocks, as ldirectord's read loop does."""
    globals_: list[Line] = []
    blocks: list[Block] = []
    block: Block | None = None
    ended_by_blank = False
    crlf_noted = False
    for number, full in enumerate(text.split("\n"), start=1):
        if full.endswith("\r"):
            full = full[:-1]
            if not crlf_noted:
                crlf_noted = True
                out.note(source, number, "(file)", "CRLF line endings: ldirectord rejects every "
                         "yes/no directive in such a file; imported as if they were LF",
                         Severity.WARNING)
        head = re.match(r"^virtual(6)?\s*=\s*(.*)$", full)
        if head:
            block = Block(Line("virtual6" if head.group(1) else "virtual", head.group(2),
                               number, full.strip()))
            blocks.append(block)
            continue
        if block is not None:
            if re.match(r"^\s*#", full):
                continue
            cut = re.sub(r"#.*", "", full).replace("\t", "    ")
            inner = re.match(r"^ {4,}(\S.*)$", cut)
            if inner:
                parsed = re.match(r"^([a-z0-9_]+)\s*=\s*(.*)$", inner.group(1))
                if parsed is None:
                    out.fail(source, number, f"unknown directive {inner.group(1).strip()!r} in "
                             "a virtual block")
                    continue
                raw = re.match(r"^\s*[a-z0-9_]+\s*=\s*(.*)$", full)
                block.lines.append(Line(parsed.group(1), parsed.group(2), number, full.strip(),
                                        raw.group(1) if raw else None))
                continue
            ended_by_blank = not cut.strip()
            block = None
        if not full.strip() or re.match(r"^\s*#", full):
            continue
        if full[0].isspace():
            why = ("a blank line ended the virtual block above" if ended_by_blank else
                   "virtual block lines need >= 4 spaces or a tab" if blocks else
                   "global directives start in column 0")
            out.fail(source, number, f"indented line outside a virtual block ({why}): "
                     f"{full.strip()!r}")
            continue
        parsed = re.match(r"^([a-z0-9_]+)\s*(?:=\s*(.*))?$", full)
        if parsed is None:
            out.fail(source, number, f"unknown directive {full.strip()!r}")
            continue
        value = parsed.group(2)
        globals_.append(Line(parsed.group(1), value or "", number, full.strip(),
                             bare=value is None))
    return globals_, blocks


class _Converter:
    """Turns lexed lines into tables; every decision that loses or changes something is noted."""

    def __init__(self, source: str, out: Collector) -> None:
        self.source = source
        self.out = out
        self.global_comments: list[ImportNote] = []
        #: The [[virtual]] being converted: notes about its lines are written into it.
        self.context: Table | None = None

    # ---- notes and value parsers -------------------------------------------------------
    def note(self, line: Line | None, message: str, severity: Severity,
             table: Table | None = None, directive: str | None = None) -> None:
        found = self.out.note(self.source, line.number if line else None,
                              directive or (line.name if line else "(defaults)"), message,
                              severity, line.text if line else None)
        table = table or (self.context if line is not None else None)
        if table is not None:
            table.comment(found.as_comment())
        else:
            self.global_comments.append(found)

    def fail(self, line: Line, message: str) -> None:
        self.out.fail(self.source, line.number, f"{line.name}: {message}")

    def yes_no(self, line: Line) -> bool | None:
        if line.value in _YES_NO:
            return _YES_NO[line.value]
        loose = line.value.split("#", 1)[0].strip()
        if loose in _YES_NO:
            self.note(line, f"ldirectord accepts only a bare 'yes' or 'no' (nothing after it) "
                      f"and would refuse this line; imported as {loose!r}", Severity.WARNING)
            return _YES_NO[loose]
        self.fail(line, f"must be 'yes' or 'no', got {line.value!r}")
        return None

    def number(self, line: Line, *, positive: bool = True) -> int | None:
        found = re.search(r"\d+", line.value)
        if found is None or (positive and int(found.group()) == 0):
            self.fail(line, f"needs a {'positive ' if positive else ''}integer, got "
                      f"{line.value!r}")
            return None
        if line.value.split("#", 1)[0].strip() != found.group():
            self.note(line, f"ldirectord reads only the first digits: {found.group()}",
                      Severity.CHANGED)
        return int(found.group())

    def quoted(self, line: Line) -> str | None:
        for candidate, lenient in ((line.value, False), (line.raw, True)):
            found = re.match(r'^"(.*)"', candidate) if candidate is not None else None
            if found and found.group(1):
                if lenient:
                    self.note(line, "ldirectord cuts virtual lines at the first '#', even inside "
                              "quotes, and would refuse this line; imported the whole string",
                              Severity.WARNING)
                return found.group(1)
        self.fail(line, f'needs a non-empty value in double quotes, got {line.value!r}')
        return None

    def port(self, line: Line, name: str, protocol: str) -> int | None:
        if name.isdigit():
            if int(name) > 65535:
                self.fail(line, f"port {name} is out of range")
                return None
            return int(name)
        try:
            port = socket.getservbyname(name, protocol) if protocol else socket.getservbyname(name)
        except OSError:
            port = _PORT_NAMES.get(name)
        if port is None:
            self.fail(line, f"unknown service name {name!r} for a port")
            return None
        self.note(line, f"port name {name!r} resolved to {port}", Severity.CHANGED)
        return port

    def address(self, line: Line, host: str, family: int, what: str) -> IPAddress | None:
        """A literal address; hostnames cannot be resolved reliably while importing offline."""
        text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if text == "localhost":
            text = "127.0.0.1" if family == 4 else "::1"
            self.note(line, f"localhost written as {text}", Severity.CHANGED)
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            self.note(line, f"{what} {host!r} is a hostname; lbha needs an IP address, so this "
                      f"{what} was not imported", Severity.ERROR)
            return None
        if address.version != family:
            self.fail(line, f"{what} {host!r} is not an IPv{family} address")
            return None
        return address

    # ---- global section ----------------------------------------------------------------
    def convert(self, globals_: list[Line], blocks: list[Block]) -> LdirectordImport:
        settings: dict[str, Line] = {}
        for line in globals_:
            if line.bare and line.name != "supervised":
                self.fail(line, "expected 'name = value'")
            elif line.name not in _GLOBALS:
                self.out.fail(self.source, line.number, f"unknown directive {line.name!r}")
            elif line.name in ("connecttimeout", "timeout"):
                self.note(line, "deprecated; ldirectord refuses to start with it (use "
                          "checktimeout / negotiatetimeout)", Severity.ERROR)
            else:
                settings[line.name] = line

        tables: list[Table] = []
        checks = Table("checks")
        ipvs = Table("ipvs")
        email = Table("alerts.email")
        g = self.global_values(settings, checks, ipvs, email)
        tables += [checks, ipvs, email]

        seen: set[tuple[str, str]] = set()
        vips: set[IPAddress] = set()
        names: set[str] = set()
        for block in blocks:
            virtual = self.virtual(block, g, seen, names)
            if virtual is None:
                continue
            tables += virtual
            address = virtual[0].get("address")
            if isinstance(address, str):
                vips.add(ipaddress.ip_address(address))
        if g.scheduler_default_used:
            self.note(None, f"not set: wrote ldirectord's default scheduler {LD_SCHEDULER!r} "
                      "explicitly (lbha's default is 'wlc')", Severity.CHANGED,
                      directive="scheduler")
        return LdirectordImport(tables, vips, self.global_comments)

    def global_values(self, s: dict[str, Line], checks: Table, ipvs: Table,
                      email: Table) -> _Globals:
        """Fill [checks], [ipvs], [alerts.email]; return what virtuals inherit."""
        g = _Globals()
        for name, line in s.items():
            if name not in _GLOBAL_DROPPED:
                continue
            if name in ("fork", "autoreload", "readdquiescent") or (
                    name == "supervised" and not line.bare):
                value = self.yes_no(line)
                g.fork = g.fork or (name == "fork" and bool(value))
            elif name == "supervised":
                self.note(line, "ldirectord warns about a bare 'supervised'", Severity.WARNING)
            elif name == "checkcount":
                self.number(line)
            elif name in ("callback", "logfile") and not re.match(r'^".*"', line.value):
                self.fail(line, "needs a value in double quotes")
            elif not line.value.strip():
                self.fail(line, "needs a value")
            self.note(line, _GLOBAL_DROPPED[name], Severity.DROPPED)

        interval = self.number(s["checkinterval"]) if "checkinterval" in s else None
        if interval is None:
            interval = LD_CHECKINTERVAL
            self.default_note("checkinterval", f"{interval}s", "5s")
        checks.set("interval", _seconds(interval))
        # Timeouts default to each other before the built-in defaults (negotiate-checks 1.4).
        ct = self.number(s["checktimeout"]) if "checktimeout" in s else None
        nt = self.number(s["negotiatetimeout"]) if "negotiatetimeout" in s else None
        g.checktimeout, g.negotiatetimeout = ct, nt
        if ct is None and nt is None:
            self.default_note("checktimeout", f"{LD_CHECKTIMEOUT}s", "3s")
            self.default_note("negotiatetimeout", f"{LD_NEGOTIATETIMEOUT}s", "5s")
        elif ct is None or nt is None:
            given = s["checktimeout" if nt is None else "negotiatetimeout"]
            self.note(given, "ldirectord uses it for both timeouts: wrote timeout and "
                      "negotiate_timeout", Severity.CHANGED)
        checks.set("timeout", _seconds(ct or nt or LD_CHECKTIMEOUT))
        checks.set("negotiate_timeout", _seconds(nt or ct or LD_NEGOTIATETIMEOUT))
        failures = self.number(s["failurecount"]) if "failurecount" in s else None
        if failures is None:
            failures = LD_FAILURECOUNT
            self.default_note("failurecount", str(failures), "2")
        checks.set("failure_count", failures)
        quiescent = self.yes_no(s["quiescent"]) if "quiescent" in s else None
        checks.set("quiescent", bool(quiescent))

        if "cleanstop" in s:
            cleanstop = self.yes_no(s["cleanstop"])
            if cleanstop is not None:
                ipvs.set("cleanstop", cleanstop)

        status = self.email_status(s["emailalertstatus"]) if "emailalertstatus" in s else "all"
        if "emailalert" in s:
            recipients = self.recipients(s["emailalert"])
            if status == "none":
                self.note(s["emailalert"], "emailalertstatus = none disables these alerts",
                          Severity.DROPPED)
            elif recipients:
                email.set("to", recipients)
        if "emailalertstatus" in s and status != "all":
            self.note(s["emailalertstatus"], "lbha sends alerts whatever the daemon status; "
                      "it has no per-status filter", Severity.DROPPED)
        if "emailalertfrom" in s:
            if s["emailalertfrom"].value.strip():
                email.set("sender", s["emailalertfrom"].value.strip())
            else:
                self.fail(s["emailalertfrom"], "no email from address specified")
        if "emailalertfreq" in s:
            found = re.match(r"^(\d+)", s["emailalertfreq"].value)
            if found is None:
                self.fail(s["emailalertfreq"], "invalid email alert frequency")
            elif int(found.group(1)):
                email.set("repeat", _seconds(int(found.group(1))))
        if "smtp" in s:
            found = re.match(r"^[0-9A-Za-z._+-]+", s["smtp"].value)
            if found is None:
                self.fail(s["smtp"], "invalid SMTP server address")
            else:
                email.set("smtp_host", found.group())
        g.fallback = self.fallback(s["fallback"], 4) if "fallback" in s else None
        g.fallback6 = self.fallback(s["fallback6"], 6) if "fallback6" in s else None
        return g

    def default_note(self, directive: str, value: str, lbha_default: str) -> None:
        self.note(None, f"not set: wrote ldirectord's default {value} explicitly (lbha's "
                  f"default is {lbha_default})", Severity.CHANGED, directive=directive)

    def recipients(self, line: Line) -> list[str]:
        value = re.sub(r'^"([^"]*)"$', r"\1", line.value.strip())
        found = [part.strip() for part in value.split(",") if part.strip()]
        if not found:
            self.fail(line, "no email address specified")
        return found

    def email_status(self, line: Line) -> str:
        parts = [part for part in re.split(r"\s*,\s*", line.value.strip()) if part]
        unknown = [part for part in parts if part not in _EMAIL_STATUSES]
        if unknown:
            self.fail(line, f"invalid email alert status {unknown[0]!r}")
        elif "none" in parts and len(parts) > 1:
            self.fail(line, "'none' cannot be combined with other statuses")
        return "none" if "none" in parts else "all" if "all" in parts else "some"

    def fallback(self, line: Line, family: int) -> Fallback | None:
        parts = line.value.split("#", 1)[0].split()
        if not 1 <= len(parts) <= 2:
            self.fail(line, f"expected HOST[:PORT] [gate|masq|ipip], got {line.value!r}")
            return None
        forward = parts[1] if len(parts) == 2 else "gate"
        if forward not in FORWARDING:
            self.fail(line, "forward method must be gate, masq or ipip")
            return None
        found = re.match(r"^(.*?)(?::(\d+|[A-Za-z0-9_-]+))?$", parts[0])
        assert found is not None  # the pattern matches every string
        host, port_name = found.group(1), found.group(2)
        if family == 6 and not host.startswith("["):
            self.fail(line, "IPv6 fallback addresses must be in brackets: [ADDRESS]:PORT")
            return None
        address = self.address(line, host, family, "fallback")
        if address is None:
            return None
        port = self.port(line, port_name, "tcp") if port_name else None
        return Fallback(address, port, FORWARDING[forward], line)

    # ---- one virtual service -----------------------------------------------------------
    def virtual(self, block: Block, g: _Globals, seen: set[tuple[str, str]],
                names: set[str]) -> list[Table] | None:
        head = block.head
        family = 6 if head.name == "virtual6" else 4
        vt = Table("virtual", array=True)
        self.context = vt
        check = Table("virtual.check")
        v: dict[str, Line] = {}
        reals: list[Line] = []
        for line in block.lines:
            if line.name not in _VIRTUALS:
                self.out.fail(self.source, line.number, f"unknown directive {line.name!r} in "
                              "a virtual block")
            elif line.name in ("real", "real6"):
                if (line.name == "real6") != (family == 6):
                    self.fail(line, f"use {'real6' if family == 6 else 'real'} in a "
                              f"{head.name} block")
                else:
                    reals.append(line)
            elif line.name in ("fallback", "fallback6") and (
                    (line.name == "fallback6") != (family == 6)):
                self.fail(line, f"use {'fallback6' if family == 6 else 'fallback'} in a "
                          f"{head.name} block")
            elif line.name == "connecttimeout":
                self.note(line, "deprecated; ldirectord refuses to start with it (use "
                          "negotiatetimeout)", Severity.ERROR, vt)
            else:
                v[line.name] = line
        for name, line in v.items():
            if name in _VIRTUAL_DROPPED:
                if name in ("load",):
                    self.quoted(line)
                self.note(line, _VIRTUAL_DROPPED[name], Severity.DROPPED, vt)

        target = self.virtual_target(head, family, v)
        if target is None:
            return None
        address, port, mark, protocol = target
        key = (protocol, f"{address}:{port}" if mark is None else str(mark))
        if key in seen:
            self.out.fail(self.source, head.number, "duplicate virtual server (same protocol "
                          "and address:port / mark as an earlier one)")
            return None
        seen.add(key)

        name = self.virtual_name(v, mark, names, vt)
        if name:
            vt.set("name", name)
        if "comment" in v:
            vt.comment(f"comment: {v['comment'].value.strip()}")
            self.note(v["comment"], "kept as a TOML comment; lbha alert mails carry no comment",
                      Severity.DROPPED)
        if address is not None:
            vt.set("address", str(address))
        if mark is not None:
            vt.set("protocol", "fwmark")
            vt.set("mark", mark)
        elif port == 0:
            vt.set("ports", "*")
            self.note(head, "port 0 (all ports) written as ports = \"*\"", Severity.CHANGED, vt)
        else:
            vt.set("ports", port)
        if mark is None:
            ops = self.yes_no(v["ops"]) if "ops" in v else False
            if ops and protocol != "udp":
                self.note(v["ops"], "one-packet scheduling applies to UDP only; ldirectord "
                          "ignores it here", Severity.DROPPED, vt)
            elif ops:
                protocol = "ops"
            if protocol != "tcp":
                vt.set("protocol", protocol)

        self.scheduling(v, vt, g)
        service = self.check(v, check, vt, g, protocol, port if mark is None else None)
        if "emailalert" in v:
            recipients = self.recipients(v["emailalert"])
            if recipients:
                vt.set("email", recipients)
                self.note(v["emailalert"], "ldirectord mails only these recipients for this "
                          "service; lbha mails them in addition to [alerts.email] to",
                          Severity.CHANGED, vt)
        fallback_t = self.virtual_fallback(v, g, family, mark, port, vt)
        real_tables = self.reals(reals, vt, check, family, mark, port, service)
        return [vt, check, *([fallback_t] if fallback_t else []), *real_tables]

    def virtual_target(
        self, head: Line, family: int, v: dict[str, Line]
    ) -> tuple[IPAddress | None, int, int | None, str] | None:
        """(address, port, mark, protocol), following ldirectord's order of patterns."""
        value = head.value
        if family == 4:
            found = re.match(r"^(\d+\.\d+\.\d+\.\d+|[0-9A-Za-z._+-]+):([0-9A-Za-z_-]+)", value)
        else:
            found = re.match(r"^(\[[0-9A-Fa-f:]+\]):([0-9A-Za-z_-]+)", value)
        if found is None and re.match(r"^\[", value) and family == 4:
            self.fail(head, "IPv6 virtual services need virtual6=")
            return None
        fwmark = re.match(r"^(\d+)", value) if found is None else None
        if found is None and fwmark is None:
            self.fail(head, f"invalid address for virtual server: {value!r}")
            return None
        match = found or fwmark
        assert match is not None
        rest = value[match.end():]
        if rest.split("#", 1)[0].strip():
            self.note(head, f"ldirectord ignores {rest.strip()!r} after the address",
                      Severity.WARNING)
        if fwmark is not None:
            mark = int(fwmark.group(1))
            if rest.strip():
                self.note(head, f"read as firewall mark {mark} (ldirectord needs "
                          "ADDRESS:PORT for an address)", Severity.WARNING)
            if not 1 <= mark <= 2**32 - 1:
                self.fail(head, f"firewall mark {mark} is out of range 1..4294967295")
                return None
            if "protocol" in v and v["protocol"].value.strip() != "fwm":
                self.fail(v["protocol"], "protocol must be fwm if the virtual service is a "
                          "fwmark (a number)")
            return None, 0, mark, "fwm"
        assert found is not None
        protocol = "udp" if re.search(r":(53|domain)$", found.group(0)) else "tcp"
        if "protocol" in v:
            word = re.match(r"^\w+", v["protocol"].value)
            if word is None or word.group() not in ("tcp", "udp"):
                self.fail(v["protocol"], "protocol must be tcp or udp if the virtual service "
                          "is an address and port")
                return None
            protocol = word.group()
        address = self.address(head, found.group(1), family, "virtual service")
        port = self.port(head, found.group(2), protocol)
        if address is None or port is None:
            return None
        return address, port, None, protocol

    def virtual_name(self, v: dict[str, Line], mark: int | None, names: set[str],
                     vt: Table) -> str | None:
        name = v["servicename"].value.strip() if "servicename" in v else None
        if name and name in names:
            self.note(v["servicename"], f"another service is already called {name!r}; this "
                      "one keeps lbha's default name", Severity.CHANGED, vt)
            name = None
        elif name:
            self.note(v["servicename"], "became the lbha service name (used in alerts)",
                      Severity.CHANGED)
        if name is None and mark is not None:
            name = f"fwmark-{mark}"
        if name:
            names.add(name)
        return name

    def scheduling(self, v: dict[str, Line], vt: Table, g: _Globals) -> None:
        scheduler = LD_SCHEDULER
        if "scheduler" in v:
            word = re.search(r"[a-z]+", v["scheduler"].value)
            if word is None:
                self.fail(v["scheduler"], "invalid scheduler, should be only lowercase letters")
            elif word.group() not in IPVS_SCHEDULERS:
                self.note(v["scheduler"], f"IPVS has no scheduler {word.group()!r}; ipvsadm "
                          f"would refuse it; wrote {LD_SCHEDULER!r}", Severity.ERROR, vt)
            else:
                scheduler = word.group()
        else:
            g.scheduler_default_used = True
        vt.set("scheduler", scheduler)
        persistent = self.number(v["persistent"], positive=False) if "persistent" in v else None
        if persistent:
            vt.set("persistence", _seconds(persistent))
        if "netmask" in v:
            mask = v["netmask"].value.strip()
            if not persistent:
                self.note(v["netmask"], "used by ldirectord only with persistent; ignored",
                          Severity.DROPPED, vt)
            elif re.fullmatch(r"\d+\.\d+\.\d+\.\d+", mask):
                vt.set("persistence_netmask", mask)
            elif re.fullmatch(r"\d+", mask) and 1 <= int(mask) <= 128:
                vt.set("persistence_netmask", int(mask))
            else:
                self.fail(v["netmask"], f"invalid netmask {mask!r}")

    def check(self, v: dict[str, Line], check: Table, vt: Table, g: _Globals,
              protocol: str, port: int | None) -> str:
        """Fill [virtual.check]; return the effective negotiate service."""
        kind, connects = "negotiate", 0
        if "checktype" in v:
            raw = v["checktype"].value
            digits = re.search(r"\d+", raw)
            word = re.search(r"[\w-]+", raw)
            if digits:
                kind, connects = "combined", int(digits.group())
            elif word and word.group() in ("connect", "negotiate", "ping", "off", "on",
                                           "external", "external-perl"):
                kind = word.group()
            else:
                self.fail(v["checktype"], "checktype must be connect, negotiate, on, off, "
                          "ping, external, external-perl or a positive number")
        service = "none" if port is None else SERVICE_BY_PORT.get(port, "none")
        if "service" in v:
            word = re.match(r"^\w+", v["service"].value)
            if word is None or word.group() not in LD_SERVICES:
                self.fail(v["service"], f"unknown service {v['service'].value!r}")
            else:
                service = word.group()
        if kind == "connect" and protocol in ("udp", "ops"):
            self.note(v["checktype"], "ldirectord runs a ping check instead of a connect check "
                      "for UDP services; imported as type = \"ping\"", Severity.CHANGED, vt)
            kind = "ping"
        if kind == "external-perl":
            self.note(v["checktype"], "lbha runs the script as a program (VIP VPORT RIP RPORT "
                      "as arguments), not inside a Perl interpreter: it needs a #! line and the "
                      "executable bit", Severity.CHANGED, vt)
        check.set("type", {"combined": "negotiate", "external-perl": "external"}.get(kind, kind))
        negotiates = kind in ("negotiate", "combined")
        if negotiates and ("service" in v or port is None or port == 0):
            check.set("service", service)
        if kind == "combined":
            check.set("connects_per_negotiate", connects)
        if "checkport" in v:
            checkport = self.number(v["checkport"])
            if checkport is not None and checkport > 65535:
                self.fail(v["checkport"], "checkport must be in range 1..65535")
            elif checkport is not None:
                check.set("port", checkport)
        if "request" in v:
            request = self.quoted(v["request"])
            if request is not None:
                check.set("request", self.request(v["request"], request, service, vt))
        if "receive" in v:
            receive = self.quoted(v["receive"])
            if receive is not None:
                check.set("receive", receive)
                if self.regex(v["receive"], receive):
                    check.set("regex", True)
                if negotiates and service in _HTTP_SERVICES:
                    self.note(v["receive"], _REDIRECT_NOTE, Severity.CHANGED, vt)
        if "virtualhost" in v:
            found = re.match(r'^"?([^"]*)"?', v["virtualhost"].value.strip())
            if found and found.group(1):
                check.set("virtualhost", found.group(1))
        if "httpmethod" in v:
            word = re.match(r"^\w+", v["httpmethod"].value)
            if word is None or word.group().upper() not in ("GET", "HEAD"):
                self.fail(v["httpmethod"], "httpmethod must be GET or HEAD")
            else:
                check.set("method", word.group().upper())
        for ld_key, key in (("login", "login"), ("passwd", "password"),
                            ("database", "database"), ("secret", "secret")):
            if ld_key in v:
                value = self.quoted(v[ld_key])
                if value is not None:
                    check.set(key, value)
        self.implicit_credentials(v, check, service)
        if kind in ("external", "external-perl"):
            command = v["checkcommand"].value.strip() if "checkcommand" in v else "/bin/true"
            command = re.sub(r'^"(.*)"$', r"\1", command)
            # ldirectord execs the path as one word (no shell): spaces belong to the path.
            check.set("command", [command] if re.search(r"\s", command) else command)
        elif "checkcommand" in v:
            self.note(v["checkcommand"], "used only by external checks", Severity.DROPPED, vt)
        self.timing(v, check, vt, g)
        if "quiescent" in v:
            quiescent = self.yes_no(v["quiescent"])
            if quiescent is not None:
                check.set("quiescent", quiescent)
        return service

    def implicit_credentials(self, v: dict[str, Line], check: Table, service: str) -> None:
        """ldirectord fills in a login (ftp, sip) and password (ftp) when service= is written."""
        if "service" not in v or service not in ("ftp", "sip"):
            return
        defaults = {"login": "anonymous" if service == "ftp" else "ldirectord@localhost"}
        if service == "ftp":
            defaults["passwd"] = "ldirectord@localhost"
        for ld_key, value in defaults.items():
            if ld_key not in v:
                check.set("login" if ld_key == "login" else "password", value)
                self.note(v["service"], f"ldirectord sets {ld_key} = {value!r} (with its host "
                          f"name) for service={service}; written explicitly", Severity.CHANGED)

    def request(self, line: Line, request: str, service: str, table: Table) -> str:
        """The request lbha must send to behave like ldirectord (see negotiate-checks 1.3)."""
        if service in _STRIP_SLASH:
            return request[1:] if request.startswith("/") else request
        if not request.startswith("/"):
            self.note(line, f"ldirectord prepends '/': written as {'/' + request!r}",
                      Severity.CHANGED, table)
            return "/" + request
        return request

    def regex(self, line: Line, receive: str) -> bool:
        """Whether `receive` must be matched as a regex (ldirectord: always a Perl regex)."""
        # Without metacharacters a substring match is the same thing, and reads simpler.
        if not _REGEX_META.search(receive):
            return False
        try:
            re.compile(receive)
        except re.error as exc:
            self.note(line, f"a Perl regex Python cannot compile ({exc}): imported as a plain "
                      "substring; fix it by hand", Severity.ERROR)
            return False
        return True

    def timing(self, v: dict[str, Line], check: Table, vt: Table, g: _Globals) -> None:
        ct = self.number(v["checktimeout"]) if "checktimeout" in v else None
        nt = self.number(v["negotiatetimeout"]) if "negotiatetimeout" in v else None
        gct, gnt = g.checktimeout, g.negotiatetimeout
        effective_ct = ct or nt or gct or gnt or LD_CHECKTIMEOUT
        effective_nt = nt or ct or gnt or gct or LD_NEGOTIATETIMEOUT
        if effective_ct != (gct or gnt or LD_CHECKTIMEOUT):
            check.set("timeout", _seconds(effective_ct))
        if effective_nt != (gnt or gct or LD_NEGOTIATETIMEOUT):
            check.set("negotiate_timeout", _seconds(effective_nt))
        if (ct is None) != (nt is None):
            given = v["checktimeout" if nt is None else "negotiatetimeout"]
            self.note(given, "ldirectord uses it for both timeouts of this service",
                      Severity.CHANGED, vt)
        if "failurecount" in v:
            count = self.number(v["failurecount"])
            if count is not None:
                check.set("failure_count", count)
        if "checkinterval" in v:
            interval = self.number(v["checkinterval"])
            if interval is not None and g.fork:
                check.set("interval", _seconds(interval))
            elif interval is not None:
                self.note(v["checkinterval"], "ldirectord ignores a per-service checkinterval "
                          "unless fork = yes; so does this import", Severity.DROPPED, vt)

    def virtual_fallback(self, v: dict[str, Line], g: _Globals, family: int,
                         mark: int | None, port: int, vt: Table) -> Table | None:
        fallback: Fallback | None = None
        for name in ("fallback", "fallback6"):
            if name in v:
                fallback = self.fallback(v[name], family)
        if fallback is None and not any(n in v for n in ("fallback", "fallback6")):
            inherited = g.fallback6 if family == 6 else g.fallback
            if inherited is not None and mark is not None:
                self.note(inherited.line, "ldirectord does not apply the global fallback to "
                          f"firewall-mark services (mark {mark})", Severity.DROPPED, vt)
            elif inherited is not None:
                fallback = inherited
        if fallback is None:
            return None
        table = Table("virtual.fallback")
        table.set("address", str(fallback.address))
        fb_port = fallback.port
        # lbha lets a loopback fallback keep its port (local delivery), like IPVS does.
        if (fb_port is not None and mark is None and fallback.forwarding != "nat"
                and fb_port != port and port != 0 and not fallback.address.is_loopback):
            self.note(fallback.line, f"{fallback.forwarding} forwarding cannot change the port "
                      f"({fb_port}); IPVS uses the service port {port}, written without a port",
                      Severity.CHANGED, vt)
            fb_port = None
        if fb_port is not None and fb_port != port:
            table.set("port", fb_port)
        if fallback.forwarding != "dr":
            table.set("forwarding", fallback.forwarding)
        return table

    # ---- real servers ------------------------------------------------------------------
    def parse_real(self, line: Line, family: int) -> list[Real]:
        found = _REAL.match(line.value.strip())
        if found is None:
            self.fail(line, f"invalid real server line (wrong format): {line.value.strip()!r}")
            return []
        first_host, last_host, port_name, flags = found.groups()
        port = self.port(line, port_name, "") if port_name else 0
        options = self.real_options(line, flags)
        if options is None or port is None:
            return []
        first = self.address(line, first_host, family, "real server")
        if first is None:
            return []
        addresses = [first]
        if last_host is not None:
            if family == 6:
                self.fail(line, "address ranges are not supported for IPv6 real servers")
                return []
            last = self.address(line, last_host, family, "real server")
            if last is None:
                return []
            if int(last) < int(first):
                self.fail(line, f"invalid range {first}->{last}: the first address must not be "
                          "greater than the last")
                return []
            addresses = [ipaddress.ip_address(i) for i in range(int(first), int(last) + 1)]
        forwarding, weight, request, receive, lower, upper = options
        return [Real(address, port, forwarding, weight, request, receive, lower, upper, line)
                for address in addresses]

    def real_options(
        self, line: Line, flags: str
    ) -> tuple[str, int, str | None, str | None, int, int] | None:
        """The part after HOST[:PORT], with ldirectord's (unanchored) regexes in its order."""
        forward = re.match(r"^(\w+)(.*)$", flags)
        if forward is None or forward.group(1) not in FORWARDING:
            self.fail(line, "forward method must be gate, masq or ipip")
            return None
        rest = forward.group(2)
        weight = 1
        request = receive = None
        lower = upper = 0
        steps = (
            ("weight", r"\s+(\d+)(.*)"),
            ("pair", r"\s+\"(.*)\"[, ]\s*\"(.*)\"(.*)"),
            ("lower", r"\s+l:(\d+)(.*)"),
            ("upper", r"\s+u:(\d+)(.*)"),
        )
        for step, pattern in steps:
            found = re.search(pattern, rest)
            if found is None:
                continue
            if rest[: found.start()].strip():
                self.note(line, f"ldirectord skips {rest[: found.start()].strip()!r} here",
                          Severity.WARNING)
            rest = found.group(found.lastindex or 0)
            if step == "weight":
                weight = int(found.group(1))
            elif step == "pair":
                request, receive = found.group(1), found.group(2)
            elif step == "lower":
                lower = int(found.group(1))
            else:
                upper = int(found.group(1))
        if rest.strip():
            self.fail(line, f"invalid real server line, around {rest.strip()!r}")
            return None
        if weight > 65535 or lower > 65535 or upper > 65535:
            self.fail(line, "weight and thresholds must be at most 65535")
            return None
        return FORWARDING[forward.group(1)], weight, request, receive, lower, upper

    def reals(self, lines: list[Line], vt: Table, check: Table, family: int, mark: int | None,
              port: int, service: str) -> list[Table]:
        reals = [real for line in lines for real in self.parse_real(line, family)]
        if not reals:
            return []
        forwarding = Counter(real.forwarding for real in reals).most_common(1)[0][0]
        if forwarding != "dr":
            vt.set("forwarding", forwarding)
        check_type = check.get("type")
        uses_port = check_type in ("negotiate", "connect") and check.get("port") is None
        tables: list[Table] = []
        seen: set[tuple[IPAddress, int]] = set()
        for real in reals:
            table = Table("virtual.real", array=True)
            table.set("address", str(real.address))
            real_port: int | None = real.port or None
            overrides: dict[str, TomlValue] = {}
            single = mark is None and port != 0
            if real_port is not None and real.forwarding != "nat" and (
                    not single or real_port != port):
                sent = f"port {port}" if single else "the client's port"
                self.note(real.line, f"{real.forwarding} forwarding cannot change the port: "
                          f"IPVS sends to {sent}; the port is kept for the check only",
                          Severity.CHANGED, vt)
                overrides["port"] = real_port
                real_port = None
            if real_port is None and real.port == 0 and mark is None and uses_port:
                # ld_checkport: no real port -> the service's default port, not the VIP's.
                default = PORT_BY_SERVICE.get(service, 0)
                if default and default != port:
                    overrides["port"] = default
                    self.note(real.line, f"ldirectord checks a real server without a port on "
                              f"the service's default port {default}; kept", Severity.WARNING,
                              vt)
                elif not default and check_type == "connect":
                    self.note(real.line, "ldirectord checks port 0 here (always down); lbha "
                              f"checks the service port {port}", Severity.CHANGED, vt)
            key = (real.address, real_port or port)
            if key in seen:
                self.note(real.line, f"{real.address} is already a real server of this service "
                          "(IPVS would refuse the second one); skipped", Severity.ERROR, vt)
                continue
            seen.add(key)
            if real_port is not None:
                table.set("port", real_port)
            if real.weight != 1:
                table.set("weight", real.weight)
            if real.lower:
                table.set("min_connections", real.lower)
            if real.upper:
                table.set("max_connections", real.upper)
            if real.forwarding != forwarding:
                table.set("forwarding", real.forwarding)
            self.real_check(real, overrides, check, service, vt)
            if overrides:
                table.set("check", overrides)
            tables.append(table)
        return tables

    def real_check(self, real: Real, overrides: dict[str, TomlValue], check: Table,
                   service: str, vt: Table) -> None:
        if real.request is None or real.receive is None:
            return
        if real.request.startswith("/"):
            # A Perl capture-variable side effect loses the receive string (negotiate-checks
            # 1.3): ldirectord silently uses the service's request/receive instead.
            self.note(real.line, "ldirectord ignores a per-server request that starts with '/' "
                      "(and its receive); so does this import. Drop the '/' to use it",
                      Severity.WARNING, vt)
            return
        if re.search(r"https?://", real.request):
            self.note(real.line, "ldirectord fetches this absolute URL instead of asking the "
                      "real server; lbha sends it to the real server", Severity.CHANGED, vt)
        overrides["request"] = self.request(real.line, real.request, service, vt)
        overrides["receive"] = real.receive
        if self.regex(real.line, real.receive) and not check.get("regex"):
            overrides["regex"] = True


def _seconds(value: int) -> str:
    return format_duration(float(value))


def convert_ldirectord(text: str, source: str, out: Collector) -> LdirectordImport:
    """Lex and convert one ldirectord.cf; syntax errors are collected in `out`, not raised."""
    globals_, blocks = _lex(text, source, out)
    return _Converter(source, out).convert(globals_, blocks)
