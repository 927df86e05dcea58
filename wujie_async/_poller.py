"""The one batching poller of a client: its run loop and its batch calls.

``BatchPoller`` is built in layers, a module each, every one a base class of the next: when
each key is due (``_due_keys``), how a job ends (``_job_ends``), and what a reply means for
each of its jobs (``_fan_out``); how a reply is read and checked is ``_replies``'s job.

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
import logging
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from . import _contract
from ._call_watch import DeadlineWatch, SendTime
from ._config import Limits, PollPolicy
from ._errors import (
    AuthenticationError,
    JobError,
    ParameterError,
    ProtocolError,
    RateLimitedError,
    ReplyTooComplexError,
    ResponseTooLargeError,
    TransportError,
    WujieError,
    snippet,
)
from ._failures import CallKind
from ._fan_out import _FanOut
from ._jobs import ImageJob
from ._replies import Reading
from ._schedule import PollSchedule
from ._stats import PollerCounters
from ._tracked import _Tracked

if TYPE_CHECKING:
    from ._otel import BatchTrace
    from ._telemetry import Telemetry

logger = logging.getLogger("wujie_async")
# Time is the running loop's clock, read directly (``asyncio.get_running_loop().time()``, the
# clock anyio's deadlines use too): it is read per key, on the hot path.


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


# A poller whose keys another asks about (a fleet's leader) asks itself about a job reported
# done with images missing once no report about it came for twice min_interval and this long.
HELD_REPORT_SLACK = 0.5
# The least a key attached with a submit time older than ``PollPolicy.unknown_key_grace`` may be
# left out of replies before it ends as unknown, if it is never listed: the grace waits for a
# new key to be listed at all, which such a key is past; a gateway may still leave a key it
# knows out of a reply or two (a replica that lags), so a few seconds of replies, not one.
OLD_KEY_ABSENCE_GRACE_S = 3.0


class BatchPoller(_FanOut):
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
        self.cost_told_unreadably = None  # the client's budget sets it, if it keeps one
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
                if isinstance(exc, AuthenticationError):
                    self.counters.credentials_refused += 1
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
