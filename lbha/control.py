"""Control socket shared by both daemons: a unix stream socket speaking line-based JSON.

Protocol (one request per connection or several in a row, each on one line, UTF-8):

    request:  {"cmd": "status", "args": {...}}\\n
    reply:    {"ok": true, "result": ...}\\n   or   {"ok": false, "error": "message"}\\n

The socket is created mode 0600; the server also checks the peer's credentials
(SO_PEERCRED) and serves only root and the daemon's own user. Lines are capped at
MAX_LINE bytes.

No client can block another: up to MAX_CLIENTS connections are served at once (a listen
backlog of SOMAXCONN queues more); a request line must arrive within REQUEST_TIMEOUT and a
reply be taken within SEND_TIMEOUT, or the client is dropped; and when every slot is taken,
the connection that has waited longest for a request is dropped to make room.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from lbha.errors import ControlError

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
#: A whole request line must arrive within this long (from connecting or the last reply).
REQUEST_TIMEOUT = 5.0
#: A client must take a reply within this long.
SEND_TIMEOUT = 5.0
MAX_CLIENTS = 256
#: The CLI's client retries a connection refused with EAGAIN (listen backlog full) until its
#: timeout: first pause, doubling up to the longest (seconds).
CONNECT_RETRY_PAUSE = (0.01, 0.2)

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


class _Slots:
    """At most MAX_CLIENTS connections; a newcomer evicts the longest-waiting idle one."""

    def __init__(self, limit: int) -> None:
        self.limiter = trio.CapacityLimiter(limit)
        #: Connections waiting for a request, oldest first (dicts keep insertion order).
        self.waiting: dict[object, trio.CancelScope] = {}

    def make_room(self) -> None:
        if self.limiter.available_tokens == 0 and self.waiting:
            oldest = next(iter(self.waiting))
            self.waiting.pop(oldest).cancel()


async def _serve_client(stream: trio.SocketStream, handler: Handler, slots: _Slots) -> None:
    async with stream:
        uid = _peer_uid(stream.socket)
        if uid not in (0, os.geteuid()):
            log.warning("control socket: refused a client running as uid %d", uid)
            await _send(stream, {"ok": False, "error": "permission denied"})
            return
        buffer = bytearray()
        token = object()
        while True:
            line = None
            with trio.move_on_after(REQUEST_TIMEOUT) as scope:
                slots.waiting[token] = scope
                try:
                    line = await _read_line(stream, buffer)
                except ControlError as exc:
                    await _send(stream, {"ok": False, "error": str(exc)})
                finally:
                    slots.waiting.pop(token, None)
            if line is None:
                return
            try:
                cmd, args = _decode(line)
                reply = {"ok": True, "result": await handler(cmd, args)}
            except ControlError as exc:
                reply = {"ok": False, "error": str(exc)}
            if not await _send(stream, reply):
                return


async def _send(stream: trio.SocketStream, reply: dict[str, Any]) -> bool:
    """Send one reply within SEND_TIMEOUT; False when the client did not take it."""
    with trio.move_on_after(SEND_TIMEOUT):
        await stream.send_all(json.dumps(reply, default=str).encode() + b"\n")
        return True
    log.debug("control client did not take its reply within %g s: dropped", SEND_TIMEOUT)
    return False


def _clear_socket_path(path: Path) -> None:
    """Make the directory; remove a stale socket a crashed daemon left, nothing else.

    Raises ControlError when the path holds something that is not a socket, or a socket a
    live process still serves (never steal another daemon's socket).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlError(f"cannot use {path.parent} for the control socket: "
                           f"{exc.strerror or exc} (check paths.run_dir)") from None
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket: remove it, or set paths.run_dir "
                           "to a directory of its own")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink(missing_ok=True)  # nobody listens: a crashed daemon's leftover
            return
        except FileNotFoundError:
            return
        except OSError:
            pass  # EAGAIN, a timeout: someone listens but is busy; never take it
    raise ControlError(f"{path} is served by another running process: is another daemon "
                       "using the same paths.run_dir?")


async def serve_control(
    path: Path, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve `handler` on a unix socket at `path` until cancelled; removes the socket after.

    The handler raises ControlError for a request it refuses; its message goes to the client.
    Raises ControlError, naming the path, when the socket cannot be made.
    """
    _clear_socket_path(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound and listening under a private name, then renamed into place: a client that
    # finds the path always finds a socket that accepts (no refusal between bind and listen).
    # Short name: a unix socket path is limited to 107 bytes.
    staging = path.with_name(f".{os.getpid()}.sock")
    old_umask = os.umask(0o177)
    try:
        staging.unlink(missing_ok=True)
        await sock.bind(str(staging))
        sock.listen(socket.SOMAXCONN)
        os.rename(staging, path)
    except OSError as exc:
        sock.close()
        staging.unlink(missing_ok=True)
        raise ControlError(f"cannot make the control socket {path}: "
                           f"{exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    ours = path.stat()  # noqa: ASYNC240 - a local stat cannot block for long
    slots = _Slots(MAX_CLIENTS)

    async def guarded(stream: trio.SocketStream) -> None:
        slots.make_room()
        async with slots.limiter:
            try:
                await _serve_client(stream, handler, slots)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("control client went away: %s", exc)

    try:
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(guarded, [listener])
    finally:
        _remove_if_ours(path, ours)


def _remove_if_ours(path: Path, ours: os.stat_result) -> None:
    """Unlink the socket only if it is still the one this process bound."""
    try:
        now = path.lstat()
    except OSError:
        return
    if (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino):
        path.unlink(missing_ok=True)


def _connect(path: Path, timeout: float) -> socket.socket:
    """Connect, retrying while the listen backlog is full (EAGAIN) until `timeout`."""
    deadline = time.monotonic() + timeout
    pause, longest = CONNECT_RETRY_PAUSE
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            if time.monotonic() + pause > deadline:
                raise TimeoutError from None
            time.sleep(pause)
            pause = min(2 * pause, longest)
            continue
        except BaseException:
            sock.close()
            raise
        return sock


def request(path: Path, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """Send one request from a synchronous caller (the CLI); return the result.

    Raises ControlError with a message naming the socket when the daemon is unreachable.
    """
    try:
        with _connect(path, timeout) as sock:
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
