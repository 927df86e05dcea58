"""What a reply means: the ``data`` of a success envelope, or the typed error it says.

A reply is read from its status, headers and body (decoded already), with no aiohttp object
at hand: the transport hands over what one exchange brought back. Server text reaches
messages only through ``snippet``.

A 4xx reply whose body cannot be read (cut short, over the size cap) is read by its status
alone: the status line says the request was refused (``refused_unread``).
"""

from __future__ import annotations

import datetime
import email.utils
import json
import math
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError

from . import _contract
from ._errors import (
    AuthenticationError,
    EndpointNotFoundError,
    InsufficientBalanceError,
    ProtocolError,
    RateLimitedError,
    ReplyTooComplexError,
    RequestRefusedError,
    ServerError,
    UnexpectedRedirectError,
    WujieError,
    business_error,
    snippet,
)
from ._models import Envelope

_FIX_CREDENTIALS = "check WUJIE_APP_ID and WUJIE_PRIVATE_KEY"
FIX_BASE_URL = "check the base URL (WUJIE_BASE_URL / --base-url)"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        seconds = _seconds_until(value)  # RFC 9110 allows an HTTP date too
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


def _seconds_until(http_date: str) -> float | None:
    """Seconds from now until an HTTP date (``Wed, 21 Oct 2026 07:28:00 GMT``); 0 for one
    past; None for text that is no date."""
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, as RFC 5322 reads it
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - time.time())


# Parsed JSON takes up to 25 times its size (a 3-byte "{}," is a 64-byte dict): a reply of
# millions of empty objects under the size cap would take hundreds of MB. A batch reply of 50
# keys holds a few thousand (a flood of junk entries for other keys is skipped, and read, up
# to this); a brace inside a string counts too (an overcount, never an under).
MAX_JSON_CONTAINERS = 1_000_000


# The success code as the contract writes it, and as a number (some gateways send 200).
_SUCCESS_CODE_TEXT = _contract.SUCCESS_CODE
_SUCCESS_CODE_NUMBER = int(_contract.SUCCESS_CODE)


def _bounded_int(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return -math.inf if text.startswith("-") else math.inf


def decode_reply(status: int, raw: bytes, headers: Mapping[str, str], *, url: str = "") -> Any:
    """The ``data`` of a successful envelope, or the typed error the reply means.

    Args:
        status: the HTTP status.
        raw: the reply body, decoded from any content encoding.
        headers: the reply headers.
        url: the URL asked, named by errors that say it does not exist.
    """
    # Each container takes a byte at least: only a reply that long can hold too many.
    if len(raw) > MAX_JSON_CONTAINERS and raw.count(b"{") + raw.count(b"[") > MAX_JSON_CONTAINERS:
        over = f"over {MAX_JSON_CONTAINERS:,} JSON objects and arrays"
        raise _too_complex(status, raw, headers, url, unread=over, why=f"held {over}")
    try:
        try:
            payload = json.loads(raw)
        except json.JSONDecodeError:
            raise
        except ValueError:
            # An integer past Python's digit limit (4,300 by default): read again, such
            # integers as infinite floats, which no field takes: its entry is malformed, not
            # the whole reply (one 5,000-digit status made every job of a batch call wait out
            # its deadline).
            payload = json.loads(raw, parse_int=_bounded_int)
        is_json = True
    except ValueError:
        payload, is_json = None, False
    except RecursionError:
        deep = "nested deeper than a JSON reader follows"
        raise _too_complex(status, raw, headers, url, unread=deep, why=deep) from None
    # The contract names 200, but a gateway (or a proxy before it) answering 201 or 202 with a
    # success envelope has accepted the call, and its key must not be dropped. Nor when a proxy
    # stamps another status (429, 503) on a success envelope that carries data: the job exists
    # and is paid for, and sending the submit again would pay for another.
    if type(payload) is dict:
        code = payload.get("code")
        if code == _SUCCESS_CODE_TEXT or code == _SUCCESS_CODE_NUMBER:
            data = payload.get("data")
            if 200 <= status < 300 or data is not None:
                return data  # the common case, without building a model
    envelope: Envelope | None = None
    if is_json and isinstance(payload, dict):
        try:
            envelope = Envelope.model_validate(payload)
        except ValidationError:
            envelope = None
    raise _reply_error(status, raw, headers, envelope, is_json, url)


def _too_complex(
    status: int, raw: bytes, headers: Mapping[str, str], url: str, *, unread: str, why: str
) -> WujieError:
    """The error for a body too complex to parse: ``unread`` and ``why`` say what it held,
    as ``refused_unread`` and ``ReplyTooComplexError.why`` word it."""
    if 400 <= status < 500:
        # Its status line says it was refused, as for a 4xx over the size cap: read as a
        # reply too complex, a refused submit was "may have been charged" (never resent)
        # and a batch query's 429 was asked about in halves, the 429 brake never told.
        return refused_unread(status, headers, url, unread)
    return ReplyTooComplexError(
        f"the reply was not read: it {why} (no reply of this contract does)",
        why=why,
        http_status=status,
        body=snippet(raw[:200]),
    )


def _reply_error(
    status: int,
    raw: bytes,
    headers: Mapping[str, str],
    envelope: Envelope | None,
    is_json: bool,
    url: str,
    *,
    unread: str = "",
) -> WujieError:
    """The typed error for a reply that is not a successful envelope.

    Server text reaches messages only through ``snippet`` (APIError applies it). ``unread``:
    why the body could not be read (see ``refused_unread``), said in the message.
    """
    said = envelope.message if envelope else ""
    unread = f"; the reply's body could not be read ({unread})" if unread else ""
    code = envelope.code if envelope else None
    body = snippet(raw)
    if (
        envelope is not None
        and status < 500  # a 5xx is no refusal already: a submit so answered is uncertain
        and isinstance(envelope.data, dict)
        and envelope.data.get("key")
    ):
        # A refusal's data is null; one that carries a job key contradicts itself (a gateway
        # whose success code is not the contract's: "0", "success"), whatever the HTTP status
        # (a proxy's 429 stamped on it). Read as a refusal, a paid submit was "rejected,
        # nothing charged" (resent by a retry of failed lines), a rate limit (resent by the
        # client's retries) or a credentials refusal ("nothing accepted", sent again by a
        # re-run); as a reply that breaks the contract, it is uncertain, never resent.
        return ProtocolError(
            f"the reply's code ({envelope.code}) is not a success, yet its data holds a job "
            "key: the call may have been accepted",
            http_status=status,
            code=envelope.code,
            body=body,
        )
    if code == _contract.CODE_INSUFFICIENT_BALANCE:
        # Out of points is never a rate limit, whatever the HTTP status says.
        return InsufficientBalanceError(
            _with_server_text("insufficient points balance: top up the account", said),
            code=code,
            http_status=status,
        )
    if status in (401, 403):
        refused = "authentication refused" if status == 401 else "access forbidden"
        return AuthenticationError(
            _with_server_text(f"{refused}: {_FIX_CREDENTIALS} (and this machine's clock)", said)
            + unread,
            http_status=status,
            code=code,
            body=body,
        )
    if status in (404, 405) and envelope is None:
        # A web server or proxy answered, not the gateway: the route does not exist there.
        missing = "does not exist" if status == 404 else "does not accept POST"
        return EndpointNotFoundError(
            f"{FIX_BASE_URL}: {url or 'the URL'} {missing}{unread}",
            url=url,
            http_status=status,
            body=body,
        )
    if status == _contract.HTTP_RATE_LIMITED:
        return RateLimitedError(
            (said or "rate limited") + unread,
            retry_after=_retry_after(headers),
            http_status=status,
            code=code,
            body=body,
        )
    if 400 <= status < 500 and envelope is None:
        # A proxy or web server answered, not the gateway (whose errors are envelopes, or 401,
        # 429 and 5xx): the request went no further. A submit so refused was not charged.
        why = {
            407: " (it asks for credentials of its own)",
            413: " (the request body is too large for it)",
        }.get(status, "")
        # Unread, the body cannot say whose refusal it was: only its status says it was one.
        who = " by the server" if unread else " before the gateway by a proxy or web server"
        return RequestRefusedError(
            f"refused{who}{why}{unread}; nothing was accepted",
            http_status=status,
            body=body,
        )
    if status >= 500:
        return ServerError(said or "server error", http_status=status, code=code, body=body)
    if not is_json:
        return ProtocolError("the reply is not JSON", http_status=status, body=body)
    if not 200 <= status < 300:
        return ProtocolError("unexpected HTTP status", http_status=status, code=code, body=body)
    if envelope is None:
        return ProtocolError(
            "the reply is not a {code, message, data} envelope", http_status=status, body=body
        )
    return business_error(envelope.code, envelope.message, http_status=status)


def refused_unread(status: int, headers: Mapping[str, str], url: str, why: str) -> WujieError:
    """The error a 4xx reply means by its status alone, its body unread (cut short, over the
    size cap, too slow), ``why`` saying why (our words, not the server's).

    The status line came whole and says the request was refused: a 429 is a rate limit
    (Retry-After from the headers; retried as any 429), a 401/403 a credentials refusal, a
    404/405 a missing route, another 4xx a ``RequestRefusedError``. Nothing was accepted, so a
    submit so answered is not uncertain. A 2xx or 5xx so cut short stays what it was (a lost
    reply, a reply over the cap): the server may have done the work.
    """
    return _reply_error(status, b"", headers, None, False, url, unread=why)


def _with_server_text(advice: str, said: str) -> str:
    return f"{advice} (the gateway said: {said})" if said else advice


def _safe_url(text: str) -> str:
    """A URL from a reply, fit for a message: no user:password@, no control characters."""
    text = snippet(text, limit=200)
    try:
        parts = urlsplit(text)
        if parts.username is not None or parts.password is not None:
            host = parts.hostname or ""
            netloc = f"[{host}]" if ":" in host else host
            if parts.port is not None:
                netloc += f":{parts.port}"
            text = urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        pass  # not a URL we can parse: the snippet is all we show
    return text


def redirect_error(url: str, status: int, location: str) -> UnexpectedRedirectError:
    where = _safe_url(location)
    return UnexpectedRedirectError(
        f"{url} answered with a redirect to {where or '(no Location given)'}; redirects are "
        f"not followed: the base URL is probably wrong, {FIX_BASE_URL}",
        location=where,
        http_status=status,
    )
