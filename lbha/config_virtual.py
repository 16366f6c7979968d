"""The `[[virtual]]` services of a config: ports, checks, plugin options, feedback,
fallback, `[[virtual.real]]` servers, and the checks across services (names, overlaps)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lbha.checkapi import SPEC_KEYS, OptionSpec, spec_keys_for
from lbha.config_schema import (
    MIN_TIMER,
    MISSING,
    Context,
    KeyPath,
    Table,
    did_you_mean,
    email_address,
    floating_problem,
    type_name,
)
from lbha.model import (
    ENGINE_CHECK_TYPES,
    IPVS_SCHEDULERS,
    SERVICE_BY_PORT,
    CheckDefaults,
    CheckSpec,
    Fallback,
    Feedback,
    FeedbackType,
    Forwarding,
    HaproxyBackend,
    HaproxyConfig,
    HttpMethod,
    IPAddress,
    PortRange,
    Protocol,
    RealServer,
    VirtualService,
)

_REAL_CHECK_KEYS = frozenset({"request", "receive", "port", "virtualhost", "regex"})


def _unused_key(name: str, key: str, used: frozenset[str]) -> str:
    reads = f"it reads only {', '.join(sorted(used))}" if used else \
        "it reads none of the keys such as request, receive or login"
    return f"the {name} check does not use {key!r} ({reads}); remove it or change the check"


def _check_spec(
    t: Table, defaults: CheckDefaults, default_service: str, extra_keys: frozenset[str]
) -> CheckSpec:
    """`extra_keys`: SPEC_KEYS something besides the check reads (HTTP feedback: virtualhost)."""
    ctx = t.ctx
    registry = ctx.checks
    known_types, known_services = ctx.check_names
    check_type = t.str("type", "negotiate")
    if ctx.judge_checks and check_type not in known_types:
        t.error("type", f"unknown check type {check_type!r}"
                f"{did_you_mean(check_type, known_types)} "
                f"(known: {', '.join(sorted(known_types))})")
        check_type = "negotiate"
    service = t.str("service")
    if ctx.judge_checks and service is not None and service not in known_services:
        t.error("service", f"unknown negotiate service {service!r}"
                f"{did_you_mean(service, known_services)}")
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
    elif command_value is not MISSING:
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


def _compile(t: Table, key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        t.error(key, f"{pattern!r} is not a valid regular expression: {exc}")


def _plugin_options(t: Table, name: str) -> MappingProxyType[str, Any]:
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


def _option_bounds(ot: Table, key: str, option: OptionSpec, value: Any) -> None:
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


def _option_value(ot: Table, key: str, option: OptionSpec) -> Any:
    if option.type == "duration":
        return ot.duration(key, option.default, positive=False)
    if option.type == "bool":
        return ot.bool(key, option.default)
    value = ot.raw(key)
    expected = {"str": (str,), "int": (int,), "float": (int, float)}[option.type]
    if isinstance(value, bool) or not isinstance(value, expected):
        shown = "" if option.secret else f" {value!r}"
        ot.error(key, f"expected {option.type}, got {type_name(value)}{shown}")
        return option.default
    return float(value) if option.type == "float" else value


# --------------------------------------------------------------------------- virtuals


def _ports(t: Table) -> tuple[tuple[PortRange, ...], bool]:
    value = t.raw("ports")
    if value is MISSING:
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


def _netmask(t: Table, family: int) -> str | None:
    value = t.raw("persistence_netmask")
    if value is MISSING:
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


def virtual_service(
    t: Table, config_checks: CheckDefaults, haproxy: HaproxyConfig
) -> VirtualService:
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
    if address is not None and (problem := floating_problem(address, None, hint)) is not None:
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
        email_address(t, ("email", i), addr)
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
    t: Table, layer: int, protocol: Protocol, haproxy: HaproxyConfig
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


def _feedback(t: Table) -> Feedback:
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


def _fallback(t: Table, vip: IPAddress | None, single: int | None) -> Fallback | None:
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
    t: Table, check: CheckSpec, forwarding: Forwarding, vip: IPAddress | None,
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


def cross_checks(ctx: Context, virtuals: list[VirtualService]) -> None:
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
