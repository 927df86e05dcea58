"""KeyRegistry: the fleet's outstanding job keys, whose they are, and what the leader needs to
know to poll them. Members write it; a shard's leader reads it.

Per shard (keys are split by CRC-32 of the job key), under the shard's hash tag:

- a hash, job key -> record: JSON ``{"m": model, "f": first delay or null, "a": submit time,
  "d": deadline (Redis time, ms), "o": [owners]}``. A key has several owners when more than one
  member follows it (a member that claimed a dead member's job, and that member alive after
  all): the leader reports to each.
- a log (a stream): one entry per change, naming the key. A new leader loads the hash and the
  log's last id in one atomic script, then follows the log from there (a cursor: no change is
  missed, none is lost to a wake-up) and reads each changed key's record again. The log keeps
  the last ``max(60 s, 3 x lease_seconds)``: a leader that read nothing for longer has lost its
  lease, and loads afresh when it leads again.

A leader that sees a key end removes its record, unless the record changed meanwhile (another
member registered it): ``drop`` compares first.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from ._keys import FleetKeys, shard_of
from ._redis import RedisLink, stream_entries

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function changed(key)
  redis.call('XADD', KEYS[2], 'MINID', '~', now - tonumber(ARGV[1]), '*', 'k', key)
end
local function record(key)
  local ok, found = pcall(cjson.decode, redis.call('HGET', KEYS[1], key) or '')
  if ok and type(found) == 'table' and type(found.o) == 'table' and type(found.a) == 'number'
  then return found end
end
"""

# KEYS: hash, log. ARGV: log_ms, member, then per key: key, model, first_delay, age_ms,
# deadline_in_ms ('' = none). A registered key gains an owner and keeps its record; a new (or
# unreadable) one gets a new record.
_REGISTER = (
    _NOW
    + """
for i = 3, #ARGV, 5 do
  local key, found = ARGV[i], record(ARGV[i])
  if found then
    local mine = false
    for _, owner in ipairs(found.o) do mine = mine or owner == ARGV[2] end
    if not mine then table.insert(found.o, ARGV[2]) end
    found.d = math.max(tonumber(found.d) or 0, now + tonumber(ARGV[i + 4]))
  else
    found = {m = ARGV[i + 1], f = tonumber(ARGV[i + 2]) or cjson.null,
             a = now - tonumber(ARGV[i + 3]), d = now + tonumber(ARGV[i + 4]), o = {ARGV[2]}}
  end
  redis.call('HSET', KEYS[1], key, cjson.encode(found))
  changed(key)
end
return 1
"""
)

# KEYS: hash, log. ARGV: log_ms, member, key1, key2, ... This member no longer follows them.
_UNREGISTER = (
    _NOW
    + """
for i = 3, #ARGV do
  local found = record(ARGV[i])
  if found then
    local kept = {}
    for _, owner in ipairs(found.o) do
      if owner ~= ARGV[2] then table.insert(kept, owner) end
    end
    if #kept == 0 then redis.call('HDEL', KEYS[1], ARGV[i]) elseif #kept < #found.o then
      found.o = kept
      redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(found))
    end
    if #kept < #found.o then changed(ARGV[i]) end
  end
end
return 1
"""
)

# KEYS: hash, log. Reply: {now_ms, last log id, key1, record1, ...}.
_LOAD = """
local t = redis.call('TIME')
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local reply = {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), '0-0'}
if #last > 0 then reply[2] = last[1][1] end
for _, item in ipairs(redis.call('HGETALL', KEYS[1])) do reply[#reply + 1] = item end
return reply
"""

# KEYS: hash. ARGV: key1, key2, ... Reply: {now_ms, record1 or false, ...}.
_READ = """
local t = redis.call('TIME')
local reply = {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
for i = 1, #ARGV do reply[#reply + 1] = redis.call('HGET', KEYS[1], ARGV[i]) end
return reply
"""

# KEYS: hash. ARGV: key1, record1, ... Deletes each record still as it was read.
_DROP = """
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 1
"""

_MODEL_CHARS = 100
_MAX_OWNERS = 64


@dataclass(frozen=True, slots=True)
class Registration:
    """A key a member follows, as it tells the fleet.

    Attributes:
        key: the job key.
        model: the request's model, when known (the schedule learns per model).
        first_delay: seconds from now to the first ask (None: the leader's policy, from the
            submit).
        age: seconds since the job was submitted (or attached) here.
        deadline_in: seconds until the job's deadline.
    """

    key: str
    model: str | None
    first_delay: float | None
    age: float
    deadline_in: float


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A registered key, as a leader reads it (``age`` and ``deadline_in`` as of the read).

    Attributes:
        key: the job key.
        raw: the record as stored (to remove it only if it did not change).
        model: the model, when known.
        first_delay: seconds from the submit to the first ask (None: the leader's policy).
        age: seconds since the submit.
        deadline_in: seconds until the latest owner's deadline.
        owners: the members that follow it.
    """

    key: str
    raw: str
    model: str | None
    first_delay: float | None
    age: float
    deadline_in: float
    owners: tuple[str, ...]


class KeyRegistry:
    """The fleet's outstanding keys by shard (see the module docstring)."""

    def __init__(
        self, redis: RedisLink, keys: FleetKeys, *, shards: int, lease_seconds: float
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._shards = shards
        self._log_ms = round(max(60.0, 3 * lease_seconds) * 1000)
        self._register = redis.script(_REGISTER)
        self._unregister = redis.script(_UNREGISTER)
        self._load = redis.script(_LOAD)
        self._read = redis.script(_READ)
        self._drop = redis.script(_DROP)

    def shard_of(self, job_key: str) -> int:
        """The shard of ``job_key``."""
        return shard_of(job_key, self._shards)

    def _where(self, shard: int) -> tuple[str, str]:
        return self._keys.registry(shard), self._keys.registry_log(shard)

    async def register(self, member: str, registrations: Iterable[Registration]) -> None:
        """Make ``member`` an owner of each key (registering the ones not registered yet)."""
        by_shard: dict[int, list[str | float]] = defaultdict(list)
        for r in registrations:
            first = "" if r.first_delay is None else max(0.0, r.first_delay)
            by_shard[self.shard_of(r.key)] += [
                r.key, r.model or "", first, round(max(0.0, r.age) * 1000),
                round(max(0.0, r.deadline_in) * 1000),
            ]  # fmt: skip
        for shard, args in by_shard.items():
            await self._register(self._where(shard), (self._log_ms, member, *args))

    async def unregister(self, member: str, job_keys: Iterable[str]) -> None:
        """``member`` no longer follows these keys (a key nobody follows is removed)."""
        by_shard: dict[int, list[str]] = defaultdict(list)
        for key in job_keys:
            by_shard[self.shard_of(key)].append(key)
        for shard, keys in by_shard.items():
            await self._unregister(self._where(shard), (self._log_ms, member, *keys))

    async def load(self, shard: int) -> tuple[str, list[KeyRecord]]:
        """Every record of ``shard`` and the log's cursor, at one instant."""
        reply = await self._load(self._where(shard), ())
        now, cursor, flat = int(reply[0]), str(reply[1]), reply[2:]
        found = (_record(flat[i], flat[i + 1], now) for i in range(0, len(flat) - 1, 2))
        return cursor, [record for record in found if record is not None]

    async def changes(
        self, shard: int, cursor: str, wait: float
    ) -> tuple[str, dict[str, KeyRecord | None]]:
        """The keys changed after ``cursor`` (waiting up to ``wait`` s for one), each with its
        record now (None: no longer registered, or unreadable), and the cursor after them."""
        log = self._keys.registry_log(shard)
        reply: Any = await self._redis.call(
            lambda r: r.xread({log: cursor}, count=1000, block=max(1, round(wait * 1000))),
            extra_wait=wait,
        )
        keys: list[str] = []
        for entry_id, fields in stream_entries(reply):
            cursor = entry_id
            key = fields.get("k") if isinstance(fields, dict) else None
            if isinstance(key, str) and key not in keys:
                keys.append(key)
        if not keys:
            return cursor, {}
        read = await self._read(self._where(shard)[:1], keys)
        now = int(read[0])
        return cursor, {
            key: _record(key, raw, now) for key, raw in zip(keys, read[1:], strict=True)
        }

    async def drop(self, shard: int, records: Sequence[KeyRecord]) -> None:
        """Remove these records, each only if it is still as it was read."""
        args = [item for record in records for item in (record.key, record.raw)]
        if args:
            await self._drop(self._where(shard)[:1], args)


def _record(key: Any, raw: Any, now_ms: int) -> KeyRecord | None:
    """A record read from Redis, checked (another process's writes): None when unusable."""
    if not isinstance(key, str) or not isinstance(raw, str):
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    model, first, born, deadline, owners = (data.get(f) for f in ("m", "f", "a", "d", "o"))
    if not (_number(born) and _number(deadline) and isinstance(owners, list)):
        return None
    owned = tuple(o for o in owners[:_MAX_OWNERS] if isinstance(o, str))
    if not owned:
        return None
    return KeyRecord(
        key=key,
        raw=raw,
        model=model[:_MODEL_CHARS] if isinstance(model, str) and model else None,
        first_delay=float(first) if _number(first) else None,
        age=max(0.0, (now_ms - born) / 1000),
        deadline_in=(deadline - now_ms) / 1000,
        owners=owned,
    )


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
