"""Heartbeat test fixtures; registers the `netns` marker (root + `ip netns` needed)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "netns: builds network namespaces and runs real daemons (root, iproute2)"
    )
