"""The one batching poller of a client: the due-time heap, batch calls, and what each reply
means for its jobs (how a reply is read and checked is ``_replies``'s job).

Someone else may ask the gateway for its keys (a fleet's leader): ``set_asking(False)`` stops
its calls, ``apply_reply`` and ``fail`` feed in what the other one learned, and deadlines fire
as ever.

Every outstanding key sits in a heap ordered by when it is next due (its next ask, or its
deadline if sooner). Each round takes the keys that are due, tops the last batch call up with
keys due soon (so calls go out full rather than more often), sends calls of at most 50 keys
concurrently (bounded), and hands every entry to its job. With nothing outstanding it waits on
an event: no timer ticks, no cost. A poller built with ``gather`` (a fleet's leader, whose keys
come due many a second) holds a call that is not full back for up to that long while more keys
come due, rather than ask any key early.

Every reply is hostile until checked, and one bad entry never costs more than its own job:

* only entries for keys this call asked about are looked at (a bounded few per key), so a reply
  flooded with junk costs one cheap pass (``_replies``), and its warning is one summary line,
  gated like every WARNING that can repeat per call (one line a minute of each kind, with a
  count: ``_telemetry.RepeatedWarnings``);
* optional fields that are unreadable are dropped by the entry reader
  (``_job_info.JobInfo.read``); an entry whose key, status or images are unreadable is
  malformed, and a job listed only in malformed entries fails with ``JobProtocolError`` once
  that lasts the unknown-key grace period;
* a bug while handling one entry fails that job with ``JobProtocolError``, logged, and the
  poller goes on;
* a reply over ``Limits.max_response_bytes`` (or nested too deep) is asked again in halves,
  down to one key; a key whose reply alone stays so fails with ``JobProtocolError`` once that
  lasts the unknown-key grace period; a call of one key refused as a bad parameter is asked
  again after ``max_interval``;
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
from collections.abc import Callable, Collection, Container
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from . import _contract
from ._call_watch import DeadlineWatch, SendTime
from ._config import Limits, PollPolicy
from ._contract import JobStatus
from ._errors import (
    IncompleteJobError,
    JobCancelledError,
    JobError,
    JobProtocolError,
    JobTimeoutError,
    ParameterError,
    ProtocolError,
    RateLimitedError,
    ReplyTooComplexError,
    ResponseTooLargeError,
    TransportError,
    UnknownJobError,
    WujieError,
    shown_key,
    snippet,
)
from ._failures import CallKind
from ._job_info import JobInfo
from ._jobs import ImageJob, ended_copy, holds_bulk, status_name
from ._replies import ENTRIES_PER_KEY, Reading, failure, images_of, lists_extra_images, read
from ._results import ImageResult
from ._schedule import PollSchedule
from ._stats import PollerCounters
from ._tracked import _new_tracked, _Tracked

if TYPE_CHECKING:
    from ._otel import BatchTrace, JobTrace
    from ._telemetry import Telemetry

logger = logging.getLogger("wujie_async")
# Time is the running loop's clock, read directly (``asyncio.get_running_loop().time()``, the
# clock anyio's deadlines use too): it is read per key, on the hot path.
ENDED_JOBS_KEPT = 1024
# Distinct unknown statuses remembered (each is logged once); past this, one last line says so.
UNKNOWN_STATUSES_KEPT = 64


class BatchPoster(Protocol):
    """What the poller needs of a transport: one POST of a batch call, and the client's
    telemetry (``Transport`` is one)."""

    @property
    def telemetry(self) -> Telemetry:
        """The client's telemetry: spans, metrics, repeated-warning gate."""
        ...

    async def post(
        self,
        path: str,
        body: Any,
        *,
        kind: CallKind,
        parent: BatchTrace | None = None,
        on_wire: Callable[[bool], None] | None = None,
    ) -> Any:
        """POST ``body`` to ``path``; the reply envelope's ``data``. ``on_wire(True)``: an
        attempt is about to go on the wire (each retry too)."""
        ...

    def brake_free_in(self, kind: CallKind) -> float:
        """Seconds until the 429 brake of ``kind`` lets a call go (0.0: at once)."""
        ...


_heappush, _heappop = heapq.heappush, heapq.heappop
# Looked up per reply entry: module globals, not attributes of _contract.
_TERMINAL_STATUSES = _contract.TERMINAL_STATUSES
_FAILED_STATUSES = _contract.FAILED_STATUSES
_RUNNING_STATUSES = _contract.RUNNING_STATUSES
_SUCCEEDED, _QUEUED = JobStatus.SUCCEEDED, JobStatus.QUEUED


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


def _recorded(tracked: _Tracked) -> bool:
    """Whether ``tracked``'s changes are written down (a span, or the DEBUG log)."""
    return tracked.trace is not None or logger.isEnabledFor(logging.DEBUG)


# How long a job reported succeeded with images missing is asked about again before it ends
# with IncompleteJobError: a status may turn to 4 a moment before the last images are listed.
IMAGES_AFTER_SUCCESS_GRACE = 3.0
# Jobs whose done report listed none of the images earlier reports did, and which waited the
# grace in vain, after which such jobs no longer wait: this gateway's done reports do not list
# images (unless one of them was seen to list the final ones during its grace).
DONE_UNLISTED_SEEN = 2
# A poller whose keys another asks about (a fleet's leader) asks itself about a job reported
# done with images missing once no report about it came for twice min_interval and this long.
HELD_REPORT_SLACK = 0.5
# The least a key attached with a submit time older than ``PollPolicy.unknown_key_grace`` may be
# left out of replies before it ends as unknown, if it is never listed: the grace waits for a
# new key to be listed at all, which such a key is past; a gateway may still leave a key it
# knows out of a reply or two (a replica that lags), so a few seconds of replies, not one.
OLD_KEY_ABSENCE_GRACE_S = 3.0


class BatchPoller:
    """Holds every outstanding job and polls them in shared batch calls."""

    def __init__(
        self,
        transport: BatchPoster,
        policy: PollPolicy,
        limits: Limits,
        *,
        schedule: PollSchedule | None = None,
        gather: float = 0.0,
    ) -> None:
        self._transport = transport
        self._telemetry = transport.telemetry  # the client's: spans, metrics, warnings
        self._warnings = transport.telemetry.warnings
        self._held = False  # someone else asks the gateway (set_asking)
        self._policy = policy
        # Two pollers of one process may share a schedule: a fleet's leader asks by what its
        # member has learned.
        self._schedule_of = schedule if schedule is not None else PollSchedule(policy)
        self._generation = self._schedule_of.generation
        self._max_response_bytes = limits.max_response_bytes
        # Keys per batch call: the contract's 50 [assumed] until the gateway refuses a call
        # for its size (see _split): a gateway with a lower cap is then asked within it.
        self._batch_size = _contract.MAX_KEYS_PER_BATCH
        self._call_slots = anyio.Semaphore(limits.max_concurrent_polls, fast_acquire=True)
        self._jobs: dict[str, _Tracked] = {}
        # (due, key): keys are unique, so ties on ``due`` are broken by key, no counter needed.
        # An entry counts only while it matches its record's ``due``: a key taken into a call
        # has ``due == inf`` until its reply reschedules it, so it cannot be taken twice.
        self._heap: list[tuple[float, str]] = []
        # What the idle poller awaits (None: it is not asleep); resolved to wake it (a key due
        # sooner, a reply in) or by a timer at ``_sleeping_until``. A fresh one per sleep:
        # what was set before a sleep is seen already.
        self._waking: asyncio.Future[None] | None = None
        self._sleeping_until = math.inf  # when the idle poller will next look at the heap
        # Keys due that wait (taken, ``due == inf``) for more to fill a call, up to ``gather``
        # seconds after the first of them came due (see ``_take_due``).
        self._gather = gather
        self._gathered: list[_Tracked] = []
        self._gathered_since: float | None = None  # when the held keys came due
        self._gathered_until = math.inf  # when they go out (or the first of them expires)
        self._unknown_statuses: set[int] = set()
        self._unknown_statuses_full = False
        # Done reports that list no images, when earlier reports did (temporary URLs while
        # generating, say): waited out in vain, and seen listing the images within the grace.
        self._done_unlisted_in_vain = 0
        # Keys whose reply alone came back unreadable, since when (since they were last
        # listed): rare, so kept here rather than on every key (memory per pending job).
        self._unreadable_since: dict[str, float] = {}
        # Keys the gateway said "succeeded" while images were still missing, since when (the
        # first such report): rare, kept here for the same reason.
        self._done_short_since: dict[str, float] = {}
        # Keys attached with a submit time past the moment after its submit that the policy's
        # grace waits for: how long replies may leave them out, while never listed, before
        # they end as unknown (see ``OLD_KEY_ABSENCE_GRACE_S``). Rare as well.
        self._absence_graces: dict[str, float] = {}
        self._done_relists = False
        # Why the last batch call failed, while no call has succeeded since: a job that
        # reaches its deadline meanwhile says so (credentials revoked mid-run read as a plain
        # timeout otherwise).
        self._failing: str | None = None
        # Replies in a row whose shape could not be read (no list of entries, data null):
        # their keys are asked again after a wait that doubles with each, from min_interval
        # to max_interval (a gateway answering every call so asked 40 times a second).
        self._shapeless_replies = 0
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

    @property
    def schedule(self) -> PollSchedule:
        """The schedule this poller asks by (and learns with)."""
        return self._schedule_of

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

    def forget(self, job: ImageJob) -> None:
        """Stop polling ``job``: the job's own cancel (``job.cancel()``) calls this."""
        tracked = self._jobs.get(job.key)
        if tracked is not None and tracked.job is job:
            self._untrack(tracked)
            if _recorded(tracked):
                # Only for the record: the job's own cancel sets the error its awaiters get.
                error = JobCancelledError("cancelled", job_key=job.key)
                self._observe_end(tracked, error, tracked.job._status)

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

    def cancel_all(self, reason: str) -> None:
        """Stop tracking every job; each awaiter gets JobCancelledError saying ``reason``."""
        self._gathered, self._gathered_since, self._gathered_until = [], None, math.inf
        for tracked in list(self._jobs.values()):
            self._untrack(tracked)
            error = JobCancelledError(reason, job_key=tracked.job.key)
            tracked.job._fail(error)
            self._observe_end(tracked, error, tracked.job._status)

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
                if self._held:  # someone else asks: wait for what it feeds in (or the deadline)
                    batch = self._asked_while_held(batch, now)
                    if not batch:
                        continue
                braked = self._transport.brake_free_in("poll")
                if braked > 0 or self._call_slots.value == 0:
                    # No call may go yet (the 429 brake paces batch queries, or every call slot
                    # is taken by slow replies): the keys go back and are chosen again when one
                    # may, so those that come due meanwhile share that call instead of each
                    # queueing in a call of its own. The first of their deadlines ends the
                    # wait: it fires on time.
                    soonest = min(tracked.job.deadline for tracked in batch)
                    for tracked in batch:
                        self._schedule(tracked, now)
                    with anyio.move_on_after(soonest - now):
                        if braked > 0:
                            await anyio.sleep(braked)
                        else:
                            async with self._call_slots:
                                pass
                    continue
                size = self._batch_size
                for start in range(0, len(batch), size):
                    calls.start_soon(self._poll_chunk, batch[start : start + size])

    def _asked_while_held(self, batch: list[_Tracked], now: float) -> list[_Tracked]:
        """Of the keys due while someone else asks (a fleet's leader), those asked here: a job
        reported done with images still to come whose reports have stopped. The leader knows
        no job's ``n``: its poll of the key ended at a done report listing one image of two,
        and no report brought the rest (the job waited for its deadline). Every other key
        waits for what is fed in, as does this one while reports about it still come."""
        done_short = self._done_short_since
        asked: list[_Tracked] = []
        for tracked in batch:
            if done_short and tracked.job._key in done_short:
                # The leader asks about such a key again after min_interval, in a call that
                # may wait for more keys, and its report takes a moment more to come.
                heard = tracked.answered_at
                quiet = 2 * self._policy.min_interval + HELD_REPORT_SLACK
                if heard is None or now >= heard + quiet:
                    asked.append(tracked)
                else:
                    self._schedule(tracked, heard + quiet)
            else:
                self._schedule(tracked, math.inf)
        return asked

    def _take_due(self, now: float) -> list[_Tracked]:
        taken = [tracked for tracked in self._gathered if self._tracks(tracked)]
        self._gathered = []
        while (tracked := self._pop_due(now)) is not None:
            taken.append(tracked)
        batch: list[_Tracked] = []
        for tracked in taken:
            if now >= tracked.job._deadline:
                self._expire(tracked)
            else:
                batch.append(tracked)
        size = self._batch_size
        partial = len(batch) % size
        if partial and self._gather and not self._held:
            # A poller that gathers (a fleet's leader: many keys, each asked densely) holds the
            # keys of a partial call back while another key comes due before its first key has
            # waited ``gather``: calls go out full, no key is asked early to fill them, and no
            # key waits for nothing.
            if len(batch) > partial or self._gathered_since is None:
                self._gathered_since = now  # the held keys came due in this round
            held = batch[len(batch) - partial :]
            until = min(
                self._gathered_since + self._gather, *(tracked.job.deadline for tracked in held)
            )
            if self._next_due() < until:
                self._gathered, self._gathered_until = held, until
                return batch[: len(batch) - partial]
        self._gathered_since, self._gathered_until = None, math.inf
        if batch:
            # Fill the last call's free places with keys due soon: same calls, fuller batches.
            room = -len(batch) % size
            horizon = now + self._policy.batch_fill_horizon
            while room and (tracked := self._pop_due(horizon)) is not None:
                batch.append(tracked)
                room -= 1
        return batch

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

    async def _poll_chunk(self, chunk: list[_Tracked]) -> None:
        watch = DeadlineWatch(asyncio.get_running_loop(), chunk, self._expire)
        try:
            await self._poll_keys(chunk)
        finally:
            watch.cancel()
            self._wake()

    async def _poll_keys(self, chunk: list[_Tracked]) -> bool:
        """One batch call for ``chunk``; an over-cap or unreadable reply, or a call of
        several keys refused as a bad parameter, is asked again in halves (a key alone
        refused is asked again later, as after any failed call). True when the gateway
        refused this call as a bad parameter (a cap on keys per call lower than ours, or a
        key it will not be asked about)."""
        jobs = self._jobs
        asked = {
            key: tracked
            for tracked in chunk  # some may have ended
            if jobs.get(key := tracked.job._key) is tracked
        }
        if not asked:
            return False
        chunk = list(asked.values())
        asked_at: float | None = None  # when the call went out (None: it did not)
        reading: Reading | None = None
        unreadable: WujieError | None = None  # a reply too large or too deep: split
        retry_wait: float | None = None  # after a failed call (None: min_interval)
        otel = self._telemetry.otel
        batch: BatchTrace | None = None
        failure: BaseException | None = None
        try:
            if otel is not None:  # begun before the wait for a call slot: a span shows that wait
                batch = otel.batch_started([tracked.trace for tracked in chunk])
            async with self._call_slots:
                self.counters.batch_calls += 1
                self.counters.keys_polled += len(asked)
                sent = SendTime(asyncio.get_running_loop())
                data = await self._transport.post(
                    _contract.BATCH_INFO_PATH,
                    list(asked),
                    kind="poll",
                    parent=batch,
                    on_wire=sent.on_wire,
                )
                # When the attempt that was answered went out: not the first attempt's time,
                # when the transport retried (after a dropped connection or a 5xx, and its
                # backoff), which dated the reply too early for the schedule.
                asked_at = sent.at
            try:
                reading = self._read(data, asked)
            except ProtocolError:
                self._shapeless_replies += 1
                policy = self._policy
                doublings = min(self._shapeless_replies - 1, 30)  # 2.0**1024 overflows
                retry_wait = min(policy.min_interval * 2.0**doublings, policy.max_interval)
                raise
            self._shapeless_replies = 0
            self._failing = None
        except WujieError as exc:
            failure = exc
            self._failing = f"{type(exc).__name__}: {snippet(str(exc), limit=120)}"
            if isinstance(exc, RateLimitedError):  # refused outright, not retried by the transport
                # Asked again after Retry-After, with the keys due then: at least min_interval,
                # and at most max_interval (an hour's Retry-After must not park every job; the
                # 429 brake slows the calls down if the refusals go on).
                policy = self._policy
                retry_wait = min(
                    max(policy.min_interval, exc.retry_after or 0.0), policy.max_interval
                )
                logger.debug(
                    "batch query of %d keys refused (429): asked again in %.2fs",
                    len(asked),
                    retry_wait,
                )
            else:
                self.counters.batch_errors += 1
                # A reply too large, or one entry nested too deep to read: asked in halves, so
                # that only the keys it concerns end.
                if isinstance(exc, ResponseTooLargeError | ReplyTooComplexError):
                    unreadable = exc
                elif isinstance(exc, ParameterError) and len(asked) > 1:
                    unreadable = exc  # 20010001 is the contract's answer to too many keys
                else:
                    if isinstance(exc, ParameterError) or (
                        isinstance(exc, TransportError) and exc.lasting
                    ):
                        # Refused even alone: a key the gateway will not be asked about, or
                        # a body it never takes. Not asked again every min_interval (a
                        # gateway refusing every call got 740 calls a second). Nor a gateway
                        # whose certificate cannot be verified (a TLS handshake each time).
                        retry_wait = self._policy.max_interval
                    self._warnings.warning(
                        "batch query of %d keys failed: %s",
                        len(asked),
                        snippet(str(exc)),
                        cause=type(exc).__name__,  # a new cause (a 401 among 503s) is written
                    )
        except asyncio.CancelledError as exc:  # closed or stopped while on the wire: no reply
            failure = exc
            raise
        except Exception as exc:  # a bug must not take the poller, and every job with it, down
            self.counters.batch_errors += 1
            failure = exc
            self._warnings.warning(
                "batch query of %d keys failed unexpectedly", len(asked), exc_info=True
            )
        finally:
            if batch is not None and otel is not None:
                otel.batch_ended(
                    batch,
                    error=failure,
                    listed=len(reading.entries) if reading is not None else 0,
                    malformed=reading.bad_entries if reading is not None else 0,
                )
        if unreadable is not None:
            await self._split(chunk, unreadable)
        else:
            self._apply_reading(chunk, reading, asked_at, retry_wait)
        return isinstance(failure, ParameterError)

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

    # --- someone else asks the gateway for this poller's keys (a fleet's leader) ------------
    def set_asking(self, asking: bool) -> None:
        """Whether this poller sends its own batch calls (it does by default).

        Off: its keys are asked about elsewhere (a fleet's leader) and what that learns is fed
        in with :meth:`apply_reply` and :meth:`fail`; deadlines still fire here. Back on: every
        key not on the wire is asked about now.
        """
        self._held = not asking
        if asking:
            now = asyncio.get_running_loop().time()
            for tracked in self._jobs.values():
                if now < tracked.due < math.inf:
                    self._schedule(tracked, now)
        self._wake()

    def apply_reply(self, asked: Collection[str], data: Any) -> None:
        """Apply a batch reply fetched elsewhere (``data`` as the gateway sent it) for the keys
        ``asked``, exactly as a reply to a call of this poller's own: every entry is checked
        the same way, and a key it does not list counts as absent. Keys not tracked, or in a
        call of this poller's own on the wire (whose reply counts), are left alone."""
        chunk = [
            tracked
            for key in asked
            if (tracked := self._jobs.get(key)) is not None and tracked.due != math.inf
        ]
        if not chunk:
            return
        try:
            # Read against every key the call asked (not only those still tracked here): an
            # entry for a key that ended meanwhile was asked about, not a gateway anomaly.
            reading: Reading | None = self._read(data, set(asked))
        except Exception:  # hostile input may only ever mean "malformed": as a failed call
            reading = None
        self._apply_reading(chunk, reading)
        self._wake()

    def fail(self, key: str, error: JobError) -> None:
        """End ``key``'s job with ``error``: whoever asks the gateway for it gave up on it (the
        gateway kept not listing it, or its entry was unreadable or too large)."""
        tracked = self._jobs.get(key)
        if tracked is not None:
            self._end(tracked, error, tracked.job._status)

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

    async def _split(self, chunk: list[_Tracked], problem: WujieError) -> None:
        if len(chunk) == 1:
            [tracked] = chunk
            if self._tracks(tracked):
                # Asked about alone and still unreadable: about this job, or a gateway that
                # sends any reply oversized or too deep for a while (a burst of bombs failed
                # every job of the calls it hit within half a second). As a job listed only
                # in malformed entries, it ends once that lasts the unknown-key grace.
                now = asyncio.get_running_loop().time()
                # From the first such reply: a job asked rarely (a long estimate) met by one
                # bomb failed at once when this counted from its last listing.
                since = self._unreadable_since.setdefault(tracked.job.key, now)
                if now - since < self._policy.unknown_key_grace:
                    tracked.failed_call = f"{type(problem).__name__}: {snippet(str(problem))}"
                    tracked.failed_since_answer = True
                    self._schedule(tracked, now + self._policy.max_interval)
                else:
                    self._end_unreadable(tracked, problem, now - since)
            return
        self._warnings.warning(
            "a batch reply for %d keys %s: asking in halves",
            len(chunk),
            "was over the size cap"
            if isinstance(problem, ResponseTooLargeError)
            else "was refused as a bad parameter"
            if isinstance(problem, ParameterError)
            else "could not be read (nested too deep, or too many JSON objects)",
        )
        middle = len(chunk) // 2
        refused = [await self._poll_keys(chunk[:middle]), await self._poll_keys(chunk[middle:])]
        if isinstance(problem, ParameterError) and not any(refused):
            # Both halves were taken where the whole was refused: the gateway caps keys per
            # call below ours (a bad key would have had its half refused). Calls keep within
            # what was taken from now on.
            size = len(chunk) - middle
            if size < self._batch_size:
                self._batch_size = size
                self._warnings.warning(
                    "the gateway refused a batch query of %d keys and took %d: asking at most "
                    "%d keys per call from now on",
                    len(chunk),
                    size,
                    size,
                )

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

    def _observe_end(
        self, tracked: _Tracked, error: JobError | None, before: JobStatus | int | None
    ) -> None:
        """A tracked job ended: its DEBUG line, and its span and metrics."""
        if tracked.trace is not None or logger.isEnabledFor(logging.DEBUG):  # _recorded(...)
            self._telemetry.job_ended(
                tracked.trace, tracked.job.key, before, tracked.job, error, tracked.asks
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
