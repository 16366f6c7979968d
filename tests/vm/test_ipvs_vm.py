"""Host side of the real-kernel IPVS tests: one VM (conftest.ipvs_guest), one verdict each.

Each guest test function gets a host test of the same name, so a failure in the kernel shows
up here by name with the guest's traceback.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import GUEST_MODULES, REPO, GuestRun


def _guest_tests() -> list[str]:
    names = []
    for module in GUEST_MODULES:
        tree = ast.parse((REPO / module).read_text())
        names += [node.name for node in tree.body
                  if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.name.startswith("test_")]
    return names


@pytest.mark.slow
@pytest.mark.parametrize("name", _guest_tests())
def test_in_kernel(ipvs_guest: GuestRun, name: str):
    results = {test: verdict for test, verdict in ipvs_guest.verdicts.items()
               if test == name or test.startswith(name + "[")}
    assert results, f"{name} did not run in the VM\n{ipvs_guest.output}"
    failed = {test: verdict for test, verdict in results.items() if verdict is not None}
    assert not failed, "\n\n".join(f"{test}: {verdict}" for test, verdict in failed.items())


@pytest.mark.slow
def test_guest_session_passed(ipvs_guest: GuestRun):
    """Collection errors and anything outside a test fail the guest run as a whole."""
    assert ipvs_guest.returncode == 0, ipvs_guest.output


def test_guest_module_is_not_collected_on_the_host():
    assert not any(Path(m).name.startswith("test_") for m in GUEST_MODULES)
