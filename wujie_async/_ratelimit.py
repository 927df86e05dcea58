"""Pacing requests: a fixed submit rate the user bought, and an adaptive brake on 429s.

Both hand out send slots in arrival order, so waiting callers are served first come, first
served, and neither costs anything while no limit is in force.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

_BUCKETS = 10


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

    Until a 429 there is no limit at all. A 429 sets the rate to ``decrease`` times the number
    of requests that succeeded over the last second: what the gateway actually let through.
    With fewer than ``min_evidence`` successes there is nothing to estimate from (a storm of
    429s at start-up, say), so the brake stays off and each request's own retry, which honours
    Retry-After, does the waiting. 429s for requests sent before a cut are the same burst and
    do not cut again. Successes raise the rate additively, a tenth of the ceiling per second
    whatever the rate, so a gateway limiting at R sees a shallow sawtooth around R; the rate
    never drops below a tenth of the first estimate, and at the ceiling (``recover_factor``
    times the first estimate) the limit is lifted.
    """

    __slots__ = (
        "_ceiling",
        "_clock",
        "_decrease",
        "_floor",
        "_last_cut",
        "_min_evidence",
        "_pacer",
        "_ramp",
        "_recover_factor",
        "_success_counts",
        "_tick",
    )

    def __init__(
        self,
        *,
        decrease: float = 0.8,
        recover_factor: float = 2.0,
        min_evidence: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._decrease = decrease
        self._recover_factor = recover_factor
        self._min_evidence = min_evidence
        self._clock = clock
        self._pacer: Pacer | None = None
        self._ceiling = self._ramp = self._floor = 1.0
        self._last_cut = -1e18
        # Successes over the last second, in ten 100 ms buckets: O(1) memory at any rate.
        self._success_counts = [0] * _BUCKETS
        self._tick = 0

    @property
    def rate(self) -> float | None:
        """Requests per second allowed now; None when no limit is in force."""
        return self._pacer.rate if self._pacer is not None else None

    async def acquire(self) -> float:
        """Wait for a send slot (at once while no limit is in force); returns the send time."""
        if self._pacer is not None:
            await self._pacer.wait()
        return self._clock()

    def rate_limited(self, sent_at: float) -> None:
        """The request sent at ``sent_at`` drew a 429: cut the rate, once per burst."""
        if sent_at <= self._last_cut:
            return
        now = self._clock()
        self._advance(now)
        estimate = float(sum(self._success_counts))
        if estimate < self._min_evidence:
            return
        self._last_cut = now
        if self._pacer is None:
            self._ceiling = estimate * self._recover_factor
            self._ramp = self._ceiling / 10
            self._floor = max(1.0, estimate / 10)
            self._pacer = Pacer(estimate * self._decrease, clock=self._clock)
        else:
            current = self._pacer.rate
            self._pacer.rate = max(self._floor, min(current, estimate) * self._decrease)

    def succeeded(self) -> None:
        """A request went through: raise the rate a little, or lift the limit."""
        self._advance(self._clock())
        self._success_counts[self._tick % _BUCKETS] += 1
        pacer = self._pacer
        if pacer is None:
            return
        # About ``rate`` successes arrive per second, so each adds ramp/rate: +ramp per second.
        raised = pacer.rate + self._ramp / pacer.rate
        if raised >= self._ceiling:
            self._pacer = None
        else:
            pacer.rate = raised

    def _advance(self, now: float) -> None:
        """Move the bucket ring to ``now``, emptying the buckets that fell out of the second."""
        tick = int(now * _BUCKETS)
        for step in range(1, min(tick - self._tick, _BUCKETS) + 1):
            self._success_counts[(self._tick + step) % _BUCKETS] = 0
        self._tick = max(tick, self._tick)
