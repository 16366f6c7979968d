"""Fixtures shared by the built-in check tests: requests built without a config file."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import pytest

from lbha.checkapi import CheckRequest, Target, Transcript
from lbha.model import CheckSpec, HttpMethod

MakeRequest = Callable[..., CheckRequest]


def _make_request(
    rip: str = "127.0.0.1",
    rport: int | None = None,
    *,
    check_type: str = "connect",
    protocol: str = "tcp",
    vip: str | None = "127.0.0.1",
    vport: int | None = 80,
    mark: int | None = None,
    command: tuple[str, ...] = (),
    options: Mapping[str, Any] | None = None,
    timeout: float = 3.0,
    transcript: Transcript | None = None,
) -> CheckRequest:
    spec = CheckSpec(
        type=check_type, service=None, port=rport, request=None, receive=None, regex=False,
        virtualhost=None, method=HttpMethod.GET, login=None, password=None, database=None,
        secret=None, command=command, connects_per_negotiate=0, verify_tls=False,
        ca_file=None, interval=5.0, timeout=timeout, negotiate_timeout=5.0, failure_count=2,
        rise=1, quiescent=False, options=MappingProxyType(dict(options or {})),
    )
    target = Target(
        virtual="test", vip=None if vip is None else ipaddress.ip_address(vip), vport=vport,
        protocol=protocol, rip=ipaddress.ip_address(rip), rport=rport, mark=mark,
    )
    return CheckRequest(target, spec, spec.options, timeout, transcript)


@pytest.fixture
def make_request() -> MakeRequest:
    """A factory for CheckRequests against loopback targets."""
    return _make_request
