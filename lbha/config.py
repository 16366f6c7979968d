"""Load a TOML config file into the frozen model of `lbha.model`, reporting every problem.

Each problem names the file, the line (located by `lbha.toml_locator`) and the key path.
Reading goes on after a bad value (a default stands in for it), so one run lists all errors.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from lbha.checkapi import SPEC_KEYS, CheckRegistry, OptionSpec, spec_keys_for
from lbha.durations import format_duration, parse_duration
from lbha.errors import ConfigError, Problem
from lbha.keyfile import KeyFileError, read_key_file
from lbha.model import (
    BUILTIN_CHECK_TYPES,
    ENGINE_CHECK_TYPES,
    IPVS_SCHEDULERS,
    NEGOTIATE_SERVICES,
    SERIAL_BAUDS,
    SERVICE_BY_PORT,
    AlertsConfig,
    CheckDefaults,
    CheckSpec,
    ClusterConfig,
    Config,
    EmailAlerts,
    Fallback,
    Feedback,
    FeedbackType,
    FloatingIP,
    Forwarding,
    HaproxyBackend,
    HaproxyConfig,
    HttpMethod,
    InitialState,
    IPAddress,
    IpvsConfig,
    Paths,
    Peer,
    PortRange,
    Protocol,
    RealServer,
    Role,
    SnmpAlerts,
    SnmpTarget,
    VirtualService,
)
from lbha.toml_locator import Locator

DEFAULT_PATH = Path("/etc/lbha/lbha.toml")
#: A config file larger than this is refused unread (10,000 real servers take about 1 MiB).
MAX_CONFIG_BYTES = 16 * 2**20

#: Timer floors (docs/config.md, "Timer floors"): below them a setting cannot do its job on a
#: general-purpose kernel (scheduling jitter alone is a few ms) and only burns CPU or fails
#: over on noise. deadtime >= 2 x keepalive and keepalive < warntime < deadtime <= initdead
#: are checked too.
MIN_KEEPALIVE = 0.01
#: Check intervals and timeouts, feedback intervals, ping_timeout, garp_interval.
MIN_TIMER = 0.01
#: garp_refresh, when not 0 (off).
MIN_GARP_REFRESH = 0.1
#: IPVS / HAProxy reconcile intervals: each pass reads the whole kernel / HAProxy table.
MIN_RECONCILE = 0.1

KeyPath = tuple[str | int, ...]
T = TypeVar("T")
_MISSING: Any = object()


#: Keys whose value is a secret: an error about one never quotes the value.
SECRET_KEYS = frozenset({"password", "secret", "community"})


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class _Context:
    def __init__(self, source: str, text: str, checks: CheckRegistry | None,
                 judge_checks: bool = True) -> None:
        self.source = source
        self.locator = Locator(text)
        self.checks = checks
        self.judge_checks = judge_checks
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []

    @cached_property
    def check_names(self) -> tuple[frozenset[str], frozenset[str]]:
        """Check types and negotiate services known, with the plugins' (asked once)."""
        types = ENGINE_CHECK_TYPES | BUILTIN_CHECK_TYPES
        services = NEGOTIATE_SERVICES
        if self.checks is not None:
            negotiate = self.checks.negotiate_names()
            types |= {n for n in self.checks if n not in negotiate}
            services |= negotiate
        return types, services

    def _problem(self, path: KeyPath, message: str) -> Problem:
        return Problem(self.source, format_path(path), message, self.locator.line(path))

    def error(self, path: KeyPath, message: str) -> None:
        self.errors.append(self._problem(path, message))

    def warn(self, path: KeyPath, message: str) -> None:
        self.warnings.append(self._problem(path, message))


def _type_name(value: object) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "an array", dict: "a table",
    }.get(type(value), type(value).__name__)


def _did_you_mean(word: str, choices: set[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class _Table:
    """One TOML table being read; every key asked for becomes a known key."""

    def __init__(self, ctx: _Context, value: object, path: KeyPath) -> None:
        self.ctx = ctx
        self.path = path
        self.known: set[str] = set()
        if isinstance(value, dict):
            self.data: dict[str, Any] = value
        else:
            if value is not None:
                ctx.error(path, f"expected a table, got {_type_name(value)}")
            self.data = {}

    def has(self, key: str) -> bool:
        self.known.add(key)
        return key in self.data

    def raw(self, key: str) -> Any:
        self.known.add(key)
        return self.data.get(key, _MISSING)

    def error(self, key: str | int | None, message: str) -> None:
        self.ctx.error(self.path if key is None else (*self.path, key), message)

    def _get(
        self, key: str, default: T, required: bool, check: Callable[[Any], T | None], want: str
    ) -> T:
        value = self.raw(key)
        if value is _MISSING:
            if required:
                self.error(None, f"missing required key {key!r}")
            return default
        converted = check(value)
        if converted is None:
            shown = "" if key in SECRET_KEYS else f" {value!r}"
            self.error(key, f"expected {want}, got {_type_name(value)}{shown}")
            return default
        return converted

    def str(self, key: str, default: T = None, required: bool = False) -> str | T:  # type: ignore[assignment]
        return self._get(key, default, required, lambda v: v if isinstance(v, str) else None,
                         "a string")

    def bool(self, key: str, default: bool) -> bool:
        return self._get(key, default, False, lambda v: v if isinstance(v, bool) else None,
                         "true or false")

    def int(self, key: str, default: T, lo: int, hi: int, required: bool = False) -> int | T:
        value = self._get(
            key, _MISSING, required,
            lambda v: v if isinstance(v, int) and not isinstance(v, bool) else None,
            "an integer",
        )
        if value is _MISSING:
            return default
        if not lo <= value <= hi:
            self.error(key, f"{value} is out of range {lo}..{hi}")
            return default
        return value

    def duration(
        self, key: str, default: T, positive: bool = True, minimum: float = 0.0
    ) -> float | T:
        """A duration; `minimum` is a floor below which the setting cannot work (0 is "off"
        where `positive` is false, and is then allowed under the floor)."""
        value = self.raw(key)
        if value is _MISSING:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.error(key, str(exc))
            return default
        if positive and seconds <= 0:
            self.error(key, f"must be greater than 0, got {value!r}")
            return default
        if seconds < minimum and (positive or seconds > 0):
            self.error(key, f"{value!r} is below the floor of {format_duration(minimum)} "
                       "(see docs/config.md, \"Timer floors\")")
            return default
        return seconds

    def choice(self, key: str, default: T, choices: type[Any] | frozenset[str]) -> Any:
        names = (
            frozenset(str(c.value) for c in choices) if isinstance(choices, type)
            else choices
        )
        value = self.str(key, _MISSING)
        if value is _MISSING:
            return default
        if value not in names:
            self.error(key, f"{value!r} is not one of {', '.join(sorted(names))}"
                       f"{_did_you_mean(value, names)}")
            return default
        return choices(value) if isinstance(choices, type) else value

    def address(self, key: str, required: bool = False) -> IPAddress | None:
        value = self.str(key, None, required)
        return None if value is None else _parse_address(self, key, value)

    def list(self, key: str) -> list[Any]:
        value = self.raw(key)
        if value is _MISSING:
            return []
        if not isinstance(value, list):
            self.error(key, f"expected an array, got {_type_name(value)} {value!r}")
            return []
        return value

    def str_list(self, key: str) -> list[str]:
        out = []
        for i, item in enumerate(self.list(key)):
            if isinstance(item, str):
                out.append(item)
            else:
                self.ctx.error((*self.path, key, i), f"expected a string, got {item!r}")
        return out

    def address_list(self, key: str) -> tuple[IPAddress, ...]:
        found = []
        for i, item in enumerate(self.str_list(key)):
            if (addr := _parse_address(self, (key, i), item)) is not None:
                found.append(addr)
        return tuple(found)

    def table(self, key: str) -> _Table:
        return _Table(self.ctx, self.raw(key) if self.has(key) else {}, (*self.path, key))

    def tables(self, key: str) -> Iterator[_Table]:
        for i, item in enumerate(self.list(key)):
            yield _Table(self.ctx, item, (*self.path, key, i))

    def finish(self) -> None:
        for key in self.data:
            if key not in self.known:
                self.error(key, f"unknown key {key!r}{_did_you_mean(key, self.known)}")


def _parse_address(table: _Table, key: str | tuple[str, int], value: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        path = (*table.path, *(key if isinstance(key, tuple) else (key,)))
        table.ctx.error(path, f"{value!r} is not a valid IPv4 or IPv6 address")
        return None


# --------------------------------------------------------------------------- sections


SERIAL_NOT_IMPLEMENTED = (
    "serial heartbeat links are not implemented yet (issue 16): lbha would ignore this link; "
    "remove [cluster.serial] and give the peer a UDP path ([[cluster.peers]] addresses)")


def _cluster(t: _Table) -> ClusterConfig | None:
    if not t.data:
        t.finish()
        return None
    node = t.str("node", "", required=True)
    role = t.choice("role", Role.MASTER, Role) if t.has("role") else None
    if role is None:
        t.error(None, "missing required key 'role' (\"master\" or \"slave\")")
        role = Role.MASTER
    cluster_id = t.str("cluster_id", "lbha")
    if not cluster_id or len(cluster_id) > 32:
        t.error("cluster_id", "must be 1 to 32 characters")
    peers = []
    names = {node}
    for peer in t.tables("peers"):
        name = peer.str("name", "", required=True)
        if name and name in names:
            peer.error("name", f"peer name {name!r} is used twice (or is this node's own name)")
        names.add(name)
        addresses = peer.address_list("addresses")
        peers.append(Peer(name, addresses))
        peer.finish()
    if t.has("serial"):
        st = t.table("serial")
        st.str("device", "", required=True)
        baud = st.int("baud", 19200, 1, 10_000_000)
        if baud not in SERIAL_BAUDS:
            rates = ", ".join(map(str, sorted(SERIAL_BAUDS)))
            st.error("baud", f"{baud} is not a standard rate ({rates})")
        st.finish()
        # Accepted, it would do nothing: a pair cabled only by serial would start with both
        # nodes active.
        st.error(None, SERIAL_NOT_IMPLEMENTED)
    if not peers:
        t.error(None, "a cluster needs its peer: add a [[cluster.peers]] table")
    for i, peer in enumerate(peers):
        if not peer.addresses:
            t.ctx.error(("cluster", "peers", i, "addresses"),
                        "a peer needs at least one address (the UDP path to it)")
    keepalive = t.duration("keepalive", 1.0, minimum=MIN_KEEPALIVE)
    deadtime = t.duration("deadtime", 10.0)
    warntime = t.duration("warntime", deadtime / 2)
    initdead = t.duration("initdead", max(3 * deadtime, 30.0))
    if not keepalive < warntime < deadtime:
        t.error("warntime" if t.has("warntime") else "deadtime",
                f"timers must satisfy keepalive < warntime < deadtime, got keepalive "
                f"{keepalive:g}s, warntime {warntime:g}s, deadtime {deadtime:g}s")
    elif deadtime < 2 * keepalive:
        t.error("deadtime", f"deadtime {deadtime:g}s must be at least twice keepalive "
                f"({keepalive:g}s), or one lost packet declares the peer dead")
    if initdead < deadtime:
        t.error("initdead",
                f"initdead {initdead:g}s must not be shorter than deadtime {deadtime:g}s")
    auth = t.choice("auth", "hmac-sha256", frozenset({"hmac-sha256", "none"}))
    key_file = t.str("auth_key_file")
    if auth == "hmac-sha256" and not key_file:
        t.error(None, "missing 'auth_key_file' (or set auth = \"none\", for a lab only)")
    if auth == "none" and key_file:
        t.error("auth_key_file", "does nothing with auth = \"none\"; remove it, or remove "
                "auth = \"none\" to authenticate the frames")
    floating = []
    seen: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for i, item in enumerate(t.list("floating_ips")):
        fip = _floating_ip(t, i, item)
        if fip is None:
            continue
        if fip.address in seen:
            t.error(("floating_ips", i), f"floating IP {fip.address} is listed twice")
        seen.add(fip.address)
        floating.append(fip)
    result = ClusterConfig(
        node=node,
        role=role,
        peers=tuple(peers),
        cluster_id=cluster_id,
        udp_port=t.int("udp_port", 6694, 1, 65535),
        bind=t.address_list("bind"),
        serial=None,
        keepalive=keepalive,
        warntime=warntime,
        deadtime=deadtime,
        initdead=initdead,
        ping_nodes=t.address_list("ping_nodes"),
        ping_timeout=t.duration("ping_timeout", 10.0, minimum=MIN_TIMER),
        auto_failback=t.bool("auto_failback", True),
        auth=auth,
        auth_key_file=Path(key_file) if key_file and auth != "none" else None,
        floating_ips=tuple(floating),
        garp_count=t.int("garp_count", 5, 0, 100),
        garp_interval=t.duration("garp_interval", 0.2, minimum=MIN_TIMER),
        garp_refresh=t.duration("garp_refresh", 0.0, positive=False, minimum=MIN_GARP_REFRESH),
        realtime=t.bool("realtime", True),
    )
    t.finish()
    return result


def _floating_ip(t: _Table, i: int, item: object) -> FloatingIP | None:
    path = ("floating_ips", i)
    if isinstance(item, str):
        address, device, label = item, None, None
    elif isinstance(item, dict):
        ft = _Table(t.ctx, item, (*t.path, *path))
        address = ft.str("address", "", required=True)
        device = ft.str("device")
        label = ft.str("label")
        ft.finish()
        if label is not None and (len(label) > 15 or (device and not (
                label == device or label.startswith(device + ":")))):
            ft.error("label", f"label {label!r} must be at most 15 characters and be the device "
                     "name or start with 'DEVICE:'")
    else:
        t.error(path, f"expected \"ADDRESS/PREFIX\" or a table, got {item!r}")
        return None
    try:
        interface = ipaddress.ip_interface(address)
    except ValueError:
        t.ctx.error((*t.path, *path), f"{address!r} is not an address with an optional /prefix")
        return None
    hint = "it needs one: write it as a table with `device`"
    if (problem := _floating_problem(interface.ip, device, hint)) is not None:
        t.ctx.error((*t.path, *path), problem)
        return None
    return FloatingIP(interface, device, label)


def _floating_problem(address: IPAddress, device: str | None, scope_hint: str) -> str | None:
    """Why `address` cannot float (be added to an interface and announced), or None;
    `scope_hint` says how to give a link-local address its interface."""
    if address.is_multicast:
        return f"{address} is a multicast address; a floating IP must be unicast"
    if address.is_unspecified or address == ipaddress.IPv4Address("255.255.255.255"):
        return f"{address} is not a host address"
    if address.is_link_local and device is None:
        return f"{address} is link-local: it exists on every interface, so {scope_hint}"
    return None


def _check_defaults(t: _Table) -> CheckDefaults:
    defaults = CheckDefaults()
    result = CheckDefaults(
        interval=t.duration("interval", defaults.interval, minimum=MIN_TIMER),
        timeout=t.duration("timeout", defaults.timeout, minimum=MIN_TIMER),
        negotiate_timeout=t.duration("negotiate_timeout", defaults.negotiate_timeout,
                                     minimum=MIN_TIMER),
        failure_count=t.int("failure_count", defaults.failure_count, 1, 1000),
        rise=t.int("rise", defaults.rise, 1, 1000),
        quiescent=t.bool("quiescent", defaults.quiescent),
        concurrency=t.int("concurrency", defaults.concurrency, 1, 100_000),
        initial_state=t.choice("initial_state", defaults.initial_state, InitialState),
    )
    t.finish()
    return result


def _email_address(t: _Table, key: str | tuple[str, int], value: str) -> None:
    if not re.fullmatch(r"[^@\s]+@[^@\s]+", value):
        path = (*t.path, *(key if isinstance(key, tuple) else (key,)))
        t.ctx.error(path, f"{value!r} is not an email address")


def _alerts(t: _Table) -> AlertsConfig:
    et = t.table("email")
    to = et.str_list("to")
    for i, addr in enumerate(to):
        _email_address(et, ("to", i), addr)
    sender = et.str("sender", "lbha@localhost")
    _email_address(et, "sender", sender)
    email = EmailAlerts(
        to=tuple(to),
        sender=sender,
        smtp_host=et.str("smtp_host", "localhost"),
        smtp_port=et.int("smtp_port", 25, 1, 65535),
        starttls=et.bool("starttls", False),
        username=et.str("username"),
        password=et.str("password"),
        repeat=et.duration("repeat", 0.0, positive=False),
        rate_limit=et.int("rate_limit", 60, 1, 100_000),
    )
    et.finish()
    st = t.table("snmp")
    targets = []
    for i, item in enumerate(st.str_list("targets")):
        match = re.fullmatch(r"\[?([^\]]+?)\]?(?::(\d+))?", item)
        if item.count(":") > 1 and not item.startswith("["):
            match = re.fullmatch(r"([0-9A-Fa-f:.]+)()", item)
        address = _parse_address(st, ("targets", i), match.group(1)) if match else None
        port = int(match.group(2)) if match and match.group(2) else 162
        if match is None or not 1 <= port <= 65535:
            st.ctx.error((*st.path, "targets", i), f"{item!r} is not HOST or HOST:PORT")
        elif address is not None:
            targets.append(SnmpTarget(address, port))
    snmp = SnmpAlerts(
        targets=tuple(targets),
        community=st.str("community", "public"),
        version=st.choice("version", "2c", frozenset({"1", "2c"})),
    )
    st.finish()
    t.finish()
    return AlertsConfig(email, snmp)


def _paths(t: _Table) -> Paths:
    result = Paths(
        run_dir=Path(t.str("run_dir", "/run/lbha")),
        state_dir=Path(t.str("state_dir", "/var/lib/lbha")),
        damaged_state=t.choice("damaged_state", "online",
                               frozenset({"online", "drain", "halt"})),
    )
    t.finish()
    return result


def _ipvs(t: _Table) -> IpvsConfig:
    result = IpvsConfig(
        cleanstop=t.bool("cleanstop", True),
        reconcile_interval=t.duration("reconcile_interval", 30.0, minimum=MIN_RECONCILE),
    )
    t.finish()
    return result


def _haproxy(t: _Table) -> HaproxyConfig:
    result = HaproxyConfig(
        socket=t.str("socket"),
        reconcile_interval=t.duration("reconcile_interval", 10.0, minimum=MIN_RECONCILE),
    )
    t.finish()
    return result


# --------------------------------------------------------------------------- checks


_REAL_CHECK_KEYS = frozenset({"request", "receive", "port", "virtualhost", "regex"})


def _unused_key(name: str, key: str, used: frozenset[str]) -> str:
    reads = f"it reads only {', '.join(sorted(used))}" if used else \
        "it reads none of the keys such as request, receive or login"
    return f"the {name} check does not use {key!r} ({reads}); remove it or change the check"


def _check_spec(
    t: _Table, defaults: CheckDefaults, default_service: str, extra_keys: frozenset[str]
) -> CheckSpec:
    """`extra_keys`: SPEC_KEYS something besides the check reads (HTTP feedback: virtualhost)."""
    ctx = t.ctx
    registry = ctx.checks
    known_types, known_services = ctx.check_names
    check_type = t.str("type", "negotiate")
    if ctx.judge_checks and check_type not in known_types:
        t.error("type", f"unknown check type {check_type!r}"
                f"{_did_you_mean(check_type, known_types)} "
                f"(known: {', '.join(sorted(known_types))})")
        check_type = "negotiate"
    service = t.str("service")
    if ctx.judge_checks and service is not None and service not in known_services:
        t.error("service", f"unknown negotiate service {service!r}"
                f"{_did_you_mean(service, known_services)}")
        service = None
    if service is not None and check_type != "negotiate":
        t.error("service", f"does nothing: type is {check_type!r}, not \"negotiate\"; remove "
                "it or set type = \"negotiate\"")
    if check_type == "negotiate" and service is None:
        service = default_service
    command_value = t.raw("command")
    command: tuple[str, ...] = ()
    if isinstance(command_value, str) and command_value:
        command = (command_value,)
    elif (isinstance(command_value, list) and command_value
          and all(isinstance(c, str) and c for c in command_value)):
        command = tuple(command_value)
    elif command_value is not _MISSING:
        t.error("command", f"expected a path or a list [path, arg, ...], got {command_value!r}")
    connects = t.int("connects_per_negotiate", 0, 0, 1_000_000)
    if connects and check_type != "negotiate":
        t.error("connects_per_negotiate", "only applies to type = \"negotiate\"")
    method_name = t.str("method", "GET").upper()
    if method_name not in HttpMethod.__members__:
        t.error("method", f"{method_name!r} is not GET or HEAD")
        method_name = "GET"
    receive = t.str("receive")
    regex = t.bool("regex", False)
    if regex and receive is not None:
        _compile(t, "receive", receive)
    ca_file = t.str("ca_file")
    name = service if check_type == "negotiate" and service else check_type
    used, _ = spec_keys_for(ctx.checks, name)
    for key in sorted(SPEC_KEYS - (SPEC_KEYS if used is None else used) - extra_keys):
        if key in t.data:
            t.error(key, _unused_key(name, key, used or frozenset()))
    options = _plugin_options(t, name)
    spec = CheckSpec(
        type=check_type,
        service=service if check_type == "negotiate" else None,
        port=t.int("port", None, 1, 65535),
        request=t.str("request"),
        receive=receive,
        regex=regex,
        virtualhost=t.str("virtualhost"),
        method=HttpMethod[method_name],
        login=t.str("login"),
        password=t.str("password"),
        database=t.str("database"),
        secret=t.str("secret"),
        command=command,
        connects_per_negotiate=connects,
        verify_tls=t.bool("verify_tls", False),
        ca_file=Path(ca_file) if ca_file else None,
        interval=t.duration("interval", defaults.interval, minimum=MIN_TIMER),
        timeout=t.duration("timeout", defaults.timeout, minimum=MIN_TIMER),
        negotiate_timeout=t.duration("negotiate_timeout", defaults.negotiate_timeout,
                                     minimum=MIN_TIMER),
        failure_count=t.int("failure_count", defaults.failure_count, 1, 1000),
        rise=t.int("rise", defaults.rise, 1, 1000),
        quiescent=t.bool("quiescent", defaults.quiescent),
        options=options,
    )
    if registry is not None and name not in registry and name not in ENGINE_CHECK_TYPES \
            and name != "none":
        t.ctx.warn(t.path, f"no installed plugin provides check {name!r} yet; "
                   "servers using it cannot be checked")
    t.finish()
    return spec


def _compile(t: _Table, key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        t.error(key, f"{pattern!r} is not a valid regular expression: {exc}")


def _plugin_options(t: _Table, name: str) -> MappingProxyType[str, Any]:
    ot = t.table("options")
    registry = t.ctx.checks
    if registry is None or name not in registry:
        ot.known.update(ot.data)
        return MappingProxyType(dict(ot.data))
    schema: dict[str, OptionSpec] = dict(registry.get(name).options)
    values: dict[str, Any] = {}
    for key, option in schema.items():
        if not ot.has(key):
            if option.required:
                ot.error(None, f"check {name!r} needs option {key!r}")
            values[key] = option.default
            continue
        values[key] = _option_value(ot, key, option)
        _option_bounds(ot, key, option, values[key])
    ot.finish()
    return MappingProxyType(values)


def _option_bounds(ot: _Table, key: str, option: OptionSpec, value: Any) -> None:
    if option.choices is not None and value not in option.choices:
        ot.error(key, f"{value!r} is not one of {', '.join(map(repr, option.choices))}")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if option.minimum is not None and value < option.minimum:
            ot.error(key, f"{value!r} is below the minimum {option.minimum:g}")
        elif option.maximum is not None and value > option.maximum:
            ot.error(key, f"{value!r} is above the maximum {option.maximum:g}")
    if option.validate is not None and value is not None:
        try:
            option.validate(value)
        except ValueError as exc:
            ot.error(key, str(exc))


def _option_value(ot: _Table, key: str, option: OptionSpec) -> Any:
    if option.type == "duration":
        return ot.duration(key, option.default, positive=False)
    if option.type == "bool":
        return ot.bool(key, option.default)
    value = ot.raw(key)
    expected = {"str": (str,), "int": (int,), "float": (int, float)}[option.type]
    if isinstance(value, bool) or not isinstance(value, expected):
        shown = "" if option.secret else f" {value!r}"
        ot.error(key, f"expected {option.type}, got {_type_name(value)}{shown}")
        return option.default
    return float(value) if option.type == "float" else value


# --------------------------------------------------------------------------- virtuals


def _ports(t: _Table) -> tuple[tuple[PortRange, ...], bool]:
    value = t.raw("ports")
    if value is _MISSING:
        return (), False
    if value == "*":
        return (), True
    items = value if isinstance(value, list) else [value]
    ranges: list[PortRange] = []
    where: list[KeyPath] = []
    for i, item in enumerate(items):
        path: str | tuple[str, int] = ("ports", i) if isinstance(value, list) else "ports"
        at = (*t.path, *(path if isinstance(path, tuple) else (path,)))
        rng = _port_range(item)
        if rng is None:
            t.ctx.error(at, f"expected a port 1..65535, a range like \"1024-5000\" or \"*\", "
                        f"got {item!r}")
            continue
        ranges.append(rng)
        where.append(at)
    # Swept in port order (a list of thousands of ports must not cost n^2): each range is
    # compared with the one reaching furthest before it, reported at the later-listed one.
    widest: int | None = None
    for n in sorted(range(len(ranges)), key=lambda n: (ranges[n].first, n)):
        if widest is not None and ranges[n].first <= ranges[widest].last:
            later, other = max(n, widest), min(n, widest)
            t.ctx.error(where[later], f"port {ranges[later]} overlaps port {ranges[other]} of "
                        "the same service")
        if widest is None or ranges[n].last > ranges[widest].last:
            widest = n
    return tuple(ranges), False


def _port_range(item: object) -> PortRange | None:
    if isinstance(item, int) and not isinstance(item, bool):
        first = last = item
    elif isinstance(item, str) and (m := re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", item)):
        first, last = int(m.group(1)), int(m.group(2))
    elif isinstance(item, str) and item.strip().isdigit():
        first = last = int(item)
    else:
        return None
    if not 1 <= first <= last <= 65535:
        return None
    return PortRange(first, last)


def _netmask(t: _Table, family: int) -> str | None:
    value = t.raw("persistence_netmask")
    if value is _MISSING:
        return None
    if family == 6:
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 128:
            return str(value)
        t.error("persistence_netmask",
                f"an IPv6 service takes a prefix length 1..128, got {value!r}")
        return None
    try:
        ipaddress.IPv4Network(f"0.0.0.0/{value}")
    except (ValueError, TypeError):
        t.error("persistence_netmask", f"{value!r} is not an IPv4 netmask like 255.255.255.0")
        return None
    return str(ipaddress.IPv4Network(f"0.0.0.0/{value}").netmask)


def _virtual(t: _Table, config_checks: CheckDefaults, haproxy: HaproxyConfig) -> VirtualService:
    layer = t.int("layer", 4, 4, 7)
    if layer not in (4, 7):
        t.error("layer", f"layer must be 4 (IPVS) or 7 (HAProxy), got {layer}")
        layer = 4
    protocol = t.choice("protocol", Protocol.TCP, Protocol)
    mark = t.int("mark", None, 1, 2**32 - 1)
    if protocol == Protocol.FWMARK and mark is None and not t.has("mark"):
        t.error(None, "a fwmark service needs 'mark' (the firewall mark)")
    if protocol != Protocol.FWMARK and mark is not None:
        t.error("mark", "only applies to protocol = \"fwmark\"")
    address = t.address("address", required=protocol != Protocol.FWMARK)
    hint = "it cannot be a virtual service address (which has no interface); use a global one"
    if address is not None and (problem := _floating_problem(address, None, hint)) is not None:
        t.error("address", problem)
    ports, all_ports = _ports(t)
    if protocol == Protocol.FWMARK and (ports or all_ports):
        t.error("ports", "a fwmark service matches packets by mark and takes no ports")
    elif protocol != Protocol.FWMARK and not ports and not all_ports and not t.has("ports") \
            and address is not None:
        t.error(None, "missing required key 'ports' (a port, a list, a range or \"*\")")
    forwarding = t.choice("forwarding", Forwarding.DR, Forwarding)
    scheduler = t.choice("scheduler", "wlc", IPVS_SCHEDULERS)
    persistence = t.duration("persistence", None)
    if all_ports and persistence is None:
        t.error("ports", "ports = \"*\" needs 'persistence' (IPVS only allows persistent "
                "all-port services)")
    family = address.version if address is not None else 4
    netmask = _netmask(t, family)
    if netmask is not None and persistence is None:
        t.error("persistence_netmask", "only applies with 'persistence' set")
    first_port = ports[0].first if ports else None
    default_service = "none" if first_port is None else SERVICE_BY_PORT.get(first_port, "none")
    feedback = _feedback(t.table("feedback"))
    extra = frozenset({"virtualhost"}) if feedback.type is FeedbackType.HTTP else frozenset()
    check = _check_spec(t.table("check"), config_checks, default_service, extra)
    email = t.str_list("email")
    for i, addr in enumerate(email):
        _email_address(t, ("email", i), addr)
    layer7 = _layer7(t, layer, protocol, haproxy)
    single = first_port if len(ports) == 1 and len(ports[0]) == 1 else None
    fallback = _fallback(t.table("fallback"), address, single) if t.has("fallback") else None
    name = t.str("name")
    if name is None:
        where = str(address) if address is not None else f"fwmark {mark}"
        name = where if not ports else f"{where}:{','.join(map(str, ports))}"
        if all_ports:
            name = f"{where}:*"
        name += f"/{protocol}" if protocol != Protocol.FWMARK else ""
    elif not name.strip():
        t.error("name", "must not be empty")
    used, required = spec_keys_for(t.ctx.checks, check.check_name)
    reals = _reals(t, check, forwarding, address, single, layer,
                   SPEC_KEYS if used is None else used | extra)
    for key, what in required.items():
        if any(not getattr(spec, key) for spec in [r.check for r in reals] or [check]):
            t.error("check", f"the {check.check_name} check needs {key!r} ({what}): without "
                    "it the check can never pass")
    t.finish()
    return VirtualService(
        name=name,
        layer=layer,
        address=address,
        ports=ports,
        all_ports=all_ports,
        protocol=protocol,
        mark=mark,
        forwarding=forwarding,
        scheduler=scheduler,
        persistence=persistence,
        persistence_netmask=netmask,
        check=check,
        feedback=feedback,
        fallback=fallback,
        email=tuple(email),
        haproxy=layer7,
        reals=reals,
    )


def _layer7(
    t: _Table, layer: int, protocol: Protocol, haproxy: HaproxyConfig
) -> HaproxyBackend | None:
    if layer == 4:
        if t.has("haproxy"):
            t.error("haproxy", "only layer 7 services name a HAProxy backend; set layer = 7")
        return None
    for key in ("forwarding", "scheduler", "persistence", "persistence_netmask"):
        if key in t.data:
            t.error(key, "does not apply to a layer 7 (HAProxy) service")
    if protocol != Protocol.TCP:
        t.error("protocol", "a layer 7 (HAProxy) service is tcp only")
    ht = t.table("haproxy")
    backend = ht.str("backend", "", required=True)
    socket = ht.str("socket", haproxy.socket)
    if not socket:
        ht.error(None, "missing 'socket' (HAProxy runtime API: a unix path or HOST:PORT), "
                 "here or in [haproxy]")
    ht.finish()
    return HaproxyBackend(backend, socket or "")


def _feedback(t: _Table) -> Feedback:
    ftype = t.choice("type", FeedbackType.NONE, FeedbackType)
    path = t.str("path", "/")
    if not path.startswith("/"):
        t.error("path", f"must start with '/', got {path!r}")
    result = Feedback(
        type=ftype,
        port=t.int("port", 3333, 1, 65535),
        path=path,
        interval=t.duration("interval", None, minimum=MIN_TIMER),
    )
    t.finish()
    return result


def _fallback(t: _Table, vip: IPAddress | None, single: int | None) -> Fallback | None:
    address = t.address("address", required=True)
    port = t.int("port", None, 1, 65535)
    forwarding = t.choice("forwarding", Forwarding.DR, Forwarding)
    persistent = t.bool("persistent", False)
    t.finish()
    if address is None:
        return None
    if vip is not None and address.version != vip.version:
        t.error("address", f"fallback {address} is IPv{address.version} but the service "
                f"address {vip} is IPv{vip.version}")
    if forwarding != Forwarding.NAT and port is not None and single is not None \
            and port != single and not address.is_loopback:
        t.error("port", f"{forwarding} forwarding cannot remap port {single} to {port}; "
                "use forwarding = \"nat\" or drop 'port'")
    return Fallback(address, port, persistent, forwarding)


def _reals(
    t: _Table, check: CheckSpec, forwarding: Forwarding, vip: IPAddress | None,
    single: int | None, layer: int, used: frozenset[str],
) -> tuple[RealServer, ...]:
    """`used`: the SPEC_KEYS the service's check reads; a real server may override those."""
    reals: list[RealServer] = []
    names: set[str] = set()
    endpoints: set[tuple[IPAddress, int | None]] = set()
    family = vip.version if vip is not None else None
    for rt in t.tables("real"):
        address = rt.address("address", required=True)
        port = rt.int("port", None, 1, 65535)
        fwd = rt.choice("forwarding", forwarding, Forwarding)
        if layer == 7 and "forwarding" in rt.data:
            rt.error("forwarding", "does not apply to a layer 7 (HAProxy) service")
        weight = rt.int("weight", 1, 0, 65535)
        low = rt.int("min_connections", 0, 0, 65535)
        high = rt.int("max_connections", 0, 0, 65535)
        if high and low > high:
            rt.error("min_connections", f"min_connections {low} is above max_connections {high}")
        override = rt.table("check")
        changes: dict[str, Any] = {}
        for key in sorted(_REAL_CHECK_KEYS):
            if key == "port":
                value = override.int("port", None, 1, 65535)
            elif key == "regex":
                value = override.bool("regex", check.regex) if override.has("regex") else None
            else:
                value = override.str(key)
            if value is not None:
                changes[key] = value
        if changes.get("regex", check.regex) and "receive" in changes:
            _compile(override, "receive", changes["receive"])
        for key in sorted(changes.keys() & SPEC_KEYS - used):
            override.error(key, _unused_key(check.check_name, key, used))
        override.finish()
        name = rt.str("name")
        if address is None:
            rt.finish()
            continue
        if family is None:
            family = address.version
        elif address.version != family:
            rt.error("address", f"{address} is IPv{address.version} but this service is "
                     f"IPv{family}: one family per service")
        if layer == 4 and port is not None and fwd != Forwarding.NAT:
            if single is None:
                rt.error("port", f"a {fwd} real server of a multi-port or fwmark service cannot "
                         "have its own port: IPVS keeps the client's port")
            elif port != single:
                rt.error("port", f"{fwd} forwarding cannot remap port {single} to {port} "
                         "(IPVS keeps the virtual port); use forwarding = \"nat\" or drop 'port'")
        if name is None:
            name = f"{address}:{port}" if port is not None else str(address)
        if name in names:
            rt.error("name", f"real server name {name!r} is used twice in this service")
        names.add(name)
        if (address, port) in endpoints:
            rt.error("address", f"real server {name} is listed twice in this service")
        endpoints.add((address, port))
        reals.append(RealServer(
            name=name,
            address=address,
            port=port,
            weight=weight,
            min_connections=low,
            max_connections=high,
            forwarding=fwd,
            check=replace(check, **changes) if changes else check,
        ))
        rt.finish()
    return tuple(reals)


def _protocols(virtual: VirtualService) -> tuple[str, ...]:
    return {
        Protocol.TCP: ("tcp",), Protocol.UDP: ("udp",), Protocol.OPS: ("udp",),
        Protocol.TCP_UDP: ("tcp", "udp"), Protocol.FWMARK: ("fwmark",),
    }[virtual.protocol]


def _cross_checks(ctx: _Context, virtuals: list[VirtualService]) -> None:
    names: dict[str, int] = {}
    for i, virtual in enumerate(virtuals):
        if virtual.name in names:
            ctx.error(("virtual", i, "name"),
                      f"virtual service name {virtual.name!r} is already used by "
                      f"virtual[{names[virtual.name]}]")
        names.setdefault(virtual.name, i)
        if virtual.address is not None and virtual.reals and virtual.address.version != \
                virtual.reals[0].address.version:
            ctx.error(("virtual", i, "real", 0, "address"),
                      f"{virtual.reals[0].address} is not of the family of the service "
                      f"address {virtual.address}")
    for i, j, clash in sorted(_overlaps(virtuals)):
        ctx.error(("virtual", i), f"{clash} is also served by virtual[{j}] "
                  f"({virtuals[j].name!r})")


def _overlaps(virtuals: list[VirtualService]) -> set[tuple[int, int, str]]:
    """(later index, earlier index, what both serve) for layer 4 services that overlap.

    Services are grouped by what IPVS keys them on (address and protocol, or fwmark) and each
    group's port ranges are swept in order, so 10,000 services cost n log n, not n^2.
    """
    groups: dict[tuple[Any, ...], list[tuple[int, int, int]]] = {}
    for i, virtual in enumerate(virtuals):
        if virtual.layer != 4:
            continue
        if virtual.protocol == Protocol.FWMARK:
            groups.setdefault(("fwmark", virtual.mark, virtual.family), []).append((0, 0, i))
            continue
        ranges = [(1, 65535)] if virtual.all_ports else [(r.first, r.last) for r in virtual.ports]
        for proto in _protocols(virtual):
            for first, last in ranges:
                groups.setdefault((virtual.address, proto), []).append((first, last, i))
    found: set[tuple[int, int, str]] = set()
    for key, ranges in groups.items():
        ranges.sort()
        widest: tuple[int, int, int] | None = None  # the range reaching furthest so far
        for first, last, i in ranges:
            if widest is not None and first <= widest[1] and widest[2] != i:
                a, b = virtuals[i], virtuals[widest[2]]
                if key[0] == "fwmark":
                    clash = f"fwmark {a.mark}"
                elif a.all_ports or b.all_ports:
                    clash = f"{a.address}:*/{key[1]}"
                else:
                    clash = f"{a.address}:{first}/{key[1]}"
                found.add((max(i, widest[2]), min(i, widest[2]), clash))
            if widest is None or last > widest[1]:
                widest = (first, last, i)
    return found


# --------------------------------------------------------------------------- entry points


def load_config_text(
    text: str,
    source: str = "<string>",
    *,
    checks: CheckRegistry | None = None,
    warnings: list[Problem] | None = None,
    files: bool = False,
    judge_checks: bool = True,
) -> Config:
    """Validate TOML text; raise ConfigError listing every problem found.

    With `checks`, check types and plugin options are validated against installed plugins.
    Without `judge_checks`, check type and service names are not judged at all: for the
    heartbeat, which loads no check plugin (healthd and `lbha config check` judge them).
    Warnings (valid but doubtful settings) are appended to `warnings` when it is given.
    With `files`, files the config names are read too (the auth key file), as
    `lbha config check` does; the daemons read them themselves when they need them.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        raise ConfigError([Problem(source, "", f"not valid TOML: {exc}",
                                   int(match.group(1)) if match else None)]) from None
    ctx = _Context(source, text, checks, judge_checks)
    root = _Table(ctx, data, ())
    cluster = _cluster(root.table("cluster"))
    check_defaults = _check_defaults(root.table("checks"))
    alerts = _alerts(root.table("alerts"))
    paths = _paths(root.table("paths"))
    ipvs = _ipvs(root.table("ipvs"))
    haproxy = _haproxy(root.table("haproxy"))
    virtuals = [_virtual(vt, check_defaults, haproxy) for vt in root.tables("virtual")]
    allow_empty = root.bool("allow_empty", False)
    root.finish()
    if cluster is None and not virtuals and not allow_empty and not data.get("virtual"):
        ctx.error((), "this config manages nothing: no [[virtual]] service and no [cluster] "
                  "(a reload to it would remove every managed service); add them, or write "
                  "allow_empty = true at the top of the file if that is meant")
    _cross_checks(ctx, virtuals)
    if files and cluster is not None and cluster.auth_key_file is not None:
        try:
            read_key_file(cluster.auth_key_file)
        except KeyFileError as exc:
            ctx.error(("cluster", "auth_key_file"), str(exc))
    if cluster is not None:
        vips = {v.address for v in virtuals if v.address is not None}
        for i, fip in enumerate(cluster.floating_ips):
            if fip.address in vips:
                ctx.warn(("cluster", "floating_ips", i),
                         f"{fip.address} is a virtual service address, already floating")
    if warnings is not None:
        warnings.extend(ctx.warnings)
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return Config(
        source=Path(source) if source != "<string>" else None,
        cluster=cluster,
        checks=check_defaults,
        alerts=alerts,
        paths=paths,
        ipvs=ipvs,
        haproxy=haproxy,
        virtuals=tuple(virtuals),
        allow_empty=allow_empty,
    )


def load_config(
    path: str | Path,
    *,
    checks: CheckRegistry | None = None,
    warnings: list[Problem] | None = None,
    files: bool = False,
    judge_checks: bool = True,
) -> Config:
    """Read and validate a config file; see load_config_text."""
    return load_config_text(read_config_file(path), str(path), checks=checks,
                            warnings=warnings, files=files, judge_checks=judge_checks)


def read_config_file(path: str | Path) -> str:
    """The text of a config file: a regular file of at most MAX_CONFIG_BYTES of UTF-8.

    Opened without blocking, so a FIFO or a device given by mistake is refused, not waited on.
    """
    def refuse(message: str) -> ConfigError:
        return ConfigError([Problem(str(path), "", message)])

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise refuse(f"cannot read: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse("cannot read: not a regular file (a config is a plain TOML file)")
        if st.st_size > MAX_CONFIG_BYTES:
            raise refuse(f"cannot read: {st.st_size} bytes is over the limit of "
                         f"{MAX_CONFIG_BYTES // 2**20} MiB for a config file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise refuse(f"cannot read: {exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:  # it grew while being read
        raise refuse(f"cannot read: over the limit of {MAX_CONFIG_BYTES // 2**20} MiB "
                     "for a config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"cannot read: not UTF-8 text: {exc}") from None
