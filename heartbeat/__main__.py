"""`python -m lbha.heartbeat COMMAND --config FILE`: the heartbeat commands without the lbha CLI."""

from __future__ import annotations

import argparse
import sys

from lbha.heartbeat.cli import add_commands
from lbha.logs import LEVELS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbha.heartbeat")
    parser.add_argument("--log-level", choices=LEVELS, default="info")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
