"""Generations that survive restarts: this node's, and the newest seen from the peer.

Every frame carries (generation, seq), and a receiver drops frames of a generation older than
the newest it has seen. So:

- this node's generation must never go backwards, or the peer would drop every frame of ours
  until it restarts: it is max(stored + 1, microseconds of wall-clock time), written to disk
  before the first frame leaves, so a clock stepped back (NTP, a wrong RTC at boot) is harmless;
- the peer's newest generation is kept too, so that a restart of this node does not let frames
  recorded during the peer's earlier boots be replayed.

A missing or damaged file falls back to the clock (logged); a file that cannot be written is
logged and the daemon runs on, since refusing to start would cost more than the replay window.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lbha.atomic_file import write_atomically

log = logging.getLogger(__name__)

VERSION = 1
FILE_NAME = "heartbeat-generation.json"


class GenerationStore:
    """`<state_dir>/heartbeat-generation.json`: {"own": N, "peers": {"lb2": M}}."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.peers: dict[str, int] = {}
        self.own = 0

    def start(self, now_us: int) -> int:
        """Load the file, pick this boot's generation, save it; returns the generation."""
        stored = self._load()
        self.own = max(stored + 1, now_us)
        if stored >= now_us:
            log.warning("the clock is behind the generation this node used before (%d >= %d): "
                        "using %d", stored, now_us, self.own)
        self._save()
        return self.own

    def saw_peer(self, node: str, generation: int) -> None:
        """Record a new generation of the peer (it restarted): once per peer boot."""
        if generation > self.peers.get(node, 0):
            self.peers[node] = generation
            self._save()

    def _load(self) -> int:
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
            self.peers = {str(k): int(v) for k, v in data["peers"].items()}
            return int(data["own"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("ignoring damaged %s (%s): this node's generation comes from the clock "
                      "and replays of the peer's earlier boots are refused only from now on",
                      self.path, exc)
            self.peers = {}
            return 0

    def _save(self) -> None:
        text = json.dumps({"version": VERSION, "own": self.own, "peers": self.peers}) + "\n"
        try:
            write_atomically(self.path, text)
        except OSError as exc:
            log.error("cannot save %s (%s): after a restart this node's generation comes from "
                      "the clock alone; fix the state directory", self.path, exc)
