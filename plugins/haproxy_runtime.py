"""HAProxy runtime API (stats socket) client: sans-IO framing and parsing, plus trio I/O.

A session is one connection in `prompt` mode: the commands of one reconcile pass are
pipelined over it and it is closed at the end of the pass. Measured on haproxy 2.6.12
(bench/haproxy/README.md): a command costs ~40 us inside a prompt session against ~150 us
with one connection per command. Sessions are never kept open between passes: an open CLI
connection keeps a reloaded (old) worker alive and answering, so a persistent session would
silently talk to the stale process while the new one has forgotten every runtime change.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

#: Replies larger than this are refused (a `show servers state` line is ~100 bytes).
MAX_REPLY = 16 * 1024 * 1024
#: Commands written before reading their replies: small enough that the writes always fit
#: in the socket buffers, so HAProxy blocked on writing replies can never deadlock us.
WINDOW_COMMANDS = 64
WINDOW_BYTES = 8 * 1024

PROMPT = b"\n> "

#: `srv_admin_state` bits (HAProxy 2.6 server.h): forced by the CLI/agent, from the config.
ADMIN_FORCED_MAINT = 0x01
ADMIN_CONFIG_MAINT = 0x04
ADMIN_FORCED_DRAIN = 0x08

#: HAProxy object names: what its config parser accepts. Anything else could smuggle a
#: second command into the line, so it is refused before it reaches the socket.
_NAME = re.compile(r"[A-Za-z0-9_.:-]+\Z")

_STATE_COLUMNS = ("be_name", "srv_name", "srv_op_state", "srv_admin_state", "srv_uweight",
                  "srv_iweight")


class RuntimeApiError(Exception):
    """Talking to the HAProxy runtime API failed (connect, timeout, closed, bad reply)."""


class ServersStateError(RuntimeApiError):
    """A `show servers state` reply that is not format version 1 as HAProxy 2.x writes it."""


# --------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


RuntimeAddress = UnixAddress | TcpAddress

_TCP = re.compile(r"(?:ipv[46]@)?(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:/\[\]]+)):(?P<port>\d{1,5})\Z")


def parse_address(socket: str) -> RuntimeAddress:
    """`/run/haproxy/admin.sock` or `unix@path` (UNIX), `HOST:PORT` or `[V6]:PORT` (TCP).

    HAProxy's own `ipv4@` / `ipv6@` prefixes are accepted so a `stats socket` line can be
    copied as is. Raises RuntimeApiError for an empty address or a port out of range.
    """
    text = socket.strip()
    if text.startswith("unix@"):
        text = text[len("unix@"):]
        if text:
            return UnixAddress(text)
    elif not text.startswith(("/", ".")) and (match := _TCP.match(text)):
        port = int(match["port"])
        host = match["v6"] or match["host"]
        if not 0 < port < 65536:
            raise RuntimeApiError(f"HAProxy runtime API address {socket!r}: port {port} is "
                                  "out of range 1-65535")
        if match["v6"] and not _is_v6(host):
            raise RuntimeApiError(f"HAProxy runtime API address {socket!r}: {host!r} is not "
                                  "an IPv6 address")
        return TcpAddress(host, port)
    elif text:
        return UnixAddress(text)
    raise RuntimeApiError("empty HAProxy runtime API address: give a UNIX socket path or "
                          "HOST:PORT of a `stats socket ... level admin`")


def _is_v6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host.split("%")[0])
    except ValueError:
        return False
    return True


def valid_name(name: str) -> bool:
    """True when `name` can be a HAProxy backend or server name on a command line."""
    return bool(_NAME.match(name))


# --------------------------------------------------------------------------- sans-IO parsing


class PromptFramer:
    """Splits the byte stream of a `prompt` mode session into reply bodies.

    Every reply ends with the prompt `"\\n> "`; a body is what precedes it without its last
    newline, so an accepted `set` command has the empty body and an error is one line.
    """

    def __init__(self, max_reply: int = MAX_REPLY) -> None:
        self._buffer = bytearray()
        self._scanned = 0
        self._max = max_reply

    def feed(self, data: bytes) -> list[str]:
        """Add bytes; return the bodies now complete. Raises RuntimeApiError when too big."""
        self._buffer += data
        bodies: list[str] = []
        while True:
            end = self._buffer.find(PROMPT, max(0, self._scanned - len(PROMPT) + 1))
            if end < 0:
                self._scanned = len(self._buffer)
                break
            body = bytes(self._buffer[:end])
            del self._buffer[:end + len(PROMPT)]
            self._scanned = 0
            bodies.append(body.decode("utf-8", "replace").removesuffix("\n"))
        if len(self._buffer) > self._max:
            raise RuntimeApiError(f"HAProxy reply larger than {self._max} bytes; refusing it")
        return bodies


@dataclass(frozen=True)
class ServerState:
    """One server line of `show servers state`, with the fields reconciliation needs."""

    backend: str
    name: str
    op_state: int
    admin_state: int
    weight: int
    initial_weight: int

    @property
    def admin(self) -> str:
        """The admin state lbha sets: "maint", "drain" or "ready" (forced bits only)."""
        if self.admin_state & ADMIN_FORCED_MAINT:
            return "maint"
        if self.admin_state & ADMIN_FORCED_DRAIN:
            return "drain"
        return "ready"

    @property
    def config_maint(self) -> bool:
        """Declared `disabled` in haproxy.cfg: `set server ... state ready` cannot clear it."""
        return bool(self.admin_state & ADMIN_CONFIG_MAINT)


def parse_servers_state(text: str) -> dict[str, dict[str, ServerState]]:
    """Parse a `show servers state [BACKEND]` body into backend -> server name -> state.

    Raises ServersStateError (and nothing else) for an error reply such as
    "Can't find backend.", another format version, a missing column or a bad line.
    """
    lines = text.split("\n")
    if not lines or lines[0].strip() != "1":
        first = lines[0].strip() if lines else ""
        raise ServersStateError(f"not a `show servers state` version 1 reply: {first[:120]!r}")
    if len(lines) < 2 or not lines[1].startswith("# "):
        raise ServersStateError("`show servers state` reply has no column header line")
    columns = lines[1][2:].split()
    try:
        index = [columns.index(name) for name in _STATE_COLUMNS]
    except ValueError:
        missing = [name for name in _STATE_COLUMNS if name not in columns]
        raise ServersStateError(f"`show servers state` lacks columns {missing}") from None
    width = max(index) + 1
    result: dict[str, dict[str, ServerState]] = {}
    for number, line in enumerate(lines[2:], start=3):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) < width:
            raise ServersStateError(f"`show servers state` line {number} has {len(fields)} "
                                    f"fields, expected {len(columns)}: {line[:120]!r}")
        backend, name, op_state, admin, weight, initial = (fields[i] for i in index)
        try:
            state = ServerState(backend, name, int(op_state), int(admin), int(weight),
                                int(initial))
        except ValueError:
            raise ServersStateError(f"`show servers state` line {number} has a non-numeric "
                                    f"state or weight: {line[:120]!r}") from None
        result.setdefault(backend, {})[name] = state
    return result


def parse_info(text: str) -> dict[str, str]:
    """`show info` as a mapping of field name to value."""
    info: dict[str, str] = {}
    for line in text.split("\n"):
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def process_identity(text: str) -> tuple[str, str]:
    """Which HAProxy worker answered (`show info` Pid and Start_time_sec): a reload changes it."""
    info = parse_info(text)
    if "Pid" not in info:
        raise RuntimeApiError(f"`show info` reply without a Pid line: {text[:120]!r}")
    return info["Pid"], info.get("Start_time_sec", "")


def windows(commands: Sequence[str]) -> list[list[str]]:
    """Split commands into pipelined windows bounded in count and bytes."""
    result: list[list[str]] = []
    current: list[str] = []
    size = 0
    for command in commands:
        if current and (len(current) >= WINDOW_COMMANDS or size + len(command) > WINDOW_BYTES):
            result.append(current)
            current, size = [], 0
        current.append(command)
        size += len(command) + 1
    if current:
        result.append(current)
    return result


# --------------------------------------------------------------------------- trio I/O


class Session:
    """One `prompt` mode connection; use through `open_session`."""

    def __init__(self, stream: trio.abc.Stream, address: RuntimeAddress) -> None:
        self._stream = stream
        self._address = address
        self._framer = PromptFramer()
        self._pending: list[str] = []
        self._prompted = False

    async def execute(self, commands: Sequence[str]) -> list[str]:
        """Run commands in order; return one reply body per command ("" = accepted)."""
        replies: list[str] = []
        for window in windows(commands):
            lines = window if self._prompted else ["prompt", *window]
            expected = len(lines)
            await self._send("".join(f"{line}\n" for line in lines).encode())
            bodies = await self._receive(expected)
            if not self._prompted:
                bodies = bodies[1:]
                self._prompted = True
            replies.extend(bodies)
        return replies

    async def _send(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise RuntimeApiError(f"HAProxy runtime API {self._address}: connection lost "
                                  f"while sending ({exc or type(exc).__name__})") from None

    async def _receive(self, expected: int) -> list[str]:
        bodies, self._pending = self._pending, []
        while len(bodies) < expected:
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise RuntimeApiError(f"HAProxy runtime API {self._address}: connection lost "
                                      f"while reading ({exc or type(exc).__name__})") from None
            if not data:
                raise RuntimeApiError(f"HAProxy runtime API {self._address} closed the "
                                      "connection (reloading or stopping?)")
            bodies.extend(self._framer.feed(data))
        self._pending = bodies[expected:]
        return bodies[:expected]


async def _connect(address: RuntimeAddress) -> trio.abc.Stream:
    try:
        if isinstance(address, UnixAddress):
            return await trio.open_unix_socket(address.path)
        return await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise RuntimeApiError(f"cannot connect to HAProxy runtime API {address}: {reason} "
                              "(is HAProxy running with this `stats socket ... level "
                              "admin`?)") from None


@asynccontextmanager
async def open_session(address: RuntimeAddress) -> AsyncIterator[Session]:
    """Connect, yield a Session, close on every exit. The caller bounds the time."""
    stream = await _connect(address)
    try:
        yield Session(stream, address)
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
