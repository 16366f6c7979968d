"""The demo tells the story it promises (real sockets on loopback, about ten seconds)."""

from __future__ import annotations

from lbha.demo import run_demo
from lbha.plugin_manager import load_plugins


async def test_demo_story() -> None:
    lines: list[str] = []
    await run_demo(load_plugins().checks, lines.append)
    text = "\n".join(lines)
    for expected in ("web2 is down: connect to 127.0.0.1:", "web1=0(drain)",
                     "fallback=1(fallback)", "fallback server no longer in use",
                     "web1=60(up) web2=60(up) web3=60(up)"):
        assert expected in text, text
