"""FleetLimiter: one submit rate for every member of a fleet (GCRA in one Lua script).

GCRA's theoretical arrival time (TAT) lives in Redis, in Redis server time, so members whose
clocks differ agree. One script call per acquisition, atomically: while the fleet is paused (a
429 with Retry-After seen by any member) it answers "wait for the rest of the pause";
otherwise it reserves the next slot and answers "your slot is in ``w``". Nobody spins, and
nobody retries while the fleet is not paused.

Why slots are ``(1 + WINDOW_MARGIN_S) / rate`` apart, why the first slot after a lull is
followed by the next a margin later still, why the Redis round trips come before the slot and
a caller late for its slot takes a new one (``_LATE``, ``_LATE_RETAKES``), and why a reply read
slowly counts as lateness (``Slot.doubt``): docs/guides/fleet.md, "The submit cap holds in
every second".

Fairness: Redis serves reservations in arrival order, and each member holds at most one
reservation further than 50 ms ahead (its callers queue on a local FIFO lock held until the
slot is that close), so saturated members take turns.
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
