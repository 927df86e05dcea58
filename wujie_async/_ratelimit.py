"""Pacing requests: a fixed submit rate the user bought, and an adaptive brake on 429s.

Both hand out send slots in arrival order, so waiting callers are served first come, first
served, and neither costs anything while no limit is in force.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


class Pacer:
    """Spaces callers ``1/rate`` seconds apart, first come first served."""

    __slots__ = ("_clock", "_next_slot", "_period")

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._period = 1.0 / rate
        self._next_slot = 0.0
        self._clock = clock

    @property
    def rate(self) -> float:
        """Slots per second."""
        return 1.0 / self._period

    @rate.setter
    def rate(self, value: float) -> None:
        self._period = 1.0 / value

    async def wait(self) -> None:
        """Return when this caller's slot has come."""
        now = self._clock()
        slot = max(now, self._next_slot)
        self._next_slot = slot + self._period
        if slot > now:
            await asyncio.sleep(slot - now)


class AdaptiveLimiter:
    """Slows every request down after a 429, then speeds back up (AIMD).

    Until the first 429 there is no limit at all. A 429 sets the rate to ``decrease`` times the
    rate actually observed over the last second (further 429s within one second count as the
    same event, since one burst yields many). Successes then raise the rate additively, by
    about a tenth of the ceiling per second, whatever the rate; once it reaches the ceiling
    (``recover_factor`` times the rate that first drew a 429) the limit is lifted. Additive
    increase keeps the sawtooth shallow: a gateway limiting at R sees a 429 every few seconds,
    not every burst.
    """

    __slots__ = (
        "_ceiling",
        "_clock",
        "_decrease",
        "_last_cut",
        "_pacer",
        "_ramp",
        "_recover_factor",
        "_sent",
        "floor",
    )

    def __init__(
        self,
        *,
        floor: float = 1.0,
        decrease: float = 0.5,
        recover_factor: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.floor = floor
        self._decrease = decrease
        self._ramp = floor
        self._recover_factor = recover_factor
        self._clock = clock
        self._pacer: Pacer | None = None
        self._ceiling = 0.0
        self._last_cut = -1e9
        self._sent: deque[float] = deque()

    @property
    def rate(self) -> float | None:
        """Requests per second allowed now; None when no limit is in force."""
        return self._pacer.rate if self._pacer is not None else None

    async def acquire(self) -> None:
        """Wait for a send slot (at once while no limit is in force)."""
        now = self._clock()
        sent = self._sent
        sent.append(now)
        while sent and sent[0] < now - 1.0:
            sent.popleft()
        if self._pacer is not None:
            await self._pacer.wait()

    def rate_limited(self) -> None:
        """A 429 came back: cut the rate."""
        now = self._clock()
        if now - self._last_cut < 1.0:
            return
        self._last_cut = now
        # Requests per second over the last second, or over what there is of it so far.
        span = max(now - self._sent[0], 0.1) if self._sent else 1.0
        observed = max(len(self._sent) / min(span, 1.0), self.floor)
        current = self._pacer.rate if self._pacer is not None else observed
        new_rate = max(self.floor, min(current, observed) * self._decrease)
        if self._pacer is None:
            self._ceiling = observed * self._recover_factor
            self._ramp = max(self.floor, self._ceiling / 10)
            self._pacer = Pacer(new_rate, clock=self._clock)
        else:
            self._pacer.rate = new_rate

    def succeeded(self) -> None:
        """A request went through: raise the rate a little, or lift the limit."""
        pacer = self._pacer
        if pacer is None:
            return
        # ``rate`` successes arrive per second, so each adds ramp/rate: +ramp per second.
        raised = pacer.rate + self._ramp / pacer.rate
        if raised >= self._ceiling:
            self._pacer = None
        else:
            pacer.rate = raised
