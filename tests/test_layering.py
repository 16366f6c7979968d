"""The dependency rules of DESIGN.md, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: What a built-in check or sink plugin may import from the core: the public plugin API.
PLUGIN_API = {
    "lbha", "lbha.checkapi", "lbha.hookspecs", "lbha.model", "lbha.errors", "lbha.desired",
    "lbha.events", "lbha.durations", "lbha.atomic_file",
}
#: The check kit (lbha/checkkit/): plugin API for checks, built on the check API alone.
CHECK_KIT = "lbha.checkkit"
KIT_MAY_IMPORT = {"lbha.checkapi", "lbha.model", "lbha.errors"}
#: Checks that still reach the kit through another check's module (checks/tcpclient.py,
#: a re-export kept until checks/http.py imports lbha.checkkit itself).
KIT_THROUGH_A_SHIM = {"checks/http.py"}
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


@pytest.mark.parametrize("path", sources("checks") + sources("plugins"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_use_only_the_plugin_api(path: Path) -> None:
    is_check = path.is_relative_to(ROOT / "checks")
    own = "lbha.checks" if is_check else "lbha.plugins"
    bad = {n for n in lbha_imports(path) if n not in PLUGIN_API and not n.startswith(own)
           and not (is_check and n.startswith(CHECK_KIT))}
    assert not bad, f"{path.name} imports core internals {bad}"


@pytest.mark.parametrize("path", sources("checks"), ids=lambda p: str(p.relative_to(ROOT)))
def test_checks_share_plumbing_only_through_the_kit(path: Path) -> None:
    """A check imports no other check's module: what checks share lives in the kit."""
    if str(path.relative_to(ROOT)) in KIT_THROUGH_A_SHIM:
        return
    own = f"lbha.checks.{path.stem}"
    bad = {n for n in lbha_imports(path) if n.startswith("lbha.checks") and n != own}
    assert not bad, f"{path.name} imports {bad}: move what they share into lbha/checkkit"


@pytest.mark.parametrize("path", sources("lbha/checkkit"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_check_kit_stands_on_the_check_api_alone(path: Path) -> None:
    bad = {n for n in lbha_imports(path) if n not in KIT_MAY_IMPORT and n != CHECK_KIT
           and not n.startswith(CHECK_KIT + ".")}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", sources("heartbeat"), ids=lambda p: str(p.relative_to(ROOT)))
def test_heartbeat_stays_out_of_the_engine(path: Path) -> None:
    bad = {n for n in lbha_imports(path)
           if n not in HEARTBEAT_API and not n.startswith("lbha.heartbeat")}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("name", PURE)
def test_decision_modules_do_no_io(name: str) -> None:
    top = {n.split(".")[0] for n in imports(ROOT / name)}
    assert not top & IO_MODULES, f"{name} imports {top & IO_MODULES}"
