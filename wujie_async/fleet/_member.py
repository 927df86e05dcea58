"""FleetMember: one client's part in a fleet (``WujieClient(fleet=...)`` gets it from
``RedisFleet.member()``).

A member follows its own jobs (``_follower``), is a candidate leader of every shard
(``_leader``, one lease each), and heartbeats. Every second (or third of ``member_timeout``) its
heartbeat tells the fleet it lives and reads back the fleet's figures; while Redis is away it is
tried every 0.25 s, and the first one that gets through rejoins at once, before anyone could
judge the member dead: it is back in the member list and announces every key it follows. A
member judged dead while alive (a long freeze) rejoins the same way and follows its jobs again.

Submits wait for the fleet-wide rate (and its 429 pause) in place of the local pacer. While
Redis is away a submit waits up to ``unavailable_wait`` for its turn and for its journal
intent, then raises ``FleetUnavailableError``: nothing was sent.

A fleet background task that fails with an unexpected error (a bug) is logged; the member then
polls its own keys for good, stops the fleet following them and gives its leases up, so the
rest of the fleet carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .._jobs import ImageJob
from .._journal import JournalEntry
from .._stats import FleetStats
from ._config import FleetConfig
from ._errors import FleetUnavailableError
from ._follower import Follower
from ._journal import RedisJournal
from ._keys import FleetKeys
from ._leader import ShardLeader
from ._lease import LeaderLease
from ._limiter import FleetLimiter
from ._membership import Membership, Standing
from ._redis import RETRY, RedisConnection, retry_while_away, stop_task
from ._registry import KeyRegistry
from ._reports import ReportInbox, ReportOutbox

if TYPE_CHECKING:
    from .._config import Limits, PollPolicy
    from .._poller import BatchPoller
    from .._transport import Transport

logger = logging.getLogger("wujie_async.fleet")


class _Fleet(Protocol):
    """What a member needs of its RedisFleet (which imports this module, not the reverse)."""

    config: FleetConfig
    keys: FleetKeys
    connection: RedisConnection

    @property
    def started(self) -> bool: ...

    async def start(self) -> object: ...

    async def aclose(self) -> None: ...


class FleetMember:
    """A client's membership of a fleet (see the module docstring). Satisfies FleetLink."""

    def __init__(self, fleet: _Fleet) -> None:
        self._fleet = fleet
        config = self._config = fleet.config
        redis, keys = fleet.connection, fleet.keys
        host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())
        self._member_id = f"{host[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._journal = RedisJournal(
            redis,
            keys,
            self._member_id,
            member_timeout=config.member_timeout,
            unavailable_wait=config.unavailable_wait,
            retake_turn=self.acquire,
        )
        self._membership = Membership(redis, keys, self._member_id, config.member_timeout)
        self._registry = KeyRegistry(
            redis, keys, shards=config.shards, lease_seconds=config.lease_seconds
        )
        self._leases = [
            LeaderLease(redis, keys, shard, self._member_id, config.lease_seconds)
            for shard in range(config.shards)
        ]
        self._pauses = FleetLimiter(redis, keys, 1.0)  # the 429 pause, with no rate set
        self._limiter: FleetLimiter | None = None
        self._follower: Follower | None = None
        self._leaders: list[ShardLeader] = []
        self._transport: Transport | None = None
        self._owns_fleet = False
        self._broken = False  # a background task failed (a bug): local polling for good
        self._resigning: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._size = 1
        self._fleet_calls = self._fleet_keys = 0
        self._flushed = (0, 0)  # leader calls and keys already added to the fleet's figures

    def __repr__(self) -> str:
        return f"FleetMember({self._config.name!r}, member={self._member_id!r})"

    @property
    def member_id(self) -> str:
        """This member's id, unique across the fleet: host, pid and a random part."""
        return self._member_id

    @property
    def header_token(self) -> str:
        """The random part of the member id, sent as ``X-Wujie-Member``."""
        return self._member_id.rsplit(":", 1)[-1]

    @property
    def journal(self) -> RedisJournal:
        """The fleet's journal, writing as this member."""
        return self._journal

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(
        self, *, poller: BatchPoller, transport: Transport, poll: PollPolicy, limits: Limits
    ) -> None:
        """Connect (unless started), join, and start following, leading and heartbeating.

        Raises:
            FleetUnavailableError: Redis cannot be reached (the message names its URL).
        """
        if not self._fleet.started:
            await self._fleet.start()
            self._owns_fleet = True
        try:
            await self._membership.beat()  # joins
            redis, keys = self._fleet.connection, self._fleet.keys
            inbox = ReportInbox(redis, keys, self._member_id, limits.max_response_bytes)
            follower = self._follower = Follower(
                member_id=self._member_id, registry=self._registry, inbox=inbox, poller=poller
            )
            await follower.rejoin()
            # A stream nobody reads (a dead member's) expires well after it could be claimed.
            outbox = ReportOutbox(
                redis, keys, expire_after=max(60.0, 10 * self._config.member_timeout)
            )
            self._leaders = [
                ShardLeader(
                    lease=lease,
                    membership=self._membership,
                    registry=self._registry,
                    outbox=outbox,
                    transport=transport,
                    policy=poll,
                    limits=limits,
                    on_redis_lost=follower.lost,
                )
                for lease in self._leases
            ]
            for lease in self._leases:
                await lease.start()
        except BaseException:
            await self.aclose()
            raise
        if limits.max_submits_per_second is not None:
            self._limiter = FleetLimiter(redis, keys, limits.max_submits_per_second)
        self._transport = transport
        transport.on_rate_limited = self._rate_limited
        self._spawn(follower.write(), "keys")
        self._spawn(follower.read(), "reports")
        self._spawn(self._keep_alive(), "heartbeat")
        for leader in self._leaders:
            self._spawn(leader.run(), f"leader {leader.lease.shard}")

    def _spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(work, name=f"wujie fleet {what}")
        self._tasks.add(task)
        task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None or self._broken:
            return
        logger.error(
            "fleet task %s stopped: %r; member %s polls its own keys from now on",
            task.get_name(),
            task.exception(),
            self._member_id,
        )
        self._broken = True
        if self._follower is not None:
            self._follower.lost("a fleet task stopped")
        # Not one of self._tasks: stop_polling must not cancel it half-way; aclose() waits.
        self._resigning = asyncio.create_task(self._resign(), name="wujie fleet resign")

    async def _resign(self) -> None:
        """Give every lease up, and stop the fleet polling this member's keys (it does now)."""
        for leader in self._leaders:
            await leader.lease.aclose()  # idempotent; Redis away: the lease runs out
        if self._follower is not None:
            with contextlib.suppress(FleetUnavailableError):
                await self._registry.leave(self._member_id, self._follower.followed())

    async def stop_polling(self) -> None:
        """Stop leading, following and heartbeating (before the client's transport closes)."""
        tasks, self._tasks = self._tasks, set()
        within = self._config.command_timeout + 1.0
        await asyncio.gather(*(stop_task(task, within=within) for task in tasks))
        if self._transport is not None:
            self._transport.on_rate_limited = None

    async def aclose(self) -> None:
        """Give the leases up, leave (this member's open jobs are claimable at once), and
        disconnect if the client's opening connected."""
        await self.stop_polling()
        if self._resigning is not None:
            await stop_task(self._resigning, within=4 * self._config.command_timeout)
        try:
            for lease in self._leases:
                await lease.aclose()
            with contextlib.suppress(FleetUnavailableError):
                await self._membership.leave()
        finally:
            if self._owns_fleet:
                self._owns_fleet = False
                await self._fleet.aclose()

    # --- the heartbeat ---------------------------------------------------------------------------
    async def _keep_alive(self) -> None:
        follower = self._follower
        assert follower is not None
        while True:
            waiting = not follower.connected and not self._broken  # for Redis to come back
            await asyncio.sleep(RETRY if waiting else self._config.member_beat)
            if self._transport is not None:  # an INFO line when the role changes, once
                self._transport.telemetry.fleet_role_changed(
                    self.stats().role, member=self._member_id
                )
            calls = sum(leader.calls for leader in self._leaders)
            keys = sum(leader.keys for leader in self._leaders)
            try:
                beat = await self._membership.beat(
                    calls - self._flushed[0], keys - self._flushed[1]
                )
                self._flushed = (calls, keys)
                self._size, self._fleet_calls, self._fleet_keys = (
                    beat.live, beat.batch_calls, beat.keys_polled,
                )  # fmt: skip
                if beat.standing != Standing.ALIVE:
                    logger.warning(
                        "fleet %s: member %s had been %s; it rejoins and follows its jobs again",
                        self._config.name,
                        self._member_id,
                        "judged dead (no heartbeat for longer than member_timeout)"
                        if beat.standing == Standing.JUDGED_DEAD
                        else "forgotten (Redis lost its data, or its jobs were claimed)",
                    )
                if self._broken or (follower.connected and beat.standing == Standing.ALIVE):
                    continue
                was_connected = follower.connected
                announced = await follower.rejoin()
                if not was_connected:
                    logger.warning(
                        "fleet %s: Redis is back; member %s rejoined (%d keys announced)",
                        self._config.name,
                        self._member_id,
                        announced,
                    )
            except FleetUnavailableError as exc:
                follower.lost(str(exc))

    # --- submits -------------------------------------------------------------------------------
    async def acquire(self) -> None:
        """Wait for this submit's turn: the fleet's rate (if set) and its 429 pause.

        Raises:
            FleetUnavailableError: Redis stayed away for ``unavailable_wait`` (nothing sent).
        """

        async def turn() -> None:
            if self._limiter is not None:
                await self._limiter.acquire()
            elif (paused := await self._pauses.paused_for()) > 0:
                await asyncio.sleep(paused)

        await retry_while_away(
            turn, wait=self._config.unavailable_wait, what="the submit was not sent"
        )

    def _rate_limited(self, kind: str, retry_after: float | None) -> None:
        """A 429 on a submit with Retry-After: pause every member's submits that long."""
        if kind == "submit" and retry_after is not None and retry_after > 0:
            self._spawn(self._pause((self._limiter or self._pauses), retry_after), "pause")

    @staticmethod
    async def _pause(limiter: FleetLimiter, seconds: float) -> None:
        with contextlib.suppress(FleetUnavailableError):
            await limiter.pause(seconds)

    # --- jobs ----------------------------------------------------------------------------------
    def tracked(self, job: ImageJob, first_delay: float | None) -> None:
        """The poller tracks ``job``: the fleet polls it for this member."""
        if self._follower is not None:
            self._follower.tracked(job, first_delay)

    def ended(self, key: str) -> None:
        """``key``'s job ended here: this member no longer follows it."""
        if self._follower is not None:
            self._follower.ended(key)

    async def claim_dead(self) -> list[JournalEntry]:
        """Claim dead members' accepted submits (atomically, each to one member)."""
        return (await self._journal.claim_dead()).entries

    def stats(self) -> FleetStats:
        """A snapshot of the fleet as this member sees it."""
        role: Literal["leader", "follower", "local"]
        if self._follower is None or not self._follower.connected:
            role = "local"
        elif any(leader.lease.remaining() > 0 for leader in self._leaders):
            role = "leader"
        else:
            role = "follower"
        calls = self._fleet_calls
        return FleetStats(
            role=role,
            size=self._size,
            rate=self._limiter.rate if self._limiter is not None else None,
            batch_calls=calls,
            keys_polled=self._fleet_keys,
            mean_batch_fill=self._fleet_keys / calls if calls else 0.0,
            leader_calls=sum(leader.calls for leader in self._leaders),
            leader_keys=sum(leader.keys for leader in self._leaders),
        )
