"""The dependency rules of DESIGN.md, checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: What a built-in check or sink plugin may import from the core: the public plugin API.
PLUGIN_API = {
    "lbha", "lbha.checkapi", "lbha.hookspecs", "lbha.model", "lbha.errors", "lbha.desired",
    "lbha.events", "lbha.durations", "lbha.atomic_file", "lbha.http_exchange",
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


@pytest.mark.parametrize("path", sources("lbha"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_the_heartbeat(path: Path) -> None:
    # The CLI reaches the heartbeat through its control socket, or runs it as a process.
    bad = {n for n in lbha_imports(path) if n.startswith("lbha.heartbeat")}
    assert not bad, f"{path.name} imports {bad}: run `python -m lbha.heartbeat` instead"


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


#: Where each installed package's modules live in the checkout (pyproject `package-dir`).
PACKAGE_DIRS = {"lbha.heartbeat": "heartbeat", "lbha.checks": "checks",
                "lbha.plugins": "plugins", "lbha": "lbha"}
#: What the heartbeat state machine may not load, even through the modules it imports:
#: sockets, threads, event loops, netlink, processes, files.
FSM_IO = IO_MODULES | {
    "_socket", "_ssl", "_asyncio", "_posixsubprocess", "threading", "selectors", "io",
    "pathlib", "shutil", "tempfile", "stat", "fcntl", "mmap", "logging", "lbha.keyfile",
}


def module_file(name: str) -> Path | None:
    """The checkout file of an lbha module (None: not one)."""
    for package, folder in PACKAGE_DIRS.items():
        if name == package or name.startswith(package + "."):
            base = ROOT / folder / Path(*name[len(package):].split(".")[1:])
            init = base / "__init__.py"
            return init if init.exists() else base.with_suffix(".py")
    return None


def runtime_imports(path: Path) -> set[str]:
    """What `path` imports when run (not under TYPE_CHECKING), `from x import y` as both."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_state_machine_imports_no_io_transitively(tmp_path: Path) -> None:
    # Every lbha module importing heartbeat/fsm.py runs (package __init__ files included).
    reached, todo = set(), ["lbha.heartbeat.fsm"]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for module in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            path = module_file(module)
            if module in reached or path is None or not path.exists():
                continue
            reached.add(module)
            imported = runtime_imports(path)
            bad = {n for n in imported if n in FSM_IO or n.split(".")[0] in FSM_IO}
            assert not bad, f"fsm.py reaches {module}, which imports {bad}"
            todo.extend(imported)
    assert "lbha.heartbeat.said" in reached
    # And third-party modules on the way: what the import loads beyond the interpreter's own.
    code = ("import sys; before = set(sys.modules); import lbha.heartbeat.fsm; "
            "print(*sorted(set(sys.modules) - before))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True,
                            capture_output=True, text=True).stdout.split()
    assert "lbha.heartbeat.fsm" in loaded
    bad = {n for n in loaded if n in FSM_IO or n.split(".")[0] in FSM_IO}
    assert not bad, f"importing heartbeat/fsm.py loads {bad}"
