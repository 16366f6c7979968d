"""Suite-wide: tests marked `wallclock` are rerun up to twice when they fail.

Such a test asserts a wall-clock bound (a verdict within the deadline + 100 ms, a failover
within N seconds) that is a property of the code but that one scheduling hiccup of a loaded
2-core machine can break. A regression breaks every run, so it still fails; the rerun is
reported (`-ra` lists it as R). Timing that can be simulated uses trio's MockClock instead.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("wallclock") is not None:
            item.add_marker(pytest.mark.flaky(reruns=2))
