"""The example third-party plugin (contrib/example-plugin) installs, registers and works.

The first test takes the path a third party takes: a fresh virtualenv, `pip install` of lbha
and of the plugin distribution, then `lbha plugins`. The rest run the plugin's `redis` check
against tiny trio servers on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, Target, Transcript
from lbha.config import load_config_text
from lbha.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIR = REPO / "contrib" / "example-plugin"

if str(PLUGIN_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGIN_DIR))

from lbha_example_redis.check import RedisCheck  # noqa: E402

_COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".cache",
    "tests",
    "bench",
    "contrib",
)


# ------------------------------------------------------------------ install in a fresh venv


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run outside the checkout (cwd), so `python -c` cannot import ./lbha by accident."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env.update(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd, check=False
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}"
        f"\n--- stderr\n{proc.stderr}"
    )
    return proc


@pytest.mark.slow
def test_lbha_plugins_lists_the_installed_third_party_check(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # Without its own pip and setuptools: venv's bundled setuptools (65 on Python 3.11) would
    # shadow this environment's and cannot build a wheel without the `wheel` package.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"

    # Make this environment's packages (trio, pluggy, setuptools...) visible to the new venv,
    # so nothing is downloaded. A path line in a .pth file only extends sys.path: the .pth
    # files over there (such as lbha's editable-install hook) are not run.
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path
    ).stdout.strip()
    here = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(purelib) / "_lbha_test_parent_env.pth").write_text("".join(f"{p}\n" for p in here))

    # Build from copies, so the build leaves no build/ or *.egg-info in the repository.
    lbha_src = tmp_path / "src" / "lbha"
    plugin_src = tmp_path / "src" / "example-plugin"
    shutil.copytree(REPO, lbha_src, ignore=_COPY_IGNORE)
    shutil.copytree(PLUGIN_DIR, plugin_src, ignore=_COPY_IGNORE)
    if not (lbha_src / "README.md").exists():  # pyproject's readme, should it be missing
        (lbha_src / "README.md").write_text("lbha\n")
    _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--no-cache-dir",
            "--ignore-installed",
            str(lbha_src),
            str(plugin_src),
        ],
        tmp_path,
    )

    # The venv runs its own installed copies, not this checkout's editable install.
    where = _run(
        [
            str(python),
            "-c",
            "import lbha, lbha_example_redis; "
            "print(lbha.__file__); print(lbha_example_redis.__file__)",
        ],
        tmp_path,
    ).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where

    out = _run([str(venv / "bin" / "lbha"), "plugins"], tmp_path).stdout
    lines = out.splitlines()
    redis = [line for line in lines if re.match(r"\s*redis\s", line)]
    assert redis, out
    assert "negotiate" in redis[0], out
    assert re.search(r"\bexample_redis\b", redis[0]), out
    assert "lbha-example-redis" in redis[0], out
    connect = [line for line in lines if re.match(r"\s*connect\s", line)]
    assert any("negotiate" not in line and re.search(r"\blbha\b", line) for line in connect), out
    # The plugin itself (entry point name and distribution) is listed, and nothing failed.
    assert any(
        re.match(r"\s*example_redis\s", line) and "lbha-example-redis" in line for line in lines
    ), out
    assert "failed plugins" not in out, out


# ------------------------------------------------------------------ the check itself

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    """Serve `handler` on 127.0.0.1 on a free port for the duration of the block."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def _receive(stream: trio.SocketStream) -> bytes:
    """The next bytes, b"" at the end: the kit's open_tcp closes with a reset (no TIME_WAIT
    on the director), which a server sees as a broken connection rather than EOF."""
    try:
        return await stream.receive_some(4096)
    except trio.BrokenResourceError:
        return b""


class _Reader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def line(self) -> bytes | None:
        while b"\r\n" not in self.buffer:
            chunk = await _receive(self.stream)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, rest = bytes(self.buffer).partition(b"\r\n")
        self.buffer = bytearray(rest)
        return line

    async def command(self) -> list[bytes] | None:
        """One command, inline ("PING") or as a RESP array of bulk strings."""
        line = await self.line()
        if line is None:
            return None
        if not line.startswith(b"*"):
            return line.split()
        words = []
        for _ in range(int(line[1:])):
            header, word = await self.line(), await self.line()
            assert header is not None
            assert word is not None
            assert header.startswith(b"$")
            words.append(word)
        return words


def fake_redis(password: str | None = None, pong: bytes = b"+PONG\r\n") -> tuple[Handler, list]:
    """A Redis-ish server; returns the handler and the list of commands it received."""
    seen: list[list[bytes]] = []

    async def handler(stream: trio.SocketStream) -> None:
        reader = _Reader(stream)
        authed = password is None
        while (command := await reader.command()) is not None:
            seen.append(command)
            verb = command[0].upper() if command else b""
            if verb == b"AUTH":
                authed = command[-1].decode() == password
                await stream.send_all(
                    b"+OK\r\n" if authed else b"-WRONGPASS invalid username-password pair\r\n"
                )
            elif not authed:
                await stream.send_all(b"-NOAUTH Authentication required.\r\n")
            elif verb == b"SELECT":
                await stream.send_all(b"+OK\r\n")
            elif verb == b"PING":
                await stream.send_all(pong)
            else:
                await stream.send_all(b"-ERR unknown command\r\n")

    return handler, seen


def _registry() -> CheckRegistry:
    registry = CheckRegistry(current_plugin="example_redis")
    registry.add(RedisCheck())
    return registry


def _request(port: int, check: str = "", transcript: Transcript | None = None) -> CheckRequest:
    """A CheckRequest built the way lbha builds it: from a validated config."""
    text = f"""
[[virtual]]
address = "127.0.0.1"
ports = {port}

[virtual.check]
service = "redis"
{check}

[[virtual.real]]
address = "127.0.0.1"
"""
    config = load_config_text(text, checks=_registry())
    virtual = config.virtuals[0]
    real = virtual.reals[0]
    target = Target(
        virtual=virtual.name,
        vip=virtual.address,
        vport=port,
        protocol="tcp",
        rip=real.address,
        rport=real.port or port,
    )
    return CheckRequest(target, real.check, real.check.options, 2.0, transcript)


async def _check(request: CheckRequest) -> CheckResult:
    with trio.fail_after(5):
        return await RedisCheck().check(request)


async def test_ping_answered_with_pong_is_up() -> None:
    handler, seen = fake_redis()
    async with serving(handler) as port:
        result = await _check(_request(port))
    assert result.up, result.reason
    assert seen == [[b"PING"]]


async def test_auth_and_select_then_ping() -> None:
    handler, seen = fake_redis(password="pa ss")
    transcript = Transcript()
    async with serving(handler) as port:
        request = _request(
            port, 'options = { password = "pa ss", database = 3 }', transcript=transcript
        )
        result = await _check(request)
    assert result.up, result.reason
    assert seen == [[b"AUTH", b"pa ss"], [b"SELECT", b"3"], [b"PING"]]
    assert "> AUTH ****" in transcript.lines
    assert "< +PONG" in transcript.lines
    assert not any("pa ss" in line for line in transcript.lines)


async def test_password_from_the_check_spec() -> None:
    handler, seen = fake_redis(password="s3cret")
    async with serving(handler) as port:
        result = await _check(_request(port, 'password = "s3cret"'))
    assert result.up, result.reason
    assert seen[0] == [b"AUTH", b"s3cret"]


async def test_wrong_password_is_down() -> None:
    handler, _ = fake_redis(password="right")
    async with serving(handler) as port:
        result = await _check(_request(port, 'options = { password = "wrong" }'))
    assert not result.up
    assert "AUTH" in result.reason
    assert "WRONGPASS" in result.reason
    assert "wrong" not in result.reason.replace("WRONGPASS", "")


async def test_custom_expect_option() -> None:
    handler, _ = fake_redis(pong=b"+HELLO\r\n")
    async with serving(handler) as port:
        default = await _check(_request(port))
        custom = await _check(_request(port, 'options = { expect = "+HELLO" }'))
    assert not default.up
    assert custom.up, custom.reason


async def test_garbage_answer_is_down() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    async with serving(handler) as port:
        result = await _check(_request(port))
    assert not result.up
    assert "HTTP/1.1 400" in result.reason


async def test_endless_line_is_down() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        with trio.move_on_after(5):
            while True:
                await stream.send_all(b"x" * 1024)

    async with serving(handler) as port:
        result = await _check(_request(port))
    assert not result.up
    assert "longer than" in result.reason


async def test_close_without_reply_is_down() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)

    async with serving(handler) as port:
        result = await _check(_request(port))
    assert not result.up
    assert "without a reply" in result.reason


async def test_refused_is_down() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # the port is now (very probably) closed
    result = await _check(_request(port))
    assert not result.up
    assert f"127.0.0.1:{port}" in result.reason


async def test_silent_server_is_down_with_the_step_named_before_the_deadline() -> None:
    """The kit's deadline runner gives the plugin its own verdict within request.timeout."""
    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)  # the PING, never answered
        await trio.sleep_forever()

    async with serving(handler) as port:
        request = dataclasses.replace(_request(port), timeout=0.5)
        with trio.fail_after(0.5):
            result = await RedisCheck().check(request)
    assert result == CheckResult.failure(
        f"waiting for the reply to PING from 127.0.0.1:{port} timed out after 0.45 s "
        "(0 bytes received)")


async def test_silent_server_hits_the_deadline_and_the_connection_is_closed() -> None:
    closed = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)  # the PING, never answered
        with trio.fail_after(5):
            assert await _receive(stream) == b""  # the check closed its end
        closed.set()

    async with serving(handler) as port:
        request = _request(port)
        # The engine enforces the deadline by cancelling the check, as here.
        with trio.move_on_after(0.3) as deadline:
            await RedisCheck().check(request)
        assert deadline.cancelled_caught
        with trio.fail_after(5):
            await closed.wait()


def test_options_are_validated_against_the_schema() -> None:
    with pytest.raises(ConfigError) as excinfo:
        _request(6379, 'options = { database = "zero", passwrd = "x" }')
    message = str(excinfo.value)
    assert "database" in message
    assert "expected int" in message
    assert "passwrd" in message


def test_options_defaults_are_filled_in() -> None:
    options = _request(6379).spec.options
    assert options["expect"] == "+PONG"
    assert options["password"] is None
    assert RedisCheck.options["password"].secret
