"""Generations that survive restarts: this node's, and the newest seen from the peer.

Every frame carries (generation, seq), and a receiver drops frames of a generation older than
the newest it has seen. So:

- this node's generation must never go backwards, or the peer would drop every frame of ours
  until it restarts: it is max(stored + 1, microseconds of wall-clock time), written to disk
  before the first frame leaves, so a clock stepped back (NTP, a wrong RTC at boot) is harmless;
- the peer's newest generation is kept too, so that a restart of this node does not let frames
  recorded during the peer's earlier boots be replayed.

A missing file, or a damaged one, falls back to the clock; a damaged one (not JSON, another
version, or a generation that does not fit the frame's unsigned 64-bit field, or leaves this
node no room to move forward) is moved aside for the operator, logged, and only its valid peer
generations are kept. A file that cannot be written is logged and the daemon runs on, since
refusing to start would cost more than the replay window.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lbha.atomic_file import write_atomically

log = logging.getLogger(__name__)

VERSION = 1
FILE_NAME = "heartbeat-generation.json"
#: Where a damaged file is moved to, next to it.
DAMAGED_SUFFIX = ".damaged"
#: A generation fills a frame field of 64 unsigned bits (protocol.py).
MAX_GENERATION = 2**64 - 1


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
            text = self.path.read_text()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            self._damaged(str(exc))
            return 0
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
            peers = data["peers"]
            if not isinstance(peers, dict):
                raise ValueError("peers is not an object")
        except (ValueError, KeyError) as exc:
            self._damaged(str(exc))
            return 0
        self.peers = {str(k): v for k, v in peers.items() if _fits(v)}
        problems = [f"peer {k}: {v!r}" for k, v in peers.items() if not _fits(v)]
        own = data.get("own")
        if not _fits(own) or own >= MAX_GENERATION:
            problems.insert(0, f"own: {own!r}")
            own = 0
        if problems:
            self._damaged(f"generations that do not fit a frame: {', '.join(problems)}")
        return own

    def _damaged(self, why: str) -> None:
        aside = self.path.with_name(self.path.name + DAMAGED_SUFFIX)
        try:
            self.path.replace(aside)
            moved = f"moved {self.path} aside to {aside}"
        except OSError as exc:
            moved = f"could not move it aside ({exc.strerror})"
        kept = (f"peer generations kept: {', '.join(sorted(self.peers))}" if self.peers
                else "replays of the peer's earlier boots are refused only from now on")
        log.error("ignoring damaged %s (%s): %s; this node's generation comes from the "
                  "clock; %s", self.path, why, moved, kept)

    def _save(self) -> None:
        text = json.dumps({"version": VERSION, "own": self.own, "peers": self.peers}) + "\n"
        try:
            write_atomically(self.path, text)
        except OSError as exc:
            log.error("cannot save %s (%s): after a restart this node's generation comes from "
                      "the clock alone; fix the state directory", self.path, exc)


def _fits(value: object) -> bool:
    """A generation a frame can carry (JSON true/false are not numbers here)."""
    return type(value) is int and 0 <= value <= MAX_GENERATION
