"""LeaderLease: which member polls for a shard, fenced so a deposed leader cannot act.

One Redis key per shard holds ``"<member>|<token>"`` with a TTL; the token comes from an
``INCR`` counter, so every new holder's token is larger than every earlier one. A member that
finds the lease still its own (it came back from a short Redis outage) takes it again at once,
with a new token.

Three guards keep a leader that lost its lease (a long GC pause, a partition) from acting:

1. Renew early: every ``lease_seconds / 3``; a refused renewal ends the leadership at once.
2. Local validity: the lease is trusted until ``sent + lease_seconds`` less a 2% drift margin,
   ``sent`` being the loop clock *before* the acquire or renewal went out (Redis started the
   TTL later, so this errs early). Before every batch call the leader calls :meth:`require`;
   a process frozen past its lease wakes with its clock moved on and fails the check before
   sending anything.
3. Fenced writes: the leader's scripts check that the lease key still holds its fence.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

from ._errors import LeaseLostError
from ._link import RedisLink, Script

logger = logging.getLogger("wujie_async.fleet")

# KEYS: lease, counter. ARGV: member, ttl_ms, then members it may take the lease from.
# Reply: {1, token} or {0, pttl_ms}.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder then
  local from = string.match(holder, '^(.*)|[^|]*$')
  for i = 3, #ARGV do if from == ARGV[i] then from = ARGV[1] end end
  if from ~= ARGV[1] then return {0, redis.call('PTTL', KEYS[1])} end
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return {1, tostring(token)}
"""
# KEYS: lease. ARGV: fence, ttl_ms. Reply: 1 renewed, 0 not ours any more.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# KEYS: lease. ARGV: fence. Deletes the lease only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_DRIFT = 0.02  # trust the lease 2% less than its TTL: clocks of Redis and member may differ
_RETRY = 0.5  # a member waiting for a lease tries at least this often


def lease_holder(lease: object) -> str | None:
    """The member holding a lease, from the lease key's value (``"<member>|<token>"``, as read
    from Redis); None for no lease (or a garbled one)."""
    if not isinstance(lease, str) or "|" not in lease:
        return None
    return lease.rpartition("|")[0] or None


class LeaderLease:
    """The lease of one shard, as one member holds it or waits for it."""

    def __init__(self, link: RedisLink, shard: int, member_id: str) -> None:
        self.shard = shard
        self.member_id = member_id
        self.renewals = 0  # renewals that succeeded (a figure to watch)
        self._keys = (link.keys.lease(shard), link.keys.lease_counter(shard))
        self._ttl = link.config.lease_seconds
        self._fence: str | None = None
        # The fence of the last term, kept after stepping down so that closing still gives the
        # lease up (the release is fenced: a successor's lease is left alone).
        self._last_fence: str | None = None
        self._valid_until = 0.0
        self._aside_until = 0.0  # loop time before which acquire() does not try (stand_aside)
        self._acquire = Script(link, _ACQUIRE)
        self._renew = Script(link, _RENEW)
        self._release = Script(link, _RELEASE)

    def __repr__(self) -> str:
        return f"LeaderLease(shard={self.shard}, member={self.member_id!r}, fence={self._fence})"

    @property
    def seconds(self) -> float:
        """How long the lease lasts without a renewal."""
        return self._ttl

    @property
    def token(self) -> int | None:
        """The fencing token of the lease held, or None when not leading."""
        fence = self._fence if self.remaining() > 0 else None
        return int(fence.rsplit("|", 1)[1]) if fence is not None else None

    def remaining(self) -> float:
        """Seconds this member may still act as leader (0.0 when it is not the leader)."""
        if self._fence is None:
            return 0.0
        return max(0.0, self._valid_until - asyncio.get_running_loop().time())

    def require(self, seconds: float) -> str:
        """Check at least ``seconds`` of lease are left; returns the fence to act with.

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

    async def try_acquire(self, *, take_from: Sequence[str] = ()) -> float:
        """Take the lease if it is free (or still this member's), or held by a member in
        ``take_from`` (a member that won the fleet back fences out the newcomer's leader, not
        one of its own gateway's).

        Returns:
            0.0 when this member now leads, else the holder's remaining TTL in seconds (more
            than 0.0, even for a lease someone set without a TTL).
        """
        sent = asyncio.get_running_loop().time()
        args: tuple[str | int, ...] = (self.member_id, round(self._ttl * 1000), *take_from)
        reply = await self._acquire(self._keys, args)
        if int(reply[0]) != 1:
            holder_left = int(reply[1]) / 1000
            return holder_left if holder_left > 0 else _RETRY  # a lease set without a TTL
        self._fence = self._last_fence = f"{self.member_id}|{reply[1]}"
        self._valid_until = sent + self._ttl * (1 - _DRIFT)
        logger.info("fleet member %s leads shard %d (%s)", self.member_id, self.shard, reply[1])
        return 0.0

    def stand_aside(self) -> None:
        """Let the other members take the lease first: :meth:`acquire` does not try for a
        lease length (a leader that stepped down: the others, trying every 0.5 s, take it
        meanwhile; if none does, this member takes it back)."""
        self._aside_until = asyncio.get_running_loop().time() + self._ttl

    async def acquire(self) -> None:
        """Wait until this member holds the lease: it tries again when the holder's TTL ends,
        and at least every 0.5 s, so a lease given up (its leader closed) is taken at once.
        After :meth:`stand_aside`, it first waits that long."""
        aside = self._aside_until - asyncio.get_running_loop().time()
        if aside > 0:
            await asyncio.sleep(aside)
        while True:
            holder_left = await self.try_acquire()
            if holder_left == 0:
                return
            await asyncio.sleep(min(holder_left, _RETRY) + random.uniform(0, 0.02))

    async def renew(self) -> bool:
        """Extend the lease; False (leadership over) when it is no longer this member's."""
        fence = self._fence
        if fence is None:
            return False
        sent = asyncio.get_running_loop().time()
        if int(await self._renew(self._keys[:1], (fence, round(self._ttl * 1000)))) == 1:
            self._valid_until = sent + self._ttl * (1 - _DRIFT)
            self.renewals += 1
            return True
        logger.warning("fleet member %s lost the lease of shard %d", self.member_id, self.shard)
        self.step_down()
        return False

    async def keep(self) -> None:
        """Renew every ``lease_seconds / 3``; returns when the lease is lost."""
        while True:
            await asyncio.sleep(self._ttl / 3)
            if self.remaining() <= 0 or not await self.renew():
                self.step_down()
                return

    async def release(self) -> None:
        """Give the lease up now (a successor need not wait for it to expire), also after the
        term ended by stepping down (the leading task was stopped first when closing)."""
        fence, self._last_fence = self._last_fence, None
        self.step_down()
        if fence is not None:
            await self._release(self._keys[:1], (fence,))

    def step_down(self) -> None:
        """Stop acting as leader (the lease in Redis runs out by itself)."""
        self._fence = None
        self._valid_until = 0.0
