"""ldirectord's check directives (checktype, service, request / receive, credentials,
timeouts, per-server request / receive) -> an lbha [virtual.check] table."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from lbha.importers.ldirectord_notes import DirectiveReader, seconds
from lbha.importers.ldirectord_syntax import Line
from lbha.importers.report import Severity
from lbha.importers.toml_writer import Table, TomlValue
from lbha.model import SERVICE_BY_PORT

if TYPE_CHECKING:
    from lbha.importers.ldirectord import Globals, Real

#: ldirectord's code defaults where they differ from lbha's (docs/config.md).
LD_CHECKINTERVAL = 10
LD_FAILURECOUNT = 1
LD_CHECKTIMEOUT = 5
LD_NEGOTIATETIMEOUT = 30

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

_REGEX_META = re.compile(r"[.^$*+?()\[\]{}|\\]")


class CheckTranslator(DirectiveReader):
    """Translates a virtual block's check directives."""

    def check(self, v: dict[str, Line], check: Table, vt: Table, g: Globals,
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

    def timing(self, v: dict[str, Line], check: Table, vt: Table, g: Globals) -> None:
        ct = self.number(v["checktimeout"]) if "checktimeout" in v else None
        nt = self.number(v["negotiatetimeout"]) if "negotiatetimeout" in v else None
        gct, gnt = g.checktimeout, g.negotiatetimeout
        effective_ct = ct or nt or gct or gnt or LD_CHECKTIMEOUT
        effective_nt = nt or ct or gnt or gct or LD_NEGOTIATETIMEOUT
        if effective_ct != (gct or gnt or LD_CHECKTIMEOUT):
            check.set("timeout", seconds(effective_ct))
        if effective_nt != (gnt or gct or LD_NEGOTIATETIMEOUT):
            check.set("negotiate_timeout", seconds(effective_nt))
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
                check.set("interval", seconds(interval))
            elif interval is not None:
                self.note(v["checkinterval"], "ldirectord ignores a per-service checkinterval "
                          "unless fork = yes; so does this import", Severity.DROPPED, vt)

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
