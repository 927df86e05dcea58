"""The one batching poller of a client.

Every outstanding key sits in a heap ordered by when it is next due (its next ask, or its
deadline if sooner). Each round takes the keys that are due, tops the last batch call up with
keys due soon (so calls go out full rather than more often), sends calls of at most 50 keys
concurrently (bounded), and hands every entry to its job. With nothing outstanding it waits on
an event: no timer ticks, no cost.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import anyio
from pydantic import TypeAdapter, ValidationError

from . import _contract
from ._config import Limits, PollPolicy
from ._errors import (
    JobCancelledError,
    JobError,
    JobFailedError,
    JobTimeoutError,
    ModerationRejectedError,
    ProtocolError,
    UnknownJobError,
    WujieError,
)
from ._jobs import ImageJob
from ._models import FailInfo, GeneratedImage, JobInfo
from ._transport import Transport

logger = logging.getLogger("wujie_async")
ENDED_JOBS_KEPT = 1024
_JOB_LIST = TypeAdapter(list[JobInfo])


@dataclass(slots=True)
class PollerCounters:
    """Mutable counters behind ``client.stats``."""

    batch_calls: int = 0
    batch_errors: int = 0
    keys_polled: int = 0
    succeeded: int = 0
    failed: int = 0
    malformed_entries: int = 0


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


class BatchPoller:
    """Holds every outstanding job and polls them in shared batch calls."""

    def __init__(self, transport: Transport, policy: PollPolicy, limits: Limits) -> None:
        self._transport = transport
        self._policy = policy
        self._call_slots = asyncio.Semaphore(limits.max_concurrent_polls)
        self._jobs: dict[str, ImageJob] = {}
        # (due, key): keys are unique, so ties on ``due`` are broken by key, no counter needed.
        self._heap: list[tuple[float, str]] = []
        self._wakeup = asyncio.Event()
        self._sleeping_until = math.inf  # when the idle poller will next look at the heap
        self._in_flight: set[str] = set()
        self._unknown_statuses: set[int] = set()
        # Jobs that ended lately, so attach(key) right after the end returns the ended job
        # (a status endpoint attaching per request) instead of starting over; bounded.
        self._ended: OrderedDict[str, ImageJob] = OrderedDict()
        self.counters = PollerCounters()

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, key: str) -> ImageJob | None:
        """The tracked job for ``key``, or one that ended lately; None if neither."""
        return self._jobs.get(key) or self._ended.get(key)

    def jobs(self) -> list[ImageJob]:
        """Every outstanding job."""
        return list(self._jobs.values())

    def track(self, job: ImageJob, first_delay: float | None = None) -> None:
        """Start polling ``job``: first ask after ``first_delay`` (default: the policy's)."""
        self._jobs[job.key] = job
        delay = self._policy.first_poll_delay if first_delay is None else first_delay
        self._schedule(job, job.created_at + delay)
        if job.due < self._sleeping_until:  # only wake the poller if this key is due sooner
            self._wakeup.set()

    def forget(self, job: ImageJob) -> None:
        """Stop polling ``job`` (it ended or was cancelled)."""
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]
        job.due = math.inf

    def cancel_all(self, reason: str) -> None:
        """Stop tracking every job; each awaiter gets JobCancelledError saying ``reason``."""
        for job in self.jobs():
            self.forget(job)
            job.fail(JobCancelledError(reason, job_key=job.key))

    def _schedule(self, job: ImageJob, when: float) -> None:
        job.due = min(when, job.deadline)
        heapq.heappush(self._heap, (job.due, job.key))

    def _pop_due(self, horizon: float) -> ImageJob | None:
        """The next job due by ``horizon``, skipping heap entries made stale by rescheduling."""
        while self._heap and self._heap[0][0] <= horizon:
            due, key = heapq.heappop(self._heap)
            job = self._jobs.get(key)
            if job is not None and job.due == due and key not in self._in_flight:
                return job
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
                size = _contract.MAX_KEYS_PER_BATCH
                for start in range(0, len(batch), size):
                    chunk = batch[start : start + size]
                    self._in_flight.update(job.key for job in chunk)
                    calls.start_soon(self._poll_chunk, chunk)

    def _take_due(self, now: float) -> list[ImageJob]:
        batch: list[ImageJob] = []
        while (job := self._pop_due(now)) is not None:
            if now >= job.deadline:
                self._end(job, JobTimeoutError("still running at its deadline", job_key=job.key))
                continue
            batch.append(job)
        if batch:
            # Fill the last call's free places with keys due soon: same calls, fuller batches.
            room = -len(batch) % _contract.MAX_KEYS_PER_BATCH
            horizon = now + self._policy.batch_fill_horizon
            while room and (job := self._pop_due(horizon)) is not None:
                batch.append(job)
                room -= 1
        return batch

    async def _sleep_until_due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wakeup.clear()
        while self._heap and self._heap[0][1] not in self._jobs:
            heapq.heappop(self._heap)  # drop entries of jobs that ended
        self._sleeping_until = self._heap[0][0] if self._heap else math.inf
        try:
            with anyio.move_on_after(self._sleeping_until - loop.time()):
                await self._wakeup.wait()
        finally:
            self._sleeping_until = -math.inf  # awake: new keys need no wake-up call

    async def _poll_chunk(self, chunk: list[ImageJob]) -> None:
        keys = [job.key for job in chunk]
        try:
            async with self._call_slots:
                self.counters.batch_calls += 1
                self.counters.keys_polled += len(keys)
                data = await self._transport.post(_contract.BATCH_INFO_PATH, keys, kind="poll")
            entries = self._parse(data)
        except WujieError as exc:
            self.counters.batch_errors += 1
            logger.warning("batch query of %d keys failed: %s", len(keys), exc)
            entries = None
        except Exception:  # a bug must not take the poller, and every job with it, down
            self.counters.batch_errors += 1
            logger.exception("batch query of %d keys failed unexpectedly", len(keys))
            entries = None
        finally:
            self._in_flight.difference_update(keys)
        loop = asyncio.get_running_loop()
        now = loop.time()
        for job in chunk:
            if self._jobs.get(job.key) is not job:
                continue  # cancelled while the call was out
            if entries is None:
                self._schedule(job, now + self._policy.min_interval)
            else:
                self._dispatch(job, entries.get(job.key), now)
        self._wakeup.set()

    def _parse(self, data: Any) -> dict[str, JobInfo]:
        # The reply's shape is [assumed] (see _contract). A bare array, or a null list
        # (nothing found), are read the same way rather than failing every job.
        listed = data.get(_contract.BATCH_LIST_FIELD, ...) if isinstance(data, dict) else data
        if listed is None:
            listed = []
        if not isinstance(listed, list):
            raise ProtocolError(f"batch reply data has no list: {str(data)[:200]}")
        try:  # one validation call for the whole list: the common, well-formed case
            entries = _JOB_LIST.validate_python(listed)
        except ValidationError:
            entries = []
            for raw in listed:  # find the bad entries, keep the good ones
                try:
                    entries.append(JobInfo.model_validate(raw))
                except ValidationError as exc:
                    self.counters.malformed_entries += 1
                    logger.warning("ignoring a malformed batch entry: %s", str(exc)[:300])
        return _most_advanced(entries)

    def _dispatch(self, job: ImageJob, entry: JobInfo | None, now: float) -> None:
        policy = self._policy
        if entry is None:
            since = job.last_seen if job.last_seen is not None else job.created_at
            if now - since >= policy.unknown_key_grace:
                self._end(
                    job,
                    UnknownJobError(
                        f"the gateway has not listed this key for {now - since:.1f}s "
                        "(wrong key, another app's key, or a result already cleaned up)",
                        job_key=job.key,
                    ),
                )
            else:
                self._schedule(job, now + policy.min_interval)
            return
        job.last_seen = now
        job.status = entry.status
        if entry.complete_percent is not None:
            job.progress = entry.complete_percent
        job.expected_seconds = entry.expected_seconds
        if entry.images and len(entry.images) > len(job.images):
            job.add_images(_images(entry))
        if entry.status == _contract.STATUS_SUCCEEDED:
            self.forget(job)
            self.counters.succeeded += 1
            job.succeed(entry.status)
            self._remember_ended(job)
        elif entry.status in (_contract.STATUS_FAILED, _contract.STATUS_MODERATION_REJECTED):
            fail = entry.fail_message
            if not isinstance(fail, FailInfo):
                fail = FailInfo(fail_message=fail)
            raw_code = str(fail.fail_code) if fail.fail_code is not None else ""
            code = int(raw_code) if raw_code.isdigit() else None
            error_type = (
                ModerationRejectedError
                if entry.status == _contract.STATUS_MODERATION_REJECTED
                else JobFailedError
            )
            self._end(
                job, error_type(job_key=job.key, fail_code=code, fail_message=fail.fail_message)
            )
        else:
            if entry.status not in (_contract.STATUS_QUEUED, _contract.STATUS_GENERATING):
                if entry.status not in self._unknown_statuses:
                    self._unknown_statuses.add(entry.status)
                    logger.warning(
                        "unknown job status %r (key %s): still polling", entry.status, job.key
                    )
            age = now - job.created_at
            self._schedule(
                job, now + policy.next_delay(expected_seconds=entry.expected_seconds, age=age)
            )

    def _end(self, job: ImageJob, error: JobError) -> None:
        self.forget(job)
        self.counters.failed += 1
        job.fail(error)
        self._remember_ended(job)

    def _remember_ended(self, job: ImageJob) -> None:
        self._ended[job.key] = job
        if len(self._ended) > ENDED_JOBS_KEPT:
            self._ended.popitem(last=False)
