"""The pure heartbeat state machine: golden scenarios plus an exhaustive two-node table."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from lbha.heartbeat import fsm
from lbha.heartbeat.fsm import (
    Acquire,
    Announce,
    Carrier,
    Notify,
    Received,
    Release,
    Reply,
    Settings,
    Standby,
    State,
    Stop,
    Takeover,
    Tick,
    Timers,
)
from lbha.heartbeat.protocol import Flags, PeerState

TIMERS = Timers(keepalive=0.05, warntime=0.15, deadtime=0.3, initdead=1.0)


def settings(master: bool = True, auto_failback: bool = True) -> Settings:
    node, peer = ("lb1", "lb2") if master else ("lb2", "lb1")
    return Settings(node, peer, master, auto_failback, TIMERS)


def assert_events_last(actions: list[fsm.Action]) -> None:
    """Addresses, frames and announcements before events, logs and replies: the peer and the
    clients wait on the former, people do not."""
    tells = [isinstance(a, Notify | fsm.Log | Reply) for a in actions]
    assert tells == sorted(tells), actions


class Node:
    """One FSM with its actions applied instantly (holds = the addresses are on it)."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.state = fsm.initial(0.0)
        self.holds = False
        self.actions: list[fsm.Action] = []

    def feed(self, event: fsm.Event) -> list[fsm.Action]:
        self.state, actions = fsm.step(self.s, self.state, event)
        assert_events_last(actions)
        for action in actions:
            if isinstance(action, Acquire):
                assert not self.holds
                self.holds = True
            elif isinstance(action, Release):
                assert self.holds
                self.holds = False
        assert self.holds == self.state.active
        self.actions += actions
        return actions

    def hear(self, other: Node, now: float) -> list[fsm.Action]:
        return self.feed(Received(now, "udp", fsm.frame_state(other.state),
                                  fsm.frame_flags(other.s, other.state)))

    def kinds(self) -> list[str]:
        return [a.kind for a in self.actions if isinstance(a, Notify)]


def exchange(a: Node, b: Node, now: float, rounds: int = 3) -> None:
    """Keepalives both ways until nothing changes (each frame reflects the sender's state)."""
    for _ in range(rounds):
        a.hear(b, now)
        b.hear(a, now)


def started_pair(auto_failback: bool = True) -> tuple[Node, Node]:
    a, b = Node(settings(True, auto_failback)), Node(settings(False, auto_failback))
    exchange(a, b, 0.1)
    return a, b


def test_startup_master_takes_over_when_it_hears_the_slave() -> None:
    a, b = started_pair()
    assert a.holds
    assert not b.holds
    assert "takeover" in a.kinds()
    assert "link_up" in b.kinds()


def test_startup_waits_initdead_then_takes_over_alone() -> None:
    b = Node(settings(master=False))
    b.feed(Tick(0.5))
    assert not b.holds
    assert fsm.deadline(b.s, b.state).at() == pytest.approx(1.0)
    b.feed(Tick(1.0))
    assert b.holds
    # A peer never heard since start-up is not "dead": no critical alarm at every start of
    # nodes started a few seconds apart, but a warning that this node took over alone.
    notes = [a for a in b.actions if isinstance(a, Notify)]
    assert [(n.kind, n.severity) for n in notes] == [("takeover", "warning")]
    assert notes[0].reason == "lb1 not heard within initdead 1s of start-up; taking over"


def test_a_peer_heard_then_lost_during_start_up_is_still_dead() -> None:
    b = Node(settings(master=False))
    b.feed(Received(0.1, "udp", PeerState.STARTING, Flags.MASTER))
    b.feed(Tick(0.1 + TIMERS.deadtime))
    assert b.holds
    assert [(a.kind, a.severity) for a in b.actions
            if isinstance(a, Notify) and a.kind != "link_up"] == [
        ("link_down", "warning"), ("peer_dead", "critical"), ("failover", "warning")]


def test_startup_stays_passive_when_the_peer_is_already_active() -> None:
    b = Node(settings(master=False))
    b.feed(Tick(1.0))
    a = Node(settings(master=True, auto_failback=False))
    a.hear(b, 2.0)
    assert not a.holds
    assert fsm.frame_flags(a.s, a.state) == (Flags.MASTER | Flags.REPORTS_HEARING
                                             | Flags.HEARS_PEER)
    b.hear(a, 2.0)
    assert b.holds


def test_peer_dead_failover_after_deadtime_and_warning_at_warntime() -> None:
    _, b = started_pair()
    b.feed(Tick(0.1 + TIMERS.warntime))
    assert any(isinstance(x, fsm.Log) and "late keepalive" in x.message for x in b.actions)
    assert not b.holds
    b.feed(Tick(0.1 + TIMERS.deadtime - 0.001))
    assert not b.holds
    b.feed(Tick(0.1 + TIMERS.deadtime))
    assert b.holds
    assert b.kinds()[-3:] == ["link_down", "peer_dead", "failover"]


@pytest.mark.parametrize("auto_failback", [True, False])
def test_master_returns(auto_failback: bool) -> None:
    a, b = started_pair(auto_failback)
    b.feed(Tick(1.0))  # a died
    assert b.holds
    a = Node(settings(True, auto_failback))
    a.state = fsm.initial(2.0)
    a.hear(b, 2.0)
    assert not a.holds  # never both
    exchange(a, b, 2.05)
    assert a.holds is auto_failback
    assert b.holds is not auto_failback


def test_graceful_stop_hands_over_at_once() -> None:
    a, b = started_pair()
    actions = a.feed(Stop(0.2))
    assert isinstance(actions[0], Release)
    assert fsm.frame_state(a.state) is PeerState.LEAVING
    b.hear(a, 0.2)
    assert b.holds
    assert "failover" in b.kinds()


def test_manual_takeover_on_the_slave_never_overlaps() -> None:
    a, b = started_pair()
    assert b.feed(Takeover(0.2)) == [fsm.Send()]
    assert fsm.frame_flags(b.s, b.state) & Flags.WANTS_ACTIVE
    a.hear(b, 0.2)  # releases first
    assert not a.holds
    assert not b.holds
    b.hear(a, 0.2)
    assert b.holds
    # The master with auto_failback does not grab it back: it yielded.
    exchange(a, b, 0.3)
    assert b.holds
    assert not a.holds
    # Until an explicit takeover.
    a.feed(Takeover(0.4))
    exchange(a, b, 0.4)
    assert a.holds
    assert not b.holds


def test_manual_standby_and_refusals() -> None:
    a, b = started_pair()
    actions = a.feed(Standby(0.2))
    assert isinstance(actions[0], Release)
    b.hear(a, 0.2)
    assert b.holds
    exchange(a, b, 0.3)
    assert b.holds
    assert a.feed(Standby(0.4))[-1] == Reply(True, "already passive; will not ask for the "
                                                   "floating IPs back")
    assert b.feed(Takeover(0.4))[-1] == Reply(True, "already active")
    b.feed(Tick(1.0))  # a is dead now
    reply = b.feed(Standby(1.0))[-1]
    assert isinstance(reply, Reply)
    assert not reply.ok
    assert "dead" in reply.message
    assert b.holds


def test_partition_heal_master_keeps_and_announces_slave_steps_down() -> None:
    a, b = started_pair()
    a.feed(Tick(0.5))
    b.feed(Tick(0.5))
    assert a.holds
    assert b.holds
    # The slave's frame reaches the master first.
    heard = a.hear(b, 5.0)
    assert any(isinstance(x, Announce) for x in heard)
    assert a.holds
    stepping_down = b.hear(a, 5.0)
    assert not b.holds
    assert "split_brain" in b.kinds()
    # The loser never announces: that would send clients to the node releasing the IPs.
    assert not any(isinstance(x, Announce) for x in stepping_down)
    exchange(a, b, 5.1)
    assert a.holds
    assert not b.holds
    assert not any(isinstance(x, Release) for x in a.actions)


def partitioned_pair() -> tuple[Node, Node]:
    """Both active, each having found the other dead."""
    a, b = started_pair()
    a.feed(Tick(0.5))
    b.feed(Tick(0.5))
    assert a.holds
    assert b.holds
    assert not fsm.frame_flags(a.s, a.state) & Flags.HEARS_PEER
    return a, b


def test_partition_heal_loser_serves_until_the_keeper_hears_it() -> None:
    # The slave hears the master first (its own frames wait on a failed ARP entry): it
    # keeps the addresses, since clients still point at it and the master has not announced.
    a, b = partitioned_pair()
    waiting = b.hear(a, 5.0)
    assert b.holds
    assert not any(isinstance(x, Announce | Release) for x in waiting)
    assert [(n.kind, n.new_state) for n in waiting if isinstance(n, Notify)] == [
        ("link_up", "up"), ("split_brain", "active")]
    assert b.state.split_brain
    # Keepalives that still say the master does not hear it change nothing, and are routine.
    assert b.hear(a, 5.02) == []
    assert fsm.routine(b.s, b.state) is not None
    # The master hears the slave: it announces, and its frames now say it hears the slave.
    announced = a.hear(b, 5.1)
    assert any(isinstance(x, Announce) for x in announced)
    assert fsm.frame_flags(a.s, a.state) & Flags.HEARS_PEER
    # Only then does the slave step down, without announcing and without a second alarm.
    stepping_down = b.hear(a, 5.1)
    assert not b.holds
    assert isinstance(stepping_down[0], Release)
    assert not any(isinstance(x, Announce) for x in stepping_down)
    assert [n.kind for n in stepping_down if isinstance(n, Notify)] == ["standby"]
    assert not b.state.split_brain
    exchange(a, b, 5.2)
    assert a.holds
    assert not b.holds
    assert not any(isinstance(x, Release) for x in a.actions)
    assert b.kinds().count("split_brain") == 1


def test_partition_heal_loser_waits_indefinitely_on_a_one_way_link() -> None:
    # The master's frames arrive, the slave's never do: both keep serving (as during the
    # partition) rather than the slave dropping clients the master never announced to.
    a, b = partitioned_pair()
    for i in range(50):
        b.hear(a, 5.0 + i * 0.05)
    assert b.holds
    assert a.holds
    assert b.kinds().count("split_brain") == 1


def test_partition_heal_with_a_peer_that_cannot_say_it_hears() -> None:
    # An earlier build never sets REPORTS_HEARING: the loser releases at once, as it did.
    _, b = partitioned_pair()
    b.feed(Received(5.0, "udp", PeerState.ACTIVE, Flags.MASTER))
    assert not b.holds
    assert "split_brain" in b.kinds()


def test_stopping_node_refuses_commands() -> None:
    a, _ = started_pair()
    a.feed(Stop(0.2))
    assert a.feed(Takeover(0.3)) == [Reply(False, "the daemon is stopping")]


# ------------------------------------------------------------------- carrier

ETH0 = frozenset({"eth0"})
UP = frozenset[str]()


def test_carrier_loss_on_the_active_node_releases_and_yields_to_the_peer() -> None:
    a, b = started_pair()
    actions = a.feed(Carrier(0.2, ETH0))
    assert [type(x) for x in actions] == [Release, fsm.Send, Notify, Notify]
    assert not a.holds
    assert a.kinds()[-2:] == ["carrier_lost", "standby"]
    flags = fsm.frame_flags(a.s, a.state)
    assert flags & Flags.NO_CARRIER
    assert not flags & Flags.WANTS_ACTIVE  # the master with failback asks for nothing
    # A second link (serial, another NIC) still works: the peer takes over at once.
    b.hear(a, 0.2)
    assert b.holds
    exchange(a, b, 0.25)
    assert b.holds
    assert not a.holds


def test_no_carrier_never_takes_over() -> None:
    a, b = started_pair()
    b.feed(Carrier(0.2, ETH0))
    assert not b.holds
    a.feed(Stop(0.3))
    b.hear(a, 0.3)  # the peer leaves: nobody else can serve, but b cannot either
    assert not b.holds
    b.feed(Tick(5.0))
    assert not b.holds
    reply = b.feed(Takeover(5.0))[-1]
    assert isinstance(reply, Reply)
    assert not reply.ok
    assert "no carrier on eth0" in reply.message
    # The carrier returns and the peer is long gone: b waits one deadtime for it, then serves.
    b.feed(Carrier(6.0, UP))
    assert not b.holds
    assert fsm.deadline(b.s, b.state).at() == pytest.approx(6.0 + TIMERS.deadtime)
    b.feed(Tick(6.0 + TIMERS.deadtime))
    assert b.holds
    assert b.kinds()[-2:] == ["carrier_back", "failover"]


@pytest.mark.parametrize("auto_failback", [True, False])
def test_cable_cut_and_return_never_both_active(auto_failback: bool) -> None:
    a, b = started_pair(auto_failback)
    stale_from_b = fsm.frame_state(b.state), fsm.frame_flags(b.s, b.state)
    a.feed(Carrier(1.0, ETH0))  # the cut: a's frames reach nobody, b's reach nobody
    assert not a.holds
    stale_from_a = fsm.frame_state(a.state), fsm.frame_flags(a.s, a.state)
    b.feed(Tick(1.0 + TIMERS.deadtime))
    assert b.holds  # failover after deadtime
    a.feed(Tick(1.0 + TIMERS.deadtime))
    assert "peer_dead" in a.kinds()
    a.feed(Carrier(5.0, UP))  # the cable is back
    # Frames queued during the cut arrive first, oldest first: b's PASSIVE from before its
    # failover, a's NO_CARRIER. Neither may make anyone act.
    a.feed(Received(5.001, "udp", *stale_from_b))
    b.feed(Received(5.001, "udp", *stale_from_a))
    assert not a.holds
    assert b.holds
    exchange(a, b, 5.002)
    assert not a.holds  # still settling: a says NO_CARRIER, asks for nothing
    assert fsm.frame_flags(a.s, a.state) & Flags.NO_CARRIER
    assert fsm.routine(a.s, a.state) is None  # the end of settling needs the daemon
    assert a.state.rejoin_until == pytest.approx(5.0 + TIMERS.deadtime)
    assert fsm.deadline(a.s, a.state).at() <= a.state.rejoin_until
    a.feed(Tick(5.0 + TIMERS.deadtime))
    assert a.state.rejoin_until is None
    exchange(a, b, 5.0 + TIMERS.deadtime)
    assert a.holds is auto_failback
    assert b.holds is not auto_failback


def test_carrier_flap_shorter_than_deadtime_lets_the_live_peer_take_over() -> None:
    a, b = started_pair()
    a.feed(Carrier(0.2, ETH0))
    a.feed(Carrier(0.25, UP))  # within deadtime: the peer is still alive and passive
    assert not a.holds
    b.hear(a, 0.26)  # a still says it cannot serve: b, alive, takes over at once
    assert b.holds
    a.hear(b, 0.26)
    a.feed(Tick(0.25 + TIMERS.deadtime))
    exchange(a, b, 0.25 + TIMERS.deadtime)  # settled: the master fails back by the handshake
    assert a.holds
    assert not b.holds
    assert a.kinds()[-3:] == ["standby", "carrier_back", "takeover"]


def test_carrier_report_repeated_or_on_another_device_changes_nothing_more() -> None:
    a, _ = started_pair()
    a.feed(Carrier(1.0, ETH0))
    assert a.feed(Carrier(1.0, ETH0)) == []
    actions = a.feed(Carrier(1.1, frozenset({"eth0", "eth1"})))
    assert [type(x) for x in actions] == [fsm.Send, Notify]
    assert not a.holds
    a.feed(Carrier(1.2, frozenset({"eth1"})))  # still one down: still cannot serve
    assert not a.holds


# ------------------------------------------------------------------- exhaustive table

BOOLS = (False, True)


def all_states(s: Settings) -> list[State]:
    """Every reachable combination of the local decision inputs, peer view aside."""
    out = []
    for active, yielded, pending, cut in itertools.product(BOOLS, BOOLS, BOOLS, BOOLS):
        if active and (yielded or pending or cut):
            continue  # becoming active clears both; no carrier releases
        out.append(State(started=0.0, starting=False, active=active, yielded=yielded,
                         takeover_pending=pending, no_carrier=ETH0 if cut else UP))
    return out


@pytest.mark.parametrize("auto_failback", BOOLS)
@pytest.mark.parametrize("a_master", BOOLS)
def test_exhaustive_pairs_converge_to_exactly_one_active(a_master: bool,
                                                         auto_failback: bool) -> None:
    """Every pair of states, connected: after keepalives, exactly one node is active (none
    when neither has carrier; the one with carrier when only one has), and no node ever
    acquires while its peer's last frame said ACTIVE."""
    sa = replace(settings(a_master, auto_failback), node="lb1", peer="lb2")
    sb = replace(settings(not a_master, auto_failback), node="lb2", peer="lb1")
    for state_a, state_b in itertools.product(all_states(sa), all_states(sb)):
        a, b = Node(sa), Node(sb)
        a.state, b.state = state_a, state_b
        a.holds, b.holds = state_a.active, state_b.active
        both_before = a.holds and b.holds
        for first, second in ((a, b), (b, a)) * 3:
            peer_active = fsm.frame_state(second.state) is PeerState.ACTIVE
            actions = first.hear(second, 0.1)
            if peer_active:
                assert not any(isinstance(x, Acquire) for x in actions), (state_a, state_b)
                # A node steps down for an active peer only once that peer hears it, so has
                # announced the addresses to the clients still pointing here.
                if any(isinstance(x, Release) for x in actions):
                    assert second.state.peer_alive, (state_a, state_b)
        if state_a.no_carrier and state_b.no_carrier:
            assert (a.holds, b.holds) == (False, False), (state_a, state_b)
            continue
        assert a.holds != b.holds, (state_a, state_b)
        if state_a.no_carrier or state_b.no_carrier:
            assert (b if state_a.no_carrier else a).holds, (state_a, state_b)
        if both_before:
            keeper = a if a.holds else b
            assert not any(isinstance(x, Release) for x in keeper.actions)
            assert any(isinstance(x, Announce) for x in keeper.actions)


EVENTS = st.one_of(
    st.builds(lambda dt, link, state, flags: ("frame", dt, link, state, flags),
              st.floats(0, 0.4), st.sampled_from(["udp:a", "udp:b"]),
              st.sampled_from(PeerState), st.sampled_from(list(Flags))),
    st.builds(lambda dt: ("tick", dt), st.floats(0, 0.4)),
    st.builds(lambda dt, cmd: (cmd, dt), st.floats(0, 0.4),
              st.sampled_from(["takeover", "standby"])),
    st.builds(lambda dt, down: ("carrier", dt, down), st.floats(0, 0.4),
              st.sampled_from([UP, ETH0])),
)


def step_through(s: Settings, script: list[tuple[object, ...]]) -> list[State]:
    """The states a node passes through under `script`, from start-up."""
    state, now, seen = fsm.initial(0.0), 0.0, []
    for kind, dt, *rest in script:
        now += float(dt)  # type: ignore[arg-type]
        event: fsm.Event
        if kind == "frame":
            link, peer_state, flags = rest
            event = Received(now, link, peer_state, flags)  # type: ignore[arg-type]
        elif kind == "tick":
            event = Tick(now)
        elif kind == "carrier":
            event = Carrier(now, rest[0])  # type: ignore[arg-type]
        else:
            event = Takeover(now) if kind == "takeover" else Standby(now)
        state, actions = fsm.step(s, state, event)
        assert_events_last(actions)
        seen.append(state)
    return seen


@hyp_settings(max_examples=300, deadline=None)
@given(st.booleans(), st.booleans(), st.lists(EVENTS, max_size=25), st.floats(0, 1))
def test_routine_frames_change_nothing_but_their_time(
    master: bool, auto_failback: bool, script: list[tuple[object, ...]], at: float,
) -> None:
    # What a keepalive thread may take without waking the daemon must be exactly what
    # the state machine would ignore, until the deadline the routine promises.
    s = settings(master, auto_failback)
    for state in step_through(s, script):
        routine = fsm.routine(s, state)
        if routine is None:
            continue
        deadline = fsm.deadline(s, state)
        for link in routine.links:
            assert state.last_heard is not None
            t = state.last_heard + at * (deadline.at() - state.last_heard) * 0.999
            after, actions = fsm.step(s, state, Received(t, link, routine.peer_state,
                                                         routine.peer_flags))
            assert actions == []
            assert after == fsm.heard(state, link, t)
            # What a keepalive thread computes without the state machine seeing the frame.
            assert deadline.at({link: t}) == fsm.deadline(s, after).at()


def test_no_routine_while_starting_or_after_a_late_warning() -> None:
    s = settings()
    state = fsm.initial(0.0)
    assert fsm.routine(s, state) is None
    state, _ = fsm.step(s, state, Received(0.1, "udp", PeerState.PASSIVE, Flags.NONE))
    state, _ = fsm.step(s, state, Received(0.2, "udp", PeerState.PASSIVE, Flags.NONE))
    routine = fsm.routine(s, state)
    assert routine is not None
    assert routine.links == {"udp": 0.2}
    state, actions = fsm.step(s, state, Tick(0.2 + TIMERS.warntime))
    assert [type(a) for a in actions] == [fsm.Log]
    assert fsm.routine(s, state) is None  # the next frame clears the warning: a change
