"""Policies: small frozen value objects, each with safe defaults.

``None`` means "off" (no limit); every field is keyword-only so call sites read as settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ._errors import InvalidRequestError


def _check_positive(owner: str, **values: float | None) -> None:
    bad = [
        (f"{owner}.{name}", "must be a positive number or None")
        for name, value in values.items()
        if value is not None and (not isinstance(value, int | float) or not value > 0)
    ]
    if bad:
        raise InvalidRequestError(bad)


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
            or has none, or is still queued.
        age_fraction: share of a job's age to wait between asks once it overran (backs off
            for slow jobs; bounds how late they are noticed).
        max_estimate_wait: the longest wait on an estimate before asking again.
        queue_position_seconds: with no estimate, seconds to wait per job ahead in the queue
            (``queue_before_num``), within ``min_interval`` and ``max_interval``.
        batch_fill_horizon: keys due within this many seconds may ride along in a batch call
            that has room, so calls go out full instead of more often.
        unknown_key_grace: how long a key may be absent from replies before it fails as unknown.
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
        _check_positive(
            "PollPolicy",
            first_poll_delay=self.first_poll_delay,
            min_interval=self.min_interval,
            max_interval=self.max_interval,
            max_estimate_wait=self.max_estimate_wait,
            unknown_key_grace=self.unknown_key_grace,
        )
        for name in ("max_interval", "max_estimate_wait"):
            if getattr(self, name) < self.min_interval:
                raise InvalidRequestError([(f"PollPolicy.{name}", "must be >= min_interval")])
        for name in ("age_fraction", "queue_position_seconds", "batch_fill_horizon"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0 or math.isnan(value):
                raise InvalidRequestError([(f"PollPolicy.{name}", "must be a number >= 0")])


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
            runs alone until its cost is known.
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
        _check_positive(
            "Limits",
            max_connections=self.max_connections,
            max_concurrent_submits=self.max_concurrent_submits,
            max_submits_per_second=self.max_submits_per_second,
            max_concurrent_polls=self.max_concurrent_polls,
            max_in_flight=self.max_in_flight,
            max_response_bytes=self.max_response_bytes,
        )
        if self.max_points is not None:
            points = self.max_points
            if isinstance(points, bool) or not isinstance(points, int | float) or not points >= 0:
                raise InvalidRequestError([("Limits.max_points", "must be a number >= 0 or None")])
        if self.point_prices is not None:
            if not isinstance(self.point_prices, Mapping):
                raise InvalidRequestError(
                    [
                        (
                            "Limits.point_prices",
                            "must be a mapping of model[/size[/quality]] to points",
                        )
                    ]
                )
            for key, price in self.point_prices.items():
                if (
                    not isinstance(key, str)
                    or isinstance(price, bool)
                    or not isinstance(price, int | float)
                    or not price >= 0
                ):
                    raise InvalidRequestError(
                        [
                            (
                                "Limits.point_prices",
                                f"{key!r}: points per image must be a number >= 0",
                            )
                        ]
                    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Deadlines, in seconds. Every wait in the client is bounded by one of these.

    Attributes:
        connect: opening a connection.
        request: one HTTP exchange, end to end.
        job: from submit until the job must be terminal (overridable per submit).
        close: how long ``aclose(drain=True)`` waits for outstanding jobs.
    """

    connect: float = 10.0
    request: float = 30.0
    job: float = 900.0
    close: float = 30.0

    def __post_init__(self) -> None:
        _check_positive(
            "Timeouts", connect=self.connect, request=self.request, job=self.job, close=self.close
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter for retryable failures.

    Attributes:
        max_attempts: tries per call, the first included.
        initial_wait: the first backoff ceiling in seconds; 0 makes retries instant (tests).
        max_wait: the largest single wait (a server's Retry-After is honoured up to this).
        max_elapsed: give up retrying once this many seconds have gone by.
    """

    max_attempts: int = 6
    initial_wait: float = 0.25
    max_wait: float = 10.0
    max_elapsed: float = 60.0

    def __post_init__(self) -> None:
        _check_positive("RetryPolicy", max_attempts=self.max_attempts, max_elapsed=self.max_elapsed)
        if self.initial_wait < 0 or self.max_wait < 0:
            raise InvalidRequestError([("RetryPolicy.initial_wait", "must be >= 0")])


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
        _check_positive(
            "DownloadPolicy",
            max_bytes=self.max_bytes,
            concurrency=self.concurrency,
            deadline=self.deadline,
            min_rate=self.min_rate,
            rate_window=self.rate_window,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
        )
        bad = [
            (f"DownloadPolicy.{name}", "must be a whole number")
            for name in ("max_bytes", "concurrency")
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool)
        ]
        if (
            not isinstance(self.max_redirects, int)
            or isinstance(self.max_redirects, bool)
            or self.max_redirects < 0
        ):
            bad.append(("DownloadPolicy.max_redirects", "must be a whole number >= 0"))
        if not isinstance(self.allow_http, bool):
            bad.append(("DownloadPolicy.allow_http", "must be True or False"))
        if bad:
            raise InvalidRequestError(bad)
