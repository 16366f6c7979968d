"""The keepalive pump: which frames wake the daemon, its deadline, the frames it sends."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbha.heartbeat import fsm
from lbha.heartbeat.keepalive_pump import WARN_EVERY, Arrival, KeepalivePump
from lbha.heartbeat.protocol import Flags, Frame, KeyRing, PeerState, Receiver, Verdict, encode

KEYS = KeyRing({1: b"0123456789abcdef0123"}, 1)
SETTINGS = fsm.Settings("lb1", "lb2", True, True, fsm.Timers(0.02, 0.06, 0.1, 1.0))
LINK = "udp:198.18.0.2"


def pump() -> KeepalivePump:
    return KeepalivePump(Receiver("lbha", "lb1", {"lb2"}, KEYS, {LINK}), KEYS,
                         cluster_id="lbha", node="lb1", generation=7, interval=0.02,
                         deadtime=0.1)


class Peer:
    def __init__(self, generation: int = 1000) -> None:
        self.generation = generation
        self.seq = 0

    def frame(self, state: PeerState = PeerState.PASSIVE, flags: Flags = Flags.NONE) -> bytes:
        self.seq += 1
        return encode(Frame("lbha", "lb2", self.generation, self.seq, state, flags), KEYS)


class Daemon:
    """What Heartbeat does with the pump, without trio."""

    def __init__(self, p: KeepalivePump) -> None:
        self.pump = p
        self.state = fsm.initial(0.0)
        self.handled = 0
        self.actions: list[fsm.Action] = []
        self.publish()

    def publish(self) -> None:
        self.pump.expect(fsm.routine(SETTINGS, self.state),
                         fsm.deadline(SETTINGS, self.state), self.handled)

    def sync(self) -> None:
        for a in self.pump.arrivals():
            self.state = fsm.heard(self.state, a.link, a.at)

    def handle(self, frame: Frame, now: float) -> None:
        self._handle(fsm.Received(now, LINK, frame.state, frame.flags))

    def tick(self, now: float) -> None:
        self._handle(fsm.Tick(now))

    def _handle(self, event: fsm.Event) -> None:
        self.sync()
        self.state, actions = fsm.step(SETTINGS, self.state, event)
        self.actions += actions
        self.handled += 1
        self.publish()


def steady() -> tuple[KeepalivePump, Daemon, Peer]:
    """lb1 has heard lb2 (passive) at 0.0, and lb2's frame at 0.02 said nothing new."""
    p, peer = pump(), Peer()
    daemon = Daemon(p)
    verdict, frame = p.received(peer.frame(), LINK, 0.0)
    assert verdict is Verdict.OK
    assert frame is not None  # the first frame changes everything
    daemon.handle(frame, 0.0)
    assert p.received(peer.frame(), LINK, 0.02) == (Verdict.OK, None)
    daemon.sync()
    daemon.publish()
    return p, daemon, peer


def test_routine_frames_are_timed_not_handed() -> None:
    p, daemon, peer = steady()
    for i in range(1, 20):
        assert p.received(peer.frame(), LINK, 0.02 + i * 0.02) == (Verdict.OK, None)
    assert p.arrivals() == [Arrival(LINK, 0.02 + 19 * 0.02)]
    assert p.arrivals() == []  # taken once
    assert daemon.handled == 1


def test_deadline_moves_on_with_routine_frames_and_comes_once() -> None:
    p, _daemon, peer = steady()
    assert p.deadline() == 0.02 + SETTINGS.timers.warntime
    p.received(peer.frame(), LINK, 0.05)
    assert p.deadline() == 0.05 + SETTINGS.timers.warntime
    assert not p.due(0.1)
    assert p.due(0.11)
    assert not p.due(0.12)  # handed once; the daemon republishes after handling it
    assert p.deadline() == math.inf
    # Until then nothing is routine: the daemon must see frames itself.
    assert p.received(peer.frame(), LINK, 0.12)[1] is not None


def test_a_frame_that_changes_something_is_handed_and_stops_the_shortcut() -> None:
    p, daemon, peer = steady()
    changed = p.received(peer.frame(flags=Flags.WANTS_ACTIVE), LINK, 0.04)[1]
    assert changed is not None
    # Frames after it are handed too, until the daemon has handled it.
    assert p.received(peer.frame(flags=Flags.WANTS_ACTIVE), LINK, 0.045)[1] is not None
    daemon.publish()  # published before the daemon handled those two: ignored
    assert p.received(peer.frame(flags=Flags.WANTS_ACTIVE), LINK, 0.05)[1] is not None


def test_a_new_generation_is_always_handed() -> None:
    p, _daemon, _peer = steady()
    restarted = Peer(generation=2000)
    frame = p.received(restarted.frame(), LINK, 0.04)[1]
    assert frame is not None
    assert frame.generation == 2000


def test_forged_frames_are_counted_not_handed() -> None:
    p, _daemon, _peer = steady()
    forged = encode(Frame("lbha", "lb2", 1000, 99, PeerState.LEAVING),
                    KeyRing({1: b"guessed-key-000000000"}, 1))
    assert p.received(forged, LINK, 0.03) == (Verdict.BAD_MAC, None)
    assert p.verdicts()[Verdict.BAD_MAC] == 1


def test_rearm_when_the_deadline_comes_closer() -> None:
    p, daemon, _peer = steady()
    calls: list[None] = []
    p.rearm = lambda: calls.append(None)
    p.expect(None, fsm.Deadline(fixed=p.deadline() + 1), daemon.handled)
    assert calls == []
    p.expect(None, fsm.Deadline(fixed=0.03), daemon.handled)
    assert calls == [None]


def test_frames_sent_take_new_sequence_numbers_and_the_announced_state() -> None:
    p = pump()
    rx = Receiver("lbha", "lb2", {"lb1"}, KEYS)
    first = rx.accept(p.frame())[1]
    p.announce(PeerState.ACTIVE, Flags.MASTER)
    second = rx.accept(p.frame())[1]
    assert first == Frame("lbha", "lb1", 7, 1, PeerState.STARTING, Flags.NONE, 100, 1)
    assert second == Frame("lbha", "lb1", 7, 2, PeerState.ACTIVE, Flags.MASTER, 100, 1)
    assert p.sent == 2


def test_keepalives_go_out_every_interval_and_the_loop_wakes_for_the_next() -> None:
    p = pump()
    assert p.wake_at() == -math.inf  # the first at once
    frame, due = p.timers(5.0)
    assert frame is not None
    assert not due
    assert p.wake_at() == pytest.approx(5.02)
    assert p.timers(5.019) == (None, False)
    assert p.timers(5.021)[0] is not None
    assert p.wake_at() == pytest.approx(5.041)
    assert p.sent == 2


def test_the_deadline_wakes_the_loop_once() -> None:
    p, _daemon, _peer = steady()
    deadline = p.deadline()
    p.timers(deadline - 0.01)  # a keepalive; the next one is due after the deadline
    assert p.wake_at() == deadline
    assert p.timers(deadline) == (None, True)
    assert p.timers(deadline) == (None, False)
    assert p.wake_at() == pytest.approx(deadline + 0.01)  # the daemon has yet to republish


def test_a_frame_is_answered_at_once_when_ours_is_due_soon() -> None:
    # Nodes fall into step: one wake-up a keepalive instead of two (bench/README.md).
    p, peer = pump(), Peer()
    p.timers(1.0)  # sent; the next is due at 1.02
    p.datagram(peer.frame(), LINK, 1.005)  # ours is due in 15 ms: more than half an interval
    assert p.wake_at() == pytest.approx(1.02)
    p.datagram(peer.frame(), LINK, 1.011)  # due in 9 ms: answer now
    assert p.wake_at() == 1.011
    assert p.timers(1.011)[0] is not None
    assert p.wake_at() == pytest.approx(1.031)


def test_datagrams_hand_over_what_may_change_something_and_rare_warnings() -> None:
    p, _daemon, peer = steady()
    assert p.datagram(peer.frame(), LINK, 0.03) is None  # routine
    handed = p.datagram(peer.frame(flags=Flags.WANTS_ACTIVE), LINK, 0.04)
    assert handed is not None
    assert handed[0] is Verdict.OK
    assert handed[2] == LINK
    assert handed[1] is not None
    assert handed[1].flags == Flags.WANTS_ACTIVE
    forged = encode(Frame("lbha", "lb2", 1000, 999, PeerState.ACTIVE),
                    KeyRing({1: b"guessed-key-000000000"}, 1))
    # From the peer's link: a key mismatch, most likely; the daemon warns, so it hears of it
    # at most once a WARN_EVERY.
    assert p.datagram(forged, LINK, 0.05) == (Verdict.BAD_MAC, None, LINK)
    assert p.datagram(forged, LINK, 0.05 + WARN_EVERY / 2) is None
    assert p.datagram(forged, LINK, 0.05 + WARN_EVERY) == (Verdict.BAD_MAC, None, LINK)
    # From anywhere else: counted only.
    assert p.datagram(forged, "udp:198.18.0.66", 5.0) is None
    assert p.datagram(b"garbage", LINK, 5.0) is None
    counts = p.verdicts()
    assert counts[Verdict.BAD_MAC] == 4
    assert counts[Verdict.MALFORMED] == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-2, 3), st.sampled_from([PeerState.PASSIVE,
                                                                PeerState.ACTIVE]),
                          st.sampled_from([Flags.NONE, Flags.MASTER, Flags.WANTS_ACTIVE]),
                          st.sampled_from([1000, 1000, 1000, 2000]), st.booleans(),
                          st.booleans()), max_size=40))
def test_the_repeat_lane_times_and_hands_what_a_full_parse_would(
    stream: list[tuple[int, PeerState, Flags, int, bool, bool]],
) -> None:
    fast, full = pump(), pump()
    fast_daemon, full_daemon = Daemon(fast), Daemon(full)
    forger = KeyRing({1: b"guessed-key-000000000"}, 1)
    seq, now = 0, 0.0
    for step, state, flags, generation, forged, tick in stream:
        seq, now = max(0, seq + step), now + 0.01
        data = encode(Frame("lbha", "lb2", generation, seq, state, flags),
                      forger if forged else KEYS)
        full.receiver._lanes.clear()  # never the lane: parse every datagram
        got, want = fast.received(data, LINK, now), full.received(data, LINK, now)
        assert got == want
        if got[1] is not None and want[1] is not None:
            fast_daemon.handle(got[1], now)
            full_daemon.handle(want[1], now)
        if tick:
            assert fast.due(now) == full.due(now)
        assert fast.deadline() == full.deadline()
    fast_daemon.sync()
    full_daemon.sync()
    assert fast_daemon.state == full_daemon.state
    assert fast.verdicts() == full.verdicts()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.floats(0.001, 0.08),
                          st.sampled_from([PeerState.PASSIVE, PeerState.ACTIVE,
                                           PeerState.LEAVING]),
                          st.sampled_from([Flags.NONE, Flags.MASTER, Flags.WANTS_ACTIVE]),
                          st.booleans()), max_size=12))
def test_the_daemon_acts_as_a_state_machine_fed_every_frame_would(
    runs: list[tuple[int, float, PeerState, Flags, bool]],
) -> None:
    # The ground truth: one state machine stepping through every frame. The daemon sees only
    # what the pump hands it plus the times of the rest; it must do and end the same, even
    # after quiet spells many times deadtime long. Runs of one frame repeated make them.
    p, peer = pump(), Peer()
    daemon = Daemon(p)
    truth, truth_actions = fsm.initial(0.0), []
    now = 0.0
    for count, gap, state, flags, looks_at_deadline in runs:
        for _ in range(count):
            now += gap
            if looks_at_deadline and p.due(now):
                daemon.tick(now)
                truth, actions = fsm.step(SETTINGS, truth, fsm.Tick(now))
                truth_actions += actions
            verdict, frame = p.received(peer.frame(state, flags), LINK, now)
            assert verdict is Verdict.OK
            truth, actions = fsm.step(SETTINGS, truth, fsm.Received(now, LINK, state, flags))
            truth_actions += actions
            if frame is not None:
                daemon.handle(frame, now)
    daemon.sync()
    assert daemon.state == truth
    assert daemon.actions == truth_actions
