"""The dependency rules of DESIGN.md, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: What a built-in check or sink plugin may import from the core: the public plugin API.
PLUGIN_API = {
    "lbha", "lbha.checkapi", "lbha.hookspecs", "lbha.model", "lbha.errors", "lbha.desired",
    "lbha.events", "lbha.durations", "lbha.atomic_file", "lbha.http_exchange",
}
#: What the heartbeat daemon may import from the core.
HEARTBEAT_API = PLUGIN_API | {
    "lbha.config", "lbha.control", "lbha.plugin_manager", "lbha.logs", "lbha.run_lock",
}
#: Decision modules: pure functions, no I/O at all.
PURE = ["heartbeat/fsm.py", "lbha/health.py", "lbha/table.py"]
IO_MODULES = {"trio", "socket", "os", "subprocess", "select", "pyroute2", "ssl", "asyncio"}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def lbha_imports(path: Path) -> set[str]:
    return {name for name in imports(path) if name == "lbha" or name.startswith("lbha.")}


@pytest.mark.parametrize("path", sources("lbha"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_checks_or_plugins(path: Path) -> None:
    bad = {n for n in lbha_imports(path) if n.startswith(("lbha.checks", "lbha.plugins"))}
    assert not bad, f"{path.name} imports {bad}: built-ins reach the core via entry points"


@pytest.mark.parametrize("path", sources("lbha"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_the_heartbeat(path: Path) -> None:
    # The CLI reaches the heartbeat through its control socket, or runs it as a process.
    bad = {n for n in lbha_imports(path) if n.startswith("lbha.heartbeat")}
    assert not bad, f"{path.name} imports {bad}: run `python -m lbha.heartbeat` instead"


@pytest.mark.parametrize("path", sources("checks") + sources("plugins"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_use_only_the_plugin_api(path: Path) -> None:
    own = "lbha.checks" if path.is_relative_to(ROOT / "checks") else "lbha.plugins"
    bad = {n for n in lbha_imports(path) if n not in PLUGIN_API and not n.startswith(own)}
    assert not bad, f"{path.name} imports core internals {bad}"


@pytest.mark.parametrize("path", sources("heartbeat"), ids=lambda p: str(p.relative_to(ROOT)))
def test_heartbeat_stays_out_of_the_engine(path: Path) -> None:
    bad = {n for n in lbha_imports(path)
           if n not in HEARTBEAT_API and not n.startswith("lbha.heartbeat")}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("name", PURE)
def test_decision_modules_do_no_io(name: str) -> None:
    top = {n.split(".")[0] for n in imports(ROOT / name)}
    assert not top & IO_MODULES, f"{name} imports {top & IO_MODULES}"
