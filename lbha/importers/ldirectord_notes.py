"""Directive values read the way ldirectord reads them (quoting, first-digit-run numbers,
yes/no, port names, literal addresses), and the notes an import writes: every leniency or
change is noted, in the report and as a comment in the table it concerns."""

from __future__ import annotations

import ipaddress
import re
import socket

from lbha.durations import format_duration
from lbha.importers.ldirectord_syntax import Line
from lbha.importers.report import Collector, ImportNote, Severity
from lbha.importers.toml_writer import Table

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: /etc/services names, for hosts without that file (containers often lack it).
_PORT_NAMES = {
    "ftp": 21, "ssh": 22, "telnet": 23, "smtp": 25, "domain": 53, "http": 80, "www": 80,
    "pop3": 110, "nntp": 119, "ntp": 123, "imap": 143, "imap2": 143, "snmp": 161, "ldap": 389,
    "https": 443, "submission": 587, "ldaps": 636, "imaps": 993, "pop3s": 995,
    "ms-sql-s": 1433, "radius": 1812, "mysql": 3306, "sip": 5060, "postgresql": 5432,
    "http-alt": 8080,
}


_YES_NO = {"yes": True, "no": False}


class DirectiveReader:
    """Reads directive values and writes notes for one file being converted."""

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

    def default_note(self, directive: str, value: str, lbha_default: str) -> None:
        self.note(None, f"not set: wrote ldirectord's default {value} explicitly (lbha's "
                  f"default is {lbha_default})", Severity.CHANGED, directive=directive)

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


def seconds(value: int) -> str:
    return format_duration(float(value))

