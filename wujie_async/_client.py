"""WujieClient: lifecycle, submits, attach, as_completed and stats."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from . import _contract
from ._auth import Credentials, HeaderSigner
from ._config import Limits, PollPolicy, RetryPolicy, Timeouts
from ._errors import (
    ClientStateError,
    InvalidRequestError,
    JobCancelledError,
    ProtocolError,
    SubmitUncertainError,
    WujieError,
)
from ._jobs import ImageJob
from ._journal import ALL_STATES, Journal, JournalEntry
from ._models import EditRequest, GenerationRequest, ImageResult, SubmitData
from ._poller import BatchPoller
from ._ratelimit import Pacer
from ._transport import Transport

_State = Literal["unopened", "open", "closed"]
logger = logging.getLogger("wujie_async")


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

    async def submit(
        self,
        *,
        prompt: str,
        model: str,
        n: int | None = None,
        quality: str | None = None,
        size: str | None = None,
        background: str | None = None,
        moderation: str | None = None,
        output_format: str | None = None,
        output_compression: int | None = None,
        style: str | None = None,
        job_timeout: float | None = None,
        extra_body: Mapping[str, Any] | None = None,
        tag: str | None = None,
    ) -> ImageJob:
        """Submit a generation; returns its job as soon as the gateway gives a key.

        Fields are those of API.md section 1; None leaves a field out (the gateway's default).
        ``job_timeout`` is the job's deadline in seconds (default ``Timeouts.job``);
        ``extra_body`` adds fields this client does not know yet, sent as given. ``tag`` is
        your own id for this submit (a queue message id, say): never sent, but kept in the
        journal so :meth:`WujieClient.find_submit` can tell whether it was already sent.

        Raises:
            InvalidRequestError: a field breaks the model's rules (nothing was sent).
            SubmitUncertainError: the reply was lost; the gateway may have accepted the job.
            APIError: the gateway refused the submit.
        """
        fields = {
            "prompt": prompt,
            "model": model,
            "n": n,
            "quality": quality,
            "size": size,
            "background": background,
            "moderation": moderation,
            "output_format": output_format,
            "output_compression": output_compression,
            "style": style,
        }
        request = GenerationRequest.build(fields)
        return await self._client._submit(
            _contract.GENERATIONS_PATH, request.body(), request.n, job_timeout, extra_body, tag
        )

    async def submit_edit(
        self,
        *,
        prompt: str,
        model: str,
        image: list[str],
        mask: str | None = None,
        n: int | None = None,
        quality: str | None = None,
        size: str | None = None,
        background: str | None = None,
        moderation: str | None = None,
        output_format: str | None = None,
        output_compression: int | None = None,
        style: str | None = None,
        job_timeout: float | None = None,
        extra_body: Mapping[str, Any] | None = None,
        tag: str | None = None,
    ) -> ImageJob:
        """Submit an edit of ``image`` (URLs, base64 or data URLs), optionally with ``mask``.

        See :meth:`submit` for the other arguments and errors.
        """
        fields = {
            "prompt": prompt,
            "model": model,
            "image": image,
            "mask": mask,
            "n": n,
            "quality": quality,
            "size": size,
            "background": background,
            "moderation": moderation,
            "output_format": output_format,
            "output_compression": output_compression,
            "style": style,
        }
        request = EditRequest.build(fields)
        return await self._client._submit(
            _contract.EDITS_PATH, request.body(), request.n, job_timeout, extra_body, tag
        )

    async def generate(self, **fields: Any) -> ImageResult:
        """Submit a generation and wait for its result (``submit`` then ``await job``).

        Takes the arguments of :meth:`submit`; the wait is bounded by the job's deadline.
        """
        job = await self.submit(**fields)
        return await job

    async def edit(self, **fields: Any) -> ImageResult:
        """Submit an edit and wait for its result (``submit_edit`` then ``await job``)."""
        job = await self.submit_edit(**fields)
        return await job

    def attach(
        self, key: str, *, job_timeout: float | None = None, n: int | None = None
    ) -> ImageJob:
        """A job for a key submitted earlier or elsewhere; the poller picks it up at once.

        Attaching a key this client already tracks, or saw end lately (the last 1,024), returns
        that same job. ``n``, when given, lets ``job.image(i)`` reject indexes out of range at
        once.
        """
        return self._client._attach(key, job_timeout=job_timeout, n=n)


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
    ) -> None:
        self.credentials = credentials if credentials is not None else Credentials.from_env()
        self.base_url = _check_base_url(
            base_url or os.environ.get("WUJIE_BASE_URL") or _contract.PRODUCTION_BASE_URL,
            allow_insecure_http=allow_insecure_http,
        )
        self.poll_policy = poll or PollPolicy()
        self.limits = limits or Limits()
        self.timeouts = timeouts or Timeouts()
        self.retry_policy = retry or RetryPolicy()
        self.images = Images(self)
        self._state: _State = "unopened"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport = Transport(
            base_url=self.base_url,
            signer=HeaderSigner(self.credentials),
            limits=self.limits,
            timeouts=self.timeouts,
            retry=self.retry_policy,
        )
        self._poller = BatchPoller(self._transport, self.poll_policy, self.limits)
        # One bound method for every job's cancel hook, not one allocated per job.
        self._forget_job = self._poller.forget
        self._poller_task: asyncio.Task[None] | None = None
        self._submit_slots: asyncio.Semaphore | None = None
        self._in_flight_slots: asyncio.Semaphore | None = None
        self._submit_pacer: Pacer | None = None
        self._submits = 0
        self._submit_errors = 0
        self._journal = Journal(journal) if journal is not None else None

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
        """Open the HTTP session and start the poller (``async with`` does this)."""
        if self._state != "unopened":
            raise ClientStateError(f"the client is {self._state}; a client opens once")
        self._loop = asyncio.get_running_loop()
        if self._journal is not None:
            await self._journal.open()
        await self._transport.open()
        self._submit_slots = asyncio.Semaphore(self.limits.max_concurrent_submits)
        if self.limits.max_in_flight is not None:
            self._in_flight_slots = asyncio.Semaphore(self.limits.max_in_flight)
        if self.limits.max_submits_per_second is not None:
            self._submit_pacer = Pacer(self.limits.max_submits_per_second)
        self._poller_task = self._loop.create_task(self._poller.run(), name="wujie-async poller")
        self._poller_task.add_done_callback(self._poller_stopped)
        self._state = "open"

    def _poller_stopped(self, task: asyncio.Task[None]) -> None:
        """If the poller ever dies, settle every job now instead of leaving awaits hanging."""
        if task.cancelled():
            return
        error = task.exception()
        logger.error("the wujie-async poller stopped: %r", error)
        self._poller.cancel_all(f"the poller stopped: {error!r}")

    async def aclose(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """Close the client; every job left is settled and no task or socket is left behind.

        Args:
            drain: first wait for outstanding jobs to end (up to ``timeout``, default
                ``Timeouts.close``); jobs still running then are cancelled.
            timeout: bound of the drain, in seconds.
        """
        if self._state != "open":
            self._state = "closed"
            return
        self._check_loop()
        self._state = "closed"
        jobs = self._poller.jobs()
        if drain and jobs:
            wait = self.timeouts.close if timeout is None else timeout
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await asyncio.gather(
                        *(asyncio.shield(job._future) for job in jobs), return_exceptions=True
                    )
        self._poller.cancel_all("the client was closed before the job ended")
        if self._poller_task is not None:
            self._poller_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller_task
            self._poller_task = None
        await self._transport.close()
        if self._journal is not None:
            await self._journal.close()

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
        assert self._loop is not None
        return self._loop

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
        loop = self._check_open()
        deadline_s = self._job_timeout(job_timeout)
        if extra_body:
            body = {**body, **extra_body}
        assert self._submit_slots is not None
        if self._in_flight_slots is not None:
            await self._in_flight_slots.acquire()
        journal = self._journal
        row_id: int | None = None
        key: str | None = None
        try:
            async with self._submit_slots:
                if self._submit_pacer is not None:
                    await self._submit_pacer.wait()
                if journal is not None:
                    row_id = await journal.record_intent(path, body, tag)
                data = await self._transport.post(path, body, kind="submit")
            key = self._parse_key(data, body)
            if journal is not None and row_id is not None:
                await journal.record_accepted(row_id, key)
        except BaseException as exc:
            self._submit_errors += 1
            if self._in_flight_slots is not None:
                self._in_flight_slots.release()
            if journal is not None and row_id is not None:
                if key is not None:
                    # Interrupted after the gateway gave the key: keep it, resume finds it.
                    journal.record_accepted_later(row_id, key)
                else:
                    # A definite refusal cost nothing; anything else (a lost reply, a cancel
                    # while the request was out) may have been charged: uncertain.
                    refused = isinstance(exc, WujieError) and not isinstance(
                        exc, SubmitUncertainError
                    )
                    state = "rejected" if refused else "uncertain"
                    journal.record_unsent(row_id, state, repr(exc)[:500])
            raise
        self._submits += 1
        job = ImageJob(
            key,
            loop=loop,
            deadline=loop.time() + deadline_s,
            request=body,
            n=n or 1,
            on_cancel=self._forget_job,
        )
        if self._in_flight_slots is not None:
            slots = self._in_flight_slots
            job.add_done_callback(lambda _: slots.release())
        if journal is not None:
            job.add_done_callback(self._record_outcome)
        self._poller.track(job)
        return job

    def _record_outcome(self, job: ImageJob) -> None:
        assert self._journal is not None
        error = job.exception()
        if error is None:
            self._journal.record_outcome(job.key, "succeeded")
        elif isinstance(error, JobCancelledError):
            if self._state != "closed":  # closing leaves the key resumable
                self._journal.record_outcome(job.key, "cancelled", str(error))
        else:
            self._journal.record_outcome(job.key, "failed", str(error))

    @staticmethod
    def _parse_key(data: Any, body: dict[str, Any]) -> str:
        key = data.get("key") if isinstance(data, dict) else None
        if isinstance(key, str) and key.strip():
            return key  # the common case; the model below explains anything else
        try:
            return SubmitData.model_validate(data).key
        except ValueError as exc:
            # The gateway said "200" but gave no usable key: the job may exist, unreachable.
            raise SubmitUncertainError(
                f"the submit reply has no usable key: {str(data)[:200]}", request=body
            ) from ProtocolError(str(exc)[:300])

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
        request: dict[str, Any] | None = None,
    ) -> ImageJob:
        loop = self._check_open()
        if not isinstance(key, str) or not key.strip():
            raise InvalidRequestError([("key", "must be a non-empty job key")])
        existing = self._poller.get(key)
        if existing is not None:
            return existing
        deadline_s = self._job_timeout(job_timeout)
        job = ImageJob(
            key,
            loop=loop,
            deadline=loop.time() + deadline_s,
            request=request,
            n=n,
            on_cancel=self._forget_job,
        )
        if self._journal is not None:
            job.add_done_callback(self._record_outcome)
        self._poller.track(job, first_delay=0.0)
        return job

    async def resume(self, *, job_timeout: float | None = None) -> list[ImageJob]:
        """Re-attach every journaled key whose job had not ended; returns their jobs.

        Submits whose fate is unknown are never resent: see :meth:`uncertain_submits`.

        Raises:
            ClientStateError: the client has no journal.
        """
        self._check_open()
        journal = self._require_journal()
        return [
            self._attach(
                entry.job_key,
                job_timeout=job_timeout,
                n=entry.request.get("n") or 1,
                request=entry.request,
            )
            for entry in await journal.entries("accepted")
            if entry.job_key
        ]

    async def uncertain_submits(self) -> list[JournalEntry]:
        """Submits that were sent but got no recorded reply: they may have been charged.

        They include intents of a process that died mid-request. Check them in the platform's
        console before sending the same prompts again.
        """
        self._check_open()
        return await self._require_journal().entries("uncertain")

    async def find_submit(self, tag: str) -> JournalEntry | None:
        """The journaled submit made with ``tag``, if any (the latest one).

        Lets a queue consumer that is handed a message again (it crashed before acknowledging)
        attach to the key it already has instead of paying for the same request twice.
        """
        self._check_open()
        found = await self._require_journal().entries(*ALL_STATES, tag=tag)
        return found[-1] if found else None

    def _require_journal(self) -> Journal:
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

    def jobs(self) -> list[ImageJob]:
        """Every job being tracked now."""
        return self._poller.jobs()

    @property
    def stats(self) -> ClientStats:
        """A snapshot of what the client has done."""
        poller = self._poller.counters
        transport = self._transport.counters
        calls = poller.batch_calls
        return ClientStats(
            submits=self._submits,
            submit_errors=self._submit_errors,
            batch_calls=calls,
            batch_errors=poller.batch_errors,
            keys_polled=poller.keys_polled,
            mean_batch_fill=poller.keys_polled / calls if calls else 0.0,
            http_calls=transport.http_calls,
            retries=transport.retries,
            rate_limited=transport.rate_limited,
            jobs_outstanding=len(self._poller),
            jobs_succeeded=poller.succeeded,
            jobs_failed=poller.failed,
        )
