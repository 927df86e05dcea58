"""ImageJob: an awaitable handle on one gateway job, with a future per image and a stream of
updates.

A job holds no task and polls nothing: the client's one poller feeds it. Its changing fields are
written by the poller alone, through the job's private ``_report``, ``_list_images``,
``_succeed`` and ``_fail``; its users only read them. They are the job's own slots rather than
a state object of their own: one object fewer per pending job for the garbage collector to
walk, and 40 bytes less. A pending job costs one ``asyncio.Future`` plus a few slots;
per-image futures and the update event exist only once someone asks for them. ``job.save``
goes through the client's one downloader, which every job of the client shares (one slot).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ._config import check_wait
from ._contract import JobStatus, job_status
from ._errors import (
    ClientStateError,
    IncompleteJobError,
    InvalidRequestError,
    JobCancelledError,
    JobError,
    add_note_once,
    shown_key,
)
from ._file_names import DEFAULT_NAME
from ._job_info import JobInfo
from ._results import GeneratedImage, ImageResult, SavedImage

# Request fields that can be large (an edit's source images, as URLs or base64, and its mask).
_BULK_FIELDS = ("image", "mask")


def status_name(status: JobStatus | int | None) -> str:
    """A status in words: ``pending`` (no report yet), ``queued``, ..., or ``status N``."""
    if status is None:
        return "pending"
    return status.label if isinstance(status, JobStatus) else f"status {status}"


class ImageSaver(Protocol):
    """What a job needs of its client's downloader to save its images (``Downloader`` is
    one): the job holds it without knowing how downloads are made."""

    async def save_job(
        self,
        job: Awaitable[ImageResult],
        directory: str | os.PathLike[str],
        name: str,
        *,
        key: str | None = None,
    ) -> list[SavedImage]: ...


@dataclass(frozen=True, slots=True)
class JobUpdate:
    """One observed state of a job, as :meth:`ImageJob.updates` yields it.

    Attributes:
        key: the job's key.
        status: the last status the gateway reported (None before the first report).
        status_name: the status in words (``pending``, ``queued``, ``generating``, ...).
        progress: ``complete_percent``, 0 to 100.
        queue_position: jobs ahead in the gateway's queue, when reported.
        expected_seconds: the gateway's estimate of seconds left, when reported.
        images: the images landed so far, in index order (the newest listing of each).
        done: True for the last update: the job has ended.
        error: the job's error when it ended without its images (None otherwise).
    """

    key: str
    status: JobStatus | int | None
    status_name: str
    progress: float
    queue_position: int | None
    expected_seconds: float | None
    images: tuple[GeneratedImage, ...]
    done: bool
    error: JobError | None


_new = object.__new__


class ImageJob:
    """One submitted job. ``await job`` gives its :class:`ImageResult` or raises a JobError.

    Awaiting from many tasks at once is fine, and cancelling one awaiting task does not disturb
    the others or the job. Attributes are read-only views of the state the poller keeps current.

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
        "_changed",
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
        "_saver",  # the client's one downloader, shared by all its jobs
        "_start_time",
        "_status",
        "_version",
    )

    def __init__(
        self,
        key: str,
        loop: asyncio.AbstractEventLoop,
        *,
        deadline: float,
        request: dict[str, Any] | None = None,
        n: int | None = None,
        on_cancel: Callable[[ImageJob], None] | None = None,
        saver: ImageSaver | None = None,
    ) -> None:
        self._key = key
        self._request = request
        self._n = n
        self._deadline = deadline
        self._on_cancel = on_cancel
        self._saver = saver
        self._pending(loop)

    @classmethod
    def _made(
        cls,
        key: str,
        loop: asyncio.AbstractEventLoop,
        deadline: float,
        request: dict[str, Any] | None,
        n: int | None,
        on_cancel: Callable[[ImageJob], None] | None,
        saver: ImageSaver | None,
    ) -> ImageJob:
        """``ImageJob(key, loop, deadline=..., ...)`` without the class call's keyword
        arguments: about 3,000 fewer instructions, on every submit. Sets every slot that
        ``__init__`` sets (tests/test_jobs.py compares the two)."""
        job = _new(cls)
        job._key = key
        job._request = request
        job._n = n
        job._deadline = deadline
        job._on_cancel = on_cancel
        job._saver = saver
        # _pending(loop), written out: one call fewer on every submit.
        job._status = None
        job._progress = 0.0
        job._expected_seconds = None
        job._images = ()
        job._queue_position = job._points_charged = None
        job._start_time = job._complete_time = None
        job._future = loop.create_future()
        job._image_futures = None
        job._version = 0
        job._changed = None
        return job

    def _pending(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every changing field at its start: no report yet, nothing landed."""
        self._status: JobStatus | int | None = None
        self._progress = 0.0
        self._expected_seconds: float | None = None
        # The images landed so far, in index order (an index may be missing: its image has
        # not landed). The shared empty tuple until one lands: a pending job costs next to
        # nothing.
        self._images: tuple[GeneratedImage, ...] = ()
        self._queue_position: int | None = None
        self._points_charged: float | None = None
        self._start_time: float | str | None = None
        self._complete_time: float | str | None = None
        self._future: asyncio.Future[ImageResult] = loop.create_future()
        self._image_futures: dict[int, asyncio.Future[GeneratedImage]] | None = None
        self._version = 0
        self._changed: asyncio.Event | None = None

    # --- the poller's side: it alone calls these (a job's users only read) -----------------
    def _report(self, entry: JobInfo) -> None:
        """Take the progress fields of the gateway's latest (already checked) entry."""
        changed = entry.expected_seconds != self._expected_seconds
        self._expected_seconds = entry.expected_seconds
        if entry.status != self._status:  # most reports repeat the last: kept as it is
            self._status = job_status(entry.status)
            changed = True
        # Optional fields keep their last known value when a report leaves them out.
        percent = entry.complete_percent
        if percent is not None and percent != self._progress:
            self._progress = percent
            changed = True
        position = entry.queue_before_num
        if position is not None and position != self._queue_position:
            self._queue_position = position
            changed = True
        if entry.integral_cost is not None:
            self._points_charged = entry.integral_cost
        if entry.start_gen_time is not None:
            self._start_time = entry.start_gen_time
        if entry.complete_time is not None:
            self._complete_time = entry.complete_time
        if changed:
            self._bump()

    def _list_images(self, listed: Sequence[GeneratedImage]) -> None:
        """Take the images of the gateway's newest listing (landed ones only, in index order).

        The newest listing wins, position by position: an image listed again replaces the one
        held at its index (a temporary URL becomes the final one); an image held but missing
        from the listing (a shorter list, a placeholder at its index) is kept. An image's
        future resolves once, when it first lands.
        """
        held = self._images
        if not held:
            images = tuple(listed)
            new: Sequence[GeneratedImage] = images
        else:
            merged = {image.index: image for image in held}
            new = [image for image in listed if image.index not in merged]
            merged.update((image.index, image) for image in listed)
            images = tuple(merged[index] for index in sorted(merged))
        if images == held:
            return
        self._images = images
        if new and self._image_futures:
            futures = self._image_futures
            for image in new:
                future = futures.get(image.index)
                if future is not None and not future.done():
                    future.set_result(image)
        self._bump()

    def _succeed(self, status: JobStatus) -> None:
        """The job ended with images."""
        if self._future.done():
            return
        self._status = status
        self._progress = 100.0
        self._future.set_result(ImageResult(self._key, status, self._images))
        if self._image_futures:
            self._settle_images(
                IndexError(f"job {self._key} finished with {len(self._images)} image(s)")
            )
        self._bump()

    def _fail(self, error: JobError) -> None:
        """The job ended without (all of) its images."""
        if self._future.done():
            return
        self._future.set_exception(error)
        self._future.exception()  # a failed job nobody awaits is not worth a log line
        self._settle_images(error)
        self._bump()

    def _settle_images(self, error: BaseException) -> None:
        for future in (self._image_futures or {}).values():
            if not future.done():
                future.set_exception(error)
                future.exception()

    def _bump(self) -> None:
        self._version += 1
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def _image_at(self, index: int) -> GeneratedImage | None:
        """The landed image at ``index``, or None."""
        images = self._images
        if index < len(images) and images[index].index == index:
            return images[index]  # every image up to it has landed: the usual case
        for image in images:
            if image.index == index:
                return image
        return None

    async def _next_change(self) -> None:
        """Wait for the next change (returns at once if the job has ended)."""
        if self._future.done():
            return
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

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

    def _learn(self, request: dict[str, Any] | None, n: int | None) -> None:
        """What its submit sent, for a job attached without it (the client's own submit
        receiving the key hands the job to it): the request and image count it lacks."""
        if self._request is None:
            self._request = request
        if self._n is None:
            self._n = n

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
        """The images landed so far, in index order (all of them once the job succeeded).

        Each is the gateway's newest listing of it: a later report may replace an image's
        URL (a temporary one by the final one), never drop an image. An image listed with
        neither a URL nor ``b64_json`` (not finished) has not landed.
        """
        return self._images

    @property
    def deadline(self) -> float:
        """Loop time by which the job must end, or it fails with JobTimeoutError."""
        return self._deadline

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
        return status_name(self._status)

    def __repr__(self) -> str:
        error = None if self._future.cancelled() else self.exception()
        # Settled by the client (closed, timed out, lost) while its last report said pending
        # or generating: the report alone misled whoever read it in a log.
        ended = f" ended: {type(error).__name__}" if error is not None else ""
        return f"<ImageJob {shown_key(self.key)} {self.status_name} {self.progress:.0f}%{ended}>"

    def __await__(self) -> Generator[Any, None, ImageResult]:
        future = self._future
        if not future.done():
            _check_loop(future)
            # A shield per awaiter: cancelling one awaiting task must not cancel the job.
            yield from asyncio.shield(future).__await__()
        return future.result()

    def done(self) -> bool:
        """True once the job has a result or an error."""
        return self._future.done()

    def exception(self) -> BaseException | None:
        """The job's error, once done (None if it succeeded)."""
        future = self._future
        return future.exception() if future.done() else None

    async def result(self, timeout: float | None = None) -> ImageResult:
        """Wait for the job; ``timeout`` bounds this wait only (the job keeps its deadline).

        Raises:
            JobError: the job failed, was rejected, timed out or is unknown.
            TimeoutError: ``timeout`` passed first (its message names the job, which goes on).
            InvalidRequestError: ``timeout`` is not a finite number of seconds >= 0.
        """
        timeout = check_wait("timeout", timeout)
        if timeout is None:
            return await self
        try:
            async with asyncio.timeout(timeout):
                return await self
        except TimeoutError as exc:
            if isinstance(exc, JobError):  # the job's own deadline (JobTimeoutError)
                raise
            raise self._wait_ran_out(timeout, "its result") from None

    def _wait_ran_out(self, timeout: float, what: str) -> TimeoutError:
        """The error of a wait bounded by ``timeout`` that ran out. asyncio's own TimeoutError
        says nothing: a request handler that showed it, or logged it, said "" of a paid job."""
        return TimeoutError(
            f"job {self._key}: {what} did not come within this wait's {timeout:g} s (the "
            f"job goes on, {self.status_name}: wait again, or job.cancel() to stop tracking it)"
        )

    async def image(self, index: int, timeout: float | None = None) -> GeneratedImage:
        """Wait for image ``index`` alone: it resolves as soon as the gateway lists it with a
        URL or ``b64_json`` (a listed placeholder with neither does not count).

        It resolves once, with the image as first listed: should a later report replace the
        image's URL (say a temporary URL by the final one), ``job.images`` and the job's
        result carry the newest listing; save from those once the job is done.

        Raises:
            IndexError: the job has fewer images.
            IncompleteJobError: the gateway reported the job done without this image.
            JobError: the job ended without this image.
            TimeoutError: ``timeout`` passed first (its message names the job, which goes on).
            InvalidRequestError: ``index`` is not an int, or ``timeout`` is not a finite
                number of seconds >= 0.
        """
        if not isinstance(index, int) or isinstance(index, bool):  # not "1", 1.0 nor True
            raise InvalidRequestError([("index", "must be an int (the image's position)")])
        timeout = check_wait("timeout", timeout)
        if index < 0 or (self.n is not None and index >= self.n):
            raise IndexError(f"job {self.key} has {self.n} image(s); index {index} is out of range")
        landed = self._image_at(index)
        if landed is not None:
            return landed
        if self._future.done():
            self._future.result()  # raises the job's error, if any
            raise IndexError(f"job {self.key} finished with {len(self._images)} image(s)")
        _check_loop(self._future)
        if self._image_futures is None:
            self._image_futures = {}
        future = self._image_futures.get(index)
        if future is None:
            future = self._future.get_loop().create_future()
            self._image_futures[index] = future
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(future)
        except TimeoutError as exc:
            if timeout is None or isinstance(exc, JobError):
                raise
            raise self._wait_ran_out(timeout, f"image {index}") from None

    async def save(
        self, directory: str | os.PathLike[str], *, name: str = DEFAULT_NAME
    ) -> list[SavedImage]:
        """Wait for the job, then save every image (URL or ``b64_json``) in ``directory``.

        Downloads go through the client's downloader, with its protections: the address rule,
        https only, redirects checked hop by hop, a size cap (``b64_json`` is capped before it
        is decoded), a deadline and a minimum rate per image, bounded retries, and atomic
        writes: each file is written under a temporary name, fsynced, then renamed, so a file
        under its final name is always complete. See ``DownloadPolicy``.

        Every image is tried; if one fails, the first error (by index) is raised once the
        others are done. Files that were saved stay (complete), and the error's note names
        them. A job the gateway reported done with fewer images than it makes has the
        images that came saved, then IncompleteJobError raised (its note names the files).

        With a journal (``WujieClient(journal=...)``), the job's row records that a save was
        asked for (before anything is downloaded) and that it ended. A save the process's end
        cuts off (a SIGTERM, a crash), or that is cancelled, or ended by the client closing,
        leaves its job to the next :meth:`WujieClient.resume`, which returns it even though it
        has succeeded: save it again there, as a save that failed on the network or the disk
        (its retries spent; it may succeed later). A save that failed on what trying again
        cannot mend (an expired or refused image, a refused URL) was told to its caller and
        is not resumed.

        Example::

            job = await client.images.submit(prompt="a cat", model="gpt-image-1", n=2)
            for saved in await job.save("out"):
                print(saved.path, saved.bytes, saved.sha256)

        Args:
            directory: the folder (created if missing). An existing file there is refused
                before the wait (nothing is downloaded).
            name: the file-name template: ``{key}`` (the job's key; required, so that two
                jobs never share a name), ``{index}`` (the image's position) and ``{ext}``
                (``png``, ``jpg`` or ``webp``, from the image's bytes). ``{id}`` and ``{line}``
                are the command line's and are refused here. Checked before the wait.

        Returns:
            One :class:`SavedImage` per image, in index order.

        Raises:
            InvalidRequestError: a bad template, or two images would get one name, or
                ``directory`` is no path or an existing file (nothing is downloaded then); or
                an image URL the address rule refuses.
            IncompleteJobError: the job was reported done without all its images (those that
                came are saved first).
            JobError: the job failed, was rejected, timed out or was cancelled.
            ProtocolError: an image is not an image, too large, or its server refused it.
            TransportError: an image could not be fetched in time, after its retries.
            ClientStateError: the job has no client (or the client is closed).
            OSError: the file could not be written.
        """
        saver = self._saver
        if saver is None:
            raise ClientStateError(
                f"job {self._key} was made without a client: save images with "
                "client.download(image, path)"
            )
        landed = _Landed(self)
        try:
            saved = await saver.save_job(landed, directory, name, key=self._key)
        except Exception as exc:
            if landed.incomplete is not None:
                add_note_once(exc, f"the job also ended incomplete: {landed.incomplete}")
            raise
        incomplete = landed.incomplete
        if incomplete is None:
            return saved
        # A new error per call: notes added here must not pile up on the job's own error.
        error = IncompleteJobError(
            job_key=self._key, result=incomplete.result, expected=incomplete.expected
        )
        if saved:
            files = ", ".join(image.path.name for image in saved)
            error.add_note(f"saved before this error was raised: {files}")
        raise error

    def snapshot(self) -> JobUpdate:
        """The job's state now, as one :class:`JobUpdate`."""
        error = self.exception()
        return JobUpdate(
            key=self._key,
            status=self._status,
            status_name=status_name(self._status),
            progress=self._progress,
            queue_position=self._queue_position,
            expected_seconds=self._expected_seconds,
            images=tuple(self._images),
            done=self._future.done(),
            error=error if isinstance(error, JobError) else None,
        )

    async def updates(self) -> AsyncIterator[JobUpdate]:
        """Yield the job's state now, then once per change the poller sees, ending with the
        update that has ``done=True``.

        Many consumers may iterate one job at once. It costs no extra calls to the gateway,
        and a slow consumer sees the latest state rather than a backlog (changes in between
        are merged). Stopping early (``break``) is fine.

        Example::

            async for update in job.updates():
                print(update.status_name, update.progress, len(update.images))
        """
        _check_loop(self._future)
        seen = -1
        while True:
            if self._version == seen:
                await self._next_change()
                continue
            seen = self._version
            update = self.snapshot()
            yield update
            if update.done:
                return

    def cancel(self) -> bool:
        """Stop tracking the job; its awaiters get JobCancelledError. False if already done.

        The gateway is not told (it has no cancel endpoint): the job may still run and be
        charged, and ``client.images.attach(key)`` can pick it up again.
        """
        if self._future.done():
            return False
        if self._on_cancel is not None:
            self._on_cancel(self)
        self._fail(JobCancelledError("no longer tracked (cancelled)", job_key=self.key))
        return True

    def add_done_callback(self, callback: Callable[[ImageJob], None]) -> Callable[[Any], None]:
        """Call ``callback(job)`` when the job ends; returns the handle for removal."""

        def on_done(_: Any) -> None:
            callback(self)

        self._future.add_done_callback(on_done)
        return on_done

    def remove_done_callback(self, handle: Callable[[Any], None]) -> None:
        """Undo :meth:`add_done_callback`."""
        self._future.remove_done_callback(handle)


class _Landed:
    """Awaits a job for ``job.save``: its result, or for a job reported done without all its
    images, the images that came (the error is kept in ``incomplete``)."""

    __slots__ = ("_job", "incomplete")

    def __init__(self, job: ImageJob) -> None:
        self._job = job
        self.incomplete: IncompleteJobError | None = None

    def __await__(self) -> Generator[Any, None, ImageResult]:
        try:
            return (yield from self._job.__await__())
        except IncompleteJobError as exc:
            self.incomplete = exc
            return exc.result


def _check_loop(future: asyncio.Future[Any]) -> None:
    """A job is awaited on its client's event loop (asyncio's own error says nothing of it)."""
    if asyncio.get_running_loop() is not future.get_loop():
        raise ClientStateError(
            "this job belongs to a client on another event loop; await it on that loop"
        )


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

    Raises:
        ValueError: the job has not ended.
    """
    future = job._future
    if not future.done():
        raise ValueError("only an ended job is copied")
    request = job.request
    if request is not None:
        request = {name: value for name, value in request.items() if name not in _BULK_FIELDS}
    copy = ImageJob._made(
        job.key, future.get_loop(), job.deadline, request, job.n, None, job._saver
    )
    copy._status = job._status
    copy._progress = job._progress
    copy._expected_seconds = job._expected_seconds
    copy._queue_position = job._queue_position
    copy._points_charged = job._points_charged
    copy._start_time = job._start_time
    copy._complete_time = job._complete_time
    copy._version = job._version
    copy._images = tuple(
        GeneratedImage(image.index, image.url, None, image.revised_prompt) for image in job._images
    )
    error = future.exception()
    if isinstance(error, IncompleteJobError):  # its result, as light as the copy's images
        error = IncompleteJobError(
            job_key=error.job_key,
            result=ImageResult(job.key, error.result.status, copy._images),
            expected=error.expected,
        )
    if error is None:
        copy._future.set_result(ImageResult(job.key, future.result().status, copy._images))
    else:
        copy._future.set_exception(error)
        copy._future.exception()  # nobody may await the copy: not worth a log line
    return copy
