"""`lbha demo`: the health engine at work on this machine, in about ten seconds.

Three real servers and a feedback agent listen on 127.0.0.1; an embedded config puts them
behind one virtual service with a fallback server. The demo breaks and repairs them, and
prints each event and the table IPVS would be given. Nothing leaves loopback.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import trio

from lbha.checkapi import CheckRegistry
from lbha.config import load_config_text
from lbha.desired import DesiredTable
from lbha.engine import Engine
from lbha.events import Event
from lbha.table import Admin

CONFIG = """\
[checks]
interval = "500ms"
timeout = "300ms"
failure_count = 2

[[virtual]]
name = "demo-web"
address = "198.18.0.100"
ports = 80
forwarding = "nat"
scheduler = "wlc"
[virtual.check]
type = "connect"
[virtual.feedback]
type = "agent"
port = {agent}
[virtual.fallback]
address = "127.0.0.1"
port = {fallback}
{reals}
"""


def _table_line(table: DesiredTable) -> str:
    parts = [f"{d.name}={d.weight}({d.state})" for s in table.services for d in s.destinations]
    return f"  table #{table.generation}: " + (" ".join(parts) or "(empty)")


async def _serve(port_out: list[int], handler: Callable[[trio.SocketStream], object],
                 *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
    with trio.CancelScope() as scope:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port_out.append(listeners[0].socket.getsockname()[1])
        task_status.started(scope)
        await trio.serve_listeners(handler, listeners)  # type: ignore[arg-type]


async def _close(stream: trio.SocketStream) -> None:
    await stream.aclose()


async def _agent(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.send_all(b"up ready 60%\n")


async def run_demo(registry: CheckRegistry, say: Callable[[str], None] = print) -> None:
    """Run the scripted demo; every step is bounded in time."""
    async with trio.open_nursery() as nursery:
        ports: list[int] = []
        servers = [await nursery.start(_serve, ports, _close) for _ in range(3)]
        agent_port: list[int] = []
        await nursery.start(_serve, agent_port, _agent)
        fallback_port: list[int] = []
        await nursery.start(_serve, fallback_port, _close)
        reals = "".join(
            f'[[virtual.real]]\nname = "web{i + 1}"\naddress = "127.0.0.1"\nport = {port}\n'
            f"weight = 100\n" for i, port in enumerate(ports))
        config = load_config_text(CONFIG.format(agent=agent_port[0], fallback=fallback_port[0],
                                                reals=reals), "<embedded demo config>",
                                  checks=registry)
        last: list[str] = []

        def apply(table: DesiredTable) -> None:
            line = _table_line(table)
            if not last or line.split(": ", 1)[1] != last[-1].split(": ", 1)[1]:
                last.append(line)
                say(line)

        def event(e: Event) -> None:
            say(f"  event [{e.severity}] {e.message}")

        engine = Engine(config, registry, apply=apply, event=event)
        await nursery.start(engine.run)

        say("== three real servers on 127.0.0.1, checked every 500 ms; agent reports 60% idle")
        await trio.sleep(2.0)
        say("== web2 stops listening: two failed checks take it out")
        servers[1].cancel()
        await trio.sleep(1.6)
        say("== operator drains web1 (lbha drain demo-web web1): weight 0, connections stay")
        engine.set_admin(Admin.DRAIN, "demo-web", "web1")
        await trio.sleep(0.2)
        say("== web3 stops too: nothing online is left, the fallback server steps in")
        servers[2].cancel()
        await trio.sleep(1.6)
        say("== web1 back online: the fallback leaves")
        engine.set_admin(Admin.ONLINE, "demo-web", "web1")
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    say("== done: `lbha status`, `lbha check CONFIG VIP -v` and `lbha healthd` do this for real")


def main(registry: CheckRegistry) -> None:
    trio.run(partial(run_demo, registry))
