"""Saving images to disk: bounded, streamed, checked, retried, never half-written.

One :class:`Downloader` per client (``job.save``, ``client.download`` and the CLI all come
through it). It owns its own HTTP session, opened at the first download: image downloads never
take a connection or a slot from the API's pool. Where it may connect is ``_addresses``'s rule,
checked on every hop; redirects are followed by hand, at most ``max_redirects`` of them, each
one checked again. The bytes must carry a PNG/JPEG/WEBP signature and end where that format
says (``end_problem``), and a file appears under its final name only once complete
(``_atomic_file``). Writes and fsyncs run on worker threads, never on the event loop, and
within the save's deadline (``_disk_steps``). One attempt at a URL is ``_image_fetch``'s; an
image sent inline (``b64_json``) is decoded by ``_inline_images``.

Every image ends within ``DownloadPolicy.deadline``: an attempt fails as too slow when the
server does not keep up ``min_rate``, transient failures are retried with backoff, and no new
attempt starts once ``RetryPolicy.max_elapsed`` has gone by.

So a temporary file untouched for longer than that belongs to no save in progress: a process
killed mid-save (a plain SIGTERM, a crash) left it. The first ``job.save()`` into a folder
removes ours that are older than ``stale_after`` (``_save_folder``'s rule), once per folder.
(Not ``client.download()``: the command line's bulk run, which downloads image by image,
removes them itself, holding its folder's lock, with a finer rule: ``cli._out_lock``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import aiohttp
import anyio
from yarl import URL

from ._addresses import AddressRule, CheckingResolver, check_url
from ._config import DownloadPolicy, RetryPolicy
from ._disk_steps import DiskSteps
from ._errors import (
    ClientStateError,
    InvalidRequestError,
    ProtocolError,
    WujieError,
    add_note_once,
    shown_key,
    some_and_more,
)
from ._file_names import EXT_FIELD, render_name
from ._image_fetch import ImageFetch, RetryableError, Target, name_the_file, too_slow
from ._inline_images import b64_chars, decode_inline
from ._results import GeneratedImage, ImageResult, SavedImage
from ._save_folder import check_job_template, folder_path, prepare_folder, stale_after
from ._save_record import SaveRecord
from ._telemetry import Telemetry

if TYPE_CHECKING:
    from opentelemetry.trace import Span

logger = logging.getLogger("wujie_async.download")

_CLOSE_WAIT_S = 5.0  # how long aclose() waits for cancelled saves to clean up
_SWEEP_WAIT_S = 5.0  # a folder that takes longer to list is left as it is: the save goes on


class Downloader:
    """Saves images with bounded concurrency, on an HTTP session of its own.

    The session opens at the first download and closes with :meth:`aclose` (or the end of
    ``async with``); after that every save raises ClientStateError.

    Example::

        async with Downloader(addresses=AddressRule.everything()) as downloader:
            saved = await downloader.save(image, Path("out") / "cat.{ext}", key=job.key)

    Args:
        policy: sizes, deadlines, the minimum rate, redirects, plain http.
        retry: backoff for transient failures (connect errors, 5xx, 429, truncated bodies,
            too slow; a 404 gets ``NOT_FOUND_TRIES`` tries at most); no new attempt starts
            after ``max_elapsed`` seconds.
        addresses: which kinds of address may be fetched (default: public ones only).
        telemetry: whose spans and metrics downloads add to (default: its own).
    """

    def __init__(
        self,
        policy: DownloadPolicy | None = None,
        *,
        retry: RetryPolicy | None = None,
        addresses: AddressRule | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._policy = policy or DownloadPolicy()
        self._retry = retry or RetryPolicy()
        self._rule = addresses or AddressRule()
        self._fetch = ImageFetch(self._policy, self._rule, self._require_open)
        self._telemetry_to_start = telemetry is None  # its own: started at the first save
        self._telemetry = telemetry or Telemetry()  # a span and metrics per image, once on
        self._session: aiohttp.ClientSession | None = None
        self._slots: anyio.Semaphore | None = None
        self._closed = False
        # Cancelled by aclose(); each with where its image goes (named if it outlives that).
        self._in_progress: dict[anyio.CancelScope, Target] = {}
        self._all_ended: anyio.Event | None = None  # what aclose() waits on, while it does
        # Saves in progress by (job key, image index, path): a second save of the same image
        # to the same path joins the first (see save()).
        self._saving: dict[tuple[str, int, str], asyncio.Future[SavedImage]] = {}
        # The journal's record of job.save() (a client with a SQLite journal sets it).
        self.save_record: SaveRecord | None = None
        # job.save()'s folders: those checked (a folder, not a file) and swept of stale
        # temporary files, and the check under way of each folder (concurrent saves into one
        # folder share it, and go on together: they share their downloads too, see save()).
        self._ready: set[Path] = set()
        self._preparing: dict[Path, asyncio.Future[Path | None]] = {}

    @property
    def policy(self) -> DownloadPolicy:
        """The download policy in force."""
        return self._policy

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End the saves in progress (each raises ClientStateError and leaves no file), close
        the session (idempotent); later saves raise ClientStateError too."""
        self._closed = True
        # Closing the session alone would not stop a read in progress (a slow server would
        # hold its save, and the caller, until the deadline); and a save must end (its
        # temporary file removed) before its connection is closed under it.
        if self._in_progress:
            self._all_ended = anyio.Event()
            for scope in self._in_progress:
                scope.cancel()
            with anyio.move_on_after(_CLOSE_WAIT_S):
                await self._all_ended.wait()
            if self._in_progress:
                # A write that does not return (a frozen disk, a hung NFS mount) holds its
                # save: the close goes on without it, and says so.
                files = [str(target.folder / target.name) for target in self._in_progress.values()]
                logger.warning(
                    "closing: %d image save(s) still writing %.0f s after being cancelled (a "
                    "disk that does not answer?): %s; each ends when its write returns, its "
                    "file complete or not there, and its caller waits until then",
                    len(files),
                    _CLOSE_WAIT_S,
                    some_and_more(files, 5),
                )
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        if self.save_record is not None:
            self.save_record.flush()  # its warnings held back, with their count

    # --- saving ---------------------------------------------------------------------------------
    async def save_job(
        self,
        job: Awaitable[ImageResult],
        directory: str | os.PathLike[str],
        name: str,
        *,
        key: str | None = None,
    ) -> list[SavedImage]:
        """Wait for ``job``, then save every image in ``directory`` under ``name``.

        The template and the folder are checked before the wait; every image is tried, and
        if any could not be saved the first error (by index) is raised once the others are
        done, with a note naming the files that were saved. ``key``: the job's, for the
        journal's record of the save (see ``_save_record``).

        Raises:
            InvalidRequestError: the template, or two images with one name; ``directory`` is
                no path, or an existing file.
            JobError: the job ended without its images.
            ProtocolError, TransportError: an image could not be downloaded.
        """
        check_job_template(name)
        self._require_open()
        folder = folder_path(directory)
        await self._ready_folder(folder)
        record = self.save_record if key is not None else None
        if record is None or key is None:
            return await self._save_job(job, folder, name)
        try:
            # Inside: a cancel during the record's commit still ends the save (asked() counts
            # the save before it awaits anything).
            await record.asked(key)
            saved = await self._save_job(job, folder, name)
        except BaseException as exc:
            record.ended(key, exc)
            raise
        record.ended(key, None)
        return saved

    async def _save_job(
        self, job: Awaitable[ImageResult], folder: Path, name: str
    ) -> list[SavedImage]:
        result = await job
        planned = {
            image.index: render_name(
                name, key=result.key, index=image.index, ext=EXT_FIELD, id=None, line=None
            )
            for image in result.images
        }
        seen: dict[str, int] = {}
        for index, planned_name in planned.items():
            other = seen.setdefault(planned_name.casefold(), index)
            if other != index:
                shown = planned_name.replace(EXT_FIELD, "{ext}")
                raise InvalidRequestError(
                    [("name", f"images {other} and {index} would both be saved as {shown!r}")]
                )
        claimed: dict[str, int] = {}
        outcomes = await asyncio.gather(
            *(
                self.save(image, folder / planned[image.index], key=result.key, claimed=claimed)
                for image in result.images
            ),
            return_exceptions=True,
        )
        saved = [outcome for outcome in outcomes if isinstance(outcome, SavedImage)]
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                if saved and isinstance(outcome, Exception):
                    files = ", ".join(image.path.name for image in saved)
                    # Another save of this job into this folder may raise this same error (it
                    # joined this one's download): its note is the same, and is told once.
                    add_note_once(outcome, f"saved before this error was raised: {files}")
                raise outcome
        return saved

    async def save(
        self,
        image: GeneratedImage,
        path: str | os.PathLike[str],
        *,
        key: str | None = None,
        claimed: dict[str, int] | None = None,
    ) -> SavedImage:
        """Save ``image`` (its ``b64_json``, else its URL) as the file ``path``.

        ``{ext}`` in the file's name becomes the image's format (``png``, ``jpg``, ``webp``).
        The one entry point of every download: observed here (span, metrics, DEBUG line).

        Raises:
            InvalidRequestError: the URL (or a redirect's target) is refused, the name is
                taken by another image of the same save call, ``path`` is no path or ``key``
                no string.
            ProtocolError: not an image, too large, not 200 (after retries for 5xx and 429,
                and 3 tries for a 404), too many redirects, not base64, or neither a URL nor
                ``b64_json``.
            TransportError: the download failed after its retries, or was too slow.
            ClientStateError: the downloader (its client) is closed.
        """
        if not isinstance(path, str | os.PathLike):
            raise InvalidRequestError([("path", "must be a file path (a str or os.PathLike)")])
        if key is not None and not isinstance(key, str):
            raise InvalidRequestError([("key", "must be the image's job key (a str) or None")])
        self._require_open()
        if key is None:
            return await self._save_once(image, path, key, claimed)
        # Two saves of one image to one path at once (two requests of a web app) each wrote
        # the file, and one of them returned a sha256 that was not the file's when the image
        # server sent other bytes the second time: the second waits for the first, and ends
        # as it does (saved, or the same error: a retry after it, one save after another,
        # would wait a deadline each); only a first save cancelled leaves it to the next.
        joined = (key, image.index, os.fspath(path))
        while (first := self._saving.get(joined)) is not None:
            await asyncio.wait({first})
            if not first.cancelled():
                return first.result()
            self._require_open()
        done: asyncio.Future[SavedImage] = asyncio.get_running_loop().create_future()
        self._saving[joined] = done
        try:
            saved = await self._save_once(image, path, key, claimed)
        except Exception as exc:
            done.set_exception(exc)
            done.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        except BaseException:
            done.cancel()  # cancelled (or closed under it): the next one saves it itself
            raise
        finally:
            del self._saving[joined]
        done.set_result(saved)
        return saved

    async def _save_once(
        self,
        image: GeneratedImage,
        path: str | os.PathLike[str],
        key: str | None,
        claimed: dict[str, int] | None,
    ) -> SavedImage:
        if self._telemetry_to_start:
            self._telemetry_to_start = False
            self._telemetry.start()
        target = Target(Path(path), image.index, claimed)
        host = _host(image.url) if image.b64_json is None and image.url is not None else None
        try:
            return await self._observed(key, image.index, host, lambda: self._save(image, target))
        except WujieError as exc:
            _name_the_image(exc, key, image.index)  # made for this save: no one else holds it
            # The frames it passed through hold the image's URL (a CDN's may carry a signed
            # token) as locals, which an error reporter recording locals (Sentry) would store:
            # their locals go, as the private key's do; the lines stay.
            traceback.clear_frames(exc.__traceback__)
            raise

    async def _save(self, image: GeneratedImage, target: Target) -> SavedImage:
        with anyio.CancelScope() as scope:
            self._in_progress[scope] = target
            try:
                return await self._save_now(image, target)
            finally:
                self._in_progress.pop(scope, None)
                if not self._in_progress and self._all_ended is not None:
                    self._all_ended.set()
        raise ClientStateError("the client was closed while the image was being saved")

    async def _save_now(self, image: GeneratedImage, target: Target) -> SavedImage:
        if image.b64_json is not None:
            return await self._save_inline(image.b64_json, target)
        if image.url is None:
            raise ProtocolError(f"image {image.index} has neither a URL nor b64_json")
        url = image.url
        check_url(url, allow_http=self._policy.allow_http, rule=self._rule)
        session, slots = self._open_session()
        failures: list[WujieError] = []
        async with slots:
            deadline = self._policy.deadline
            # The deadline runs from when the image gets its slot: waiting behind other
            # downloads is not the image server's slowness.
            with anyio.move_on_after(math.inf if deadline is None else deadline):
                # Its file steps have the same deadline: a disk that stops answering ends
                # the save too (an OSError, EIO), instead of holding it until the disk answers.
                give_up_at = anyio.current_time() + (math.inf if deadline is None else deadline)
                return await self._retrying(
                    lambda: self._fetch.fetch(session, url, target, give_up_at), failures
                )
        last = f"; the last try: {failures[-1]}" if failures else ""
        raise too_slow(
            f"the image was not saved within {deadline:g} s (DownloadPolicy.deadline){last}"
        )

    async def _ready_folder(self, folder: Path) -> None:
        """Refuse a ``folder`` that is a file; the first time, remove the temporary files a
        killed process left there. Once per folder while it is one (no thread after that).

        Raises:
            InvalidRequestError: ``folder``, or a folder above it, is an existing file.
        """
        if folder in self._ready:
            return
        pending = self._preparing.get(folder)
        if pending is None:
            pending = asyncio.ensure_future(self._prepare_folder(folder))
            self._preparing[folder] = pending
            pending.add_done_callback(lambda _: self._preparing.pop(folder, None))
        blocker = await asyncio.shield(pending)
        if blocker is not None:
            raise InvalidRequestError(
                [("directory", f"{blocker} is a file, not a folder: nothing was downloaded")]
            )

    async def _prepare_folder(self, folder: Path) -> Path | None:
        """:meth:`_ready_folder`'s work, on a worker thread: the file in the way, if any. A
        folder that takes longer than ``_SWEEP_WAIT_S`` to answer is left unchecked: the save
        goes on (its own steps have its deadline)."""
        older_than = stale_after(self._policy.deadline)
        blocker: Path | None = None
        removed: list[str] = []
        with anyio.move_on_after(_SWEEP_WAIT_S):
            blocker, is_folder, removed = await anyio.to_thread.run_sync(
                prepare_folder, folder, older_than, abandon_on_cancel=True
            )
            if is_folder:
                self._ready.add(folder)
        if removed:
            logger.info(
                "removed %d temporary file(s) in %s untouched for over %.0f s (left by a "
                "process that ended mid-save): %s",
                len(removed),
                folder,
                older_than,
                some_and_more(removed, 5),
            )
        return blocker

    def _disk_steps(self) -> DiskSteps:
        """The file steps of a save starting now, bounded by its deadline."""
        deadline = self._policy.deadline
        give_up_at = anyio.current_time() + (math.inf if deadline is None else deadline)
        return DiskSteps(give_up_at, deadline)

    async def _save_inline(self, text: str, target: Target) -> SavedImage:
        limit = self._policy.max_bytes
        if text.startswith("data:"):
            text = text.partition(",")[2]
        if len(text) > b64_chars(limit) * 40 // 38:  # the cap (line breaks allowed), coarsely
            raise ProtocolError(f"image is larger than {limit} bytes")
        _, slots = self._open_session()
        async with slots:
            # Its deadline runs from here, as a download's does: not the wait behind others.
            steps = self._disk_steps()
            data, kind = await anyio.to_thread.run_sync(decode_inline, text, limit)
            path = target.final(kind)
            try:
                await steps.open(path.parent, "wujie")  # see _stream_to_file
                await steps.write(data)
                await steps.commit(path)
            except BaseException as exc:
                await steps.discard()
                if isinstance(exc, OSError):
                    name_the_file(exc, path)
                raise
        return SavedImage(target.index, path, len(data), hashlib.sha256(data).hexdigest())

    async def _observed(
        self,
        key: str | None,
        index: int,
        host: str | None,
        save: Callable[[], Awaitable[SavedImage]],
    ) -> SavedImage:
        """``save()``, with its span, metrics and DEBUG line when any of them is on (the one
        place downloads are observed: every way of saving an image comes through here)."""
        otel = self._telemetry.otel
        if otel is None and not logger.isEnabledFor(logging.DEBUG):
            return await save()
        span = otel.download_started(key, index, host) if otel is not None else None
        started = time.perf_counter()
        try:
            # Recorded here, with the image's host only: an HTTP instrumentation of the user's
            # (which would record its whole URL, a signed token included) leaves it alone.
            with otel.own_http() if otel is not None else contextlib.nullcontext():
                saved = await save()
        except BaseException as exc:
            self._saved(span, key, index, started, None, exc)
            raise
        self._saved(span, key, index, started, saved.bytes, None)
        return saved

    def _saved(
        self,
        span: Span | None,
        key: str | None,
        index: int,
        started: float,
        size: int | None,
        error: BaseException | None,
    ) -> None:
        seconds = time.perf_counter() - started
        logger.debug(
            "image %s #%d: %s in %.0f ms",
            "-" if key is None else shown_key(key),
            index,
            f"{size} bytes saved" if error is None else f"not saved ({type(error).__name__})",
            seconds * 1e3,
        )
        if (otel := self._telemetry.otel) is not None:
            otel.download_ended(span, seconds=seconds, size=size, error=error)

    # --- internals ------------------------------------------------------------------------------
    def _require_open(self) -> None:
        if self._closed:
            raise ClientStateError("downloads are closed (the client was closed): open a new one")

    def _open_session(self) -> tuple[aiohttp.ClientSession, anyio.Semaphore]:
        """The session and the concurrency slots, made at the first download."""
        self._require_open()
        if self._session is None or self._slots is None:
            policy = self._policy
            connector = aiohttp.TCPConnector(
                limit=policy.concurrency, resolver=CheckingResolver(self._rule)
            )
            timeout = aiohttp.ClientTimeout(
                total=None, connect=policy.connect_timeout, sock_read=policy.read_timeout
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, trust_env=False
            )
            self._slots = anyio.Semaphore(policy.concurrency)
        return self._session, self._slots

    async def _retrying(
        self, attempt: Callable[[], Awaitable[SavedImage]], failures: list[WujieError]
    ) -> SavedImage:
        """``attempt()`` until it succeeds, fails for good, or the retry budget is spent:
        exponential backoff with full jitter, as for API calls. Each retried failure is
        appended to ``failures``."""
        policy = self._retry
        started = anyio.current_time()
        tries = 0
        while True:
            tries += 1
            try:
                return await attempt()
            except RetryableError as exc:
                failures.append(exc.error)
                elapsed = anyio.current_time() - started
                if (
                    tries >= policy.max_attempts
                    or elapsed >= policy.max_elapsed
                    or (exc.tries is not None and tries >= exc.tries)
                ):
                    raise exc.error from None
                ceiling = min(policy.initial_wait * 2 ** (tries - 1), policy.max_wait)
                wait = min(random.uniform(0, ceiling), policy.max_elapsed - elapsed)
                logger.debug("image download: %s; try %d in %.2f s", exc, tries + 1, wait)
            await anyio.sleep(wait)
            self._require_open()


def _host(url: str) -> str | None:
    try:
        return URL(url).host
    except ValueError:
        return None


def _name_the_image(error: WujieError, key: str | None, index: int) -> None:
    """A failed save names its image, and its job when the key is known: "job K1, image 1:
    image download refused | HTTP 404" (an expired URL) says which one to fetch again. Never
    the URL, which may carry a signed token."""
    where = f"image {index}" if key is None else f"job {shown_key(key)}, image {index}"
    if error.args and isinstance(error.args[0], str):
        error.args = (f"{where}: {error.args[0]}", *error.args[1:])
