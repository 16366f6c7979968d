"""ldirectord.cf keys a check does not read are left out on import, and a check that cannot
pass is imported as `off`, each with a note: the result passes `lbha config check`."""

from __future__ import annotations

import tomllib

import pytest

from lbha.checkapi import CheckRegistry
from lbha.config import load_config_text
from lbha.importers import ImportResult, Severity, import_ldirectord
from lbha.plugin_manager import PluginManager


@pytest.fixture(scope="module")
def registry() -> CheckRegistry:
    manager = PluginManager()
    manager.load_entry_points()
    manager.register_checks()
    return manager.checks


def convert(block: str, registry: CheckRegistry, port: int = 25) -> ImportResult:
    text = f"virtual=198.18.0.10:{port}\n\treal=198.18.1.1:{port} gate\n\t" + \
        "\n\t".join(block.splitlines()) + "\n"
    result = import_ldirectord(text, "ld.cf", checks=registry)
    load_config_text(result.toml, "<imported>", checks=registry)  # what config check runs
    return result


def check_of(result: ImportResult) -> dict:
    return tomllib.loads(result.toml)["virtual"][0]["check"]


@pytest.mark.parametrize(
    ("block", "port", "dropped"),
    [('service=smtp\nreceive="220"', 25, ["receive"]),
     ('receive="220"', 25, ["receive"]),  # smtp from the port
     ('service=http\nlogin="u"\npasswd="p"', 80, ["login", "password"]),
     ('service=nntp\nrequest="x"', 119, ["request"]),
     ('checktype=connect\nrequest="x"\nreceive="y"', 80, ["receive", "request"]),
     ('checktype=off\nvirtualhost="a.example"', 80, ["virtualhost"])],
)
def test_keys_the_check_ignores_are_left_out_with_a_note(
    registry: CheckRegistry, block: str, port: int, dropped: list[str]
) -> None:
    result = convert(block, registry, port)
    assert not set(dropped) & set(check_of(result))
    notes = [n for n in result.notes if "does not use" in n.message]
    assert sorted(n.directive for n in notes) == dropped
    assert {n.severity for n in notes} == {Severity.DROPPED}
    assert "left out" in result.toml  # the comment stays next to the check


@pytest.mark.parametrize(
    ("block", "port", "missing"),
    [("service=mysql", 3306, "'login'"), ('service=radius\nlogin="u"', 1812, "'secret'"),
     ("service=dns", 53, "'request'")],
)
def test_a_check_that_cannot_pass_is_imported_as_off(
    registry: CheckRegistry, block: str, port: int, missing: str
) -> None:
    result = convert(block, registry, port)
    assert check_of(result)["type"] == "off"
    assert "service" not in check_of(result)
    (error,) = result.errors
    assert f"cannot pass without {missing}" in error.message


def test_a_per_server_override_the_check_ignores_is_left_out(registry: CheckRegistry) -> None:
    text = 'virtual=198.18.0.10:25\n\treal=198.18.1.1:25 gate 1 "x" "y"\n\tservice=smtp\n'
    result = import_ldirectord(text, "ld.cf", checks=registry)
    load_config_text(result.toml, checks=registry)
    real = tomllib.loads(result.toml)["virtual"][0]["real"][0]
    assert "check" not in real
    assert any("per-server" in n.message for n in result.notes)


def test_keys_a_check_reads_are_kept(registry: CheckRegistry) -> None:
    result = convert('service=mysql\nlogin="u"\npasswd="p"\ndatabase="d"\nrequest="SELECT 1"',
                     registry, 3306)
    assert check_of(result)["login"] == "u"
    assert check_of(result)["database"] == "d"
    assert not [n for n in result.notes if "does not use" in n.message]
