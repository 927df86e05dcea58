"""FleetMember: one WujieClient's part in a fleet (made by ``WujieClient(fleet=...)``).

How the poller is shared:

* The owner of a job keeps its job, its futures and its learned poll schedule, exactly as
  without a fleet. When its poller tracks a key, or applies a report about it, the owner
  registers the key's next due time (from its own schedule) in the fleet's key registry.
* The leader of a shard (one lease per shard) takes the keys due (every member's, topping the
  last call up with keys due within ``PollPolicy.min_interval``: see ``_fill_horizon``),
  pushes them ``hold`` seconds ahead, asks the gateway in calls of up to 50, and posts each
  key's raw entries to its owner's report stream. It never reschedules a key it answered: the
  owner does, from its schedule, when it applies the report (through the poller's one
  dispatch code).
* Each member's schedule learns from every member's ended jobs (``SharedLessons``): a member
  with a trickle of jobs polls as well as one process doing the fleet's jobs would.
* A member's local poller does not ask the gateway while this member is connected: keys that
  come due locally are looked at again after ``hold`` (and re-registered if the registry
  lost them); deadlines still fire locally.
* Redis away: every member polls its own keys locally (a WARNING), and rejoins when Redis
  answers again (re-registering its keys). A leader whose lease ran out sends nothing more
  (``LeaderLease.require`` before every call; taking keys is fenced).

Submits: the fleet-wide rate (``FleetLimiter``) and 429 pause in place of the local pacer.
While Redis is away a submit waits up to ``RedisFleet(unavailable_wait=...)`` for its slot
and for its journal intent, then raises ``FleetUnavailableError``: nothing was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .. import _contract
from .._config import Limits, PollPolicy
from .._errors import ResponseTooLargeError, WujieError, snippet
from .._fleet_link import FleetStats
from .._journal import JournalEntry
from .._poller import BatchPoller, raw_entries_by_key
from .._schedule import Lesson
from .._transport import Transport
from ._errors import FleetUnavailableError, LeaseLostError
from ._fleet import raise_failures
from ._journal import RedisJournal
from ._registry import DueBatch, DueKey
from ._reports import Report

if TYPE_CHECKING:
    from ._fleet import RedisFleet
    from ._lease import LeaderLease
    from ._limiter import FleetLimiter

logger = logging.getLogger("wujie_async.fleet")

_TICK = 0.25  # a leader looks for newly registered keys at least this often
# A leader lets due keys gather this share of min_interval before it asks (see _next_take_in).
_GATHER_SHARE = 0.2
_RETRY = 0.5  # a member away from Redis tries it again this often
_STATS_EVERY = 1.0
_LESSONS_EVERY = 0.5  # lessons are sent and read this often
_LESSONS_KEPT = 1_000  # unsent lessons kept while Redis is away (the newest)


class FleetMember:
    """A client's membership of ``fleet`` (see the module docstring). Satisfies FleetLink."""

    def __init__(self, fleet: RedisFleet) -> None:
        self._fleet = fleet
        config = fleet.config
        self._member_id = fleet.new_member_id()
        self._token = self._member_id.rsplit(":", 1)[-1]
        self._journal = fleet.journal(self._member_id)
        self._membership = fleet.membership(self._member_id)
        self._registry = fleet.registry()
        self._outbox = fleet.outbox()
        self._inbox = fleet.inbox(self._member_id)
        self._lessons = fleet.lessons(self._member_id)
        self._unsent_lessons: deque[Lesson] = deque(maxlen=_LESSONS_KEPT)
        self._lessons_learned = 0
        self._leases: list[LeaderLease] = [
            fleet.lease(shard, self._member_id) for shard in range(config.shards)
        ]
        # How long a key taken into a poll stays away from other pollers; also how long a
        # delegated key waits locally for its report before the owner looks at it again.
        self._hold = max(2.0, 2 * config.lease_seconds)
        self._owns_fleet = False
        self._healthy = True
        self._broken = False  # a background task failed (a bug): local polling for good
        self._resigning: asyncio.Task[None] | None = None
        self._limiter: FleetLimiter | None = None
        self._poller: BatchPoller | None = None
        self._transport: Transport | None = None
        self._policy = PollPolicy()
        self._call_slots: asyncio.Semaphore | None = None
        self._max_polls = 1
        self._to_register: dict[str, float] = {}
        self._to_ensure: set[str] = set()
        self._to_remove: set[str] = set()
        self._changed: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._leader_calls = self._leader_keys = 0
        self._unflushed_calls = self._unflushed_keys = 0
        self._size = 1
        self._fleet_calls = self._fleet_keys = 0

    def __repr__(self) -> str:
        return f"FleetMember({self._fleet.config.name!r}, member={self._member_id!r})"

    @property
    def member_id(self) -> str:
        """This member's id, unique across the fleet."""
        return self._member_id

    @property
    def header_token(self) -> str:
        """The random part of the member id, sent as ``X-Wujie-Member``."""
        return self._token

    @property
    def journal(self) -> RedisJournal:
        """The fleet's journal, writing as this member."""
        return self._journal

    @property
    def healthy(self) -> bool:
        """False while Redis is away (this member then polls its own keys)."""
        return self._healthy

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(
        self, *, poller: BatchPoller, transport: Transport, poll: PollPolicy, limits: Limits
    ) -> None:
        """Connect (unless started), join, and start the background tasks.

        Raises:
            FleetUnavailableError: Redis cannot be reached (the message names its URL).
        """
        if not self._fleet.started:
            await self._fleet.start()
            self._owns_fleet = True
        try:
            await self._membership.start()
            for lease in self._leases:
                await lease.start()
        except BaseException:
            await self.aclose()
            raise
        self._poller, self._transport, self._policy = poller, transport, poll
        if limits.max_submits_per_second is not None:
            self._limiter = self._fleet.limiter(limits.max_submits_per_second)
        self._call_slots = asyncio.Semaphore(limits.max_concurrent_polls)
        self._max_polls = limits.max_concurrent_polls
        self._changed = asyncio.Event()
        poller.set_delegate(self)
        poller.share_lessons(self._unsent_lessons.append)
        transport.on_rate_limited = self._rate_limited
        self._spawn(self._read_reports(), "reports")
        self._spawn(self._write_registry(), "registry")
        self._spawn(self._watch(), "watch")
        self._spawn(self._share_lessons(), "lessons")
        for lease in self._leases:
            self._spawn(self._lead(lease), f"leader {lease.shard}")

    def _spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(work, name=f"wujie fleet {what}")
        self._tasks.add(task)
        task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None or self._broken:
            return
        # A bug. Rejoining would leave that task's work undone (reports unread, a shard
        # unpolled while its lease is still renewed), so this member polls its own keys for
        # good, and gives its leases up so another member polls the fleet's keys.
        logger.error(
            "fleet task %s stopped: %r; member %s polls its own keys from now on",
            task.get_name(),
            task.exception(),
            self._member_id,
        )
        self._lost_redis("a fleet task stopped")
        self._broken = True
        # Not one of self._tasks: stop_polling must not cancel it half-way (a lease left
        # held, or a key left registered); aclose() waits for it.
        self._resigning = asyncio.create_task(self._resign(), name="wujie fleet resign")

    async def _resign(self) -> None:
        """Give up every lease, and take this member's keys out of the registry (it polls
        them itself now: a leader asking too would ask twice)."""
        for lease in self._leases:
            await lease.aclose()  # idempotent; Redis away: the lease runs out by itself
        with contextlib.suppress(FleetUnavailableError):
            for shard in range(self._fleet.config.shards):
                owners = await self._registry.owners(shard)
                await self._registry.remove(
                    [key for key, owner in owners.items() if owner == self._member_id]
                )

    async def stop_polling(self) -> None:
        """Stop leading and reading reports (before the client's transport closes)."""
        tasks, self._tasks = self._tasks, set()
        await asyncio.gather(*(self._fleet.stop_task(task) for task in tasks))
        if self._poller is not None:
            self._poller.set_delegate(None)
            self._poller.share_lessons(None)
        if self._transport is not None:
            self._transport.on_rate_limited = None

    async def aclose(self) -> None:
        """Release leases, leave (this member's open jobs are claimable at once), disconnect."""
        await self.stop_polling()
        if self._resigning is not None:
            # Let it finish (each of its Redis calls has a deadline), then make sure it has.
            calls = 2 + 2 * self._fleet.config.shards
            await asyncio.wait(
                {self._resigning}, timeout=calls * self._fleet.config.command_timeout
            )
            await self._fleet.stop_task(self._resigning)
        try:
            for lease in self._leases:
                await lease.aclose()
            await self._membership.aclose(leave=True)
        finally:
            if self._owns_fleet:
                self._owns_fleet = False
                await self._fleet.aclose()

    # --- submits -------------------------------------------------------------------------------
    async def acquire(self) -> None:
        """Wait for this submit's turn: the fleet's rate (if set) and its 429 pause.

        Raises:
            FleetUnavailableError: Redis stayed away for ``unavailable_wait`` (nothing sent).
        """
        loop = asyncio.get_running_loop()
        wait = self._fleet.config.unavailable_wait
        deadline = loop.time() + wait
        while True:
            try:
                if self._limiter is not None:
                    await self._limiter.acquire()
                else:
                    paused = await self._fleet.limiter(1.0).paused_for()
                    if paused > 0:
                        await asyncio.sleep(paused)
                return
            except FleetUnavailableError as exc:
                if loop.time() >= deadline:
                    raise FleetUnavailableError(
                        f"the submit was not sent: fleet Redis unavailable for {wait:g}s ({exc})",
                        url=exc.url,
                    ) from None
                await asyncio.sleep(min(0.25, max(0.0, deadline - loop.time())))

    def _rate_limited(self, kind: str, retry_after: float | None) -> None:
        """A 429 on a submit with Retry-After: pause every member's submits that long."""
        if kind != "submit" or retry_after is None or retry_after <= 0:
            return
        limiter = self._limiter or self._fleet.limiter(1.0)
        self._spawn(self._pause(limiter, retry_after), "pause")

    @staticmethod
    async def _pause(limiter: FleetLimiter, seconds: float) -> None:
        with contextlib.suppress(FleetUnavailableError):
            await limiter.pause(seconds)

    # --- the key registry (this member's keys) ---------------------------------------------------
    def tracked(self, key: str) -> None:
        """Register ``key`` with the due time its poller gave it."""
        poller = self._poller
        due = poller.next_due(key) if poller is not None else None
        if due is not None:
            self._register(key, due)

    def ended(self, key: str) -> None:
        """``key``'s job ended: take it out of the registry."""
        self._to_register.pop(key, None)
        self._to_ensure.discard(key)
        self._to_remove.add(key)
        if self._changed is not None:
            self._changed.set()

    def _register(self, key: str, due: float) -> None:
        self._to_remove.discard(key)
        self._to_register[key] = due
        if self._changed is not None:
            self._changed.set()

    def take(self, keys: list[str]) -> float | None:
        """PollDelegate: keys due locally. While connected the leader asks for them."""
        if not self._healthy:
            return None
        # Normally already registered (a no-op); re-adds any the registry lost.
        self._to_ensure.update(keys)
        if self._changed is not None:
            self._changed.set()
        return self._hold

    def moved(self, due_times: dict[str, float]) -> None:
        """PollDelegate: keys due sooner (the learned window widened): register the new times."""
        if self._healthy:
            for key, due in due_times.items():
                self._register(key, due)

    async def _write_registry(self) -> None:
        changed = self._changed
        assert changed is not None
        loop = asyncio.get_running_loop()
        while True:
            await changed.wait()
            changed.clear()
            if not self._healthy:
                # Rejoining re-registers every tracked key; what ended meanwhile is removed
                # when its next report finds it gone.
                self._to_register.clear()
                self._to_ensure.clear()
                self._to_remove.clear()
                continue
            removes, self._to_remove = self._to_remove, set()
            registers, self._to_register = self._to_register, {}
            ensures, self._to_ensure = self._to_ensure - registers.keys(), set()
            now = loop.time()
            try:
                if removes:
                    await self._registry.remove(removes)
                if registers:
                    due_in = {key: due - now for key, due in registers.items()}
                    await self._registry.register(self._member_id, due_in)
                if ensures:
                    await self._registry.register(
                        self._member_id, dict.fromkeys(ensures, 0.0), only_new=True
                    )
            except FleetUnavailableError as exc:
                self._lost_redis(str(exc))

    # --- reports (a leader's answers about this member's keys) ---------------------------------
    async def _read_reports(self) -> None:
        poller = self._poller
        assert poller is not None
        while True:
            try:
                reports = await self._inbox.read(1.0)
            except FleetUnavailableError as exc:
                self._lost_redis(str(exc))
                await asyncio.sleep(_RETRY)
                continue
            for report in reports:
                self._apply(poller, report)
            if reports:
                try:
                    await self._inbox.ack(reports)
                except FleetUnavailableError as exc:
                    self._lost_redis(str(exc))  # applying them again is harmless

    def _apply(self, poller: BatchPoller, report: Report) -> None:
        key, body = report.job_key, report.body
        entries = body.get("e")
        due = poller.apply_report(
            key,
            entries if isinstance(entries, list) else None,
            too_large=body.get("too_large") is True,
        )
        if due is not None:
            self._register(key, due)
        else:
            job = poller.get(key)
            if job is None or job.done():
                self.ended(key)  # nobody here waits for it: stop the fleet polling it

    # --- the schedule's lessons, shared -------------------------------------------------------
    async def _share_lessons(self) -> None:
        poller = self._poller
        assert poller is not None
        while True:
            more = False
            if self._healthy:
                outgoing = list(self._unsent_lessons)
                self._unsent_lessons.clear()
                try:
                    exchange = await self._lessons.exchange(outgoing)
                except FleetUnavailableError as exc:
                    # Sent when Redis is back; the newest are kept if there are too many.
                    self._unsent_lessons.extend(outgoing[-_LESSONS_KEPT:])
                    self._lost_redis(str(exc))
                else:
                    more = exchange.more
                    for lessons in exchange.entries:
                        poller.learn(lessons)
                        self._lessons_learned += len(lessons)
                        await asyncio.sleep(0)  # a long backlog does not hold up the loop
            if not more:
                await asyncio.sleep(_LESSONS_EVERY)

    # --- leading a shard -----------------------------------------------------------------------
    async def _lead(self, lease: LeaderLease) -> None:
        slots = self._call_slots
        assert slots is not None
        calls: set[asyncio.Task[None]] = set()
        size = _contract.MAX_KEYS_PER_BATCH
        limit = size * self._max_polls
        tick = min(_TICK, self._policy.min_interval / 2)
        fill_horizon = _fill_horizon(self._policy)
        gather = self._policy.min_interval * _GATHER_SHARE
        loop = asyncio.get_running_loop()
        try:
            while True:
                await lease.leading.wait()
                try:
                    fence = lease.require(tick)
                    batch = await self._registry.take_due(
                        lease.shard,
                        fence,
                        limit=limit,
                        hold=self._hold,
                        fill_horizon=fill_horizon,
                        call_size=size,
                    )
                except LeaseLostError:
                    await asyncio.sleep(tick)
                    continue
                except FleetUnavailableError as exc:
                    self._lost_redis(str(exc))
                    await asyncio.sleep(_RETRY)
                    continue
                # Measured from the take: waiting for a call slot below does not add to it.
                wake_at = loop.time() + _next_take_in(batch, tick, gather)
                for start in range(0, len(batch.keys), size):
                    await slots.acquire()
                    task = asyncio.create_task(self._ask(lease, batch.keys[start : start + size]))
                    calls.add(task)
                    task.add_done_callback(calls.discard)
                    task.add_done_callback(lambda _: slots.release())
                if len(batch.keys) >= limit:
                    continue  # more may be due at once
                await asyncio.sleep(max(wake_at - loop.time(), 0.005))
        finally:
            for task in calls:
                task.cancel()

    async def _ask(self, lease: LeaderLease, chunk: list[DueKey]) -> None:
        """One batch call for ``chunk``, its answers posted to their owners."""
        transport = self._transport
        assert transport is not None
        try:
            fence = lease.require(0.1)  # fenced: a deposed (or frozen) leader sends nothing
        except LeaseLostError:
            return  # the keys come back to the registry after ``hold``
        keys = [due.job_key for due in chunk]
        self._leader_calls += 1
        self._leader_keys += len(keys)
        self._unflushed_calls += 1
        self._unflushed_keys += len(keys)
        try:
            data = await transport.post(_contract.BATCH_INFO_PATH, keys, kind="poll")
            grouped = raw_entries_by_key(data, set(keys))
        except ResponseTooLargeError:
            await self._split(lease, chunk)
            return
        except FleetUnavailableError as exc:  # not from the transport, but be sure
            self._lost_redis(str(exc))
            return
        except WujieError as exc:
            logger.warning("fleet batch query of %d keys failed: %s", len(keys), snippet(str(exc)))
            with contextlib.suppress(WujieError):  # LeaseLostError, FleetUnavailableError
                await self._registry.reschedule(
                    lease.shard, fence, dict.fromkeys(keys, self._policy.min_interval)
                )
            return
        reports = [
            (due.owner, Report(due.job_key, {"e": grouped.get(due.job_key)}))
            for due in chunk
            if due.owner
        ]
        try:
            await self._outbox.post(reports)
        except FleetUnavailableError as exc:
            self._lost_redis(str(exc))  # the keys come back after ``hold``

    async def _split(self, lease: LeaderLease, chunk: list[DueKey]) -> None:
        if len(chunk) == 1:
            [due] = chunk
            if due.owner:
                with contextlib.suppress(FleetUnavailableError):
                    await self._outbox.post([(due.owner, Report(due.job_key, {"too_large": True}))])
            return
        middle = len(chunk) // 2
        await self._ask(lease, chunk[:middle])
        await self._ask(lease, chunk[middle:])

    # --- Redis lost and found ------------------------------------------------------------------
    def _lost_redis(self, why: str) -> None:
        if not self._healthy:
            return
        self._healthy = False
        logger.warning(
            "fleet %s: Redis unavailable (%s); member %s polls its own keys until it is back",
            self._fleet.config.name,
            why,
            self._member_id,
        )
        if self._poller is not None:
            self._poller.poll_soon()

    async def _watch(self) -> None:
        """Rejoin when Redis is back; keep the fleet's figures fresh meanwhile."""
        while True:
            await asyncio.sleep(_RETRY if not self._healthy else _STATS_EVERY)
            if self._membership.lost.is_set():
                self._lost_redis("this member was declared dead; it polls its own keys")
                continue
            try:
                if not self._healthy and not self._broken:
                    await self._rejoin()
                await self._refresh_stats()
            except FleetUnavailableError as exc:
                self._lost_redis(str(exc))

    async def _rejoin(self) -> None:
        poller = self._poller
        assert poller is not None
        await self._fleet.call(lambda r: r.ping())
        now = asyncio.get_running_loop().time()
        due_in = {key: max(0.0, due - now) for key, due in poller.due_times().items()}
        if due_in:
            await self._registry.register(self._member_id, due_in)
        self._healthy = True
        logger.warning(
            "fleet %s: Redis is back; member %s rejoined (%d keys registered)",
            self._fleet.config.name,
            self._member_id,
            len(due_in),
        )

    async def _refresh_stats(self) -> None:
        key = self._fleet.keys.stats
        calls, keys = self._unflushed_calls, self._unflushed_keys
        self._unflushed_calls = self._unflushed_keys = 0

        async def exchange(redis: Any) -> Any:
            async with redis.pipeline(transaction=False) as pipe:
                if calls:
                    pipe.hincrby(key, "batch_calls", calls)
                    pipe.hincrby(key, "keys_polled", keys)
                pipe.hgetall(key)
                result = await pipe.execute(raise_on_error=False)
            raise_failures(result)
            return result

        try:
            reply = await self._fleet.call(exchange)
        except FleetUnavailableError:
            self._unflushed_calls += calls
            self._unflushed_keys += keys
            raise
        # Another process's writes: a counter that is not a number reads as 0 (the figures
        # are for show; polling does not depend on them).
        figures = reply[-1] if isinstance(reply[-1], dict) else {}
        self._fleet_calls = _counter(figures.get("batch_calls"))
        self._fleet_keys = _counter(figures.get("keys_polled"))
        self._size = max(1, len(await self._membership.live_members()))

    # --- takeover and stats --------------------------------------------------------------------
    async def claim_dead(self) -> list[JournalEntry]:
        """Claim dead members' accepted submits (atomically, each to one member)."""
        claim = await self._journal.claim_dead()
        for dead in claim.dead_members:
            # Their keys are registered again under this member as they are attached.
            with contextlib.suppress(FleetUnavailableError):
                await self._fleet.inbox(dead).drop()
        return claim.entries

    def stats(self) -> FleetStats:
        """A snapshot of the fleet as this member sees it."""
        if not self._healthy:
            role = "local"
        elif any(lease.remaining() > 0 for lease in self._leases):
            role = "leader"
        else:
            role = "follower"
        return FleetStats(
            role=role,
            size=self._size,
            rate=self._limiter.rate if self._limiter is not None else None,
            batch_calls=self._fleet_calls,
            keys_polled=self._fleet_keys,
            leader_calls=self._leader_calls,
            leader_keys=self._leader_keys,
            lessons_learned=self._lessons_learned,
        )


def _counter(raw: object) -> int:
    """A counter read back from Redis: a non-negative integer, else 0."""
    text = raw if isinstance(raw, str) else ""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 20 else 0


def _next_take_in(batch: DueBatch, tick: float, gather: float) -> float:
    """Seconds until a leader takes due keys again (after ``batch``).

    When the earliest key has been due ``gather`` seconds, or when enough keys for a full
    call are due, whichever comes first; at least every ``tick`` (new keys are registered
    meanwhile). Taking at the first due key would fill each call with keys taken early, and
    each key taken early is asked about once more than its schedule needs.
    """
    wait = tick
    if batch.next_due_in is not None:
        wait = min(wait, batch.next_due_in + gather)
    if batch.full_due_in is not None:
        wait = min(wait, batch.full_due_in)
    return wait


def _fill_horizon(policy: PollPolicy) -> float:
    """How far ahead a leader tops up a call that has room: one ``min_interval`` at least.

    A key the schedule asks about densely is asked every ``min_interval``, so taking it up to
    that much early changes no lateness (it is asked sooner, never later) and puts every
    member's dense keys on one cadence: calls go out fuller and fewer. A lone client keeps
    ``batch_fill_horizon``: its few keys gain little from this, and each early ask costs one.
    """
    return max(policy.batch_fill_horizon, policy.min_interval)


__all__ = ["FleetMember"]
