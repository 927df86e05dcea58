"""How each input line ended, in words a user can act on (``_manifest`` records it).

Every line ends in exactly one outcome:

- ``saved``: all its images are on disk (one manifest line per image).
- ``failed``: the gateway ran the job and said it failed (or it timed out, or an image could not
  be saved).
- ``moderated``: the gateway's moderation rejected the job.
- ``rejected``: the gateway refused the submit before accepting it (nothing was charged).
- ``uncertain``: the submit may have been accepted (and charged), or was accepted and its reports
  could not be read; it is never resent silently.
- ``not_sent``: the line was never sent (the run stopped first, or a systemic error refused it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from .. import (
    APIError,
    AuthenticationError,
    BudgetExceededError,
    EndpointNotFoundError,
    IncompleteJobError,
    InsufficientBalanceError,
    JobCancelledError,
    JobFailedError,
    JobProtocolError,
    JobTimeoutError,
    ModerationRejectedError,
    RateLimitedError,
    RequestRefusedError,
    SubmitUncertainError,
    TransportError,
    UnexpectedRedirectError,
    UnknownJobError,
    WujieError,
    snippet,
)

Status = Literal["saved", "failed", "moderated", "rejected", "uncertain", "not_sent"]


STATUSES: Final[tuple[Status, ...]] = (
    "saved",
    "failed",
    "moderated",
    "rejected",
    "uncertain",
    "not_sent",
)


def clean(text: object) -> str:
    """Server (or any foreign) text as one printable line: no escape codes, no controls."""
    return snippet(str(text))


def is_systemic(exc: BaseException) -> bool:
    """True for errors that are not about one line (credentials, base URL, balance, network):
    the run stops sending. The library classifies them (``WujieError.systemic``)."""
    return isinstance(exc, WujieError) and exc.systemic


def fix_message(exc: BaseException, base_url: str, *, app_id_flag: bool) -> str:
    """The one line that says what stopped the run and what to change."""
    where = "--app-id" if app_id_flag else "WUJIE_APP_ID"
    if isinstance(exc, AuthenticationError):
        status = "" if exc.http_status is None else f"HTTP {exc.http_status}: "
        return (
            f"stopped: the gateway refused the credentials ({status}{clean(exc.message)}); "
            f"check {where} and WUJIE_PRIVATE_KEY (or --private-key-file), and the clock"
        )
    if isinstance(exc, InsufficientBalanceError):
        return (
            "stopped: the account is out of points (code 20110010, insufficient balance); "
            "top up the balance, then re-run the same command"
        )
    if isinstance(exc, EndpointNotFoundError):
        return (
            f"stopped: {clean(exc.url or base_url)} answered HTTP {exc.http_status} (no such API "
            "route); check --base-url / WUJIE_BASE_URL, which must end in /wj-open/v1"
        )
    if isinstance(exc, RequestRefusedError):
        return (
            f"stopped: a proxy before the gateway refused the requests (HTTP {exc.http_status}: "
            "it asks for credentials of its own); check the network path to --base-url / "
            "WUJIE_BASE_URL"
        )
    if isinstance(exc, UnexpectedRedirectError):
        return (
            f"stopped: {clean(base_url)} answered with a redirect (to "
            f"{clean(exc.location) or 'somewhere unsaid'}), which is never followed; check "
            "--base-url / WUJIE_BASE_URL (https, ending in /wj-open/v1)"
        )
    if isinstance(exc, TransportError) and not exc.reached_server:
        # It says it all: "could not connect to URL: why; check the base URL ... and the
        # network" (wrapped again, the URL and the fix were said twice).
        return f"stopped: {clean(exc)}"
    return (
        f"stopped: cannot connect to {clean(base_url)} ({clean(exc)}); "
        "check --base-url / WUJIE_BASE_URL and the network"
    )


def classify(exc: BaseException) -> tuple[Status, str, str]:
    """(status, error_code, one-line error) of a line that ended with ``exc``."""
    message = clean(exc) or type(exc).__name__
    if isinstance(exc, ModerationRejectedError):
        return "moderated", str(exc.fail_code or "moderated"), message
    if isinstance(exc, JobFailedError):
        return "failed", clean(exc.fail_code) if exc.fail_code is not None else "failed", message
    if isinstance(exc, JobTimeoutError):
        return "failed", "timeout", message
    if isinstance(exc, UnknownJobError):
        # The gateway handed out this key: a job it listed and then forgot, or one it never
        # listed (its listing lags, say), may have run and been charged. Like a submit without
        # a reply it is never resent unasked (--retry-uncertain resends it); a plain re-run
        # asks about its key again. As "failed", --retry-failed resent it: paid twice if it ran.
        if not exc.was_listed:
            message += " (its key was handed out: it may have run and been charged; not resent)"
        return "uncertain", "unknown_job", message
    if isinstance(exc, JobCancelledError):
        return "failed", "cancelled", message
    if isinstance(exc, JobProtocolError):
        # The gateway accepted it (it has a key) and then said of it what could not be read:
        # it may have run and been charged. Not "rejected" (nothing charged), which
        # --retry-failed resends: that paid twice for jobs that had succeeded.
        return (
            "uncertain",
            "protocol_error",
            message + " (it was accepted, and may have run and been charged; not resent)",
        )
    if isinstance(exc, IncompleteJobError):
        return (
            "failed",
            "incomplete",
            clean(
                f"job {exc.job_key}: the gateway reported it done with {exc.landed} of "
                f"{exc.expected} image(s)"
            ),
        )
    if isinstance(exc, BudgetExceededError) and exc.unpriced:
        return (
            "not_sent",
            "unpriced",
            (
                f"not sent: the gateway did not report what a {exc.model} job cost, so "
                f"--max-points {exc.max_points:g} cannot be held; give its price with "
                f"--point-price {exc.model}=POINTS (points per image) and re-run"
            ),
        )
    if isinstance(exc, BudgetExceededError):
        return (
            "not_sent",
            "budget",
            (
                f"not sent: over the points budget (--max-points {exc.max_points:g}; "
                f"{exc.spent:g} spent, {exc.reserved:g} held for jobs in flight); "
                "re-run with a larger --max-points to send it"
            ),
        )
    if isinstance(exc, SubmitUncertainError):
        return "uncertain", "uncertain", message + " (it may have been charged; not resent)"
    if is_systemic(exc):  # the gateway never accepted it (the library promises so): not sent
        return "not_sent", _code(exc), message
    if isinstance(exc, RateLimitedError):
        # Refused for the rate, after the client's own retries: the gateway made no job, and
        # the line is not the gateway's verdict on the request: a plain re-run sends it.
        return "not_sent", _code(exc), message + " (refused for the rate: a re-run sends it)"
    if isinstance(exc, APIError):
        return "rejected", _code(exc), message
    if isinstance(exc, TransportError):
        return "failed", "download", message
    return "failed", "error", message


def _code(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        if exc.code is not None and exc.code != str(exc.http_status):
            return clean(exc.code)
        if exc.http_status is not None:
            return f"http_{exc.http_status}"
        return "api"
    if isinstance(exc, TransportError):
        return "connect" if not exc.reached_server else "transport"
    return "error"


# The error_code of a line whose job another gateway accepted (another base URL or app id
# than the run's): never asked of this one, never resent (see _plan.elsewhere_outcome).
OTHER_GATEWAY: Final[Literal["other_gateway"]] = "other_gateway"


@dataclass(slots=True)
class LineOutcome:
    """How one input line ended."""

    status: Status
    line: int
    row_id: str | None
    key: str | None = None
    error_code: str | None = None
    error: str | None = None
    # An image that could not be saved and never will be by a re-run as it stands (too large
    # for the cap, bytes that are not an image): what is wrong, in words (see
    # _image_problems.lasting_problem).
    lasting: str | None = None
    # A line whose job another gateway accepted (another base URL or app id than this run's):
    # the base URL that took it (see _plan.elsewhere_outcome), never asked of this one.
    base_url: str | None = None


def counted_as(outcome: LineOutcome) -> Status | Literal["other_gateway"]:
    """The name a line's ending is counted under: its status, except ``other_gateway`` for a
    line whose job another gateway accepted. Its row says ``uncertain`` (not collected here,
    not resent), but it is known accepted: counted as uncertain, 46 of a run's 49 "uncertain"
    lines were such, read as maybe charged with no reply."""
    return OTHER_GATEWAY if outcome.error_code == OTHER_GATEWAY else outcome.status


def count(outcomes: Iterable[LineOutcome]) -> Counter[str]:
    """Outcomes counted by the name they are said under (:func:`counted_as`), every one
    present (zero when none)."""
    counts: Counter[str] = Counter(dict.fromkeys((*STATUSES, OTHER_GATEWAY), 0))
    counts.update(counted_as(outcome) for outcome in outcomes)
    return counts
