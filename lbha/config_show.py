"""Render a loaded Config as TOML with every default filled in and every secret redacted."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from enum import Enum
from typing import Any

from lbha.checkapi import REDACTED, SPEC_KEYS, CheckRegistry, spec_keys_for
from lbha.config import SECRET_KEYS
from lbha.durations import format_duration
from lbha.importers.toml_writer import Document, Table, TomlValue
from lbha.model import CheckSpec, Config, FloatingIP, PortRange, SnmpTarget, VirtualService

#: Model fields holding durations (float seconds), shown as "3s", "500ms".
_DURATIONS = frozenset({
    "keepalive", "warntime", "deadtime", "initdead", "ping_timeout", "garp_interval",
    "garp_refresh", "interval", "timeout", "negotiate_timeout", "repeat", "reconcile_interval",
    "persistence",
})
_LAYER4_ONLY = frozenset({"forwarding", "scheduler", "persistence", "persistence_netmask"})
_REAL_CHECK_KEYS = ("request", "receive", "port", "virtualhost", "regex")


def _value(name: str, value: Any) -> TomlValue | None:
    if value is None:
        return None
    if name in SECRET_KEYS and value:
        return REDACTED
    if name in _DURATIONS and isinstance(value, float):
        return format_duration(value)
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, FloatingIP):
        out: dict[str, TomlValue] = {"address": str(value.interface)}
        if value.device:
            out["device"] = value.device
        if value.label:
            out["label"] = value.label
        return out
    if isinstance(value, PortRange):
        return value.first if len(value) == 1 else str(value)
    if isinstance(value, SnmpTarget):
        return f"[{value.host}]:{value.port}" if value.host.version == 6 else \
            f"{value.host}:{value.port}"
    if isinstance(value, tuple | list):
        items = [_value(name, item) for item in value]
        return [item for item in items if item is not None]
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _fill(table: Table, obj: Any, skip: frozenset[str] = frozenset()) -> None:
    for f in fields(obj):
        if f.name in skip or is_dataclass(getattr(obj, f.name)):
            continue
        value = _value(f.name, getattr(obj, f.name))
        if value is not None:
            table.set(f.name, value)


def _check(doc: Document, name: str, spec: CheckSpec, registry: CheckRegistry | None) -> None:
    table = doc.table(name)
    used, _ = spec_keys_for(registry, spec.check_name)
    unused = SPEC_KEYS - used if used is not None else frozenset()  # config check refuses them
    _fill(table, spec, frozenset({"options", "command"}) | unused)
    if spec.command and "command" not in unused:
        table.set("command", list(spec.command))
    if spec.options:
        schema = registry.get(spec.check_name).options \
            if registry is not None and spec.check_name in registry else {}
        options = {
            key: REDACTED if key in schema and schema[key].secret and value else value
            for key, value in spec.options.items() if value is not None
        }
        table.set("options", {k: _value(k, v) for k, v in options.items()})  # type: ignore[misc]


def _virtual(doc: Document, virtual: VirtualService, registry: CheckRegistry | None) -> None:
    table = doc.table("virtual", array=True)
    layer4_only = frozenset() if virtual.layer == 4 else _LAYER4_ONLY
    _fill(table, virtual, frozenset({"ports", "all_ports", "reals", "email"}) | layer4_only)
    if virtual.all_ports:
        table.set("ports", "*")
    elif virtual.ports:
        table.set("ports", _value("ports", virtual.ports))  # type: ignore[arg-type]
    if virtual.email:
        table.set("email", list(virtual.email))
    if virtual.persistence is None:
        table.comment("persistence: none")
    _check(doc, "virtual.check", virtual.check, registry)
    _fill(doc.table("virtual.feedback"), virtual.feedback)
    if virtual.fallback is not None:
        _fill(doc.table("virtual.fallback"), virtual.fallback)
    if virtual.haproxy is not None:
        _fill(doc.table("virtual.haproxy"), virtual.haproxy)
    for real in virtual.reals:
        rt = doc.table("virtual.real", array=True)
        _fill(rt, real, layer4_only)
        overrides = {
            key: _value(key, getattr(real.check, key)) for key in _REAL_CHECK_KEYS
            if getattr(real.check, key) != getattr(virtual.check, key)
        }
        if overrides:
            rt.set("check", {k: v for k, v in overrides.items() if v is not None})


def render_config(config: Config, registry: CheckRegistry | None = None) -> str:
    """The effective config as TOML; secrets appear as ****."""
    doc = Document()
    top = doc.table()
    top.comment(f"effective configuration of {config.source or '<string>'}; secrets redacted")
    if config.allow_empty:
        top.set("allow_empty", True)
    if config.cluster is not None:
        cluster = doc.table("cluster")
        _fill(cluster, config.cluster, frozenset({"peers"}))
        if config.cluster.serial is not None:
            _fill(doc.table("cluster.serial"), config.cluster.serial)
        for peer in config.cluster.peers:
            _fill(doc.table("cluster.peers", array=True), peer)
    _fill(doc.table("checks"), config.checks)
    _fill(doc.table("paths"), config.paths)
    _fill(doc.table("ipvs"), config.ipvs)
    _fill(doc.table("haproxy"), config.haproxy)
    _fill(doc.table("alerts.email"), config.alerts.email)
    _fill(doc.table("alerts.snmp"), config.alerts.snmp)
    for virtual in config.virtuals:
        _virtual(doc, virtual, registry)
    return doc.render()

