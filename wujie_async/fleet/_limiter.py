"""FleetLimiter: one submit rate for every member of a fleet (GCRA in one Lua script).

The limiter keeps GCRA's *theoretical arrival time* (TAT) in Redis, in Redis server time, so
members on machines with different clocks agree. One script call per acquisition, atomically:

- while the fleet is paused (a 429 with Retry-After seen by any member) it answers "wait for
  the rest of the pause", and the caller sleeps that long and asks again;
- otherwise it reserves the next slot (TAT += the period below) and answers "your slot is in
  ``w``": the caller sleeps ``w`` and goes. Nobody spins and nobody retries while the fleet
  is not paused.

Slots are handed out ``(1 + WINDOW_MARGIN_S) / rate`` apart (``WINDOW_MARGIN_S`` = 50 ms), not
``1 / rate``: slots exactly ``1/rate`` apart put ``rate + 1`` of them in a closed one-second
window, and uneven delays between a slot and its arrival at the gateway (signing, a loop
waking late, another process on the CPU) do the rest. With
the margin, ``rate + 1`` slots span more than a second plus 50 ms, so no one-second window at
the gateway holds more than ``rate`` submits (an integer rate; ``ceil(rate)`` otherwise) as
long as those delays differ by less than 50 ms. The throughput cost: the fleet sustains
``rate / 1.05``, 4.8% below the rate asked for.

The first slot after an idle limiter (no slot reserved ahead: the fleet's start, a lull, a
Redis that restarted empty) is followed by the next one a margin later still: its submit is
the one most likely to leave late (a new connection, cold code and caches), and a late first
submit is what would bunch with the slots after it.

Fairness: Redis serves reservations in arrival order, and each member holds at most one
reservation further than 50 ms ahead (its callers queue on a local FIFO lock held until the
slot is that close), so saturated members take turns.

What lies between a slot and its send is kept short, since its jitter eats the 50 ms margin.
Redis round trips come before the slot: a reservation more than 50 ms ahead checks the pause
50 ms before its slot (so a pause reaches every member within 50 ms), and then the caller's
``ready`` runs (the journal's intent, one more round trip, longer while Redis is away). A
caller that reaches its slot more than 25 ms late (a slow intent, a stall) takes a new slot
rather than go late, up to three times for one acquisition (a loop late at every wake is
starved, and must still send). A slot given up either way is simply unused.

A slot's time on the member's clock is read when Redis's reply is: a reply read late (the
member's loop was busy as it came in) would put the slot later than Redis holds it, and the
send with the next slot's. So a reply that came back slower than this member's quickest
recent one counts that much as lateness: the slot may have been that much earlier.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from .._errors import InvalidRequestError
from .._ratelimit import READY_AHEAD_S, WINDOW_MARGIN_S, Ready
from ._link import RedisLink, Script

# KEYS: tat, pause. ARGV: period_us, margin_us. Reply: {1, wait_us until the slot} or
# {0, pause left_us}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then return {0, pause * 1000} end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local next_tat = tat + tonumber(ARGV[1])
if tat < now then
  tat = now
  next_tat = now + tonumber(ARGV[1]) + tonumber(ARGV[2])
end
redis.call('SET', KEYS[1], string.format('%d', next_tat),
           'PX', math.floor((next_tat - now) / 1000) + 1000)
return {1, tat - now}
"""

# KEYS: pause. ARGV: ms. A pause is only ever lengthened. Reply: the pause now in force (ms).
_PAUSE = """
local ms = tonumber(ARGV[1])
local left = redis.call('PTTL', KEYS[1])
if left < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
  return ms
end
return left
"""

_HORIZON = READY_AHEAD_S  # a reservation further ahead checks for a pause, then ready runs
_LATE = WINDOW_MARGIN_S / 2  # a caller this late for its slot takes a new one...
_LATE_RETAKES = 3  # ...this many times at most for one acquisition
_RECENT_REPLIES = 16  # a reply's delay is judged against the quickest of this many


class Slot(NamedTuple):
    """A reserved slot, on the loop's clock."""

    at: float
    """When the slot comes, as read on Redis's reply: never before the slot."""
    doubt: float
    """How much earlier it may really be: the reply's delay beyond the quickest recent one."""


class FleetLimiter:
    """Paces acquisitions across the whole fleet at ``rate`` per second.

    Every member should use the same rate; each call carries the caller's rate.

    Args:
        link: the fleet's Redis.
        rate: acquisitions per second, fleet-wide.
    """

    def __init__(self, link: RedisLink, rate: float) -> None:
        if not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
            raise InvalidRequestError([("rate", "must be a positive finite number per second")])
        self._link = link
        self._rate = float(rate)
        self._acquire = Script(link, _ACQUIRE)
        self._pause = Script(link, _PAUSE)
        self._turn = asyncio.Lock()  # FIFO: one caller of this member at Redis at a time
        self._replies: deque[float] = deque(maxlen=_RECENT_REPLIES)  # round trips, seconds
        self.acquired = 0  # how many slots this member has taken (for stats)

    @property
    def rate(self) -> float:
        """Acquisitions per second, fleet-wide."""
        return self._rate

    async def acquire(
        self, ready: Ready | None = None, *, reserve: Callable[[], Awaitable[Slot]] | None = None
    ) -> None:
        """Return when this caller's fleet-wide slot has come.

        Args:
            ready: awaited once, before the slot (see the module docstring): what must be done
                before the send, so that its delay is not between the slot and the send.
            reserve: how to take a slot (default :meth:`reserve`; a member retries it while
                Redis is away).

        Raises:
            FleetUnavailableError: Redis is unreachable or missed its deadline.
        """
        loop = asyncio.get_running_loop()
        retakes = 0
        while True:
            slot = await (reserve or self.reserve)()
            if ready is not None:
                await ready()
                ready = None
            await asyncio.sleep(slot.at - loop.time())
            if loop.time() - slot.at + slot.doubt <= _LATE or retakes == _LATE_RETAKES:
                break
            retakes += 1  # late (a slow ready, a stall): a fresh slot, not a bunched send
        self.acquired += 1

    async def reserve(self) -> Slot:
        """Reserve this caller's next slot; return it once it is at most 50 ms away (a pause
        met on the way is waited out, and a new slot taken).

        One Redis call; a second when the slot is more than 50 ms ahead (the pause check).

        Raises:
            FleetUnavailableError: Redis is unreachable or missed its deadline.
        """
        period = (1.0 + WINDOW_MARGIN_S) / self._rate  # see the module docstring
        keys = (self._link.keys.rate_tat, self._link.keys.rate_pause)
        loop = asyncio.get_running_loop()
        async with self._turn:
            while True:
                sent = loop.time()
                granted, wait_us = await self._acquire(
                    keys, (round(period * 1e6), round(WINDOW_MARGIN_S * 1e6))
                )
                read = loop.time()
                self._replies.append(read - sent)
                doubt = read - sent - min(self._replies)
                wait = int(wait_us) / 1e6
                if not granted:  # paused; a little jitter so members do not return as a herd
                    await asyncio.sleep(wait + random.uniform(0, min(period, 0.01)))
                    continue
                # Still holding the turn: one reservation per member at a time (fairness).
                slot = read + wait
                if wait > _HORIZON:
                    await asyncio.sleep(wait - _HORIZON)
                    if await self.paused_for() > 0:
                        continue  # the next reservation waits for the pause
                return Slot(slot, doubt)

    async def pause(self, seconds: float) -> float:
        """Stop every member's acquisitions for ``seconds`` (e.g. a 429's Retry-After).

        A pause is only lengthened, never shortened, by another call.

        Returns:
            The pause now in force, in seconds.
        """
        if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
            raise InvalidRequestError([("seconds", "must be a finite number >= 0")])
        ms = math.ceil(seconds * 1000)
        if ms == 0:
            return 0.0
        left = await self._pause((self._link.keys.rate_pause,), (ms,))
        return int(left) / 1000

    async def paused_for(self) -> float:
        """Seconds left of the fleet-wide pause (0.0 when none)."""
        key = self._link.keys.rate_pause
        left = await self._link.call(lambda r: r.pttl(key))
        return max(0, int(left)) / 1000
