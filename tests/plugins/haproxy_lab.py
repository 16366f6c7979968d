"""A real haproxy (Debian package) on loopback for the HAProxy plugin tests and bench.

`HaproxyLab` writes a config with one HTTP frontend and named backends, a UNIX and a TCP
admin stats socket, and runs `haproxy -W -db` (master-worker, foreground): reload is SIGUSR2
to the master, stop is SIGTERM to the master's PID. `HttpServers` are the real servers: tiny
threaded HTTP servers answering their own name and counting hits. Verification goes through
`admin()`, a plain blocking client independent of the plugin's code.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_missing() -> str | None:
    """Why haproxy cannot run here, or None."""
    if not os.path.exists(HAPROXY):
        return "haproxy is not installed (scripts/install-system-packages installs it)"
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    #: (server name, port, weight)
    servers: Sequence[tuple[str, int, int]]
    extra: str = ""


class HaproxyLab:
    """One haproxy master-worker process with a generated config in `workdir`."""

    def __init__(self, workdir: Path, backends: Sequence[Backend], *,
                 admin_sock: Path | None = None) -> None:
        self.workdir = workdir
        self.admin_sock = admin_sock or workdir / "admin.sock"
        self.tcp_port = free_port()
        self.frontend_port = free_port()
        self.backends = backends
        self.config = workdir / "haproxy.cfg"
        self.log = workdir / "haproxy.log"
        self.master_sock = workdir / "master.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.write_config()

    @property
    def tcp_socket(self) -> str:
        return f"127.0.0.1:{self.tcp_port}"

    def write_config(self) -> None:
        lines = [
            "global",
            "    master-worker",
            f"    stats socket {self.admin_sock} mode 600 level admin",
            f"    stats socket ipv4@127.0.0.1:{self.tcp_port} level admin",
            "    stats timeout 10s",
            "defaults",
            "    mode http",
            "    timeout connect 2s",
            "    timeout client 20s",
            "    timeout server 20s",
            "frontend fe",
            f"    bind 127.0.0.1:{self.frontend_port}",
            f"    default_backend {self.backends[0].name}",
        ]
        for backend in self.backends:
            lines += [f"backend {backend.name}", "    balance roundrobin"]
            if backend.extra:
                lines.append(f"    {backend.extra}")
            lines += [f"    server {name} 127.0.0.1:{port} weight {weight}"
                      for name, port, weight in backend.servers]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, attempts: int = 5) -> None:
        """Start haproxy; a port taken meanwhile (free_port races with ephemeral client
        ports) is replaced and retried a bounded number of times."""
        for attempt in range(attempts):
            try:
                self._start_once()
                return
            except RuntimeError as exc:
                self.stop()
                if "Address already in use" not in str(exc) or attempt == attempts - 1:
                    raise
                self.tcp_port, self.frontend_port = free_port(), free_port()
                self.write_config()

    def _start_once(self) -> None:
        check = subprocess.run([HAPROXY, "-c", "-q", "-f", str(self.config)],
                               capture_output=True, text=True, timeout=30, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"generated haproxy.cfg is invalid: {check.stderr}")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-W", "-db", "-S", str(self.master_sock), "-f", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT)
        self.wait_ready()
        self._wait_master()

    def _wait_master(self, timeout: float = 10.0) -> None:
        """The master handles SIGUSR2 only once its CLI loop runs, after the worker answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._master_answers():
                return
            time.sleep(0.02)
        raise RuntimeError(f"haproxy master CLI did not answer within {timeout} s")

    def wait_ready(self, previous_pid: str | None = None, timeout: float = 10.0) -> str:
        """Wait until a worker (other than `previous_pid`) answers; return its PID."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited: {self.log.read_text()[-2000:]}")
            try:
                pid = self.worker_pid()
            except OSError:
                pid = None
            if pid is not None and pid != previous_pid:
                return pid
            time.sleep(0.02)
        raise RuntimeError(f"haproxy did not answer within {timeout} s: "
                           f"{self.log.read_text()[-2000:]}")

    def _master_answers(self) -> bool:
        # The 2.6 master CLI keeps the connection open after answering: read until the
        # end of the `show proc` listing instead of until EOF.
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(self.master_sock))
                s.sendall(b"show proc\n")
                data = b""
                for _ in range(100):
                    data += s.recv(65536)
                    if b"# programs" in data:
                        return b"worker" in data
        except OSError:
            return False
        return False

    def worker_pid(self) -> str:
        for line in self.admin("show info").splitlines():
            if line.startswith("Pid:"):
                return line.split(":", 1)[1].strip()
        raise OSError("no Pid in show info")

    def reload(self) -> str:
        """Reload the master (SIGUSR2); return the new worker's PID once it answers."""
        assert self.process is not None
        old = self.worker_pid()
        self.process.send_signal(signal.SIGUSR2)
        pid = self.wait_ready(previous_pid=old)
        self._wait_master()
        return pid

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    # ------------------------------------------------------------------ verification

    def admin(self, command: str, *, timeout: float = 5.0) -> str:
        """One command over the UNIX socket in non-interactive mode; the reply body."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.admin_sock))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode().rstrip("\n")

    def servers_state(self, backend: str) -> dict[str, tuple[int, int]]:
        """Server name -> (srv_admin_state, srv_uweight), read with `show servers state`."""
        lines = self.admin(f"show servers state {backend}").splitlines()[2:]
        return {f[3]: (int(f[6]), int(f[7])) for f in (line.split() for line in lines)}

    def stat(self, backend: str) -> dict[str, tuple[str, str]]:
        """Server name -> (status, weight) from `show stat` CSV, parsed by header name."""
        lines = self.admin("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        status, weight = header.index("status"), header.index("weight")
        rows = (line.split(",") for line in lines[1:] if line)
        return {r[1]: (r[status], r[weight]) for r in rows
                if r[0] == backend and r[1] not in ("FRONTEND", "BACKEND")}

    def get(self, path: str = "/", timeout: float = 5.0) -> str:
        """One HTTP request through the frontend; the body (the real server's name)."""
        with socket.create_connection(("127.0.0.1", self.frontend_port), timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n"
                      .encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        return body.decode() if status.split(b" ")[1:2] == [b"200"] else status.decode()

    def hits(self, count: int) -> Counter[str]:
        return Counter(self.get() for _ in range(count))


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _NamedServer

    def do_GET(self) -> None:
        if self.path.startswith("/hold"):
            # Hold the request open (bounded): tests see whether HAProxy cuts it.
            self.server.holding.set()
            self.server.release.wait(10)
        body = self.server.name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _NamedServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.name = name
        self.holding = threading.Event()
        self.release = threading.Event()


class HttpServers:
    """Named HTTP real servers on loopback, each in its own thread."""

    def __init__(self, names: Sequence[str]) -> None:
        self.servers = {name: _NamedServer(name) for name in names}
        self.threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05},
                                         daemon=True) for s in self.servers.values()]
        for thread in self.threads:
            thread.start()

    def port(self, name: str) -> int:
        return self.servers[name].server_address[1]

    def stop(self, name: str) -> None:
        server = self.servers[name]
        server.release.set()
        server.shutdown()
        server.server_close()

    def close(self) -> None:
        for name, server in self.servers.items():
            with contextlib.suppress(OSError):
                if server.socket.fileno() >= 0:
                    self.stop(name)
        for thread in self.threads:
            thread.join(5)


@contextlib.contextmanager
def running(lab: HaproxyLab) -> Iterator[HaproxyLab]:
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()
