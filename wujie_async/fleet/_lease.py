"""LeaderLease: which member polls for a shard, and why a deposed one cannot.

The lease is one Redis key per shard, ``SET PX``, holding ``"<member>|<token>"``; the token
comes from an ``INCR`` counter, so every new term has a larger one than every earlier term.

Two guards keep a leader that lost its lease (a long GC pause, a network partition) from
polling:

1. Renew early: every ``lease_seconds / 3``. A refused renewal (the key holds another term, or
   Redis lost it) ends the term at once.
2. Local validity: the lease is trusted until ``sent + lease_seconds`` minus a drift margin,
   where ``sent`` is the loop clock *before* the acquire/renew call went out (Redis started the
   TTL later, so this errs early). Before every batch call the leader calls :meth:`require`,
   which raises :class:`LeaseLostError` unless enough validity is left: a process frozen past
   its lease wakes with its clock moved on and fails this check before sending anything.

A leader's Redis writes are reports and term markers: facts, harmless from a deposed leader,
so no write needs a fence. A follower sleeps until the holder's TTL runs out and then tries
again, so a dead leader is replaced within ``lease_seconds`` plus a few milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from ._errors import FleetUnavailableError, LeaseLostError
from ._keys import FleetKeys
from ._redis import RETRY, RedisLink, stop_task

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
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
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

    :meth:`start` acquires it in the background when free and renews it while held.

    Attributes:
        shard: the shard.
        member_id: the member asking.
        leading: set while this member believes it holds the lease (check :meth:`require`
            before acting: an event cannot notice a frozen process).
        renewals: how many times this member renewed it.
    """

    def __init__(
        self, redis: RedisLink, keys: FleetKeys, shard: int, member_id: str, lease_seconds: float
    ) -> None:
        self.shard = shard
        self.member_id = member_id
        self.leading = asyncio.Event()
        self.renewals = 0
        self._redis = redis
        self._keys = (keys.lease(shard), keys.lease_counter(shard))
        self._ttl = lease_seconds
        self._fence: str | None = None
        self._token: int | None = None
        self._valid_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._acquire = redis.script(_ACQUIRE)
        self._renew = redis.script(_RENEW)
        self._release = redis.script(_RELEASE)

    def __repr__(self) -> str:
        return f"LeaderLease(shard={self.shard}, member={self.member_id!r}, token={self._token})"

    @property
    def token(self) -> int | None:
        """The token of the term held, or None."""
        return self._token if self.remaining() > 0 else None

    def remaining(self) -> float:
        """Seconds this member may still act as leader (0.0 when it is not the leader)."""
        if self._fence is None:
            return 0.0
        return max(0.0, self._valid_until - asyncio.get_running_loop().time())

    def require(self, seconds: float) -> str:
        """Check there are at least ``seconds`` of lease left; returns ``"<member>|<token>"``.

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

    async def try_acquire(self) -> float:
        """Take the lease if it is free: 0.0 when this member now leads, else the holder's
        remaining TTL in seconds."""
        sent = asyncio.get_running_loop().time()
        reply = await self._acquire(self._keys, (self.member_id, round(self._ttl * 1000)))
        if int(reply[0]) != 1:
            return max(0, int(reply[2])) / 1000
        self._token = int(reply[1])
        self._fence = f"{self.member_id}|{self._token}"
        self._valid_until = sent + self._ttl * (1 - _DRIFT)
        self.leading.set()
        logger.info(
            "fleet member %s leads shard %d (term %d)", self.member_id, self.shard, self._token
        )
        return 0.0

    async def renew(self) -> bool:
        """Extend the lease; False (and the term over) when it is no longer ours."""
        if self._fence is None:
            return False
        sent = asyncio.get_running_loop().time()
        if int(await self._renew(self._keys[:1], (self._fence, round(self._ttl * 1000)))) == 1:
            self._valid_until = sent + self._ttl * (1 - _DRIFT)
            self.renewals += 1
            return True
        logger.warning(
            "fleet member %s lost the lease of shard %d (term %s); it stops polling",
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

    async def start(self) -> None:
        """Start acquiring/renewing in the background."""
        self._task = asyncio.create_task(self._run(), name=f"wujie fleet lease {self.shard}")

    async def aclose(self) -> None:
        """Stop, and release the lease if held."""
        task, self._task = self._task, None
        if task is not None:
            await stop_task(task, within=self._redis.command_timeout + 1.0)
        with contextlib.suppress(FleetUnavailableError):
            await self.release()

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
                # Tried again soon: a Redis that is back gets a leader within a moment.
                logger.debug("fleet lease of shard %d: %s", self.shard, exc)
                await asyncio.sleep(min(renew_every, RETRY))
