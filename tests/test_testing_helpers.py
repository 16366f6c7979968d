"""lbha.testing runs a check as the engine does."""

from __future__ import annotations

import socket

import pytest

from lbha.testing import check_spec, run_check_now


async def test_run_check_now_connect() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = await run_check_now("connect", rport=port)
    assert result.up
    assert result.reason == f"connected to 127.0.0.1:{port}"


async def test_deadline_applies() -> None:
    result = await run_check_now("nonexistent-service", rport=1)
    assert result.reason == "no installed plugin provides check 'nonexistent-service'"


def test_check_spec_rejects_unknown_fields() -> None:
    with pytest.raises(TypeError, match="no field"):
        check_spec("http", recieve="OK")
    assert check_spec("http", receive="OK").service == "http"
