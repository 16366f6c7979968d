"""The check kit: what built-in checks, third-party checks and the core's feedback client
are written with (part of the public plugin API, see docs/checks.md "Writing a check").

- `run_within`: the one deadline runner. Work runs within `CheckRequest.own_budget`, a
  little less than the engine's deadline, so the check's own reason ("waiting for the
  greeting timed out after 2.9 s") arrives instead of the engine's bare timeout.
- `tcp`: connect, TLS and a conversation tracked by `Progress` (`run_exchange`).
- `lines`: a line-protocol session with hard limits (`run_session`, `LineSession`).
- `udp`: a request retransmitted on a schedule until a datagram is judged the answer.
- `blocking`: a blocking client library in a worker thread that cannot outlive its check.
- `quote` / `printable` for server text, `matches` for `receive`, `describe_error` /
  `describe_broken` for network errors, `CheckFailed` for a reason raised on the way.
"""

from lbha.checkkit import udp
from lbha.checkkit.deadline import Progress, run_within
from lbha.checkkit.errors import (
    CheckFailed,
    describe_broken,
    describe_error,
    describe_tls_error,
)
from lbha.checkkit.text import matches, printable, quote

__all__ = [
    "CheckFailed",
    "Progress",
    "describe_broken",
    "describe_error",
    "describe_tls_error",
    "matches",
    "printable",
    "quote",
    "run_within",
    "udp",
]
