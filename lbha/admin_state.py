"""Operator actions (drain, halt) kept in a state file so they survive a daemon restart.

The file is JSON, written atomically (temporary file, fsync, rename) so a crash never leaves
half a file; a missing file means every server is online.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from lbha.atomic_file import write_atomically
from lbha.errors import LbhaError
from lbha.table import Admin

log = logging.getLogger(__name__)

VERSION = 1


class StateFileError(LbhaError):
    """The state file cannot be written (the action is not durable)."""


class AdminStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[tuple[str, str], Admin]:
        """Saved actions by (virtual, real) name; a damaged file is reported and ignored."""
        try:
            data = json.loads(self.path.read_text())
            entries = data["admin"] if data.get("version") == VERSION else []
            return {(e["virtual"], e["real"]): Admin(e["action"]) for e in entries}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("ignoring damaged state file %s (%s): every server starts online",
                      self.path, exc)
            return {}

    def save(self, actions: Mapping[tuple[str, str], Admin]) -> None:
        """Write every non-online action atomically."""
        entries = [
            {"virtual": virtual, "real": real, "action": str(action)}
            for (virtual, real), action in sorted(actions.items()) if action is not Admin.ONLINE
        ]
        text = json.dumps({"version": VERSION, "admin": entries}, indent=1)
        try:
            write_atomically(self.path, text)
        except OSError as exc:
            raise StateFileError(f"cannot save operator actions to {self.path}: {exc}") from exc
