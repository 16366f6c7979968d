"""Heartbeat wire protocol, sans-IO: frame encoding, HMAC-SHA256, key files, anti-replay.

Frame, version 1 (big-endian; every frame is one UDP datagram or one serial record):

    offset size  field
    0      2     magic b"LH"
    2      1     version (1)
    3      1     auth: 0 = none, 1 = HMAC-SHA256
    4      1     key id (0 with auth none)
    5      1     state: 0 starting, 1 passive, 2 active, 3 leaving
    6      1     flags: bit 0 master role, bit 1 wants active, bit 2 yielded (manual standby)
    7      1     more flags: bit 0 the sender reports whether it hears its peer (bit 1), bit 1
                 the sender hears its peer; other bits reserved (0, ignored on receive).
                 Earlier builds send 0 here and ignore the byte: they interoperate.
    8      8     generation: the sender's boot time in microseconds, fixed for a run
    16     8     sequence number, 1, 2, 3 ... within a generation
    24     4     sender's deadtime in milliseconds (informational)
    28     1+n   cluster id (length-prefixed UTF-8)
    ..     1+n   node name (length-prefixed UTF-8)
    ..     32    HMAC-SHA256(key, every byte before it) - only with auth 1

Keys: the key file holds lines `ID KEY` (ID 1..255, KEY one token of at least 16 characters;
`#` comments and blank lines ignored). Every key in the file is accepted on receive; frames
are SENT WITH THE FIRST KEY LISTED. Rotation without downtime: append the new key on both
nodes and reload, then move it to the first line on both and reload, then drop the old one.

Anti-replay: a frame must carry the peer's newest generation seen, and within it a sequence
number above the last one accepted on the same link (a sender puts one frame, one sequence
number, on every link; each link must see it once) and at most REPLAY_WINDOW behind the newest
from that peer. Replayed, reordered and duplicated frames are dropped and counted; a newer
generation (the peer restarted) resets the sequence. A frame that is valid but older than the
newest (a slower link) only proves its link alive: it carries the newest frame's state and
flags, so the state machine never sees the peer's state go backwards. Links are named by the
transport ("udp:ADDRESS"); a valid frame on a link that is not configured is refused.
Generations outlive restarts (heartbeat/generation.py): a node's own never goes backwards, and
the peer's newest is remembered, so a restart does not reopen replays of its earlier boots.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from lbha import keyfile
from lbha.heartbeat.errors import KeyFileError
from lbha.heartbeat.said import Flags, PeerState

MAGIC = b"LH"
VERSION = 1
AUTH_NONE = 0
AUTH_HMAC_SHA256 = 1
MAC_SIZE = 32
REPLAY_WINDOW = 64

_HEADER = struct.Struct(">2sBBBBBBQQI")
#: The sequence number's place in the header.
_SEQ_AT = 16
_SEQ = struct.Struct(">Q")
_SEQ_END = _SEQ_AT + _SEQ.size
MAX_FRAME = _HEADER.size + 2 * 256 + MAC_SIZE
_ALL_FLAGS = 0x0F
#: Byte 7 bits this build knows; the rest are reserved for later and ignored on receive.
_KNOWN_MORE_FLAGS = 0x03


#: Wire value (byte 7 << 8 | byte 6) -> member, without the enum machinery on every frame.
_STATES = tuple(sorted(PeerState))
_FLAGS = {more << 8 | low: Flags(more << 8 | low)
          for more in range(_KNOWN_MORE_FLAGS + 1) for low in range(_ALL_FLAGS + 1)}


class Verdict(enum.StrEnum):
    """Why a received datagram was accepted or dropped (counted per verdict)."""

    OK = "ok"
    MALFORMED = "malformed"
    BAD_VERSION = "bad_version"
    OTHER_CLUSTER = "other_cluster"
    AUTH_MISMATCH = "auth_mismatch"
    UNKNOWN_KEY = "unknown_key"
    BAD_MAC = "bad_mac"
    STALE_GENERATION = "stale_generation"
    REPLAY = "replay"
    OWN_FRAME = "own_frame"
    UNKNOWN_NODE = "unknown_node"
    UNKNOWN_LINK = "unknown_link"


#: Verdicts of frames that failed authentication, with the likely cause when they come from
#: the peer's own address (an attacker forging that address aside).
AUTH_FAILURES: Mapping[Verdict, str] = {
    Verdict.BAD_MAC: "the key files differ (a key id both have, with different keys)",
    Verdict.UNKNOWN_KEY: "the peer signs with a key id missing from this node's key file (the "
                         "key files differ, or a key rotation was done on one node only)",
    Verdict.AUTH_MISMATCH: 'one node has auth = "none" and the other a key file',
}


class Frame(NamedTuple):
    cluster_id: str
    node: str
    generation: int
    seq: int
    state: PeerState
    flags: Flags = Flags.NONE
    deadtime_ms: int = 0
    key_id: int = 0


class HmacSha256:
    """HMAC-SHA256 (RFC 2104) with the key's two pads hashed once, not per frame: a third
    of the CPU of `hmac.digest`, which matters at 50 frames a second each way."""

    _BLOCK = 64

    def __init__(self, key: bytes) -> None:
        if len(key) > self._BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(self._BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


@dataclass(frozen=True)
class KeyRing:
    """Keys by id; `send_id` is the key frames are signed with (the first in the file)."""

    keys: dict[int, bytes]
    send_id: int
    macs: dict[int, HmacSha256] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "macs", {i: HmacSha256(k) for i, k in self.keys.items()})


def load_key_file(path: Path) -> KeyRing:
    """Read an `ID KEY` file (lbha.keyfile: the one reader `lbha config check` uses too)."""
    try:
        return KeyRing(*keyfile.read_key_file(path))
    except keyfile.KeyFileError as exc:
        raise KeyFileError(str(exc)) from None


def parse_keys(text: str, source: str = "<keys>") -> KeyRing:
    try:
        return KeyRing(*keyfile.parse_keys(text, source))
    except keyfile.KeyFileError as exc:
        raise KeyFileError(str(exc)) from None


def encode(frame: Frame, keys: KeyRing | None) -> bytes:
    """Serialize and sign `frame` (unsigned when `keys` is None, i.e. auth = "none")."""
    return encoder(frame, keys)(frame.seq)


def encoder(frame: Frame, keys: KeyRing | None) -> Callable[[int], bytes]:
    """`encode` of `frame` with a given sequence number, the rest packed once."""
    cluster, node = frame.cluster_id.encode(), frame.node.encode()
    if len(cluster) > 255 or len(node) > 255:
        raise ValueError("cluster id and node name must be at most 255 bytes")
    auth = AUTH_NONE if keys is None else AUTH_HMAC_SHA256
    key_id = 0 if keys is None else keys.send_id
    body = _HEADER.pack(
        MAGIC, VERSION, auth, key_id, frame.state, frame.flags & 0xFF, frame.flags >> 8,
        frame.generation, 0, frame.deadtime_ms,
    ) + bytes([len(cluster)]) + cluster + bytes([len(node)]) + node
    head, tail = body[:_SEQ_AT], body[_SEQ_END:]
    mac = None if keys is None else keys.macs[keys.send_id]

    def encode_seq(seq: int) -> bytes:
        signed = head + _SEQ.pack(seq) + tail
        return signed if mac is None else signed + mac.digest(signed)

    return encode_seq


def decode(data: bytes, keys: KeyRing | None) -> tuple[Verdict, Frame | None]:
    """Parse and authenticate one datagram. Never raises: bad input yields a verdict."""
    if len(data) < _HEADER.size + 2 or len(data) > MAX_FRAME:
        return Verdict.MALFORMED, None
    magic, version, auth, key_id, state, flags, more, gen, seq, dead = _HEADER.unpack_from(data)
    if magic != MAGIC:
        return Verdict.MALFORMED, None
    if version != VERSION:
        return Verdict.BAD_VERSION, None
    pos = _HEADER.size
    fields: list[str] = []
    for _ in range(2):
        if pos >= len(data):
            return Verdict.MALFORMED, None
        size = data[pos]
        raw = data[pos + 1 : pos + 1 + size]
        if len(raw) != size:
            return Verdict.MALFORMED, None
        try:
            fields.append(raw.decode())
        except UnicodeDecodeError:
            return Verdict.MALFORMED, None
        pos += 1 + size
    body, mac = data[:pos], data[pos:]
    if auth == AUTH_NONE and keys is None:
        if mac:
            return Verdict.MALFORMED, None
    elif auth == AUTH_HMAC_SHA256 and keys is not None:
        if len(mac) != MAC_SIZE:
            return Verdict.MALFORMED, None
        key = keys.macs.get(key_id)
        if key is None:
            return Verdict.UNKNOWN_KEY, None
        if not hmac.compare_digest(mac, key.digest(body)):
            return Verdict.BAD_MAC, None
    else:
        # An unsigned frame when we expect a MAC (or the reverse) is refused outright.
        return Verdict.AUTH_MISMATCH, None
    if state >= len(_STATES) or flags & ~_ALL_FLAGS:
        return Verdict.MALFORMED, None
    frame = Frame(fields[0], fields[1], gen, seq, _STATES[state],
                  _FLAGS[(more & _KNOWN_MORE_FLAGS) << 8 | flags], dead, key_id)
    return Verdict.OK, frame


#: What a frame says apart from its sequence number: (generation, state, flags).
Said = tuple[int, PeerState, Flags]


class Receiver:
    """Authenticates frames for one cluster and drops replays; counts every verdict.

    `links`: the link names frames may arrive on (None: any, for transports without
    addresses). The MAC is checked first, so forged frames count as forged wherever they
    come from. `floors`: per peer, the newest generation seen before this process started
    (older ones are refused).

    A peer in a steady state sends the same bytes every keepalive but for the sequence number
    and the MAC, so `repeat` recognises such a datagram by comparing bytes, checks its MAC and
    sequence number by the same rules and never parses it. At sub-second timers this runs
    for nearly every frame (bench/README.md, failover: idle CPU).
    """

    def __init__(self, cluster_id: str, node: str, peers: set[str], keys: KeyRing | None,
                 links: set[str] | None = None, *,
                 floors: Mapping[str, int] | None = None) -> None:
        self.cluster_id = cluster_id
        self.node = node
        self.peers = peers
        self.keys = keys
        self.links = links
        self.counts: Counter[Verdict] = Counter()
        #: Per peer: what its newest frame said, and that frame's sequence number.
        self._says: dict[str, Said] = {}
        self._top: dict[str, int] = {}
        #: Per (peer, link): (generation, last accepted sequence number).
        self._last: dict[tuple[str, str], tuple[int, int]] = {}
        self._floors = dict(floors or {})
        #: Per link: the last datagram accepted on it by `parse` (see _Lane).
        self._lanes: dict[str, _Lane] = {}

    def expects(self, link: str) -> bool:
        """Whether the peer's frames may arrive on `link`."""
        return self.links is None or link in self.links

    def accept(self, data: bytes, link: str = "") -> tuple[Verdict, Frame | None]:
        """Accept (OK and the frame, with what the peer's newest frame said) or drop one
        datagram. Never raises: bad input yields a verdict."""
        if self.repeat(data, link) is not None:
            return Verdict.OK, self.repeated(link)
        return self.parse(data, link)

    def repeat(self, data: bytes, link: str) -> Said | None:
        """What `data` says, if it repeats the last datagram accepted on `link` with a newer
        sequence number and the peer's newest frame says the same: accepted and counted.
        None: it does not (nothing is done; `parse` it)."""
        lane = self._lanes.get(link)
        if lane is None or lane.keys is not self.keys or len(data) != lane.size \
                or not data.startswith(lane.head) or data[_SEQ_END:lane.body_end] != lane.tail:
            return None
        end = lane.body_end
        if lane.mac is not None \
                and not hmac.compare_digest(data[end:], lane.mac.digest(data[:end])):
            return None
        said = self._says[lane.frame.node]
        if said != lane.said:
            return None
        seq = _SEQ.unpack_from(data, _SEQ_AT)[0]
        top = self._top[lane.frame.node]
        # The lane and _last[lane.last] are only ever set together, for the same generation.
        if seq <= self._last[lane.last][1] or seq + REPLAY_WINDOW < top:
            return None
        self._last[lane.last] = (said[0], seq)
        if seq > top:
            self._top[lane.frame.node] = seq
        self.counts[Verdict.OK] += 1
        return said

    def repeated(self, link: str) -> Frame:
        """The frame the last successful `repeat` on `link` accepted."""
        lane = self._lanes[link]
        return lane.frame._replace(seq=self._last[lane.last][1])

    def parse(self, data: bytes, link: str = "") -> tuple[Verdict, Frame | None]:
        """`accept` by decoding `data` in full."""
        verdict, frame = decode(data, self.keys)
        if frame is not None:
            raw = frame
            verdict, frame = self._check(frame, link)
            if verdict is Verdict.OK:
                self._lanes[link] = _Lane.of(data, raw, self.keys, link)
        self.counts[verdict] += 1
        return verdict, frame if verdict is Verdict.OK else None

    def _check(self, frame: Frame, link: str) -> tuple[Verdict, Frame]:
        if frame.cluster_id != self.cluster_id:
            return Verdict.OTHER_CLUSTER, frame
        if frame.node == self.node:
            return Verdict.OWN_FRAME, frame
        if frame.node not in self.peers:
            return Verdict.UNKNOWN_NODE, frame
        if not self.expects(link):
            return Verdict.UNKNOWN_LINK, frame
        says = self._says.get(frame.node)
        floor = says[0] if says is not None else self._floors.get(frame.node, 0)
        if frame.generation < floor:
            return Verdict.STALE_GENERATION, frame
        last = self._last.get((frame.node, link))
        if last is not None and last[0] == frame.generation and frame.seq <= last[1]:
            return Verdict.REPLAY, frame
        if says is not None and frame.generation == says[0]:
            top = self._top[frame.node]
            if frame.seq + REPLAY_WINDOW < top:
                return Verdict.REPLAY, frame
            if frame.seq <= top:
                self._last[(frame.node, link)] = (frame.generation, frame.seq)
                return Verdict.OK, frame._replace(state=says[1], flags=says[2])
        self._says[frame.node] = (frame.generation, frame.state, frame.flags)
        self._top[frame.node] = frame.seq
        self._last[(frame.node, link)] = (frame.generation, frame.seq)
        return Verdict.OK, frame


class _Lane(NamedTuple):
    """A datagram `parse` accepted on a link, minus its sequence number and MAC, for
    `Receiver.repeat`: the same fields `decode` would find, checked with the same key."""

    keys: KeyRing | None
    mac: HmacSha256 | None
    size: int
    body_end: int
    head: bytes
    tail: bytes
    #: The frame as sent (not merged with a newer one from another link).
    frame: Frame
    said: Said
    #: Its key in Receiver._last.
    last: tuple[str, str]

    @classmethod
    def of(cls, data: bytes, frame: Frame, keys: KeyRing | None, link: str) -> _Lane:
        """The lane of `data`, which `decode(data, keys)` found to be `frame`."""
        body_end = len(data) - (0 if keys is None else MAC_SIZE)
        return cls(keys, None if keys is None else keys.macs[frame.key_id], len(data),
                   body_end, data[:_SEQ_AT], data[_SEQ_END:body_end], frame,
                   (frame.generation, frame.state, frame.flags), (frame.node, link))


def dropped(counts: Mapping[Verdict, int]) -> dict[str, int]:
    """The verdicts other than OK, by name, for status output."""
    return {str(v): n for v, n in sorted(counts.items()) if v is not Verdict.OK}
