"""`lbha heartbeat | takeover | standby | cluster-status`: the lead's CLI calls add_commands().

Logging is set up by the entry point (`lbha`, `python -m lbha.heartbeat`) from `--log-level`
or the command's default (`lbha.logs.log_level`).

Each command returns an exit code: 0 done, 1 failed (the message says why, on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio

from lbha.config import DEFAULT_PATH, load_config
from lbha.control import request
from lbha.errors import ControlError, LbhaError
from lbha.logs import DAEMON_LEVEL
from lbha.model import Config

EXIT_OK = 0
EXIT_FAILED = 1


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the heartbeat subcommands to the `lbha` parser."""
    commands = [
        ("heartbeat", "run the heartbeat daemon (lbha-heartbeat.service)", cmd_heartbeat),
        ("takeover", "make this node active (the peer releases the floating IPs first)",
         cmd_takeover),
        ("standby", "release the floating IPs to the peer and stay passive", cmd_standby),
        ("cluster-status", "Master|Slave  Active|Passive  Link up|down, peer, floating IPs",
         cmd_cluster_status),
    ]
    for name, text, func in commands:
        parser = sub.add_parser(name, help=text, description=text)
        parser.add_argument("--config", type=Path, default=DEFAULT_PATH,
                            help=f"config file (default {DEFAULT_PATH})")
        if name == "cluster-status":
            parser.add_argument("--json", action="store_true", help="print JSON")
        parser.set_defaults(func=func)
        if name == "heartbeat":
            parser.set_defaults(log_level_default=DAEMON_LEVEL)


def _fail(message: object) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_FAILED


def cmd_heartbeat(args: argparse.Namespace) -> int:
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


def _command(args: argparse.Namespace, cmd: str) -> int:
    try:
        config = load_config(args.config)
        cluster = config.cluster
        if cluster is None:
            return _fail(f"{args.config}: no [cluster] section")
        result = request(config.paths.heartbeat_socket, cmd, timeout=2 * cluster.deadtime + 5)
    except LbhaError as exc:
        return _fail(exc)
    print(result.get("message", "done"))
    print(format_status(result))
    return EXIT_OK


def cmd_takeover(args: argparse.Namespace) -> int:
    return _command(args, "takeover")


def cmd_standby(args: argparse.Namespace) -> int:
    return _command(args, "standby")


def host_problems(config: Config) -> list[str]:
    """What stops `lbha heartbeat` on this host although the config is valid: a floating IP
    whose device does not exist here or whose subnet no interface holds."""
    from lbha.heartbeat.floating_ips import floating_ips, placement_problems

    if config.cluster is None:
        return []
    return placement_problems(floating_ips(config))


def cluster_status_json(config: Config) -> dict[str, Any]:
    """The heartbeat daemon's status; raises ControlError when it is not running."""
    result = request(config.paths.heartbeat_socket, "status")
    if not isinstance(result, dict):
        raise ControlError("garbled status from the heartbeat daemon")
    return result


def format_status(status: dict[str, Any]) -> str:
    age = status.get("last_keepalive_age")
    heard = "never" if age is None else f"{age:.3f}s ago"
    held = ", ".join(status.get("floating_ips") or []) or "none"
    lines = [
        f"{status['role'].capitalize()}  {status['state'].capitalize()}  Link {status['link']}",
        f"  node {status['node']}, peer {status['peer']} ({status['peer_state']}), "
        f"last keepalive {heard}",
        f"  floating IPs held: {held}",
    ]
    if status.get("floating_ip_error"):
        lines.append(f"  floating IPs NOT held: {status['floating_ip_error']}")
    if status.get("no_carrier"):
        lines.append(f"  no carrier on {', '.join(status['no_carrier'])}: cannot serve")
    if status.get("floating_ips_restored"):
        lines.append(f"  floating IPs restored after removal: {status['floating_ips_restored']}")
    dropped = status.get("frames_dropped") or {}
    if dropped:
        lines.append("  frames dropped: " + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    return "\n".join(lines)


def cmd_cluster_status(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        status = cluster_status_json(config)
    except LbhaError as exc:
        return _fail(exc)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return EXIT_OK
