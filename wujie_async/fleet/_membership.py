"""Membership: who is in the fleet, and who has died.

A sorted set maps member id -> last heartbeat (Redis time: machines' clocks do not matter). A
member whose last heartbeat is older than ``member_timeout`` is dead: another member's
``resume()`` may claim its jobs (``RedisJournal.claim_dead``, which also takes it off the set).
Death is a verdict on silence, not a sentence: a heartbeat always puts the member back, and
says whether it had been judged dead or forgotten (a claim, or Redis lost its data), so the
member can announce again what the fleet may have lost. Leaving marks the member dead at once.

Each heartbeat also carries the leader calls this member made since the last one into the
fleet's counters and reads them back, with the number of live members (one script, one round
trip): ``client.stats.fleet``. The counters are for show: another process may have garbled
them, so they are read with ``pcall`` and checked, and never fail a heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from ._keys import FleetKeys
from ._redis import RedisLink

# KEYS: members, stats. ARGV: id, timeout_ms, calls, keys.
# Reply: {standing, live members, batch_calls, keys_polled} (a figure: false when unreadable).
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local timeout = tonumber(ARGV[2])
local last = redis.call('ZSCORE', KEYS[1], ARGV[1])
local standing = 1
if not last then standing = 0 elseif now - tonumber(last) > timeout then standing = -1 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
if tonumber(ARGV[3]) > 0 then
  redis.pcall('HINCRBY', KEYS[2], 'batch_calls', ARGV[3])
  redis.pcall('HINCRBY', KEYS[2], 'keys_polled', ARGV[4])
end
local figures = redis.pcall('HMGET', KEYS[2], 'batch_calls', 'keys_polled')
if type(figures) ~= 'table' or figures.err then figures = {false, false} end
local live = redis.call('ZCOUNT', KEYS[1], now - timeout, '+inf')
return {standing, live, figures[1], figures[2]}
"""

# KEYS: members. ARGV: id. Marks the member dead now (its last heartbeat becomes 0).
_LEAVE = "return redis.call('ZADD', KEYS[1], 'XX', 0, ARGV[1])"


class Standing(IntEnum):
    """What the fleet thought of a member when its heartbeat came."""

    FORGOTTEN = 0  # not in the member list: its jobs were claimed, or Redis lost its data
    ALIVE = 1  # in time
    JUDGED_DEAD = -1  # its last heartbeat was older than member_timeout


@dataclass(frozen=True, slots=True)
class Beat:
    """What one heartbeat learned.

    Attributes:
        standing: what the fleet thought of this member before this heartbeat.
        live: live members, this one included.
        batch_calls: the fleet's leaders' batch calls (0 when unreadable).
        keys_polled: keys those calls asked about (0 when unreadable).
    """

    standing: Standing
    live: int
    batch_calls: int
    keys_polled: int


class Membership:
    """One member of the fleet: its heartbeat and its leaving."""

    def __init__(
        self, redis: RedisLink, keys: FleetKeys, member_id: str, member_timeout: float
    ) -> None:
        self.member_id = member_id
        self._redis = redis
        self._keys = (keys.members, keys.stats)
        self._timeout_ms = round(member_timeout * 1000)
        self._beat = redis.script(_BEAT)
        self._leave = redis.script(_LEAVE)

    def __repr__(self) -> str:
        return f"Membership({self.member_id!r})"

    async def beat(self, calls: int = 0, keys: int = 0) -> Beat:
        """Heartbeat (joining, or coming back, if need be) and add ``calls`` and ``keys`` (this
        member's leader calls since the last beat) to the fleet's figures."""
        args = (self.member_id, self._timeout_ms, calls, keys)
        standing, live, batch_calls, keys_polled = await self._beat(self._keys, args)
        return Beat(
            Standing(int(standing)), int(live), _counter(batch_calls), _counter(keys_polled)
        )

    async def everyone(self) -> list[str]:
        """Every member in the list, alive or not yet claimed."""
        members = self._keys[0]
        found = await self._redis.call(lambda r: r.zrange(members, 0, -1))
        return [str(member) for member in found]

    async def leave(self) -> None:
        """Mark this member dead now: its unfinished jobs can be claimed at once."""
        await self._leave(self._keys[:1], (self.member_id,))


def _counter(raw: object) -> int:
    """A counter read back from Redis: a non-negative integer, else 0."""
    text = raw if isinstance(raw, str) else ""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 20 else 0
