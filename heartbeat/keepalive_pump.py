"""The steady-state keepalive exchange, sans-IO: shared by the daemon and a transport's loop.

At sub-second timers almost every frame says what the last one said. Waking the trio loop
for each costs more CPU than the work itself (bench/README.md, failover), so the transport
runs the exchange: it sends a keepalive every `interval`, and of the frames it receives it
hands the daemon only those that can change something. The rest ("routine", decided by
`fsm.routine`) are only timed, the last one per link; the daemon collects those times before
its next step (`fsm.heard`), which is exactly what stepping through every frame would do.
The transport also wakes the daemon at the state machine's next deadline (`fsm.Deadline`),
moved on by the routine frames it timed; so in a steady state the daemon sleeps until
something changes.

The pump makes every decision of that loop and does no I/O: `timers(now)` says whether a
keepalive is due and whether the deadline has come, `wake_at()` when to look again, and
`datagram(...)` what the daemon must see of a received datagram. A transport only moves
bytes and keeps the clock: `lbha heartbeat` on a plain thread over epoll (transport.py), the
tests on a trio loop over their fake network (tests/heartbeat/fakenet.py); both run this.

Thread-safe: one lock guards the receiver, the sequence number and the routine filter; the
send schedule and the warning limit belong to the transport's loop alone.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from lbha.heartbeat.fsm import Deadline, Routine
from lbha.heartbeat.protocol import (
    AUTH_FAILURES,
    Flags,
    Frame,
    KeyRing,
    PeerState,
    Receiver,
    Said,
    Verdict,
    encoder,
)

log = logging.getLogger(__name__)

#: A received frame for the daemon, or a verdict to warn about: (verdict, frame, link name).
Handoff = tuple[Verdict, Frame | None, str]
#: At most one frame-less verdict of each kind a second reaches the daemon (it only warns).
WARN_EVERY = 1.0
_NO_DEADLINE = Deadline()


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
        #: The daemon's last published deadline, and when it falls with the routine frames
        #: timed since (`_heard`).
        self._timing = _NO_DEADLINE
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
        #: The transport loop's own: when the next keepalive is due, and verdict -> when one
        #: was last handed over without a frame.
        self._next_send = -math.inf
        self._warned: dict[Verdict, float] = {}

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

    def expect(self, routine: Routine | None, deadline: Deadline, handled: int) -> None:
        """Publish the daemon's routine filter and next deadline, made after it handled
        `handled` of the frames and deadlines handed to it."""
        with self._lock:
            old = self._deadline
            self._set_routine(routine if handled == self._handed else None)
            self._timing = deadline
            # Routine frames timed since the daemon last collected them are not in its state
            # yet; they still move the deadline on.
            self._heard = dict(self._arrivals)
            self._deadline = deadline.at(self._heard) if self._routine is not None \
                else deadline.at()
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

    def timers(self, now: float) -> tuple[bytes | None, bool]:
        """The transport loop's timer work at `now`: the keepalive to send now (None: not
        due yet), and whether to hand the daemon its deadline (`due`)."""
        frame = None
        if now >= self._next_send:
            frame = self.frame()
            self._next_send = now + self.interval
        return frame, self.due(now)

    def wake_at(self) -> float:
        """When the transport loop must call `timers` again, unless a datagram comes first or
        `rearm` is called."""
        return min(self._next_send, self._deadline)

    def datagram(self, data: bytes, link: str, now: float) -> Handoff | None:
        """What the daemon must see of one datagram received on `link`, if anything: a frame
        that may change something, or at most once every WARN_EVERY per kind a verdict to
        warn about (STALE_GENERATION, or failing authentication on a link the peer's frames
        arrive on: most likely a key mismatch). Other drops are only counted (`verdicts`)."""
        if self._next_send - now < self.interval / 2:
            # Answer now rather than wake again in a moment: nodes fall into step, one
            # wake-up a keepalive instead of two. Gaps stay within `interval`.
            self._next_send = now
        verdict, frame = self.received(data, link, now)
        if frame is not None:
            return verdict, frame, link
        if verdict is Verdict.OK:
            return None
        if verdict is Verdict.STALE_GENERATION or (
                verdict in AUTH_FAILURES and self.receiver.expects(link)):
            if now - self._warned.get(verdict, -math.inf) >= WARN_EVERY:
                self._warned[verdict] = now
                return verdict, None, link
            return None
        log.debug("dropped a frame on %s: %s", link, verdict)
        return None

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
                self._deadline = self._timing.at(self._heard)
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
