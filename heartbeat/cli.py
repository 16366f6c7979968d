"""The heartbeat program, `python -m lbha.heartbeat COMMAND --config FILE`.

`lbha heartbeat` runs it (exec, same PID) and `lbha config check` asks it `check-host`: the
`lbha` CLI never imports the heartbeat. Operator commands (takeover, standby,
cluster-status) are the CLI's, over the control socket.

Each command returns an exit code: 0 done, 1 failed (the message says why, on stderr).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import trio

from lbha.config import DEFAULT_PATH, load_config
from lbha.errors import LbhaError
from lbha.logs import COMMAND_LEVEL, DAEMON_LEVEL, LEVELS, log_level, setup_logging

EXIT_OK = 0
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lbha.heartbeat")
    parser.add_argument("--log-level", choices=LEVELS,
                        help=f"default: {DAEMON_LEVEL} for heartbeat, {COMMAND_LEVEL} otherwise")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = [
        ("heartbeat", "run the heartbeat daemon (lbha-heartbeat.service)", cmd_heartbeat),
        ("check-host", "print, one a line, what stops the daemon on this host although the "
         "config is valid (floating IPs it cannot place)", cmd_check_host),
    ]
    for name, text, func in commands:
        command = sub.add_parser(name, help=text, description=text)
        command.add_argument("--config", type=Path, default=DEFAULT_PATH,
                             help=f"config file (default {DEFAULT_PATH})")
        command.set_defaults(func=func)
    sub.choices["heartbeat"].set_defaults(log_level_default=DAEMON_LEVEL)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(log_level(args))
    return int(args.func(args))


def _fail(message: object) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_FAILED


def _pyroute2_codec_only() -> None:
    """Let pyroute2's netlink codec be imported without the package's __init__, which imports
    every family pyroute2 supports (NDB, IPDB, conntrack, nftables, wireless, ...): 8 MB of
    the daemon's RSS. The heartbeat uses its rtnetlink codec and nothing else."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is not None and spec.submodule_search_locations is not None:
        sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)


def cmd_heartbeat(args: argparse.Namespace) -> int:
    _pyroute2_codec_only()
    from lbha.heartbeat.daemon import run_daemon

    try:
        trio.run(run_daemon, args.config)
    except LbhaError as exc:
        return _fail(exc)
    except BaseExceptionGroup as group:
        # Start-up errors (port in use, ...) surface from the daemon's nursery in a group.
        ours, rest = group.split(LbhaError)
        if ours is None or rest is not None:
            raise
        return _fail("; ".join(str(e) for e in _leaves(ours)))
    return EXIT_OK


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def cmd_check_host(args: argparse.Namespace) -> int:
    """Floating IPs whose device does not exist here or whose subnet no interface holds."""
    from lbha.heartbeat.floating_ips import floating_ips, placement_problems

    try:
        config = load_config(args.config, judge_checks=False)
    except LbhaError as exc:
        return _fail(exc)
    if config.cluster is not None:
        for problem in placement_problems(floating_ips(config)):
            print(problem)
    return EXIT_OK
