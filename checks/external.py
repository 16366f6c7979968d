"""`external`: run an operator's command; exit status 0 means the real server is up.

The command runs without a shell as `command... VIP VPORT RIP RPORT`, with the same values
(and a few more) in LBHA_* environment variables, in a session and process group of its own.
When the command exits, anything it left behind in that group is killed; at the deadline
the whole group gets SIGTERM, then SIGKILL after a short grace. Standard output and error
are captured together, bounded, and their first line is quoted in the reason.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import trio

from lbha import hookimpl
from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec, Target, Transcript
from lbha.checkkit import quote

#: Bytes of output kept; the rest is read and dropped so the command never blocks on a pipe.
OUTPUT_LIMIT = 4096
#: Characters of output quoted in a reason.
REASON_LIMIT = 200
#: Seconds between SIGTERM and SIGKILL when the deadline cancels a running command.
KILL_GRACE = 0.5
#: Seconds to wait for end of output after the command exited and its group was killed;
#: a process that left the group (setsid) may still hold the pipe open.
DRAIN_WAIT = 0.2


def command_environment(target: Target, timeout: float) -> dict[str, str]:
    """The LBHA_* variables for one run; ldirectord set none, so there are no legacy names."""
    vip, vport, rip, rport = command_arguments(target)
    return {
        "LBHA_VIP": vip,
        "LBHA_VPORT": vport,
        "LBHA_RIP": rip,
        "LBHA_RPORT": rport,
        "LBHA_PROTOCOL": target.protocol,
        "LBHA_VIRTUAL": target.virtual,
        "LBHA_TIMEOUT": f"{timeout:g}",
    }


def command_arguments(target: Target) -> tuple[str, str, str, str]:
    """VIP VPORT RIP RPORT as ldirectord passes them: a missing port is "0"."""
    return (
        # A fwmark service has no address: ldirectord passes the mark in its place.
        str(target.vip) if target.vip is not None else str(target.mark or ""),
        str(target.vport or 0),
        str(target.rip),
        str(target.rport or 0),
    )


class _Capture:
    """The first OUTPUT_LIMIT bytes of a stream, the rest counted and dropped."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.dropped = 0
        self.finished = trio.Event()

    async def read_from(self, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some(65536):
            room = OUTPUT_LIMIT - len(self.data)
            self.data += chunk[:room]
            self.dropped += max(0, len(chunk) - room)
        self.finished.set()

    def lines(self) -> list[str]:
        text = self.data.decode("utf-8", errors="replace")
        return [_printable(line) for line in text.splitlines() if line.strip()]


def _printable(text: str) -> str:
    # Output is whatever the command printed: keep control characters out of logs.
    return quote(text.strip(), None, marks=False)


def _exited(pidfd: int) -> bool:
    # WNOWAIT: look without reaping; the zombie keeps the process group id from reuse.
    return os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is already empty
        os.killpg(pgid, sig)


async def _end_group(
    process: trio.Process, pidfd: int, transcript: Transcript | None
) -> None:
    """Stop whatever is left of the command's process group and reap the command."""
    if not _exited(pidfd):
        if transcript:
            transcript.note("deadline: SIGTERM to the process group")
        _kill_group(process.pid, signal.SIGTERM)
        with trio.move_on_after(KILL_GRACE):
            await trio.lowlevel.wait_readable(pidfd)
    _kill_group(process.pid, signal.SIGKILL)
    # Bounded: a process stuck in the kernel (D state) would otherwise stall this check.
    with trio.move_on_after(KILL_GRACE):
        await process.wait()


async def run_command(
    argv: Sequence[str], env: Mapping[str, str], transcript: Transcript | None
) -> tuple[int, _Capture]:
    """Run argv in a new session; its exit status (negative: signal) and captured output.

    Raises OSError when the command cannot be started.
    """
    process = await trio.lowlevel.open_process(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env=dict(env), start_new_session=True,
    )
    # Nothing may checkpoint between the start and the try: a cancel there would leak it.
    assert process.stdout is not None
    pidfd = os.pidfd_open(process.pid)
    capture = _Capture()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(capture.read_from, process.stdout)
            await trio.lowlevel.wait_readable(pidfd)
            # The command is a zombie now, so its group id is still ours to signal.
            _kill_group(process.pid, signal.SIGKILL)
            with trio.move_on_after(DRAIN_WAIT):
                await capture.finished.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await _end_group(process, pidfd, transcript)
            os.close(pidfd)
            await process.stdout.aclose()
    assert process.returncode is not None
    return process.returncode, capture


def _verdict(status: int, capture: _Capture) -> CheckResult:
    lines = capture.lines()
    quote = f": {lines[0][:REASON_LIMIT]}" if lines else ""
    if status == 0:
        return CheckResult.success(f"exit 0{quote}")
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return CheckResult.failure(f"killed by {name}{quote}")
    return CheckResult.failure(f"exit {status}{quote}")


class ExternalCheck:
    name = "external"
    negotiate = False
    spec_keys = frozenset({"command"})
    required_spec_keys = MappingProxyType({"command": "the program to run"})
    description = "run a command with VIP VPORT RIP RPORT; exit status 0 means up"
    options: MappingProxyType[str, OptionSpec] = MappingProxyType({})

    async def check(self, request: CheckRequest) -> CheckResult:
        command = request.spec.command
        if not command:
            return CheckResult.failure("external check has no command")
        argv = [*command, *command_arguments(request.target)]
        env = {**os.environ, **command_environment(request.target, request.timeout)}
        transcript = request.transcript
        if transcript:
            transcript.sent(f"exec {shlex.join(argv)}")
        try:
            status, capture = await run_command(argv, env, transcript)
        except FileNotFoundError:
            return CheckResult.failure(f"command {command[0]} not found")
        except PermissionError:
            return CheckResult.failure(f"command {command[0]} is not executable")
        except OSError as exc:
            return CheckResult.failure(f"cannot run {command[0]}: {exc.strerror or exc}")
        result = _verdict(status, capture)
        if transcript:
            for line in capture.lines():
                transcript.received(line)
            if capture.dropped:
                transcript.note(f"output truncated: {capture.dropped} more bytes dropped")
            transcript.note(result.reason.partition(":")[0])
        return result


@hookimpl
def lbha_register_checks(registry: CheckRegistry) -> None:
    registry.add(ExternalCheck())
