"""Membership: who is in the fleet, and who has died.

Each member registers under a unique id and heartbeats every ``member_timeout / 3``. A
sorted set maps member id -> last heartbeat (Redis server time, so machines' clocks do not
matter). A member whose last heartbeat is older than ``member_timeout`` is dead, for good: its
next heartbeat is refused (the script checks the age before refreshing it), so a member that
was paused longer than the timeout learns it was declared dead and must stop acting for its
old jobs, which another member may already have claimed (see ``RedisJournal.claim_dead``).
Leaving gracefully marks the member dead at once, so its unfinished jobs are claimable
immediately; a claim removes the dead member from the set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from ._errors import FleetUnavailableError

if TYPE_CHECKING:
    from ._fleet import RedisFleet

logger = logging.getLogger("wujie_async.fleet")

# KEYS: members, info. ARGV: id, info JSON. Reply: server time (ms).
_REGISTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return now
"""

# KEYS: members. ARGV: id, timeout_ms. Reply: 1 refreshed, 0 unknown (claimed), -1 expired.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not last then return 0 end
if now - tonumber(last) > tonumber(ARGV[2]) then return -1 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
return 1
"""

# KEYS: members. ARGV: id. Marks the member dead now (its last heartbeat becomes 0).
_LEAVE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then redis.call('ZADD', KEYS[1], 0, ARGV[1]) end
return 1
"""

# KEYS: members. Reply: {server time ms, id1, last1, id2, last2, ...}.
_LIST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local reply = {now}
local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #all do reply[#reply + 1] = all[i] end
return reply
"""


class Membership:
    """One member of the fleet: its id and its heartbeat.

    Use ``async with fleet.membership() as me`` (or :meth:`start` / :meth:`aclose`).

    Attributes:
        member_id: this member's id, unique across the fleet.
        lost: set when the fleet has declared this member dead (a heartbeat came too late);
            from then on the member must not act for the jobs it had.
    """

    def __init__(self, fleet: RedisFleet, member_id: str) -> None:
        self._fleet = fleet
        self.member_id = member_id
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._register = fleet.script(_REGISTER)
        self._heartbeat = fleet.script(_HEARTBEAT)
        self._leave = fleet.script(_LEAVE)
        self._list = fleet.script(_LIST)

    def __repr__(self) -> str:
        return f"Membership({self.member_id!r})"

    @property
    def alive(self) -> bool:
        """False once the fleet has declared this member dead."""
        return not self.lost.is_set()

    async def start(self) -> None:
        """Register and start heartbeating in the background."""
        info = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        )
        keys = self._fleet.keys
        await self._register((keys.members, keys.member_info), (self.member_id, info))
        self._task = asyncio.create_task(self._beat(), name=f"wujie fleet heartbeat {self}")

    async def aclose(self, *, leave: bool = True) -> None:
        """Stop heartbeating; with ``leave``, mark this member dead at once (claimable now)."""
        task, self._task = self._task, None
        if task is not None:
            await self._fleet.stop_task(task)
        if leave and self.alive:
            with contextlib.suppress(FleetUnavailableError):
                await self._leave((self._fleet.keys.members,), (self.member_id,))

    async def __aenter__(self) -> Membership:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def heartbeat(self) -> bool:
        """Heartbeat once. False (and :attr:`lost` set) when the fleet declared us dead."""
        timeout_ms = round(self._fleet.config.member_timeout * 1000)
        answer = await self._heartbeat((self._fleet.keys.members,), (self.member_id, timeout_ms))
        if int(answer) != 1:
            if self.alive:
                logger.warning(
                    "fleet member %s was declared dead (no heartbeat for %gs); "
                    "its jobs may be claimed by other members",
                    self.member_id,
                    self._fleet.config.member_timeout,
                )
            self.lost.set()
            return False
        return True

    async def _beat(self) -> None:
        interval = self._fleet.config.heartbeat_interval
        while self.alive:
            await asyncio.sleep(interval)
            try:
                await self.heartbeat()
            except FleetUnavailableError as exc:
                # Keep trying: if Redis returns within member_timeout nothing was lost.
                logger.warning("fleet heartbeat failed: %s", exc)

    async def members(self) -> dict[str, float]:
        """Every registered member -> seconds since its last heartbeat."""
        reply = await self._list((self._fleet.keys.members,), ())
        now = int(reply[0])
        flat = reply[1:]
        return {flat[i]: (now - int(float(flat[i + 1]))) / 1000 for i in range(0, len(flat), 2)}

    async def live_members(self) -> list[str]:
        """Members whose heartbeat is younger than ``member_timeout``, sorted."""
        timeout = self._fleet.config.member_timeout
        return sorted(m for m, age in (await self.members()).items() if age <= timeout)

    async def dead_members(self) -> list[str]:
        """Members whose heartbeat expired and whose jobs have not been claimed yet, sorted."""
        timeout = self._fleet.config.member_timeout
        return sorted(m for m, age in (await self.members()).items() if age > timeout)
