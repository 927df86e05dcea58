"""FleetLimiter: one submit rate for every member of a fleet (GCRA in one Lua script).

The limiter keeps GCRA's *theoretical arrival time* (TAT) in Redis, in Redis server time, so
members on machines with different clocks agree. One script call per attempt, atomically:

- while the fleet is paused (a 429 with Retry-After seen by any member), it answers "wait for
  the rest of the pause";
- otherwise, when the next free slot is at most ``horizon`` ahead, it reserves that slot
  (TAT += 1/rate) and answers "granted, your slot is in ``w``": the caller sleeps ``w`` and goes;
- otherwise it answers "not granted, a slot becomes reservable in ``w``": the caller sleeps
  ``w`` and asks again. Nobody spins.

Slots are handed out one period apart, so no window of one second holds more than ``rate + 1``
slots. The short reservation horizon bounds how late a pause can take effect (slots already
reserved still go) and keeps members fair: every member's waiting caller asks again at the
moment a slot becomes reservable, and Redis serves them in arrival order. Inside one member,
callers queue on a local FIFO lock, so each member has one caller at a time at Redis.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import TYPE_CHECKING

from .._errors import InvalidRequestError

if TYPE_CHECKING:
    from ._fleet import RedisFleet

# KEYS: tat, pause. ARGV: period_us, horizon_us. Reply: {granted 0|1, wait_us}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then return {0, pause * 1000} end
local period = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local ahead = tat - now
if ahead > horizon then return {0, ahead - horizon} end
local next_tat = tat + period
redis.call('SET', KEYS[1], string.format('%d', next_tat),
           'PX', math.floor((next_tat - now) / 1000) + 1000)
return {1, ahead}
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

_MIN_HORIZON = 0.05  # seconds of slots a caller may reserve ahead (at least one period)


class FleetLimiter:
    """Paces acquisitions across the whole fleet at ``rate`` per second.

    Every member should use the same rate; each call carries the caller's rate.

    Args:
        fleet: the started fleet.
        rate: acquisitions per second, fleet-wide.
    """

    def __init__(self, fleet: RedisFleet, rate: float) -> None:
        if not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
            raise InvalidRequestError([("rate", "must be a positive finite number per second")])
        self._fleet = fleet
        self._rate = float(rate)
        self._acquire = fleet.script(_ACQUIRE)
        self._pause = fleet.script(_PAUSE)
        self._turn = asyncio.Lock()  # FIFO: one caller of this member at Redis at a time
        self.acquired = 0  # how many slots this member has taken (for stats)

    @property
    def rate(self) -> float:
        """Acquisitions per second, fleet-wide."""
        return self._rate

    async def acquire(self) -> None:
        """Return when this caller's fleet-wide slot has come (one Redis call per attempt).

        Raises:
            FleetUnavailableError: Redis is unreachable or missed its deadline.
        """
        period = 1.0 / self._rate
        horizon = max(_MIN_HORIZON, period)
        args = (round(period * 1e6), round(horizon * 1e6))
        keys = (self._fleet.keys.rate_tat, self._fleet.keys.rate_pause)
        async with self._turn:
            while True:
                granted, wait_us = await self._acquire(keys, args)
                wait = int(wait_us) / 1e6
                if granted:
                    break
                # A little jitter so the members' waiting callers do not arrive as one herd.
                await asyncio.sleep(wait + random.uniform(0, min(period, 0.01)))
        self.acquired += 1
        if wait > 0:
            await asyncio.sleep(wait)

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
        left = await self._pause((self._fleet.keys.rate_pause,), (ms,))
        return int(left) / 1000

    async def paused_for(self) -> float:
        """Seconds left of the fleet-wide pause (0.0 when none)."""
        key = self._fleet.keys.rate_pause
        left = await self._fleet.call(lambda r: r.pttl(key))
        return max(0, int(left)) / 1000
