"""The rules a gateway base URL must pass before anything is signed and sent to it."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from . import _contract
from ._addresses import is_loopback
from ._errors import InvalidRequestError

logger = logging.getLogger("wujie_async")


def check_base_url(base_url: str, *, allow_insecure_http: bool = False) -> str:
    """The base URL without its trailing slash, once it passes the rules below.

    Plain ``http://`` is allowed only to a loopback host (the emulator): the signature covers
    only the app id and a timestamp, so anyone on the path who sees one request's header can
    replay it with other bodies, each paid for, for minutes. ``user:password@`` in the URL is
    refused: the gateway does not use it, and it would show in reprs and logs. So are spaces at
    its ends, control characters, a query and a fragment: each would send requests elsewhere
    than the URL reads.
    """
    problem = _problem(base_url, allow_insecure_http)
    if problem is not None:
        # The URL leaves this frame's locals before the error does: its traceback keeps them,
        # and an error reporter that records locals (Sentry, capture_locals=True) would store
        # a password given in it. _problem's frame, which returned, is not kept.
        base_url = ""
        raise InvalidRequestError([problem])
    return base_url.rstrip("/")


def _problem(base_url: str, allow_insecure_http: bool) -> tuple[str, str] | None:
    """The ``("base_url", rule)`` that ``base_url`` breaks, or None when it passes."""
    rule_http = "must be an http(s) URL, e.g. " + _contract.PRODUCTION_BASE_URL
    if not isinstance(base_url, str):
        return ("base_url", rule_http)
    if not base_url:
        # Given empty (an unset variable in "$STAGING_URL"): the production gateway in its
        # place would send paid jobs where the caller did not ask.
        return ("base_url", "is empty: give a URL, or leave it out for the production gateway")
    # Before urlsplit, which quietly drops a newline or tab anywhere and controls or spaces at
    # the start: a URL pasted with a newline in it was used as another URL than the one given.
    if not base_url.isprintable() or base_url != base_url.strip():
        return (
            "base_url",
            "must not contain control characters (a newline, a tab) or begin or end "
            "with a space: remove them",
        )
    try:
        parts = urlsplit(base_url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        host = None  # refused below, outside this block, so no ValueError rides along
    # Messages never repeat the URL: it may hold a password.
    if host is None or parts.scheme not in {"http", "https"}:
        return ("base_url", rule_http)
    if "@" in parts.netloc:
        return (
            "base_url",
            "must not contain user:password@ (the gateway authenticates with the "
            "signed Authorization header; remove the credentials from the URL)",
        )
    # Each API path is added after the base URL: behind a "?" it would land in the query, behind
    # a "#" in the fragment (never sent), and every request would go to the wrong path.
    if "?" in base_url or "#" in base_url:
        return (
            "base_url",
            "must not have a query (?...) or a fragment (#...): the API paths are added "
            f"after it, so it must end in its path, e.g. {_contract.PRODUCTION_BASE_URL}",
        )
    if parts.scheme == "http" and not is_loopback(host):
        if not allow_insecure_http:
            return (
                "base_url",
                f"plain http:// is allowed only to a loopback host, not {host!r}: "
                "anyone on the path could replay the signed header and be paid for; "
                "use https://, or pass allow_insecure_http=True if you accept that",
            )
        logger.warning(
            "INSECURE: sending signed requests over plain http to %s (allow_insecure_http=True);"
            " anyone on the path can replay the Authorization header",
            host,
        )
    return None
