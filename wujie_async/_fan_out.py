"""What a batch reply means for each job it asked about (``_FanOut``, a base class of
``BatchPoller``): each entry handed to its job (status, progress, images), the schedule told
what it shows, and the job ended when its entry says so, or when the gateway has left its key
out of replies for the grace. How a reply is read and checked is ``_replies``'s job; one entry
that cannot be handled fails its own job only.

The fields it uses are declared on the class and set up (each with its reason) by
``BatchPoller.__init__``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Container, Mapping
from typing import Any

from . import _contract
from ._contract import JobStatus
from ._errors import (
    IncompleteJobError,
    JobError,
    JobProtocolError,
    UnknownJobError,
    shown_key,
    snippet,
)
from ._job_ends import _JobEnds
from ._job_info import JobInfo
from ._jobs import ImageJob, status_name
from ._replies import ENTRIES_PER_KEY, Reading, failure, images_of, lists_extra_images, read
from ._results import ImageResult
from ._tracked import _Tracked

logger = logging.getLogger("wujie_async")

# Looked up per reply entry: module globals, not attributes of _contract.
_TERMINAL_STATUSES = _contract.TERMINAL_STATUSES
_FAILED_STATUSES = _contract.FAILED_STATUSES
_RUNNING_STATUSES = _contract.RUNNING_STATUSES
_SUCCEEDED, _QUEUED = JobStatus.SUCCEEDED, JobStatus.QUEUED

# How long a job reported succeeded with images missing is asked about again before it ends
# with IncompleteJobError: a status may turn to 4 a moment before the last images are listed.
IMAGES_AFTER_SUCCESS_GRACE = 3.0
# Jobs whose done report listed none of the images earlier reports did, and which waited the
# grace in vain, after which such jobs no longer wait: this gateway's done reports do not list
# images (unless one of them was seen to list the final ones during its grace).
DONE_UNLISTED_SEEN = 2
# Distinct unknown statuses remembered (each is logged once); past this, one last line says so.
UNKNOWN_STATUSES_KEPT = 64


class _FanOut(_JobEnds):
    """The fan-out of batch replies to their jobs."""

    _done_relists: bool
    _done_unlisted_in_vain: int
    _generation: int
    _unknown_statuses: set[int]
    _unknown_statuses_full: bool
    # The budget's, told of a job whose cost came unreadable (None: no budget).
    cost_told_unreadably: Callable[[Mapping[str, Any], int], None] | None

    def _cost_unreadable(self, job: ImageJob, what: str) -> None:
        """The gateway reported ``job``'s ``integral_cost`` as ``what``, which is no number of
        points: said once (then counted), and told to the budget, whose refusals of the kind
        then say why its price is not known."""
        self._warnings.warning(
            "the gateway reported integral_cost as %s (not a number of points, 0 to 1e12): "
            "the cost of job %s is not known (points_charged stays None; a points budget "
            "cannot learn the price of its kind from it)",
            what,
            shown_key(job._key),
            cause=what,
        )
        told = self.cost_told_unreadably
        if told is not None and job._request is not None:
            told(job._request, job._n or 1)

    def _apply_reading(
        self,
        chunk: list[_Tracked],
        reading: Reading | None,
        asked_at: float | None = None,
        retry_wait: float | None = None,
    ) -> None:
        """What a reply (None: a failed call) means for each job of ``chunk``.

        ``asked_at``: when the call went out (None: now). The gateway read its state somewhere
        between then and now; estimates count from the ask, so a slow reply does not push
        every predicted end back by its own length. ``retry_wait``: after a failed call, when
        its keys are due again (None: ``min_interval``).
        """
        now = asyncio.get_running_loop().time()
        asked_at = now if asked_at is None else asked_at
        # Gateway times are unix seconds; loop time is not: this maps one onto the other.
        unix_to_loop = now - time.time()
        jobs = self._jobs
        if reading is None:
            failing = self._failing
            wait = self._policy.min_interval if retry_wait is None else retry_wait
            for tracked in chunk:
                tracked.asks += 1
                if jobs.get(tracked.job._key) is tracked:  # not cancelled or expired meanwhile
                    tracked.failed_call = failing
                    tracked.failed_since_answer = True
                    self._schedule(tracked, now + wait)
        else:
            for tracked in chunk:
                tracked.asks += 1
                if jobs.get(tracked.job._key) is not tracked:
                    continue  # cancelled, or past its deadline, while the call was out
                try:
                    self._dispatch(tracked, reading, now, asked_at, unix_to_loop)
                except Exception as exc:  # contained per entry: this job fails, the rest go on
                    self._entry_failed(tracked, exc)
        self._after_replies(now)

    def _entry_failed(self, tracked: _Tracked, exc: Exception) -> None:
        """Handling ``tracked``'s entry raised ``exc``: that job fails, logged (called in the
        ``except`` clause, so the warning's traceback is ``exc``'s)."""
        self._warnings.warning("handling the batch entry of one job failed", exc_info=True)
        if self._tracks(tracked):
            self._end(
                tracked,
                JobProtocolError(
                    f"its batch entry could not be handled: {type(exc).__name__}",
                    job_key=tracked.job.key,
                ),
                tracked.job._status,
            )

    def _after_replies(self, now: float) -> None:
        if self._schedule_of.generation != self._generation:
            self._generation = self._schedule_of.generation
            self._pull_in_waiting(now)

    def _await_listing(self, tracked: _Tracked, now: float) -> bool:
        """Whether a job reported done, whose done reports list none of the images it holds,
        is asked again for the done listing (within the grace, unless this gateway's done
        reports are known not to list images)."""
        if not self._done_relists and self._done_unlisted_in_vain >= DONE_UNLISTED_SEEN:
            return False
        if self._within_grace(tracked, now):
            return True
        self._done_unlisted_in_vain += 1
        return False

    def _within_grace(self, tracked: _Tracked, now: float) -> bool:
        """Whether a job reported done without (the final listing of) its images is still
        within IMAGES_AFTER_SUCCESS_GRACE of the first such report (which starts it)."""
        since = self._done_short_since.setdefault(tracked.job._key, now)
        return now - since < IMAGES_AFTER_SUCCESS_GRACE

    def _read(self, data: Any, asked: Container[str] | None) -> Reading:
        """A reading of ``data`` for the keys in ``asked`` (every key when None), counted."""
        reading = read(data, asked)
        self.counters.malformed_entries += reading.bad_entries
        if reading.bad_entries or reading.ignored_entries or reading.surplus_entries:
            # One line per reply at most, and through the repeated-warnings gate: a gateway
            # sending nothing but malformed entries must not write a line per call.
            said = []
            if reading.bad_entries or reading.ignored_entries:
                said.append(
                    f"ignored {reading.bad_entries} malformed entries and "
                    f"{reading.ignored_entries} entries for keys not asked about"
                )
            if reading.surplus_entries:
                said.append(
                    f"did not read {reading.surplus_entries} repeats of keys listed more than "
                    f"{ENTRIES_PER_KEY} times (the latest and any report that ends the job "
                    "were read)"
                )
            problem = reading.first_problem
            self._warnings.warning(
                "batch reply: %s%s",
                "; ".join(said),
                f" (first problem: {problem})" if problem else "",
            )
        return reading

    def read_reply(self, data: Any) -> dict[str, JobInfo]:
        """Every readable entry of a batch reply's ``data``, one per key, as polls read them.

        Reads every key (a poll reads only the keys it asked about); malformed entries are
        counted in ``counters.malformed_entries`` and left out. For tools and tests.

        Raises:
            ProtocolError: ``data`` holds no list of entries.
        """
        return self._read(data, None).entries

    def _dispatch(
        self, tracked: _Tracked, reading: Reading, now: float, asked_at: float, unix_to_loop: float
    ) -> None:
        policy = self._policy
        job = tracked.job
        key = job._key
        entry = reading.entries.get(key)
        if entry is None:
            # Measured over replies: from the first that left it out, not from its submit or
            # last listing, and afresh after a gap in the replies longer than the grace itself
            # when calls about it failed in that gap (failed calls say nothing of a key).
            # Counted across an outage of the batch calls, the first reply after it (a gateway
            # catching up) failed at once every key it had not listed yet: paid jobs, ended as
            # unknown. A gap of slow replies alone (a gateway slower than the grace, or more
            # keys than the calls ask about within it) starts nothing afresh: the replies did
            # leave the key out, and it would never fail as unknown.
            answered, tracked.answered_at = tracked.answered_at, now
            failed, tracked.failed_since_answer = tracked.failed_since_answer, False
            if (
                tracked.absent_since is None
                or answered is None
                or (failed and now - answered > policy.unknown_key_grace)
            ):
                tracked.absent_since = now
            since = tracked.absent_since
            why = reading.malformed.get(key)
            grace = policy.unknown_key_grace
            absence_grace = self._absence_graces.get(key) if self._absence_graces else None
            if absence_grace is not None and tracked.last_seen is None and why is None:
                grace = absence_grace  # a key submitted long ago, never listed here
            if now - since < grace:
                self._schedule(tracked, now + policy.min_interval)
                return
            error: JobError
            if why is not None:
                error = JobProtocolError(
                    f"the gateway has listed this key only in malformed entries for "
                    f"{now - since:.1f}s ({why})",
                    job_key=key,
                )
            elif tracked.last_seen is not None:
                # It was listed (accepted, maybe run and charged): it may have ended and had
                # its result cleaned up between two asks. Not a wrong key: resending may pay
                # twice, and the error says so.
                error = UnknownJobError(
                    f"the gateway listed this job (last as {status_name(tracked.job._status)}) "
                    f"and has not for {now - since:.1f}s: it may have ended and had its result "
                    "cleaned up before it was seen done (it may have been charged)",
                    job_key=key,
                    was_listed=True,
                )
            else:
                error = UnknownJobError(
                    f"the gateway has not listed this key for {now - since:.1f}s "
                    "(wrong key, another app's key, or a result already cleaned up)",
                    job_key=key,
                )
            self._end(tracked, error, tracked.job._status)
            return
        tracked.last_seen = tracked.answered_at = now
        tracked.absent_since = None
        tracked.failed_since_answer = False
        if self._unreadable_since:
            self._unreadable_since.pop(key, None)
        tracked.failed_call = None
        before = job._status
        job._report(entry)
        if entry.cost_unreadable is not None:
            self._cost_unreadable(job, entry.cost_unreadable)
        n = job._n
        if entry.images:  # the newest listing wins (most reports list none: nothing to do)
            job._list_images(images_of(entry, n))
            if n is not None and lists_extra_images(entry, n):
                # Never fetched nor saved: a gateway cannot make a job of n=1 fill a disk.
                self._warnings.warning(
                    "the gateway listed more images than a job asked for (key %s, n=%d): "
                    "the extra ones are ignored",
                    shown_key(key),
                    n,
                )
        status = entry.status
        done_short = self._done_short_since
        if (
            status in _TERMINAL_STATUSES
            and (not done_short or key not in done_short)
            and tracked.learns
        ):
            ended_at = entry.complete_time
            if isinstance(ended_at, int | float):
                fine = ended_at != int(ended_at)  # a stamp in whole seconds places no end alone
                self._schedule_of.job_ended(tracked, now, ended_at + unix_to_loop, fine=fine)
            else:
                self._schedule_of.job_ended(tracked, now)
        if status == _SUCCEEDED:
            # Done with fewer images than the job makes (n; when unknown, at least one) is
            # not a success: the job fails, and its error holds the images that came.
            expected = n or 1
            images = job._images  # in index order: [k].index == k means 0..k all landed
            short = len(images) < expected or images[expected - 1].index != expected - 1
            if not short and not entry.images and self._await_listing(tracked, now):
                # Every image came from reports of the running job (their URLs may be
                # temporary ones), and the done report lists none: the final listing may
                # come a moment later, as missing images may. Asked again, within the grace.
                self._schedule(tracked, now + policy.min_interval)
                return
            if short:
                # A gateway may say "succeeded" a moment before it lists the last images: ask
                # again for a few seconds before the paid job ends short (then for good: an
                # ended job is not asked about again, not even by attach).
                if self._within_grace(tracked, now):
                    self._schedule(tracked, now + policy.min_interval)
                    return
                result = ImageResult(key, _SUCCEEDED, job._images)
                error = IncompleteJobError(job_key=key, result=result, expected=expected)
                self._end(tracked, error, before)
                return
            if done_short and key in done_short and entry.images:
                self._done_relists = True  # this gateway lists the images after "done"
            self._untrack(tracked)
            self.counters.succeeded += 1
            job._succeed(_SUCCEEDED)
            self._observe_end(tracked, None, before)
            self._remember_ended(tracked)
        elif status in _FAILED_STATUSES:
            self._end(tracked, failure(key, entry), before)
        else:
            if status not in _RUNNING_STATUSES:
                self._note_unknown_status(status, key)
            self._schedule(
                tracked,
                self._schedule_of.report(
                    tracked,
                    now,
                    asked_at=asked_at,
                    expected_seconds=entry.expected_seconds,
                    queue_position=entry.queue_before_num,
                    queued=status == _QUEUED,
                    percent=entry.complete_percent,
                    learn=tracked.learns,
                ),
            )
            if job._status != before:
                self._observe_status(tracked, before, now)

    def _observe_status(
        self, tracked: _Tracked, before: JobStatus | int | None, now: float
    ) -> None:
        """A running job's status changed: its DEBUG line and its span's event."""
        if tracked.trace is not None or logger.isEnabledFor(logging.DEBUG):  # _recorded(...)
            self._telemetry.job_status(
                tracked.trace,
                tracked.job.key,
                before,
                tracked.job,
                tracked.asks,
                tracked.due - now,
            )

    def _note_unknown_status(self, status: int, key: str) -> None:
        """Log each unknown status once, remembering a bounded number of them."""
        known = self._unknown_statuses
        if status in known:
            return
        if len(known) < UNKNOWN_STATUSES_KEPT:
            known.add(status)
            # Through the repeated-warnings gate (a line a minute, then a count of those not
            # written): a gateway whose statuses change at every ask wrote a line per ask.
            self._warnings.warning(
                "unknown job status %d (key %s): still polling", status, snippet(key)
            )
        elif not self._unknown_statuses_full:
            self._unknown_statuses_full = True
            logger.warning(
                "more than %d distinct unknown job statuses: no longer logging new ones "
                "(jobs with them are still polled until their deadline)",
                UNKNOWN_STATUSES_KEPT,
            )
