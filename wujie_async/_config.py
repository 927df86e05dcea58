"""Policies: small frozen value objects, each with safe defaults.

``None`` means "off" (no limit); every field is keyword-only so call sites read as settings.
Every value is checked at construction (InvalidRequestError naming ``Class.field`` and the
rule): counts are ints (never a float, even ``2.0``, nor a bool); seconds, rates and points are
finite ints or floats (never a bool, NaN or infinity: where a field has no bound, None says so).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ._errors import InvalidRequestError
from ._rules import MODEL_RULES, is_model_name

Violation = tuple[str, str]

_PRICE_KEY_FORMS = "MODEL, MODEL/SIZE or MODEL/SIZE/QUALITY (e.g. 'dall-e-3/1024x1024/hd')"
_SIZE_RE = re.compile(r"[0-9]+x[0-9]+")


def _letters(model: str) -> str:
    """A model name without case and separators: 'DALL-E 2', 'dalle_2' and 'dall-e-2' alike."""
    return re.sub(r"[\s._-]+", "", model).casefold()


_KNOWN_BY_LETTERS = {_letters(model): model for model in MODEL_RULES}


def price_key_problem(key: object) -> str | None:
    """Why a ``point_prices`` key can never match a request, in words; None when it can.

    The budget looks a job up by ``model/size/quality``, ``model/size`` and ``model``, with
    ``auto`` for a size or quality the request leaves out. So a key of more than three parts
    never matches, nor one naming a size or quality its model does not take (a request with it
    is refused before the budget sees it). A model this client does not know takes any quality,
    and sizes of the form WIDTHxHEIGHT, as every model of the contract does.
    """
    if not isinstance(key, str):
        return "not a string"
    parts = key.split("/")
    if len(parts) > 3:
        return f"{len(parts)} parts, not 1 to 3"
    if not all(parts):
        return "an empty part"
    model = parts[0]
    size = parts[1] if len(parts) > 1 else None
    quality = parts[2] if len(parts) > 2 else None
    rules = MODEL_RULES.get(model)
    if rules is None:
        if not is_model_name(model):
            return f"{model!r} is no model's name (a request naming it is refused)"
        # A known model mistyped ('DALL-E-2', 'dalle-2'): its jobs would go unpriced, and a
        # budget without a price for them refuses them, or with one too low overspends.
        meant = _KNOWN_BY_LETTERS.get(_letters(model))
        if meant is not None:
            return f"{model!r} is not a model this client knows: did you mean {meant!r}?"
    if size is not None and size != "auto":  # auto: a request that gives no size
        if rules is not None and size not in rules.sizes:
            sizes = "|".join(sorted(rules.sizes | {"auto"}))
            return f"{model} takes no size {size!r}, only {sizes}"
        if rules is None and not _SIZE_RE.fullmatch(size):
            return f"the size {size!r} is neither WIDTHxHEIGHT nor auto"
    if quality is not None and rules is not None and quality not in rules.qualities:
        qualities = "|".join(sorted(rules.qualities))
        return f"{model} takes no quality {quality!r}, only {qualities}"
    return None


def _count(
    owner: str, name: str, value: object, *, minimum: int = 1, optional: bool = False
) -> list[Violation]:
    """A whole number (an int; never a float, even 2.0, nor a bool) >= ``minimum``; None too
    if optional."""
    if optional and value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return []
    none = " or None" if optional else ""
    return [(f"{owner}.{name}", f"must be a whole number >= {minimum}{none}")]


def _amount(
    owner: str, name: str, value: object, *, zero: bool = False, optional: bool = False
) -> list[Violation]:
    """A finite real number (an int or float, not a bool), > 0 (or >= 0 with ``zero``); None
    too if optional.

    Infinity is refused: where a field has no bound, None says so (and where None is not
    allowed, the field is a bound that must hold).
    """
    if optional and value is None:
        return []
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int past the largest float: no use as seconds or points
            finite = False
        if finite and (value >= 0 if zero else value > 0):
            return []
    rule = "a finite number >= 0" if zero else "a positive finite number"
    return [(f"{owner}.{name}", f"must be {rule}{' or None' if optional else ''}")]


def check_wait(name: str, value: object) -> float | None:
    """A wait's bound as a caller passed it (None: no bound), checked before the wait.

    Raises:
        InvalidRequestError: naming ``name``: not a finite number of seconds >= 0 (NaN made
            a bounded wait unbounded, and a string failed deep in arithmetic).
    """
    if value is None:
        return None
    found = _amount("wait", name, value, zero=True)
    if found:
        raise InvalidRequestError([(name, "must be a finite number of seconds >= 0, or None")])
    return float(value)  # type: ignore[arg-type]  # checked: an int or a finite float


def _raise(found: list[Violation]) -> None:
    if found:
        raise InvalidRequestError(found)


@dataclass(frozen=True, slots=True, kw_only=True)
class PollPolicy:
    """When the batching poller asks about a key (docs, "Polling and its latency promise").

    A key is first asked about ``first_poll_delay`` after its submit. The gateway's
    ``expected_seconds`` then predicts when the job ends, and the poller learns how far real
    ends fall from such predictions. Inside that learned window the key is asked about every
    ``min_interval``, so a job that ends there is seen within ``min_interval``; before the
    window nothing is asked (at most ``max_estimate_wait`` apart); a job that overran the window,
    or has no usable estimate, is asked about every ``age_fraction`` of its age, within
    ``min_interval`` and ``max_interval``.

    Attributes:
        first_poll_delay: seconds from submit to the first ask.
        min_interval: the shortest gap between two asks about one key, and the gap while a job
            is expected to end: how late a finished job can be noticed then.
        max_interval: the longest gap between asks about a job that has overrun its estimate,
            or has none, or is still queued; and before a first estimate is seen counting
            down (the check that it is not a placeholder).
        age_fraction: share of a job's age to wait between asks once it overran (backs off
            for slow jobs; bounds how late they are noticed).
        max_estimate_wait: the longest wait on an estimate before asking again.
        queue_position_seconds: with no estimate, seconds to wait per job ahead in the queue
            (``queue_before_num``), within ``min_interval`` and ``max_interval``.
        batch_fill_horizon: keys due within this many seconds may ride along in a batch call
            that has room, so calls go out full instead of more often.
        unknown_key_grace: how long a key may be absent from replies before it fails as unknown
            (from the first reply that leaves it out; afresh after a gap in the replies longer
            than this, when the calls failed meanwhile).
    """

    first_poll_delay: float = 1.0
    min_interval: float = 0.5
    max_interval: float = 5.0
    age_fraction: float = 0.03
    max_estimate_wait: float = 60.0
    queue_position_seconds: float = 1.0
    batch_fill_horizon: float = 0.25
    unknown_key_grace: float = 30.0

    def __post_init__(self) -> None:
        found = [
            *_amount("PollPolicy", "first_poll_delay", self.first_poll_delay),
            *_amount("PollPolicy", "min_interval", self.min_interval),
            *_amount("PollPolicy", "max_interval", self.max_interval),
            *_amount("PollPolicy", "age_fraction", self.age_fraction, zero=True),
            *_amount("PollPolicy", "max_estimate_wait", self.max_estimate_wait),
            *_amount(
                "PollPolicy", "queue_position_seconds", self.queue_position_seconds, zero=True
            ),
            *_amount("PollPolicy", "batch_fill_horizon", self.batch_fill_horizon, zero=True),
            *_amount("PollPolicy", "unknown_key_grace", self.unknown_key_grace),
        ]
        if not found:
            found = [
                (f"PollPolicy.{name}", "must be >= min_interval")
                for name in ("max_interval", "max_estimate_wait")
                if getattr(self, name) < self.min_interval
            ]
        _raise(found)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """How hard the client may push the gateway (the platform sells QPS and channels).

    Attributes:
        max_connections: pooled HTTP connections per client.
        max_concurrent_submits: submits on the wire at once; more wait their turn (FIFO).
        max_submits_per_second: a steady cap on submit rate; None is no cap.
        max_concurrent_polls: batch-detail calls on the wire at once.
        max_in_flight: jobs tracked at once; further submits wait for room. None is no bound.
        max_response_bytes: a reply larger than this is a ProtocolError, not a memory spike.
        max_points: a points budget: a submit that could take the points spent (the
            gateway's ``integral_cost`` of ended jobs, plus what jobs in flight are expected to
            cost) past it raises BudgetExceededError before anything is sent. None: no budget.
            See the guide "Points and budgets" for how jobs in flight are reckoned.
        point_prices: points per image, by ``model``, ``model/size`` or
            ``model/size/quality`` (the most specific wins): what the budget expects a job to
            cost before it has seen one of its kind end. Without it, the first job of a kind
            runs alone until its cost is known. Kept as a read-only copy.
    """

    max_connections: int = 64
    max_concurrent_submits: int = 32
    max_submits_per_second: float | None = None
    max_concurrent_polls: int = 4
    max_in_flight: int | None = None
    max_response_bytes: int = 8 * 1024 * 1024
    max_points: float | None = None
    point_prices: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        found = [
            *_count("Limits", "max_connections", self.max_connections),
            *_count("Limits", "max_concurrent_submits", self.max_concurrent_submits),
            *_amount(
                "Limits", "max_submits_per_second", self.max_submits_per_second, optional=True
            ),
            *_count("Limits", "max_concurrent_polls", self.max_concurrent_polls),
            *_count("Limits", "max_in_flight", self.max_in_flight, optional=True),
            *_count("Limits", "max_response_bytes", self.max_response_bytes),
            *_amount("Limits", "max_points", self.max_points, zero=True, optional=True),
        ]
        prices = self.point_prices
        if prices is not None:
            if not isinstance(prices, Mapping):
                found.append(
                    ("Limits.point_prices", "must be a mapping of model[/size[/quality]] to points")
                )
            else:
                # A copy, read-only: the caller's table changed later (a price turned NaN by a
                # reload) must not slip past the checks below into the budget.
                prices = MappingProxyType(dict(prices))
                object.__setattr__(self, "point_prices", prices)
                for key, price in prices.items():
                    # A key that can never match would leave its jobs unpriced, silently.
                    problem = price_key_problem(key)
                    if problem is not None:
                        found.append(
                            (
                                "Limits.point_prices",
                                f"{key!r} can never match a request ({problem}): keys are "
                                + _PRICE_KEY_FORMS,
                            )
                        )
                    elif _amount("", "", price, zero=True):
                        found.append(
                            (
                                "Limits.point_prices",
                                f"{key!r}: points per image must be a finite number >= 0",
                            )
                        )
        _raise(found)


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Deadlines, in seconds. Every wait in the client is bounded by one of these.

    Each is a finite number > 0 (a long ``job``, days even, is fine; infinity is refused).

    Attributes:
        connect: opening a connection, resolving the gateway's name included.
        request: one HTTP exchange, end to end.
        job: from submit until the job must be terminal (overridable per submit).
        close: how long ``aclose(drain=True)`` waits for outstanding jobs; also how long
            ``aclose()`` waits for submits in progress to unwind, and then for the poller to
            stop (a WARNING names what it left behind).
    """

    connect: float = 10.0
    request: float = 30.0
    job: float = 900.0
    close: float = 30.0

    def __post_init__(self) -> None:
        _raise(
            [
                *_amount("Timeouts", "connect", self.connect),
                *_amount("Timeouts", "request", self.request),
                *_amount("Timeouts", "job", self.job),
                *_amount("Timeouts", "close", self.close),
            ]
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter for retryable failures.

    ``max_attempts`` is an int >= 1; the waits are finite numbers (``initial_wait`` and
    ``max_wait`` >= 0, ``max_elapsed`` > 0).

    Attributes:
        max_attempts: tries per call, the first included.
        initial_wait: the first backoff ceiling in seconds; 0 makes retries instant (tests).
        max_wait: the largest single wait (a server's Retry-After is honoured up to this).
        max_elapsed: give up retrying once this many seconds have gone by: no try starts
            later (a backoff wait is cut to the time left; a Retry-After that runs past it
            ends the retries at once, as a try before it would be refused again).
    """

    max_attempts: int = 6
    initial_wait: float = 0.25
    max_wait: float = 10.0
    max_elapsed: float = 60.0

    def __post_init__(self) -> None:
        _raise(
            [
                *_count("RetryPolicy", "max_attempts", self.max_attempts),
                *_amount("RetryPolicy", "initial_wait", self.initial_wait, zero=True),
                *_amount("RetryPolicy", "max_wait", self.max_wait, zero=True),
                *_amount("RetryPolicy", "max_elapsed", self.max_elapsed),
            ]
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DownloadPolicy:
    """How images are downloaded and saved (``job.save``, ``client.download``, the CLI).

    A download ends, one way or the other, within ``deadline``: a server that trickles bytes
    fails as too slow (``min_rate``), and retries of transient failures stop once
    ``RetryPolicy.max_elapsed`` has gone by.

    Attributes:
        max_bytes: an image larger than this is refused (the declared length, the bytes as
            they stream, and ``b64_json`` text before it is decoded).
        concurrency: downloads (and connections to image servers) at once, per client.
        deadline: seconds one image may take in all: connecting, redirects, every attempt
            and the waits between them; None for no deadline.
        min_rate: bytes per second an image server must keep up, measured over
            ``rate_window``: every ``min_rate * rate_window`` bytes must arrive within
            ``rate_window`` seconds, or the attempt fails as too slow. None turns it off.
        rate_window: seconds over which ``min_rate`` is measured.
        connect_timeout: seconds to connect to an image server.
        read_timeout: seconds to wait for an image server's status line and headers
            (connecting included), and the longest silence allowed while reading its body.
        max_redirects: redirects followed per image, each one checked; 0 follows none.
        allow_http: allow plain ``http://`` image URLs on hosts that are not loopback (off:
            https only, so nobody on the path can swap the image).
    """

    max_bytes: int = 64 * 1024 * 1024
    concurrency: int = 16
    deadline: float | None = 120.0
    min_rate: float | None = 4096.0
    rate_window: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    max_redirects: int = 5
    allow_http: bool = False

    def __post_init__(self) -> None:
        found = [
            *_count("DownloadPolicy", "max_bytes", self.max_bytes),
            *_count("DownloadPolicy", "concurrency", self.concurrency),
            *_amount("DownloadPolicy", "deadline", self.deadline, optional=True),
            *_amount("DownloadPolicy", "min_rate", self.min_rate, optional=True),
            *_amount("DownloadPolicy", "rate_window", self.rate_window),
            *_amount("DownloadPolicy", "connect_timeout", self.connect_timeout),
            *_amount("DownloadPolicy", "read_timeout", self.read_timeout),
            *_count("DownloadPolicy", "max_redirects", self.max_redirects, minimum=0),
        ]
        if not isinstance(self.allow_http, bool):
            found.append(("DownloadPolicy.allow_http", "must be True or False"))
        _raise(found)
