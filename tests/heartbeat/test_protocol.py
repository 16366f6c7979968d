"""Wire protocol: frames, HMAC verdicts (a table, like keepalived's auth_hmac_test), key files."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbha.heartbeat.errors import KeyFileError
from lbha.heartbeat.protocol import (
    MAX_FRAME,
    Flags,
    Frame,
    HmacSha256,
    KeyRing,
    PeerState,
    Receiver,
    Verdict,
    decode,
    dropped,
    encode,
    encoder,
    load_key_file,
    parse_keys,
)

KEY1 = b"k1-0123456789abcdef"
KEY2 = b"k2-0123456789abcdef"
RING = KeyRing({1: KEY1, 2: KEY2}, 1)


def frame(**changes: object) -> Frame:
    base: dict[str, object] = dict(
        cluster_id="lbha", node="lb2", generation=1000, seq=1, state=PeerState.ACTIVE,
        flags=Flags.WANTS_ACTIVE, deadtime_ms=300,
    )
    base.update(changes)
    return Frame(**base)  # type: ignore[arg-type]


def receiver(keys: KeyRing | None = RING) -> Receiver:
    return Receiver("lbha", "lb1", {"lb2"}, keys)


def test_round_trip_is_compact() -> None:
    data = encode(frame(), RING)
    assert len(data) < 80
    verdict, got = decode(data, RING)
    assert verdict is Verdict.OK
    assert got == frame(key_id=1)


def test_unsigned_round_trip() -> None:
    verdict, got = decode(encode(frame(), None), None)
    assert verdict is Verdict.OK
    assert got == frame()


def tamper(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1 :]


GOOD = encode(frame(), RING)


@pytest.mark.parametrize(
    ("data", "keys", "verdict"),
    [
        (GOOD, RING, Verdict.OK),
        (GOOD[:-1], RING, Verdict.MALFORMED),
        (GOOD + b"x", RING, Verdict.MALFORMED),
        (b"", RING, Verdict.MALFORMED),
        (b"XX" + GOOD[2:], RING, Verdict.MALFORMED),
        (GOOD[:2] + b"\x02" + GOOD[3:], RING, Verdict.BAD_VERSION),
        (tamper(GOOD, 20), RING, Verdict.BAD_MAC),
        (tamper(GOOD, len(GOOD) - 1), RING, Verdict.BAD_MAC),
        (encode(frame(), KeyRing({1: b"another-key-0123456"}, 1)), RING, Verdict.BAD_MAC),
        (encode(frame(), KeyRing({9: KEY1}, 9)), RING, Verdict.UNKNOWN_KEY),
        (encode(frame(), None), RING, Verdict.AUTH_MISMATCH),
        (GOOD, None, Verdict.AUTH_MISMATCH),
        (encode(frame(), KeyRing({2: KEY2}, 2)), RING, Verdict.OK),
    ],
    ids=["ok", "short", "long", "empty", "magic", "version", "bad-mac-body", "bad-mac-tail",
         "wrong-key", "unknown-key-id", "unsigned", "signed-when-none", "second-key"],
)
def test_decode_verdicts(data: bytes, keys: KeyRing | None, verdict: Verdict) -> None:
    assert decode(data, keys)[0] is verdict


def test_hearing_flags_ride_in_byte_7_which_earlier_builds_ignore() -> None:
    flags = Flags.MASTER | Flags.REPORTS_HEARING | Flags.HEARS_PEER
    data = encode(frame(flags=flags), None)
    assert data[6:8] == bytes([Flags.MASTER, 0x03])
    assert decode(data, None)[1] == frame(flags=flags)
    # A frame of an earlier build (byte 7 zero) cannot say whether it hears us.
    old = encode(frame(flags=Flags.MASTER), None)
    assert old[7] == 0
    got = decode(old, None)[1]
    assert got is not None
    assert not got.flags & Flags.REPORTS_HEARING
    # Bits of byte 7 a later build may use are ignored, not refused.
    later = data[:7] + bytes([0xF3]) + data[8:]
    assert decode(later, None) == (Verdict.OK, frame(flags=flags))


def test_replay_reorder_and_generation() -> None:
    rx = receiver()
    assert rx.accept(encode(frame(seq=5), RING))[0] is Verdict.OK
    assert rx.accept(encode(frame(seq=5), RING))[0] is Verdict.REPLAY
    assert rx.accept(encode(frame(seq=4), RING))[0] is Verdict.REPLAY  # reordered
    assert rx.accept(encode(frame(seq=6), RING))[0] is Verdict.OK
    # The peer restarted: a new generation resets the sequence; the old one is now stale.
    assert rx.accept(encode(frame(generation=2000, seq=1), RING))[0] is Verdict.OK
    assert rx.accept(encode(frame(seq=7), RING))[0] is Verdict.STALE_GENERATION
    assert rx.accept(encode(frame(cluster_id="other"), RING))[0] is Verdict.OTHER_CLUSTER
    assert rx.accept(encode(frame(node="lb1"), RING))[0] is Verdict.OWN_FRAME
    assert rx.accept(encode(frame(node="lb9"), RING))[0] is Verdict.UNKNOWN_NODE
    assert dropped(rx.counts) == {"other_cluster": 1, "own_frame": 1, "replay": 2,
                            "stale_generation": 1, "unknown_node": 1}


def test_floor_from_before_a_restart_refuses_earlier_boots() -> None:
    rx = Receiver("lbha", "lb1", {"lb2"}, RING, floors={"lb2": 1000})
    # A frame recorded during an earlier boot of the peer, replayed after our restart.
    assert rx.accept(encode(frame(generation=999, seq=50), RING))[0] is Verdict.STALE_GENERATION
    assert rx.accept(encode(frame(generation=1000, seq=7), RING))[0] is Verdict.OK
    assert rx.accept(encode(frame(generation=1000, seq=8), RING))[0] is Verdict.OK
    assert rx.accept(encode(frame(generation=2000, seq=1), RING))[0] is Verdict.OK
    assert rx.accept(encode(frame(generation=2000, seq=2), RING))[0] is Verdict.OK
    assert rx.accept(encode(frame(generation=1000, seq=9), RING))[0] is Verdict.STALE_GENERATION


def test_late_copy_refreshes_link_but_not_state() -> None:
    rx = Receiver("lbha", "lb1", {"lb2"}, RING, {"udp:a", "udp:b"})
    assert rx.accept(encode(frame(seq=5, state=PeerState.PASSIVE), RING), "udp:a")[1] \
        == frame(seq=5, state=PeerState.PASSIVE, key_id=1)
    old_copy = rx.accept(encode(frame(seq=4, state=PeerState.ACTIVE), RING), "udp:b")
    assert old_copy[0] is Verdict.OK
    assert old_copy[1] is not None
    assert old_copy[1].state is PeerState.PASSIVE  # the newest state, never an older one
    assert rx.accept(encode(frame(seq=200), RING), "udp:a")[0] is Verdict.OK
    assert rx.accept(encode(frame(seq=100), RING), "udp:b")[0] is Verdict.REPLAY  # too old
    assert rx.accept(encode(frame(seq=300), RING), "udp:evil")[0] is Verdict.UNKNOWN_LINK
    assert rx.accept(b"junk", "udp:evil")[0] is Verdict.MALFORMED


def test_a_repeat_is_parsed_when_another_link_carried_something_newer() -> None:
    rx = Receiver("lbha", "lb1", {"lb2"}, RING, {"udp:a", "udp:b"})
    passive = PeerState.PASSIVE
    assert rx.accept(encode(frame(seq=1, state=passive), RING), "udp:a")[0] is Verdict.OK
    assert rx.repeat(encode(frame(seq=2, state=passive), RING), "udp:a") is not None
    assert rx.accept(encode(frame(seq=3), RING), "udp:b")[1] == frame(seq=3, key_id=1)
    # The same bytes as udp:a's last frame, but the peer's newest frame said ACTIVE since.
    repeat = encode(frame(seq=4, state=passive), RING)
    assert rx.repeat(repeat, "udp:a") is None
    assert rx.accept(repeat, "udp:a")[1] == frame(seq=4, state=passive, key_id=1)
    assert rx.accept(encode(frame(seq=4), RING), "udp:b")[1] \
        == frame(seq=4, state=passive, key_id=1)  # an older copy: the newest state


def test_one_frame_counts_once_per_link() -> None:
    rx = receiver()
    data = encode(frame(seq=3), RING)
    assert rx.accept(data, "udp:198.18.0.2")[0] is Verdict.OK
    assert rx.accept(data, "udp:2001:db8::2")[0] is Verdict.OK
    assert rx.accept(data, "udp:2001:db8::2")[0] is Verdict.REPLAY
    # A new generation seen on one link makes the old one stale on every link.
    assert rx.accept(encode(frame(generation=2000, seq=1), RING), "udp:198.18.0.2")[0] \
        is Verdict.OK
    assert rx.accept(encode(frame(seq=9), RING), "udp:2001:db8::2")[0] \
        is Verdict.STALE_GENERATION


@settings(max_examples=2000)
@given(st.binary(max_size=MAX_FRAME + 10))
def test_decoder_never_raises_on_noise(data: bytes) -> None:
    for keys in (RING, None):
        verdict, got = receiver(keys).accept(data)
        assert (verdict is Verdict.OK) == (got is not None)


@settings(max_examples=2000)
@given(st.integers(0, len(GOOD) - 1), st.integers(1, 255), st.binary(max_size=8))
def test_decoder_never_raises_on_mutations(offset: int, xor: int, tail: bytes) -> None:
    data = GOOD[:offset] + bytes([GOOD[offset] ^ xor]) + GOOD[offset + 1 :] + tail
    verdict, _ = receiver().accept(data)
    assert verdict is not Verdict.OK  # every bit of a signed frame is covered by the MAC


@given(st.text(max_size=40), st.text(max_size=40), st.integers(0, 2**64 - 1),
       st.sampled_from(PeerState), st.sampled_from(list(Flags)))
def test_round_trip_any_frame(cluster: str, node: str, seq: int, state: PeerState,
                              flags: Flags) -> None:
    f = frame(cluster_id=cluster, node=node, seq=seq, state=state, flags=flags, key_id=1)
    assert decode(encode(f, RING), RING) == (Verdict.OK, f)


@given(st.binary(min_size=1, max_size=100), st.binary(max_size=200))
def test_hmac_with_hashed_pads_is_rfc_2104(key: bytes, message: bytes) -> None:
    assert HmacSha256(key).digest(message) == hmac.digest(key, message, "sha256")


@given(st.integers(0, 2**64 - 1), st.sampled_from([RING, None]))
def test_encoder_matches_encode(seq: int, keys: KeyRing | None) -> None:
    assert encoder(frame(seq=7), keys)(seq) == encode(frame(seq=seq), keys)


def mutated_stream() -> st.SearchStrategy[list[tuple[bytes, str]]]:
    """Datagrams a receiver may meet in a row: good frames of a few shapes and sequence
    numbers, some with a byte flipped, on two links."""
    good = st.builds(
        lambda seq, state, gen, node: encode(frame(seq=seq, state=state, generation=gen,
                                                   node=node), RING),
        st.integers(0, 80), st.sampled_from(PeerState), st.sampled_from([1000, 2000]),
        st.sampled_from(["lb2", "lb3"]))
    flipped = st.builds(lambda data, at, xor: data[:at % len(data)]
                        + bytes([data[at % len(data)] ^ xor]) + data[at % len(data) + 1:],
                        good, st.integers(0, 200), st.integers(1, 255))
    return st.lists(st.tuples(st.one_of(good, good, flipped),
                              st.sampled_from(["udp:a", "udp:b"])), max_size=40)


@settings(max_examples=500)
@given(mutated_stream())
def test_the_repeat_lane_gives_the_verdicts_of_a_full_decode(
    stream: list[tuple[bytes, str]],
) -> None:
    fast = Receiver("lbha", "lb1", {"lb2"}, RING)
    full = Receiver("lbha", "lb1", {"lb2"}, RING)
    for data, link in stream:
        full._lanes.clear()  # never the lane: decode every datagram
        assert fast.accept(data, link) == full.accept(data, link)
    assert fast.counts == full.counts


def write_keys(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_key_file_first_key_sends(tmp_path: Path) -> None:
    ring = load_key_file(write_keys(tmp_path / "k", "# keys\n7 " + "a" * 32 + "\n\n3 " + "b" * 20))
    assert ring.send_id == 7
    assert ring.keys == {7: b"a" * 32, 3: b"b" * 20}


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write_keys(tmp_path / "k", "1 " + "a" * 32, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key_file(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no key found"),
        ("1", "expected `ID KEY`"),
        ("x " + "a" * 20, "expected `ID KEY`"),
        ("0 " + "a" * 20, "out of range"),
        ("256 " + "a" * 20, "out of range"),
        ("1 short", "shorter than 16"),
        ("1 " + "a" * 20 + "\n1 " + "b" * 20, "listed twice"),
    ],
)
def test_bad_key_files(text: str, message: str) -> None:
    with pytest.raises(KeyFileError, match=message):
        parse_keys(text)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot open auth key file"):
        load_key_file(tmp_path / "nope")
