"""The one batching poller of a client.

Every outstanding key sits in a heap ordered by when it is next due (its next ask, or its
deadline if sooner). Each round takes the keys that are due, tops the last batch call up with
keys due soon (so calls go out full rather than more often), sends calls of at most 50 keys
concurrently (bounded), and hands every entry to its job. With nothing outstanding it waits on
an event: no timer ticks, no cost.

Every reply is hostile until checked, and one bad entry never costs more than its own job:

* only entries for keys this call asked about are looked at (a bounded few per key), so a reply
  flooded with junk costs one cheap pass, and warnings are one summary line per reply;
* optional fields that are unreadable are dropped at the model (``_models.JobInfo``); an entry
  whose key or status is unreadable is malformed, and a job listed only in malformed entries
  fails with ``JobProtocolError`` once that lasts the unknown-key grace period;
* a bug while handling one entry fails that job with ``JobProtocolError``, logged, and the
  poller goes on;
* a reply over ``Limits.max_response_bytes`` is asked again in halves, down to one key; a key
  whose entry alone is too large fails with ``JobProtocolError``;
* a job's deadline fires on time even while its key is in a call on the wire (a timer per call);
  the late reply is then ignored for that job.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from pydantic import TypeAdapter, ValidationError

from . import _contract, _jobs
from ._config import Limits, PollPolicy
from ._contract import JobStatus
from ._errors import (
    JobCancelledError,
    JobError,
    JobFailedError,
    JobProtocolError,
    JobTimeoutError,
    ModerationRejectedError,
    ProtocolError,
    ResponseTooLargeError,
    UnknownJobError,
    WujieError,
    snippet,
)
from ._jobs import ImageJob
from ._models import GeneratedImage, JobInfo
from ._schedule import KeyTiming, PollSchedule
from ._transport import Transport

logger = logging.getLogger("wujie_async")
ENDED_JOBS_KEPT = 1024
# Distinct unknown statuses remembered (each is logged once); past this, one last line says so.
UNKNOWN_STATUSES_KEPT = 64
# A reply may repeat a key; more than this many entries for one key are not even looked at.
ENTRIES_PER_KEY = 4
_JOB_LIST = TypeAdapter(list[JobInfo])


class PollDelegate(Protocol):
    """Someone else asks the gateway for this poller's keys (a fleet's leader), while it can."""

    def take(self, keys: list[str]) -> float | None:
        """Keys of this poller that are due now; the delegate sees they get asked about.

        Returns:
            Seconds after which those keys come due here again if no report came meanwhile
            (reports arrive through :meth:`BatchPoller.apply_report`), or None when the
            delegate cannot ask for them now: the poller then asks itself, as without one.
        """
        ...


@dataclass(slots=True)
class PollerCounters:
    """Mutable counters behind ``client.stats``."""

    batch_calls: int = 0
    batch_errors: int = 0
    keys_polled: int = 0
    succeeded: int = 0
    failed: int = 0
    malformed_entries: int = 0
    ignored_entries: int = 0
    split_batches: int = 0
    reports_applied: int = 0


@dataclass(slots=True, kw_only=True)
class _Tracked(KeyTiming):
    """A tracked job with the poller's own state of it: none of this is the user's to see."""

    job: ImageJob
    # When the key is asked about next; ``inf`` while it is in a call on the wire.
    due: float = math.inf
    # When the gateway last listed the key (None: not yet); absence is measured from here.
    last_seen: float | None = None


@dataclass(slots=True)
class _Reading:
    """What one batch reply said about the keys asked."""

    entries: dict[str, JobInfo]
    # Keys that were listed only in malformed entries, with why (a short, clean excerpt).
    malformed: dict[str, str]


def _images(entry: JobInfo) -> list[GeneratedImage]:
    return [
        GeneratedImage(index, image.url, image.b64_json, image.revised_prompt)
        for index, image in enumerate(entry.images or ())
    ]


def _most_advanced(entries: Iterable[JobInfo]) -> dict[str, JobInfo]:
    """One entry per key: a repeated key keeps its terminal or most complete report."""
    best: dict[str, JobInfo] = {}
    for entry in entries:
        seen = best.get(entry.key)
        if (
            seen is None
            or (entry.terminal and not seen.terminal)
            or (
                entry.terminal == seen.terminal and len(entry.images or ()) > len(seen.images or ())
            )
        ):
            best[entry.key] = entry
    return best


def _listed(data: Any) -> list[Any]:
    """The list of entries of a batch reply's ``data``.

    The reply's shape is [assumed] (see _contract). A bare array, or a null list (nothing
    found), are read the same way rather than failing every job.
    """
    listed = data.get(_contract.BATCH_LIST_FIELD, ...) if isinstance(data, dict) else data
    if listed is None:
        return []
    if not isinstance(listed, list):
        raise ProtocolError(f"batch reply data has no list: {snippet(str(data)[:400])}")
    return listed


def _relevant(listed: list[Any], asked: Container[str]) -> list[dict[str, Any]]:
    """The entries of ``listed`` for keys in ``asked``, at most ENTRIES_PER_KEY per key.

    One dict lookup per entry before any validation: a reply flooded with junk costs one pass.
    """
    relevant: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for raw in listed:
        if type(raw) is dict:
            key = raw.get("key")
            # Exact match only: a key with a newline or control character is not ours.
            if type(key) is str and key in asked:
                seen = counts.get(key, 0)
                if seen < ENTRIES_PER_KEY:
                    counts[key] = seen + 1
                    relevant.append(raw)
    return relevant


def raw_entries_by_key(data: Any, asked: Container[str]) -> dict[str, list[dict[str, Any]]]:
    """A batch reply's raw entries for the keys asked, grouped by key (not validated).

    For a fleet's leader, who passes each key's entries to its owner unread: the owner
    validates them with :meth:`BatchPoller.apply_report`, exactly as its own replies.
    At most ENTRIES_PER_KEY entries per key; entries for keys not asked are dropped.

    Raises:
        ProtocolError: ``data`` holds no list of entries.
    """
    grouped: dict[str, list[dict[str, Any]]] = {}
    for raw in _relevant(_listed(data), asked):
        grouped.setdefault(raw["key"], []).append(raw)
    return grouped


def _why(exc: ValidationError) -> str:
    """A short account of a validation error that never echoes the hostile input itself."""
    return snippet(
        "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'entry'}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)[:3]
        )
    )


class _DeadlineWatch:
    """Ends the jobs of one call on the wire whose deadline passes before the reply is back.

    One timer per call (armed for the earliest deadline among its jobs), not one per job: a
    job waiting on a slow reply still fails with JobTimeoutError on time.
    """

    __slots__ = ("_chunk", "_expire", "_handle", "_loop", "_when")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        chunk: list[_Tracked],
        expire: Callable[[_Tracked], None],
    ) -> None:
        self._loop = loop
        self._chunk = chunk
        self._expire = expire
        self._handle: asyncio.TimerHandle | None = None
        self._when = math.inf
        self._arm()

    def _arm(self) -> None:
        self._when = min(
            (tracked.job.deadline for tracked in self._chunk if not tracked.job.done()),
            default=math.inf,
        )
        if self._when < math.inf:
            self._handle = self._loop.call_at(self._when, self._fire)

    def _fire(self) -> None:
        # asyncio may run a timer a clock tick early: the time it was armed for counts as now.
        now = max(self._loop.time(), self._when)
        for tracked in self._chunk:
            if not tracked.job.done() and tracked.job.deadline <= now:
                self._expire(tracked)
        self._arm()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class BatchPoller:
    """Holds every outstanding job and polls them in shared batch calls."""

    def __init__(self, transport: Transport, policy: PollPolicy, limits: Limits) -> None:
        self._transport = transport
        self._delegate: PollDelegate | None = None
        self._policy = policy
        self._schedule_of = PollSchedule(policy)
        self._generation = self._schedule_of.generation
        self._max_response_bytes = limits.max_response_bytes
        self._call_slots = asyncio.Semaphore(limits.max_concurrent_polls)
        self._jobs: dict[str, _Tracked] = {}
        # (due, key): keys are unique, so ties on ``due`` are broken by key, no counter needed.
        # An entry counts only while it matches its record's ``due``: a key taken into a call
        # has ``due == inf`` until its reply reschedules it, so it cannot be taken twice.
        self._heap: list[tuple[float, str]] = []
        self._wakeup = asyncio.Event()
        self._sleeping_until = math.inf  # when the idle poller will next look at the heap
        self._unknown_statuses: set[int] = set()
        self._unknown_statuses_full = False
        # Jobs that ended lately, so attach(key) right after the end returns the ended job
        # (a status endpoint attaching per request) instead of starting over; bounded. A job
        # holding bulk (inline image bytes, an edit's source images) is held weakly, next to a
        # light settled copy: the cache never keeps those bytes alive by itself.
        self._ended: OrderedDict[str, ImageJob | tuple[weakref.ref[ImageJob], ImageJob]] = (
            OrderedDict()
        )
        self.counters = PollerCounters()

    def __len__(self) -> int:
        return len(self._jobs)

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

    def jobs(self) -> list[ImageJob]:
        """Every outstanding job."""
        return [tracked.job for tracked in self._jobs.values()]

    def track(self, job: ImageJob, first_delay: float | None = None) -> None:
        """Start polling ``job``: first ask after ``first_delay`` (default: the policy's)."""
        now = asyncio.get_running_loop().time()
        request = job.request
        model = request.get("model") if request is not None else None
        tracked = _Tracked(created_at=now, model=model if isinstance(model, str) else None, job=job)
        self._jobs[job.key] = tracked
        if first_delay is None:
            self._schedule(tracked, self._schedule_of.first_ask(tracked))
        else:
            self._schedule(tracked, now + first_delay)
        if tracked.due < self._sleeping_until:  # only wake the poller if this key is due sooner
            self._wakeup.set()

    def forget(self, job: ImageJob) -> None:
        """Stop polling ``job`` (it ended or was cancelled)."""
        tracked = self._jobs.get(job.key)
        if tracked is not None and tracked.job is job:
            del self._jobs[job.key]
            tracked.due = math.inf

    def cancel_all(self, reason: str) -> None:
        """Stop tracking every job; each awaiter gets JobCancelledError saying ``reason``."""
        for job in self.jobs():
            self.forget(job)
            _jobs.fail(job, JobCancelledError(reason, job_key=job.key))

    def _tracks(self, tracked: _Tracked) -> bool:
        return self._jobs.get(tracked.job.key) is tracked

    def _schedule(self, tracked: _Tracked, when: float) -> None:
        tracked.due = min(when, tracked.job.deadline)
        heapq.heappush(self._heap, (tracked.due, tracked.job.key))

    def _pop_due(self, horizon: float) -> _Tracked | None:
        """The next key due by ``horizon``, skipping heap entries made stale by rescheduling."""
        while self._heap and self._heap[0][0] <= horizon:
            due, key = heapq.heappop(self._heap)
            tracked = self._jobs.get(key)
            if tracked is not None and tracked.due == due:
                tracked.due = math.inf  # taken: no other heap entry counts until rescheduled
                return tracked
        return None

    async def run(self) -> None:
        """Poll until cancelled. The client runs this once, as its one background task."""
        loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as calls:
            while True:
                now = loop.time()
                batch = self._take_due(now)
                if not batch:
                    await self._sleep_until_due(loop)
                    continue
                delegate = self._delegate
                if delegate is not None:
                    backstop = delegate.take([tracked.job.key for tracked in batch])
                    if backstop is not None:
                        # Another member asks for these; its reports come through apply_report.
                        for tracked in batch:
                            self._schedule(tracked, now + backstop)
                        continue
                size = _contract.MAX_KEYS_PER_BATCH
                for start in range(0, len(batch), size):
                    calls.start_soon(self._poll_chunk, batch[start : start + size])

    def _take_due(self, now: float) -> list[_Tracked]:
        batch: list[_Tracked] = []
        while (tracked := self._pop_due(now)) is not None:
            if now >= tracked.job.deadline:
                self._expire(tracked)
                continue
            batch.append(tracked)
        if batch:
            # Fill the last call's free places with keys due soon: same calls, fuller batches.
            room = -len(batch) % _contract.MAX_KEYS_PER_BATCH
            horizon = now + self._policy.batch_fill_horizon
            while room and (tracked := self._pop_due(horizon)) is not None:
                batch.append(tracked)
                room -= 1
        return batch

    async def _sleep_until_due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wakeup.clear()
        heap, jobs = self._heap, self._jobs
        while heap and ((tracked := jobs.get(heap[0][1])) is None or tracked.due != heap[0][0]):
            heapq.heappop(heap)  # drop entries of jobs that ended or were rescheduled
        self._sleeping_until = heap[0][0] if heap else math.inf
        try:
            with anyio.move_on_after(self._sleeping_until - loop.time()):
                await self._wakeup.wait()
        finally:
            self._sleeping_until = -math.inf  # awake: new keys need no wake-up call

    def _expire(self, tracked: _Tracked) -> None:
        if self._tracks(tracked):
            job = tracked.job
            self._end(job, JobTimeoutError("still running at its deadline", job_key=job.key))

    async def _poll_chunk(self, chunk: list[_Tracked]) -> None:
        watch = _DeadlineWatch(asyncio.get_running_loop(), chunk, self._expire)
        try:
            await self._poll_keys(chunk)
        finally:
            watch.cancel()
            self._wakeup.set()

    async def _poll_keys(self, chunk: list[_Tracked]) -> None:
        """One batch call for ``chunk``; an over-cap reply is asked again in halves."""
        chunk = [tracked for tracked in chunk if self._tracks(tracked)]  # some may have ended
        if not chunk:
            return
        asked = {tracked.job.key: tracked for tracked in chunk}
        reading: _Reading | None = None
        too_large = False
        try:
            async with self._call_slots:
                self.counters.batch_calls += 1
                self.counters.keys_polled += len(asked)
                data = await self._transport.post(
                    _contract.BATCH_INFO_PATH, list(asked), kind="poll"
                )
            reading = self._read(data, asked)
        except WujieError as exc:
            self.counters.batch_errors += 1
            too_large = isinstance(exc, ResponseTooLargeError)
            if not too_large:
                logger.warning("batch query of %d keys failed: %s", len(asked), snippet(str(exc)))
        except Exception:  # a bug must not take the poller, and every job with it, down
            self.counters.batch_errors += 1
            logger.exception("batch query of %d keys failed unexpectedly", len(asked))
        if too_large:
            await self._split(chunk)
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        # Gateway times are unix seconds; loop time is not: this maps one onto the other.
        unix_to_loop = now - time.time()
        for tracked in chunk:
            if not self._tracks(tracked):
                continue  # cancelled, or past its deadline, while the call was out
            if reading is None:
                self._schedule(tracked, now + self._policy.min_interval)
                continue
            self._dispatch_contained(tracked, reading, now, unix_to_loop)
        self._after_replies(now)

    def _dispatch_contained(
        self, tracked: _Tracked, reading: _Reading, now: float, unix_to_loop: float
    ) -> None:
        try:
            self._dispatch(tracked, reading, now, unix_to_loop)
        except Exception as exc:  # contained per entry: this job fails, the rest go on
            logger.exception("handling the batch entry of one job failed")
            if self._tracks(tracked):
                self._end(
                    tracked.job,
                    JobProtocolError(
                        f"its batch entry could not be handled: {type(exc).__name__}",
                        job_key=tracked.job.key,
                    ),
                )

    def _after_replies(self, now: float) -> None:
        if self._schedule_of.generation != self._generation:
            self._generation = self._schedule_of.generation
            self._pull_in_waiting(now)

    # --- seams for a fleet (a leader asks the gateway; this poller applies its reports) -------
    def set_delegate(self, delegate: PollDelegate | None) -> None:
        """Let ``delegate`` ask the gateway for this poller's keys (see PollDelegate)."""
        self._delegate = delegate
        self._wakeup.set()

    def apply_report(
        self, key: str, entries: list[Any] | None, *, too_large: bool = False
    ) -> float | None:
        """Apply what another member's batch call said about ``key``, exactly as a reply.

        Args:
            key: the job's key.
            entries: the raw entries the gateway listed for ``key`` (hostile: validated here
                as in a reply of this poller's own); None or empty when it listed none.
            too_large: the gateway's entry for this key alone was over the reply cap.

        Returns:
            When the key is next due (loop time) if its job still runs, else None (ended, not
            tracked, or in a call of this poller's own on the wire, whose reply counts).
        """
        tracked = self._jobs.get(key)
        if tracked is None or tracked.due == math.inf:
            return None
        self.counters.reports_applied += 1
        if too_large:
            self._end_too_large(tracked.job)
            return None
        loop = asyncio.get_running_loop()
        now = loop.time()
        if entries:
            try:
                reading = self._read(entries, (key,))
            except Exception:  # hostile input may only ever mean "malformed"
                reading = _Reading({}, {key: "unreadable report"})
        else:
            reading = _Reading({}, {})
        self._dispatch_contained(tracked, reading, now, now - time.time())
        self._after_replies(now)
        if not self._tracks(tracked):
            return None
        self._wakeup.set()
        return tracked.due

    def next_due(self, key: str) -> float | None:
        """When ``key`` is next asked about (loop time); None if not tracked or on the wire."""
        tracked = self._jobs.get(key)
        if tracked is None or tracked.due == math.inf:
            return None
        return tracked.due

    def due_times(self) -> dict[str, float]:
        """Every tracked key not on the wire -> when it is next asked about (loop time)."""
        return {key: t.due for key, t in self._jobs.items() if t.due != math.inf}

    def poll_soon(self) -> None:
        """Make every tracked key not on the wire due now (the delegate went away)."""
        now = asyncio.get_running_loop().time()
        for tracked in self._jobs.values():
            if tracked.due != math.inf and tracked.due > now:
                self._schedule(tracked, now)
        self._wakeup.set()

    def _end_too_large(self, job: ImageJob) -> None:
        self._end(
            job,
            JobProtocolError(
                "the gateway's entry for this job alone is over the "
                f"{self._max_response_bytes}-byte reply cap "
                "(raise Limits.max_response_bytes to fetch it)",
                job_key=job.key,
            ),
        )

    def _pull_in_waiting(self, now: float) -> None:
        """The learned window widened: keys waiting for a later window start are due sooner."""
        watch_start = self._schedule_of.watch_starts()
        for tracked in self._jobs.values():
            if tracked.due == math.inf:
                continue  # in a call on the wire: its reply reschedules it
            opens = watch_start(tracked)
            if opens < tracked.due:
                self._schedule(tracked, max(now, opens))
        self._wakeup.set()

    async def _split(self, chunk: list[_Tracked]) -> None:
        if len(chunk) == 1:
            [tracked] = chunk
            if self._tracks(tracked):
                self._end_too_large(tracked.job)
            return
        self.counters.split_batches += 1
        logger.warning(
            "a batch reply for %d keys was over the size cap: asking in halves", len(chunk)
        )
        middle = len(chunk) // 2
        await self._poll_keys(chunk[:middle])
        await self._poll_keys(chunk[middle:])

    def _read(self, data: Any, asked: Container[str] | None) -> _Reading:
        """The entries of a reply for the keys in ``asked`` (every entry when None).

        Work is bounded by the keys asked: an entry for another key is skipped with one dict
        lookup, before any validation, and at most ENTRIES_PER_KEY entries of one key are read.
        Problems are summed up in one warning per reply, never one line per entry.
        """
        listed = _listed(data)
        relevant = listed if asked is None else _relevant(listed, asked)
        ignored = len(listed) - len(relevant)
        malformed: dict[str, str] = {}
        first_problem = ""
        # Validating hostile input may only ever mean "malformed": anything it raises (a
        # ValidationError, or a TypeError from deep inside a validator) marks the entry bad.
        try:  # one validation call for the whole list: the common, well-formed case
            entries = _JOB_LIST.validate_python(relevant)
        except Exception:
            entries = []
            for raw in relevant:  # find the bad entries, keep the good ones
                try:
                    entries.append(JobInfo.read(raw))
                except Exception as exc:
                    why = _why(exc) if isinstance(exc, ValidationError) else type(exc).__name__
                    first_problem = first_problem or why
                    key = raw.get("key") if isinstance(raw, dict) else None
                    if isinstance(key, str):
                        malformed.setdefault(key, why)
        bad = len(relevant) - len(entries)
        self.counters.malformed_entries += bad
        self.counters.ignored_entries += ignored
        if bad or ignored:
            logger.warning(
                "batch reply: ignored %d malformed entries and %d entries for keys not asked "
                "about%s",
                bad,
                ignored,
                f" (first problem: {first_problem})" if first_problem else "",
            )
        best = _most_advanced(entries)
        for key in best:
            malformed.pop(key, None)  # one readable entry is enough
        return _Reading(best, malformed)

    def read_reply(self, data: Any) -> dict[str, JobInfo]:
        """Every readable entry of a batch reply's ``data``, one per key, as polls read them.

        Reads every key (a poll reads only the keys it asked about); malformed entries are
        counted in ``counters.malformed_entries`` and left out. For tools and tests.

        Raises:
            ProtocolError: ``data`` holds no list of entries.
        """
        return self._read(data, None).entries

    def _dispatch(
        self, tracked: _Tracked, reading: _Reading, now: float, unix_to_loop: float
    ) -> None:
        policy = self._policy
        job = tracked.job
        entry = reading.entries.get(job.key)
        if entry is None:
            since = tracked.last_seen if tracked.last_seen is not None else tracked.created_at
            if now - since < policy.unknown_key_grace:
                self._schedule(tracked, now + policy.min_interval)
                return
            why = reading.malformed.get(job.key)
            error: JobError
            if why is not None:
                error = JobProtocolError(
                    f"the gateway has listed this key only in malformed entries for "
                    f"{now - since:.1f}s ({why})",
                    job_key=job.key,
                )
            else:
                error = UnknownJobError(
                    f"the gateway has not listed this key for {now - since:.1f}s "
                    "(wrong key, another app's key, or a result already cleaned up)",
                    job_key=job.key,
                )
            self._end(job, error)
            return
        tracked.last_seen = now
        _jobs.record_report(job, entry)
        if entry.images and len(entry.images) > len(job.images):
            _jobs.add_images(job, _images(entry))
        status = entry.status
        if status in _contract.TERMINAL_STATUSES:
            ended_at = entry.complete_time
            self._schedule_of.job_ended(
                tracked,
                now,
                ended_at + unix_to_loop if isinstance(ended_at, int | float) else None,
            )
        if status == JobStatus.SUCCEEDED:
            self.forget(job)
            self.counters.succeeded += 1
            _jobs.succeed(job, JobStatus.SUCCEEDED)
            self._remember_ended(job)
        elif status in _contract.FAILED_STATUSES:
            self._end(job, self._failure(job, entry))
        else:
            if status not in _contract.RUNNING_STATUSES:
                self._note_unknown_status(status, job.key)
            self._schedule(
                tracked,
                self._schedule_of.report(
                    tracked,
                    now,
                    expected_seconds=entry.expected_seconds,
                    queue_position=entry.queue_before_num,
                ),
            )

    @staticmethod
    def _failure(job: ImageJob, entry: JobInfo) -> JobFailedError:
        fail = entry.fail_message
        if fail is None or isinstance(fail, str):
            code, text = None, fail
        else:
            code, text = fail.fail_code, fail.fail_message
        message = snippet(text) if text else None  # server text: one clean, short line
        if entry.status == JobStatus.ENDED_WITHOUT_RESULT:
            said = f": {message}" if message else ""
            message = f"the gateway ended the job without a result (status -1){said}"
        if entry.status == JobStatus.MODERATION_REJECTED:
            return ModerationRejectedError(job_key=job.key, fail_code=code, fail_message=message)
        return JobFailedError(job_key=job.key, fail_code=code, fail_message=message)

    def _note_unknown_status(self, status: int, key: str) -> None:
        """Log each unknown status once, remembering a bounded number of them."""
        known = self._unknown_statuses
        if status in known:
            return
        if len(known) < UNKNOWN_STATUSES_KEPT:
            known.add(status)
            logger.warning("unknown job status %d (key %s): still polling", status, snippet(key))
        elif not self._unknown_statuses_full:
            self._unknown_statuses_full = True
            logger.warning(
                "more than %d distinct unknown job statuses: no longer logging new ones "
                "(jobs with them are still polled until their deadline)",
                UNKNOWN_STATUSES_KEPT,
            )

    def _end(self, job: ImageJob, error: JobError) -> None:
        self.forget(job)
        self.counters.failed += 1
        _jobs.fail(job, error)
        self._remember_ended(job)

    def _remember_ended(self, job: ImageJob) -> None:
        ended = self._ended
        ended[job.key] = (weakref.ref(job), _jobs.ended_copy(job)) if _jobs.holds_bulk(job) else job
        ended.move_to_end(job.key)
        if len(ended) > ENDED_JOBS_KEPT:
            ended.popitem(last=False)
