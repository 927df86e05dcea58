"""HTTP: one aiohttp session per client, envelope decoding, error mapping, retries.

Every lower-layer failure is translated here, once, into the ``WujieError`` tree. What is
retried depends on what the call is (see README, "Reliability"):

* batch-detail queries are idempotent: retried on 5xx, 429, timeouts, dropped connections and
  replies that are not JSON;
* submits are not: retried only when the request provably never reached the gateway (connect
  refused, DNS, connect timeout), on 429 (the gateway refused it) and on code 20010018 (the
  platform says resubmit). A submit whose fate is unknown raises ``SubmitUncertainError``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import aiohttp
import backoff
from pydantic import ValidationError

from . import _contract
from ._auth import HeaderSigner
from ._config import Limits, RetryPolicy, Timeouts
from ._errors import (
    AuthenticationError,
    InsufficientBalanceError,
    LockRaceError,
    ProtocolError,
    RateLimitedError,
    ServerError,
    SubmitUncertainError,
    TransportError,
    WujieError,
    business_error,
    snippet,
)
from ._models import Envelope
from ._ratelimit import AdaptiveLimiter

logger = logging.getLogger("wujie_async")

CallKind = Literal["submit", "poll"]
T = TypeVar("T")
_USER_AGENT = "wujie-async"
IDLE_CONNECTION_SECONDS = 4.0


@dataclass(slots=True)
class TransportCounters:
    """Mutable counters behind ``client.stats``."""

    http_calls: int = 0
    retries: int = 0
    rate_limited: int = 0


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare for 429, and the backoff covers it
    return seconds if seconds >= 0 else None


def decode_reply(status: int, raw: bytes, headers: Any) -> Any:
    """The ``data`` of a successful envelope, or the typed error the reply means."""
    try:
        payload: Any = json.loads(raw)
    except (ValueError, RecursionError):
        payload, is_json = None, False
    else:
        is_json = True
    if status == 200 and isinstance(payload, dict):
        code = payload.get("code")
        if code == _contract.SUCCESS_CODE or code == int(_contract.SUCCESS_CODE):
            return payload.get("data")  # the common case, without building a model
    envelope: Envelope | None = None
    if is_json and isinstance(payload, dict):
        try:
            envelope = Envelope.model_validate(payload)
        except ValidationError:
            envelope = None
    raise _reply_error(status, raw, headers, envelope, is_json)


def _reply_error(
    status: int, raw: bytes, headers: Any, envelope: Envelope | None, is_json: bool
) -> WujieError:
    """The typed error for a reply that is not a successful envelope."""
    message = envelope.message if envelope else ""
    code = envelope.code if envelope else None
    body = snippet(raw)
    if code == _contract.CODE_INSUFFICIENT_BALANCE:
        # Out of points is never a rate limit, whatever the HTTP status says.
        return InsufficientBalanceError(
            message or "insufficient balance", code=code, http_status=status
        )
    if status == 401:
        return AuthenticationError(
            message or "authentication refused", http_status=status, code=code, body=body
        )
    if status == _contract.HTTP_RATE_LIMITED:
        return RateLimitedError(
            message or "rate limited",
            retry_after=_retry_after(headers),
            http_status=status,
            code=code,
            body=body,
        )
    if status >= 500:
        return ServerError(message or "server error", http_status=status, code=code, body=body)
    if not is_json:
        return ProtocolError("the reply is not JSON", http_status=status, body=body)
    if status != 200:
        return ProtocolError("unexpected HTTP status", http_status=status, code=code, body=body)
    if envelope is None:
        return ProtocolError(
            "the reply is not a {code, message, data} envelope", http_status=status, body=body
        )
    return business_error(envelope.code, envelope.message, http_status=status)


def _retryable(exc: WujieError, kind: CallKind) -> bool:
    if isinstance(exc, RateLimitedError | AuthenticationError):
        return True  # refused outright: nothing happened, resending is safe
    if kind == "poll":
        return isinstance(exc, ServerError | ProtocolError | TransportError)
    if isinstance(exc, LockRaceError):
        return True
    return isinstance(exc, TransportError) and not exc.reached_server


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
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._signer = signer
        self._limits = limits
        self._timeouts = timeouts
        self._retry = retry
        self._session: aiohttp.ClientSession | None = None
        self.counters = TransportCounters()
        self.brake = AdaptiveLimiter()

    def __repr__(self) -> str:
        return f"Transport(base_url={self.base_url!r})"

    @property
    def session(self) -> aiohttp.ClientSession:
        """The open aiohttp session (also used to download images)."""
        assert self._session is not None, "transport is not open"
        return self._session

    async def open(self) -> None:
        """Create the pooled session."""
        # Idle connections are dropped after 4 s, before common server idle timeouts (5 s and
        # up): a submit sent on a connection the server is closing would be uncertain.
        connector = aiohttp.TCPConnector(
            limit=self._limits.max_connections, keepalive_timeout=IDLE_CONNECTION_SECONDS
        )
        timeout = aiohttp.ClientTimeout(
            total=self._timeouts.request, sock_connect=self._timeouts.connect
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": _USER_AGENT},
            raise_for_status=False,
        )

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, path: str, body: Any, *, kind: CallKind) -> Any:
        """POST ``body`` as JSON to ``path``; the envelope's ``data``, retried as ``kind`` allows.

        Raises:
            WujieError: the typed error of the last attempt; for a submit whose fate is unknown,
                ``SubmitUncertainError`` (its ``__cause__`` says what happened).
        """
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        return await self._with_retries(lambda: self._post_once(path, payload), kind, body)

    async def _with_retries(
        self, attempt: Callable[[], Awaitable[T]], kind: CallKind, body: Any
    ) -> T:
        policy = self._retry
        waits: Iterator[float | None] | None = None  # made on the first failure only
        started = time.monotonic()
        tries = 0
        while True:
            tries += 1
            try:
                result = await attempt()
            except WujieError as exc:
                if isinstance(exc, AuthenticationError):
                    self._signer.invalidate()
                elapsed = time.monotonic() - started
                retry = _retryable(exc, kind) and tries < policy.max_attempts
                # A second 401 in a row is not a stale signature: stop there.
                if isinstance(exc, AuthenticationError) and tries >= 2:
                    retry = False
                if not retry or elapsed >= policy.max_elapsed:
                    if kind == "submit" and _uncertain(exc):
                        raise SubmitUncertainError(
                            f"the submit may have been accepted: {exc}", request=body
                        ) from exc
                    raise
                if waits is None:
                    waits = backoff.expo(factor=policy.initial_wait, max_value=policy.max_wait)
                    next(waits)  # backoff's generators are primed with one None
                delay = backoff.full_jitter(next(waits) or 0.0)
                if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, policy.max_wait))
                self.counters.retries += 1
                logger.debug("retrying %s in %.2fs after %s", kind, delay, type(exc).__name__)
                await asyncio.sleep(delay)
            else:
                return result

    async def _post_once(self, path: str, payload: bytes) -> Any:
        header = await self._signer.header()
        sent_at = await self.brake.acquire()
        self.counters.http_calls += 1
        headers = {"Authorization": header, "Content-Type": "application/json"}
        try:
            async with self.session.post(
                self.base_url + path, data=payload, headers=headers
            ) as reply:
                raw = await self._read_capped(reply)
                status, reply_headers = reply.status, reply.headers
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise TransportError(
                f"could not connect to {self.base_url}: {type(exc).__name__}", reached_server=False
            ) from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransportError(
                f"no complete reply from {self.base_url}{path}: {type(exc).__name__}",
                reached_server=True,
            ) from None
        try:
            data = decode_reply(status, raw, reply_headers)
        except RateLimitedError:
            self.counters.rate_limited += 1
            self.brake.rate_limited(sent_at)
            raise
        self.brake.succeeded()
        return data

    async def _read_capped(self, reply: aiohttp.ClientResponse) -> bytes:
        cap = self._limits.max_response_bytes
        if reply.content_length is not None and reply.content_length > cap:
            raise ProtocolError(
                f"the reply is {reply.content_length} bytes, over the {cap}-byte cap",
                http_status=reply.status,
            )
        if reply.content_length is not None:
            return await reply.read()  # declared, and within the cap
        chunks: list[bytes] = []
        size = 0
        async for chunk in reply.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > cap:
                raise ProtocolError(
                    f"the reply exceeds the {cap}-byte cap", http_status=reply.status
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _uncertain(exc: WujieError) -> bool:
    """True when a submit failed in a way that leaves its fate unknown."""
    if isinstance(exc, TransportError):
        return exc.reached_server
    # A 5xx or a garbled reply came from somewhere past our socket: it may have gone through.
    return isinstance(exc, ServerError | ProtocolError)
