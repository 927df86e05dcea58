"""What a failed exchange means: its words, whether it is retried, what giving up raises.

What is retried depends on what the call is (``CallKind``), in ``retryable`` (see the docs,
"Limits, retries and the 429 brake"):

* batch-detail queries are idempotent: retried on 5xx, 429, timeouts, dropped connections and
  replies that break the contract (not JSON, wrong shape);
* submits are not: retried only when the request provably never reached the gateway (connect
  refused, DNS, connect timeout), on 429 (the gateway refused it) and on code 20010018 (the
  platform says resubmit). A submit whose fate is unknown raises ``SubmitUncertainError``;
* both: a 401 is retried once, re-signed (the cached signature may have gone stale).

Nothing is retried that would fail the same way again: 403, a missing route (404/405 without an
envelope), a redirect, an empty balance, a reply over the size cap, a TLS certificate that
cannot be verified (``TransportError.lasting``).

A failure is told in its own words as text only (``failure_reason``, ``said``): no aiohttp
object, whose ``request_info`` holds the signed Authorization header, is kept.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from types import TracebackType
from typing import Any, Literal, NoReturn

import aiohttp

from ._errors import (
    AuthenticationError,
    LockRaceError,
    ProtocolError,
    RateLimitedError,
    ReplyTooComplexError,
    ResponseTooLargeError,
    ServerError,
    SubmitUncertainError,
    TransportError,
    UnexpectedRedirectError,
    WujieError,
    snippet,
)

# What a call is: submits and batch queries (polls) are retried, and braked, differently.
CallKind = Literal["submit", "poll"]
CALL_KINDS: tuple[CallKind, ...] = ("submit", "poll")


_NESTED_ERROR = re.compile(r"<(\w+): \d+, message='([^'<>]*)'>")


def failure_reason(exc: BaseException) -> str:
    """The lower-level error's own words (the OS reason, say), without any object it holds.

    Only text is taken: ``str()`` of aiohttp's errors names the URL and the OS error, never
    the request headers (those live on ``request_info``, which is not kept).
    """
    certificate_error = unverified_certificate(exc)
    if certificate_error is not None:
        reason = (
            "the gateway's TLS certificate could not be verified (check the base URL's host, "
            f"or this machine's CA certificates): {certificate_error}"
        )
    elif isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        reason = os_error.strerror or str(os_error)
        if isinstance(os_error, ssl.SSLError):
            # Its errno is the SSL library's error code (1: "an SSL error"), not the OS's:
            # read as one, every TLS failure said "Operation not permitted".
            reason = f"TLS failed ({os_error.reason or reason})"
        elif os_error.errno and not isinstance(os_error, socket.gaierror):
            # asyncio words a refusal "Connect call failed (...)": name the errno as well.
            reason = f"{os.strerror(os_error.errno)} ({reason})"
    else:
        # aiohttp writes a nested error as its repr (a body cut short: "Response payload is
        # not completed: <ContentLengthError: 400, message='Not enough data ...'>"), which
        # snippet() takes for markup and leaves out, with the words that said what happened.
        reason = _NESTED_ERROR.sub(r"\1: \2", str(exc))
    name = type(exc).__name__
    reason = snippet(reason, limit=200)
    return f"{name}: {reason}" if reason else name


def unverified_certificate(exc: BaseException) -> BaseException | None:
    """The ssl module's error of a connect failure that is a TLS certificate not verified
    (untrusted, expired, for another host); None for any other failure. aiohttp raises
    ClientConnectorCertificateError for it where it makes the connection itself, and may
    pass one on inside a ClientConnectorSSLError elsewhere: both are the same refusal."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return exc.certificate_error
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
        exc.os_error, ssl.SSLCertVerificationError
    ):
        return exc.os_error
    return None


# aiohttp's words for a request whose body could not be written (the connection was closing,
# or closed under the write): the server cannot have had the whole request, so it ran nothing.
_UNWRITTEN = "Can not write request body"


def request_unwritten(exc: BaseException) -> bool:
    """True when aiohttp could not write the request's body: the server got no complete
    request (a POST short of its Content-Length is never run), so nothing was accepted.

    A server that closes a connection after its reply without ``Connection: close`` leaves it
    in the pool; the next request on it fails so. Read as "no reply", every other submit
    through such a server was uncertain (never resent), though none had reached it.
    """
    return isinstance(exc, aiohttp.ClientOSError) and str(exc.strerror or "").startswith(_UNWRITTEN)


def through_aiohttp(tb: TracebackType | None) -> bool:
    """Whether a traceback passes through aiohttp's frames (whose locals hold the request's
    headers)."""
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith("aiohttp"):
            return True
        tb = tb.tb_next
    return False


def said(error: BaseException) -> str:
    """What a DEBUG line says of an attempt's error: its type and clean, short text (of a
    cancellation, only that: anyio's text names a cancel scope, a task and a source line)."""
    if isinstance(error, asyncio.CancelledError):
        return ": cancelled"
    return f": {type(error).__name__}: {snippet(str(error), limit=160)}"


def retryable(exc: WujieError, kind: CallKind) -> bool:
    """Whether an attempt's error may be retried at all (the policy's bounds aside)."""
    if isinstance(exc, AuthenticationError):
        return exc.http_status == 401  # 403: these credentials may not do this; stop
    if isinstance(exc, RateLimitedError):
        # Refused outright: nothing happened, resending a submit is safe. A batch query is not
        # resent as it was: the poller asks again after Retry-After, in a call with every key
        # then due, so its keys are not held in one call that keeps being refused while
        # other calls go through.
        return kind != "poll"
    if exc.systemic and not isinstance(exc, TransportError):
        return False  # a missing route, a redirect, no balance: the same again every time
    if isinstance(exc, ResponseTooLargeError | ReplyTooComplexError):
        return False  # the same question gets the same unreadable answer; ask about fewer keys
    if isinstance(exc, TransportError) and exc.lasting:
        return False  # a TLS certificate not verified: every handshake ends the same way
    if kind == "poll":
        return isinstance(exc, ServerError | ProtocolError | TransportError)
    if isinstance(exc, LockRaceError):
        return True
    return isinstance(exc, TransportError) and not exc.reached_server


def give_up(exc: WujieError, kind: CallKind, body: Any) -> NoReturn:
    """Raise what a call that gets no more tries raises: its last error, or for a submit that
    may have been accepted, ``SubmitUncertainError``."""
    if kind == "submit" and _uncertain(exc):
        raise SubmitUncertainError(
            f"the submit may have been accepted: {exc}", request=body
        ) from exc
    raise exc


def _uncertain(exc: WujieError) -> bool:
    """True when a submit failed in a way that leaves its fate unknown."""
    if isinstance(exc, TransportError):
        return exc.reached_server
    if isinstance(exc, UnexpectedRedirectError):
        return False  # the URL asked answered "not here": nothing was accepted at it
    # A 5xx or a garbled reply came from somewhere past our socket: it may have gone through.
    # (EndpointNotFoundError is no ProtocolError: the route does not exist, nothing ran.)
    return isinstance(exc, ServerError | ProtocolError)
