"""Load a TOML config file into the frozen model of `lbha.model`, reporting every problem.

Each problem names the file, the line (located by `lbha.toml_locator`) and the key path.
Reading goes on after a bad value (a default stands in for it), so one run lists all errors.

This module holds the entry points and the node-wide sections ([cluster], [checks], [alerts],
[paths], [ipvs], [haproxy]); the `[[virtual]]` services live in `lbha.config_virtual`, and
the typed key reading both use in `lbha.config_schema`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from pathlib import Path

from lbha.checkapi import CheckRegistry
from lbha.config_schema import (
    MIN_GARP_REFRESH,
    MIN_KEEPALIVE,
    MIN_RECONCILE,
    MIN_TIMER,
    SECRET_KEYS,
    Context,
    Table,
    email_address,
    floating_problem,
    parse_address,
)
from lbha.config_virtual import cross_checks, virtual_service
from lbha.errors import ConfigError, Problem
from lbha.keyfile import KeyFileError, read_key_file
from lbha.model import (
    SERIAL_BAUDS,
    AlertsConfig,
    CheckDefaults,
    ClusterConfig,
    Config,
    EmailAlerts,
    FloatingIP,
    HaproxyConfig,
    InitialState,
    IpvsConfig,
    Paths,
    Peer,
    Role,
    SnmpAlerts,
    SnmpTarget,
)

__all__ = [
    "DEFAULT_PATH", "MAX_CONFIG_BYTES", "SECRET_KEYS", "load_config", "load_config_text",
    "read_config_file",
]

DEFAULT_PATH = Path("/etc/lbha/lbha.toml")
#: A config file larger than this is refused unread (10,000 real servers take about 1 MiB).
MAX_CONFIG_BYTES = 16 * 2**20


# --------------------------------------------------------------------------- sections


SERIAL_NOT_IMPLEMENTED = (
    "serial heartbeat links are not implemented yet (issue 16): lbha would ignore this link; "
    "remove [cluster.serial] and give the peer a UDP path ([[cluster.peers]] addresses)")


def _cluster(t: Table) -> ClusterConfig | None:
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


def _floating_ip(t: Table, i: int, item: object) -> FloatingIP | None:
    path = ("floating_ips", i)
    if isinstance(item, str):
        address, device, label = item, None, None
    elif isinstance(item, dict):
        ft = Table(t.ctx, item, (*t.path, *path))
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
    if (problem := floating_problem(interface.ip, device, hint)) is not None:
        t.ctx.error((*t.path, *path), problem)
        return None
    return FloatingIP(interface, device, label)




def _check_defaults(t: Table) -> CheckDefaults:
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




def _alerts(t: Table) -> AlertsConfig:
    et = t.table("email")
    to = et.str_list("to")
    for i, addr in enumerate(to):
        email_address(et, ("to", i), addr)
    sender = et.str("sender", "lbha@localhost")
    email_address(et, "sender", sender)
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
        address = parse_address(st, ("targets", i), match.group(1)) if match else None
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


def _paths(t: Table) -> Paths:
    result = Paths(
        run_dir=Path(t.str("run_dir", "/run/lbha")),
        state_dir=Path(t.str("state_dir", "/var/lib/lbha")),
        damaged_state=t.choice("damaged_state", "online",
                               frozenset({"online", "drain", "halt"})),
    )
    t.finish()
    return result


def _ipvs(t: Table) -> IpvsConfig:
    result = IpvsConfig(
        cleanstop=t.bool("cleanstop", True),
        reconcile_interval=t.duration("reconcile_interval", 30.0, minimum=MIN_RECONCILE),
    )
    t.finish()
    return result


def _haproxy(t: Table) -> HaproxyConfig:
    result = HaproxyConfig(
        socket=t.str("socket"),
        reconcile_interval=t.duration("reconcile_interval", 10.0, minimum=MIN_RECONCILE),
    )
    t.finish()
    return result

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
    ctx = Context(source, text, checks, judge_checks)
    root = Table(ctx, data, ())
    cluster = _cluster(root.table("cluster"))
    check_defaults = _check_defaults(root.table("checks"))
    alerts = _alerts(root.table("alerts"))
    paths = _paths(root.table("paths"))
    ipvs = _ipvs(root.table("ipvs"))
    haproxy = _haproxy(root.table("haproxy"))
    virtuals = [virtual_service(vt, check_defaults, haproxy) for vt in root.tables("virtual")]
    allow_empty = root.bool("allow_empty", False)
    root.finish()
    if cluster is None and not virtuals and not allow_empty and not data.get("virtual"):
        ctx.error((), "this config manages nothing: no [[virtual]] service and no [cluster] "
                  "(a reload to it would remove every managed service); add them, or write "
                  "allow_empty = true at the top of the file if that is meant")
    cross_checks(ctx, virtuals)
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
