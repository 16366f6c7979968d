"""Golden scenarios for the desired table (pure): health + admin + feedback -> destinations."""

from __future__ import annotations

import pytest

from lbha.config import load_config_text
from lbha.model import VirtualService
from lbha.table import Admin, RealView, effective_weight, virtual_services

BASE = """\
[[virtual]]
name = "web"
address = "198.18.0.100"
ports = {ports}
protocol = "{protocol}"
[virtual.check]
quiescent = {quiescent}
{fallback}
[[virtual.real]]
name = "a"
address = "198.18.0.21"
weight = 100
[[virtual.real]]
name = "b"
address = "198.18.0.22"
weight = 50
forwarding = "nat"
port = 8080
"""


def virtual(ports: str = "80", protocol: str = "tcp", quiescent: bool = False,
            fallback: str = "") -> VirtualService:
    text = BASE.format(ports=ports, protocol=protocol, quiescent=str(quiescent).lower(),
                       fallback=fallback)
    return load_config_text(text).virtuals[0]


UP, DOWN = RealView(True), RealView(False)
FALLBACK = '[virtual.fallback]\naddress = "198.18.0.99"'
PERSISTENT = FALLBACK + "\npersistent = true"

# (id, virtual kwargs, views of a and b, fallback used before, expected "name:weight:state", used)
GOLDEN = [
    ("both-up", {}, (UP, UP), False, ["a:100:up", "b:50:up"], False),
    ("one-down", {}, (UP, DOWN), False, ["a:100:up"], False),
    ("one-down-quiescent", {"quiescent": True}, (UP, DOWN), False,
     ["a:100:up", "b:0:quiesced"], False),
    ("drain", {}, (RealView(True, Admin.DRAIN), UP), False, ["a:0:drain", "b:50:up"], False),
    ("halt", {}, (RealView(True, Admin.HALT), UP), False, ["b:50:up"], False),
    ("halt-quiescent-down", {"quiescent": True}, (RealView(False, Admin.HALT), UP), False,
     ["b:50:up"], False),
    ("feedback", {}, (RealView(True, feedback_percent=33), RealView(True, feedback_percent=0)),
     False, ["a:33:up", "b:0:up"], False),
    ("all-down-fallback", {"fallback": FALLBACK}, (DOWN, DOWN), False,
     ["fallback:1:fallback"], True),
    ("all-drained-fallback", {"fallback": FALLBACK},
     (RealView(True, Admin.DRAIN), RealView(True, Admin.HALT)), False,
     ["a:0:drain", "fallback:1:fallback"], True),
    ("fallback-leaves", {"fallback": FALLBACK}, (UP, DOWN), True, ["a:100:up"], False),
    ("persistent-fallback-stays-at-0", {"fallback": PERSISTENT}, (UP, DOWN), True,
     ["a:100:up", "fallback:0:fallback-quiesced"], True),
    ("persistent-fallback-never-used", {"fallback": PERSISTENT}, (UP, DOWN), False,
     ["a:100:up"], False),
]


@pytest.mark.parametrize(("kwargs", "views", "used", "expected", "used_after"),
                         [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_golden(kwargs: dict, views: tuple, used: bool, expected: list[str],
                used_after: bool) -> None:
    services, fallback_used = virtual_services(virtual(**kwargs), views, used)
    assert len(services) == 1
    got = [f"{d.name}:{d.weight}:{d.state}" for d in services[0].destinations]
    assert got == expected
    assert fallback_used is used_after


def test_ports_and_protocols_expand_and_dr_keeps_the_virtual_port() -> None:
    services, _ = virtual_services(virtual('[80, "8000-8001"]', "tcp+udp"), (UP, UP), False)
    assert [(s.protocol, s.port) for s in services] == [
        ("tcp", 80), ("udp", 80), ("tcp", 8000), ("udp", 8000), ("tcp", 8001), ("udp", 8001)]
    for service in services:
        a, b = service.destinations
        assert a.port == service.port  # DR: IPVS keeps the virtual port
        assert b.port == 8080  # NAT: remapped


def test_ops_is_udp_one_packet() -> None:
    services, _ = virtual_services(virtual("53", "ops"), (UP, UP), False)
    assert [(s.protocol, s.one_packet) for s in services] == [("udp", True)]


@pytest.mark.parametrize(("weight", "percent", "expected"), [
    (100, None, 100), (40, 33, 13), (1, 75, 0), (40, 150, 60), (65535, 100, 65535), (0, 50, 0),
])
def test_effective_weight_rounds_down(weight: int, percent: int | None, expected: int) -> None:
    assert effective_weight(weight, percent) == expected
