"""One batch call on the wire: when its answered attempt went out (``SendTime``), and the
deadlines of its jobs while it is out (``DeadlineWatch``)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._tracked import _Tracked


class SendTime:
    """When the last attempt of a batch call went on the wire (the transport's ``on_wire``)."""

    __slots__ = ("_loop", "at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.at = loop.time()

    def on_wire(self, sending: bool) -> None:
        if sending:
            self.at = self._loop.time()


class DeadlineWatch:
    """Ends the jobs of one call on the wire whose deadline passes before the reply is back.

    One timer per call (armed for the earliest deadline among its jobs), not one per job: a
    job waiting on a slow reply still fails with JobTimeoutError on time.

    A raw ``loop.call_at`` timer on purpose: it fires a plain callback at a loop time while the
    call's task stays blocked in the request (that call must not be cancelled: its reply still
    serves the other keys). anyio has no timer that runs a callback; a cancel scope would cancel
    the call, and a task per call to sleep would cost more than one timer handle.
    """

    __slots__ = ("_chunk", "_expire", "_handle", "_loop", "_when")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        chunk: list[_Tracked],
        expire: Callable[[_Tracked], None],
    ) -> None:
        self._loop = loop
        self._chunk = chunk
        self._expire = expire
        self._handle: asyncio.TimerHandle | None = None
        self._when = math.inf
        self._arm()

    def _arm(self) -> None:
        when = math.inf
        for tracked in self._chunk:  # a loop, not min(<generator>): armed for every call
            job = tracked.job
            if job._deadline < when and not job._future.done():
                when = job._deadline
        self._when = when
        if when < math.inf:
            self._handle = self._loop.call_at(self._when, self._fire)

    def _fire(self) -> None:
        # asyncio may run a timer a clock tick early: the time it was armed for counts as now.
        now = max(self._loop.time(), self._when)
        for tracked in self._chunk:
            if not tracked.job.done() and tracked.job.deadline <= now:
                self._expire(tracked)
        self._arm()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
