"""ha.cf + haresources + authkeys (heartbeat R1 mode) -> lbha's [cluster] tables and key file.

Follows heartbeat 3.0.6 as described in docs/spec ha-cf.md: '#' starts a comment anywhere,
option-list directives split on blanks and commas, time values are seconds unless they end in
ms / us. Secrets from authkeys never reach the TOML, the notes or the comments.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import PurePath

from lbha.durations import format_duration
from lbha.importers.report import Collector, ImportNote, Severity
from lbha.importers.toml_writer import Table, TomlValue
from lbha.keyfile import MIN_KEY_LENGTH
from lbha.model import SERIAL_BAUDS

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Where the generated config expects the key file the CLI writes (--authkey-out).
DEFAULT_AUTH_KEY_FILE = "/etc/lbha/authkey"
HEARTBEAT_UDP_PORT = 694

_TIMES = ("keepalive", "deadtime", "warntime", "initdead", "deadping")
_BOOL = {"true": True, "on": True, "yes": True, "y": True, "1": True,
         "false": False, "off": False, "no": False, "n": False, "0": False}
_LOGGING = "lbha logs to stderr / the systemd journal"
#: ha.cf directives heartbeat accepts that lbha has no use for, and why.
_DROPPED = {
    "logfacility": _LOGGING, "logfile": _LOGGING, "debugfile": _LOGGING, "use_logd": _LOGGING,
    "conn_logd_time": _LOGGING, "log_badpack": _LOGGING, "syslogmsgfmt": _LOGGING,
    "debug": _LOGGING,
    "apiauth": "lbha has no heartbeat client API; its control socket has its own permissions",
    "hopfudge": "lbha frames are never forwarded",
    "msgfmt": "lbha has its own wire format",
    "compression": "lbha frames are never compressed",
    "compression_threshold": "lbha frames are never compressed",
    "traditional_compression": "lbha frames are never compressed",
    "realtime": "lbha takes real-time priority by default (realtime in [cluster])",
    "rtprio": "set the priority in the systemd unit (lbha-heartbeat.service)",
    "coredumps": "core dumps are systemd's business", "coreroot": "core dumps are systemd's "
    "business",
    "memreserve": "not needed by lbha", "max_rexmit_delay": "lbha does not retransmit",
    "hbgenmethod": "lbha picks a per-boot generation itself", "normalpoll": "not needed by lbha",
    "uuidfrom": "lbha peers are known by name", "autojoin": "lbha peers are listed in the config",
    "watchdog": "lbha does not drive a watchdog device; use systemd's WatchdogSec",
    "stonith": "lbha has no STONITH", "stonith_host": "lbha has no STONITH",
    "env": "set the environment in the systemd unit",
    "record_config_changes": "CRM only", "record_pengine_inputs": "CRM only",
    "enable_config_writes": "CRM only", "quorum_server": "lbha is a two-node pair",
    "failfast": "not needed by lbha", "use_apphbd": "not needed by lbha",
    "hbaping": "lbha pings IP addresses only",
    "bcast": "lbha sends unicast only; list the peer's address (ucast)",
    "mcast": "lbha sends unicast only; list the peer's address (ucast)",
    "mcast6": "lbha sends unicast only; list the peer's address (ucast)",
}
#: Directives whose line may hold secrets: never echoed into notes or comments.
_SECRET_LINES = frozenset({"stonith", "stonith_host"})
#: lbha refuses [cluster.serial] until serial links work: they stay comments.
_SERIAL = "serial links are not implemented yet (issue 16); the pair uses its UDP paths only"

_KNOWN = frozenset({"node", "udpport", "ucast", "ucast6", "serial", "baud", "auto_failback",
                    "nice_failback", "ping", "ping6", "ping_group", "respawn", "crm",
                    "pacemaker", "cluster", *_TIMES, *_DROPPED})


@dataclass
class _Line:
    name: str
    args: str
    number: int
    text: str | None


@dataclass
class HeartbeatImport:
    tables: list[Table]
    auth_key: str | None
    comments: list[ImportNote] = field(default_factory=list)


def _ms(value: int) -> str:
    return format_duration(value / 1000)


class _Converter:
    def __init__(self, out: Collector) -> None:
        self.out = out
        self.comments: list[ImportNote] = []

    def note(self, file: str, line: int | None, directive: str, message: str,
             severity: Severity, text: str | None = None) -> None:
        self.comments.append(self.out.note(file, line, directive, message, severity, text))

    def time_ms(self, file: str, line: _Line) -> int | None:
        found = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)", line.args.strip())
        unit = found.group(2).lower() if found else ""
        if found is None or (unit and not unit.startswith(("ms", "us"))):
            self.out.fail(file, line.number, f"{line.name}: invalid time {line.args.strip()!r} "
                          "(seconds, or a number ending in ms / us)")
            return None
        scale = 0.001 if unit.startswith("us") else 1 if unit.startswith("ms") else 1000
        return round(float(found.group(1)) * scale)

    # ---- ha.cf -------------------------------------------------------------------------
    def ha_cf(self, text: str, file: str) -> list[_Line]:
        lines = []
        for number, raw in enumerate(text.splitlines(), start=1):
            content = raw.split("#", 1)[0].strip()
            if not content:
                continue
            name, *rest = content.split(None, 1)
            args = rest[0] if rest else ""
            if name not in _KNOWN:
                self.out.fail(file, number, f"illegal directive {name!r}")
                continue
            lines.append(_Line(name, args, number, None if name in _SECRET_LINES else content))
        return lines

    def cluster(self, ha_cf: tuple[str, str], haresources: tuple[str, str] | None,
                authkeys: tuple[str, str] | None, node: str | None, vips: set[IPAddress],
                ldirectord_file: str | None) -> HeartbeatImport:
        file = ha_cf[1]
        lines = self.ha_cf(*ha_cf)
        cluster = Table("cluster")
        nodes: list[str] = []
        times: dict[str, int] = {}
        peer_addresses: list[IPAddress] = []
        ping_nodes: list[str] = []
        serial: list[str] = []
        baud: int | None = None
        port: int | None = None
        port_used: int | None = None
        crm_on = False
        auto_failback: bool | None = None
        for line in lines:
            tokens = [t for t in re.split(r"[\s,]+", line.args) if t]
            if line.name in _DROPPED:
                self.note(file, line.number, line.name, _DROPPED[line.name], Severity.DROPPED,
                          line.text)
                if line.name in ("bcast", "mcast", "mcast6") and port_used is None:
                    port_used = port or HEARTBEAT_UDP_PORT
            elif line.name == "node":
                nodes += [t for t in tokens if t not in nodes]
            elif line.name in _TIMES:
                value = self.time_ms(file, line)
                if value is not None:
                    times[line.name] = value
            elif line.name == "udpport":
                if not line.args.isdigit() or not 0 < int(line.args) < 65536:
                    self.out.fail(file, line.number, f"udpport: invalid port {line.args!r}")
                else:
                    port = int(line.args)
            elif line.name in ("ucast", "ucast6"):
                address = self.ucast(file, line)
                if address is not None:
                    peer_addresses.append(address)
                if port_used is None:
                    port_used = port or HEARTBEAT_UDP_PORT
            elif line.name == "serial":
                serial += tokens
                self.note(file, line.number, line.name, _SERIAL, Severity.DROPPED, line.text)
            elif line.name == "baud":
                if not line.args.isdigit() or int(line.args) not in SERIAL_BAUDS:
                    self.out.fail(file, line.number, f"baud: unsupported rate {line.args!r} "
                                  f"(lbha: {', '.join(map(str, sorted(SERIAL_BAUDS)))})")
                else:
                    baud = int(line.args)
            elif line.name in ("auto_failback", "nice_failback"):
                auto_failback = self.failback(file, line)
            elif line.name in ("ping", "ping6"):
                ping_nodes += [t for t in tokens if self.ip(file, line, t) is not None]
            elif line.name == "ping_group":
                members = tokens[1:]
                ping_nodes += [t for t in members if self.ip(file, line, t) is not None]
                self.note(file, line.number, line.name, "each member became a ping node; lbha "
                          "sees routing as failed only when no ping node answers, so a group "
                          "is the same as listing its members", Severity.CHANGED, line.text)
            elif line.name == "respawn":
                self.respawn(file, line)
            elif line.name in ("crm", "pacemaker"):
                crm_on = line.args.lower() not in ("false", "off", "no", "n", "0")
                if crm_on:
                    self.note(file, line.number, line.name, "heartbeat runs Pacemaker and "
                              "ignores haresources; only R1 (haresources) clusters can be "
                              "imported: configure the Pacemaker resources by hand",
                              Severity.ERROR, line.text)
            elif line.name == "cluster":
                cluster.set("cluster_id", line.args)
        if not nodes:
            self.note(file, None, "node", "no node directive: [cluster] not imported",
                      Severity.ERROR)
            return HeartbeatImport([], None, self.comments)

        preferred, floating = (self.haresources(*haresources, vips, ldirectord_file)
                               if haresources and not crm_on else (None, []))
        local = node or preferred or nodes[0]
        if local not in nodes:
            self.out.fail(file, None, f"node {local!r} is not listed in ha.cf (nodes: "
                          f"{', '.join(nodes)})")
            return HeartbeatImport([], None, self.comments)
        if preferred is None:
            self.note(file, None, "node", f"no preferred node in haresources: {nodes[0]!r} "
                      "(the first node) is taken as the master", Severity.WARNING)
            preferred = nodes[0]
        if preferred not in nodes:
            self.note(haresources[1] if haresources else file, None, "haresources",
                      f"preferred node {preferred!r} is not a node of ha.cf", Severity.WARNING)
        cluster.set("node", local)
        cluster.set("role", "master" if local == preferred else "slave")
        self.port(file, cluster, port, port_used)
        self.timing(file, cluster, times, bool(ping_nodes))
        if ping_nodes:
            cluster.set("ping_nodes", self.once(file, ping_nodes))
        if auto_failback is None:
            self.note(file, None, "auto_failback", "not set: heartbeat's default 'legacy' "
                      "behaves like on; wrote auto_failback = true", Severity.CHANGED)
        cluster.set("auto_failback", True if auto_failback is None else auto_failback)
        auth_key = self.authkeys(cluster, authkeys)
        if floating:
            cluster.set("floating_ips", floating)
        tables = [cluster, *self.peers(file, nodes, local, peer_addresses)]
        if baud is not None:
            self.note(file, None, "baud", _SERIAL if serial else "no serial link to use it",
                      Severity.DROPPED)
        return HeartbeatImport(tables, auth_key, self.comments)

    def ip(self, file: str, line: _Line, token: str) -> IPAddress | None:
        try:
            return ipaddress.ip_address(token)
        except ValueError:
            self.note(file, line.number, line.name, f"{token!r} is not an IP address; not "
                      "imported", Severity.ERROR, line.text)
            return None

    def ucast(self, file: str, line: _Line) -> IPAddress | None:
        words = line.args.split()
        if len(words) < 2:
            self.out.fail(file, line.number, f"{line.name}: expected 'INTERFACE PEER_ADDRESS'")
            return None
        return self.ip(file, line, words[1])

    def failback(self, file: str, line: _Line) -> bool | None:
        value = line.args.lower()
        if line.name == "nice_failback" and value in _BOOL:
            self.note(file, line.number, line.name, "old name: nice_failback on = "
                      "auto_failback off", Severity.CHANGED, line.text)
            return not _BOOL[value]
        if value == "legacy":
            self.note(file, line.number, line.name, "'legacy' behaves like on; wrote true",
                      Severity.CHANGED, line.text)
            return True
        if value not in _BOOL:
            self.out.fail(file, line.number, f"{line.name}: expected a boolean or legacy, got "
                          f"{line.args!r}")
            return None
        return _BOOL[value]

    def respawn(self, file: str, line: _Line) -> None:
        words = line.args.split()
        if len(words) >= 2 and PurePath(words[1]).name == "ipfail":
            why = "lbha watches the ping nodes itself (no ipfail process)"
        else:
            why = "lbha starts no helper programs; run it as a systemd unit"
        self.note(file, line.number, line.name, why, Severity.DROPPED, line.text)

    def port(self, file: str, cluster: Table, port: int | None, used: int | None) -> None:
        if port is not None and used is not None and used != port:
            self.note(file, None, "udpport", f"udpport comes after the first ucast/bcast line, "
                      f"so heartbeat used {used}; wrote udp_port = {used}", Severity.WARNING)
        effective = used or port or HEARTBEAT_UDP_PORT
        if port is None:
            self.note(file, None, "udpport", f"not set: kept heartbeat's port {effective} "
                      "(lbha's default is 6694)", Severity.CHANGED)
        cluster.set("udp_port", effective)

    def timing(self, file: str, cluster: Table, times: dict[str, int], pings: bool) -> None:
        """Write every heartbeat time explicitly: its defaults differ from lbha's."""
        keepalive = times.get("keepalive", 1000)
        deadtime = times.get("deadtime", 30000)
        warntime = times.get("warntime", deadtime // 2)
        if "initdead" in times:
            initdead = times["initdead"]
        else:
            initdead = deadtime if deadtime > 10000 else 12000 if deadtime < 6000 else (
                2 * deadtime)
        missing = [name for name in ("keepalive", "deadtime", "warntime", "initdead")
                   if name not in times]
        if missing:
            self.note(file, None, ", ".join(missing), "not set: wrote heartbeat's defaults "
                      "explicitly (lbha's are keepalive 1s, warntime 5s, deadtime 10s, "
                      "initdead 30s)", Severity.CHANGED)
        if deadtime <= 2 * keepalive:
            self.note(file, None, "deadtime", "must be more than twice keepalive; heartbeat "
                      "refuses this", Severity.WARNING)
        if not keepalive < warntime < deadtime <= initdead:
            self.note(file, None, "warntime", "lbha needs keepalive < warntime < deadtime <= "
                      "initdead; fix the times", Severity.WARNING)
        for key, value in (("keepalive", keepalive), ("warntime", warntime),
                           ("deadtime", deadtime), ("initdead", initdead)):
            cluster.set(key, _ms(value))
        if pings:
            cluster.set("ping_timeout", _ms(times.get("deadping", deadtime)))
        elif "deadping" in times:
            self.note(file, None, "deadping", "no ping nodes", Severity.DROPPED)

    def peers(self, file: str, nodes: list[str], local: str,
              addresses: list[IPAddress]) -> list[Table]:
        others = [n for n in nodes if n != local]
        if not others:
            self.note(file, None, "node", "only one node: no peer to import", Severity.ERROR)
            return []
        if len(others) > 1:
            self.note(file, None, "node", f"lbha runs a pair; every ucast address was given to "
                      f"each of {others}: check them", Severity.WARNING)
        if addresses:
            self.note(file, None, "ucast", "ucast lines do not say which node owns an address; "
                      "all of them became the peer's addresses (drop this node's own "
                      "address if the file lists it)", Severity.WARNING)
        else:
            self.note(file, None, "ucast", "no ucast line: add the peer's addresses by hand",
                      Severity.ERROR)
        tables = []
        for name in others:
            peer = Table("cluster.peers", array=True)
            peer.set("name", name)
            peer.set("addresses", [str(a) for a in dict.fromkeys(addresses)])
            tables.append(peer)
        return tables

    # ---- haresources -------------------------------------------------------------------
    def haresources(self, text: str, file: str, vips: set[IPAddress],
                    ldirectord_file: str | None) -> tuple[str | None, list[TomlValue]]:
        """(preferred node, floating_ips) from the resource groups."""
        preferred: str | None = None
        floating: list[TomlValue] = []
        pending, start = "", 0
        for number, raw in enumerate(text.splitlines(), start=1):
            content = raw.split("#", 1)[0].rstrip()
            if not pending:
                start = number
            if content.endswith("\\"):
                pending += content[:-1] + " "
                continue
            words = (pending + content).split()
            pending = ""
            if not words:
                continue
            if preferred is None:
                preferred = words[0]
            elif words[0] != preferred:
                self.note(file, start, words[0], f"lbha moves every floating IP together with "
                          f"the master ({preferred!r}); this group's preference is lost",
                          Severity.WARNING, " ".join(words))
            for resource in words[1:]:
                entry = self.resource(file, start, resource, vips, ldirectord_file)
                if entry is not None:
                    floating.append(entry)
        return preferred, floating

    def once(self, file: str, ping_nodes: list[str]) -> list[str]:
        """The ping nodes without repeats (a node in `ping` and in a `ping_group`)."""
        kept: dict[IPAddress, str] = {}
        for token in ping_nodes:
            address = ipaddress.ip_address(token)
            if address in kept:
                self.note(file, None, "ping", f"ping node {token} is listed more than once "
                          "(ping, ping6, ping_group); written once", Severity.CHANGED)
            kept.setdefault(address, token)
        return list(kept.values())

    def resource(self, file: str, line: int, resource: str, vips: set[IPAddress],
                 ldirectord_file: str | None) -> TomlValue | None:
        script, _, arg = resource.partition("::")
        if re.match(r"^[\d.]+(/|$)", resource):
            script, arg = "IPaddr", resource
        if script in ("IPaddr", "IPaddr2", "IPv6addr"):
            return self.ip_resource(file, line, resource, arg, vips)
        if script == "ldirectord":
            named = PurePath(arg or "ldirectord.cf").name
            if ldirectord_file is None:
                self.note(file, line, resource, f"heartbeat starts ldirectord with {named}, "
                          "which is not imported: its services are not in this config; "
                          f"import it too (`lbha import {arg or named} --ha-cf ...`)",
                          Severity.WARNING, resource)
            elif named != PurePath(ldirectord_file).name:
                self.note(file, line, resource, f"heartbeat starts ldirectord with {named}, not "
                          f"with the imported {ldirectord_file}", Severity.WARNING, resource)
            else:
                self.note(file, line, resource, "lbha healthd replaces ldirectord; its file "
                          "is the one being imported", Severity.CHANGED, resource)
            return None
        self.note(file, line, resource, "lbha starts no resource scripts; run it as a systemd "
                  "unit (or react to the failover event in a plugin)", Severity.DROPPED,
                  resource)
        return None

    def ip_resource(self, file: str, line: int, resource: str, arg: str,
                    vips: set[IPAddress]) -> TomlValue | None:
        fields = arg.split("/")
        try:
            address = ipaddress.ip_address(fields[0])
        except ValueError:
            self.note(file, line, resource, f"{fields[0]!r} is not an IP address; not imported",
                      Severity.ERROR, resource)
            return None
        prefix = fields[1] if len(fields) > 1 and fields[1] else None
        nic = fields[2] if len(fields) > 2 and not fields[2][:1].isdigit() else None
        if len(fields) > 3 or (len(fields) > 2 and nic is None):
            self.note(file, line, resource, "lbha does not set a broadcast address (the kernel "
                      "derives it)", Severity.DROPPED, resource)
        if address in vips:
            self.note(file, line, resource, "the address of a virtual service is a floating IP "
                      "automatically; its prefix and device here are not kept", Severity.CHANGED,
                      resource)
            return None
        if prefix is None:
            self.note(file, line, resource, f"no prefix: heartbeat took it from the route; lbha "
                      f"adds /{address.max_prefixlen}: add the prefix if that is wrong",
                      Severity.WARNING, resource)
        interface = f"{address}/{prefix or address.max_prefixlen}"
        try:
            ipaddress.ip_interface(interface)
        except ValueError:
            self.note(file, line, resource, f"invalid prefix {prefix!r}; not imported",
                      Severity.ERROR, resource)
            return None
        if nic is None:
            return interface
        entry: dict[str, TomlValue] = {"address": interface, "device": nic.partition(":")[0]}
        if ":" in nic:
            entry["label"] = nic
        return entry

    # ---- authkeys ----------------------------------------------------------------------
    def authkeys(self, cluster: Table, authkeys: tuple[str, str] | None) -> str | None:
        """Set auth / auth_key_file; return the key file contents (kept out of the TOML)."""
        if authkeys is None:
            cluster.set("auth_key_file", DEFAULT_AUTH_KEY_FILE)
            self.note("authkeys", None, "auth", f"no authkeys given: create "
                      f"{DEFAULT_AUTH_KEY_FILE} (mode 0600) with lines 'ID KEY'",
                      Severity.WARNING)
            return None
        text, file = authkeys
        send: int | None = None
        methods: dict[int, tuple[str, str | None, int]] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            words = raw.split()
            if not words or words[0].startswith("#"):
                continue
            if words[0] == "auth" and len(words) >= 2 and words[1].isdigit():
                send = int(words[1])
            elif words[0].isdigit() and int(words[0]) <= 15 and len(words) >= 2:
                method = words[1]
                key = words[2] if len(words) > 2 else None
                if method not in ("crc", "md5", "sha1") or (method == "crc") == (key is not None):
                    self.out.fail(file, number, f"method {method!r} "
                                  f"{'takes no key' if method == 'crc' else 'needs a key'}"
                                  if method in ("crc", "md5", "sha1") else
                                  f"unknown method {method!r} (crc, md5, sha1)")
                    continue
                methods[int(words[0])] = (method, key, number)
            else:
                # No text: the line may hold a key.
                self.out.fail(file, number, "expected 'auth N' or 'N METHOD [KEY]'")
        if send is None or send not in methods:
            self.out.fail(file, None, "no 'auth N' line naming a listed method")
            return None
        if methods[send][0] == "crc":
            cluster.set("auth", "none")
            self.note(file, methods[send][2], "crc", "crc authenticates nothing: wrote auth = "
                      "\"none\" (labs only); create a key to use hmac-sha256", Severity.WARNING)
            return None
        cluster.set("auth_key_file", DEFAULT_AUTH_KEY_FILE)
        keyed = [(index, key) for index, (_, key, _) in methods.items() if key is not None]
        # The sending key first: it is the one lbha signs with.
        keyed.sort(key=lambda item: item[0] != send)
        for index, (method, key, number) in methods.items():
            if key is None:
                self.note(file, number, method, f"key {index} (crc) has no key; dropped",
                          Severity.DROPPED)
            else:
                self.note(file, number, method, f"key {index}: {method} becomes hmac-sha256 "
                          f"with the same key, in {DEFAULT_AUTH_KEY_FILE}; heartbeat and lbha "
                          "nodes cannot talk to each other", Severity.CHANGED)
                if len(key) < MIN_KEY_LENGTH:
                    self.note(file, number, method, f"key {index} is shorter than "
                              f"{MIN_KEY_LENGTH} characters: lbha refuses the key file until "
                              "it is replaced on both nodes (`openssl rand -hex 32`)",
                              Severity.WARNING)
        return "".join(f"{index} {key}\n" for index, key in keyed)


def convert_heartbeat(ha_cf: tuple[str, str], haresources: tuple[str, str] | None,
                      authkeys: tuple[str, str] | None, *, node: str | None,
                      vips: set[IPAddress], ldirectord_file: str | None,
                      out: Collector) -> HeartbeatImport:
    """Build [cluster] tables; syntax errors are collected in `out`, not raised."""
    return _Converter(out).cluster(ha_cf, haresources, authkeys, node, vips, ldirectord_file)
