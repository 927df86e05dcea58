"""FleetMember: one WujieClient's part in a fleet (``RedisFleet.member()`` makes it); its
methods are the ``FleetLink`` protocol's (``wujie_async._fleet_link``).

Every member follows the shared poller (:class:`Follower`) and leads each shard whose lease it
holds (:class:`ShardLeader`). Its role, ``leader``, ``follower`` or ``local``, changes in one
place: :meth:`FleetMember._set_role`. What a member does when Redis goes away (``_lost``: it
goes local at once, and ``_watch`` rejoins before anyone can judge it, ``_rejoin``), when the
fleet declared it dead or Redis lost it (``_join_again``), when joining again finds the fleet
on another gateway (``_keep_out``), and when a background task fails with a bug (local for
good, its leases and keys given up so the others carry on) is told, with the reasons, in
docs/guides/fleet.md, "When something dies".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from .._config import Limits, PollPolicy
from .._errors import ClientStateError
from .._jobs import ImageJob
from .._journal import JournalEntry
from .._poller import BatchPoller
from .._ratelimit import Ready
from .._stats import FleetRole, FleetStats
from .._transport import Transport
from ._errors import FleetMismatchError, FleetUnavailableError
from ._exchange import Inbox
from ._follower import Follower
from ._journal import RedisJournal
from ._leader import ShardLeader
from ._lease import LeaderLease, lease_holder
from ._limiter import FleetLimiter
from ._link import FleetConnection, refused_for_its_data, stop_task
from ._membership import Membership, new_member_id
from ._takeover import Takeover

logger = logging.getLogger("wujie_async.fleet")

_T = TypeVar("_T")
_CLAIMED_HINT = (
    " (they resolve here too, and the claimers' resume() returned them: a consumer that "
    "publishes results checks client.stats.fleet.keys_claimed_by_others first)"
)
_RETRY = 0.25  # a member away from Redis tries it again this often
# A member lost again within this many seconds of rejoining is flapping (a Redis at its memory
# limit takes the rejoin's small writes and refuses the reports): its next rejoin waits twice
# as long as the last, up to _REJOIN_WAIT_MAX.
_STEADY = 2.0
_REJOIN_WAIT_MAX = 4.0
_FIGURES_EVERY = 1.0
# Keys of this member's jobs other members claimed, kept for FleetStats (the oldest go first):
# a consumer checks a job's key there after it ends, shortly after.
_CLAIMED_KEPT = 10_000


class FleetMember:
    """A client's membership of a fleet (see the module docstring); a ``FleetLink``."""

    def __init__(self, link: FleetConnection) -> None:
        self._link = link
        self._config = config = link.config
        self._member_id = new_member_id()
        self._token = self._member_id.rsplit(":", 1)[-1]
        self._journal = RedisJournal(link, self._member_id)
        self._membership = Membership(link, self._member_id)
        self._leases = [LeaderLease(link, s, self._member_id) for s in range(config.shards)]
        self._leading = [False] * config.shards
        self._leaders: list[ShardLeader] = []
        self._follower: Follower | None = None
        self._poller: BatchPoller | None = None
        self._transport: Transport | None = None
        self._limiter: FleetLimiter | None = None
        self._pauses = FleetLimiter(link, 1.0)  # the 429 pause, with or without a rate
        self._owns_link = False
        self._role: FleetRole = "local"
        self._joined = False
        self._broken = False  # a task failed (a bug): local for good
        self._kept_out = False  # refused on joining again: the fleet uses another gateway
        self._tasks: set[asyncio.Task[None]] = set()  # what runs while joined
        self._watcher: asyncio.Task[None] | None = None
        self._others: set[asyncio.Task[None]] = set()  # see _background
        self._wake = asyncio.Event()
        self._rejoined_at = -math.inf
        self._rejoin_wait = 0.0  # before the next rejoin after a loss (see _STEADY)
        self._rejoin_at = -math.inf  # loop time of the next try, while not joined
        # Since when Redis has failed this member's submit turns (None: it answers), the
        # latest failure, and its words (see acquire).
        self._failing_since: float | None = None
        self._failing_last = 0.0
        self._failing_why = ""
        self._size = 1
        self._leader_ids: tuple[str | None, ...] = (None,) * config.shards  # as last read
        self._takeover = Takeover(link, self._member_id)
        self._claimed: dict[str, None] = {}  # keys other members claimed, oldest first
        self._claimed_keys: tuple[str, ...] = ()
        self._jobs_claimed = 0
        # Joining again is done by one caller at a time; one that found the member dead
        # before another joined it again meanwhile has nothing left to do (see _join_again).
        self._joining = asyncio.Lock()
        self._joins = 0
        self._fleet_calls = self._fleet_keys = 0
        self._flushed_calls = self._flushed_keys = 0

    def __repr__(self) -> str:
        return f"FleetMember({self._config.name!r}, member={self._member_id!r})"

    @property
    def member_id(self) -> str:
        return self._member_id

    @property
    def header_token(self) -> str:
        return self._token

    @property
    def journal(self) -> RedisJournal:
        return self._journal

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(
        self,
        *,
        poller: BatchPoller,
        transport: Transport,
        poll: PollPolicy,
        limits: Limits,
        app_id: str,
    ) -> None:
        if not self._link.started:
            await self._link.start()
            self._owns_link = True
        self._membership.use_gateway(transport.base_url, app_id)
        try:
            await self._membership.join()
            self._journal.use_gateway(*self._membership.gateway)
            await self._journal.warm()
        except BaseException:
            await self.aclose()
            raise
        self._poller, self._transport = poller, transport
        self._follower = Follower(self._link, self._member_id, poller, self._check_in)
        self._leaders = [
            ShardLeader(self._link, lease, transport, poll, limits, poller.schedule)
            for lease in self._leases
        ]
        if limits.max_submits_per_second is not None:
            self._limiter = FleetLimiter(self._link, limits.max_submits_per_second)
        transport.on_rate_limited = self._rate_limited
        poller.set_asking(False)
        self._joined = True
        self._start_tasks()
        self._watcher = asyncio.create_task(self._watch(), name="wujie fleet watch")
        self._set_role()

    def _start_tasks(self) -> None:
        follower = self._follower
        assert follower is not None
        self._spawn(follower.write(), "registry")
        self._spawn(follower.read(), "reports")
        for shard in range(self._config.shards):
            self._spawn(self._lead(shard), f"leader {shard}")

    def _spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        async def guarded() -> None:
            try:
                await work
            except* FleetUnavailableError as failed:
                self._lost(str(failed.exceptions[0]))

        task = asyncio.create_task(guarded(), name=f"wujie fleet {what}")
        self._tasks.add(task)
        task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None or self._broken:
            return
        logger.error(
            "fleet task %s stopped: %r; member %s polls its own keys from now on",
            task.get_name(),
            task.exception(),
            self._member_id,
        )
        self._broken = True
        self._lost("a fleet task stopped")
        self._background(self._resign(), "resign")

    async def _resign(self) -> None:
        """Give every lease up and take this member's keys out of the registry."""
        for lease in self._leases:
            await lease.release()
        if self._follower is not None:
            await self._follower.unregister_all()

    def _background(self, work: Coroutine[Any, Any, object], what: str) -> None:
        """Run ``work`` (a 429 pause, a resignation, keys taken out) to its end, Redis away
        or not: not one of the joined tasks, nothing cancels it half-way; aclose() waits
        for it."""

        async def guarded() -> None:
            with contextlib.suppress(FleetUnavailableError):
                await work

        task = asyncio.create_task(guarded(), name=f"wujie fleet {what}")
        self._others.add(task)
        task.add_done_callback(self._others.discard)

    async def stop_polling(self) -> None:
        if self._watcher is not None:
            self._tasks.add(self._watcher)
            self._watcher = None
        await self._stop_tasks()
        if self._transport is not None:
            self._transport.on_rate_limited = None

    async def aclose(self) -> None:
        await self.stop_polling()
        # What is left (the resignation, a 429 pause) is let finish, within deadlines.
        others, self._others = self._others, set()
        if others:
            await asyncio.wait(others, timeout=4 * self._config.command_timeout)
            await asyncio.gather(*(stop_task(task, 1.0) for task in others))
        try:
            if not self._link.started:
                return
            with contextlib.suppress(FleetUnavailableError):
                if self._follower is not None:
                    await self._follower.flush()  # the jobs closing ended leave the registry
                for lease in self._leases:
                    await lease.release()
                await self._membership.leave()
                await Inbox(self._link, self._member_id).drop()
        finally:
            if self._owns_link:
                self._owns_link = False
                await self._link.aclose()

    # --- roles ---------------------------------------------------------------------------------
    def _set_role(self) -> None:
        """The one place the member's role changes (and is logged)."""
        role: FleetRole
        if not self._joined:
            role = "local"
        elif any(self._leading):
            role = "leader"
        else:
            role = "follower"
        if role != self._role:
            self._role = role
            if self._transport is not None:  # start() set it; its telemetry logs the change
                self._transport.telemetry.fleet_role_changed(role, member=self._member_id)

    async def _lead(self, shard: int) -> None:
        lease, leader = self._leases[shard], self._leaders[shard]
        while True:
            await lease.acquire()
            self._leading[shard] = True
            self._set_role()
            try:
                await leader.lead()
            finally:
                self._leading[shard] = False
                self._set_role()

    def _lost(self, why: str) -> None:
        """Redis is away: poll its own keys, and rejoin when Redis answers."""
        if not self._joined:
            return
        self._joined = False
        for task in self._tasks:
            task.cancel()  # stopped for good (within a deadline) when rejoining or closing
        self._leading = [False] * self._config.shards
        if self._poller is not None:
            self._poller.set_asking(True)
        logger.warning(
            "fleet %s: %s; member %s polls its own keys until it rejoins",
            self._config.name,
            why,
            self._member_id,
        )
        self._set_role()
        now = asyncio.get_running_loop().time()
        if now - self._rejoined_at < _STEADY:
            # Lost again right after rejoining: each rejoin took every key into a call at
            # once, a Redis at its memory limit refused the reports, and the cycle ran every
            # few milliseconds (up to 219 batch calls a second).
            self._rejoin_wait = min(max(2 * self._rejoin_wait, _RETRY), _REJOIN_WAIT_MAX)
        else:
            self._rejoin_wait = 0.0  # at once: a dropped connection, Redis back already
        self._rejoin_at = now + self._rejoin_wait
        self._wake.set()  # _watch may be asleep for a while as a joined member

    async def _put_back(self) -> tuple[str, int, int]:
        """Join the member list again and write back what Redis may have lost: this
        member's keys in the registry, and its open jobs' journal rows. Returns what was
        written, in words for the log line, how many journal rows were written again, and
        how many of the jobs it follows other members claimed meanwhile (see _note_claimed)."""
        follower = self._follower
        assert follower is not None
        try:
            dropped = await self._membership.join()  # its gateway checked, as at open
        except FleetMismatchError as exc:
            self._keep_out(exc)
            raise
        finally:
            self._journal.use_gateway(*self._membership.gateway)
        self._kept_out = False
        if dropped:
            # Won the fleet back from a newcomer of another gateway: its leaders are fenced
            # out before this member's keys are registered, so they never ask about them.
            logger.warning(
                "fleet %s: member %s joined before the members of another gateway that took "
                "the fleet meanwhile: it takes the fleet back",
                self._config.name,
                self._member_id,
            )
            for lease in self._leases:
                await lease.try_acquire(take_from=dropped)
        # Before its keys are registered again: no report of theirs ends a job here before
        # the member knows whether another member claimed it.
        claimed = await self._note_claimed(follower)
        await follower.register_all()
        restored = await self._journal.restore()
        rows = f", and {restored} journal rows Redis had lost" if restored else ""
        return f"its {follower.keys} keys registered again{rows}", restored, claimed

    async def _note_claimed(self, follower: Follower) -> int:
        """Note which of the jobs this member follows other members claimed while the fleet
        held it dead (their journal rows are the claimers' now: their ``resume()`` returned
        the jobs, which resolve here too). Returns how many new."""
        taken = [k for k in await self._takeover.taken(follower.tracked_keys())
                 if k not in self._claimed]  # fmt: skip
        if taken:
            self._jobs_claimed += len(taken)
            self._claimed.update(dict.fromkeys(taken))
            for old in list(self._claimed)[: max(0, len(self._claimed) - _CLAIMED_KEPT)]:
                del self._claimed[old]
            self._claimed_keys = tuple(self._claimed)
        return len(taken)

    def _keep_out(self, refusal: FleetMismatchError) -> None:
        """The fleet's live members use another gateway: this member stays out (local, its
        keys out of the registry, lest their leader ask its gateway about them) and tries
        again every heartbeat interval, as the fleet may move back once they are gone."""
        if not self._kept_out:
            logger.error(
                "fleet %s: member %s may not join again: %s; it polls its own keys",
                self._config.name,
                self._member_id,
                refusal,
            )
        self._kept_out = True
        self._lost("refused on joining again (another gateway)")
        self._rejoin_at = asyncio.get_running_loop().time() + self._config.heartbeat_interval
        if self._follower is not None and self._follower.keys:
            self._background(self._follower.unregister_all(), "keep out")

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, set()
        within = self._config.command_timeout + 1.0
        await asyncio.gather(*(stop_task(task, within) for task in tasks))

    async def _rejoin(self) -> None:
        await self._stop_tasks()
        await self._journal.warm()
        written, _, claimed = await self._put_back()
        self._joins += 1
        if claimed:
            # Redis was away from it longer than member_timeout: the fleet declared it dead.
            written += f"; other members claimed {claimed} of its jobs meanwhile{_CLAIMED_HINT}"
        self._joined = True
        if self._poller is not None:
            self._poller.set_asking(False)
        self._start_tasks()
        self._rejoined_at = asyncio.get_running_loop().time()
        logger.warning(
            "fleet %s: member %s rejoined (%s)", self._config.name, self._member_id, written
        )
        self._set_role()

    async def _join_again(self, joins: int, *, unless_alive: bool = False) -> None:
        """The fleet declared this member dead (or Redis lost it) while it was alive: it
        joins again and registers its keys again; its tasks carry on (a lease it held has
        run out, and its leader saw that on its own clock). ``joins``: ``self._joins`` when
        the caller found it out; a join since then (another caller's) has done it all.
        ``unless_alive``: a heartbeat first, and nothing more if it lands."""
        async with self._joining:
            if joins != self._joins:
                return
            if unless_alive and await self._membership.heartbeat():
                return
            written, restored, claimed = await self._put_back()
            self._joins += 1
        timeout = self._config.member_timeout
        if claimed:
            what = (
                f"was declared dead (no heartbeat for {timeout:g}s) and other members claimed "
                f"{claimed} of its jobs{_CLAIMED_HINT}"
            )
        elif restored:
            what = "was forgotten by Redis (a FLUSHALL, or a restart without persistence)"
        else:
            what = f"was declared dead (no heartbeat for {timeout:g}s) or forgotten by Redis"
        logger.warning(
            "fleet %s: member %s %s; it joined again (%s)",
            self._config.name,
            self._member_id,
            what,
            written,
        )

    async def _check_in(self) -> None:
        """Heartbeat now, and join again if the fleet declared this member dead (the
        follower, woken from a freeze with reports waiting, asks before applying them). The
        heartbeat waits for a join under way: one that landed is no news until the claims
        are noted."""
        await self._join_again(self._joins, unless_alive=True)

    async def _watch(self) -> None:
        """Heartbeats and the fleet's figures while joined; rejoining while not."""
        loop = asyncio.get_running_loop()
        beat_at = loop.time() + self._config.heartbeat_interval
        while True:
            now = loop.time()
            wait = min(_FIGURES_EVERY, beat_at - now) if self._joined else self._rejoin_at - now
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                self._wake.clear()
                if not self._joined and loop.time() < self._rejoin_at:
                    continue  # woken by the loss itself: its wait comes first
            try:
                if not self._joined:
                    self._rejoin_at = loop.time() + _RETRY  # the next try, if this one fails
                    if not self._broken:
                        await self._rejoin()
                        beat_at = loop.time() + self._config.heartbeat_interval
                    continue
                joins = self._joins
                if loop.time() >= beat_at:
                    beat_at = loop.time() + self._config.heartbeat_interval
                    if not await self._membership.heartbeat():
                        await self._join_again(joins)
                        joins = self._joins
                if not await self._refresh_figures():
                    # Redis lost this member (a FLUSHALL, a restart without AOF) or the fleet
                    # declared it dead: join again now, not at the next heartbeat (a third of
                    # member_timeout away), so its keys are not left unpolled until then.
                    beat_at = loop.time() + self._config.heartbeat_interval
                    await self._join_again(joins)
            except FleetUnavailableError as exc:
                self._lost(str(exc))
            except FleetMismatchError:
                pass  # kept out (see _keep_out): tried again later

    # --- submits -------------------------------------------------------------------------------
    async def acquire(self, ready: Ready) -> None:
        # ``ready`` (the journal's intent) has its own patience for Redis: not _patiently's.
        limiter = self._limiter
        if limiter is None:
            await self._patiently(self._sit_out_pause)
            await ready()
        else:
            await limiter.acquire(ready, reserve=lambda: self._patiently(limiter.reserve))

    async def _sit_out_pause(self) -> None:
        if (paused := await self._pauses.paused_for()) > 0:
            await asyncio.sleep(paused)

    async def _patiently(self, step: Callable[[], Awaitable[_T]]) -> _T:
        """``step()`` (a turn's Redis part), tried again while Redis is away, until it has
        been away ``unavailable_wait`` seconds."""
        loop = asyncio.get_running_loop()
        wait = self._config.unavailable_wait
        # The wait counts from Redis's first failure, for every submit of this member at once:
        # time queued behind the fleet's rate is not time waiting for Redis (a submit queued
        # 10 s would fail at any blip), and submits queued behind one whose turn hangs on a
        # frozen Redis must not each wait a command deadline of their own in turn.
        while True:
            turn = asyncio.ensure_future(step())
            try:
                if not await self._ended_in_time(turn, wait):
                    raise self._gone_too_long(wait)
                try:
                    result = turn.result()
                except FleetUnavailableError as exc:
                    # Only a turn Redis failed is a failure of Redis. A turn given up above is
                    # not: counted as one, overlapping submits tried again at once kept the
                    # outage alive for each other, and every submit failed at once long after
                    # Redis was back.
                    now = loop.time()
                    since = self._outage_since(now)
                    if since is None:
                        since = self._failing_since = now
                    self._failing_last, self._failing_why = now, str(exc)
                    if now >= since + wait:
                        raise self._gone_too_long(wait) from None
                    await asyncio.sleep(min(_RETRY, since + wait - now))
                    continue
            finally:
                if not turn.done():
                    turn.cancel()  # a slot reserved and left unused is simply not used
            self._failing_since = None
            return result

    def _gone_too_long(self, wait: float) -> FleetUnavailableError:
        return FleetUnavailableError(
            f"the submit was not sent: fleet Redis unavailable for {wait:g}s ({self._failing_why})",
            url=self._config.url,
        )

    def _outage_since(self, now: float) -> float | None:
        """When Redis began failing this member's turns, if it still is (a failure within a
        command deadline and a retry); None while it answers, or when nobody asked lately."""
        since = self._failing_since
        if since is None or now - self._failing_last > self._config.command_timeout + 4 * _RETRY:
            return None
        return since

    async def _ended_in_time(self, turn: asyncio.Future[Any], wait: float) -> bool:
        """Wait for ``turn`` to end (True); False once Redis, failing (a turn of this member)
        since this one began, has been failing for ``wait`` seconds. Looks again every
        ``_RETRY``."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        while not turn.done():
            now = loop.time()
            since = self._outage_since(now)
            if since is not None and self._failing_last < began:
                since = None  # failures from before this turn: it gets its own chance
            left = _RETRY if since is None else min(_RETRY, since + wait - now)
            if left <= 0:
                return False
            await asyncio.wait({turn}, timeout=left)
        return True

    def _rate_limited(self, kind: str, retry_after: float | None) -> None:
        """A 429 on a submit with Retry-After: pause every member's submits that long."""
        if kind != "submit" or retry_after is None or retry_after <= 0:
            return
        self._background(self._pauses.pause(retry_after), "pause")

    # --- jobs ----------------------------------------------------------------------------------
    def tracked(self, job: ImageJob, first_delay: float | None) -> None:
        if self._follower is not None:
            self._follower.track(job, first_delay)

    async def resumable(self) -> list[JournalEntry]:
        joins = self._joins
        try:
            claim = await self._journal.claim_dead()
        except ClientStateError:
            # Not a live member. Redis lost it (a restart without AOF, FLUSHALL), or the fleet
            # claimed it: it joins again now rather than at its next heartbeat, then claims.
            # Expired (Redis was away from it longer than member_timeout) it does not: the
            # others' heartbeats may not have landed yet, and they would look dead.
            if await self._membership.beat() != "unknown":
                raise
            await self._join_again(joins)
            claim = await self._journal.claim_dead()
        for dead in claim.dead_members:
            with contextlib.suppress(FleetUnavailableError):
                await Inbox(self._link, dead).drop()
        accepted = await self._journal.entries("accepted", owned_by=self._member_id)
        return accepted + await self._journal.saves_cut_off()

    # --- figures -------------------------------------------------------------------------------
    def stats(self) -> FleetStats:
        calls = sum(leader.counters.batch_calls for leader in self._leaders)
        keys = sum(leader.counters.keys_polled for leader in self._leaders)
        return FleetStats(
            role=self._role,
            size=self._size,
            rate=self._limiter.rate if self._limiter is not None else None,
            batch_calls=self._fleet_calls,
            keys_polled=self._fleet_keys,
            mean_batch_fill=self._fleet_keys / self._fleet_calls if self._fleet_calls else 0.0,
            leader_calls=calls,
            leader_keys=keys,
            jobs_learned=self._poller.schedule.jobs_learned if self._poller is not None else 0,
            leaders=self._leader_ids,
            open_keys=self._follower.keys if self._follower is not None else 0,
            jobs_claimed_by_others=self._jobs_claimed,
            keys_claimed_by_others=self._claimed_keys,
        )

    async def _refresh_figures(self) -> bool:
        """Add this member's new leader calls to the fleet's figures, and read them back;
        False when the fleet does not hold this member as a live, joined member.

        The figures are other processes' writes: a counter that is not a number reads as 0,
        and a key of another type reads as no figures (not as Redis failing).
        """
        key, info = self._link.keys.stats, self._link.keys.member_info
        leases = [self._link.keys.lease(shard) for shard in range(self._config.shards)]
        now = self.stats()
        calls, keys = now.leader_calls - self._flushed_calls, now.leader_keys - self._flushed_keys

        async def exchange(redis: Any) -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                if calls:
                    pipe.hincrby(key, "batch_calls", calls)
                    pipe.hincrby(key, "keys_polled", keys)
                pipe.hgetall(key)
                # Joined members have their info; a journal write alone puts one back without.
                pipe.hexists(info, self._member_id)
                for lease in leases:  # who leads each shard, for FleetStats
                    pipe.get(lease)
                results: list[Any] = await pipe.execute(raise_on_error=False)
            for item in results:
                if isinstance(item, BaseException) and not refused_for_its_data(item):
                    raise item
            return results

        reply = await self._link.call(exchange, once=True)  # increments: not asked again
        self._flushed_calls, self._flushed_keys = now.leader_calls, now.leader_keys
        held, reply = reply[-len(leases) :], reply[: -len(leases)]
        self._leader_ids = tuple(lease_holder(value) for value in held)
        figures = reply[-2] if isinstance(reply[-2], dict) else {}
        self._fleet_calls = _counter(figures.get("batch_calls"))
        self._fleet_keys = _counter(figures.get("keys_polled"))
        ages = await self._membership.members()
        timeout = self._config.member_timeout
        self._size = max(1, sum(1 for age in ages.values() if age <= timeout))
        age = ages.get(self._member_id)
        has_info = reply[-1] not in (False, 0)  # only a definite "no" (not a refusal) counts
        return has_info and age is not None and age <= timeout


def _counter(raw: object) -> int:
    """A counter read back from Redis: a non-negative integer, else 0."""
    text = raw if isinstance(raw, str) else ""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 20 else 0
