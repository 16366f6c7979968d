"""What a node says about itself in every frame: its state and flags.

Pure values shared by the wire protocol (protocol.py) and the state machine (fsm.py), here so
the state machine imports nothing that does I/O (tests/test_layering.py).
"""

from __future__ import annotations

import enum


class PeerState(enum.IntEnum):
    """What a node says about itself in each frame."""

    STARTING = 0
    PASSIVE = 1
    ACTIVE = 2
    #: Graceful stop: the sender released everything and goes away now.
    LEAVING = 3


class Flags(enum.IntFlag):
    """Byte 6 of a frame in the low 8 bits, byte 7 in the next 8."""

    NONE = 0
    MASTER = 1
    WANTS_ACTIVE = 2
    YIELDED = 4
    #: An interface carrying floating IPs has no carrier: this node cannot serve them.
    NO_CARRIER = 8
    #: The sender sets HEARS_PEER (not set by earlier builds, which cannot say).
    REPORTS_HEARING = 0x100
    #: The sender hears its peer: it has taken its frames since it last found it dead.
    HEARS_PEER = 0x200
