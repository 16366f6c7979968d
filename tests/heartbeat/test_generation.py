"""GenerationStore: this node's generation never goes backwards; the peer's is remembered."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lbha.heartbeat.generation import FILE_NAME, GenerationStore
from lbha.heartbeat.protocol import Frame, PeerState, encode


def test_first_start_takes_the_clock_and_writes_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / FILE_NAME
    assert GenerationStore(path).start(5_000) == 5_000
    assert json.loads(path.read_text()) == {"version": 1, "own": 5_000, "peers": {}}


def test_restarts_always_move_forward(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / FILE_NAME
    assert GenerationStore(path).start(5_000) == 5_000
    assert GenerationStore(path).start(5_000) == 5_001  # same microsecond
    with caplog.at_level(logging.WARNING):
        assert GenerationStore(path).start(1_000) == 5_002  # clock stepped back
    assert "the clock is behind" in caplog.text
    assert GenerationStore(path).start(9_000) == 9_000  # clock ahead again: it wins


def test_peer_generations_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    store = GenerationStore(path)
    store.start(10)
    store.saw_peer("lb2", 700)
    store.saw_peer("lb2", 600)  # older: ignored
    again = GenerationStore(path)
    assert again.start(10) == 11
    assert again.peers == {"lb2": 700}


@pytest.mark.parametrize("text", [
    "{not json", '{"version": 2, "own": 1, "peers": {}}', '{"version": 1, "own": "x"}',
    '{"version": 1, "own": 3, "peers": []}', "[]",
])
def test_damaged_file_falls_back_to_the_clock(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / FILE_NAME
    path.write_text(text)
    store = GenerationStore(path)
    with caplog.at_level(logging.ERROR):
        assert store.start(4_000) == 4_000
    assert f"ignoring damaged {path}" in caplog.text
    assert store.peers == {}
    assert json.loads(path.read_text())["own"] == 4_000  # rewritten whole


def test_unwritable_state_dir_is_logged_and_the_daemon_runs_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the directory should be")
    store = GenerationStore(blocker / FILE_NAME)
    with caplog.at_level(logging.ERROR):
        assert store.start(4_000) == 4_000
        store.saw_peer("lb2", 9)
    assert caplog.text.count("cannot save") == 2
    assert store.peers == {"lb2": 9}


@pytest.mark.parametrize(("own", "peers", "kept"), [
    (2**64 - 1, {"lb2": 700}, {"lb2": 700}),  # no room left for this boot's generation
    (2**64 + 5, {"lb2": 700}, {"lb2": 700}),
    (-3, {"lb2": 700}, {"lb2": 700}),
    (True, {"lb2": 700}, {"lb2": 700}),
    (10, {"lb2": 2**64, "lb3": 9}, {"lb3": 9}),  # only the valid floors are kept
    (10, {"lb2": -1}, {}),
    (10, {"lb2": "700"}, {}),
])
def test_values_that_do_not_fit_a_frame_are_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, own: object, peers: dict[str, object],
    kept: dict[str, int],
) -> None:
    path = tmp_path / FILE_NAME
    bad = json.dumps({"version": 1, "own": own, "peers": peers})
    path.write_text(bad)
    store = GenerationStore(path)
    with caplog.at_level(logging.ERROR):
        generation = store.start(4_000)
    assert generation == 4_000  # from the clock, and it fits the frame's 64-bit field
    assert store.peers == kept
    aside = path.with_name(FILE_NAME + ".damaged")
    assert aside.read_text() == bad  # kept for the operator
    assert f"moved {path} aside to {aside}" in caplog.text
    assert json.loads(path.read_text()) == {"version": 1, "own": 4_000, "peers": kept}
    # The next start is clean: the file it wrote is valid.
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert GenerationStore(path).start(4_000) == 4_001
    assert caplog.text == ""


def test_a_generation_too_large_for_a_frame_no_longer_crashes_the_daemon(
    tmp_path: Path,
) -> None:
    path = tmp_path / FILE_NAME
    path.write_text(json.dumps({"version": 1, "own": 2**64 - 1, "peers": {}}))
    generation = GenerationStore(path).start(4_000)
    encode(Frame("c", "lb1", generation, 1, PeerState.PASSIVE), None)  # struct.error before
