"""HTTP: one aiohttp session per client, signed POSTs, error mapping, retries.

Every lower-layer failure is translated here, once, into the ``WujieError`` tree. What is
retried depends on what the call is and on what failed (``_failures`` says which; see the
docs, "Limits, retries and the 429 brake"); a 401 is retried once, re-signed (the cached
signature may have gone stale).

A submit whose reply never came cannot be resent: our own pool (``_connections``) avoids its
likeliest harmless cause before the write. Replies are decoded by ``_body_decoding``, not by
aiohttp.

Each kind of call has its own adaptive 429 brake (``_ratelimit.AdaptiveLimiter``), so refused
submits never slow the polls, nor the reverse.

What a reply means (the envelope's ``data``, or the typed error its status and body say) is
``_envelopes``'s to read; a 4xx whose body cannot be read is read by its status alone.

Redirects are never followed: the signature covers only the app id and a timestamp, so a
signed request sent on to wherever a ``Location`` points could be replayed there (and a 307
loop would pay once per hop).

Secrets and exception chains: aiohttp's ``ClientResponseError`` and every ``ClientResponse``
carry ``request_info``, whose headers hold the signed Authorization header, and a traceback
keeps the locals of each frame it passes. ``raise ... from None`` is not enough: it hides the
cause from the printout but keeps it in ``__context__``. So one exchange
(``Transport._exchange``) *returns* its failure as a ``WujieError`` built from the lower-level
error's text (the OS reason such as "Connection refused" is kept), and the caller raises it
outside any ``except`` block: no aiohttp exception, response or header is reachable from what
we raise, and the header is never a local of a frame that a traceback keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import anyio
import backoff

from ._auth import HeaderSigner
from ._body_decoding import ACCEPT_ENCODING, BodyDecoder, body_decoder, content_codings
from ._config import Limits, RetryPolicy, Timeouts
from ._connections import (
    ANY_CONNECTION,
    CONNECTING,
    IDLE_CONNECTION_SECONDS,
    SUBMIT_CONNECTION,
    PoolConnector,
    TimedResolver,
)
from ._envelopes import FIX_BASE_URL, decode_reply, redirect_error, refused_unread
from ._errors import (
    APIError,
    AuthenticationError,
    ClientStateError,
    RateLimitedError,
    ResponseTooLargeError,
    TransportError,
    WujieError,
)
from ._failures import (
    CALL_KINDS,
    CallKind,
    failure_reason,
    give_up,
    request_unwritten,
    retryable,
    said,
    through_aiohttp,
    unverified_certificate,
)
from ._ratelimit import AdaptiveLimiter
from ._request_body import RequestBody
from ._slices import OFF_LOOP_CHARS, json_pieces, text_chars
from ._stats import TransportCounters
from ._telemetry import Telemetry, brake_changed

if TYPE_CHECKING:
    from ._otel import BatchTrace, JobTrace, Recorder

logger = logging.getLogger("wujie_async")

T = TypeVar("T")
_USER_AGENT = "wujie-async"
# The connection rule of each request (see _connections), bound by an assignment: CPython
# compiles a method call on a name that an import bound as an attribute load (a bound method
# made on each call), and _exchange sets and resets it on every request.
_CONNECTING = CONNECTING


# One encoder for every request body: json.dumps with any option builds a new JSONEncoder per
# call (a microsecond of each submit and poll). It holds no state between calls.
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


# What one exchange brought back, (status, headers, body): nothing of aiohttp's objects is
# kept. A plain tuple: one a request, built with no call of its own.
_Reply = tuple[int, Mapping[str, str], bytes]


class Transport:
    """Signed JSON POSTs to the gateway, with retries and typed errors."""

    def __init__(
        self,
        *,
        base_url: str,
        signer: HeaderSigner,
        limits: Limits,
        timeouts: Timeouts,
        retry: RetryPolicy,
        headers: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # The client's telemetry (spans and metrics of each attempt; a fleet member calls its
        # ``fleet_role_changed`` hook through here).
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        # Sent with every request: as our own session's defaults (aiohttp copies those in one
        # C call, where headers given with a request are merged one by one in Python); with
        # each request on a caller's session, whose defaults are the caller's.
        self._fixed_headers = {
            "User-Agent": _USER_AGENT,
            "Content-Type": "application/json",
            **(headers or {}),
            "Accept-Encoding": ACCEPT_ENCODING,  # what BodyDecoder reads
        }
        # What each request adds to the signed Authorization header (set at open()).
        self._request_headers: Mapping[str, str] = self._fixed_headers
        # A caller's session is used as given and never closed here; ours is made at open().
        self._given_session = session
        # Told of every 429 (kind of call, Retry-After if any): a fleet pauses its members.
        self.on_rate_limited: Callable[[CallKind, float | None], None] | None = None
        self._signer = signer
        self._limits = limits
        self._timeouts = timeouts
        self._retry = retry
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=timeouts.request, sock_connect=timeouts.connect)
        self.counters = TransportCounters()
        # One 429 brake per kind of call: the gateway may limit submits and batch queries
        # separately, and a burst of refused submits must not slow the polls (or the reverse).
        self._brakes: dict[CallKind, AdaptiveLimiter] = {
            kind: AdaptiveLimiter() for kind in CALL_KINDS
        }

    def __repr__(self) -> str:
        return f"Transport(base_url={self.base_url!r})"

    @property
    def brake_rates(self) -> dict[CallKind, float | None]:
        """The 429 brake's rate per kind of call (requests/s), None where no brake is on."""
        return {kind: brake.rate for kind, brake in self._brakes.items()}

    def brake_free_in(self, kind: CallKind) -> float:
        """Seconds until the 429 brake of ``kind`` lets a call go (0.0: at once)."""
        return self._brakes[kind].free_in()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The open aiohttp session (also used to download images)."""
        assert self._session is not None, "transport is not open"
        return self._session

    async def open(self) -> None:
        """Create the pooled session (or take the caller's)."""
        if self._given_session is not None:
            if self._given_session.closed:
                raise ClientStateError("the aiohttp session given to the client is closed")
            self._session = self._given_session
            self._request_headers = self._fixed_headers
            return
        # Idle connections are dropped after 4 s (a request on a connection the server has
        # closed fails); a submit takes one idle at most SUBMIT_IDLE_SECONDS (PoolConnector).
        connector = PoolConnector(
            limit=self._limits.max_connections,
            keepalive_timeout=IDLE_CONNECTION_SECONDS,
            resolver=TimedResolver(self._timeouts.connect),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            raise_for_status=False,
            headers=self._fixed_headers,
        )
        self._request_headers = {}

    async def close(self) -> None:
        """Close our session and its connections (a caller's session stays open)."""
        session, self._session = self._session, None
        if session is not None and session is not self._given_session:
            await session.close()

    def post(
        self,
        path: str,
        body: Any,
        *,
        kind: CallKind,
        parent: JobTrace | BatchTrace | None = None,
        on_wire: Callable[[bool], None] | None = None,
        before_retry: Callable[[], Awaitable[None]] | None = None,
    ) -> Coroutine[Any, Any, Any]:
        """POST ``body`` as JSON to ``path``; the envelope's ``data``, retried as ``kind`` allows.

        Returns the call's coroutine, to be awaited at once (a plain call that encodes the
        body: one coroutine less per request than an ``async def`` awaiting the retry loop).

        Args:
            path: the endpoint, after the base URL.
            body: the JSON body.
            kind: what the call is (submits and polls are retried differently).
            parent: the job or batch call the attempts' spans belong to (telemetry).
            on_wire: told ``True`` just before each attempt's request may leave, and ``False``
                when an attempt was refused outright and the next one waits (a submit waiting
                to retry after a 429 has nothing on the wire: stopping it costs nothing). A
                batch query on the client's own session is told ``True`` again once its
                connection is taken, just before its request is written: after any wait for a
                connection slot and any connect (so its call is dated from then).
            before_retry: awaited after each retry's wait, before it is sent (a submit takes
                a fresh slot of the submit rate: a resend counts against it too).

        Raises:
            WujieError: the typed error of the last attempt; for a submit whose fate is unknown,
                ``SubmitUncertainError`` (its ``__cause__`` says what happened).
        """
        if kind == "submit" and text_chars(body) > OFF_LOOP_CHARS:
            # An edit's inline images: encoded on a worker thread, not on the loop.
            return self._post_large(path, body, kind, parent, on_wire, before_retry)
        payload = _JSON_ENCODER.encode(body).encode()
        keys = len(body) if kind == "poll" and isinstance(body, list) else None
        # A partial, not a lambda: a closure over these seven names would make a cell for each
        # on every call (objects the garbage collector then tracks, per request).
        return self._with_retries(
            functools.partial(self._post_once, path, payload, kind, keys, parent, on_wire),
            kind,
            body,
            on_wire,
            before_retry,
        )

    async def _post_large(
        self,
        path: str,
        body: Any,
        kind: CallKind,
        parent: JobTrace | BatchTrace | None,
        on_wire: Callable[[bool], None] | None,
        before_retry: Callable[[], Awaitable[None]] | None,
    ) -> Any:
        """``post`` of a body whose JSON is encoded on a worker thread (megabytes of it)."""
        payload = await anyio.to_thread.run_sync(json_pieces, body, abandon_on_cancel=True)
        return await self._with_retries(
            functools.partial(self._post_once, path, payload, kind, None, parent, on_wire),
            kind,
            body,
            on_wire,
            before_retry,
        )

    # --- retries ---------------------------------------------------------------------------
    # The loop is kept by hand rather than written as ``backoff.on_exception``: whether to
    # retry depends on the call's kind and on the attempt before (a second 401 in a row is not
    # a stale signature), a retry re-signs, the wait honours Retry-After above the jittered
    # backoff, and giving up on a submit turns some errors into SubmitUncertainError. The
    # decorator takes fixed callables and re-raises as is, so all of that would become
    # closures sharing state around it. The pieces below each do one of those things.

    async def _with_retries(
        self,
        attempt: Callable[[int], Awaitable[T]],
        kind: CallKind,
        body: Any,
        on_wire: Callable[[bool], None] | None,
        before_retry: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        waits: Iterator[float | None] | None = None  # made on the first failure only
        # The retry budget is measured on the loop's clock, the one the waits below sleep on
        # (time.monotonic would not see a test's fast-forwarded loop, nor agree with uvloop's).
        clock = asyncio.get_running_loop().time
        started = clock()
        tries = 0
        while True:
            tries += 1
            try:
                return await attempt(tries)
            except WujieError as exc:
                if isinstance(exc, AuthenticationError):
                    self._signer.invalidate()
                elapsed = clock() - started
                delay: float | None = None  # None: given up
                if self._should_retry(exc, kind, tries, elapsed):
                    if waits is None:
                        waits = self._backoff_waits()
                    delay, told = self._next_delay(waits, exc)
                    left = self._retry.max_elapsed - elapsed
                    if delay > left:
                        # No try after max_elapsed: a backoff is cut to the time left (the
                        # last try comes as it runs out); the server's Retry-After is not (a
                        # try sooner is refused again): given up now. Retry-After 30 with
                        # max_elapsed 5 was tried again at 10 s (max_wait).
                        delay = None if told else left
                if delay is None:
                    give_up(exc, kind, body)
                logger.debug("retrying %s in %.2fs after %s", kind, delay, type(exc).__name__)
                if on_wire is not None:
                    on_wire(False)  # retried: refused outright (retryable), nothing accepted
                await asyncio.sleep(delay)
                if before_retry is not None:
                    due = clock()
                    await before_retry()
                    now = clock()
                    if now - due > _PACED and now - started > self._retry.max_elapsed:
                        # The submit pacer made it wait past max_elapsed: no try then either.
                        # (Not its few microseconds after a wait cut to the time left: that
                        # last try is the policy's.)
                        give_up(exc, kind, body)
                self.counters.retries += 1  # after the wait: a close during it sends none

    def _should_retry(self, exc: WujieError, kind: CallKind, tries: int, elapsed: float) -> bool:
        """Whether the call gets another attempt, within the policy's tries and time."""
        if tries >= self._retry.max_attempts or elapsed >= self._retry.max_elapsed:
            return False
        # A 401 is retried once, re-signed, in case the cached signature went stale; a second
        # one in a row means the credentials are wrong.
        if isinstance(exc, AuthenticationError) and tries >= 2:
            return False
        return retryable(exc, kind)

    def _backoff_waits(self) -> Iterator[float | None]:
        waits = backoff.expo(factor=self._retry.initial_wait, max_value=self._retry.max_wait)
        next(waits)  # backoff's generators are primed with one None
        return waits

    def _next_delay(self, waits: Iterator[float | None], exc: WujieError) -> tuple[float, bool]:
        """The next jittered backoff, or the server's Retry-After when that is longer; and
        whether the server's word set it (a retry sooner would be refused again)."""
        delay = backoff.full_jitter(next(waits) or 0.0)
        if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
            told = min(exc.retry_after, self._retry.max_wait)
            if told >= delay:
                return told, True
        return delay, False

    # --- one attempt ---------------------------------------------------------------------------
    def _post_once(
        self,
        path: str,
        payload: bytes | list[bytes],
        kind: CallKind,
        keys: int | None,
        parent: JobTrace | BatchTrace | None,
        on_wire: Callable[[bool], None] | None,
        attempt: int,
    ) -> Awaitable[Any]:
        """One attempt, as the coroutine to await at once. The hot path (the 429 brake off, no
        telemetry, no DEBUG log) is a plain call that returns the exchange's own coroutine:
        no coroutine of its own, no wait for the brake."""
        sent_at = self._brakes[kind].free_now()
        if sent_at is None or self.telemetry.otel is not None or logger.isEnabledFor(logging.DEBUG):
            return self._post_once_waited(path, payload, kind, keys, parent, on_wire, attempt)
        if on_wire is not None:
            on_wire(True)
        self.counters.http_calls += 1
        return self._send(path, payload, kind, sent_at, on_wire)

    async def _post_once_waited(
        self,
        path: str,
        payload: bytes | list[bytes],
        kind: CallKind,
        keys: int | None,
        parent: JobTrace | BatchTrace | None,
        on_wire: Callable[[bool], None] | None,
        attempt: int,
    ) -> Any:
        """One attempt that waits for the 429 brake's slot, or is observed (a span, metrics,
        the DEBUG line)."""
        sent_at = await self._brakes[kind].acquire()
        if on_wire is not None:
            on_wire(True)
        self.counters.http_calls += 1
        otel = self.telemetry.otel
        if otel is None and not logger.isEnabledFor(logging.DEBUG):
            return await self._send(path, payload, kind, sent_at, on_wire)
        # Observed: timed from here (after the brake's wait), recorded once it is over.
        start_ns, started = time.time_ns(), time.perf_counter()
        try:
            # Recorded here: an HTTP instrumentation of the user's is told to leave it alone.
            with otel.own_http() if otel is not None else contextlib.nullcontext():
                data = await self._send(path, payload, kind, sent_at, on_wire)
        except BaseException as exc:  # re-raised as is: a cancel on the wire is recorded too
            self._observe(otel, path, attempt, keys, parent, exc, start_ns, started)
            raise
        self._observe(otel, path, attempt, keys, parent, None, start_ns, started)
        return data

    async def _send(
        self,
        path: str,
        payload: bytes | list[bytes],
        kind: CallKind,
        sent_at: float,
        on_wire: Callable[[bool], None] | None,
    ) -> Any:
        brake = self._brakes[kind]
        url = self.base_url + path
        reply = await self._exchange(url, payload, kind, on_wire)
        if isinstance(reply, WujieError):
            if isinstance(reply, RateLimitedError):  # a 429 whose body could not be read
                self._rate_limited(kind, sent_at, reply.retry_after)
            raise reply  # outside any except block: no aiohttp error rides in __context__
        problem: WujieError | None = None
        try:
            data = decode_reply(reply[0], reply[2], reply[1], url=url)
        except WujieError as exc:
            problem = exc
        if problem is not None:
            # The body may quote this client's signature (a proxy echoing the request's
            # headers): no frame the error's traceback keeps holds it, neither this one nor
            # decode_reply's (the error is raised afresh from here). The error's own text
            # went through snippet().
            del reply
            if isinstance(problem, RateLimitedError):
                self._rate_limited(kind, sent_at, problem.retry_after)
            raise problem.with_traceback(None)
        lifted = brake.succeeded()
        if lifted is not None:
            brake_changed(kind, lifted, None)
        return data

    def _rate_limited(self, kind: CallKind, sent_at: float, retry_after: float | None) -> None:
        """A 429: the kind's brake slows down, and whoever listens is told."""
        self.counters.rate_limited += 1
        brake = self._brakes[kind]
        before = brake.rate
        brake.rate_limited(sent_at)
        if brake.rate != before:
            brake_changed(kind, before, brake.rate)
        if self.on_rate_limited is not None:
            self.on_rate_limited(kind, retry_after)

    @staticmethod
    def _observe(
        otel: Recorder | None,
        path: str,
        attempt: int,
        keys: int | None,
        parent: JobTrace | BatchTrace | None,
        error: BaseException | None,
        start_ns: int,
        started: float,
    ) -> None:
        """The DEBUG line and the span and metrics of one attempt (no body, no header)."""
        seconds = time.perf_counter() - started
        status: int | None = 200 if error is None else getattr(error, "http_status", None)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "POST %s -> %s in %.1f ms%s (try %d)%s",
                path,
                status if status is not None else "no reply",
                seconds * 1e3,
                f", {keys} key(s)" if keys is not None else "",
                attempt,
                "" if error is None else said(error),
            )
        if otel is not None:
            otel.http_exchange(
                path,
                parent=parent,
                keys=keys,
                attempt=attempt,
                status=status,
                error=error,
                start_ns=start_ns,
                seconds=seconds,
            )

    def _heard_keep_alive(self, header: str) -> None:
        """Tell our pool how long the gateway says it keeps an idle connection open."""
        connector = self._session.connector if self._session is not None else None
        if isinstance(connector, PoolConnector):
            connector.heard_keep_alive(header)

    async def _exchange(
        self,
        url: str,
        payload: bytes | list[bytes],
        kind: CallKind,
        on_wire: Callable[[bool], None] | None,
    ) -> _Reply | WujieError:
        """One signed POST. A failure is returned as a clean error, not raised (see module doc).

        The Authorization header is built in the call expression, so no local of this frame
        holds it, nor the response (whose ``request_info`` does). A cancellation on the wire
        is raised afresh from here, as for errors: aiohttp's frames under it hold the header
        in their locals (``headers``), and a traceback keeps those frames.
        """
        session = self._session
        assert session is not None, "transport is not open"
        cancelled: asyncio.CancelledError | None = None
        unexpected: Exception | None = None
        # Told to our connector (in this task: the request's connection is taken in it). A
        # batch call is dated from when its connection is taken: the request is written next.
        connecting = _CONNECTING.set(
            SUBMIT_CONNECTION
            if kind == "submit"
            else ANY_CONNECTION
            if on_wire is None
            else (None, on_wire)
        )
        # Made afresh for each attempt; it says whether any of the body was handed to the
        # connection: until then, nothing can have reached the gateway, whatever is raised.
        sent = RequestBody(payload)
        try:
            # Awaited, not entered (``async with``): its enter and exit are four coroutines
            # more per request; the reply is released below as its exit would.
            reply = await session.post(
                url,
                data=sent,
                headers={
                    "Authorization": self._signer.cached() or await self._signer.header(),
                    **self._request_headers,
                },
                allow_redirects=False,
                timeout=self._timeout,
                # Whatever the session says (the caller's own may say otherwise): a refusal is
                # read, not raised (a 401 was "maybe charged"), and a gzipped reply unzipped,
                # by _read_capped (read as is, every submit's reply was not JSON: paid jobs
                # without keys; unzipped by aiohttp, a body labelled gzip but sent plain was
                # lost).
                raise_for_status=False,
                auto_decompress=False,
            )
            try:
                status, headers = reply.status, reply.headers
                promised = headers.get("Keep-Alive")
                if promised is not None:
                    self._heard_keep_alive(promised)
                if 300 <= status < 400:
                    reply.close()
                    return redirect_error(url, status, headers.get("Location", ""))
                if (
                    "Content-Encoding" not in headers
                    and "Transfer-Encoding" not in headers
                    and (declared := reply.content_length) is not None
                    and declared <= self._limits.max_response_bytes
                ):
                    # The common reply (what _read_capped reads first): neither compressed
                    # nor chunked, its declared length within the cap; read without a
                    # coroutine of ours. (read() waits for the request's writer too.)
                    return status, headers, await reply.read()
                body = await self._read_capped(reply)
                await reply.wait_for_close()  # the request's writer, as an exit waits for it
                if isinstance(body, WujieError):
                    if 400 <= status < 500:
                        why = body.message if isinstance(body, APIError) else str(body)
                        return refused_unread(status, headers, url, why)
                    return body
                return status, headers, body
            except (TimeoutError, aiohttp.ClientError) as exc:
                if not 400 <= status < 500:
                    raise  # a reply lost (see below): the server may have done the work
                # A 4xx's status line came whole: the request was refused, whatever became of
                # the body (cut short, too slow). Read as a lost reply, a submit so refused was
                # "may have been charged" (never resent), a 429 among them.
                why = failure_reason(exc)
                if isinstance(exc, TimeoutError) and not str(exc):
                    why = f"not whole within {self._timeouts.request} s (Timeouts.request)"
                return refused_unread(status, headers, url, why)
            finally:
                reply.release()  # the connection back to the pool (or closed, if cut short)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            return TransportError(
                f"could not connect to {self.base_url}: {failure_reason(exc)}; "
                f"{FIX_BASE_URL} and the network",
                reached_server=False,
                # A certificate not verified is refused the same way at every handshake (it
                # was tried RetryPolicy.max_attempts times): nothing was sent, so it is the
                # connect failure it is, only not retried.
                lasting=unverified_certificate(exc) is not None,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            if request_unwritten(exc):
                return TransportError(
                    f"the connection to {self.base_url} closed before the request was written "
                    "(a connection the server had closed, without saying so, after its last "
                    "reply): nothing reached the gateway",
                    reached_server=False,
                )
            reason = failure_reason(exc)
            if isinstance(exc, TimeoutError) and not str(exc):
                reason = f"no reply within {self._timeouts.request} s (Timeouts.request)"
            if not sent.handed:
                return TransportError(
                    f"no reply from {url}: {reason}, before any of the request's body was "
                    "written: nothing reached the gateway",
                    reached_server=False,
                )
            return TransportError(f"no complete reply from {url}: {reason}", reached_server=True)
        except asyncio.CancelledError as exc:
            # Same message (anyio tells its own cancels by it); no traceback into aiohttp.
            cancelled = asyncio.CancelledError(*exc.args)
            reply = None  # its request_info holds the header: not kept by this frame
            _unsent_unless_handed(sent, on_wire)
        except Exception as exc:
            # Raised before any of the body was handed to the connection (a warning turned
            # into an error, a trace hook's bug, the signer's): the request never left, and a
            # submit so ended is not "may have been charged" (never resent).
            _unsent_unless_handed(sent, on_wire)
            # Not a failed exchange: a session closed under the client (the caller's own, its
            # app's shutdown closing it first), or a bug. Raised from here either way, never
            # with aiohttp's frames, whose locals hold the header.
            if session.closed:
                closed = ClientStateError(
                    "the aiohttp session given to the client was closed: nothing was sent "
                    "(close the client before the session)"
                )
                closed.systemic = True
                return closed
            reply = None  # its request_info holds the header: not kept by this frame
            if not through_aiohttp(exc.__traceback__):
                raise  # ours (the signer's, say): no aiohttp frame to leave out
            unexpected = exc
        finally:
            _CONNECTING.reset(connecting)
        if unexpected is not None:
            unexpected.__traceback__ = unexpected.__context__ = unexpected.__cause__ = None
            unexpected.add_note(
                "raised inside aiohttp: its traceback and chain are left out (aiohttp's frames "
                "hold the request's Authorization header)"
            )
            raise unexpected
        assert cancelled is not None  # every other way out of the try returned
        raise cancelled  # outside the except block: the original rides in no __context__

    async def _read_capped(self, reply: aiohttp.ClientResponse) -> bytes | WujieError:
        """The reply body, decoded; an error once its DECODED size passes the cap.

        ``Content-Length`` counts compressed bytes, and ``read()`` would inflate without limit
        (a 1 MiB gzip of zeros is 1 GiB), so the body is streamed and counted as it inflates;
        reading stops at the cap and the connection is dropped. The body is decoded here, not
        by aiohttp (see ``_body_decoding.BodyDecoder``).
        """
        cap = self._limits.max_response_bytes
        declared = reply.content_length
        if declared is not None and declared > cap:
            reply.close()
            return ResponseTooLargeError(
                f"the reply declares {declared} bytes, over the {cap}-byte cap "
                "(Limits.max_response_bytes)",
                limit=cap,
                http_status=reply.status,
            )
        headers = reply.headers
        codings = content_codings(headers.getall("Content-Encoding", ()))
        if declared is not None and not codings and "Transfer-Encoding" not in headers:
            # Neither compressed nor chunked: the body is the declared length, within the cap.
            return await reply.read()
        decoder = body_decoder(codings, cap, reply.status)
        async for chunk in reply.content.iter_any():
            problem = decoder.feed(chunk)
            if problem is not None:
                reply.close()
                return _unless_status_says(decoder, reply.status, problem)
        body = decoder.finish()
        return _unless_status_says(decoder, reply.status, body)


def _unsent_unless_handed(sent: RequestBody, on_wire: Callable[[bool], None] | None) -> None:
    """Tell ``on_wire`` that nothing is on the wire, when none of ``sent`` was handed to the
    connection (a request ended so never reached the gateway)."""
    if on_wire is not None and not sent.handed:
        on_wire(False)


def _unless_status_says(
    decoder: BodyDecoder, status: int, read: bytes | WujieError
) -> bytes | WujieError:
    """What ``_read_capped`` returns: ``read``, or, for a reply that is no success whose body
    does not decode as its ``Content-Encoding`` says, no body at all, so that the reply is
    read by its status alone (a 429 is a refusal whatever its body, a proxy's 407, 413 or 502
    is what its status says). As a ProtocolError, a submit so refused ended uncertain ("may
    have been charged", never resent) and a 429 slowed no brake. A 2xx whose body does not
    decode stays a ProtocolError: the call may have been accepted."""
    if decoder.undecodable and not 200 <= status < 300:
        return b""
    return read


# A pacer turn that took longer than this made the retry wait (see _with_retries).
_PACED = 0.05
