"""The check kit's one way to run a blocking client library without letting it outlive its check.

Checks built on synchronous libraries (ldap3, pymysql) hand their work to `run_blocking`:

- the work runs in `trio.to_thread.run_sync` under the check module's CapacityLimiter, with
  `abandon_on_cancel=True`, so the engine's deadline always wins;
- the work sets every library socket timeout from `Worker.remaining()`, so a silent server
  makes the library itself give up before the check's budget is spent;
- sockets the work registers with `Worker.watch()` are shut down from the trio side when the
  budget runs out or the check is cancelled, so a server that trickles a byte a second
  (which defeats per-read timeouts) cannot keep the thread alive either.

The budget is the request's own budget (`run_within`), so the check, not the engine, says
what was slow ("bind on 198.18.0.21:389 did not finish within 2.9 s").
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable

import trio

from lbha.checkapi import CheckRequest, CheckResult
from lbha.checkkit.deadline import run_within

#: Smallest socket timeout handed to a library: 0 would make its sockets non-blocking.
MIN_SOCKET_TIMEOUT = 0.001


class RunLimiter:
    """A CapacityLimiter per trio run, for a module-level "at most N worker threads".

    A plain module-level limiter would outlive its run: a thread abandoned at the end of
    one run (a test, `lbha check --once`) could never hand its token back, and every later
    run would start with fewer threads.
    """

    def __init__(self, name: str, tokens: int) -> None:
        self.tokens = tokens
        self._limiter: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar(name)

    def get(self) -> trio.CapacityLimiter:
        """This run's limiter (created on first use)."""
        try:
            return self._limiter.get()
        except LookupError:
            limiter = trio.CapacityLimiter(self.tokens)
            self._limiter.set(limiter)
            return limiter


class Interrupted(OSError):
    """The trio side shut the work's sockets down: its budget ran out or it was cancelled."""


class Worker:
    """What the work function sees: its deadline, its phase, and a way to register sockets."""

    def __init__(self, budget: float) -> None:
        self.deadline = time.monotonic() + budget
        #: What the work is doing now, for the reason when it runs out of time.
        self.phase = "waiting for a worker thread"
        self._lock = threading.Lock()
        # Our own duplicates of the library's sockets: shutting a duplicate down stops the
        # library's socket too, and since we alone close the duplicates, a descriptor the
        # library closed and the kernel reused can never be shut down by mistake.
        self._watched: list[socket.socket] = []
        self._interrupted = False

    def remaining(self) -> float:
        """Seconds left in the budget, for library timeouts (never 0, never negative)."""
        return max(self.deadline - time.monotonic(), MIN_SOCKET_TIMEOUT)

    def watch(self, sock: socket.socket) -> None:
        """Register a socket to shut down on interruption (call from the worker thread)."""
        with self._lock:
            if self._interrupted:
                raise Interrupted("check cancelled")
            # socket.dup() refuses SSL sockets; a plain socket on a duplicate fd will do.
            self._watched.append(socket.socket(fileno=os.dup(sock.fileno())))

    def interrupt(self) -> None:
        """Shut every registered socket down, now and on registration (trio side)."""
        with self._lock:
            self._interrupted = True
            for sock in self._watched:
                with contextlib.suppress(OSError):  # not connected, or already shut down
                    sock.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        """Close the duplicates (worker side, once the work is over)."""
        with self._lock:
            self._interrupted = True
            for sock in self._watched:
                sock.close()
            self._watched.clear()


async def run_blocking(
    request: CheckRequest, work: Callable[[Worker], CheckResult], *, limiter: RunLimiter
) -> CheckResult:
    """Run `work(worker)` in a thread within the request's own budget.

    The time spent waiting for a thread slot counts against the budget: a check that could
    not start in time has failed as surely as one that could not finish.
    """
    worker = Worker(request.own_budget)

    def run() -> CheckResult:
        try:
            return work(worker)
        finally:
            worker.release()

    async def in_thread() -> CheckResult:
        finished = False
        try:
            result = await trio.to_thread.run_sync(
                run, abandon_on_cancel=True, limiter=limiter.get()
            )
            finished = True
        finally:
            if not finished:  # cancelled by the engine, or out of budget: free the thread
                worker.interrupt()
        return result

    return await run_within(
        request, in_thread,
        timed_out=lambda budget: f"{worker.phase} did not finish within {budget:.1f} s",
    )
