"""Follower: the side of a member that follows its own jobs (every member, the leader too).

It tells the fleet's key log about each key its poller starts or stops tracking (with its
model, age and deadline), announces them all again when a new leader asks, and feeds the
leader's reports to that poller, which holds its own asks meanwhile and judges every entry as
it judges its own replies. The jobs, their futures and their deadlines stay here, exactly as
without a fleet.

While Redis is away the poller asks for itself again (a WARNING says so); when the member
rejoins, the follower announces every key it follows before its poller holds its asks again.
"""

from __future__ import annotations

import asyncio
import logging

from .._errors import JobError, JobProtocolError, UnknownJobError
from .._jobs import ImageJob
from .._poller import BatchPoller
from ._errors import FleetUnavailableError
from ._redis import RETRY
from ._registry import Follow, KeyRegistry
from ._reports import Announce, Ending, Reply, ReportInbox

logger = logging.getLogger("wujie_async.fleet")


class Follower:
    """Tells the fleet a member's keys and applies the leader's reports to its poller.

    Attributes:
        connected: False while Redis is away (the poller then asks for itself).
    """

    def __init__(
        self, *, member_id: str, registry: KeyRegistry, inbox: ReportInbox, poller: BatchPoller
    ) -> None:
        self.connected = False
        self._member_id = member_id
        self._registry = registry
        self._inbox = inbox
        self._poller = poller
        self._since: dict[str, float] = {}  # key -> loop time it was tracked (its age)
        self._adds: dict[str, Follow] = {}
        self._removes: set[str] = set()
        self._changed = asyncio.Event()

    def tracked(self, job: ImageJob, first_delay: float | None) -> None:
        """Follow ``job``'s key (first ask after ``first_delay``; None: after the submit)."""
        now = asyncio.get_running_loop().time()
        self._since[job.key] = now
        self._removes.discard(job.key)
        self._adds[job.key] = _follow(job, first_delay, 0.0, now)
        self._changed.set()

    def followed(self) -> list[str]:
        """The keys this member follows."""
        return list(self._since)

    def ended(self, key: str) -> None:
        """This member no longer follows ``key``."""
        self._since.pop(key, None)
        self._adds.pop(key, None)
        self._removes.add(key)
        self._changed.set()

    def lost(self, why: str) -> None:
        """Redis is away: the poller asks for itself until :meth:`rejoin`."""
        if self.connected:
            self.connected = False
            logger.warning(
                "fleet member %s: Redis unavailable (%s); it polls its own keys until it is back",
                self._member_id,
                why,
            )
            self._poller.hold_asks(False)

    async def rejoin(self) -> int:
        """Announce every key this member follows, then let the leader ask again; how many."""
        announced = await self._announce(None)
        self._inbox.rewind()  # a restarted Redis numbers its streams afresh
        self.connected = True
        self._poller.hold_asks(True)
        return announced

    async def _announce(self, shard: int | None) -> int:
        """Tell the fleet every key followed here (of ``shard`` only, unless None)."""
        now = asyncio.get_running_loop().time()
        registry = self._registry
        follows = [
            _follow(job, None, now - self._since.get(job.key, now), now)
            for job in self._poller.jobs()
            if shard is None or registry.shard_of(job.key) == shard
        ]
        await registry.follow(self._member_id, follows)
        return len(follows)

    async def write(self) -> None:
        """Tell the key log what this member starts and stops following, batched (a
        background task)."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            removes, self._removes = self._removes, set()
            adds, self._adds = self._adds, {}
            if not self.connected:
                continue  # rejoin() announces every key followed; stale ones go by reports
            try:
                await self._registry.leave(self._member_id, removes)
                await self._registry.follow(self._member_id, adds.values())
            except FleetUnavailableError as exc:
                self.lost(str(exc))

    async def read(self) -> None:
        """Apply the leader's reports as they come (a background task)."""
        while True:
            try:
                reports = await self._inbox.read(1.0)
            except FleetUnavailableError as exc:
                self.lost(str(exc))
                await asyncio.sleep(RETRY)
                continue
            try:
                for report in reports:
                    if isinstance(report, Announce):
                        if self.connected:  # else rejoin() announces them all
                            await self._announce(report.shard)
                    else:
                        self._apply(report)
                await self._inbox.ack(reports)
            except FleetUnavailableError as exc:
                self.lost(str(exc))  # applying them again is harmless

    def _apply(self, report: Reply | Ending) -> None:
        poller = self._poller
        if isinstance(report, Ending):
            kind: type[JobError] = UnknownJobError if report.unknown else JobProtocolError
            why = f"the fleet's poller gave up on it: {report.message}"
            poller.end(report.key, kind(why, job_key=report.key))
            return
        mine = [
            key for key in report.asked if (job := poller.get(key)) is not None and not job.done()
        ]
        poller.apply_reply(mine, report.entries)
        for key in set(report.asked).difference(mine):
            self.ended(key)  # it ended here, and the fleet has not heard (or lost a removal)


def _follow(job: ImageJob, first_delay: float | None, age: float, now: float) -> Follow:
    model = job.request.get("model") if job.request is not None else None
    return Follow(
        key=job.key,
        model=model if isinstance(model, str) else None,
        first_delay=first_delay,
        age=age,
        deadline_in=job.deadline - now,
    )
