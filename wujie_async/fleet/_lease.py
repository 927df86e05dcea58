"""LeaderLease: which member polls for a shard, fenced so a deposed leader cannot act.

The lease is one Redis key per shard, ``SET NX PX``, holding ``"<member>|<token>"``; the token
comes from an ``INCR`` counter, so every new holder's token is larger than every earlier one.

Three guards keep a leader that lost its lease (a long GC pause, a network partition) from
acting:

1. Renew early: every ``lease_seconds / 3``. A refused renewal (another token holds the key)
   ends the leadership at once.
2. Local validity: the lease is trusted until ``sent + lease_seconds`` minus a drift margin,
   where ``sent`` is the loop clock *before* the acquire/renew call went out (Redis started the
   TTL later, so this errs early). Before every batch call the leader calls
   :meth:`LeaderLease.require` with the time the call may take; it raises
   :class:`LeaseLostError` unless that much validity is left. A process frozen past its lease
   wakes with its clock moved on and fails this check before sending anything.
3. Fenced writes: Redis scripts that act for the leader (taking due keys, rescheduling them)
   check the lease key still holds this ``"<member>|<token>"`` in the same atomic step.

A follower sleeps until the holder's TTL runs out and then tries ``SET NX``, so a dead
leader is replaced within ``lease_seconds`` plus a few milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING

from ._errors import FleetUnavailableError, LeaseLostError

if TYPE_CHECKING:
    from ._fleet import RedisFleet

logger = logging.getLogger("wujie_async.fleet")

# KEYS: lease, counter. ARGV: member, ttl_ms. Reply: {1, token} or {0, holder, pttl_ms}.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder then return {0, holder, redis.call('PTTL', KEYS[1])} end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return {1, tostring(token)}
"""

# KEYS: lease. ARGV: "<member>|<token>", ttl_ms. Reply: 1 renewed, 0 not ours any more.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: "<member>|<token>". Deletes the lease only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_DRIFT = 0.02  # trust the lease 2% less than its TTL: clocks of Redis and member may differ


class LeaderLease:
    """The lease of one shard, from one member's point of view.

    Run it in the background with ``async with fleet.lease(shard, member) as lease`` (or
    :meth:`start` / :meth:`aclose`); it acquires the lease when free and renews it while held.

    Attributes:
        shard: the shard.
        member_id: the member asking.
        leading: set while this member believes it holds the lease (check :meth:`require`
            before acting: the event cannot notice a frozen process).
    """

    def __init__(self, fleet: RedisFleet, shard: int, member_id: str) -> None:
        self._fleet = fleet
        self.shard = shard
        self.member_id = member_id
        self.leading = asyncio.Event()
        self._keys = (fleet.keys.lease(shard), fleet.keys.lease_counter(shard))
        self._ttl = fleet.config.lease_seconds
        self._fence: str | None = None
        self._token: int | None = None
        self._valid_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._acquire = fleet.script(_ACQUIRE)
        self._renew = fleet.script(_RENEW)
        self._release = fleet.script(_RELEASE)

    def __repr__(self) -> str:
        return f"LeaderLease(shard={self.shard}, member={self.member_id!r}, token={self._token})"

    @property
    def token(self) -> int | None:
        """The fencing token of the lease held, or None."""
        return self._token if self.remaining() > 0 else None

    @property
    def fence(self) -> str | None:
        """``"<member>|<token>"`` for fenced scripts, or None when not leading."""
        return self._fence if self.remaining() > 0 else None

    def remaining(self) -> float:
        """Seconds this member may still act as leader (0.0 when it is not the leader)."""
        if self._fence is None:
            return 0.0
        return max(0.0, self._valid_until - asyncio.get_running_loop().time())

    def require(self, seconds: float) -> str:
        """Check there are at least ``seconds`` of lease left; returns the fence to act with.

        Raises:
            LeaseLostError: not leading, or the lease may run out within ``seconds``.
        """
        left = self.remaining()
        if self._fence is None or left <= 0 or left < seconds:
            raise LeaseLostError(
                f"shard {self.shard}: {left:.3f}s of lease left, {seconds:.3f}s needed; not acting",
                shard=self.shard,
            )
        return self._fence

    # --- single steps (the background task uses these; tests may too) --------------------------
    async def try_acquire(self) -> float:
        """Take the lease if it is free.

        Returns:
            0.0 when this member now leads, else the holder's remaining TTL in seconds.
        """
        sent = asyncio.get_running_loop().time()
        reply = await self._acquire(self._keys, (self.member_id, round(self._ttl * 1000)))
        if int(reply[0]) == 1:
            self._token = int(reply[1])
            self._fence = f"{self.member_id}|{self._token}"
            self._valid_until = sent + self._ttl * (1 - _DRIFT)
            self.leading.set()
            logger.info(
                "fleet member %s leads shard %d (token %d)", self.member_id, self.shard, self._token
            )
            return 0.0
        return max(0, int(reply[2])) / 1000

    async def renew(self) -> bool:
        """Extend the lease; False (and leadership ended) when it is no longer ours."""
        if self._fence is None:
            return False
        sent = asyncio.get_running_loop().time()
        renewed = await self._renew(self._keys[:1], (self._fence, round(self._ttl * 1000)))
        if int(renewed) == 1:
            self._valid_until = sent + self._ttl * (1 - _DRIFT)
            return True
        logger.warning(
            "fleet member %s lost the lease of shard %d (token %s); it stops polling",
            self.member_id,
            self.shard,
            self._token,
        )
        self._step_down()
        return False

    async def release(self) -> None:
        """Give the lease up now (a successor need not wait for it to expire)."""
        fence = self._fence
        self._step_down()
        if fence is not None:
            await self._release(self._keys[:1], (fence,))

    def _step_down(self) -> None:
        self._fence = None
        self._valid_until = 0.0
        self.leading.clear()

    # --- background ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start acquiring/renewing in the background."""
        self._task = asyncio.create_task(self._run(), name=f"wujie fleet lease {self.shard}")

    async def aclose(self) -> None:
        """Stop, and release the lease if held."""
        task, self._task = self._task, None
        if task is not None:
            await self._fleet.stop_task(task)
        with contextlib.suppress(FleetUnavailableError):
            await self.release()

    async def __aenter__(self) -> LeaderLease:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self) -> None:
        renew_every = self._ttl / 3
        while True:
            try:
                if self._fence is not None and self.remaining() > 0:
                    await asyncio.sleep(renew_every)
                    await self.renew()
                    continue
                if self._fence is not None:  # ran out without a successful renewal
                    self._step_down()
                holder_left = await self.try_acquire()
                if holder_left > 0:
                    # Wake just after the holder's TTL runs out (it may renew meanwhile).
                    await asyncio.sleep(min(holder_left, renew_every) + random.uniform(0, 0.02))
            except FleetUnavailableError as exc:
                logger.warning("fleet lease of shard %d: %s", self.shard, exc)
                await asyncio.sleep(min(renew_every, 1.0))
