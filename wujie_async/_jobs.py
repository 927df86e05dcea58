"""ImageJob: an awaitable handle on one gateway job, with a future per image.

A job holds no task and polls nothing: the client's one poller feeds it. It costs one
``asyncio.Future`` plus a few slots; per-image futures exist only once someone asks for them.

Users only read a job: every attribute is a property. The module functions at the bottom
(``record_report``, ``add_images``, ``succeed``, ``fail``, ``ended_copy``) are the poller's
side, the only writers; the poller's scheduling state of a key (when it is due, when it was
last seen) lives in the poller, not here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Sequence
from typing import Any

from ._contract import JobStatus, job_status
from ._errors import JobCancelledError, JobError
from ._models import GeneratedImage, ImageResult, JobInfo

# Request fields that can be large (an edit's source images, as URLs or base64, and its mask).
_BULK_FIELDS = ("image", "mask")


class ImageJob:
    """One submitted job. ``await job`` gives its :class:`ImageResult` or raises a JobError.

    Awaiting from many tasks at once is fine, and cancelling one awaiting task does not disturb
    the others or the job. Attributes are read-only views kept current by the poller (through
    this module's feeding functions, which only the poller calls).

    Attributes:
        key: the gateway's job key.
        request: the body that was submitted (None for an attached key).
        n: how many images the job makes, when known.
        status: the last status the gateway reported (None before the first report).
        progress: ``complete_percent`` from the last report, 0 to 100.
        expected_seconds: the gateway's last estimate of seconds left.
        deadline: loop time by which the job must end, or it fails with JobTimeoutError.
        queue_position: jobs ahead of this one in the gateway's queue (``queue_before_num``),
            when the gateway reports it.
        points_charged: points the gateway says the job cost (``integral_cost``), when reported.
        gateway_start_time: when generation started (``start_gen_time``), as the gateway wrote
            it (a number or short text: the format is not published).
        gateway_complete_time: when the job ended (``complete_time``), likewise.
    """

    __slots__ = (
        "__weakref__",  # the poller remembers ended jobs weakly: no images kept alive for it
        "_complete_time",
        "_deadline",
        "_expected_seconds",
        "_future",
        "_image_futures",
        "_images",
        "_key",
        "_n",
        "_on_cancel",
        "_points_charged",
        "_progress",
        "_queue_position",
        "_request",
        "_start_time",
        "_status",
    )

    def __init__(
        self,
        key: str,
        *,
        loop: asyncio.AbstractEventLoop,
        deadline: float,
        request: dict[str, Any] | None = None,
        n: int | None = None,
        on_cancel: Callable[[ImageJob], None] | None = None,
    ) -> None:
        self._key = key
        self._request = request
        self._n = n
        self._status: JobStatus | int | None = None
        self._progress = 0.0
        self._expected_seconds: float | None = None
        # Shared empty tuple until images land: a pending job should cost next to nothing.
        self._images: Sequence[GeneratedImage] = ()
        self._deadline = deadline
        self._queue_position: int | None = None
        self._points_charged: float | None = None
        self._start_time: float | str | None = None
        self._complete_time: float | str | None = None
        self._future: asyncio.Future[ImageResult] = loop.create_future()
        self._image_futures: dict[int, asyncio.Future[GeneratedImage]] | None = None
        self._on_cancel = on_cancel

    # Read-only views: only this module's feeding functions (the poller's side) change them.
    @property
    def key(self) -> str:
        """The gateway's job key."""
        return self._key

    @property
    def request(self) -> dict[str, Any] | None:
        """The body that was submitted (None for an attached key)."""
        return self._request

    @property
    def n(self) -> int | None:
        """How many images the job makes, when known."""
        return self._n

    @property
    def status(self) -> JobStatus | int | None:
        """The last status the gateway reported (None before the first report).

        A :class:`JobStatus` when the contract names it, else the plain number.
        """
        return self._status

    @property
    def progress(self) -> float:
        """``complete_percent`` from the last report, 0 to 100."""
        return self._progress

    @property
    def expected_seconds(self) -> float | None:
        """The gateway's last estimate of seconds left."""
        return self._expected_seconds

    @property
    def images(self) -> Sequence[GeneratedImage]:
        """The images listed so far (all of them once the job succeeded)."""
        return self._images

    @property
    def deadline(self) -> float:
        """Loop time by which the job must end, or it fails with JobTimeoutError."""
        return self._deadline

    def __repr__(self) -> str:
        state = self.status_name
        return f"<ImageJob {self.key} {state} {self.progress:.0f}%>"

    def __await__(self) -> Generator[Any, None, ImageResult]:
        future = self._future
        if not future.done():
            # A shield per awaiter: cancelling one awaiting task must not cancel the job.
            yield from asyncio.shield(future).__await__()
        return future.result()

    @property
    def queue_position(self) -> int | None:
        """Jobs ahead of this one in the gateway's queue, when the gateway reports it."""
        return self._queue_position

    @property
    def points_charged(self) -> float | None:
        """Points the gateway says this job cost, when it reports them."""
        return self._points_charged

    @property
    def gateway_start_time(self) -> float | str | None:
        """When generation started, as the gateway reported it (format unpublished)."""
        return self._start_time

    @property
    def gateway_complete_time(self) -> float | str | None:
        """When the job ended, as the gateway reported it (format unpublished)."""
        return self._complete_time

    @property
    def status_name(self) -> str:
        """The status in words: ``pending``, ``queued``, ``generating``, ``succeeded``, ...

        Also ``failed``, ``rejected``, ``ended without a result``, or ``status N`` for a status
        the contract does not name.
        """
        status = self._status
        if status is None:
            return "pending"
        return status.label if isinstance(status, JobStatus) else f"status {status}"

    def done(self) -> bool:
        """True once the job has a result or an error."""
        return self._future.done()

    def exception(self) -> BaseException | None:
        """The job's error, once done (None if it succeeded)."""
        return self._future.exception() if self._future.done() else None

    async def result(self, timeout: float | None = None) -> ImageResult:
        """Wait for the job; ``timeout`` bounds this wait only (the job keeps its deadline).

        Raises:
            JobError: the job failed, was rejected, timed out or is unknown.
            TimeoutError: ``timeout`` passed first.
        """
        if timeout is None:
            return await self
        async with asyncio.timeout(timeout):
            return await self

    async def image(self, index: int, timeout: float | None = None) -> GeneratedImage:
        """Wait for image ``index`` alone: it resolves as soon as the gateway lists it.

        Raises:
            IndexError: the job has fewer images.
            JobError: the job ended without this image.
        """
        if index < 0 or (self.n is not None and index >= self.n):
            raise IndexError(f"job {self.key} has {self.n} image(s); index {index} is out of range")
        if index < len(self.images):
            return self.images[index]
        if self._future.done():
            self._future.result()  # raises the job's error, if any
            raise IndexError(f"job {self.key} finished with {len(self.images)} image(s)")
        if self._image_futures is None:
            self._image_futures = {}
        future = self._image_futures.get(index)
        if future is None:
            future = self._future.get_loop().create_future()
            self._image_futures[index] = future
        async with asyncio.timeout(timeout):
            return await asyncio.shield(future)

    def cancel(self) -> bool:
        """Stop tracking the job; its awaiters get JobCancelledError. False if already done.

        The gateway is not told (it has no cancel endpoint): the job may still run and be
        charged, and ``client.images.attach(key)`` can pick it up again.
        """
        if self._future.done():
            return False
        if self._on_cancel is not None:
            self._on_cancel(self)
        fail(self, JobCancelledError("no longer tracked (cancelled)", job_key=self.key))
        return True

    def _settle_images(self, error: BaseException) -> None:
        for future in (self._image_futures or {}).values():
            if not future.done():
                future.set_exception(error)
                future.exception()

    def add_done_callback(self, callback: Callable[[ImageJob], None]) -> Callable[[Any], None]:
        """Call ``callback(job)`` when the job ends; returns the handle for removal."""

        def on_done(_: Any) -> None:
            callback(self)

        self._future.add_done_callback(on_done)
        return on_done

    def remove_done_callback(self, handle: Callable[[Any], None]) -> None:
        """Undo :meth:`add_done_callback`."""
        self._future.remove_done_callback(handle)


# --- the poller's side: the only writers of a job ---------------------------------------------
def record_report(job: ImageJob, entry: JobInfo) -> None:
    """Take the progress fields of the gateway's latest (already checked) entry."""
    job._status = job_status(entry.status)
    if entry.complete_percent is not None:
        job._progress = entry.complete_percent
    job._expected_seconds = entry.expected_seconds
    # Optional fields keep their last known value when a report leaves them out.
    if entry.queue_before_num is not None:
        job._queue_position = entry.queue_before_num
    if entry.integral_cost is not None:
        job._points_charged = entry.integral_cost
    if entry.start_gen_time is not None:
        job._start_time = entry.start_gen_time
    if entry.complete_time is not None:
        job._complete_time = entry.complete_time


def add_images(job: ImageJob, images: list[GeneratedImage]) -> None:
    """Record images listed so far and resolve their futures."""
    if len(images) <= len(job._images):
        return
    job._images = images
    if job._image_futures:
        for index, future in job._image_futures.items():
            if index < len(images) and not future.done():
                future.set_result(images[index])


def succeed(job: ImageJob, status: JobStatus) -> None:
    """The job ended with images."""
    if job._future.done():
        return
    job._status = status
    job._progress = 100.0
    job._future.set_result(ImageResult(job._key, status, tuple(job._images)))
    if job._image_futures:
        missing = IndexError(f"job {job._key} finished with {len(job._images)} image(s)")
        job._settle_images(missing)


def fail(job: ImageJob, error: JobError) -> None:
    """The job ended without (all of) its images."""
    if job._future.done():
        return
    job._future.set_exception(error)
    job._future.exception()  # a failed job nobody awaits is not worth a log line
    job._settle_images(error)


def holds_bulk(job: ImageJob) -> bool:
    """True when the job holds inline image bytes or an edit's source images."""
    for image in job._images:  # a loop, not any(<generator>): called for every ended job
        if image.b64_json:
            return True
    request = job._request
    if request is not None:
        for field in _BULK_FIELDS:
            if field in request:
                return True
    return False


def ended_copy(job: ImageJob) -> ImageJob:
    """A settled copy of an ended job without its bulk: what an ended-jobs cache keeps.

    The copy has the same key, status, progress fields and outcome, but its images carry no
    inline bytes (``b64_json`` is None: fetch ``url``, or keep the original job) and its
    request no edit source images or mask.
    """
    future = job._future
    if not future.done():
        raise ValueError("only an ended job is copied")
    request = job._request
    if request is not None:
        request = {name: value for name, value in request.items() if name not in _BULK_FIELDS}
    copy = ImageJob(job._key, loop=future.get_loop(), deadline=job._deadline, request=request)
    copy._n = job._n
    copy._status = job._status
    copy._progress = job._progress
    copy._expected_seconds = job._expected_seconds
    copy._queue_position = job._queue_position
    copy._points_charged = job._points_charged
    copy._start_time = job._start_time
    copy._complete_time = job._complete_time
    copy._images = [
        GeneratedImage(image.index, image.url, None, image.revised_prompt) for image in job._images
    ]
    error = future.exception()
    if error is None:
        copy._future.set_result(ImageResult(job._key, future.result().status, tuple(copy._images)))
    else:
        copy._future.set_exception(error)
        copy._future.exception()  # nobody may await the copy: not worth a log line
    return copy
