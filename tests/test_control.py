"""The control socket: JSON lines, errors that name the problem, mode 0600."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from lbha import control
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


# ---------------------------------------------------------------- no client blocks another
#
# The server's timeouts are raised far beyond the tests' bounds, so a test can only pass if
# nothing waits on a slow client at all (not merely if the wait is short).

LONG = 1000.0


@pytest.fixture
def patient(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", LONG)
    monkeypatch.setattr(control, "SEND_TIMEOUT", LONG)


def unix_client(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def flood_without_reading(sock: socket.socket) -> None:
    """Send big echo requests until the daemon stops taking them (its replies pile up)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    line = json.dumps({"cmd": "echo", "args": {"x": "a" * 60_000}}).encode() + b"\n"
    for _ in range(1000):
        try:
            sock.send(line)
        except BlockingIOError:
            return
        time.sleep(0.001)
    raise AssertionError("the daemon read 1000 requests whose replies nobody read")


async def test_sixteen_clients_that_never_read_do_not_block_others(
        tmp_path: Path, patient: None) -> None:
    path = tmp_path / "ctl.sock"
    socks: list[socket.socket] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, handler)
        for _ in range(16):
            socks.append(unix_client(path))
            await trio.to_thread.run_sync(flood_without_reading, socks[-1])
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(lambda: request(path, "echo", a=1)) == {"a": 1}
        nursery.cancel_scope.cancel()
    for sock in socks:
        sock.close()


async def test_two_hundred_idle_connections_do_not_block_others(
        tmp_path: Path, patient: None) -> None:
    path = tmp_path / "ctl.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, handler)
        socks = [unix_client(path) for _ in range(200)]
        await trio.sleep(0.1)
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(lambda: request(path, "echo", a=1)) == {"a": 1}
        nursery.cancel_scope.cancel()
    for sock in socks:
        sock.close()


async def test_when_every_slot_is_taken_the_longest_idle_client_makes_room(
        tmp_path: Path, patient: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "MAX_CLIENTS", 4)
    path = tmp_path / "ctl.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, handler)
        socks = [unix_client(path) for _ in range(10)]
        await trio.sleep(0.1)
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(lambda: request(path, "echo", a=1)) == {"a": 1}
        # The oldest idle connections were closed by the daemon to make room.
        assert await trio.to_thread.run_sync(socks[0].recv, 10) == b""
        nursery.cancel_scope.cancel()
    for sock in socks:
        sock.close()


async def test_silent_and_non_reading_clients_are_dropped_after_their_timeouts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.2)
    monkeypatch.setattr(control, "SEND_TIMEOUT", 0.2)
    path = tmp_path / "ctl.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, handler)
        silent = unix_client(path)
        assert await trio.to_thread.run_sync(silent.recv, 10) == b""  # closed, not hung
        slow = unix_client(path)
        await trio.to_thread.run_sync(flood_without_reading, slow)
        await trio.sleep(0.5)
        # The daemon gave up on it and closed: reading now ends (EOF or a reset, as the
        # kernel discards the requests the daemon never read), it never waits.
        slow.setblocking(True)
        slow.settimeout(5)

        def drain() -> None:
            with contextlib.suppress(ConnectionResetError):
                while slow.recv(1 << 20):
                    pass

        await trio.to_thread.run_sync(drain)
        nursery.cancel_scope.cancel()
    silent.close()
    slow.close()


async def test_two_hundred_concurrent_requests_all_succeed(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    results: list[Any] = [None] * 200

    def clients() -> None:
        barrier = threading.Barrier(200)

        def one(index: int) -> None:
            barrier.wait()
            try:
                results[index] = request(path, "echo", n=index)
            except ControlError as exc:
                results[index] = exc

        threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, handler)
        await trio.to_thread.run_sync(clients)
        nursery.cancel_scope.cancel()
    assert results == [{"n": i} for i in range(200)]


def test_client_retries_while_the_backlog_is_full(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(0)
    queued = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    for sock in queued:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(str(path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    with pytest.raises(BlockingIOError):  # the kernel says EAGAIN: the backlog is full
        probe.connect(str(path))
    probe.close()

    def serve() -> None:
        time.sleep(0.3)
        for _ in range(5):  # bounded: the queued ones, then the client's retry
            conn, _ = server.accept()
            conn.settimeout(5)
            if conn.recv(1000):
                conn.sendall(b'{"ok": true, "result": "served"}\n')
                conn.close()
                return
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    for sock in queued:
        threading.Timer(0.2, sock.close).start()
    assert request(path, "status", timeout=5) == "served"
    thread.join(10)
    server.close()


def test_client_gives_up_at_its_timeout_when_the_backlog_stays_full(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(0)
        queued = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
        for sock in queued:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(str(path))
        with pytest.raises(ControlError, match=r"no reply from .* within 0.5 s"):
            request(path, "status", timeout=0.5)
        for sock in queued:
            sock.close()


# ---------------------------------------------------------------- the socket path


async def test_a_regular_file_at_the_socket_path_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    path.write_text("precious")
    with pytest.raises(ControlError, match=r"ctl.sock exists and is not a socket"):
        await serve_control(path, handler)
    assert path.read_text() == "precious"


async def test_an_unusable_directory_is_named(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("a file where the run dir should be")
    with pytest.raises(ControlError, match=r"cannot use .*/run for the control socket"):
        await serve_control(tmp_path / "run" / "ctl.sock", handler)


async def test_a_socket_another_process_serves_is_never_taken(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, handler)
        with pytest.raises(ControlError, match="served by another running process"):
            await serve_control(path, handler)
        assert await trio.to_thread.run_sync(lambda: request(path, "echo", a=1)) == {"a": 1}
        nursery.cancel_scope.cancel()


async def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a killed daemon leaves
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, handler)
        assert await trio.to_thread.run_sync(lambda: request(path, "echo", a=1)) == {"a": 1}
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_on_exit_a_socket_that_is_no_longer_ours_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, handler)
        path.unlink()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(path))
        nursery.cancel_scope.cancel()
    assert path.is_socket()
    other.close()


async def test_a_busy_live_socket_is_not_mistaken_for_a_stale_one(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as busy:
        busy.bind(str(path))
        busy.listen(0)
        queued = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
        for sock in queued:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(str(path))
        with pytest.raises(ControlError, match="served by another running process"):
            await serve_control(path, handler)
        assert path.is_socket()
        for sock in queued:
            sock.close()
