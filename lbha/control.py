"""Control socket shared by both daemons: a unix stream socket speaking line-based JSON.

Protocol (one request per connection or several in a row, each on one line, UTF-8):

    request:  {"cmd": "status", "args": {...}}\\n
    reply:    {"ok": true, "result": ...}\\n   or   {"ok": false, "error": "message"}\\n

The socket is created mode 0600; the server also checks the peer's credentials
(SO_PEERCRED) and serves only root and the daemon's own user. Lines are capped at
MAX_LINE bytes and a client that stays silent for IDLE_TIMEOUT is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from lbha.errors import ControlError

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
IDLE_TIMEOUT = 10.0
MAX_CLIENTS = 16

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


def _peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


async def _read_line(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    while b"\n" not in buffer:
        if len(buffer) > MAX_LINE:
            raise ControlError(f"request longer than {MAX_LINE} bytes")
        data = await stream.receive_some(4096)
        if not data:
            return None
        buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def _decode(line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"request is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        raise ControlError('request must be an object like {"cmd": "status", "args": {}}')
    args = request.get("args", {})
    if not isinstance(args, dict):
        raise ControlError("'args' must be an object")
    return request["cmd"], args


async def _serve_client(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        uid = _peer_uid(stream.socket)
        if uid not in (0, os.geteuid()):
            log.warning("control socket: refused a client running as uid %d", uid)
            await _send(stream, {"ok": False, "error": "permission denied"})
            return
        buffer = bytearray()
        while True:
            line = None
            with trio.move_on_after(IDLE_TIMEOUT):
                try:
                    line = await _read_line(stream, buffer)
                except ControlError as exc:
                    await _send(stream, {"ok": False, "error": str(exc)})
            if line is None:
                return
            try:
                cmd, args = _decode(line)
                reply = {"ok": True, "result": await handler(cmd, args)}
            except ControlError as exc:
                reply = {"ok": False, "error": str(exc)}
            await _send(stream, reply)


async def _send(stream: trio.SocketStream, reply: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(reply, default=str).encode() + b"\n")


def _clear_socket_path(path: Path) -> None:
    """Make the directory; remove a stale socket a crashed daemon left (never a regular file)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.is_socket():
        path.unlink()


async def serve_control(
    path: Path, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve `handler` on a unix socket at `path` until cancelled; removes the socket after.

    The handler raises ControlError for a request it refuses; its message goes to the client.
    """
    _clear_socket_path(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(MAX_CLIENTS)
    limiter = trio.CapacityLimiter(MAX_CLIENTS)

    async def guarded(stream: trio.SocketStream) -> None:
        async with limiter:
            try:
                await _serve_client(stream, handler)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("control client went away: %s", exc)

    try:
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(guarded, [listener])
    finally:
        path.unlink(missing_ok=True)  # noqa: ASYNC240 - a local unlink cannot block for long


def request(path: Path, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """Send one request from a synchronous caller (the CLI); return the result.

    Raises ControlError with a message naming the socket when the daemon is unreachable.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
            buffer = b""
            while b"\n" not in buffer:
                data = sock.recv(65536)
                if not data:
                    break
                buffer += data
                if len(buffer) > 64 * MAX_LINE:
                    raise ControlError(f"reply from {path} is too long")
    except FileNotFoundError:
        raise ControlError(f"{path} does not exist: is the daemon running?") from None
    except ConnectionRefusedError:
        raise ControlError(f"{path} refused the connection: is the daemon running?") from None
    except TimeoutError:
        raise ControlError(f"no reply from {path} within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(f"cannot talk to {path}: {exc}") from None
    try:
        reply = json.loads(buffer.partition(b"\n")[0])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError(f"garbled reply from {path}") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error") if isinstance(reply, dict) else None
        raise ControlError(str(error or f"bad reply from {path}"))
    return reply.get("result")
