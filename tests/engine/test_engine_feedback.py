"""Feedback through the engine (real clock, a real agent on loopback)."""

from __future__ import annotations

from functools import partial
from types import MappingProxyType

import trio

from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult
from lbha.cli import format_status
from lbha.config import load_config_text
from lbha.desired import DesiredTable
from lbha.engine import Engine
from lbha.events import Event


class AlwaysUp:
    name = "fake"
    negotiate = False
    description = "always up"
    options = MappingProxyType({})

    async def check(self, request: CheckRequest) -> CheckResult:
        return CheckResult.success()


async def test_agent_scales_weight_and_garbage_keeps_the_last_value() -> None:
    replies = [b"50%\n", b"50%\n", b"what?\n", b"what?\n", b"down\n", b"down\n", b"up 80%\n"]
    replies += [b"up 80%\n"] * 50

    async def agent(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(replies.pop(0) if replies else b"up 80%\n")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, agent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        text = f"""\
[checks]
interval = "100ms"
timeout = "100ms"
[[virtual]]
name = "web"
address = "198.18.0.100"
ports = 80
[virtual.check]
type = "fake"
[virtual.feedback]
type = "agent"
port = {port}
[[virtual.real]]
name = "a"
address = "127.0.0.1"
weight = 200
"""
        registry = CheckRegistry()
        registry.add(AlwaysUp())
        tables: list[DesiredTable] = []
        events: list[Event] = []
        engine = Engine(load_config_text(text, checks=registry), registry,
                        apply=tables.append, event=events.append)
        await nursery.start(engine.run)
        weights: list[int | None] = []
        with trio.move_on_after(3):
            while len(replies) > 40:
                await trio.sleep(0.02)
                dests = [d for s in tables[-1].services for d in s.destinations] if tables else []
                weight = dests[0].weight if dests else None
                if not weights or weights[-1] != weight:
                    weights.append(weight)
        nursery.cancel_scope.cancel()
    # full weight, 50 % = 100, garbage keeps 100, "down" takes it out, "up 80%" = 160
    assert weights[-4:] == [200, 100, None, 160] or weights[-3:] == [100, None, 160], weights
    messages = [e.message for e in events if e.kind == "feedback"]
    assert messages == ["web: feedback agent of a says down", "web: feedback agent of a says up"]
    status = engine.status()["virtuals"][0]["reals"][0]
    assert status["feedback"] == 80


async def test_a_hung_agent_shows_why_in_status(autojump_clock) -> None:
    async def hung_agent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, hung_agent, 0,
                                                host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        text = f"""\
[checks]
interval = "1s"
timeout = "1s"
[[virtual]]
name = "web"
address = "198.18.0.100"
ports = 80
[virtual.check]
type = "fake"
[virtual.feedback]
type = "agent"
port = {port}
[[virtual.real]]
name = "a"
address = "127.0.0.1"
weight = 200
"""
        registry = CheckRegistry()
        registry.add(AlwaysUp())
        tables: list[DesiredTable] = []
        engine = Engine(load_config_text(text, checks=registry), registry,
                        apply=tables.append, event=lambda event: None)
        await nursery.start(engine.run)
        await trio.sleep(5)
        status = engine.status()
        nursery.cancel_scope.cancel()
    why = f"feedback agent at 127.0.0.1:{port}: did not answer within 1 s; keeping full weight"
    real = status["virtuals"][0]["reals"][0]
    assert real["feedback_reason"] == why
    assert real["weight"] == 200
    assert f"    feedback: {why}" in format_status(status).splitlines()
