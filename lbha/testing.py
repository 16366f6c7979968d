"""Helpers for testing check plugins, ours and third parties' alike.

    result = await run_check_now("http", rport=8080, request="/health", receive="OK")

runs the installed `http` check exactly as the engine does (same deadline handling, same
reasons), against 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import ipaddress
from dataclasses import fields, replace
from types import MappingProxyType
from typing import Any

from lbha.checkapi import CheckRegistry, CheckResult, Target, Transcript
from lbha.engine import run_check
from lbha.model import NEGOTIATE_SERVICES, CheckDefaults, CheckSpec, HttpMethod
from lbha.plugin_manager import load_plugins

_DEFAULTS = CheckDefaults()
_registry: CheckRegistry | None = None


def installed_checks() -> CheckRegistry:
    """Every installed plugin's check types (loaded once per process)."""
    global _registry
    if _registry is None:
        _registry = load_plugins().checks
    return _registry


def check_spec(check: str = "connect", **overrides: Any) -> CheckSpec:
    """A CheckSpec with the documented defaults; `check` is a type or a negotiate service."""
    negotiate = check in NEGOTIATE_SERVICES or check not in ("connect", "ping", "external",
                                                               "on", "off")
    spec = CheckSpec(
        type="negotiate" if negotiate else check,
        service=check if negotiate else None,
        port=None, request=None, receive=None, regex=False, virtualhost=None,
        method=HttpMethod.GET, login=None, password=None, database=None, secret=None,
        command=(), connects_per_negotiate=0, verify_tls=False, ca_file=None,
        interval=_DEFAULTS.interval, timeout=_DEFAULTS.timeout,
        negotiate_timeout=_DEFAULTS.negotiate_timeout, failure_count=_DEFAULTS.failure_count,
        rise=_DEFAULTS.rise, quiescent=_DEFAULTS.quiescent, options=MappingProxyType({}),
    )
    names = {f.name for f in fields(CheckSpec)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"CheckSpec has no field(s) {', '.join(sorted(unknown))}")
    if "options" in overrides:
        overrides["options"] = MappingProxyType(dict(overrides["options"]))
    return replace(spec, **overrides)


def target(rip: str = "127.0.0.1", rport: int | None = None, *, protocol: str = "tcp",
           vip: str | None = None, vport: int | None = None, virtual: str = "test") -> Target:
    return Target(
        virtual=virtual,
        vip=ipaddress.ip_address(vip) if vip else None,
        vport=vport,
        protocol=protocol,
        rip=ipaddress.ip_address(rip),
        rport=rport,
    )


async def run_check_now(
    check: str,
    *,
    rip: str = "127.0.0.1",
    rport: int | None = None,
    protocol: str = "tcp",
    seconds: float | None = None,
    transcript: Transcript | None = None,
    registry: CheckRegistry | None = None,
    **spec: Any,
) -> CheckResult:
    """Run one check the way the engine does; `seconds` defaults to the spec's deadline."""
    the_spec = check_spec(check, **spec)
    if seconds is None:
        seconds = the_spec.negotiate_timeout if the_spec.type == "negotiate" \
            else the_spec.timeout
    return await run_check(registry or installed_checks(), the_spec.check_name,
                           target(rip, rport, protocol=protocol), the_spec, seconds, transcript)
