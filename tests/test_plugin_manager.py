"""Plugins load from the `lbha` entry-point group; a broken one is named and skipped."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_process import LBHA, lbha

from lbha.events import Event
from lbha.plugin_manager import load_event_plugins, load_plugins

PLUGINS = {
    "broken_import": "raise RuntimeError('plugin author forgot a dependency')\n",
    "broken_register": textwrap.dedent("""\
        from lbha import hookimpl

        @hookimpl
        def lbha_register_checks(registry):
            raise ValueError("cannot register")
    """),
    "duplicate_connect": textwrap.dedent("""\
        from types import MappingProxyType
        from lbha import hookimpl

        class Connect:
            name = "connect"
            negotiate = False
            description = "an impostor"
            options = MappingProxyType({})
            async def check(self, request):
                raise AssertionError

        @hookimpl
        def lbha_register_checks(registry):
            registry.add(Connect())
    """),
    "noisy_events": textwrap.dedent("""\
        from lbha import hookimpl

        seen = []

        @hookimpl
        def lbha_event(event):
            raise OSError("mail server down")
    """),
    "quiet_events": textwrap.dedent("""\
        from lbha import hookimpl

        seen = []

        @hookimpl
        def lbha_event(event):
            seen.append(event)
    """),
}


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Installs fake third-party distributions (dist-info + module) on sys.path."""
    for name, source in PLUGINS.items():
        (tmp_path / f"{name}.py").write_text(source)
        info = tmp_path / f"lbha_{name}-1.0.dist-info"
        info.mkdir()
        dist = "lbha-" + name.replace("_", "-")
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[lbha]\n{name} = {name}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in PLUGINS:
        sys.modules.pop(name, None)
    return tmp_path


def test_broken_plugins_are_reported_by_name_and_skipped(third_party: Path) -> None:
    manager = load_plugins()
    failures = {f.name: f for f in manager.failures}
    assert set(failures) == {"broken_import", "broken_register", "duplicate_connect"}
    assert failures["broken_import"].distribution == "lbha-broken-import"
    assert "plugin author forgot a dependency" in str(failures["broken_import"])
    assert failures["broken_register"].stage == "register checks"
    assert "already provided by plugin 'connect'" in failures["duplicate_connect"].error
    # The built-in still stands, and is the real one.
    assert manager.checks.plugin_of("connect") == "connect"
    assert manager.checks.get("connect").description.startswith("TCP connect")
    # A plugin that failed to register is out altogether, not half in.
    assert "broken_register" not in manager.plugins
    assert "duplicate_connect" not in manager.plugins


def test_a_raising_event_hook_does_not_stop_the_others(third_party: Path) -> None:
    manager = load_plugins()
    event = Event(kind="test", message="hello")
    manager.call("lbha_event", event=event)
    quiet = sys.modules["quiet_events"]
    assert quiet.seen == [event]
    assert any(f.name == "noisy_events" and "mail server down" in f.error
               for f in manager.failures)


def test_lbha_plugins_lists_checks_and_failures(third_party: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(third_party)}
    out = subprocess.run([*LBHA, "plugins"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "connect" in out.stdout
    assert "failed plugins:" in out.stdout
    assert "plugin 'broken_import' (lbha-broken-import) failed to load" in out.stdout


EVENT_PLUGINS = {
    "pager_events": "from lbha import hookimpl\n\n@hookimpl\ndef lbha_event(event):\n"
                    "    pass\n",
    "checks_in_events": PLUGINS["duplicate_connect"].replace('"connect"', '"impostor"'),
}


@pytest.fixture
def event_plugins(third_party: Path) -> Path:
    """Adds distributions whose plugins are in the `lbha.events` group."""
    for name, source in EVENT_PLUGINS.items():
        (third_party / f"{name}.py").write_text(source)
        info = third_party / f"lbha_{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[lbha.events]\n{name} = {name}\n")
        sys.modules.pop(name, None)
    return third_party


def test_the_heartbeat_loads_only_event_plugins(event_plugins: Path) -> None:
    manager = load_event_plugins()
    assert "pager_events" in manager.plugins
    assert manager.plugins["pager_events"].group == "lbha.events"
    assert "log" in manager.plugins  # the built-in event plugin
    # Nothing of the `lbha` group: no check type, no backend, no third-party check plugin.
    assert not {"connect", "ipvs", "haproxy", "quiet_events"} & set(manager.plugins)
    assert not list(manager.checks)


def test_an_event_plugin_that_provides_checks_is_refused(event_plugins: Path) -> None:
    for manager in (load_event_plugins(), load_plugins()):
        failure = next(f for f in manager.failures if f.name == "checks_in_events")
        assert "lbha.events group, which the heartbeat loads too, but provides check types" \
            in failure.error
        assert "checks_in_events" not in manager.plugins
        assert "impostor" not in manager.checks


def test_healthd_loads_both_groups(event_plugins: Path) -> None:
    manager = load_plugins()
    assert {"pager_events", "log", "connect", "ipvs", "quiet_events"} <= set(manager.plugins)


def test_lbha_plugins_names_the_group_of_event_plugins(event_plugins: Path) -> None:
    out = lbha("plugins", env={**os.environ, "PYTHONPATH": str(event_plugins)})
    assert out.returncode == 0, out.stderr
    plugins = out.stdout.split("check types:")[0].splitlines()
    (line,) = [x for x in plugins if x.strip().startswith("pager_events")]
    assert line.endswith("(pager_events, group lbha.events)")
    (line,) = [x for x in plugins if x.strip().startswith("connect ")]
    assert line.endswith("(lbha.checks.connect)")
