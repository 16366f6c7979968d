"""Suite-wide rules: `wallclock` reruns, and no silent skip of a real-server test in CI.

Tests marked `wallclock` are rerun up to twice when they fail.

Such a test asserts a wall-clock bound (a verdict within the deadline + 100 ms, a failover
within N seconds) that is a property of the code but that one scheduling hiccup of a loaded
2-core machine can break. A regression breaks every run, so it still fails; the rerun is
reported (`-ra` lists it as R). Timing that can be simulated uses trio's MockClock instead.

Tests marked `real_server` (a module's `pytestmark`) talk to a real daemon or library that
scripts/system-packages.txt and the dev extras install. On a developer's machine a missing
one skips the test; where the `CI` environment variable is set the skip is a failure, so a
protocol suite cannot pass in CI by not running.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "real_server: needs a real server installed; a skip fails when CI is set")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and os.environ.get("CI") and call.excinfo is not None
            and item.get_closest_marker("real_server") is not None):
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI, where the server must be installed "
                           f"(scripts/system-packages.txt, the dev extras): "
                           f"{call.excinfo.value}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("wallclock") is not None:
            item.add_marker(pytest.mark.flaky(reruns=2))
