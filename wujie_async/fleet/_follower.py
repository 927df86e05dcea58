"""Follower: a member's side of the shared poller (every member is one, its leader too).

It registers each key its client's poller tracks, with what a leader needs to poll it, and
takes it out when the job ends. It applies the leader's reports to the client's poller, which
meanwhile sends no batch call of its own (but about a job reported done before its last
images are listed, once the leader's reports about it stop: BatchPoller._asked_while_held): a
report is applied exactly as a reply of its own (hostile entries fail their own job only), and
a job the leader's poller ended is ended here with the same error. Registrations wait while
Redis is away; on rejoining, every key is registered again (Redis may have lost them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from .._jobs import ImageJob
from .._poller import BatchPoller
from ._exchange import VERDICTS, Inbox, KeyInfo, KeyRegistry, Report
from ._link import RedisLink

_READ_WAIT = 1.0  # seconds a read of the inbox waits for reports
# A read that comes back this much later than its wait (since the last reports were applied)
# finds a process that stood still (a SIGSTOP, a blocked loop), not a slow Redis alone; or
# half of member_timeout, if less (a shorter stall cannot get a member declared dead).
_STOOD_STILL = 1.0


class Follower:
    """One member's keys in the fleet's registry, and the leader's reports about them, applied
    to the client's poller (which sends no batch call while the member follows)."""

    def __init__(
        self,
        link: RedisLink,
        member_id: str,
        poller: BatchPoller,
        check_in: Callable[[], Awaitable[None]],
    ) -> None:
        """``check_in``: awaited before reports read after the process stood still are
        applied (the fleet may have declared the member dead meanwhile, and given its jobs
        to others: see ``FleetMember._check_in``)."""
        self._member_id = member_id
        self._check_in = check_in
        self._stood_still = min(_STOOD_STILL, link.config.member_timeout / 2)
        self._poller = poller
        self._registry = KeyRegistry(link)
        self._inbox = Inbox(link, member_id)
        self._mine: dict[str, tuple[ImageJob, KeyInfo]] = {}
        self._pending: dict[str, KeyInfo | None] = {}  # to write: an info, or None to remove
        self._changed = asyncio.Event()

    @property
    def keys(self) -> int:
        """How many keys this member has registered (or will, once Redis answers)."""
        return len(self._mine)

    def tracked_keys(self) -> list[str]:
        """The keys of the jobs this member follows now."""
        return list(self._mine)

    def track(self, job: ImageJob, first_delay: float | None) -> None:
        """Register ``job``'s key (soon, in the background) until the job ends."""
        request = job.request
        model = request.get("model") if request is not None else None
        now = time.time()
        info = KeyInfo(
            submitted=now,
            first_delay=first_delay,
            deadline=now + job.deadline - asyncio.get_running_loop().time(),
            model=model if isinstance(model, str) else None,
        )
        self._mine[job.key] = (job, info)
        self._queue(job.key, info)
        job.add_done_callback(self._ended)

    def _ended(self, job: ImageJob) -> None:
        if self._mine.get(job.key, (None,))[0] is job:
            del self._mine[job.key]
            self._queue(job.key, None)

    def _queue(self, key: str, info: KeyInfo | None) -> None:
        self._pending[key] = info
        self._changed.set()

    async def flush(self) -> None:
        """Write what is pending (kept for the next try if Redis fails)."""
        pending, self._pending = self._pending, {}
        try:
            await self._registry.write(
                (self._member_id, key, info) for key, info in pending.items()
            )
        except BaseException:
            self._pending = pending | self._pending
            raise

    async def register_all(self) -> None:
        """Register every key this member tracks again, with the removals pending."""
        removals = {key: info for key, info in self._pending.items() if info is None}
        self._pending = removals | {key: info for key, (_, info) in self._mine.items()}
        await self.flush()

    async def unregister_all(self) -> None:
        """Take every key of this member out of the registry (it polls them itself now)."""
        self._pending |= dict.fromkeys(self._mine)
        await self.flush()

    async def write(self) -> None:
        """Keep the registry up to date (a background task)."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self.flush()

    async def read(self) -> None:
        """Apply the leader's reports as they come (a background task)."""
        loop = asyncio.get_running_loop()
        applied = loop.time()
        while True:
            reports = await self._inbox.read(_READ_WAIT)
            if loop.time() - applied > _READ_WAIT + self._stood_still:
                # Woken from a freeze: a job the reports end (these, or the next: the read
                # that stood still may bring only its own empty reply) could be one another
                # member claimed meanwhile; the member finds out (and says so, per job)
                # before any consumer sees the job end here.
                await self._check_in()
            for report in reports:
                self._apply(report)
            await self._inbox.ack(reports)
            applied = loop.time()

    def _apply(self, report: Report) -> None:
        if report.keys:
            self._poller.apply_reply(report.keys, report.data)
        for key, (kind, why) in report.ended.items():
            verdict = VERDICTS.get(kind)
            if verdict is not None:
                self._poller.fail(key, verdict(f"{why} (the fleet's leader)", job_key=key))
