"""How the poller ends a tracked job (``_JobEnds``, a base class of ``BatchPoller``): with an
error (``_end``), at its deadline (``_expire``), cancelled (``forget``, ``cancel_all``), or as
unreadable; what each end writes down (its DEBUG line, span and metrics); and the jobs that
ended lately, so that ``attach(key)`` right after an end returns the ended job (``get``).

Like every layer of the poller, it declares the fields it uses; ``BatchPoller.__init__`` sets
them up and says why each exists.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

from ._contract import JobStatus
from ._due_keys import _DueKeys
from ._errors import (
    JobCancelledError,
    JobError,
    JobProtocolError,
    JobTimeoutError,
    ReplyTooComplexError,
    ResponseTooLargeError,
    WujieError,
)
from ._jobs import ImageJob, ended_copy, holds_bulk
from ._stats import PollerCounters
from ._tracked import _Tracked

if TYPE_CHECKING:
    from ._telemetry import RepeatedWarnings, Telemetry

logger = logging.getLogger("wujie_async")


def _recorded(tracked: _Tracked) -> bool:
    """Whether ``tracked``'s changes are written down (a span, or the DEBUG log)."""
    return tracked.trace is not None or logger.isEnabledFor(logging.DEBUG)


# Jobs that ended lately, kept for attach() (see ``_remember_ended``).
ENDED_JOBS_KEPT = 1024


class _JobEnds(_DueKeys):
    """The ends of tracked jobs, and the jobs that ended lately."""

    _ended: OrderedDict[str, ImageJob | tuple[weakref.ref[ImageJob], ImageJob]]
    _failing: str | None
    _gathered: list[_Tracked]
    _gathered_since: float | None
    _max_response_bytes: int
    _telemetry: Telemetry
    _warnings: RepeatedWarnings
    counters: PollerCounters

    def get(self, key: str) -> ImageJob | None:
        """The tracked job for ``key``, or one that ended lately (see ``_remember_ended``)."""
        tracked = self._jobs.get(key)
        if tracked is not None:
            return tracked.job
        ended = self._ended.get(key)
        if isinstance(ended, tuple):
            held, copy = ended
            return held() or copy  # the original while someone still holds it
        return ended

    def forget(self, job: ImageJob) -> None:
        """Stop polling ``job``: the job's own cancel (``job.cancel()``) calls this."""
        tracked = self._jobs.get(job.key)
        if tracked is not None and tracked.job is job:
            self._untrack(tracked)
            if _recorded(tracked):
                # Only for the record: the job's own cancel sets the error its awaiters get.
                error = JobCancelledError("cancelled", job_key=job.key)
                self._observe_end(tracked, error, tracked.job._status)

    def cancel_all(self, reason: str) -> None:
        """Stop tracking every job; each awaiter gets JobCancelledError saying ``reason``."""
        self._gathered, self._gathered_since, self._gathered_until = [], None, math.inf
        for tracked in list(self._jobs.values()):
            self._untrack(tracked)
            error = JobCancelledError(reason, job_key=tracked.job.key)
            tracked.job._fail(error)
            self._observe_end(tracked, error, tracked.job._status)

    def _expire(self, tracked: _Tracked) -> None:
        if self._tracks(tracked):
            job = tracked.job
            if tracked.last_seen is None:
                message = "not reported by the gateway before its deadline"
            else:
                # Only what was seen: the job may have ended since, unseen (calls refused).
                ago = asyncio.get_running_loop().time() - tracked.last_seen
                message = f"still running when last reported, {ago:.1f}s before its deadline"
            if self._failing is not None:
                message += f" (the batch calls are failing: {self._failing})"
            elif tracked.failed_call is not None:  # other calls went through, not its own
                message += f" (its last batch call failed: {tracked.failed_call})"
            error = JobTimeoutError(message, job_key=job.key)
            self._end(tracked, error, tracked.job._status)

    def _end_unreadable(self, tracked: _Tracked, problem: WujieError, lasted: float) -> None:
        """End a job whose reply, asked about alone, has been too large or too deep for
        ``lasted`` seconds."""
        if isinstance(problem, ResponseTooLargeError):
            said = (
                f"the gateway's reply about this job alone has been over the "
                f"{self._max_response_bytes}-byte reply cap for {lasted:.1f}s (raise "
                "Limits.max_response_bytes, --max-response-bytes on the command line, to "
                "fetch it)"
            )
        else:
            why = problem.why if isinstance(problem, ReplyTooComplexError) else str(problem)
            said = (
                f"the gateway's reply about this job alone has {why} for {lasted:.1f}s (no "
                "entry of this contract does)"
            )
        self._end(tracked, JobProtocolError(said, job_key=tracked.job.key), tracked.job._status)

    def _observe_end(
        self, tracked: _Tracked, error: JobError | None, before: JobStatus | int | None
    ) -> None:
        """A tracked job ended: its DEBUG line, and its span and metrics."""
        if tracked.trace is not None or logger.isEnabledFor(logging.DEBUG):  # _recorded(...)
            self._telemetry.job_ended(
                tracked.trace, tracked.job.key, before, tracked.job, error, tracked.asks
            )

    def _end(self, tracked: _Tracked, error: JobError, before: JobStatus | int | None) -> None:
        """End a tracked job with ``error``; ``before``: its status before the last report."""
        self._untrack(tracked)
        self.counters.failed += 1
        tracked.job._fail(error)
        self._observe_end(tracked, error, before)
        # A deadline ends only this wait (the job may still run): attach() waits afresh.
        self._remember_ended(tracked, keep=not isinstance(error, JobTimeoutError))

    def _remember_ended(self, tracked: _Tracked, *, keep: bool = True) -> None:
        if not keep:
            # Only the wait ended (a deadline): the job runs on, and whoever attach()es it
            # counts its points when it ends. Counted here too, they would be counted twice.
            return
        points = tracked.job._points_charged
        if points is not None:
            self.counters.points_charged += points
        job, ended = tracked.job, self._ended
        key = job._key
        ended[key] = (weakref.ref(job), ended_copy(job)) if holds_bulk(job) else job
        ended.move_to_end(key)
        if len(ended) > ENDED_JOBS_KEPT:
            ended.popitem(last=False)
