"""ldirectord.cf -> lbha tables ([checks], [ipvs], [alerts.email], [[virtual]]).

Lenient where ldirectord is needlessly strict (trailing blanks after yes/no, CRLF), and says
so in a warning note. The file's syntax is read by `ldirectord_syntax`, values and notes by
`ldirectord_notes`, check directives by `ldirectord_checks`; this module translates the
global section, the virtual services and their real servers.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass

from lbha.importers.ldirectord_checks import (
    LD_CHECKINTERVAL,
    LD_CHECKTIMEOUT,
    LD_FAILURECOUNT,
    LD_NEGOTIATETIMEOUT,
    CheckTranslator,
)
from lbha.importers.ldirectord_notes import seconds
from lbha.importers.ldirectord_syntax import Block, Line, lex
from lbha.importers.report import Collector, ImportNote, Severity
from lbha.importers.toml_writer import Table, TomlValue
from lbha.model import IPVS_SCHEDULERS, PORT_BY_SERVICE

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: ldirectord's default scheduler (lbha's is wlc).
LD_SCHEDULER = "wrr"

FORWARDING = {"gate": "dr", "masq": "nat", "ipip": "tun"}

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
class Globals:
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


class _Converter(CheckTranslator):
    """Turns lexed lines into tables; every decision that loses or changes something is noted."""

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
                      email: Table) -> Globals:
        """Fill [checks], [ipvs], [alerts.email]; return what virtuals inherit."""
        g = Globals()
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
        checks.set("interval", seconds(interval))
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
        checks.set("timeout", seconds(ct or nt or LD_CHECKTIMEOUT))
        checks.set("negotiate_timeout", seconds(nt or ct or LD_NEGOTIATETIMEOUT))
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
                email.set("repeat", seconds(int(found.group(1))))
        if "smtp" in s:
            found = re.match(r"^[0-9A-Za-z._+-]+", s["smtp"].value)
            if found is None:
                self.fail(s["smtp"], "invalid SMTP server address")
            else:
                email.set("smtp_host", found.group())
        g.fallback = self.fallback(s["fallback"], 4) if "fallback" in s else None
        g.fallback6 = self.fallback(s["fallback6"], 6) if "fallback6" in s else None
        return g

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
    def virtual(self, block: Block, g: Globals, seen: set[tuple[str, str]],
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

    def scheduling(self, v: dict[str, Line], vt: Table, g: Globals) -> None:
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
            vt.set("persistence", seconds(persistent))
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

    def virtual_fallback(self, v: dict[str, Line], g: Globals, family: int,
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


def convert_ldirectord(text: str, source: str, out: Collector) -> LdirectordImport:
    """Lex and convert one ldirectord.cf; syntax errors are collected in `out`, not raised."""
    globals_, blocks = lex(text, source, out)
    return _Converter(source, out).convert(globals_, blocks)
