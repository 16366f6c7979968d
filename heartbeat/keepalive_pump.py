"""The steady-state keepalive exchange, shared by the daemon and a transport's own thread.

At sub-second timers almost every frame says what the last one said. Waking the trio loop
for each costs more CPU than the work itself (bench/README.md, failover), so the transport
runs the exchange: it sends a keepalive every `interval`, and of the frames it receives it
hands the daemon only those that can change something. The rest ("routine", decided by
`fsm.routine`) are only timed, the last one per link; the daemon collects those times before
its next step (`fsm.heard`), which is exactly what stepping through every frame would do.
The transport also wakes the daemon at the state machine's next deadline, moved on by the
routine frames it timed; so in a steady state the daemon sleeps until something changes.

Thread-safe: one lock guards the receiver, the sequence number and the routine filter.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from lbha.heartbeat.fsm import Routine
from lbha.heartbeat.protocol import (
    Flags,
    Frame,
    KeyRing,
    PeerState,
    Receiver,
    Said,
    Verdict,
    encoder,
)


@dataclass(frozen=True)
class Arrival:
    """The last routine frame on a link, timed but not yet shown to the state machine
    (`fsm.heard`)."""

    link: str
    at: float


class KeepalivePump:
    def __init__(self, receiver: Receiver, keys: KeyRing | None, *, cluster_id: str,
                 node: str, generation: int, interval: float, deadtime: float) -> None:
        self.receiver = receiver
        self.interval = interval
        #: Called (from any thread) when the deadline moved earlier, so a transport sleeping
        #: towards the old one can wake and look again.
        self.rearm: Callable[[], None] = lambda: None
        self._keys = keys
        self._cluster_id = cluster_id
        self._node = node
        self._generation = generation
        self._deadtime_ms = int(deadtime * 1000)
        self._lock = threading.Lock()
        self._state = PeerState.STARTING
        self._flags = Flags.NONE
        self._encode = self._encoder()
        self._seq = 0
        self._routine: Routine | None = None
        #: What a routine frame says (see _set_routine).
        self._quiet: Said | None = None
        self._deadline = math.inf
        self._heard: dict[str, float] = {}
        #: Link -> time of the last routine frame not yet collected.
        self._arrivals: dict[str, float] = {}
        #: Frames and deadlines handed to the daemon. A routine filter published before the
        #: daemon handled them all does not know their effect yet and is ignored.
        self._handed = 0
        #: The generation of the last frame handed over.
        self._generation_handed = 0
        self.sent = 0

    def reconfigure(self, keys: KeyRing | None, interval: float, deadtime: float) -> None:
        with self._lock:
            self._keys = keys
            self.receiver.keys = keys
            self.interval = interval
            self._deadtime_ms = int(deadtime * 1000)
            self._encode = self._encoder()

    def announce(self, state: PeerState, flags: Flags) -> None:
        """What our frames say from now on."""
        with self._lock:
            if (state, flags) != (self._state, self._flags):
                self._state, self._flags = state, flags
                self._encode = self._encoder()

    def _encoder(self) -> Callable[[int], bytes]:
        return encoder(Frame(self._cluster_id, self._node, self._generation, 0, self._state,
                             self._flags, self._deadtime_ms), self._keys)

    def frame(self) -> bytes:
        """The next frame to send (each call takes a new sequence number)."""
        with self._lock:
            self._seq += 1
            self.sent += 1
            return self._encode(self._seq)

    def expect(self, routine: Routine | None, deadline: float | None, handled: int) -> None:
        """Publish the daemon's routine filter and next deadline, made after it handled
        `handled` of the frames and deadlines handed to it."""
        with self._lock:
            old = self._deadline
            self._set_routine(routine if handled == self._handed else None)
            # Routine frames timed since the daemon last collected them are not in its state
            # yet; they still move the deadline on.
            self._heard = dict(self._arrivals)
            if self._routine is not None and self._heard:
                self._deadline = self._routine.deadline(self._heard)
            else:
                self._deadline = deadline if deadline is not None else math.inf
            earlier = self._deadline < old
        if earlier:
            self.rearm()

    def deadline(self) -> float:
        """When the daemon must be woken (math.inf: only a frame can change anything)."""
        return self._deadline

    def due(self, now: float) -> bool:
        """True (once) when the deadline has come: hand the daemon a deadline."""
        if now < self._deadline:  # the common case, read without the lock: only `expect`
            return False          # lowers the deadline, and it rearms the caller
        with self._lock:
            if now < self._deadline:
                return False
            self._deadline = math.inf
            self._set_routine(None)
            self._handed += 1
            return True

    def received(self, data: bytes, link: str, now: float) -> tuple[Verdict, Frame | None]:
        """Authenticate one datagram. A routine frame is timed and returned as (OK, None);
        any other valid frame is returned for the daemon, which must then handle it."""
        with self._lock:
            rx = self.receiver
            said = rx.repeat(data, link)
            frame = None
            if said is None:
                verdict, frame = rx.parse(data, link)
                if frame is None:
                    return verdict, None
                said = (frame.generation, frame.state, frame.flags)
            r = self._routine
            if r is not None and said == self._quiet and now < self._deadline and link in r.links:
                self._arrivals[link] = now
                self._heard[link] = now
                self._deadline = r.deadline(self._heard)
                return Verdict.OK, None
            self._set_routine(None)
            self._handed += 1
            self._generation_handed = said[0]
            return Verdict.OK, frame if frame is not None else rx.repeated(link)

    def _set_routine(self, routine: Routine | None) -> None:
        # A routine frame says what the routine's peer said, in the generation last handed
        # over: a new one (the peer restarted) is always handed, so the daemon can remember it.
        self._routine = routine
        self._quiet = None if routine is None else (
            self._generation_handed, routine.peer_state, routine.peer_flags)

    def arrivals(self) -> list[Arrival]:
        """Take the routine frames timed since the last call, oldest first."""
        with self._lock:
            taken, self._arrivals = self._arrivals, {}
        return sorted((Arrival(link, at) for link, at in taken.items()), key=lambda a: a.at)

    def verdicts(self) -> Counter[Verdict]:
        """A copy of the receiver's counts (the thread may be adding to them)."""
        with self._lock:
            return Counter(self.receiver.counts)
