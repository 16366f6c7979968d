"""The `lbha` command line: both daemons, their operator commands, config and import tools."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from lbha import __version__, control
from lbha.checkapi import CheckResult, Transcript
from lbha.config import DEFAULT_PATH, load_config, load_config_text
from lbha.config_show import render_config
from lbha.errors import ConfigError, ControlError, LbhaError, Problem
from lbha.logs import COMMAND_LEVEL, DAEMON_LEVEL, LEVELS, log_level, setup_logging
from lbha.model import Config, Paths
from lbha.plugin_manager import ENTRY_POINT_GROUP, PluginManager, load_plugins

log = logging.getLogger("lbha")

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def _print_warnings(warnings: list[Problem]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_config_check(args: argparse.Namespace) -> int:
    plugins = load_plugins()
    warnings: list[Problem] = []
    try:
        config = load_config(args.file, checks=plugins.checks, warnings=warnings, files=True)
    except ConfigError as exc:
        _print_warnings(warnings)
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    _print_warnings(warnings)
    if config.cluster is not None:
        for problem in host_problems(args.file):  # a warning: the file may be checked elsewhere
            print(f"warning: {args.file}: {problem} (lbha heartbeat refuses to start on this "
                  "host)", file=sys.stderr)
    reals = sum(len(v.reals) for v in config.virtuals)
    print(f"{args.file}: OK ({len(config.virtuals)} virtual services, {reals} real servers)")
    return EXIT_OK


#: The heartbeat program, run as a process: the CLI never imports it (DESIGN.md). `-P`: a
#: checkout's partial `lbha/` folder in the working directory must not shadow the install.
HEARTBEAT = (sys.executable, "-P", "-m", "lbha.heartbeat")


def host_problems(config_path: Path) -> list[str]:
    """What stops `lbha heartbeat` on this host although the config is valid, as the
    heartbeat itself judges it (floating IPs it cannot place here)."""
    try:
        out = subprocess.run([*HEARTBEAT, "check-host", "--config", str(config_path)],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"cannot check this host: {exc}"]
    if out.returncode != 0:
        return [f"cannot check this host: {out.stderr.strip() or out.returncode}"]
    return out.stdout.splitlines()


def cmd_config_show(args: argparse.Namespace) -> int:
    plugins = load_plugins()
    warnings: list[Problem] = []
    try:
        config = load_config(args.file, checks=plugins.checks, warnings=warnings)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    _print_warnings(warnings)
    sys.stdout.write(render_config(config, plugins.checks))
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    plugins = load_plugins()
    print("plugins:")
    for info in sorted(plugins.plugins.values(), key=lambda p: p.name):
        group = "" if info.group == ENTRY_POINT_GROUP else f", group {info.group}"
        print(f"  {info.name:<20} {info.distribution} {info.version}  ({info.module}{group})")
    print("check types:")
    for name in plugins.checks:
        check = plugins.checks.get(name)
        kind = "negotiate service" if check.negotiate else "check type"
        plugin = plugins.checks.plugin_of(name)
        dist = plugins.plugins[plugin].distribution if plugin in plugins.plugins else "?"
        print(f"  {name:<20} {kind:<18} plugin {plugin} ({dist})  {check.description}")
    if plugins.failures:
        print("failed plugins:")
        for failure in plugins.failures:
            print(f"  {failure}")
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from lbha.importers import import_paths
    from lbha.importers.heartbeat import DEFAULT_AUTH_KEY_FILE
    from lbha.importers.toml_writer import format_value

    if args.ldirectord_cf is None and args.ha_cf is None:
        print("lbha import: give an ldirectord.cf, --ha-cf FILE, or both", file=sys.stderr)
        return EXIT_USAGE
    checks = load_plugins().checks
    try:
        result = import_paths(args.ldirectord_cf, ha_cf=args.ha_cf,
                              haresources=args.haresources, authkeys=args.authkeys,
                              node=args.node, checks=checks)
    except (OSError, LbhaError) as exc:
        print(f"lbha import: {exc}", file=sys.stderr)
        return EXIT_INVALID
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    toml = result.toml
    if result.auth_key is not None:
        if args.authkey_out is None:
            print("lbha import: the authkeys file holds a key; give --authkey-out FILE to "
                  "write it (mode 0600)", file=sys.stderr)
            return EXIT_USAGE
        toml = toml.replace(f'auth_key_file = "{DEFAULT_AUTH_KEY_FILE}"',
                            f"auth_key_file = {format_value(str(args.authkey_out))}")
    warnings: list[Problem] = []
    try:
        load_config_text(toml, str(args.output or "<imported>"), checks=checks,
                         warnings=warnings)
    except ConfigError as exc:
        print(f"lbha import: the imported config does not validate (a bug in the importer, "
              f"please report it):\n{exc}", file=sys.stderr)
        return EXIT_INVALID
    if result.auth_key is not None:
        fd = os.open(args.authkey_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(result.auth_key)
        os.chmod(args.authkey_out, 0o600)
    if args.output is None:
        sys.stdout.write(toml)
    else:
        Path(args.output).write_text(toml)
        print(f"wrote {args.output}", file=sys.stderr)
    if result.errors:
        print(f"lbha import: {len(result.errors)} directive(s) could not be imported (see the "
              "notes); the config was written without them", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def _config_or_exit(path: Path) -> tuple[Config, PluginManager] | int:
    plugins = load_plugins()
    try:
        return load_config(path, checks=plugins.checks), plugins
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID


def cmd_healthd(args: argparse.Namespace) -> int:
    from lbha.healthd import run_healthd

    loaded = _config_or_exit(args.config)
    if isinstance(loaded, int):
        return loaded
    config, plugins = loaded
    try:
        trio.run(run_healthd, args.config, config, plugins)
    except LbhaError as exc:
        print(f"lbha healthd: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except BaseExceptionGroup as group:
        # Start-up errors (a control socket it cannot make, ...) surface from the nursery.
        ours, rest = group.split(LbhaError)
        if ours is None or rest is not None:
            raise
        for exc in _leaves(ours):
            print(f"lbha healthd: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _control(args: argparse.Namespace, cmd: str, **kwargs: Any) -> Any:
    """Ask healthd; exits with a clear message when it cannot be reached."""
    paths = _paths(args.config)
    return control.request(paths.healthd_socket, cmd, **kwargs)


def _paths(config_path: Path) -> Paths:
    """The daemons' paths, read leniently: a config being edited must not hide the socket."""
    try:
        paths = tomllib.loads(config_path.read_text()).get("paths", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return Paths()
    run_dir = paths.get("run_dir") if isinstance(paths, dict) else None
    return Paths(run_dir=Path(run_dir)) if isinstance(run_dir, str) else Paths()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.1f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def format_status(status: dict[str, Any]) -> str:
    """`lbha status` as an operator reads it: one block per virtual service."""
    lines = []
    if status.get("state_problem"):
        lines.append(f"WARNING: {status['state_problem']}")
    for virtual in status["virtuals"]:
        where = f"{virtual['address']}:{virtual['ports']}/{virtual['protocol']}"
        fallback = "  [fallback in use]" if virtual["fallback_in_use"] else ""
        lines.append(f"{virtual['name']}  {where}  layer {virtual['layer']}{fallback}")
        for real in virtual["reals"]:
            weight = "-" if real["weight"] is None else str(real["weight"])
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(real["since"]))
            if not real.get("changed", True):
                since += " (daemon start)"
            address = real["address"] + (f":{real['port']}" if real["port"] else "")
            lines.append(
                f"  {real['name']:<16} {address:<22} {real['state']:<16} {real['admin']:<7}"
                f" weight {weight:>5}/{real['configured_weight']:<5} since {since}"
                f"  checked {_age(real['last_check_age'])}: {real['reason']}"
            )
            if real.get("feedback_reason"):
                lines.append(f"    feedback: {real['feedback_reason']}")
    for name, backend in sorted(status.get("backends", {}).items()):
        sync = "in sync" if backend.get("in_sync") else "NOT in sync"
        details = ", ".join(f"{key.replace('_', ' ')} {value}"
                            for key, value in backend.items()
                            if key not in ("in_sync", "problems"))
        lines.append(f"backend {name}: {sync}" + (f"  ({details})" if details else ""))
        lines.extend(f"  problem: {problem}" for problem in backend.get("problems", []))
    return "\n".join(lines)


def cmd_heartbeat(args: argparse.Namespace) -> int:
    """Become the heartbeat program (same PID, so systemd's MAINPID stays right)."""
    argv = [*HEARTBEAT]
    if args.log_level is not None:
        argv += ["--log-level", args.log_level]
    argv += ["heartbeat", "--config", str(args.config)]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        print(f"lbha heartbeat: cannot run {argv[0]}: {exc}", file=sys.stderr)
    return EXIT_INVALID


def _cluster_config(args: argparse.Namespace) -> Config | int:
    try:
        config = load_config(args.config, judge_checks=False)
    except LbhaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if config.cluster is None:
        print(f"error: {args.config}: no [cluster] section", file=sys.stderr)
        return EXIT_INVALID
    return config


def cluster_status_json(config: Config) -> dict[str, Any]:
    """The heartbeat daemon's status; raises ControlError when it is not running."""
    result = control.request(config.paths.heartbeat_socket, "status")
    if not isinstance(result, dict):
        raise ControlError("garbled status from the heartbeat daemon")
    return result


def format_cluster_status(status: dict[str, Any]) -> str:
    """The heartbeat's status: Master|Slave  Active|Passive  Link up|down, then details."""
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


def cmd_cluster_command(args: argparse.Namespace) -> int:
    """`lbha takeover | standby`: ask the heartbeat, wait for it, print the pair's state."""
    config = _cluster_config(args)
    if isinstance(config, int):
        return config
    assert config.cluster is not None
    try:
        result = control.request(config.paths.heartbeat_socket, args.command,
                                 timeout=2 * config.cluster.deadtime + 5)
    except LbhaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(result.get("message", "done"))
    print(format_cluster_status(result))
    return EXIT_OK


def cmd_cluster_status(args: argparse.Namespace) -> int:
    try:
        status = cluster_status_json(load_config(args.config, judge_checks=False))
    except LbhaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(json.dumps(status, indent=2) if args.json else format_cluster_status(status))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Both daemons: the pair's state (when [cluster] is configured), then the real servers."""
    result: dict[str, Any] = {}
    failed = False
    try:
        config: Config | None = load_config(args.config, judge_checks=False)
    except ConfigError:
        config = None
    if config is not None and config.cluster is not None:
        try:
            result["cluster"] = cluster_status_json(config)
            if not args.json:
                print(format_cluster_status(result["cluster"]))
        except ControlError as exc:
            result["cluster"], failed = {"error": str(exc)}, True
            print(f"lbha status: heartbeat: {exc}", file=sys.stderr)
    try:
        result["healthd"] = _control(args, "status")
        if not args.json:
            print(format_status(result["healthd"]))
    except ControlError as exc:
        result["healthd"], failed = {"error": str(exc)}, True
        print(f"lbha status: healthd: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1))
    return EXIT_INVALID if failed else EXIT_OK


def cmd_admin(args: argparse.Namespace) -> int:
    if args.all_vips:
        if len(args.names) != 1:
            print(f"lbha {args.command}: with --all-vips give only the real server",
                  file=sys.stderr)
            return EXIT_USAGE
        vip, rip = None, args.names[0]
    elif len(args.names) == 2:
        vip, rip = args.names
    else:
        print(f"lbha {args.command}: give VIP and RIP, or RIP with --all-vips", file=sys.stderr)
        return EXIT_USAGE
    try:
        changed = _control(args, args.command, vip=vip, rip=rip)
    except ControlError as exc:
        print(f"lbha {args.command}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    for item in changed:
        print(f"{args.command}: {item}")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    # Checked here first: a file that does not parse would otherwise hide the socket's path
    # and the operator would read "is the daemon running?" instead of what is wrong.
    try:
        load_config(args.config, checks=load_plugins().checks)
    except ConfigError as exc:
        print(f"lbha reload: reload refused, old config kept running (nothing was sent to "
              f"healthd):\n{exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        print(_control(args, "reload"))
    except ControlError as exc:
        print(f"lbha reload: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Run the checks of one VIP now, without a daemon; exit 0 when every server is up."""
    from lbha.engine import make_target, run_check

    loaded = _config_or_exit(args.config_file)
    if isinstance(loaded, int):
        return loaded
    config, plugins = loaded
    virtuals = [v for v in config.virtuals if args.vip in (v.name, str(v.address))]
    if not virtuals:
        print(f"lbha check: no virtual service named or addressed {args.vip!r}", file=sys.stderr)
        return EXIT_USAGE

    async def check_all() -> bool:
        all_up = True
        for virtual in virtuals:
            for real in virtual.reals:
                if args.rip is not None and args.rip not in (real.name, str(real.address)):
                    continue
                target = make_target(virtual, real)
                spec = real.check
                name = spec.check_name
                seconds = spec.negotiate_timeout if spec.type == "negotiate" else spec.timeout
                transcript = Transcript() if args.verbose else None
                if spec.type in ("on", "off"):
                    result = CheckResult(spec.type == "on", f"check type {spec.type!r}")
                else:
                    result = await run_check(plugins.checks, name, target, spec, seconds,
                                             transcript)
                verdict = "UP" if result.up else "DOWN"
                print(f"{virtual.name} {real.name} ({target.endpoint}) {name}: {verdict}: "
                      f"{result.reason}")
                for line in transcript.lines if transcript else ():
                    print(f"    {line}")
                all_up = all_up and result.up
        return all_up

    return EXIT_OK if trio.run(check_all) else EXIT_INVALID


def cmd_demo(args: argparse.Namespace) -> int:
    from lbha.demo import main as demo

    demo(load_plugins().checks)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lbha", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lbha {__version__}")
    parser.add_argument("--log-level", choices=LEVELS,
                        help=f"log level on stderr (default: {DAEMON_LEVEL} for the daemons, "
                             f"{COMMAND_LEVEL} for other commands)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = sub.add_parser("config", help="check or show a config file")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_sub.add_parser("check", help="validate a config file (exit 1 if invalid)")
    check.add_argument("file", type=Path, nargs="?", default=DEFAULT_PATH)
    check.set_defaults(func=cmd_config_check)
    show = config_sub.add_parser("show", help="print the effective config, defaults filled in")
    show.add_argument("file", type=Path, nargs="?", default=DEFAULT_PATH)
    show.set_defaults(func=cmd_config_show)

    plugins = sub.add_parser("plugins", help="list plugins and the check types they provide")
    plugins.set_defaults(func=cmd_plugins)

    imp = sub.add_parser("import", help="convert ldirectord.cf and/or heartbeat files to "
                         "lbha TOML")
    imp.add_argument("ldirectord_cf", type=Path, nargs="?",
                     help="ldirectord.cf (optional with --ha-cf)")
    imp.add_argument("--ha-cf", type=Path, help="heartbeat ha.cf")
    imp.add_argument("--haresources", type=Path, help="heartbeat haresources")
    imp.add_argument("--authkeys", type=Path, help="heartbeat authkeys")
    imp.add_argument("--node", help="the node this config is for (default: haresources' owner)")
    imp.add_argument("-o", "--output", type=Path, help="write the TOML here (default: stdout)")
    imp.add_argument("--authkey-out", type=Path, help="where to write the converted key (0600)")
    imp.set_defaults(func=cmd_import)

    commands = [
        ("heartbeat", "run the heartbeat daemon (lbha-heartbeat.service)", cmd_heartbeat),
        ("takeover", "make this node active (the peer releases the floating IPs first)",
         cmd_cluster_command),
        ("standby", "release the floating IPs to the peer and stay passive",
         cmd_cluster_command),
        ("cluster-status", "Master|Slave  Active|Passive  Link up|down, peer, floating IPs",
         cmd_cluster_status),
    ]
    for name, text, func in commands:
        command = sub.add_parser(name, help=text, description=text)
        command.add_argument("--config", type=Path, default=DEFAULT_PATH,
                             help=f"config file (default {DEFAULT_PATH})")
        command.set_defaults(func=func)
    sub.choices["heartbeat"].set_defaults(log_level_default=DAEMON_LEVEL)
    sub.choices["cluster-status"].add_argument("--json", action="store_true", help="print JSON")

    demo = sub.add_parser("demo", help="watch the engine check servers on loopback (~10 s)")
    demo.set_defaults(func=cmd_demo)

    healthd = sub.add_parser("healthd", help="run the health-check daemon")
    healthd.add_argument("--config", type=Path, default=DEFAULT_PATH)
    healthd.set_defaults(func=cmd_healthd, log_level_default=DAEMON_LEVEL)

    status = sub.add_parser("status", help="the pair (Master|Slave Active|Passive Link) and "
                            "every real server: state, weight, last check and reason")
    status.add_argument("--config", type=Path, default=DEFAULT_PATH)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    for action, text in (("drain", "weight 0, existing connections continue"),
                         ("halt", "out of the table, connections dropped"),
                         ("online", "back to normal")):
        admin = sub.add_parser(action, help=f"{text} (survives a restart)")
        admin.add_argument("names", nargs="+", metavar="VIP RIP",
                           help="virtual service (name or address) and real server")
        admin.add_argument("--all-vips", action="store_true",
                           help="every virtual service holding that real server")
        admin.add_argument("--config", type=Path, default=DEFAULT_PATH)
        admin.set_defaults(func=cmd_admin)

    reload = sub.add_parser("reload", help="make healthd re-read its config")
    reload.add_argument("--config", type=Path, default=DEFAULT_PATH)
    reload.set_defaults(func=cmd_reload)

    check = sub.add_parser("check", help="run the checks of a VIP now, no daemon needed")
    check.add_argument("config_file", type=Path, metavar="CONFIG")
    check.add_argument("vip", metavar="VIP")
    check.add_argument("rip", metavar="RIP", nargs="?")
    check.add_argument("--once", action="store_true", help="run once (the only mode)")
    check.add_argument("-v", "--verbose", action="store_true", help="show the exchange")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(log_level(args))
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
