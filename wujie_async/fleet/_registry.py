"""KeyRegistry: which member follows which key, as a log per shard that the shard's leader reads.

A member appends an entry when it starts following a key (with what the leader needs to poll
it: model, first delay, age, deadline) and when it stops. A leader starts its term by appending
a marker and reading on from there (by cursor: no entry is lost to a missed wake-up); it then
asks every member to announce the keys it follows, so the term starts from what the members
know now, not from a copy that could be stale. Nothing is deleted: the log keeps the last
``max(60 s, 3 x lease_seconds)``, and a leader that read nothing for longer has lost its lease.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeGuard

from ._keys import FleetKeys, shard_of
from ._redis import RedisLink, stream_entries

_MODEL_CHARS = 100

# KEYS: log. ARGV: kept_ms, member, key1, what1, ... Trimmed by Redis time (ids are its ms).
_APPEND = """
local t = redis.call('TIME')
local oldest = tonumber(t[1]) * 1000 - tonumber(ARGV[1])
for i = 3, #ARGV, 2 do
  redis.call('XADD', KEYS[1], 'MINID', '~', oldest, '*',
             'k', ARGV[i], 'o', ARGV[2], 'f', ARGV[i + 1])
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Follow:
    """A member follows a key.

    Attributes:
        key: the job key.
        model: the request's model, when known (the schedule learns per model).
        first_delay: seconds from the submit to the first ask (None: the leader's policy).
        age: seconds since the submit (or attach).
        deadline_in: seconds until the job's deadline.
        owner: the member (set when read from the log).
    """

    key: str
    model: str | None
    first_delay: float | None
    age: float
    deadline_in: float
    owner: str = ""


@dataclass(frozen=True, slots=True)
class Leave:
    """``owner`` no longer follows ``key``."""

    key: str
    owner: str


class KeyRegistry:
    """The fleet's keys by shard (see the module docstring)."""

    def __init__(
        self, redis: RedisLink, keys: FleetKeys, *, shards: int, lease_seconds: float
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._shards = shards
        self._kept_ms = round(max(60.0, 3 * lease_seconds) * 1000)
        self._append_script = redis.script(_APPEND)

    def shard_of(self, job_key: str) -> int:
        """The shard of ``job_key``."""
        return shard_of(job_key, self._shards)

    async def follow(self, member: str, follows: Iterable[Follow]) -> None:
        """``member`` follows these keys."""
        await self._append(
            member,
            ((f.key, json.dumps([f.model, f.first_delay, f.age, f.deadline_in])) for f in follows),
        )

    async def leave(self, member: str, job_keys: Iterable[str]) -> None:
        """``member`` no longer follows these keys."""
        await self._append(member, ((key, "") for key in job_keys))

    async def _append(self, member: str, entries: Iterable[tuple[str, str]]) -> None:
        by_shard: dict[int, list[str]] = defaultdict(list)
        for key, what in entries:
            by_shard[self.shard_of(key)] += (key, what)
        for shard, args in by_shard.items():
            await self._append_script((self._keys.keys_log(shard),), (self._kept_ms, member, *args))

    async def begin_term(self, shard: int) -> str:
        """Mark the start of a leader's term in ``shard``'s log; its cursor."""
        log = self._keys.keys_log(shard)
        marker = await self._redis.call(lambda r: r.xadd(log, {"term": "1"}))
        return str(marker)

    async def changes(
        self, shard: int, cursor: str, wait: float
    ) -> tuple[str, list[Follow | Leave]]:
        """The entries after ``cursor`` (waiting up to ``wait`` s for one) and the cursor after
        them. Entries that are not a member's (another process's writes) are skipped."""
        log = self._keys.keys_log(shard)
        reply: Any = await self._redis.call(
            lambda r: r.xread({log: cursor}, count=1000, block=max(1, round(wait * 1000))),
            extra_wait=wait,
        )
        found: list[Follow | Leave] = []
        for entry_id, fields in stream_entries(reply):
            cursor = entry_id
            change = _change(fields) if isinstance(fields, dict) else None
            if change is not None:
                found.append(change)
        return cursor, found


def _change(fields: dict[Any, Any]) -> Follow | Leave | None:
    key, owner, what = fields.get("k"), fields.get("o"), fields.get("f")
    if not (isinstance(key, str) and isinstance(owner, str) and isinstance(what, str)):
        return None
    if not what:
        return Leave(key, owner)
    try:
        model, first, age, deadline_in = json.loads(what)
    except (ValueError, TypeError, RecursionError):
        return None
    if not (_number(age) and _number(deadline_in)):
        return None
    return Follow(
        key=key,
        model=model[:_MODEL_CHARS] if isinstance(model, str) and model else None,
        first_delay=float(first) if _number(first) else None,
        age=max(0.0, float(age)),
        deadline_in=float(deadline_in),
        owner=owner,
    )


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
