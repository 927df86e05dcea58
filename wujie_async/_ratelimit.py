"""Pacing requests: a fixed submit rate the user bought, and an adaptive brake on 429s.

Both hand out send slots in arrival order, so waiting callers are served first come, first
served, and neither costs anything while no limit is in force. Both read and sleep on ONE
clock, the event loop's (``loop.time()``, which uvloop keeps differently from
``time.monotonic``); tests inject a fake clock and a fake sleep instead of waiting.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]
# What must be done before a send, awaited by a pacer shortly before the send's slot (the
# journal's intent): it is then not between the slot and the send, where its delay would make
# sends uneven.
Ready = Callable[[], Awaitable[None]]

# A fixed cap keeps ``cap + 1`` consecutive slots this much more than one second apart, so
# that no 1-second window, however it is placed, holds more than ``cap`` sends even when
# arrivals are delayed unevenly (signing, the journal's intent, a loop waking late) by up to
# this much. The price: the cap's sustained throughput is ``cap / (1 + WINDOW_MARGIN_S)``,
# 4.8% below the cap.
WINDOW_MARGIN_S = 0.05

# The 429 brake looks at the last _WINDOW_S seconds of replies, in _BUCKETS buckets: O(1)
# memory at any request rate.
_BUCKETS = 10
_WINDOW_S = 5.0
# ``ready`` is awaited this long before a slot (or at once, when the slot is closer): the
# window in which a process killed outright leaves an intent that was never sent.
READY_AHEAD_S = 0.05
# A slot this close is here: asyncio wakes a timer up to its clock resolution early, and
# ``now + period`` read back is off by a float's last bit. On a real clock time moves on
# between two reads; on a clock that only moves when the loop idles (looptime in the tests)
# "sleep the remaining 2e-12 s" would wake early again, forever.
_SLOT_SLACK_S = 1e-6


def loop_clock() -> float:
    """The running event loop's clock: the one ``asyncio.sleep`` and timers run on."""
    return asyncio.get_running_loop().time()


class Pacer:
    """Spaces callers ``(1 + margin)/rate`` seconds apart, first come first served.

    With ``margin=0`` (the 429 brake's pacer) slots are exactly ``1/rate`` apart, which puts
    ``rate + 1`` of them in a closed 1-second window. A submit cap passes ``margin=``
    :data:`WINDOW_MARGIN_S`: then ``rate + 1`` slots span more than a second plus the margin,
    so no 1-second window sees more than ``rate`` sends even with up to ``margin`` seconds of
    uneven delay between a slot and its send; the cost is a sustained throughput of
    ``rate / (1 + margin)`` (4.8% below the cap at the default margin). The slot after an
    idle pacer's first one comes a margin later still: that first send is the one most likely
    to leave late.

    Only the caller at the head of the line sleeps; the others wait for their turn. A caller
    that is cancelled while waiting leaves the line without taking a slot, so the ones behind
    it move up instead of keeping the gap it would have used. A caller's ``ready`` (the
    journal's intent) is awaited up to :data:`READY_AHEAD_S` before its slot, and the next
    slot counts from when it ends: however long it takes, sends stay the period apart.
    """

    __slots__ = ("_clock", "_line", "_margin", "_next_slot", "_period", "_sleep")

    def __init__(
        self,
        rate: float,
        *,
        margin: float = 0.0,
        clock: Clock = loop_clock,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._margin = margin
        self._period = (1.0 + margin) / rate
        self._next_slot = -float("inf")
        self._clock = clock
        self._sleep = sleep
        self._line: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def rate(self) -> float:
        """The rate asked for, in slots per second (the margin is not subtracted)."""
        return (1.0 + self._margin) / self._period

    @rate.setter
    def rate(self, value: float) -> None:
        self._period = (1.0 + self._margin) / value

    def _idle(self) -> bool:
        """Nobody waits and the next slot has come: a caller now goes at once."""
        return not self._line and self._clock() >= self._next_slot - _SLOT_SLACK_S

    def free_in(self) -> float:
        """Seconds until a caller arriving now would have its slot (0.0: at once)."""
        if self._idle():
            return 0.0
        return max(0.0, self._next_slot - self._clock()) + len(self._line) * self._period

    async def wait(self, ready: Ready | None = None) -> None:
        """Return when this caller's slot has come, ``ready`` awaited just before it."""
        if self._idle():
            # Idle: this send is the one most likely to leave late (a new connection, cold
            # code), and a late first send bunches with the slots after it: the next slot
            # comes a margin later still.
            self._next_slot = self._clock() + self._period + self._margin
            if ready is not None:
                await ready()
                # Callers that came meanwhile re-read the slot when they wake.
                late = self._clock() + self._period + self._margin
                self._next_slot = max(self._next_slot, late)
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._line.append(turn)
        try:
            if self._line[0] is not turn:
                await turn  # set when every caller ahead has had its slot or left
            # At the head: sleep until the slot, re-reading it (the rate may change meanwhile).
            while (delay := self._next_slot - self._clock()) > _SLOT_SLACK_S:
                if ready is None:
                    await self._sleep(delay)
                elif delay - READY_AHEAD_S > _SLOT_SLACK_S:  # (see _SLOT_SLACK_S)
                    await self._sleep(delay - READY_AHEAD_S)
                else:
                    await ready()
                    ready = None
            if ready is not None:
                await ready()
            self._next_slot = self._clock() + self._period
        finally:
            self._leave(turn)

    def _leave(self, turn: asyncio.Future[None]) -> None:
        if self._line[0] is not turn:
            self._line.remove(turn)  # cancelled while others were ahead: no slot taken
            return
        self._line.popleft()
        # Hand the head on. A caller cancelled in line has a done future but is still in the
        # line until its own cleanup runs; that cleanup hands the head on in turn.
        if self._line and not self._line[0].done():
            self._line[0].set_result(None)


class AdaptiveLimiter:
    """Slows every request down when 429s are sustained, then speeds back up (AIMD).

    An isolated 429 does not touch the rate: the request's own retry waits its Retry-After. The
    rate is cut only when, over the last ``window_s`` seconds, more than ``cut_share`` of the
    replies were 429s and at least ``min_429s`` of them: the gateway is refusing a real share
    of what is sent, so sending less is what helps. A 3% sprinkle of 429s never brakes.

    A cut sets the rate to ``decrease`` times the successes per second over the window: what
    the gateway actually let through. With fewer than ``min_evidence`` successes there is
    nothing to estimate from (a storm of 429s at start-up, say), so the brake stays off and
    each request's retry does the waiting. 429s for requests sent before a cut are the same
    burst and do not count again; after a cut, a new one needs new evidence. Successes raise
    the rate additively, a tenth of the ceiling per second whatever the rate, so a gateway
    limiting at R sees a shallow sawtooth around R; the rate never drops below a tenth of the
    first estimate, and at the ceiling (``recover_factor`` times the first estimate) the limit
    is lifted.
    """

    __slots__ = (
        "_bucket_s",
        "_ceiling",
        "_clock",
        "_cut_share",
        "_decrease",
        "_first_seen",
        "_floor",
        "_last_cut",
        "_limited_counts",
        "_min_429s",
        "_min_evidence",
        "_pacer",
        "_ramp",
        "_recover_factor",
        "_sleep",
        "_success_counts",
        "_tick",
        "_window_s",
    )

    def __init__(
        self,
        *,
        decrease: float = 0.8,
        recover_factor: float = 2.0,
        min_evidence: int = 5,
        cut_share: float = 0.1,
        min_429s: int = 5,
        window_s: float = _WINDOW_S,
        clock: Clock = loop_clock,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._decrease = decrease
        self._recover_factor = recover_factor
        self._min_evidence = min_evidence
        self._cut_share = cut_share
        self._min_429s = min_429s
        self._window_s = window_s
        self._bucket_s = window_s / _BUCKETS
        self._clock = clock
        self._sleep = sleep
        self._pacer: Pacer | None = None
        self._ceiling = self._ramp = self._floor = 1.0
        self._last_cut = -float("inf")
        self._first_seen: float | None = None
        self._success_counts = [0] * _BUCKETS
        self._limited_counts = [0] * _BUCKETS
        self._tick = 0

    @property
    def rate(self) -> float | None:
        """Requests per second allowed now; None when no limit is in force."""
        return self._pacer.rate if self._pacer is not None else None

    def free_in(self) -> float:
        """Seconds until a request asking now would have its send slot (0.0: at once)."""
        return self._pacer.free_in() if self._pacer is not None else 0.0

    def free_now(self) -> float | None:
        """The send time, when no limit is in force (a call goes at once); else None, and
        :meth:`acquire` is to be awaited. The hot path: no coroutine while the brake is off."""
        return self._clock() if self._pacer is None else None

    async def acquire(self) -> float:
        """Wait for a send slot (at once while no limit is in force); returns the send time."""
        if self._pacer is not None:
            await self._pacer.wait()
        return self._clock()

    def rate_limited(self, sent_at: float) -> None:
        """The request sent at ``sent_at`` drew a 429: cut the rate if 429s are sustained."""
        if sent_at <= self._last_cut:
            return  # sent at the old rate: the cut already answered it
        now = self._clock()
        self._advance(now)
        self._limited_counts[self._tick % _BUCKETS] += 1
        limited, succeeded = sum(self._limited_counts), sum(self._success_counts)
        if limited < self._min_429s or limited <= self._cut_share * (limited + succeeded):
            return  # sparse: each such request's retry honours its Retry-After
        if succeeded < self._min_evidence:
            return
        assert self._first_seen is not None  # set by _advance
        # Successes per second over the window, or over what there is of it yet, but never
        # over less than a second: a gateway's token bucket lets a short burst through at any
        # speed, and a rate read from that burst would be far above what it sustains.
        span = min(self._window_s, max(now - self._first_seen, 1.0))
        estimate = succeeded / span
        self._last_cut = now
        self._limited_counts = [0] * _BUCKETS  # the next cut needs fresh evidence
        if self._pacer is None:
            self._ceiling = estimate * self._recover_factor
            self._ramp = self._ceiling / 10
            self._floor = max(1.0, estimate / 10)
            self._pacer = Pacer(estimate * self._decrease, clock=self._clock, sleep=self._sleep)
        else:
            current = self._pacer.rate
            self._pacer.rate = max(self._floor, min(current, estimate) * self._decrease)

    def succeeded(self) -> float | None:
        """A request went through: raise the rate a little, or lift the limit.

        Returns the rate the limit had when this success lifted it; else None.
        """
        now = self._clock()
        if self._first_seen is None or int(now / self._bucket_s) != self._tick:
            self._advance(now)  # (most successes land in the bucket of the one before)
        self._success_counts[self._tick % _BUCKETS] += 1
        pacer = self._pacer
        if pacer is None:
            return None
        # About ``rate`` successes arrive per second, so each adds ramp/rate: +ramp per second.
        rate = pacer.rate
        raised = rate + self._ramp / rate
        if raised >= self._ceiling:
            self._pacer = None  # callers already in its line still get their slots from it
            return rate
        pacer.rate = raised
        return None

    def _advance(self, now: float) -> None:
        """Move the bucket rings to ``now``, emptying the buckets that fell out of the window."""
        if self._first_seen is None:
            self._first_seen = now
        tick = int(now / self._bucket_s)
        for step in range(1, min(tick - self._tick, _BUCKETS) + 1):
            slot = (self._tick + step) % _BUCKETS
            self._success_counts[slot] = 0
            self._limited_counts[slot] = 0
        self._tick = max(tick, self._tick)
