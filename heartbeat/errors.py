"""Typed errors of the heartbeat daemon; each message tells the operator what to fix."""

from __future__ import annotations

from lbha.errors import LbhaError


class HeartbeatError(LbhaError):
    """Base of every error the heartbeat daemon raises on purpose."""


class KeyFileError(HeartbeatError):
    """The auth key file is missing, unsafe (group/world readable) or malformed."""


class TransportError(HeartbeatError):
    """A heartbeat link could not be opened (bad bind address, port in use, no peer)."""


class FloatingIPError(HeartbeatError):
    """A floating IP cannot be placed (no interface holds its subnet) or netlink refused it."""
