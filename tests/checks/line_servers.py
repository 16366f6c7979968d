"""Servers for the line-protocol check tests (ftp, mail, nntp), all on 127.0.0.1.

Real servers run as subprocesses started here and stopped by PID: pyftpdlib, aiosmtpd,
dovecot (IMAP, IMAPS, POP3, POP3S from a config in a tmp dir) and leafnode (an inetd-style
NNTP server, spawned per connection by a small accept loop in a private UTS namespace,
because it insists on a unique fully-qualified host name). Hostile servers are in
hostile.py; the helpers at the end run checks against either kind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cli_process import LBHA
from resources import fd_table, free_port, open_fds

from lbha.checkapi import CheckResult, Transcript
from lbha.testing import run_check_now

#: Login and password the real servers accept; the password has characters that need
#: escaping (IMAP quoted strings) and must never show in a transcript.
USER = "bob"
PASSWORD = 's3cr"et\\pw'


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str,
                   seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {seconds} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID, SIGKILL after 5 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def python_server(script: str, *args: str, what: str) -> Iterator[int]:
    """Run `script` (prints its port on the first line of stdout) and yield the port."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"{what} did not start (exit {proc.poll()})")
        port = int(line)
        wait_listening(port, proc, what)
        yield port
    finally:
        stop(proc)
        if proc.stdout:
            proc.stdout.close()


def make_cert(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1/localhost it signed: (ca, cert, key) files."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost", "mail.test")
    paths = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca.cert_pem.write_to_path(str(paths[0]))
    cert.cert_chain_pems[0].write_to_path(str(paths[1]))
    cert.private_key_pem.write_to_path(str(paths[2]))
    for path in paths:
        path.chmod(0o644)
    return paths


# ------------------------------------------------------------------------------ FTP

FTP_SCRIPT = """
    import sys
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

    root, user, password = sys.argv[1:4]
    authorizer = DummyAuthorizer()
    authorizer.add_user(user, password, root, perm="elr")
    authorizer.add_anonymous(root)

    class Handler(FTPHandler):
        auth_failed_timeout = 0  # answer 530 at once; the tests bound every check
        authorizer = authorizer
        banner = "lbha test FTP ready"

    server = FTPServer(("127.0.0.1", 0), Handler)
    server.max_cons = 2048
    print(server.socket.getsockname()[1], flush=True)
    server.serve_forever(handle_exit=False)
"""


@contextmanager
def ftp_server(root: Path) -> Iterator[int]:
    pytest.importorskip("pyftpdlib")
    with python_server(FTP_SCRIPT, str(root), USER, PASSWORD, what="pyftpdlib") as port:
        yield port


# ------------------------------------------------------------------------------ SMTP

SMTP_SCRIPT = """
    import asyncio, ssl, sys
    from aiosmtpd.handlers import Sink
    from aiosmtpd.smtp import SMTP

    async def main():
        context = None
        if len(sys.argv) > 1:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(sys.argv[1], sys.argv[2])
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(Sink(), hostname="smtp.test", tls_context=context),
            "127.0.0.1", 0, backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())
"""


@contextmanager
def smtp_server(cert: tuple[Path, Path] | None = None) -> Iterator[int]:
    """aiosmtpd; with `cert` (cert, key) it offers STARTTLS."""
    pytest.importorskip("aiosmtpd")
    args = [str(p) for p in cert] if cert else []
    with python_server(SMTP_SCRIPT, *args, what="aiosmtpd") as port:
        yield port


# ------------------------------------------------------------------------------ dovecot


@dataclass(frozen=True)
class Dovecot:
    imap: int
    imaps: int
    pop: int
    pops: int
    ca: Path


DOVECOT_CONF = """\
base_dir = {tmp}/run
state_dir = {tmp}/state
instance_name = lbha-test-{port}
log_path = {tmp}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
ssl = yes
ssl_cert = <{tmp}/cert.pem
ssl_key = <{tmp}/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain
# Answer the first wrong password at once (the per-IP penalty still delays later ones).
auth_failure_delay = 0
mail_location = maildir:{tmp}/mail/%u
default_login_user = dovenull
default_internal_user = dovecot
mail_uid = dovecot
mail_gid = dovecot
first_valid_uid = 1
mail_max_userip_connections = 10000
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {tmp}/users
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={tmp}/mail/%u
}}
service imap-login {{
  service_count = 0
  client_limit = 2000
  process_min_avail = 2
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = {imaps}
    ssl = yes
  }}
}}
service pop3-login {{
  service_count = 0
  client_limit = 2000
  process_min_avail = 2
  inet_listener pop3 {{
    port = {pop}
  }}
  inet_listener pop3s {{
    port = {pops}
    ssl = yes
  }}
}}
service anvil {{
  client_limit = 10000
}}
default_client_limit = 10000
default_process_limit = 1000
"""


@contextmanager
def dovecot_server() -> Iterator[Dovecot]:
    """dovecot -F with its own config, users file and certificate in a fresh /tmp dir.

    Not in pytest's tmp_path: dovecot's auth and mail processes run as the dovecot user and
    cannot traverse pytest's 0700 directories.
    """
    binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
    if not os.path.exists(binary) or not os.path.exists("/usr/lib/dovecot/imap"):
        pytest.skip("dovecot-imapd/dovecot-pop3d not installed (scripts/system-packages.txt)")
    with tempfile.TemporaryDirectory(prefix="lbha-dovecot-") as name:
        tmp = Path(name)
        tmp.chmod(0o755)
        with _dovecot_in(tmp, binary) as servers:
            yield servers


@contextmanager
def _dovecot_in(tmp: Path, binary: str) -> Iterator[Dovecot]:
    ca, _, _ = make_cert(tmp)
    for sub in ("run", "state", "mail"):
        (tmp / sub).mkdir()
    shutil.chown(tmp / "mail", "dovecot", "dovecot")
    # passwd-file: user:{PLAIN}password:uid:gid:gecos:home:shell:extra
    (tmp / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
    ports = {name: free_port() for name in ("imap", "imaps", "pop", "pops")}
    conf = tmp / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(tmp=tmp, port=ports["imap"], **ports))
    proc = subprocess.Popen([binary, "-F", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for name, port in ports.items():
            wait_listening(port, proc, f"dovecot ({name})")
        yield Dovecot(ca=ca, **ports)
    finally:
        stop(proc)


# ------------------------------------------------------------------------------ NNTP

#: leafnode refuses to serve (503) without a unique FQDN; it reads gethostname().
LEAFNODE_FQDN = "nntp.lbha-tests.net"

LEAFNODE_SCRIPT = """
    import signal, socket, subprocess, sys
    socket.sethostname(sys.argv[2])
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the per-connection servers
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        subprocess.Popen([sys.argv[1]], stdin=conn, stdout=conn, stderr=subprocess.DEVNULL)
        conn.close()
"""


@contextmanager
def nntp_server() -> Iterator[int]:
    """leafnode behind an inetd-style accept loop (how Debian runs it), in its own UTS ns."""
    binary = "/usr/sbin/leafnode"
    unshare = shutil.which("unshare")
    if not os.path.exists(binary) or unshare is None:
        pytest.skip("leafnode not installed (scripts/system-packages.txt)")
    proc = subprocess.Popen(
        [unshare, "--uts", sys.executable, "-c", textwrap.dedent(LEAFNODE_SCRIPT), binary,
         LEAFNODE_FQDN], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            pytest.skip(f"cannot start leafnode in a private UTS namespace (exit {proc.poll()})")
        port = int(line)
        wait_listening(port, proc, "leafnode")
        yield port
    finally:
        stop(proc)
        if proc.stdout:
            proc.stdout.close()


# ------------------------------------------------------------------------------ running

#: Deadline of the failure-path checks; each verdict must come within it plus SLACK.
DEADLINE = 0.5
SLACK = 0.1


async def timed(service: str, port: int, *, seconds: float = DEADLINE,
                **spec: object) -> tuple[CheckResult, float]:
    """Run `service` against 127.0.0.1:port as the engine does; the result and its duration."""
    start = time.monotonic()
    result = await run_check_now(service, rport=port, negotiate_timeout=seconds, **spec)
    return result, time.monotonic() - start


async def down_in_time(service: str, port: int, **spec: object) -> str:
    """Assert the check is down within the deadline + SLACK; its reason."""
    result, elapsed = await timed(service, port, **spec)
    assert not result.up, result.reason
    assert elapsed < DEADLINE + SLACK, (elapsed, result.reason)
    return result.reason


async def transcript_of(service: str, port: int, **spec: object) -> tuple[CheckResult, list[str]]:
    transcript = Transcript()
    result = await run_check_now(service, rport=port, transcript=transcript, **spec)
    return result, transcript.lines


async def assert_no_fd_growth(run: Callable[[], Awaitable[CheckResult]], *, up: bool,
                              count: int = 10_000, batch: int = 250) -> None:
    """`count` checks, `batch` at a time, all with verdict `up`; open fds unchanged after."""
    verdicts: list[bool] = []
    odd: list[str] = []

    async def one() -> None:
        result = await run()
        verdicts.append(result.up)
        if result.up != up:
            odd.append(result.reason)

    await one()  # warm-up: caches, lazy imports, the first TLS context
    verdicts.clear()
    before_table = fd_table()
    before = open_fds()
    for _ in range(count // batch):
        async with trio.open_nursery() as nursery:
            for _ in range(batch):
                nursery.start_soon(one)
    # In-process hostile servers close their side when they see ours go (bounded: 10 s, for
    # a loaded machine).
    for _ in range(1000):
        if open_fds() <= before:
            break
        await trio.sleep(0.01)
    leaked = {fd: what for fd, what in fd_table().items() if before_table.get(fd) != what}
    # Fewer is fine: a server-side socket of the warm-up check may close late.
    assert open_fds() <= before, leaked
    assert len(verdicts) == count // batch * batch
    assert set(verdicts) == {up}, odd[:3]


# ------------------------------------------------------------------------------ CLI

CLI_VIRTUAL = """\
[[virtual]]
name = "{name}"
address = "198.18.0.{host}"
ports = {vport}
forwarding = "nat"
[virtual.check]
type = "negotiate"
service = "{service}"
negotiate_timeout = "5s"
{check}
[[virtual.real]]
name = "real"
address = "127.0.0.1"
port = {port}
"""


def cli_check(tmp: Path, name: str, service: str, port: int, *, vport: int = 1,
              check: str = "") -> str:
    """`python -m lbha check CFG NAME --once -v` on a one-virtual config; its stdout.

    `check` holds extra TOML lines for [virtual.check] (credentials, options table last).
    """
    config = tmp / f"{name}.toml"
    config.write_text(f'[paths]\nrun_dir = "{tmp}/run"\nstate_dir = "{tmp}/state"\n\n'
                      + CLI_VIRTUAL.format(name=name, host=10 + len(name), vport=vport,
                                           service=service, port=port, check=check))
    out = subprocess.run([*LBHA, "check", str(config), name, "--once",
                          "-v"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout
