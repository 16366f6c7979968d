"""Operator actions (drain, halt) kept in a state file so they survive a daemon restart.

The file is JSON, written atomically (temporary file, fsync, rename) so a crash never leaves
half a file; a missing file means every server is online. A file that cannot be read or
understood (truncated, garbage, a version this lbha does not know) is never silently
dropped: it is renamed aside with a timestamp and `load` raises DamagedStateFile, leaving
the choice of what the servers start as to the caller (`paths.damaged_state`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

from lbha.atomic_file import write_atomically
from lbha.errors import LbhaError
from lbha.table import Admin

log = logging.getLogger(__name__)

VERSION = 1

Actions = dict[tuple[str, str], Admin]


class StateFileError(LbhaError):
    """The state file cannot be written (the action is not durable, so it is not applied)."""


class DamagedStateFile(LbhaError):
    """The state file exists but cannot be read or understood; `kept` is where it now is."""

    def __init__(self, message: str, kept: Path | None) -> None:
        super().__init__(message)
        self.kept = kept


def _parse(text: str) -> Actions:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("version") != VERSION:
        raise ValueError(f"unknown version {data.get('version')!r} (this lbha reads version "
                         f"{VERSION})")
    actions: Actions = {}
    for entry in data["admin"]:
        action = Admin(entry["action"])
        if not isinstance(entry["virtual"], str) or not isinstance(entry["real"], str):
            raise ValueError(f"bad entry {entry!r}")
        actions[(entry["virtual"], entry["real"])] = action
    return actions


class AdminStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Actions:
        """Saved actions by (virtual, real) name; a missing file means none.

        Raises DamagedStateFile after moving a damaged file aside (when it can).
        """
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise DamagedStateFile(f"cannot read {self.path}: {exc}", None) from None
        try:
            return _parse(text)
        except (ValueError, KeyError, TypeError) as exc:
            problem = str(exc) or type(exc).__name__
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            kept = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
            try:
                os.replace(self.path, kept)
            except OSError as err:
                raise DamagedStateFile(f"damaged state file {self.path} ({problem}); it could "
                                       f"not be kept aside: {err}", None) from None
            raise DamagedStateFile(f"damaged state file {self.path} ({problem}); kept as "
                                   f"{kept}", kept) from None

    def save(self, actions: Mapping[tuple[str, str], Admin]) -> None:
        """Write every non-online action atomically; raises StateFileError."""
        entries = [
            {"virtual": virtual, "real": real, "action": str(action)}
            for (virtual, real), action in sorted(actions.items()) if action is not Admin.ONLINE
        ]
        text = json.dumps({"version": VERSION, "admin": entries}, indent=1)
        try:
            write_atomically(self.path, text)
        except OSError as exc:
            raise StateFileError(f"cannot save operator actions to {self.path}: {exc}") from exc
