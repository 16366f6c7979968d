"""The `lbha` command line: config, plugins, import (daemon commands join as they land)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lbha import __version__
from lbha.config import DEFAULT_PATH, load_config, load_config_text
from lbha.config_show import render_config
from lbha.errors import ConfigError, LbhaError, Problem
from lbha.logs import LEVELS, setup_logging
from lbha.plugin_manager import load_plugins

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
        config = load_config(args.file, checks=plugins.checks, warnings=warnings)
    except ConfigError as exc:
        _print_warnings(warnings)
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    _print_warnings(warnings)
    reals = sum(len(v.reals) for v in config.virtuals)
    print(f"{args.file}: OK ({len(config.virtuals)} virtual services, {reals} real servers)")
    return EXIT_OK


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
        print(f"  {info.name:<20} {info.distribution} {info.version}  ({info.module})")
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

    try:
        result = import_paths(args.ldirectord_cf, ha_cf=args.ha_cf,
                              haresources=args.haresources, authkeys=args.authkeys,
                              node=args.node)
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
        load_config_text(toml, str(args.output or "<imported>"),
                         checks=load_plugins().checks, warnings=warnings)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lbha", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lbha {__version__}")
    parser.add_argument("--log-level", choices=LEVELS, default="warning",
                        help="log level on stderr (default: warning)")
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

    imp = sub.add_parser("import", help="convert ldirectord.cf (+ heartbeat files) to lbha TOML")
    imp.add_argument("ldirectord_cf", type=Path)
    imp.add_argument("--ha-cf", type=Path, help="heartbeat ha.cf")
    imp.add_argument("--haresources", type=Path, help="heartbeat haresources")
    imp.add_argument("--authkeys", type=Path, help="heartbeat authkeys")
    imp.add_argument("--node", help="the node this config is for (default: haresources' owner)")
    imp.add_argument("-o", "--output", type=Path, help="write the TOML here (default: stdout)")
    imp.add_argument("--authkey-out", type=Path, help="where to write the converted key (0600)")
    imp.set_defaults(func=cmd_import)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
