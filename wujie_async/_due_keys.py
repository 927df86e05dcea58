"""The poller's outstanding keys by when each is next due: the heap, the keys taken off it,
and the idle sleep until the next one (``_DueKeys``, ``BatchPoller``'s lowest base class).

Every outstanding key sits in a heap ordered by when it is next due (its next ask, or its
deadline if sooner). An entry counts only while it matches its record's ``due``: a key
rescheduled gets a new entry, and the old one is skipped when it surfaces. With nothing due the
idle poller awaits a future and one loop timer: no timer ticks, no cost. When a key is asked
about is decided here alone; the calls, the replies and the ends build on it.

Its fields are ``BatchPoller``'s (set up, each with its reason, in ``BatchPoller.__init__``):
the class declares those it reads and writes.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._config import PollPolicy
from ._errors import shown_key
from ._jobs import ImageJob
from ._schedule import PollSchedule
from ._tracked import _new_tracked, _Tracked

if TYPE_CHECKING:
    from ._otel import JobTrace

logger = logging.getLogger("wujie_async")

_heappush, _heappop = heapq.heappush, heapq.heappop


def _wake_at(loop: asyncio.AbstractEventLoop, waking: asyncio.Future[None], when: float) -> None:
    """The idle poller's timer: its sleep is over at ``when`` (unless it was woken or
    cancelled)."""
    if waking.done():
        return
    if loop.time() < when:
        # asyncio runs a timer up to a clock tick early, when the poller would find nothing
        # due and sleep again at once (a fake clock never moves on then): armed again, as
        # anyio's timeouts are.
        loop.call_at(when, _wake_at, loop, waking, when)
        return
    waking.set_result(None)


class _DueKeys:
    """The keys a poller tracks, and when each is next due."""

    _absence_graces: dict[str, float]
    _done_short_since: dict[str, float]
    _gathered_until: float
    _heap: list[tuple[float, str]]
    _jobs: dict[str, _Tracked]
    _policy: PollPolicy
    _schedule_of: PollSchedule
    _sleeping_until: float
    _unreadable_since: dict[str, float]
    _waking: asyncio.Future[None] | None

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def schedule(self) -> PollSchedule:
        """The schedule this poller asks by (and learns with)."""
        return self._schedule_of

    def jobs(self) -> list[ImageJob]:
        """Every outstanding job."""
        return [tracked.job for tracked in self._jobs.values()]

    def track(
        self,
        job: ImageJob,
        first_delay: float | None = None,
        trace: JobTrace | None = None,
        *,
        age: float = 0.0,
        absence_grace: float | None = None,
        learn: bool = True,
    ) -> None:
        """Start polling ``job``, whose changing fields this poller now writes: first ask
        after ``first_delay`` (default: the policy's, from its submit); ``trace``: the job's
        telemetry record, ended with the job; ``age``: seconds since it was submitted (a job
        taken over from elsewhere); ``absence_grace``: how long replies may leave the key out,
        while it was never listed, before it ends as unknown (None: the policy's grace);
        ``learn``: see :meth:`set_learning`."""
        now = asyncio.get_running_loop().time()
        request = job._request
        model = request.get("model") if request is not None else None
        tracked = _new_tracked(now - age, model if isinstance(model, str) else None, job, trace)
        tracked.learns = learn
        self._jobs[job._key] = tracked
        if absence_grace is not None:
            self._absence_graces[job._key] = absence_grace
        if first_delay is None:
            self._schedule(tracked, self._schedule_of.first_ask(tracked))
        else:
            self._schedule(tracked, now + first_delay)
        if tracked.due < self._sleeping_until:  # only wake the poller if this key is due sooner
            self._wake()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "job %s: pending (%s, first ask in %.2f s)",
                shown_key(job.key),
                "attached" if first_delay is not None else "submitted",
                tracked.due - now,
            )

    def set_learning(self, job: ImageJob, learn: bool) -> None:
        """Whether ``job``'s reports and end teach the schedule (they do by default). Off for
        a job another record in this process learns from, through a schedule shared with
        it (a fleet leader's shadow of its own member's job): each job is learned once, not
        weighted double in the schedule's samples. The job is polled as ever."""
        tracked = self._jobs.get(job.key)
        if tracked is not None and tracked.job is job:
            tracked.learns = learn

    def _untrack(self, tracked: _Tracked) -> None:
        key = tracked.job._key
        if self._jobs.get(key) is tracked:
            del self._jobs[key]
            # Rare per-key records (memory per pending job): most pollers hold none.
            if self._unreadable_since:
                self._unreadable_since.pop(key, None)
            if self._done_short_since:
                self._done_short_since.pop(key, None)
            if self._absence_graces:
                self._absence_graces.pop(key, None)
        tracked.due = math.inf

    def _tracks(self, tracked: _Tracked) -> bool:
        return self._jobs.get(tracked.job._key) is tracked

    def _schedule(self, tracked: _Tracked, when: float) -> None:
        job = tracked.job
        deadline = job._deadline
        # min(when, deadline) without the call: about twice an ask, on the hot path.
        tracked.due = due = deadline if deadline < when else when
        _heappush(self._heap, (due, job._key))

    def _pop_due(self, horizon: float) -> _Tracked | None:
        """The next key due by ``horizon``, skipping heap entries made stale by rescheduling,
        and asks the schedule no longer plans (``KeyTiming.tentative``: the key goes to when
        it plans it now)."""
        heap, jobs = self._heap, self._jobs
        while heap and heap[0][0] <= horizon:
            due, key = _heappop(heap)
            tracked = jobs.get(key)
            if tracked is not None and tracked.due == due:
                if tracked.tentative:
                    # Capped as _schedule caps it: a key due at its deadline is taken now.
                    later = min(self._schedule_of.still_due(tracked), tracked.job._deadline)
                    if later > due:
                        self._schedule(tracked, later)
                        continue
                tracked.due = math.inf  # taken: no other heap entry counts until rescheduled
                return tracked
        return None

    def _next_due(self) -> float:
        """When the next key is due (inf: none)."""
        heap, jobs = self._heap, self._jobs
        while heap and ((tracked := jobs.get(heap[0][1])) is None or tracked.due != heap[0][0]):
            heapq.heappop(heap)  # drop entries of jobs that ended or were rescheduled
        return heap[0][0] if heap else math.inf

    def _wake(self) -> None:
        """Wake the idle poller, if asleep, to look at the heap again."""
        waking = self._waking
        if waking is not None and not waking.done():
            waking.set_result(None)

    async def _sleep_until_due(self, loop: asyncio.AbstractEventLoop) -> None:
        # A future and a loop timer, not a cancel scope around an event: the poller sleeps
        # about 9 times per batch call in a burst, and a scope's timeout is a cancellation of
        # the poller's task, delivered, raised and caught.
        self._waking = waking = loop.create_future()
        self._sleeping_until = until = min(self._next_due(), self._gathered_until)
        timer = loop.call_at(until, _wake_at, loop, waking, until) if until < math.inf else None
        try:
            await waking
        finally:
            if timer is not None:
                timer.cancel()
            self._waking = None
            self._sleeping_until = -math.inf  # awake: new keys need no wake-up call

    def _pull_in_waiting(self, now: float) -> None:
        """The learned window widened: keys waiting for a later window start are due sooner."""
        # Each model's window shape's ``opens``, taken once per model: this walks every key.
        opens_of: dict[str | None, Callable[[float, float], float]] = {}
        window_shape = self._schedule_of.window_shape
        gap = self._policy.min_interval
        inf = math.inf
        for tracked in self._jobs.values():
            due, end = tracked.due, tracked.predicted_end
            if due == inf or end is None:
                continue  # in a call on the wire (its reply reschedules it), or no window
            span = tracked.predicted_span
            if not span:
                continue
            model = tracked.model
            opens = opens_of.get(model)
            if opens is None:
                opens = opens_of[model] = window_shape(model).opens
            when = opens(end, span)
            if when < now:
                when = now
            # Never sooner than min_interval after the last ask: a key asked densely already
            # is not asked again at once.
            last = tracked.last_ask
            if last is not None and when < last + gap:
                when = last + gap
            if when < due:
                self._schedule(tracked, when)
        self._wake()
