"""Golden scenarios for the real-server state machine (pure: no sockets, no clock).

Each scenario: parameters, a result sequence (S = success, F = failure), and the expected
state after each result; `*` marks a transition the operator hears about.
"""

from __future__ import annotations

import itertools

import pytest

from lbha.health import Health, force, initial_health, step
from lbha.model import InitialState

GOLDEN = [
    # (initial, failure_count, rise, results, expected)
    ("down", 2, 1, "S F S F F S", "U* U U U D* U*"),
    ("down", 1, 1, "F S F S", "D* U* D* U*"),
    ("down", 2, 1, "F F S", "D* D U*"),
    ("down", 2, 2, "S F F S S", "U* U D* D U*"),
    ("down", 2, 2, "S F F S F S S", "U* U D* D D D U*"),
    ("down", 3, 1, "S F F S F F F", "U* U U U U U D*"),
    ("up", 2, 1, "F F S", "U D* U*"),
    ("up", 1, 1, "F", "D*"),
    ("up", 2, 1, "S F F", "U* U D*"),
    ("down", 2, 3, "S F F S S F S S S", "U* U D* D D D D D U*"),
    ("up", 3, 2, "F S F F F S S", "U U U U D* D U*"),
    ("down", 2, 1, "S F S F S F", "U* U U U U U"),
    ("down", 1, 2, "S F S F S S", "U* D* D D D U*"),
    ("down", 5, 1, "S F F F F F", "U* U U U U D*"),
    ("down", 2, 1, "F F F F", "D* D D D"),
    ("up", 2, 2, "S S S", "U* U U"),
]


@pytest.mark.parametrize(("initial", "fc", "rise", "results", "expected"), GOLDEN)
def test_golden(initial: str, fc: int, rise: int, results: str, expected: str) -> None:
    health = initial_health(InitialState(initial), 0.0)
    got = []
    for t, r in enumerate(results.split(), start=1):
        health, transition = step(health, r == "S", f"r{t}", float(t), fc, rise)
        got.append(("U" if health.up else "D") + ("*" if transition else ""))
    assert " ".join(got) == expected


def test_transition_carries_reason_and_states() -> None:
    health = initial_health(InitialState.DOWN, 0.0)
    health, first = step(health, False, "connect to 198.18.0.21:443 refused", 1.0, 2, 1)
    assert first is not None
    assert (first.old, first.new, first.reason) == ("unchecked", "down",
                                                   "connect to 198.18.0.21:443 refused")
    health, up = step(health, True, "HTTP 200", 2.0, 2, 1)
    assert up is not None
    assert (up.old, up.new) == ("down", "up")
    assert health.since == 2.0
    health, _ = step(health, False, "timeout after 3.0 s", 3.0, 2, 1)
    assert health.up
    assert health.reason == "timeout after 3.0 s"  # a soft failure is visible in status
    assert health.since == 2.0


@pytest.mark.parametrize(("fc", "rise"), list(itertools.product(range(1, 4), range(1, 4))))
def test_exhaustive_invariants(fc: int, rise: int) -> None:
    """Every result sequence up to length 8: down exactly at fc consecutive failures from up,
    up exactly at rise consecutive successes from a checked down (or the first success)."""
    for initial in InitialState:
        for seq in itertools.product((True, False), repeat=8):
            health = initial_health(initial, 0.0)
            run_f = run_s = 0
            for t, ok in enumerate(seq):
                before = health
                health, transition = step(health, ok, "r", float(t), fc, rise)
                run_s, run_f = (run_s + 1, 0) if ok else (0, run_f + 1)
                if not before.checked:
                    expect_up = ok or (before.up and fc > 1)
                elif before.up:
                    expect_up = not (not ok and run_f >= fc)
                else:
                    expect_up = ok and run_s >= rise
                assert health.up == expect_up, (initial, seq[: t + 1])
                if before.checked:
                    assert (transition is not None) == (health.up != before.up)
                else:
                    assert (transition is None) == (before.up and not ok and fc > 1)


def test_force_for_on_and_off() -> None:
    health = Health(up=False)
    health, transition = force(health, True, "check type 'on'", 1.0)
    assert transition is not None
    assert (transition.old, transition.new) == ("unchecked", "up")
    health, transition = force(health, True, "check type 'on'", 2.0)
    assert transition is None
    health, transition = force(health, False, "check type 'off'", 3.0)
    assert transition is not None
    assert transition.new == "down"
