"""The control socket: JSON lines, errors that name the problem, mode 0600."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio

from lbha.control import MAX_LINE, request, serve_control
from lbha.errors import ControlError


async def handler(cmd: str, args: dict[str, Any]) -> Any:
    if cmd == "echo":
        return args
    raise ControlError(f"unknown command {cmd!r}")


async def raw(path: Path, data: bytes) -> bytes:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(path))
        await sock.send(data)
        return await sock.recv(65536)


async def test_requests_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "run" / "ctl.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, handler)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        result = await trio.to_thread.run_sync(lambda: request(path, "echo", vip="web"))
        assert result == {"vip": "web"}
        with pytest.raises(ControlError, match="unknown command 'nope'"):
            await trio.to_thread.run_sync(lambda: request(path, "nope"))
        assert b"request is not JSON" in await raw(path, b"{garbage\n")
        assert b"must be an object" in await raw(path, b"[1, 2]\n")
        assert b"longer than" in await raw(path, b"x" * (MAX_LINE + 10))
        nursery.cancel_scope.cancel()
    assert not path.exists()


def test_unreachable_daemon_is_named(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match=r"does not exist: is the daemon running\?"):
        request(tmp_path / "none.sock", "status")


async def test_other_users_are_refused_even_if_the_socket_mode_is_loosened() -> None:
    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or python is None:
        pytest.skip("needs root and a system python3 to run a client as another user")
    # Under /tmp, not pytest's private tmp_path: user nobody must be able to reach it.
    folder = Path(tempfile.mkdtemp(prefix="lbha-ctl-"))
    folder.chmod(0o755)
    path = folder / "ctl.sock"
    client = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
              "print(s.recv(999).decode())")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, handler)
        path.chmod(0o666)  # an operator's mistake: the credential check still holds
        out = await trio.run_process(
            [python, "-c", client, str(path)], capture_stdout=True, check=False,
            preexec_fn=lambda: os.setuid(65534))
        nursery.cancel_scope.cancel()
    folder.rmdir()
    assert out.stdout.decode().strip() == '{"ok": false, "error": "permission denied"}'
