"""WujieClient: the lifecycle of a client (open, aclose, its one poller task), the one job factory
(submit, attach, resume), the journal's read API, as_completed and stats.

What it delegates: the request surface to ``_images``, submits in progress to ``_submitting``,
polling to ``_poller``, HTTP to ``_transport``, saving images to ``_download`` (one downloader,
shared by the client's jobs), the stats snapshot to ``_stats``, base URL and key rules to
``_base_url`` and ``_keys``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import aiohttp
import anyio

from . import _contract, _stats
from ._addresses import AddressRule
from ._admission import Admission
from ._auth import Credentials, HeaderSigner
from ._base_url import check_base_url
from ._budget import Budget
from ._config import DownloadPolicy, Limits, PollPolicy, RetryPolicy, Timeouts, check_wait
from ._download import Downloader
from ._env import Environment
from ._errors import (
    ClientStateError,
    InvalidRequestError,
    JobCancelledError,
    JobTimeoutError,
    some_and_more,
)
from ._fleet_link import FleetLink
from ._gateway_identity import GatewayIdentity, other_gateways_said
from ._gc_freeze import GcFreezer
from ._images import Images
from ._jobs import ImageJob
from ._journal import Journal, JournalEntry, SubmitJournal
from ._journal_args import check_states, check_tag, checked_items, checked_keys
from ._keys import check_key, images_in
from ._models import EditRequest, GenerationRequest
from ._poller import OLD_KEY_ABSENCE_GRACE_S, BatchPoller
from ._results import GeneratedImage, SavedImage
from ._save_record import SaveRecord
from ._stats import ClientStats
from ._submitting import Submits
from ._telemetry import Telemetry
from ._transport import Transport

__all__ = ["ClientStats", "Images", "WujieClient"]  # the first two live in _stats, _images

if TYPE_CHECKING:
    from ._otel import JobTrace
    from .fleet import RedisFleet

_State = Literal["unopened", "open", "closing", "closed"]
logger = logging.getLogger("wujie_async")


# Fields the client checks itself: extra_body may not set them behind its back (the rules,
# the points budget and the job's image count all rest on them).
_KNOWN_FIELDS = frozenset(GenerationRequest.model_fields) | frozenset(EditRequest.model_fields)
# How deep extra_body may nest objects and arrays (itself the first level). Far below what a
# JSON encoder follows (about 1,000 here): a body nested deeper raised a bare RecursionError,
# and one nested just below that could pass this check and fail when sent or journaled.
MAX_EXTRA_BODY_DEPTH = 100


def _checked_extra_body(extra: Any) -> dict[str, Any]:
    """``extra_body`` as sent: new fields only, with JSON values."""
    if not isinstance(extra, Mapping) or not all(isinstance(name, str) for name in extra):
        raise InvalidRequestError(
            [("extra_body", "must be a mapping of field names (str) to JSON values")]
        )
    known = sorted(set(extra) & _KNOWN_FIELDS)
    if known:
        raise InvalidRequestError(
            [
                (
                    "extra_body",
                    f"must not set {', '.join(known)}: pass it as an argument, where it is "
                    "checked (the budget and the job's image count rest on it)",
                )
            ]
        )
    if _nesting_deeper_than(extra, MAX_EXTRA_BODY_DEPTH):
        raise InvalidRequestError(
            [
                (
                    "extra_body",
                    f"must not nest objects and arrays more than {MAX_EXTRA_BODY_DEPTH} deep",
                )
            ]
        )
    try:
        text = json.dumps(extra, allow_nan=False, ensure_ascii=False)
        plain = True
    except (TypeError, ValueError):
        plain = False
    if not plain:
        raise InvalidRequestError([("extra_body", "must hold JSON values only (finite numbers)")])
    try:  # a lone surrogate passes json.dumps (as "\udc80") but is no UTF-8 to send
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(
            [
                (
                    "extra_body",
                    "must hold text encodable as UTF-8 (no lone surrogates such as '\\ud800')",
                )
            ]
        ) from None
    return dict(extra)


_Container = dict[Any, Any] | list[Any] | tuple[Any, ...]


def _nesting_deeper_than(value: object, depth: int) -> bool:
    """True when ``value`` nests dicts, lists and tuples (what JSON encodes as objects and
    arrays) more than ``depth`` levels deep, itself the first. One level at a time, not by
    recursion (the point is not to recurse 5,000 deep), each container once per level."""
    level: list[_Container] = [value] if isinstance(value, dict | list | tuple) else []
    for _ in range(depth):
        deeper: dict[int, _Container] = {}
        for container in level:
            items = container.values() if isinstance(container, dict) else container
            for item in items:
                if isinstance(item, dict | list | tuple):
                    deeper[id(item)] = item
        if not deeper:
            return False
        level = list(deeper.values())
    return True


def _check_arguments(**given: Any) -> None:
    """Each of ``WujieClient``'s arguments is of its type, or None where that means the default:
    a wrong one is named now, not met as an AttributeError at the first submit."""
    kinds: dict[str, tuple[type, ...]] = {
        "credentials": (Credentials,),
        "poll": (PollPolicy,),
        "limits": (Limits,),
        "timeouts": (Timeouts,),
        "retry": (RetryPolicy,),
        "journal": (str, os.PathLike),
        "session": (aiohttp.ClientSession,),
        "downloads": (DownloadPolicy,),
    }
    found = [
        (name, f"must be a {' or '.join(kind.__name__ for kind in kinds[name])} (or None)")
        for name, value in given.items()
        if name in kinds and value is not None and not isinstance(value, kinds[name])
    ]
    found += [
        (name, "must be True or False")
        for name in ("allow_insecure_http", "gc_freeze", "allow_private_addresses")
        if not isinstance(given[name], bool)
    ]
    if found:
        raise InvalidRequestError(found)


def _checked_jobs(jobs: object) -> list[ImageJob]:
    """``as_completed``'s jobs, each once, in order: a str (a key) or anything not a job would
    otherwise fail deep inside, as an AttributeError, with nothing said about which argument."""
    many = "an iterable of ImageJob (from images.submit or images.attach)"
    listed = checked_items(jobs, "jobs", ImageJob, many, "an ImageJob")
    return list(dict.fromkeys(listed))


class WujieClient:
    """An asyncio client of the Wujie "OpenAI Image" gateway.

    Use it as ``async with WujieClient(...) as client:``; one client per event loop, shared by
    every task. With no arguments it reads ``WUJIE_APP_ID``, ``WUJIE_PRIVATE_KEY`` and
    ``WUJIE_BASE_URL`` (default: the production gateway).

    Args:
        credentials: the app id and RSA private key.
        base_url: the gateway's base URL, ending in ``/wj-open/v1``.
        poll: when keys are polled.
        limits: connection, concurrency and rate limits.
        timeouts: connect/request/job/close deadlines.
        retry: backoff for retryable failures.
        journal: a SQLite file recording every submit (intent before sending, key before
            ``submit()`` returns, outcomes after), so :meth:`resume` can pick up after a crash
            and :meth:`uncertain_submits` can say which submits may have been charged.
        allow_insecure_http: allow a plain ``http://`` base URL to a host that is not loopback.
            Off by default: over plain http anyone on the path can replay the signed header
            with other bodies, paid for by this account. A WARNING is logged when it is used.
        fleet: a ``wujie_async.fleet.RedisFleet``: share the submit rate, the poller and the
            journal (kept in Redis, in place of ``journal``) with every client of the same
            fleet, in any process or machine. See the docs, "Running many workers".
        session: an ``aiohttp.ClientSession`` of yours to send the API calls on (your
            connector, proxy, TLS or tracing settings apply). The client never closes it;
            ``Limits.max_connections`` then does not apply. Default: the client's own.
        gc_freeze: keep the garbage collector's full collections short with very many jobs
            pending (100,000 jobs: loop stalls of a few hundred ms without, under 50 ms with).
            As jobs pile up, every object alive in the process is moved out of the collector's
            view (``gc.freeze()``); the last such client to close calls ``gc.unfreeze()``.
            Process-wide, hence off by default: meanwhile an unreachable reference cycle among
            frozen objects is only reclaimed after that close (objects freed by reference
            counting, most of them, are freed as usual). See the docs, "Performance".
        downloads: how images are downloaded and saved by :meth:`download` and
            :meth:`ImageJob.save`: size cap, per-image deadline, minimum rate, redirects,
            plain http. Downloads use a connection pool of their own, opened at the first.
        allow_private_addresses: let image URLs point at loopback, private, link-local and
            reserved addresses whatever the base URL. Off by default: image URLs come from
            the gateway, and they may point at loopback (private) addresses only when the base
            URL itself is on a loopback (private) address, as the emulator's is; otherwise a
            hostile gateway could make this client fetch from services on your own machine
            or network.
    """

    def __init__(
        self,
        credentials: Credentials | None = None,
        *,
        base_url: str | None = None,
        poll: PollPolicy | None = None,
        limits: Limits | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        journal: str | os.PathLike[str] | None = None,
        allow_insecure_http: bool = False,
        fleet: RedisFleet | None = None,
        session: aiohttp.ClientSession | None = None,
        gc_freeze: bool = False,
        downloads: DownloadPolicy | None = None,
        allow_private_addresses: bool = False,
    ) -> None:
        _check_arguments(
            credentials=credentials,
            poll=poll,
            limits=limits,
            timeouts=timeouts,
            retry=retry,
            journal=journal,
            allow_insecure_http=allow_insecure_http,
            session=session,
            gc_freeze=gc_freeze,
            downloads=downloads,
            allow_private_addresses=allow_private_addresses,
        )
        self.credentials = credentials if credentials is not None else Credentials.from_env()
        try:
            self.base_url = check_base_url(
                base_url
                if base_url is not None
                else Environment.read().base_url or _contract.PRODUCTION_BASE_URL,
                allow_insecure_http=allow_insecure_http,
            )
        finally:
            # A refused URL may hold a password (user:pw@): it leaves this frame's locals
            # before the error does, as check_base_url's own (an error reporter that records
            # locals would store it). Only self.base_url is used below.
            del base_url
        self.poll_policy = poll or PollPolicy()
        self.limits = limits or Limits()
        self.timeouts = timeouts or Timeouts()
        self.retry_policy = retry or RetryPolicy()
        self.images = Images(submit=self._submit, attach=self._attach)
        self._state: _State = "unopened"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fleet: FleetLink | None = None
        headers: dict[str, str] = {}
        if fleet is not None:
            if journal is not None:
                raise InvalidRequestError(
                    [
                        (
                            "journal",
                            "cannot be used with fleet=: a fleet keeps its journal in Redis, "
                            "shared by every member (drop journal=)",
                        )
                    ]
                )
            self._fleet = fleet.member()
            headers["X-Wujie-Member"] = self._fleet.header_token
        # Logs' repeated-warnings gate, and spans and metrics once open (see _telemetry).
        self._telemetry = Telemetry()
        self._transport = Transport(
            base_url=self.base_url,
            signer=HeaderSigner(self.credentials),
            limits=self.limits,
            timeouts=self.timeouts,
            retry=self.retry_policy,
            headers=headers,
            session=session,
            telemetry=self._telemetry,
        )
        self._poller = BatchPoller(self._transport, self.poll_policy, self.limits)
        # One downloader for the client (its session opens at the first download); every job
        # holds this one reference for job.save().
        self._downloader = Downloader(
            downloads,
            retry=self.retry_policy,
            addresses=AddressRule.for_gateway(
                self.base_url, allow_private_addresses=allow_private_addresses
            ),
            telemetry=self._telemetry,
        )
        # One bound method for every job's cancel hook, not one allocated per job.
        self._forget_job = self._poller.forget
        self._gc_freezer = GcFreezer() if gc_freeze else None
        self._poller_task: asyncio.Task[None] | None = None
        self._closed: anyio.Event | None = None
        # True from open() until aclose() is done draining: jobs made meanwhile are tracked.
        self._tracking = False
        self._journal: SubmitJournal | None = None
        if self._fleet is not None:
            self._journal = self._fleet.journal
            self._downloader.save_record = SaveRecord(self._fleet.journal)  # as SQLite's below
        elif journal is not None:
            # Each row records its gateway: resume() asks only the gateway that took it.
            gateway = GatewayIdentity.of(self.base_url, self.credentials.app_id)
            self._journal = Journal(journal, gateway=gateway)
            # job.save() is recorded on its row: a save cut off is resumed (see resume()).
            self._downloader.save_record = SaveRecord(self._journal)
        self._other_gateway_rows: set[int] = set()  # of resume()'s last call (said once)
        budget = None
        if self.limits.max_points is not None:
            budget = Budget(self.limits.max_points, self.limits.point_prices)
            # The poller reads the costs: one it cannot read is no cost unreported.
            self._poller.cost_told_unreadably = budget.cost_told_unreadably
        self._submits = Submits(
            transport=self._transport,
            journal=self._journal,
            make_job=self._new_job,
            in_use=lambda key: self._poller.get(key) is not None,
            budget=budget,
        )

    def __repr__(self) -> str:
        credentials = getattr(self, "credentials", None)
        if credentials is None or not hasattr(self, "_poller"):
            # Half made (its constructor raised): an error reporter shows the frame's self.
            app_id = credentials.app_id if credentials is not None else None
            return f"WujieClient(app_id={app_id!r}, state='not constructed')"
        return (
            f"WujieClient(app_id={credentials.app_id!r}, base_url={self.base_url!r}, "
            f"state={self._state!r}, outstanding={len(self._poller)})"
        )

    # --- lifecycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Open the journal and the HTTP session and start the poller (``async with`` does this).

        Raises:
            JournalLockedError: another process (or client) has the journal open.
            ClientStateError: the client was opened before, or the journal cannot be opened.
        """
        if self._state != "unopened":
            raise ClientStateError(f"the client is {self._state}; a client opens once")
        self._loop = asyncio.get_running_loop()
        try:
            await self._open_parts()
        except BaseException:
            # Whatever was opened (the journal's lock, the HTTP session, the fleet) is shut:
            # a client that failed to open holds nothing, and a new one can take the journal.
            self._state = "closing"
            self._closed = anyio.Event()
            with anyio.CancelScope(shield=True):
                await self._shut_down()
            raise
        assert self._poller_task is not None
        self._poller_task.add_done_callback(self._poller_stopped)
        self._state = "open"
        self._tracking = True
        if self._gc_freezer is not None:
            self._gc_freezer.start()
        fleet = self._fleet
        self._telemetry.client_opened(
            base_url=self.base_url,
            limits=self.limits,
            timeouts=self.timeouts,
            journal="in the fleet" if fleet is not None else getattr(self._journal, "path", None),
            fleet_member=fleet.member_id if fleet is not None else None,
        )

    async def _open_parts(self) -> None:
        fleet = self._fleet
        if self._journal is not None and fleet is None:
            await self._journal.open()
        telemetry = self._telemetry
        telemetry.start(
            base_url=self.base_url,
            jobs_in_flight=lambda: len(self._poller),
            brake_rates=lambda: self._transport.brake_rates.items(),
            fleet_role=(lambda: fleet.stats().role) if fleet is not None else None,
        )
        await self._transport.open()
        if fleet is not None:
            with telemetry.detached():  # its tasks' spans are not the opener's children
                await fleet.start(
                    poller=self._poller,
                    transport=self._transport,
                    poll=self.poll_policy,
                    limits=self.limits,
                    app_id=self.credentials.app_id,
                )
            await fleet.journal.open()
        self._submits.open(
            Admission(self.limits, pace=fleet.acquire if fleet is not None else None)
        )
        # A bare asyncio task, not a task group's: the poller lives from open() to aclose(),
        # which may run in different tasks, and a task group (or cancel scope) must be left by
        # the task that entered it. Its end is watched instead: a done callback settles every
        # job if it ever stops while open, and aclose() cancels and awaits it.
        with telemetry.detached():  # a batch call is a root span, not the opener's child
            assert self._loop is not None
            self._poller_task = self._loop.create_task(
                self._poller.run(), name="wujie-async poller"
            )

    def _poller_stopped(self, task: asyncio.Task[None]) -> None:
        """If the poller ever stops while open, settle every job now instead of leaving awaits
        hanging; new submits are refused from then on."""
        if self._state != "open":
            return  # aclose() stopped it
        reason = "it was cancelled" if task.cancelled() else repr(task.exception())
        logger.error("the wujie-async poller stopped: %s", reason)
        self._poller.cancel_all(f"the poller stopped ({reason}): open a new client")

    def stop_submitting(self) -> None:
        """Send no more submits; everything already sent carries on.

        For a graceful stop (SIGTERM, a deploy): every submit whose request has not left yet
        (waiting for ``max_in_flight``, the rate cap, a submit slot or the points budget) ends
        at once with ``ClientStateError`` (nothing was sent or charged, and the journal holds
        nothing to resend by mistake), and so does every later submit. Submits on the
        wire finish and return their jobs; accepted jobs keep being polled, so they can still
        be awaited (or left to the journal) before :meth:`aclose`.
        """
        self._check_open()
        self._submits.stop_sending()

    async def aclose(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """Close the client; every job and submit left is settled, no task or socket left behind.

        Submits still in progress end at once: with ``ClientStateError`` if their request had
        not left, with ``SubmitUncertainError`` if it may have (it may have been charged), or
        by returning their job, already cancelled, if the key had come back (with a journal the
        key is kept: :meth:`resume` picks it up). Their unwinding, and then the poller's stop,
        is waited for at most ``Timeouts.close`` each (a trace hook of your aiohttp session may
        await anything): a WARNING names what was left behind. The transport and the journal
        are closed whatever else fails; the journal's close waits at most 2 s for its last commit (a
        disk that stopped answering: a WARNING names the records left to its thread).

        Args:
            drain: first wait for submits in progress and outstanding jobs to end (up to
                ``timeout``, default ``Timeouts.close``); what is still running then is
                cancelled.
            timeout: bound of the drain, in seconds.

        Raises:
            InvalidRequestError: ``timeout`` is not a finite number of seconds >= 0 (checked
                before anything is closed).
        """
        timeout = check_wait("timeout", timeout)
        if self._state == "unopened":
            self._state = "closed"
            return
        if self._state != "open":
            if self._closed is not None:
                await self._closed.wait()  # another task is closing it: return once it is shut
            return
        self._check_loop()
        self._state = "closing"
        self._closed = anyio.Event()
        if not drain:
            self._tracking = False
        try:
            if drain:
                wait = self.timeouts.close if timeout is None else timeout
                with anyio.move_on_after(wait):
                    await self._submits.wait_idle()
                    await self._drain_jobs()
        finally:
            # Whatever ended the drain (its bound, or a cancel of the closing task), every job
            # and submit is settled and every task and socket shut: shielded from that cancel,
            # each step bounded on its own.
            with anyio.CancelScope(shield=True):
                await self._shut_down()

    async def _shut_down(self) -> None:
        left: list[str] = []
        try:
            self._tracking = False
            await self._submits.stop(self.timeouts.close)
            left = [job.key for job in self._poller.jobs()]  # accepted, so paid for: named
            self._poller.cancel_all("the client was closed before the job ended")
            await self._stop_poller()
        finally:
            try:
                if self._fleet is not None:
                    await self._fleet.stop_polling()
                try:
                    await self._downloader.aclose()
                finally:
                    await self._transport.close()
            finally:
                try:
                    if self._journal is not None:
                        await self._journal.close()
                finally:
                    try:
                        if self._fleet is not None:
                            await self._fleet.aclose()  # after the journal's last records
                    finally:
                        self._tracking = False
                        self._state = "closed"
                        if self._gc_freezer is not None:
                            self._gc_freezer.stop()
                        try:
                            self._telemetry.stop()  # held-back warnings written
                            if logger.isEnabledFor(logging.INFO):
                                self._telemetry.client_closed(
                                    self.stats, left, journal=self._journal is not None
                                )
                        finally:
                            assert self._closed is not None
                            self._closed.set()

    async def _drain_jobs(self) -> None:
        for job in self._poller.jobs():  # one after another: the wait is the longest one's
            with contextlib.suppress(Exception):  # draining waits for ends, not for outcomes
                await job

    async def _stop_poller(self) -> None:
        task, self._poller_task = self._poller_task, None
        if task is None:
            return
        task.cancel()
        # asyncio.wait: it waits for the task without raising the poller's own error (closing
        # goes on) and without being cancelled with it. Bounded: a batch call cancelled on the
        # wire unwinds through the aiohttp session, whose trace hooks (a session of the
        # caller's) may await anything.
        wait = self.timeouts.close
        await asyncio.wait([task], timeout=wait)
        if not task.done():
            logger.warning(
                "closing: the poller did not stop within %g s (Timeouts.close) and was left "
                "behind (something its cancelled batch call awaits does not answer: a trace "
                "hook of your aiohttp session?); every job was settled all the same",
                wait,
            )
            return
        if not task.cancelled() and task.exception() is not None:
            logger.error("the wujie-async poller had stopped: %r", task.exception())

    def _check_loop(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            raise ClientStateError(
                "this client belongs to another event loop; create one client per loop"
            )

    def _check_open(self) -> asyncio.AbstractEventLoop:
        if self._state != "open":
            hint = (
                "use `async with WujieClient(...)`"
                if self._state == "unopened"
                else "open a new client"
            )
            raise ClientStateError(f"the client is {self._state}: {hint}")
        if self._poller_task is not None and self._poller_task.done():
            raise ClientStateError(
                "the client's poller has stopped (see the log): open a new client"
            )
        self._check_loop()
        if self._loop is None:  # set by open(); here for the type checker
            raise ClientStateError("the client has no event loop")
        return self._loop

    def _taking_jobs(self) -> bool:
        """True while new jobs can be tracked (open or draining, and the poller alive)."""
        task = self._poller_task
        return self._tracking and task is not None and not task.done()

    # --- jobs --------------------------------------------------------------------------------
    def _submit(
        self,
        path: str,
        body: dict[str, Any],
        n: int | None,
        job_timeout: float | None,
        extra_body: Mapping[str, Any] | None,
        tag: str | None,
    ) -> Coroutine[Any, Any, ImageJob]:
        """The checks, then the submit's coroutine: called from ``Images.submit``'s own
        coroutine, which awaits it (no coroutine of its own here: one layer less per submit)."""
        task = self._poller_task
        # The checks of _check_open, in their passing case (the submit hot path; called from
        # a coroutine, so a loop runs): any other case goes through _check_open for its error.
        if (
            self._state != "open"
            or task is None
            or task.done()
            or asyncio.get_running_loop() is not self._loop
        ):
            self._check_open()
        # Timeouts.job was checked when its Timeouts was made: only a submit's own is checked.
        deadline_s = self.timeouts.job if job_timeout is None else self._job_timeout(job_timeout)
        if extra_body is not None:
            body = {**body, **_checked_extra_body(extra_body)}
        return self._submits.submit(path, body, n or 1, deadline_s, tag)

    def _new_job(
        self,
        key: str,
        *,
        deadline_s: float,
        request: dict[str, Any] | None,
        n: int | None,
        first_delay: float | None = None,
        ended: Callable[[ImageJob], None] | None = None,
        trace: JobTrace | None = None,
        absence_grace: float | None = None,
    ) -> ImageJob:
        """The one job factory (submit, attach, resume): build, hook up, track.

        A job made while the client is closing, or after its poller stopped, is settled at once
        (JobCancelledError) rather than left to wait for a poller that will never ask.
        ``trace``: the job's telemetry record, begun at submit (an attached job's begins here).
        """
        loop = self._loop
        if loop is None:
            raise ClientStateError("the client is not open")
        adopted = self._poller.get(key)
        if adopted is not None:
            # A submit's key that attach() took while the submit was receiving it (its journal
            # write on the way; a submit never claims a key in use): one job for the key,
            # returned by both. Two were made, and the one the poller no longer tracked never
            # ended until its deadline.
            # What the submit sent, where the attach did not say (job.request, and job.n,
            # by which a job done short of its images is incomplete).
            adopted._learn(request, n)
            if ended is not None:
                adopted.add_done_callback(ended)
            if trace is not None and trace.span is not None:
                trace.span.end()  # the job's span is the attached one's
            return adopted
        otel = self._telemetry.otel
        if trace is None and otel is not None:
            trace = otel.job_started("attach", (request or {}).get("model"), n)
        job = ImageJob._made(
            key, loop, loop.time() + deadline_s, request, n, self._forget_job, self._downloader
        )
        if ended is not None:
            job.add_done_callback(ended)
        if self._journal is not None:
            job.add_done_callback(self._record_outcome)
        if self._taking_jobs():
            self._poller.track(
                job, first_delay=first_delay, trace=trace, absence_grace=absence_grace
            )
            if self._gc_freezer is not None:
                self._gc_freezer.job_tracked()
            if self._fleet is not None:
                self._fleet.tracked(job, first_delay)  # it follows the job's end itself
        else:
            job.cancel()
            self._telemetry.job_ended(trace, key, None, job, job.exception(), 0)
        return job

    def _record_outcome(self, job: ImageJob) -> None:
        journal = self._journal
        if journal is None:
            return
        error = job.exception()
        if error is None:
            journal.record_outcome(job.key, "succeeded")
        elif isinstance(error, JobTimeoutError):
            # Only this client stopped waiting: the job may still run (and is paid). The row
            # stays accepted, so resume() and a bulk re-run collect it rather than resend it.
            return
        elif isinstance(error, JobCancelledError):
            # Only the user's own cancel ends a row; closing, or a stopped poller, leaves the
            # key accepted, so resume() picks it up.
            if self._state == "open" and self._taking_jobs():
                journal.record_outcome(job.key, "cancelled", str(error))
        else:
            journal.record_outcome(job.key, "failed", str(error))

    def _job_timeout(self, job_timeout: float | None) -> float:
        seconds = self.timeouts.job if job_timeout is None else job_timeout
        if (
            not isinstance(seconds, int | float)
            or isinstance(seconds, bool)
            or not 0 < seconds < math.inf
        ):
            raise InvalidRequestError(
                [("job_timeout", "must be a positive, finite number of seconds")]
            )
        return seconds

    def _attach(
        self,
        key: str,
        *,
        job_timeout: float | None,
        n: int | None,
        request: Mapping[str, Any] | None = None,
        charge_budget: bool = False,
        submitted_at: float | None = None,
    ) -> ImageJob:
        self._check_open()
        check_key(key)
        absence_grace = self._absence_grace(submitted_at)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise InvalidRequestError([("n", "must be a positive int (images in the job)")])
        if request is not None and not isinstance(request, Mapping):
            raise InvalidRequestError([("request", "must be a mapping (the submitted body)")])
        deadline_s = self._job_timeout(job_timeout)
        existing = self._poller.get(key)
        if existing is not None:
            return existing  # held already, if it was to be
        ended = None
        if charge_budget:
            body = request or {}
            if not isinstance(body.get("model"), str):
                # Its cost is known by its kind (model, size, quality, n): without a model
                # it would hold nothing against the submits it should hold back.
                raise InvalidRequestError(
                    [("request", "charge_budget=True needs the request it was submitted with")]
                )
            # A key a submit of this client is receiving: that submit's reservation counts
            # the job (the job is handed to it, see _new_job); held here too, it was counted
            # twice.
            if not self._submits.receiving(key):
                ended = self._submits.charge_attached(key, body, n or images_in(body) or 1)
        return self._new_job(
            key,
            deadline_s=deadline_s,
            request=dict(request) if request is not None else None,
            n=n,
            first_delay=0.0,
            ended=ended,
            absence_grace=absence_grace,
        )

    def _absence_grace(self, submitted_at: float | None) -> float | None:
        """How long replies may leave out a key submitted at ``submitted_at`` (unix time)
        before it ends as unknown, if it never is listed: what is left of the policy's grace
        (the moment after a submit when a gateway may not list its key yet), and at least
        ``OLD_KEY_ABSENCE_GRACE_S``. None: the policy's grace (no time given)."""
        # The shared check of a number of seconds (a unix time is one): an int too large for
        # a float is refused there, where math.isfinite raised OverflowError.
        when = check_wait("submitted_at", submitted_at)
        if when is None:
            return None
        grace = self.poll_policy.unknown_key_grace
        left = grace - max(time.time() - when, 0.0)
        return min(grace, max(left, OLD_KEY_ABSENCE_GRACE_S))

    async def resume(self, *, job_timeout: float | None = None) -> list[ImageJob]:
        """Re-attach every journaled key whose job had not ended; returns their jobs.

        Jobs this client already follows are not returned again (a caller that handles each
        returned job handles each job once), nor are those a submit of this client is
        returning (its key journaled, its ``submit()`` not returned yet).

        Submits whose fate is unknown are never resent: see :meth:`uncertain_submits`. A row
        with an unreadable request is still resumed by its key (a WARNING names it); a row
        whose key is not a usable job key is skipped, and one WARNING names such rows.

        A job key is known only to the gateway and account that accepted it: rows whose submit
        went to another base URL or another app id than this client's (staging and production,
        a changed ``WUJIE_BASE_URL``, a second account) are neither attached nor changed. They
        stay ``accepted``, for a client of their gateway to resume (asked of this gateway,
        each would end "unknown key", its paid images never collected), and so do jobs of
        theirs whose save was cut off (see below). One WARNING says how many there are, the
        base URLs they were submitted to and this client's; a queue consumer calls
        ``resume()`` every few seconds, so it is said again at WARNING only when those rows
        change (at DEBUG meanwhile). Rows written before journals recorded their gateway are
        resumed here.

        In fleet mode it claims the accepted submits of members whose heartbeat expired
        (``RedisFleet(member_timeout=...)``) and attaches those: each dead member's job goes
        to exactly one member, and nothing is resubmitted. This member's own accepted
        submits (a job that timed out, say) are attached too.

        Jobs that succeeded and whose ``job.save()`` never ended are returned too (a SQLite
        journal, or a fleet's: the member's own, and, claimed as their accepted jobs are, each
        by one member, those of dead members; a worker killed mid-save and started again is a
        new member, and gets its job once the dead one's ``member_timeout`` has passed): the
        save was cut off by its process ending (a SIGTERM, a crash), by its client closing, or
        by a cancel, and the images it was saving, paid for, are not on disk. Their images
        are listed again as the job is attached: save them (image URLs expire, so soon). So
        are those whose save failed on the network or the disk once its retries were spent (it
        may succeed later). A save that failed on what trying again cannot mend (an image that
        expired, a refused URL) is not resumed: its caller was told. A job being saved in this
        process is not returned; one whose save this process cut off (a save cancelled) is,
        as the job this client holds. Journals written before rows recorded saves resume no
        such job.

        Raises:
            ClientStateError: the client has no journal; or, in fleet mode, this member's own
                heartbeat expired (Redis was away from it for longer than ``member_timeout``):
                it claims nothing until its next heartbeat, a third of ``member_timeout``
                away, lest it take the jobs of members whose heartbeats have not landed yet.
                Call again then. (A member Redis forgot, after a restart without AOF or a
                FLUSHALL, joins again at once and claims.)
            FleetUnavailableError: fleet mode, and Redis cannot be reached.
            InvalidRequestError: ``job_timeout`` is not a positive, finite number of seconds
                (checked before any row is read, rows or none).
        """
        self._check_open()
        self._job_timeout(job_timeout)  # checked when no row is there to use it too
        journal = self._require_journal()
        if self._fleet is not None:
            entries = await self._fleet.resumable()  # (a fleet has one gateway: checked)
        else:
            entries = await journal.entries("accepted")
            if isinstance(journal, Journal) and self._downloader.save_record is not None:
                entries += await journal.saves_cut_off()
        if (saves := self._downloader.save_record) is not None:
            # Saves cut off (succeeded rows): not one running in this process now.
            entries = [
                e for e in entries if e.state == "accepted" or not saves.saving(e.job_key or "")
            ]
        elsewhere: list[JournalEntry] = []
        if isinstance(journal, Journal) and (gateway := journal.gateway) is not None:
            elsewhere = [entry for entry in entries if gateway.elsewhere(entry)]
            if elsewhere:
                entries = [entry for entry in entries if not gateway.elsewhere(entry)]
        jobs: list[ImageJob] = []
        unusable: list[int] = []
        for entry in entries:
            if not entry.job_key or self._submits.receiving(entry.job_key):
                continue  # no key, or a job a submit of this client is returning
            held = self._poller.get(entry.job_key)
            if held is not None and not (entry.state == "succeeded" and held.done()):
                continue  # a job this client follows already
            # (A job that ended here lately and whose save was cut off in this process, a
            # save cancelled, say: returned, as it is to a process that starts afresh.)
            try:
                check_key(entry.job_key)
            except InvalidRequestError:
                unusable.append(entry.id)  # one bad row never strands the others
                continue
            jobs.append(
                self._attach(
                    entry.job_key,
                    job_timeout=job_timeout,
                    n=images_in(entry.request),
                    request=entry.request,
                )
            )
        if unusable:
            logger.warning(
                "resume: %d journal row(s) hold a job key that is not usable (row id %s): "
                "skipped; %d job(s) resumed",
                len(unusable),
                some_and_more([str(row_id) for row_id in unusable], 10),
                len(jobs),
            )
        # Queue consumers call it every few seconds: the same rows are said once, at WARNING.
        shown, self._other_gateway_rows = self._other_gateway_rows, {e.id for e in elsewhere}
        if elsewhere:
            # Rows of both kinds are left: accepted ones, and those that succeeded and wait
            # for a save that was cut off (said as such: they read succeeded, not accepted).
            accepted = sum(1 for entry in elsewhere if entry.state == "accepted")
            cut_short = len(elsewhere) - accepted
            said = [f"{accepted} accepted job(s)"] if accepted else []
            said += [f"{cut_short} succeeded job(s) whose save was cut off"] if cut_short else []
            logger.log(
                logging.WARNING if self._other_gateway_rows != shown else logging.DEBUG,
                "resume: %s in journal %s were submitted to %s: not resumed, left as they "
                "are; resume them with a client of that gateway (its base URL and app id)",
                " and ".join(said),
                getattr(journal, "path", "?"),
                other_gateways_said(elsewhere, self.base_url),
            )
        # Queue consumers call it every few seconds: nothing resumed is DEBUG, not INFO.
        logger.log(
            logging.INFO if jobs else logging.DEBUG,
            "resumed %d job(s) %s",
            len(jobs),
            "of dead fleet members" if self._fleet is not None else "from the journal",
        )
        return jobs

    async def uncertain_submits(self) -> list[JournalEntry]:
        """Submits that may have been charged without the journal holding their key.

        These are the journal's ``uncertain`` rows (sent, no reply recorded; they include
        intents of a process that died mid-request), then, in memory for the life of this
        client, submits the gateway accepted whose key the journal could not write (a full
        disk, say): those are listed with ``state="uncertain"`` and their ``job_key``, and
        their jobs are tracked as usual, and their keys are written again in the background
        (such a submit leaves this list once its key is in the journal). Check them in the
        platform's console before sending the same prompts again.

        Raises:
            ClientStateError: the client has no journal, or is not open.
        """
        self._check_open()
        journal = self._require_journal()
        rows = await journal.entries("uncertain")
        unjournaled = self._submits.unjournaled
        if unjournaled:
            # Their keys are written again in the background: once one landed, it is the
            # journal's like any other.
            kept = {row.job_key for row in await journal.entries() if row.job_key}
            unjournaled[:] = [entry for entry in unjournaled if entry.job_key not in kept]
        return rows + list(unjournaled)

    async def journal_entries(self, *states: str, tag: str | None = None) -> list[JournalEntry]:
        """Journal rows in ``states`` (every row if none), with ``tag`` if given; oldest first.

        States: intent, accepted, succeeded, failed, cancelled, rejected, uncertain, unsent.

        Raises:
            InvalidRequestError: a state that is not one of those, or a ``tag`` that is not a
                str (nor None).
            ClientStateError: the client has no journal, or is not open.
        """
        check_states(states)
        check_tag(tag, optional=True)
        self._check_open()
        return await self._require_journal().entries(*states, tag=tag)

    async def record_submit_key(self, entry_id: int, key: str) -> bool:
        """Record the key an ``uncertain`` submit was accepted as, found since (in the
        platform's console, or a bulk run's manifest when a full disk kept it out of the
        journal). Its row becomes ``accepted``, so :meth:`resume` collects its job, and a
        re-run never takes it for one to send again.

        Returns False, changing nothing, when the row is not ``uncertain`` or another row
        already holds ``key`` (a key is one submit's).

        Raises:
            InvalidRequestError: ``entry_id`` is not an int, or ``key`` is not a job key.
            ClientStateError: the client has no journal, or is not open.
        """
        if not isinstance(entry_id, int) or isinstance(entry_id, bool):
            raise InvalidRequestError([("entry_id", "must be a journal row id (an int)")])
        check_key(key)
        self._check_open()
        found = await self._require_journal().record_found_key(entry_id, key)
        if found:
            submits = self._submits
            submits.key_found(entry_id, key)
            submits.unjournaled = [e for e in submits.unjournaled if e.job_key != key]
        return found

    def uncommitted_journal_keys(self) -> list[str]:
        """The job keys of journal records not committed to its file yet, each once, oldest
        first (empty without a journal, or with a fleet's).

        After :meth:`aclose` stopped waiting for a journal whose disk took no write (a frozen
        file system, a hung mount), these are the keys the file may lack: keep them
        (``images.attach`` follows one). The records are still committed, in order, if the
        disk answers before the process ends. Callable in any state, closed included.
        """
        journal = self._journal
        return journal.uncommitted_keys() if isinstance(journal, Journal) else []

    def refuse_keys(self, keys: Iterable[str]) -> None:
        """Keys of earlier jobs (an earlier run's, say) that a submit's reply must not bring.

        A gateway that hands out a key again (a counter reset by a restart) would have a new
        submit followed as the earlier job, and given its images. The client refuses a key
        of a job it follows or has just ended, and its journal (SQLite or the fleet's) a key it
        holds on an earlier row; beyond that it cannot know them. A submit
        answered with one of these keys raises :class:`SubmitUncertainError` (it may have
        been charged; its job cannot be told from the earlier one) and its journal row stays
        ``uncertain``. Attaching one of these keys is not affected. The bulk command passes
        every key its manifest and journal hold.

        Raises:
            InvalidRequestError: ``keys`` is a str (one key is ``[key]``), or not iterable, or
                holds something other than a str; none of them is added.
        """
        self._submits.refuse_keys(checked_keys(keys))

    async def forget_submits(self, ids: Iterable[int]) -> int:
        """Delete these journal rows (by :attr:`JournalEntry.id`); returns how many were deleted.

        Forgetting an uncertain row means you have settled it yourself (checked the console,
        or decided to send it again).

        Raises:
            TypeError: an id is not an int.
            ClientStateError: the client has no journal, or is not open.
        """
        self._check_open()
        forgotten = set(ids)
        deleted = await self._require_journal().forget(forgotten)
        submits = self._submits
        submits.unjournaled = [e for e in submits.unjournaled if e.id not in forgotten]
        return deleted

    async def find_submit(self, tag: str) -> JournalEntry | None:
        """The journaled submit made with ``tag``, if any (the latest one).

        Lets a queue consumer that is handed a message again (it crashed before acknowledging)
        attach to the key it already has instead of paying for the same request twice. The
        row may be of another gateway (``entry.base_url``, after a move to another base URL
        or app id): its key is unknown to this one, and the end of a job attached by it here
        is not recorded on that row (see :meth:`resume`).

        Raises:
            InvalidRequestError: ``tag`` is not a str (None is refused: it would match every
                row, so a message without an id would find another message's submit).
            ClientStateError: the client has no journal, or is not open.
        """
        check_tag(tag, optional=False)
        self._check_open()
        found = await self._require_journal().entries(tag=tag)
        return found[-1] if found else None

    def _require_journal(self) -> SubmitJournal:
        if self._journal is None:
            raise ClientStateError("this client has no journal: WujieClient(journal='jobs.sqlite')")
        return self._journal

    async def as_completed(
        self, jobs: Iterable[ImageJob], *, timeout: float | None = None
    ) -> AsyncIterator[ImageJob]:
        """Yield ``jobs`` in the order they end (succeeded or not: await each to see which).

        Args:
            timeout: bound of the whole iteration, in seconds.

        Raises:
            TimeoutError: ``timeout`` passed with jobs still running.
            InvalidRequestError: ``timeout`` is not a finite number of seconds >= 0, or
                ``jobs`` is not an iterable of ``ImageJob``.
        """
        timeout = check_wait("timeout", timeout)
        pending = _checked_jobs(jobs)
        # asyncio.Queue, not an anyio memory stream: it is fed by the jobs' done callbacks
        # (plain functions on the loop), which may still run after this generator is closed,
        # when a closed stream would raise in the loop's exception handler.
        finished: asyncio.Queue[ImageJob] = asyncio.Queue()
        handles = [(job, job.add_done_callback(finished.put_nowait)) for job in pending]
        loop = self._check_open()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            for yielded in range(len(pending)):
                # The deadline wraps each wait only: a timeout scope held across ``yield``
                # would fire inside the caller's loop body instead.
                try:
                    with anyio.fail_after(None if deadline is None else deadline - loop.time()):
                        job = await finished.get()
                except TimeoutError:
                    running = len(pending) - yielded
                    raise TimeoutError(
                        f"as_completed: {running} of {len(pending)} jobs still running after "
                        f"its timeout of {timeout} s (the jobs go on: await or cancel them)"
                    ) from None
                yield job
        finally:
            for job, handle in handles:
                job.remove_done_callback(handle)

    async def download(
        self, image: GeneratedImage, path: str | os.PathLike[str], *, key: str | None = None
    ) -> SavedImage:
        """Save one image (its ``b64_json``, else its URL) as the file ``path``.

        Protected like :meth:`ImageJob.save`: the address rule, https only, redirects checked
        hop by hop, the size cap, the per-image deadline and minimum rate, bounded retries,
        and an atomic write (a temporary file, fsynced, then renamed: never a half file under
        ``path``). An existing file at ``path`` is replaced.

        Example::

            image = await job.image(0)
            saved = await client.download(image, "out/cat.{ext}")  # out/cat.png

        Args:
            image: an image of a job of this client (or of any job: URLs expire, so soon).
            path: the file to write; its folder is created if missing. ``{ext}`` in the
                file's name becomes the image's format (``png``, ``jpg`` or ``webp``).
            key: the image's job key, for the log and traces (optional).

        Raises:
            InvalidRequestError: ``image`` is no ``GeneratedImage``; the URL, or a redirect's
                target, is refused.
            ProtocolError: not an image, too large, no URL nor ``b64_json``, or the server
                refused it.
            TransportError: it could not be fetched in time, after its retries.
            ClientStateError: the client is not open.
            OSError: the file could not be written.
        """
        if not isinstance(image, GeneratedImage):
            raise InvalidRequestError(
                [("image", "must be a GeneratedImage (job.images[i], or await job.image(i))")]
            )
        self._check_open()
        return await self._downloader.save(image, path, key=key)

    @property
    def fleet_member(self) -> str | None:
        """This client's member id in its fleet (``host:pid:random``); None without one.

        Its last part is sent to the gateway as the ``X-Wujie-Member`` header.
        """
        return self._fleet.member_id if self._fleet is not None else None

    def jobs(self) -> list[ImageJob]:
        """Every job being tracked now."""
        return self._poller.jobs()

    @property
    def stats(self) -> ClientStats:
        """A snapshot of what the client has done."""
        brakes = self._transport.brake_rates
        return _stats.snapshot(
            submits=self._submits.accepted,
            submit_errors=self._submits.errors,
            submits_uncertain=self._submits.uncertain,
            poller=self._poller.counters,
            transport=self._transport.counters,
            submit_rate_limit=brakes["submit"],
            poll_rate_limit=brakes["poll"],
            jobs_outstanding=len(self._poller),
            journal_commits=self._journal.commits if self._journal is not None else 0,
            fleet=self._fleet.stats() if self._fleet is not None else None,
        )
