"""KeyRegistry: the fleet's outstanding job keys, their owners and when each is next due.

Per shard (keys are split by CRC-32 of the job key), a sorted set maps job key -> due time
(Redis server time, ms) and a hash maps job key -> owning member, under the shard's hash tag.
Members register their keys with a delay; the shard's leader takes the due keys of every
member in one fenced script (the lease key must still hold the leader's ``"<member>|<token>"``)
that also pushes each taken key ``hold`` seconds into the future, so a key in flight is not
taken twice and comes back by itself if the leader dies mid-poll. After the poll the leader
reschedules unfinished keys (fenced too; ``XX`` so a key finished meanwhile is not revived)
and removes finished ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._errors import LeaseLostError
from ._keys import shard_of

if TYPE_CHECKING:
    from ._fleet import RedisFleet

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: due, owners. ARGV: member, only_new (0/1), key1, delay1_ms, key2, delay2_ms, ...
# With only_new, keys already registered (or taken into a poll) are left as they are.
_REGISTER = (
    _NOW_MS
    + """
local n = 0
for i = 3, #ARGV, 2 do
  if ARGV[2] == '0' or not redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[i + 1]), ARGV[i])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[1])
    n = n + 1
  end
end
return n
"""
)

# KEYS: due, owners. ARGV: key1, key2, ...
_REMOVE = """
for i = 1, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
return #ARGV
"""

# KEYS: lease, due, owners. ARGV: fence, limit, hold_ms, fill_ms, call_size.
# Takes the due keys (at most limit), then tops the last call up to call_size with keys due
# within fill_ms (fuller calls, not more of them: the local poller's rule, fleet-wide).
# Reply: {0} when the fence is stale, else {1, next_due_in_ms or -1, full_due_in_ms or -1,
# key1, owner1, ...}: full_due_in is when call_size keys will be due (-1: fewer registered).
_TAKE_DUE = (
    _NOW_MS
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0} end
local limit, size = tonumber(ARGV[2]), tonumber(ARGV[5])
local keys = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
local room = (size - #keys % size) % size
if #keys > 0 and room > 0 and tonumber(ARGV[4]) > 0 then
  local more = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, now + tonumber(ARGV[4]),
                          'LIMIT', 0, room)
  for _, key in ipairs(more) do keys[#keys + 1] = key end
end
local reply = {1, -1, -1}
for _, key in ipairs(keys) do
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), key)
  reply[#reply + 1] = key
  reply[#reply + 1] = redis.call('HGET', KEYS[3], key) or ''
end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #first > 0 then reply[2] = math.max(0, tonumber(first[2]) - now) end
local full = redis.call('ZRANGE', KEYS[2], size - 1, size - 1, 'WITHSCORES')
if #full > 0 then reply[3] = math.max(0, tonumber(full[2]) - now) end
return reply
"""
)

# KEYS: lease, due. ARGV: fence, key1, delay1_ms, ... Reply: -1 stale fence, else how many.
_RESCHEDULE = (
    _NOW_MS
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local n = 0
for i = 2, #ARGV, 2 do
  n = n + redis.call('ZADD', KEYS[2], 'XX', 'CH', now + tonumber(ARGV[i + 1]), ARGV[i])
end
return n
"""
)

# KEYS: due. Reply: ms until the earliest due key (0 if overdue), -1 when empty.
_NEXT_DUE = (
    _NOW_MS
    + """
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then return -1 end
return math.max(0, tonumber(first[2]) - now)
"""
)


@dataclass(frozen=True, slots=True)
class DueKey:
    """A key the leader should poll now.

    Attributes:
        job_key: the gateway's key.
        owner: the member whose job it is (its reports go to that member's stream).
    """

    job_key: str
    owner: str


@dataclass(frozen=True, slots=True)
class DueBatch:
    """What :meth:`KeyRegistry.take_due` took.

    Attributes:
        keys: the due keys, at most ``limit``.
        next_due_in: seconds until the next key of the shard is due (None: the shard is empty).
        full_due_in: seconds until ``call_size`` keys of the shard are due, enough for a full
            call (None: fewer are registered).
    """

    keys: list[DueKey]
    next_due_in: float | None
    full_due_in: float | None = None


class KeyRegistry:
    """The fleet's outstanding keys by shard (see the module docstring)."""

    def __init__(self, fleet: RedisFleet) -> None:
        self._fleet = fleet
        self._shards = fleet.config.shards
        self._register = fleet.script(_REGISTER)
        self._remove = fleet.script(_REMOVE)
        self._take = fleet.script(_TAKE_DUE)
        self._reschedule = fleet.script(_RESCHEDULE)
        self._next_due = fleet.script(_NEXT_DUE)

    def shard_of(self, job_key: str) -> int:
        """The shard of ``job_key``."""
        return shard_of(job_key, self._shards)

    def _by_shard(self, keys: Iterable[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = defaultdict(list)
        for key in keys:
            groups[self.shard_of(key)].append(key)
        return groups

    async def register(
        self, member: str, due_in: Mapping[str, float], *, only_new: bool = False
    ) -> None:
        """Register ``member``'s keys, each due ``due_in[key]`` seconds from now.

        Registering a key again moves its due time and makes ``member`` its owner (a member
        that claimed a dead member's job does this). With ``only_new``, keys already in the
        registry are left alone (a member making sure none of its keys was lost).
        """
        keys = self._fleet.keys
        for shard, group in self._by_shard(due_in).items():
            args: list[str | int] = [member, int(only_new)]
            for key in group:
                args += [key, max(0, round(due_in[key] * 1000))]
            await self._register((keys.due(shard), keys.owners(shard)), args)

    async def remove(self, job_keys: Iterable[str]) -> None:
        """Forget keys (finished, or cancelled by their owner). Idempotent."""
        keys = self._fleet.keys
        for shard, group in self._by_shard(job_keys).items():
            await self._remove((keys.due(shard), keys.owners(shard)), group)

    async def take_due(
        self,
        shard: int,
        fence: str,
        *,
        limit: int,
        hold: float,
        fill_horizon: float = 0.0,
        call_size: int = 50,
    ) -> DueBatch:
        """As the shard's leader, take up to ``limit`` due keys of every member.

        Each taken key is pushed ``hold`` seconds ahead (a poll in flight); reschedule or
        remove it when the poll is done. When some keys are due, the last call of
        ``call_size`` keys is topped up with keys due within ``fill_horizon`` seconds.

        Raises:
            LeaseLostError: ``fence`` is not the shard's lease any more (nothing was taken).
        """
        keys = self._fleet.keys
        reply = await self._take(
            (keys.lease(shard), keys.due(shard), keys.owners(shard)),
            (fence, limit, max(1, round(hold * 1000)), round(fill_horizon * 1000), call_size),
        )
        if int(reply[0]) == 0:
            raise LeaseLostError(f"shard {shard}: fence {fence!r} is stale", shard=shard)
        next_due, full_due = int(reply[1]), int(reply[2])
        flat = reply[3:]
        taken = [DueKey(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        return DueBatch(
            taken,
            None if next_due < 0 else next_due / 1000,
            None if full_due < 0 else full_due / 1000,
        )

    async def reschedule(self, shard: int, fence: str, due_in: Mapping[str, float]) -> int:
        """As the shard's leader, set the next due time of keys still registered.

        Returns:
            How many keys were moved (keys removed meanwhile are not revived).

        Raises:
            LeaseLostError: ``fence`` is not the shard's lease any more (nothing was changed).
        """
        keys = self._fleet.keys
        args: list[str | int] = [fence]
        for key, delay in due_in.items():
            args += [key, max(0, round(delay * 1000))]
        moved = int(await self._reschedule((keys.lease(shard), keys.due(shard)), args))
        if moved < 0:
            raise LeaseLostError(f"shard {shard}: fence {fence!r} is stale", shard=shard)
        return moved

    async def next_due_in(self, shard: int) -> float | None:
        """Seconds until the shard's earliest key is due (0.0 if overdue; None when empty)."""
        ms = int(await self._next_due((self._fleet.keys.due(shard),), ()))
        return None if ms < 0 else ms / 1000

    async def owners(self, shard: int) -> dict[str, str]:
        """Every registered key of ``shard`` -> its owner."""
        key = self._fleet.keys.owners(shard)
        owners: dict[Any, Any] = await self._fleet.call(lambda r: r.hgetall(key))
        return {str(k): str(v) for k, v in owners.items()}
