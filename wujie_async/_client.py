"""WujieClient: lifecycle, submits, attach, as_completed and stats."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, Unpack
from urllib.parse import urlsplit

import aiohttp

from . import _contract
from ._auth import Credentials, HeaderSigner
from ._config import Limits, PollPolicy, RetryPolicy, Timeouts
from ._env import Environment
from ._errors import (
    ClientStateError,
    InvalidRequestError,
    JobCancelledError,
    ProtocolError,
    SubmitUncertainError,
    snippet,
)
from ._fleet_link import FleetLink
from ._gc_freeze import GcFreezer
from ._jobs import ImageJob
from ._journal import Journal, JournalEntry, SubmitJournal
from ._models import EditRequest, GenerationRequest, ImageResult
from ._poller import BatchPoller
from ._request_fields import CLIENT_ONLY_FIELDS, EditFields, GenerationFields
from ._submitting import Admission, SubmitRecord
from ._transport import Transport

if TYPE_CHECKING:
    from .fleet import RedisFleet

_State = Literal["unopened", "open", "closing", "closed"]
logger = logging.getLogger("wujie_async")

# A job key as the gateway may give it: 1 to 128 characters, none of them whitespace or a
# control character (C0, DEL, C1). Checked with fullmatch: `$` would let "KEY\n" through.
_KEY = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]{1,128}")
MAX_KEY_CHARS = 128


@dataclass(frozen=True, slots=True)
class ClientStats:
    """What the client has done so far (a snapshot; read ``client.stats`` again to refresh).

    Attributes:
        submits: submits the gateway accepted (each gave a key).
        submit_errors: submits that raised.
        batch_calls: batch-detail calls sent.
        batch_errors: batch-detail calls that failed after their retries.
        keys_polled: keys asked about, over all batch calls.
        mean_batch_fill: keys per batch call on average (50 is full).
        http_calls: HTTP requests sent, retries included.
        retries: HTTP requests that were retries.
        rate_limited: 429 replies received.
        jobs_outstanding: jobs being tracked now.
        jobs_succeeded: jobs that ended with images.
        jobs_failed: jobs that ended with an error (failed, rejected, timed out, unknown).
        journal_commits: journal transactions committed (each holds many records; 0 without
            a journal).
        submit_rate_limit: the submit rate (requests/s) the 429 brake allows now; None while
            no brake is in force (the gateway has not refused a sustained share of submits).
        poll_rate_limit: the same for batch-detail calls (each kind of call has its own brake).
        fleet_role: with ``fleet=``: ``leader`` (this member polls for the fleet),
            ``follower`` (a leader polls for it) or ``local`` (Redis is away: it polls its own
            keys); None without a fleet.
        fleet_size: live members of the fleet (0 without a fleet).
        fleet_rate: the fleet-wide submit rate (None: no fleet, or no rate set).
        fleet_batch_calls: batch calls sent by the fleet's leaders, fleet-wide (refreshed
            about every second).
        fleet_mean_batch_fill: keys per fleet-wide batch call on average (50 is full).
    """

    submits: int
    submit_errors: int
    batch_calls: int
    batch_errors: int
    keys_polled: int
    mean_batch_fill: float
    http_calls: int
    retries: int
    rate_limited: int
    jobs_outstanding: int
    jobs_succeeded: int
    jobs_failed: int
    journal_commits: int = 0
    submit_rate_limit: float | None = None
    poll_rate_limit: float | None = None
    fleet_role: str | None = None
    fleet_size: int = 0
    fleet_rate: float | None = None
    fleet_batch_calls: int = 0
    fleet_mean_batch_fill: float = 0.0


def _check_base_url(base_url: str, *, allow_insecure_http: bool = False) -> str:
    """The base URL without its trailing slash, once it passes the rules below.

    Plain ``http://`` is allowed only to a loopback host (the emulator): the signature covers
    only the app id and a timestamp, so anyone on the path who sees one request's header can
    replay it with other bodies, each paid for, for minutes. ``user:password@`` in the URL is
    refused: the gateway does not use it, and it would show in reprs and logs.
    """
    rule_http = "must be an http(s) URL, e.g. " + _contract.PRODUCTION_BASE_URL
    if not isinstance(base_url, str):
        raise InvalidRequestError([("base_url", rule_http)])
    try:
        parts = urlsplit(base_url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        host = None  # raised below, outside this block, so no ValueError rides along
    # Messages never repeat the URL: it may hold a password.
    if host is None or parts.scheme not in {"http", "https"}:
        raise InvalidRequestError([("base_url", rule_http)])
    if "@" in parts.netloc:
        raise InvalidRequestError(
            [
                (
                    "base_url",
                    "must not contain user:password@ (the gateway authenticates with the "
                    "signed Authorization header; remove the credentials from the URL)",
                )
            ]
        )
    if parts.scheme == "http" and not _is_loopback(host):
        if not allow_insecure_http:
            raise InvalidRequestError(
                [
                    (
                        "base_url",
                        f"plain http:// is allowed only to a loopback host, not {host!r}: "
                        "anyone on the path could replay the signed header and be paid for; "
                        "use https://, or pass allow_insecure_http=True if you accept that",
                    )
                ]
            )
        logger.warning(
            "INSECURE: sending signed requests over plain http to %s (allow_insecure_http=True);"
            " anyone on the path can replay the Authorization header",
            host,
        )
    return base_url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


class Images:
    """``client.images``: submit, generate, edit and attach image jobs."""

    def __init__(self, client: WujieClient) -> None:
        self._client = client

    async def submit(self, **fields: Unpack[GenerationFields]) -> ImageJob:
        """Submit a generation; returns its job as soon as the gateway gives a key.

        Fields are those of API.md section 1 (see :class:`GenerationFields`); None or leaving
        one out lets the gateway use its default. ``job_timeout`` is the job's deadline in
        seconds (default ``Timeouts.job``); ``extra_body`` adds fields this client does not
        know yet, sent as given. ``tag`` is your own id for this submit (a queue message id,
        say): never sent, but kept in the journal so :meth:`WujieClient.find_submit` can tell
        whether it was already sent.

        Raises:
            InvalidRequestError: a field breaks the model's rules (nothing was sent).
            SubmitUncertainError: the reply was lost; the gateway may have accepted the job.
            APIError: the gateway refused the submit.
        """
        return await self._send(_contract.GENERATIONS_PATH, GenerationRequest, dict(fields))

    async def submit_edit(self, **fields: Unpack[EditFields]) -> ImageJob:
        """Submit an edit of ``image`` (URLs, base64 or data URLs), optionally with ``mask``.

        See :meth:`submit` for the other arguments and errors.
        """
        return await self._send(_contract.EDITS_PATH, EditRequest, dict(fields))

    async def _send(
        self, path: str, kind: type[GenerationRequest | EditRequest], fields: dict[str, Any]
    ) -> ImageJob:
        options = {name: fields.pop(name, None) for name in CLIENT_ONLY_FIELDS}
        body, n = kind.checked_body(fields)
        return await self._client._submit(
            path,
            body,
            n,
            options["job_timeout"],
            options["extra_body"],
            options["tag"],
        )

    async def generate(self, **fields: Unpack[GenerationFields]) -> ImageResult:
        """Submit a generation and wait for its result (``submit`` then ``await job``).

        Takes the arguments of :meth:`submit`; the wait is bounded by the job's deadline.
        """
        job = await self.submit(**fields)
        return await job

    async def edit(self, **fields: Unpack[EditFields]) -> ImageResult:
        """Submit an edit and wait for its result (``submit_edit`` then ``await job``)."""
        job = await self.submit_edit(**fields)
        return await job

    def attach(
        self,
        key: str,
        *,
        job_timeout: float | None = None,
        n: int | None = None,
        request: Mapping[str, Any] | None = None,
    ) -> ImageJob:
        """A job for a key submitted earlier or elsewhere; the poller picks it up at once.

        Attaching a key this client already tracks, or saw end lately (the last 1,024), returns
        that same job. ``n``, when given, lets ``job.image(i)`` reject indexes out of range at
        once. ``request`` is the body it was submitted with, kept as ``job.request``.

        Raises:
            InvalidRequestError: ``key``, ``n``, ``job_timeout`` or ``request`` is malformed.
            ClientStateError: the client is not open.
        """
        return self._client._attach(key, job_timeout=job_timeout, n=n, request=request)


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
            fleet, in any process or machine. See the README, "Running many workers".
        session: an ``aiohttp.ClientSession`` of yours to send the API calls on (your
            connector, proxy, TLS or tracing settings apply). The client never closes it;
            ``Limits.max_connections`` then does not apply. Default: the client's own.
        gc_freeze: keep the garbage collector's full collections short with very many jobs
            pending (100,000 jobs: loop stalls of a few hundred ms without, under 50 ms with).
            As jobs pile up, every object alive in the process is moved out of the collector's
            view (``gc.freeze()``); the last such client to close calls ``gc.unfreeze()``.
            Process-wide, hence off by default: meanwhile an unreachable reference cycle among
            frozen objects is only reclaimed after that close (objects freed by reference
            counting, most of them, are freed as usual). See README, "Performance".
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
    ) -> None:
        self.credentials = credentials if credentials is not None else Credentials.from_env()
        self.base_url = _check_base_url(
            base_url or Environment.read().base_url or _contract.PRODUCTION_BASE_URL,
            allow_insecure_http=allow_insecure_http,
        )
        self.poll_policy = poll or PollPolicy()
        self.limits = limits or Limits()
        self.timeouts = timeouts or Timeouts()
        self.retry_policy = retry or RetryPolicy()
        self.images = Images(self)
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
            from .fleet._member import FleetMember  # the caller imported .fleet already

            self._fleet = FleetMember(fleet)
            headers["X-Wujie-Member"] = self._fleet.header_token
        self._transport = Transport(
            base_url=self.base_url,
            signer=HeaderSigner(self.credentials),
            limits=self.limits,
            timeouts=self.timeouts,
            retry=self.retry_policy,
            headers=headers,
            session=session,
        )
        self._poller = BatchPoller(self._transport, self.poll_policy, self.limits)
        # One bound method for every job's cancel hook, not one allocated per job.
        self._forget_job = self._poller.forget
        self._gc_freezer = GcFreezer() if gc_freeze else None
        self._poller_task: asyncio.Task[None] | None = None
        self._admission: Admission | None = None
        # Tasks inside submit(), so aclose() can end each of them promptly.
        self._submitting: set[asyncio.Task[Any]] = set()
        self._cancelled_by_close: set[asyncio.Task[Any]] = set()
        self._no_submits = asyncio.Event()
        self._no_submits.set()
        self._closed: asyncio.Event | None = None
        # True from open() until aclose() is done draining: jobs made meanwhile are tracked.
        self._tracking = False
        # Keys a submit got but has not yet tracked: a second submit given one is a duplicate.
        self._claimed_keys: set[str] = set()
        self._unjournaled: list[JournalEntry] = []
        self._submits = 0
        self._submit_errors = 0
        self._journal: SubmitJournal | None = None
        if self._fleet is not None:
            self._journal = self._fleet.journal
        elif journal is not None:
            self._journal = Journal(journal)

    def __repr__(self) -> str:
        return (
            f"WujieClient(app_id={self.credentials.app_id!r}, base_url={self.base_url!r}, "
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
        fleet = self._fleet
        if self._journal is not None and fleet is None:
            await self._journal.open()
        await self._transport.open()
        if fleet is not None:
            try:
                await fleet.start(
                    poller=self._poller,
                    transport=self._transport,
                    poll=self.poll_policy,
                    limits=self.limits,
                )
                await fleet.journal.open()
            except BaseException:
                await self._transport.close()
                raise
        self._admission = Admission(self.limits, pace=fleet.acquire if fleet is not None else None)
        self._poller_task = self._loop.create_task(self._poller.run(), name="wujie-async poller")
        self._poller_task.add_done_callback(self._poller_stopped)
        self._state = "open"
        self._tracking = True
        if self._gc_freezer is not None:
            self._gc_freezer.start()

    def _poller_stopped(self, task: asyncio.Task[None]) -> None:
        """If the poller ever stops while open, settle every job now instead of leaving awaits
        hanging; new submits are refused from then on."""
        if self._state != "open":
            return  # aclose() stopped it
        reason = "it was cancelled" if task.cancelled() else repr(task.exception())
        logger.error("the wujie-async poller stopped: %s", reason)
        self._poller.cancel_all(f"the poller stopped ({reason}): open a new client")

    async def aclose(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """Close the client; every job and submit left is settled, no task or socket left behind.

        Submits still in progress end at once: with ``ClientStateError`` if their request had
        not left, with ``SubmitUncertainError`` if it may have (it may have been charged), or
        by returning their job, already cancelled, if the key had come back (with a journal the
        key is kept: :meth:`resume` picks it up). The transport and the journal are closed
        whatever else fails.

        Args:
            drain: first wait for submits in progress and outstanding jobs to end (up to
                ``timeout``, default ``Timeouts.close``); what is still running then is
                cancelled.
            timeout: bound of the drain, in seconds.
        """
        if self._state == "unopened":
            self._state = "closed"
            return
        if self._state != "open":
            if self._closed is not None:
                await self._closed.wait()  # another task is closing it: return once it is shut
            return
        self._check_loop()
        self._state = "closing"
        self._closed = asyncio.Event()
        if not drain:
            self._tracking = False
        try:
            if drain:
                wait = self.timeouts.close if timeout is None else timeout
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._no_submits.wait()
                        await self._drain_jobs()
            self._tracking = False
            await self._stop_submits()
            self._poller.cancel_all("the client was closed before the job ended")
            await self._stop_poller()
        finally:
            try:
                if self._fleet is not None:
                    await self._fleet.stop_polling()
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
                        self._closed.set()

    async def _drain_jobs(self) -> None:
        jobs = self._poller.jobs()
        if jobs:
            await asyncio.gather(*(job.result() for job in jobs), return_exceptions=True)

    async def _stop_submits(self) -> None:
        """End every submit in progress (see aclose) and wait for them to unwind."""
        current = asyncio.current_task()
        for task in self._submitting:
            if task is not current and not task.done():
                self._cancelled_by_close.add(task)
                task.cancel("the client is closing")
        if self._submitting - {current}:
            # Unwinding awaits nothing slow (journal records are queued, not awaited); bounded
            # all the same.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeouts.close):
                    await self._no_submits.wait()

    async def _stop_poller(self) -> None:
        task, self._poller_task = self._poller_task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])  # never raises the poller's own error: closing goes on
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
    async def _submit(
        self,
        path: str,
        body: dict[str, Any],
        n: int | None,
        job_timeout: float | None,
        extra_body: Mapping[str, Any] | None,
        tag: str | None,
    ) -> ImageJob:
        self._check_open()
        deadline_s = self._job_timeout(job_timeout)
        if extra_body:
            body = {**body, **extra_body}
        task = asyncio.current_task()
        if task is None:
            raise ClientStateError("submit() must run in an asyncio task")
        record = SubmitRecord(self._journal, path, body, tag)
        # Registered before the first await: aclose() cannot miss a submit in progress.
        self._submitting.add(task)
        self._no_submits.clear()
        try:
            return await self._send(record, path, body, n or 1, deadline_s)
        except asyncio.CancelledError:
            if task not in self._cancelled_by_close or task.uncancel() > 0:
                self._submit_errors += 1
                raise  # not (only) our cancel: the caller's own cancellation goes on
            if record.job is not None:
                return record.job  # the key came back: its job, settled as cancelled
            self._submit_errors += 1
            if record.may_have_left:
                raise SubmitUncertainError(
                    "the client was closed while this submit was on the wire: the gateway may "
                    "have accepted (and charged) it",
                    request=body,
                ) from None
            raise ClientStateError(
                "the client was closed before this submit was sent (nothing was sent)"
            ) from None
        except BaseException:
            self._submit_errors += 1
            raise
        finally:
            self._submitting.discard(task)
            self._cancelled_by_close.discard(task)
            if not self._submitting:
                self._no_submits.set()

    async def _send(
        self, record: SubmitRecord, path: str, body: dict[str, Any], n: int, deadline_s: float
    ) -> ImageJob:
        """Admission, the journal record, the request and the job, in that order."""
        admission = self._admission
        if admission is None:
            raise ClientStateError("the client is not open")
        release = await admission.take_in_flight()
        try:
            async with record:
                async with admission.send_slot():
                    await record.intent()
                    record.sending()
                    data = await self._transport.post(path, body, kind="submit")
                key = self._claim_key(data, body)
                try:
                    await record.accepted(key)
                finally:
                    # Whatever happens now, the key gets its job (tracked, or settled at once
                    # if the client is closing): an accepted key is never dropped.
                    record.job = self._new_job(
                        key, deadline_s=deadline_s, request=body, n=n, release=release
                    )
                    release = None  # the job gives the in-flight slot back when it ends
                    self._claimed_keys.discard(key)
        finally:
            if release is not None:
                release()
        if record.unjournaled is not None:
            self._unjournaled.append(record.unjournaled_entry())
            logger.warning(
                "the gateway accepted a submit as %s but the journal could not record the "
                "key (%s); the job is tracked, and uncertain_submits() lists it",
                key,
                record.unjournaled,
            )
        self._submits += 1
        return record.job

    def _claim_key(self, data: Any, body: dict[str, Any]) -> str:
        """The reply's key, if usable and not in use by another job of this client."""
        key = _usable_key(data, body)
        if key in self._claimed_keys or self._poller.get(key) is not None:
            # The gateway charged this submit but gave the key of another job: this job cannot
            # be followed, and overwriting the other would orphan it.
            raise SubmitUncertainError(
                f"the gateway returned a key already in use ({key}): this submit may have "
                "been charged but its job cannot be followed; the earlier job is unaffected",
                request=body,
            ) from ProtocolError("the gateway returned a key already in use", body=key)
        self._claimed_keys.add(key)
        return key

    def _new_job(
        self,
        key: str,
        *,
        deadline_s: float,
        request: dict[str, Any] | None,
        n: int | None,
        first_delay: float | None = None,
        release: Callable[[], None] | None = None,
    ) -> ImageJob:
        """The one job factory (submit, attach, resume): build, hook up, track.

        A job made while the client is closing, or after its poller stopped, is settled at once
        (JobCancelledError) rather than left to wait for a poller that will never ask.
        """
        loop = self._loop
        if loop is None:
            raise ClientStateError("the client is not open")
        job = ImageJob(
            key,
            loop=loop,
            deadline=loop.time() + deadline_s,
            request=request,
            n=n,
            on_cancel=self._forget_job,
        )
        if release is not None:
            job.add_done_callback(lambda _: release())
        if self._journal is not None:
            job.add_done_callback(self._record_outcome)
        if self._taking_jobs():
            self._poller.track(job, first_delay=first_delay)
            if self._gc_freezer is not None:
                self._gc_freezer.job_tracked()
            if self._fleet is not None:
                self._fleet.tracked(key)
                job.add_done_callback(self._fleet_job_ended)
        else:
            job.cancel()
        return job

    def _fleet_job_ended(self, job: ImageJob) -> None:
        if self._fleet is not None:
            self._fleet.ended(job.key)

    def _record_outcome(self, job: ImageJob) -> None:
        journal = self._journal
        if journal is None:
            return
        error = job.exception()
        if error is None:
            journal.record_outcome(job.key, "succeeded")
        elif isinstance(error, JobCancelledError):
            # Only the user's own cancel ends a row; closing, or a stopped poller, leaves the
            # key accepted, so resume() picks it up.
            if self._state == "open" and self._taking_jobs():
                journal.record_outcome(job.key, "cancelled", str(error))
        else:
            journal.record_outcome(job.key, "failed", str(error))

    def _job_timeout(self, job_timeout: float | None) -> float:
        seconds = self.timeouts.job if job_timeout is None else job_timeout
        if not isinstance(seconds, int | float) or not seconds > 0:
            raise InvalidRequestError([("job_timeout", "must be a positive number of seconds")])
        return seconds

    def _attach(
        self,
        key: str,
        *,
        job_timeout: float | None,
        n: int | None,
        request: Mapping[str, Any] | None = None,
    ) -> ImageJob:
        self._check_open()
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise InvalidRequestError(
                [
                    (
                        "key",
                        f"must be a job key: 1 to {MAX_KEY_CHARS} characters, no whitespace "
                        "or control characters",
                    )
                ]
            )
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise InvalidRequestError([("n", "must be a positive int (images in the job)")])
        if request is not None and not isinstance(request, Mapping):
            raise InvalidRequestError([("request", "must be a mapping (the submitted body)")])
        deadline_s = self._job_timeout(job_timeout)
        existing = self._poller.get(key)
        if existing is not None:
            return existing
        return self._new_job(
            key,
            deadline_s=deadline_s,
            request=dict(request) if request is not None else None,
            n=n,
            first_delay=0.0,
        )

    async def resume(self, *, job_timeout: float | None = None) -> list[ImageJob]:
        """Re-attach every journaled key whose job had not ended; returns their jobs.

        Submits whose fate is unknown are never resent: see :meth:`uncertain_submits`. A row
        with an unreadable request is still resumed by its key (a WARNING names it).

        In fleet mode it claims the accepted submits of members whose heartbeat expired
        (``RedisFleet(member_timeout=...)``) and attaches those: each dead member's job goes
        to exactly one member, and nothing is resubmitted.

        Raises:
            ClientStateError: the client has no journal.
            FleetUnavailableError: fleet mode, and Redis cannot be reached.
        """
        self._check_open()
        journal = self._require_journal()
        if self._fleet is not None:
            entries = await self._fleet.claim_dead()
        else:
            entries = await journal.entries("accepted")
        return [
            self._attach(
                entry.job_key,
                job_timeout=job_timeout,
                n=_images_in(entry.request),
                request=entry.request,
            )
            for entry in entries
            if entry.job_key
        ]

    async def uncertain_submits(self) -> list[JournalEntry]:
        """Submits that may have been charged without the journal holding their key.

        These are the journal's ``uncertain`` rows (sent, no reply recorded; they include
        intents of a process that died mid-request), then, in memory for the life of this
        client, submits the gateway accepted whose key the journal could not write (a full
        disk, say): those are listed with ``state="uncertain"`` and their ``job_key``, and
        their jobs are tracked as usual. Check them in the platform's console before sending
        the same prompts again.

        Raises:
            ClientStateError: the client has no journal, or is not open.
        """
        self._check_open()
        rows = await self._require_journal().entries("uncertain")
        return rows + self._unjournaled

    async def journal_entries(self, *states: str, tag: str | None = None) -> list[JournalEntry]:
        """Journal rows in ``states`` (every row if none), with ``tag`` if given; oldest first.

        States: intent, accepted, succeeded, failed, cancelled, rejected, uncertain, unsent.

        Raises:
            ValueError: a state that is not one of those.
            ClientStateError: the client has no journal, or is not open.
        """
        self._check_open()
        return await self._require_journal().entries(*states, tag=tag)

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
        self._unjournaled = [e for e in self._unjournaled if e.id not in forgotten]
        return deleted

    async def find_submit(self, tag: str) -> JournalEntry | None:
        """The journaled submit made with ``tag``, if any (the latest one).

        Lets a queue consumer that is handed a message again (it crashed before acknowledging)
        attach to the key it already has instead of paying for the same request twice.
        """
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
        """
        pending = list(dict.fromkeys(jobs))
        finished: asyncio.Queue[ImageJob] = asyncio.Queue()
        handles = [(job, job.add_done_callback(finished.put_nowait)) for job in pending]
        loop = self._check_open()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            for _ in pending:
                # The deadline wraps each wait only: a timeout scope held across ``yield``
                # would fire inside the caller's loop body instead.
                async with asyncio.timeout_at(deadline):
                    job = await finished.get()
                yield job
        finally:
            for job, handle in handles:
                job.remove_done_callback(handle)

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
        poller = self._poller.counters
        transport = self._transport.counters
        calls, keys = poller.batch_calls, poller.keys_polled
        fleet = self._fleet.stats() if self._fleet is not None else None
        brakes = self._transport.brake_rates
        if fleet is not None:  # calls this process sent as the fleet's leader count too
            calls, keys = calls + fleet.leader_calls, keys + fleet.leader_keys
        stats = ClientStats(
            submits=self._submits,
            submit_errors=self._submit_errors,
            batch_calls=calls,
            batch_errors=poller.batch_errors,
            keys_polled=keys,
            mean_batch_fill=keys / calls if calls else 0.0,
            http_calls=transport.http_calls,
            retries=transport.retries,
            rate_limited=transport.rate_limited,
            jobs_outstanding=len(self._poller),
            jobs_succeeded=poller.succeeded,
            jobs_failed=poller.failed,
            journal_commits=self._journal.commits if self._journal is not None else 0,
            submit_rate_limit=brakes["submit"],
            poll_rate_limit=brakes["poll"],
        )
        if fleet is None:
            return stats
        return dataclasses.replace(
            stats,
            fleet_role=fleet.role,
            fleet_size=fleet.size,
            fleet_rate=fleet.rate,
            fleet_batch_calls=fleet.batch_calls,
            fleet_mean_batch_fill=fleet.keys_polled / fleet.batch_calls
            if fleet.batch_calls
            else 0.0,
        )


def _usable_key(data: Any, body: dict[str, Any]) -> str:
    """The key of a submit reply, checked; anything else is a protocol error (maybe charged)."""
    key = data.get("key") if isinstance(data, dict) else None
    if isinstance(key, str) and _KEY.fullmatch(key):
        return key
    if not isinstance(key, str):
        problem = "no key" if key is None else f"a key that is a {type(key).__name__}"
    elif not key:
        problem = "an empty key"
    elif len(key) > MAX_KEY_CHARS:
        problem = f"a key of {len(key)} characters (over {MAX_KEY_CHARS})"
    else:
        problem = "a key with whitespace or control characters"
    # The gateway said "200" but gave no usable key: the job may exist, unreachable.
    raise SubmitUncertainError(
        f"the submit reply has {problem}: {snippet(str(data)[:1000])}", request=body
    ) from ProtocolError(f"the submit reply has {problem}")


def _images_in(request: Mapping[str, Any]) -> int | None:
    """``n`` of a journaled request, if it is a usable count."""
    n = request.get("n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None
