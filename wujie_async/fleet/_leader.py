"""ShardLeader: a shard's leader asks the gateway about every member's keys of the shard.

While this member holds the shard's lease, its leader keeps a shadow job for every registered
key of the shard (the whole registry read when it starts leading, then its changes) and polls
them with an ordinary :class:`BatchPoller` on its client's schedule; each batch reply goes,
unread, to the owners of the keys asked. docs/guides/fleet.md tells why and how ("How the
shared poller works", "The leader", and "A leader cut off from the gateway", whose numbers are
the ``_STEP_DOWN_*`` here). What the guide leaves out:

- a shadow that ended takes its key out of the registry itself: the owners' own removals may
  never come (an owner may have died);
- a shadow of a key this member owns teaches the schedule nothing (``_learn_unless_mine``):
  the member's own job learns from the same replies, its reports, and each job is learned once;
- losing the lease, or Redis, ends every shadow: the next leader (maybe this member again)
  starts from the whole registry, so a report that was lost with Redis is asked for again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from .._config import Limits, PollPolicy
from .._errors import RateLimitedError, WujieError, shown_key
from .._failures import CallKind
from .._jobs import ImageJob
from .._poller import BatchPoller, BatchPoster
from .._replies import raw_entries_by_key
from .._schedule import PollSchedule
from .._stats import PollerCounters
from .._telemetry import Telemetry
from ._errors import LeaseLostError
from ._exchange import READ_LIMIT, VERDICTS, Change, KeyInfo, KeyRegistry, Report, post_reports
from ._lease import LeaderLease
from ._link import REDIS_MS, RedisLink, Script

if TYPE_CHECKING:
    from .._otel import BatchTrace

logger = logging.getLogger("wujie_async.fleet")

_TICK = 0.25  # the leader reads the registry's changes at least this often
_CALL_MARGIN = 0.1  # a batch call needs this much lease left (a quarter of a shorter lease)
_ROUND_TRIP = 0.01  # a registration's way to the leader, besides the tick (a generous guess)
# A shadow outlives its owner's deadline by this much (member clocks differ a little): the
# owner's own deadline fires first, and the leader asks until then.
_DEADLINE_MARGIN = 2.0
# A leader whose batch calls have all failed, at least _STEP_DOWN_CALLS of them, for this many
# lease lengths steps down (see the guide); a member that stepped down is not counted as one to
# hand over to for _STEP_DOWN_MEMORY times that long.
_STEP_DOWN_AFTER = 3.0
_STEP_DOWN_CALLS = 3
_STEP_DOWN_MEMORY = 20.0
# KEYS: members, stepped-down (sorted set: member -> Redis ms it stepped down). ARGV: member,
# member_timeout_ms, memory_ms. Reply: 1 (another live member that has not stepped down
# lately exists: this member is recorded as stepping down), 0 (nobody to hand over to).
_STEP_DOWN = (
    REDIS_MS
    + """
local now = redis_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
for _, other in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[2]), '+inf')) do
  if other ~= ARGV[1] and not redis.call('ZSCORE', KEYS[2], other) then
    redis.call('ZADD', KEYS[2], now, ARGV[1])
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
    return 1
  end
end
return 0
"""
)


class ShardLeader:
    """One shard's leader, ready to lead whenever this member holds the shard's lease.

    Its batch calls go through the client's transport, fenced by the lease, and its poller
    runs on the client's poll policy, limits and schedule: a new leader asks by what its member
    has learned, and its member learns from every job it leads for (see the module docstring).
    """

    def __init__(
        self,
        link: RedisLink,
        lease: LeaderLease,
        transport: BatchPoster,
        policy: PollPolicy,
        limits: Limits,
        schedule: PollSchedule,
    ) -> None:
        self._link = link
        self._lease = lease
        self._policy = policy
        self._registry = KeyRegistry(link)
        # The fleet's keys come due many a second: a call that is not full waits a moment
        # (batch_wait) while more come due, so calls go out full without asking any key
        # early. (A single client does not wait: its keys are fewer, and each wait costs.)
        self._fenced = _Fenced(transport, lease, self._replied)
        self._step_down = Script(link, _STEP_DOWN)
        self._poller = BatchPoller(
            self._fenced,
            policy,
            limits,
            schedule=schedule,
            gather=link.config.batch_wait,
        )
        self._tick = min(_TICK, policy.min_interval / 2)
        # A key reaches the leader up to a tick (and a round trip) after its submit. A poller
        # fills a call with keys due within batch_fill_horizon, so it must know a key that
        # long before its first ask to fill calls as a single client does: when the policy's
        # first_poll_delay leaves less room, first asks come that much later.
        self._first_delay = max(
            policy.first_poll_delay, self._tick + _ROUND_TRIP + policy.batch_fill_horizon
        )
        self._shadows: dict[str, tuple[ImageJob, set[str]]] = {}  # key -> (shadow, owners)
        self._outbox: defaultdict[str, list[Report]] = defaultdict(list)
        self._removals: list[tuple[str, str, None]] = []
        self._queued = asyncio.Event()
        self._stepping_down = False
        # The lease token of this leader's last term, whether it stepped down from it, and
        # until when (loop time) it does not step down again: it took the lease back with the
        # next token, so nobody took it meanwhile (another live member that never leads).
        self._last_token: int | None = None
        self._stepped_down = False
        self._no_taker_until = -math.inf

    @property
    def counters(self) -> PollerCounters:
        """The leader's batch calls (over all its terms)."""
        return self._poller.counters

    async def lead(self) -> None:
        """Lead while the lease holds; returns once it is lost.

        Raises:
            FleetUnavailableError: Redis failed (in an ExceptionGroup): the leadership is over.
        """
        shard = self._lease.shard
        self._fenced.answered()
        self._note_hand_over()
        stepping_down = False
        try:
            version, changes = await self._registry.read(shard, self._lease.require(0), None)
            self._follow(changes)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._poller.run)
                tasks.start_soon(self._send)
                tasks.start_soon(self._read_changes, version)
                tasks.start_soon(self._watch_calls, tasks.cancel_scope)
                await self._lease.keep()
                tasks.cancel_scope.cancel()
            stepping_down = self._stepping_down
        except* LeaseLostError:
            pass  # fenced out: a successor leads
        finally:
            self._stepping_down = False
            self._lease.step_down()
            self._shadows = {}
            self._outbox.clear()
            self._removals.clear()
            self._poller.cancel_all(f"member {self._lease.member_id} stopped leading")
        self._stepped_down = stepping_down
        if stepping_down:  # its tasks have stopped: no batch call of its goes out any more
            await self._lease.release()
            self._lease.stand_aside()

    def _note_hand_over(self) -> None:
        """At a term's start: if this leader stepped down last and nobody led since (its
        token is the next one), its hand-over found no taker; it does not step down again
        for ``_STEP_DOWN_MEMORY`` spans (it stepped down and took the lease back every few
        lease lengths). Once another member has led (a token in between), hand-overs work:
        that pause ends, however this leader's last term ended."""
        last, self._last_token = self._last_token, self._lease.token
        if last is None or self._last_token != last + 1:
            self._no_taker_until = -math.inf
        elif self._stepped_down:
            span = _STEP_DOWN_MEMORY * _STEP_DOWN_AFTER * self._lease.seconds
            self._no_taker_until = asyncio.get_running_loop().time() + span
        self._stepped_down = False  # until this term steps down

    async def _watch_calls(self, scope: anyio.CancelScope) -> None:
        """Step down (cancel ``scope``) once the batch calls have all failed for long, and
        another live member may do better (the guide's "A leader cut off from the gateway")."""
        loop = asyncio.get_running_loop()
        after = _STEP_DOWN_AFTER * self._lease.seconds
        keys = self._link.keys
        stepped = keys.stepped_down(self._lease.shard)
        member = self._lease.member_id
        timeout_ms = round(self._link.config.member_timeout * 1000)
        memory_ms = round(_STEP_DOWN_MEMORY * after * 1000)
        next_ask = 0.0
        while True:
            await asyncio.sleep(self._lease.seconds / 3)
            since, now = self._fenced.failing_since, loop.time()
            if (
                since is None
                or self._fenced.failed_calls < _STEP_DOWN_CALLS
                or now - since < after
                or now < next_ask
            ):
                continue
            if now < self._no_taker_until:
                nobody = "its last hand-over found no taker"
            elif int(
                await self._step_down((keys.members, stepped), (member, timeout_ms, memory_ms))
            ):
                logger.warning(
                    "fleet member %s steps down as leader of shard %d: its %d batch calls of "
                    "the last %.1fs all failed (last: %s); another member takes over",
                    member,
                    self._lease.shard,
                    self._fenced.failed_calls,
                    now - since,
                    self._fenced.last_failure,
                )
                self._stepping_down = True
                scope.cancel()
                return
            else:
                nobody = "no other live member that has not stepped down lately to hand over to"
            logger.info(
                "fleet member %s keeps leading shard %d though its batch calls of the last "
                "%.1fs all failed (last: %s): %s",
                member,
                self._lease.shard,
                now - since,
                self._fenced.last_failure,
                nobody,
            )
            next_ask = now + after  # asked again after as long

    async def _read_changes(self, version: int) -> None:
        while True:
            fence = self._lease.require(0)
            version, changes = await self._registry.read(self._lease.shard, fence, version)
            self._follow(changes)
            if len(changes) < READ_LIMIT:  # a full read: more may be waiting
                await asyncio.sleep(self._tick)

    def _follow(self, changes: list[Change]) -> None:
        """Take registry changes in: new keys get a shadow, keys nobody owns lose theirs."""
        loop = asyncio.get_running_loop()
        now, unix_now = loop.time(), time.time()
        for change in changes:
            key, owner, info = change.job_key, change.owner, change.info
            found = self._shadows.get(key)
            if info is None:
                if found is not None:
                    found[1].discard(owner)
                    if not found[1]:
                        del self._shadows[key]
                        found[0].cancel()  # nobody waits for it
                    else:
                        self._learn_unless_mine(*found)
            elif found is None:
                self._shadow(key, info, {owner}, now, unix_now)
            elif now + info.deadline - unix_now > found[0].deadline:
                # An owner waits well past the shadow's deadline (it attached the key again
                # once its own wait ended; a registration merely repeated, on rejoining, is
                # within the margin): a new shadow asks until then.
                del self._shadows[key]
                found[0].cancel()
                self._shadow(key, info, found[1] | {owner}, now, unix_now)
            else:
                found[1].add(owner)
                self._learn_unless_mine(*found)

    def _learn_unless_mine(self, shadow: ImageJob, owners: set[str]) -> None:
        """A shadow teaches the schedule unless this member owns its key: the member's own
        job learns from the same replies (its reports), and shares the schedule."""
        self._poller.set_learning(shadow, self._lease.member_id not in owners)

    def _shadow(
        self, key: str, info: KeyInfo, owners: set[str], now: float, unix_now: float
    ) -> None:
        """A shadow job for ``key``, polled until the owners' deadline (``info``'s)."""
        shadow = ImageJob(
            key,
            asyncio.get_running_loop(),
            deadline=now + info.deadline - unix_now + _DEADLINE_MARGIN,
            request={"model": info.model} if info.model is not None else None,
            on_cancel=self._poller.forget,
        )
        self._shadows[key] = (shadow, owners)
        shadow.add_done_callback(self._shadow_ended)
        first = self._first_delay if info.first_delay is None else info.first_delay
        # Its age counts from the member's submit, not from this leader's start: the
        # schedule judges when it can end (and learns durations) from its age.
        self._poller.track(
            shadow,
            max(0.0, info.submitted + first - unix_now),
            age=max(0.0, unix_now - info.submitted),
            learn=self._lease.member_id not in owners,  # (_learn_unless_mine)
        )

    def _replied(self, keys: list[str], data: Any) -> None:
        """A batch call's reply: each owner's keys and their raw entries, to post."""
        try:
            grouped = raw_entries_by_key(data, set(keys))
        except Exception:  # no list of entries: the poller counts the call as failed
            return
        reports: dict[str, Report] = {}
        for key in keys:
            found = self._shadows.get(key)
            for owner in found[1] if found is not None else ():
                report = reports.setdefault(owner, Report())
                report.keys.append(key)
                report.data.extend(grouped.get(key, ()))
        for owner, report in reports.items():
            self._outbox[owner].append(report)
        self._queued.set()

    def _shadow_ended(self, shadow: ImageJob) -> None:
        key = shadow.key
        found = self._shadows.get(key)
        if found is None or found[0] is not shadow:
            return  # cancelled: nobody owns it, or the leadership ended
        del self._shadows[key]
        owners = found[1]
        error = shadow.exception()
        verdict = VERDICTS.get(type(error).__name__)
        if verdict is not None and type(error) is verdict:
            why = str(error).removeprefix(f"job {shown_key(key)}: ")
            for owner in owners:
                self._outbox[owner].append(Report(ended={key: (verdict.__name__, why)}))
        self._removals += [(owner, key, None) for owner in owners]
        self._queued.set()

    async def _send(self) -> None:
        """Post reports, then take ended keys out of the registry (after their reports)."""
        while True:
            await self._queued.wait()
            self._queued.clear()
            outbox, self._outbox = self._outbox, defaultdict(list)
            removals, self._removals = self._removals, []
            await post_reports(self._link, outbox)
            if removals:
                await self._registry.write(removals)


class _Fenced:
    """The client's transport as a leader uses it: no batch call without lease time left, and
    every reply handed to the leader to post."""

    def __init__(
        self,
        transport: BatchPoster,
        lease: LeaderLease,
        replied: Callable[[list[str], Any], None],
    ) -> None:
        self._transport = transport
        self._lease = lease
        self._replied = replied
        self._margin = min(_CALL_MARGIN, lease.seconds / 4)
        # Since when every batch call has failed (None: the last one got a reply), how many,
        # and the last failure's kind. A 429 is an answer: the gateway is reachable.
        self.failing_since: float | None = None
        self.failed_calls = 0
        self.last_failure = ""

    @property
    def telemetry(self) -> Telemetry:
        """The client's telemetry (the poller's batch spans and warnings go through it)."""
        return self._transport.telemetry

    async def post(
        self,
        path: str,
        body: Any,
        *,
        kind: CallKind,
        parent: BatchTrace | None = None,
        on_wire: Callable[[bool], None] | None = None,
    ) -> Any:
        self._lease.require(self._margin)  # LeaseLostError: the call fails, nothing is sent
        try:
            data = await self._transport.post(path, body, kind=kind, parent=parent, on_wire=on_wire)
        except RateLimitedError:
            self.answered()
            raise
        except WujieError as exc:
            if self.failing_since is None:
                self.failing_since = asyncio.get_running_loop().time()
            self.failed_calls += 1
            self.last_failure = type(exc).__name__
            raise
        self.answered()
        self._replied(body, data)
        return data

    def answered(self) -> None:
        """The gateway answered (or a leadership begins): no run of failed calls."""
        self.failing_since, self.failed_calls = None, 0

    def brake_free_in(self, kind: CallKind) -> float:
        return self._transport.brake_free_in(kind)
