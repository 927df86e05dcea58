"""ShardLeader: while this member holds a shard's lease, it polls every key of the shard, whoever's
it is, with one ordinary BatchPoller and its ordinary PollSchedule.

A term starts by loading the shard's registry and follows the registry's log from then on: the
leader keeps a stand-in job for each registered key and its poller asks about them exactly as
a lone client asks about its own, so the fleet's keys share calls and the schedule learns from
every job. The leader is its poller's transport (:meth:`ShardLeader.post`): before each call it
checks that the lease has time left (a leader frozen past its lease sends nothing when it
thaws), and after it posts the reply to the owners of the keys asked, who judge the entries
themselves. When a stand-in ends, its record is removed (unless it changed meanwhile); when the
leader gave up on a key for a reason no entry shows, the owners are told so.

A term ends when the lease has no time left. Its stand-ins are dropped, not ended: the next
leader loads them again. The poller, and what its schedule learned, stay for the next term.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio

from .._config import Limits, PollPolicy
from .._errors import JobProtocolError, UnknownJobError
from .._jobs import ImageJob
from .._poller import BatchPoller
from .._replies import raw_entries_by_key
from .._transport import CallKind, Transport
from ._errors import FleetUnavailableError
from ._lease import LeaderLease
from ._redis import RETRY
from ._registry import KeyRecord, KeyRegistry
from ._reports import Ending, Reply, Report, ReportOutbox

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
        registry: KeyRegistry,
        outbox: ReportOutbox,
        transport: Transport,
        policy: PollPolicy,
        limits: Limits,
        on_redis_lost: Callable[[str], None],
    ) -> None:
        self.lease = lease
        self.calls = self.keys = 0
        self._registry = registry
        self._outbox = outbox
        self._transport = transport
        self._lost = on_redis_lost
        self._poller = BatchPoller(self, policy, limits)  # this leader is its transport
        self._records: dict[str, KeyRecord] = {}
        self._standins: dict[str, ImageJob] = {}
        self._ended: list[tuple[KeyRecord, BaseException | None]] = []
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
            finally:
                for standin in self._standins.values():
                    self._poller.forget(standin)
                self._standins.clear()
                self._records.clear()
                self._ended.clear()

    async def _term(self) -> None:
        shard = self.lease.shard
        try:
            cursor, records = await self._registry.load(shard)
        except FleetUnavailableError as exc:
            self._lost(str(exc))
            await asyncio.sleep(RETRY)
            return
        for record in records:
            self._follow(record)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._poller.run)
            tasks.start_soon(self._write_ends)
            while self.lease.remaining() > 0:
                try:
                    cursor, changes = await self._registry.changes(shard, cursor, _LOG_WAIT)
                except FleetUnavailableError as exc:
                    self._lost(str(exc))
                    await asyncio.sleep(RETRY)
                    continue
                for key, changed in changes.items():
                    if changed is not None:
                        self._follow(changed)
                    elif (standin := self._standins.pop(key, None)) is not None:
                        self._records.pop(key, None)
                        self._poller.forget(standin)  # nobody follows it any more
            tasks.cancel_scope.cancel()

    def _follow(self, record: KeyRecord) -> None:
        """Poll ``record``'s key (already polled: only its owners may have changed)."""
        key = record.key
        self._records[key] = record
        standin = self._standins.get(key)
        if standin is not None and not standin.done():
            return
        loop = asyncio.get_running_loop()
        model = {"model": record.model} if record.model else None
        standin = ImageJob(key, loop=loop, deadline=loop.time() + record.deadline_in, request=model)
        standin.add_done_callback(self._standin_ended)
        self._standins[key] = standin
        first = None if record.first_delay is None else max(0.0, record.first_delay - record.age)
        self._poller.track(standin, first, age=record.age)

    def _standin_ended(self, standin: ImageJob) -> None:
        if self._standins.get(standin.key) is not standin:
            return
        del self._standins[standin.key]
        record = self._records.pop(standin.key, None)
        if record is not None:
            self._ended.append((record, standin.exception()))
            self._ending.set()

    async def _write_ends(self) -> None:
        """Tell owners what no entry shows, then remove the ended keys' records."""
        while True:
            await self._ending.wait()
            self._ending.clear()
            ended, self._ended = self._ended, []
            endings = [
                (owner, Ending(record.key, isinstance(error, UnknownJobError), _why(error)))
                for record, error in ended
                if isinstance(error, UnknownJobError | JobProtocolError)
                for owner in record.owners
            ]
            try:
                await self._outbox.post(endings)
                await self._registry.drop(self.lease.shard, [record for record, _ in ended])
            except FleetUnavailableError as exc:
                self._lost(str(exc))  # the records stay: a next term asks about them once more

    async def post(self, path: str, body: Any, *, kind: CallKind) -> Any:
        """The poller's transport: one batch call, fenced by the lease, its reply reported."""
        self.lease.require(_CALL_MARGIN)  # LeaseLostError: the poller counts a failed call
        self.calls += 1
        self.keys += len(body)
        data = await self._transport.post(path, body, kind=kind)
        found = raw_entries_by_key(data, set(body))  # ProtocolError: a failed call
        asked: dict[str, list[str]] = {}
        for key in body:
            record = self._records.get(key)
            for owner in record.owners if record is not None else ():
                asked.setdefault(owner, []).append(key)
        replies: list[tuple[str, Report]] = [
            (owner, Reply(tuple(keys), [entry for key in keys for entry in found.get(key, ())]))
            for owner, keys in asked.items()
        ]
        await self._outbox.post(replies)  # FleetUnavailableError: a failed call
        return data


def _why(error: BaseException | None) -> str:
    """A job error's message without its ``job KEY:`` prefix (the owner adds its own)."""
    return str(error).split(": ", 1)[-1]
