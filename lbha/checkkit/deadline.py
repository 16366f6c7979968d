"""The one deadline runner of the check kit.

A check runs its work under `run_within`, which gives it `CheckRequest.own_budget`, a little
less than the engine's deadline: when the budget runs out the check still says *what* the
server failed to finish ("waiting for the status line from 198.18.0.21:80 timed out after
4.9 s") instead of the engine's bare "timeout after 5.0 s". `CheckFailed` raised by the work
becomes the reason; so do socket errors and broken streams, through the check's `error`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from lbha.checkapi import CheckRequest, CheckResult
from lbha.checkkit.errors import CheckFailed

#: What a check says about a socket error or a broken trio stream met during its work.
ErrorReason = Callable[[OSError | trio.BrokenResourceError], str]


class Progress:
    """The step a check is in and what it has received, so a timeout can name the step."""

    __slots__ = ("received", "step")

    def __init__(self, step: str) -> None:
        self.step = step
        self.received = 0

    def timeout_reason(self, seconds: float) -> str:
        if self.step.startswith(("connect to", "TLS handshake")):
            return f"{self.step} timed out after {seconds:.3g} s"
        return f"{self.step} timed out after {seconds:.3g} s ({self.received} bytes received)"


async def run_within(
    request: CheckRequest, work: Callable[[], Awaitable[CheckResult]], *,
    timed_out: Callable[[float], str], error: ErrorReason | None = None,
) -> CheckResult:
    """Run `work` within `request.own_budget`; failures and the timeout become reasons.

    `timed_out(budget)` says what was unfinished; `error` turns an OSError or a broken
    stream into a reason (without it they propagate, and the engine reports them bare).
    Every failure reason is also noted in the transcript.
    """
    budget = request.own_budget
    with trio.move_on_after(budget):
        try:
            return await work()
        except CheckFailed as exc:
            reason = exc.reason
        except (OSError, trio.BrokenResourceError) as exc:
            if error is None:
                raise
            reason = error(exc)
        return _failure(request, reason)
    return _failure(request, timed_out(budget))


def _failure(request: CheckRequest, reason: str) -> CheckResult:
    if request.transcript:
        request.transcript.note(reason)
    return CheckResult.failure(reason)
