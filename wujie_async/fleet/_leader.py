"""ShardLeader: while this member holds a shard's lease, it polls every key of the shard, whoever's
it is, with one ordinary BatchPoller and its ordinary PollSchedule.

A term starts with a marker in the shard's key log and a request to every member to announce
the keys it follows; the leader reads the log on from the marker. It keeps a stand-in job for
each key someone follows, and its poller asks about them exactly as a lone client asks about
its own: the fleet's keys share calls, and the schedule learns from every job. The leader is
its poller's transport (:meth:`ShardLeader.post`): before each call it checks that the lease has
time left (a leader frozen past its lease sends nothing when it thaws), and after it posts the
reply to the owners of the keys asked, who judge the entries themselves. When it gives up on a
key for a reason no entry shows, it tells the owners so.

A term ends when the lease has no time left; its stand-ins are dropped (the next term's leader
hears of the keys again). The poller, and what its schedule learned, stay for the next term.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from .._config import Limits, PollPolicy
from .._errors import JobProtocolError, UnknownJobError
from .._jobs import ImageJob, JobState
from .._poller import BatchPoller
from .._replies import raw_entries_by_key
from .._telemetry import Telemetry
from .._transport import CallKind, Transport
from ._errors import FleetUnavailableError
from ._lease import LeaderLease
from ._membership import Membership
from ._redis import RETRY
from ._registry import Follow, KeyRegistry
from ._reports import Announce, Ending, Reply, Report, ReportOutbox

if TYPE_CHECKING:
    from .._otel import BatchTrace

_CALL_MARGIN = 0.1  # a batch call goes out only with this much lease left
_LOG_WAIT = 0.25  # the lease is looked at again at least this often


class ShardLeader:
    """Leads one shard whenever this member holds its lease (see the module docstring).

    Attributes:
        calls: batch calls this member sent as the shard's leader.
        keys: keys those calls asked about.
    """

    def __init__(
        self,
        *,
        lease: LeaderLease,
        membership: Membership,
        registry: KeyRegistry,
        outbox: ReportOutbox,
        transport: Transport,
        policy: PollPolicy,
        limits: Limits,
        on_redis_lost: Callable[[str], None],
    ) -> None:
        self.lease = lease
        self.calls = self.keys = 0
        self._membership = membership
        self._registry = registry
        self._outbox = outbox
        self._transport = transport
        self._lost = on_redis_lost
        # A key asked densely is asked every min_interval anyway: topping a call up with keys
        # due within one min_interval asks nothing sooner than its schedule needs by more
        # than that, and puts a fleet's many dense keys on one cadence: fuller calls, fewer.
        fill = max(policy.batch_fill_horizon, policy.min_interval)
        policy = dataclasses.replace(policy, batch_fill_horizon=fill)
        self._poller = BatchPoller(self, policy, limits)  # this leader is its transport
        self._owners: dict[str, set[str]] = {}  # key -> the members that follow it
        self._standins: dict[str, ImageJob] = {}
        self._endings: list[tuple[str, Ending]] = []
        self._ending = asyncio.Event()

    async def run(self) -> None:
        """Lead whenever this member holds the lease, until cancelled."""
        while True:
            await self.lease.leading.wait()
            if self.lease.remaining() <= 0:  # ran out: the lease task is about to step down
                await asyncio.sleep(RETRY)
                continue
            try:
                await self._term()
            except FleetUnavailableError as exc:
                self._lost(str(exc))
                await asyncio.sleep(RETRY)
            finally:
                for standin in self._standins.values():
                    self._poller.forget(standin)
                self._standins.clear()
                self._owners.clear()
                self._endings.clear()

    async def _term(self) -> None:
        shard = self.lease.shard
        cursor = await self._registry.begin_term(shard)
        members = await self._membership.everyone()
        await self._outbox.post([(member, Announce(shard)) for member in members])
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._poller.run)
            tasks.start_soon(self._post_endings)
            while self.lease.remaining() > 0:
                try:
                    cursor, changes = await self._registry.changes(shard, cursor, _LOG_WAIT)
                except FleetUnavailableError as exc:
                    self._lost(str(exc))
                    await asyncio.sleep(RETRY)
                    continue
                for change in changes:
                    if isinstance(change, Follow):
                        self._follow(change)
                    else:
                        self._leave(change.key, change.owner)
            tasks.cancel_scope.cancel()

    def _follow(self, follow: Follow) -> None:
        """Poll ``follow.key`` for its owner (already polled: one more owner)."""
        key = follow.key
        self._owners.setdefault(key, set()).add(follow.owner)
        if key in self._standins:
            return
        loop = asyncio.get_running_loop()
        model = {"model": follow.model} if follow.model else None
        state = JobState(loop)
        standin = ImageJob(key, state, deadline=loop.time() + follow.deadline_in, request=model)
        standin.add_done_callback(self._standin_ended)
        self._standins[key] = standin
        first = None if follow.first_delay is None else max(0.0, follow.first_delay - follow.age)
        self._poller.track(standin, state, first, age=follow.age)

    def _leave(self, key: str, owner: str) -> None:
        owners = self._owners.get(key, set())
        owners.discard(owner)
        if not owners and (standin := self._standins.pop(key, None)) is not None:
            self._owners.pop(key, None)
            self._poller.forget(standin)  # nobody follows it any more

    def _standin_ended(self, standin: ImageJob) -> None:
        if self._standins.get(standin.key) is not standin:
            return
        del self._standins[standin.key]
        owners = self._owners.pop(standin.key, set())
        error = standin.exception()
        if isinstance(error, UnknownJobError | JobProtocolError):  # no entry shows it
            why = str(error).split(": ", 1)[-1]  # without its "job KEY:" prefix
            ending = Ending(standin.key, isinstance(error, UnknownJobError), why)
            self._endings += [(owner, ending) for owner in owners]
            self._ending.set()

    async def _post_endings(self) -> None:
        while True:
            await self._ending.wait()
            self._ending.clear()
            endings, self._endings = self._endings, []
            try:
                await self._outbox.post(endings)
            except FleetUnavailableError as exc:
                self._lost(str(exc))  # the owners are local meanwhile: they judge for themselves

    @property
    def telemetry(self) -> Telemetry:
        """The client's telemetry (the poller's batch spans and warnings go through it)."""
        return self._transport.telemetry

    async def post(
        self, path: str, body: Any, *, kind: CallKind, parent: BatchTrace | None = None
    ) -> Any:
        """The poller's transport: one batch call, fenced by the lease, its reply reported."""
        self.lease.require(_CALL_MARGIN)  # LeaseLostError: the poller counts a failed call
        self.calls += 1
        self.keys += len(body)
        data = await self._transport.post(path, body, kind=kind, parent=parent)
        found = raw_entries_by_key(data, set(body))  # ProtocolError: a failed call
        asked: dict[str, list[str]] = {}
        for key in body:
            for owner in self._owners.get(key, ()):
                asked.setdefault(owner, []).append(key)
        replies: list[tuple[str, Report]] = [
            (owner, Reply(tuple(keys), [entry for key in keys for entry in found.get(key, ())]))
            for owner, keys in asked.items()
        ]
        await self._outbox.post(replies)  # FleetUnavailableError: a failed call
        return data
