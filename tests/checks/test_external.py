"""`external`: real processes from small shell scripts written into tmp_path."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import trio

from lbha.checkapi import CheckResult, Transcript
from lbha.checks.external import OUTPUT_LIMIT, ExternalCheck
from lbha.plugin_manager import PluginManager

CHECK = ExternalCheck()


def script(tmp_path: Path, body: str, name: str = "check.sh") -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def alive(pid: int) -> bool:
    """True while pid is a live process (a zombie awaiting its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def gone(pid: int) -> bool:
    """Wait up to 1 s for pid to die: SIGKILL is sure, but the victim dies when scheduled."""
    for _ in range(100):
        if not alive(pid):
            return True
        await trio.sleep(0.01)
    return False


def has_unreaped_children() -> bool:
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def test_registered_through_the_entry_point() -> None:
    manager = PluginManager()
    manager.load_entry_points()
    assert isinstance(manager.register_checks().get("external"), ExternalCheck)


async def test_exit_zero_is_up(make_request, tmp_path) -> None:
    quiet = await CHECK.check(make_request(command=(script(tmp_path, "exit 0\n"),)))
    assert quiet.up
    assert quiet.reason == "exit 0"
    chatty = script(tmp_path, "echo all good\n", "chatty.sh")
    result = await CHECK.check(make_request(command=(chatty,)))
    assert result == CheckResult(True, "exit 0: all good")


async def test_exit_one_is_down_with_its_output(make_request, tmp_path) -> None:
    transcript = Transcript()
    command = script(tmp_path, """\
        echo "backend says no" >&2
        echo "second line"
        exit 1
    """)
    request = make_request(rport=8080, command=(command,), transcript=transcript)
    result = await CHECK.check(request)
    assert not result.up
    assert result.reason == "exit 1: backend says no"
    assert transcript.lines[1:] == ["< backend says no", "< second line", "* exit 1"]
    assert transcript.lines[0] == f"> exec {command} 127.0.0.1 80 127.0.0.1 8080"


async def test_output_in_the_reason_is_one_printable_line(make_request, tmp_path) -> None:
    command = script(tmp_path, r"""
        printf '\n   \n\033[31mred\talert\033[0m\nmore\n'
        exit 2
    """)
    result = await CHECK.check(make_request(command=(command,)))
    assert result.reason == "exit 2: ?[31mred?alert?[0m"


async def test_arguments_and_environment(make_request, tmp_path) -> None:
    out = tmp_path / "seen"
    command = script(tmp_path, f"""\
        for a in "$@"; do echo "arg=$a"; done > {out}
        env | grep '^LBHA_' | sort >> {out}
    """)
    request = make_request(
        "127.0.0.1", 8080, vip="127.0.0.1", vport=80, check_type="external",
        command=(command, "--flag", "two words"), timeout=2.5,
    )
    assert (await CHECK.check(request)).up
    assert out.read_text().splitlines() == [
        "arg=--flag", "arg=two words",
        "arg=127.0.0.1", "arg=80", "arg=127.0.0.1", "arg=8080",
        "LBHA_PROTOCOL=tcp", "LBHA_RIP=127.0.0.1", "LBHA_RPORT=8080", "LBHA_TIMEOUT=2.5",
        "LBHA_VIP=127.0.0.1", "LBHA_VIRTUAL=test", "LBHA_VPORT=80",
    ]


async def test_fwmark_service_and_missing_ports(make_request, tmp_path) -> None:
    out = tmp_path / "seen"
    command = script(tmp_path, f'echo "[$1] [$2] [$3] [$4]" > {out}\n')
    request = make_request("::1", None, vip=None, vport=None, mark=7, command=(command,))
    assert (await CHECK.check(request)).up
    assert out.read_text() == "[7] [0] [::1] [0]\n"  # the mark stands in for the VIP


async def test_no_shell_interprets_anything(make_request, tmp_path) -> None:
    out, pwned = tmp_path / "seen", tmp_path / "pwned"
    command = script(tmp_path, f'for a in "$@"; do echo "$a"; done > {out}\n')
    hostile = ("a; touch " + str(pwned), f"$(touch {pwned})", "`id`", "*", "x > y")
    assert (await CHECK.check(make_request(command=(command, *hostile)))).up
    assert out.read_text().splitlines()[:5] == list(hostile)
    assert not pwned.exists()


async def test_command_path_with_spaces_is_one_filename(make_request, tmp_path) -> None:
    # As in ldirectord: no word splitting of the command, so this names a missing file.
    command = script(tmp_path, "exit 0\n")
    result = await CHECK.check(make_request(command=(f"{command} --flag",)))
    assert result.reason == f"command {command} --flag not found"


async def test_hung_command_and_its_children_die_at_the_deadline(make_request, tmp_path) -> None:
    pids = tmp_path / "pids"
    command = script(tmp_path, f"""\
        sleep 60 &
        echo "$$ $!" > {pids}.tmp && mv {pids}.tmp {pids}
        sleep 60
    """)
    transcript = Transcript()
    start = trio.current_time()
    with trio.move_on_after(0.5) as scope:
        await CHECK.check(make_request(command=(command,), transcript=transcript))
    assert scope.cancelled_caught
    assert trio.current_time() - start < 1.5
    leader, child = map(int, pids.read_text().split())
    assert await gone(leader)
    assert await gone(child)
    assert transcript.lines[-1] == "* deadline: SIGTERM to the process group"


async def test_sigterm_ignored_gets_sigkill(make_request, tmp_path) -> None:
    pids = tmp_path / "pids"
    # An ignored signal stays ignored across exec: the children shrug off SIGTERM too.
    command = script(tmp_path, f"""\
        trap '' TERM
        sleep 60 &
        echo "$$ $!" > {pids}.tmp && mv {pids}.tmp {pids}
        while :; do sleep 0.05; done
    """)
    start = trio.current_time()
    with trio.move_on_after(0.3):
        await CHECK.check(make_request(command=(command,)))
    assert trio.current_time() - start < 1.5
    leader, child = map(int, pids.read_text().split())
    assert await gone(leader)
    assert await gone(child)


async def test_leftover_children_are_killed_when_the_command_exits(make_request, tmp_path):
    # The child keeps the output pipe open; the check must neither wait for it nor leak it.
    pidfile = tmp_path / "child"
    command = script(tmp_path, f"""\
        sleep 60 &
        echo "$!" > {pidfile}
        echo started
    """)
    start = trio.current_time()
    result = await CHECK.check(make_request(command=(command,)))
    assert trio.current_time() - start < 1.0
    assert result.reason == "exit 0: started"
    assert await gone(int(pidfile.read_text()))


async def test_huge_output_is_bounded(make_request, tmp_path) -> None:
    transcript = Transcript()
    command = script(tmp_path, "head -c 5000000 /dev/zero | tr '\\0' x\nexit 3\n")
    result = await CHECK.check(make_request(command=(command,), transcript=transcript))
    assert result.reason == "exit 3: " + "x" * 200
    received = [line for line in transcript.lines if line.startswith("<")]
    assert received == ["< " + "x" * OUTPUT_LIMIT]
    assert f"* output truncated: {5000000 - OUTPUT_LIMIT} more bytes dropped" in transcript.lines


async def test_missing_and_unexecutable_commands(make_request, tmp_path) -> None:
    missing = await CHECK.check(make_request(command=(str(tmp_path / "nope"),)))
    assert missing.reason == f"command {tmp_path / 'nope'} not found"
    plain = tmp_path / "plain.sh"
    plain.write_text("#!/bin/sh\nexit 0\n")
    plain.chmod(0o644)
    if os.geteuid() == 0:
        # Root may execute anything with an x bit somewhere; with none it is still refused.
        assert not os.access(plain, os.X_OK)
    result = await CHECK.check(make_request(command=(str(plain),)))
    assert result.reason == f"command {plain} is not executable"
    no_interpreter = script(tmp_path, "exit 0\n", "broken.sh")
    Path(no_interpreter).write_text("#!/nonexistent/interpreter\n")
    broken = await CHECK.check(make_request(command=(no_interpreter,)))
    assert broken.reason == f"command {no_interpreter} not found"
    empty = await CHECK.check(make_request(command=()))
    assert empty.reason == "external check has no command"


async def test_killed_by_a_signal_is_down(make_request, tmp_path) -> None:
    # ldirectord counts this as up (it reads only the exit code byte); lbha does not.
    killed = await CHECK.check(make_request(command=(script(tmp_path, "kill -KILL $$\n"),)))
    assert killed == CheckResult(False, "killed by SIGKILL")
    termed = script(tmp_path, "echo dying\nkill -TERM $$\n", "term.sh")
    assert (await CHECK.check(make_request(command=(termed,)))).reason == (
        "killed by SIGTERM: dying"
    )


async def test_cancelled_checks_leak_no_descriptor_or_zombie(make_request, tmp_path) -> None:
    command = script(tmp_path, "sleep 60\n")
    before = len(os.listdir("/proc/self/fd"))
    for delay in (0, 0.01, 0.05, 0.1) * 3:
        with trio.move_on_after(delay):
            await CHECK.check(make_request(command=(command,)))
    assert len(os.listdir("/proc/self/fd")) == before
    assert not has_unreaped_children()
