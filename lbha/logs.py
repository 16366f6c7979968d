"""Logging shared by both daemons and the CLI.

Plain lines; when stderr is the systemd journal (JOURNAL_STREAM names our stderr) each line
starts with a `<N>` syslog priority, which journald turns into the entry's priority. Lines
are written as logged: a secret never reaches a message, because the code that handles one
writes a placeholder (lbha.checkapi.REDACTED) where it would show, rather than having every
line searched for secret text (which mangles any line that happens to contain a short or
common-word password, and shows the secret's letters by what it stars).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TextIO

LEVELS = ("debug", "info", "warning", "error", "critical")
#: A daemon logs its lifecycle (started, takeover, standby, reload) at info, which the
#: journal must show; other commands say only what went wrong.
DAEMON_LEVEL = "info"
COMMAND_LEVEL = "warning"

_PRIORITY = {
    logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2,
}


def stream_is_journal(stream: TextIO) -> bool:
    """True when `stream` is the journal socket systemd gave us (see systemd.exec(5))."""
    journal = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = journal.partition(":")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return journal != "" and f"{st.st_dev}" == device and f"{st.st_ino}" == inode


class JournalFormatter(logging.Formatter):
    """Formats a record; for the journal, every line gets the record's priority prefix."""

    def __init__(self, fmt: str, journal: bool) -> None:
        super().__init__(fmt, datefmt="%Y-%m-%d %H:%M:%S")
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self._journal:
            prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
            text = "\n".join(prefix + line for line in text.splitlines())
        return text


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Configure the root logger once per process."""
    stream = stream if stream is not None else sys.stderr
    journal = stream_is_journal(stream)
    fmt = "%(name)s: %(message)s" if journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter(fmt, journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def log_level(args: argparse.Namespace) -> str:
    """`--log-level` when given (default None), else the command's own default: a daemon's
    subparser sets `log_level_default=DAEMON_LEVEL`."""
    level: str = args.log_level or getattr(args, "log_level_default", COMMAND_LEVEL)
    return level
