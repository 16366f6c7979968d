"""`python -m lbha.heartbeat COMMAND --config FILE`: the heartbeat commands without the lbha CLI."""

from __future__ import annotations

import argparse
import sys

from lbha.heartbeat.cli import add_commands
from lbha.logs import COMMAND_LEVEL, DAEMON_LEVEL, LEVELS, log_level, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lbha.heartbeat")
    parser.add_argument("--log-level", choices=LEVELS,
                        help=f"default: {DAEMON_LEVEL} for heartbeat, {COMMAND_LEVEL} otherwise")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(log_level(args))
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
