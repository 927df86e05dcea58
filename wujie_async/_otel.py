"""OpenTelemetry spans and metrics of one client: imported only once opentelemetry is.

:class:`Recorder` is made by ``_telemetry.Telemetry.start`` when a global tracer or meter
provider is set; the call sites hand it plain values (paths, keys, counts, statuses, durations,
error types), never a body, a header or image bytes.

Spans (names and attributes follow the OpenTelemetry semantic conventions where one exists):

* ``wujie.job`` (INTERNAL): one per job, from ``submit()`` (or ``attach``/``resume``) to the
  job's end; parent: the caller's current span. An event ``status`` per status change (with
  the asks so far); its key once accepted; at its end its final status, asks, images, points
  and lateness. A failed submit ends it with ``error.type``.
* ``POST {url.template}`` (CLIENT), e.g. ``POST /wj-open/v1/ai/wj/images/info`` (the base
  URL's path and the route): one per HTTP attempt (a retry is a new span with
  ``http.request.resend_count``), the HTTP client conventions' attributes; child of its job
  span (submits) or batch span (polls).
* ``wujie.batch_query`` (INTERNAL): one per batch call, a root span linking the job spans of
  the keys it asked about (at most 50 links).
* ``wujie.download`` (INTERNAL): one per image saved by the downloader.

Metrics: see ``Instruments`` (names, units and attributes are tabled in
docs/guides/observability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer

from ._errors import JobCancelledError, snippet
from ._rules import KNOWN_MODELS

SCOPE = "wujie_async"
MAX_LINKS = 50  # a batch call asks about at most 50 keys; a span never links more
FLEET_ROLES = ("leader", "follower", "local")

# Buckets: the HTTP conventions' advice for request durations; jobs take seconds to minutes;
# lateness (gateway done -> future resolved) is tenths of seconds when all is well.
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
_JOB_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)
_LATENESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60)
_FILL_BUCKETS = (1, 2, 5, 10, 20, 30, 40, 45, 49, 50)
_DOWNLOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)

try:  # the provider get_meter_provider() hands out while none is set (not public API)
    from opentelemetry.metrics._internal import _ProxyMeterProvider as _UnsetMeterProvider
except ImportError:  # pragma: no cover - a future API without it: treat every provider as set
    _UnsetMeterProvider = metrics.NoOpMeterProvider  # type: ignore[misc,assignment]


# The context key OpenTelemetry's HTTP instrumentations read to skip a request (the API's own,
# since 1.x; read by name, as it is not in its __all__): see Recorder.own_http.
_SUPPRESS_HTTP: str | None = getattr(otel_context, "_SUPPRESS_HTTP_INSTRUMENTATION_KEY", None)


def _version() -> str:
    from . import __version__  # the package is imported by the time a client opens

    return __version__


class JobTrace:
    """One job's telemetry record: its span (None with metrics only) and what its end needs."""

    __slots__ = ("context", "model", "n", "span", "started")

    def __init__(self, span: Span | None, model: str, n: int | None) -> None:
        self.span = span
        # The job span as a parent, made once: the submit's HTTP spans are its children.
        self.context: Context | None = (
            trace.set_span_in_context(span, Context()) if span is not None else None
        )
        self.model = model
        self.n = n
        self.started = time.perf_counter()


class BatchTrace:
    """One batch call's span (None with metrics only) and its start."""

    __slots__ = ("context", "keys", "span", "started")

    def __init__(self, span: Span | None, keys: int) -> None:
        self.span = span
        self.context: Context | None = (
            trace.set_span_in_context(span, Context()) if span is not None else None
        )
        self.keys = keys
        self.started = time.perf_counter()


class Instruments:
    """The metric instruments, made once per meter provider and shared by its clients."""

    def __init__(self, provider: MeterProvider) -> None:
        meter = provider.get_meter(SCOPE, _version())
        # Observable gauges read every open client's state at collection time.
        self.recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()
        self.submits = meter.create_counter(
            "wujie.submits", "{submit}", "Submits by outcome: accepted, rejected, uncertain, unsent"
        )
        self.batch_calls = meter.create_counter(
            "wujie.batch.calls", "{call}", "Batch-detail calls, by outcome"
        )
        self.batch_keys = meter.create_counter(
            "wujie.batch.keys", "{key}", "Keys asked about in batch-detail calls"
        )
        self.batch_fill = meter.create_histogram(
            "wujie.batch.fill",
            "{key}",
            "Keys per batch-detail call (50 is full)",
            explicit_bucket_boundaries_advisory=_FILL_BUCKETS,
        )
        self.retries = meter.create_counter(
            "wujie.http.retries", "{request}", "HTTP requests that were retries, by endpoint"
        )
        self.rate_limited = meter.create_counter(
            "wujie.http.rate_limited", "{response}", "HTTP 429 replies, by endpoint"
        )
        self.http_duration = meter.create_histogram(
            "http.client.request.duration",
            "s",
            "Duration of HTTP client requests",
            explicit_bucket_boundaries_advisory=_HTTP_BUCKETS,
        )
        self.jobs_ended = meter.create_counter(
            "wujie.jobs.ended", "{job}", "Jobs that ended, by final status"
        )
        # Observed at collection time, not counted per job: two measurements per job saved.
        meter.create_observable_up_down_counter(
            "wujie.jobs.in_flight",
            [self._jobs_in_flight],
            "{job}",
            "Jobs being tracked (submitted or attached, not yet ended)",
        )
        self.points = meter.create_counter(
            "wujie.points.charged", "{point}", "Points the gateway reported charging for ended jobs"
        )
        self.job_duration = meter.create_histogram(
            "wujie.job.duration",
            "s",
            "From submit (or attach) to the job's end",
            explicit_bucket_boundaries_advisory=_JOB_BUCKETS,
        )
        self.lateness = meter.create_histogram(
            "wujie.job.lateness",
            "s",
            "From the gateway's reported completion to the job's future resolving",
            explicit_bucket_boundaries_advisory=_LATENESS_BUCKETS,
        )
        self.downloads = meter.create_counter(
            "wujie.downloads", "{image}", "Images saved by the downloader, by outcome"
        )
        self.download_duration = meter.create_histogram(
            "wujie.download.duration",
            "s",
            "Duration of one image's download and save",
            explicit_bucket_boundaries_advisory=_DOWNLOAD_BUCKETS,
        )
        meter.create_observable_gauge(
            "wujie.fleet.role",
            [self._fleet_roles],
            "{member}",
            "Fleet members of this process in each role (leader, follower, local)",
        )
        meter.create_observable_gauge(
            "wujie.brake.rate",
            [self._brake_rates],
            "{request}/s",
            "Requests per second a 429 brake allows, per kind of call, while it is engaged",
        )

    def _jobs_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(sum(recorder.jobs_in_flight() for recorder in list(self.recorders)))]

    def _fleet_roles(self, options: CallbackOptions) -> Iterable[Observation]:
        roles: Counter[str] = Counter()
        for recorder in list(self.recorders):
            role = recorder.fleet_role()
            if role is not None:
                roles[role] += 1
        if not roles:
            return []
        return [Observation(roles[role], {"wujie.fleet.role": role}) for role in FLEET_ROLES]

    def _brake_rates(self, options: CallbackOptions) -> Iterable[Observation]:
        rates: dict[str, float] = {}
        for recorder in list(self.recorders):
            for kind, rate in recorder.brake_rates():
                if rate is not None:
                    rates[kind] = rates.get(kind, 0.0) + rate
        return [Observation(rate, {"wujie.call": kind}) for kind, rate in rates.items()]


# One set of instruments per meter provider (there is one global provider per process).
_instruments: dict[int, tuple[MeterProvider, Instruments]] = {}


def _instruments_for(provider: MeterProvider) -> Instruments:
    held = _instruments.get(id(provider))
    if held is None or held[0] is not provider:
        held = (provider, Instruments(provider))
        _instruments[id(provider)] = held
    return held[1]


def _attribute_text(value: str) -> str:
    return snippet(value, limit=120)


def _model_name(model: Any) -> str:
    """The model as a span and metric attribute: one of the known models, else ``other``.

    A metric label must have few values: a model string comes from the caller (a web app may
    pass its users' text through) or a journaled request, and could be anything.
    """
    if not isinstance(model, str):
        return "unknown"
    return model if model in KNOWN_MODELS else "other"


class Recorder:
    """The spans and metrics of one client (see the module docstring)."""

    def __init__(
        self,
        tracer: Tracer | None,
        instruments: Instruments | None,
        *,
        base_url: str | None,
        jobs_in_flight: Callable[[], int] | None,
        brake_rates: Callable[[], Iterable[tuple[str, float | None]]] | None,
        fleet_role: Callable[[], str | None] | None,
    ) -> None:
        self.tracer = tracer
        self.instruments = instruments
        self._jobs_in_flight = jobs_in_flight
        self._brake_rates = brake_rates
        self._fleet_role = fleet_role
        self._server: dict[str, Any] = {}
        self._url_prefix = ""
        # The base URL's path, before each route: url.template is the template of the whole
        # path (the HTTP conventions), as url.full has it.
        self._base_path = ""
        if base_url is not None:
            parts = urlsplit(base_url)
            # No query or fragment, and (refused before we get here) no user:password@.
            self._url_prefix = f"{parts.scheme}://{parts.hostname}"
            if parts.port is not None:
                self._url_prefix += f":{parts.port}"
            self._base_path = parts.path.rstrip("/")
            self._url_prefix += self._base_path
            self._server = {
                "server.address": parts.hostname or "",
                "server.port": parts.port or (443 if parts.scheme == "https" else 80),
            }
        self._http_attributes: dict[str, dict[str, Any]] = {}  # per path
        if instruments is not None:
            instruments.recorders.add(self)

    @classmethod
    def from_globals(
        cls,
        *,
        base_url: str | None = None,
        jobs_in_flight: Callable[[], int] | None = None,
        brake_rates: Callable[[], Iterable[tuple[str, float | None]]] | None = None,
        fleet_role: Callable[[], str | None] | None = None,
    ) -> Recorder | None:
        """A recorder on the global providers; None when neither is set."""
        tracer_provider = trace.get_tracer_provider()
        tracer = None
        if not isinstance(tracer_provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            tracer = tracer_provider.get_tracer(SCOPE, _version())
        meter_provider = metrics.get_meter_provider()
        instruments = None
        if not isinstance(meter_provider, _UnsetMeterProvider | metrics.NoOpMeterProvider):
            instruments = _instruments_for(meter_provider)
        if tracer is None and instruments is None:
            return None
        return cls(
            tracer,
            instruments,
            base_url=base_url,
            jobs_in_flight=jobs_in_flight,
            brake_rates=brake_rates,
            fleet_role=fleet_role,
        )

    def close(self) -> None:
        """Stop reporting this client in the observable gauges."""
        if self.instruments is not None:
            self.instruments.recorders.discard(self)

    def jobs_in_flight(self) -> int:
        return self._jobs_in_flight() if self._jobs_in_flight is not None else 0

    def fleet_role(self) -> str | None:
        return self._fleet_role() if self._fleet_role is not None else None

    def brake_rates(self) -> Iterable[tuple[str, float | None]]:
        return self._brake_rates() if self._brake_rates is not None else ()

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        token = otel_context.attach(Context())
        try:
            yield
        finally:
            otel_context.detach(token)

    @contextlib.contextmanager
    def own_http(self) -> Iterator[None]:
        """Tell OpenTelemetry's HTTP instrumentations (aiohttp-client's) to leave the requests
        made in this block alone: this client records its API calls as CLIENT spans and its
        downloads as ``wujie.download`` spans itself. Instrumented too, every call was two
        CLIENT spans (and two duration points), and a download's span carried the image's
        whole URL, a CDN's signed token included, which this client never records."""
        if _SUPPRESS_HTTP is None:  # an API without the key: nothing to tell
            yield
            return
        token = otel_context.attach(otel_context.set_value(_SUPPRESS_HTTP, True))
        try:
            yield
        finally:
            otel_context.detach(token)

    # --- jobs -----------------------------------------------------------------------------------
    def job_started(self, origin: str, model: Any, n: int | None) -> JobTrace:
        """A job begins: ``origin`` is ``submit`` or ``attach`` (attach and resume)."""
        model_name = _model_name(model)
        span = None
        if self.tracer is not None:
            attributes: dict[str, Any] = {"wujie.job.origin": origin, "wujie.job.model": model_name}
            if n is not None:
                attributes["wujie.job.n"] = n
            span = self.tracer.start_span("wujie.job", attributes=attributes)
        return JobTrace(span, model_name, n)

    def job_accepted(self, job: JobTrace, key: str) -> None:
        """The gateway gave the job its key."""
        if job.span is not None:  # when: the end of the submit's HTTP span, its child
            job.span.set_attribute("wujie.job.key", key)

    def submit_ended(self, job: JobTrace, outcome: str, error: BaseException | None) -> None:
        """A submit ended: ``accepted``, or a failure (which also ends the job's span)."""
        if self.instruments is not None:
            attributes = {"wujie.submit.outcome": outcome, "wujie.job.model": job.model}
            if error is not None:
                attributes["error.type"] = type(error).__name__
            self.instruments.submits.add(1, attributes)
        if error is not None and job.span is not None:
            job.span.set_attribute("wujie.submit.outcome", outcome)
            if isinstance(error, asyncio.CancelledError) and outcome == "uncertain":
                # Cancelled, and yet maybe paid for: that is an error to see.
                job.span.set_attribute("error.type", "cancelled")
                job.span.set_status(
                    Status(StatusCode.ERROR, "cancelled on the wire: it may have been charged")
                )
            else:
                _fail(job.span, error)
            job.span.end()

    def job_status(self, job: JobTrace, status: str, asks: int) -> None:
        """The gateway reported a new status for the job."""
        if job.span is not None:
            job.span.add_event("status", {"wujie.job.status": status, "wujie.job.asks": asks})

    def job_ended(
        self,
        job: JobTrace,
        *,
        key: str,
        status: str,
        error: BaseException | None,
        asks: int,
        images: int,
        points: float | None,
        lateness: float | None,
    ) -> None:
        """The job ended (``status`` as ``_telemetry.ended_status`` words it)."""
        seconds = time.perf_counter() - job.started
        instruments = self.instruments
        if instruments is not None:
            attributes = {"wujie.job.status": status, "wujie.job.model": job.model}
            instruments.jobs_ended.add(1, attributes)
            instruments.job_duration.record(seconds, attributes)
            # A wait that timed out did not end the job (it runs on, and whoever attaches it
            # counts its points when it ends): counted now too, they would count twice.
            if points is not None and points > 0 and status != "timed_out":
                instruments.points.add(points, {"wujie.job.model": job.model})
            if lateness is not None:
                instruments.lateness.record(max(0.0, lateness), {"wujie.job.model": job.model})
        span = job.span
        if span is not None:
            span.set_attributes(
                {
                    "wujie.job.key": key,
                    "wujie.job.status": status,
                    "wujie.job.asks": asks,
                    "wujie.job.images": images,
                }
            )
            if points is not None:
                span.set_attribute("wujie.job.points", points)
            if lateness is not None:
                span.set_attribute("wujie.job.lateness", lateness)
            if isinstance(error, JobCancelledError):
                # The client stopped following it (job.cancel(), or the close at every deploy,
                # a journal resuming it later): not a failure, as for a call cut short.
                span.set_attribute("wujie.cancelled", True)
            elif error is not None:
                _fail(span, error)
            span.end()

    # --- batch calls ------------------------------------------------------------------------------
    def batch_started(self, jobs: Sequence[JobTrace | None]) -> BatchTrace:
        """A batch call about these jobs' keys begins (a root span linking their spans)."""
        span = None
        if self.tracer is not None:
            links = [
                Link(job.span.get_span_context())
                for job in jobs[:MAX_LINKS]
                if job is not None and job.span is not None
            ]
            span = self.tracer.start_span(
                "wujie.batch_query",
                context=Context(),  # a root: it serves many jobs, each linked
                links=links,
                attributes={"wujie.batch.keys": len(jobs)},
            )
        return BatchTrace(span, len(jobs))

    def batch_ended(
        self, batch: BatchTrace, *, error: BaseException | None, listed: int, malformed: int
    ) -> None:
        """The batch call ended: ``listed`` entries read, ``malformed`` of them unreadable."""
        instruments = self.instruments
        if instruments is not None:
            cancelled = isinstance(error, asyncio.CancelledError)  # no reply: the client closed
            said = "ok" if error is None else "cancelled" if cancelled else "error"
            outcome = {"wujie.batch.outcome": said}
            if error is not None and not cancelled:
                outcome["error.type"] = type(error).__name__
            instruments.batch_calls.add(1, outcome)
            instruments.batch_keys.add(batch.keys)
            instruments.batch_fill.record(batch.keys)
        span = batch.span
        if span is not None:
            span.set_attributes({"wujie.batch.listed": listed, "wujie.batch.malformed": malformed})
            if error is not None:
                _fail(span, error)
            span.end()

    # --- HTTP -------------------------------------------------------------------------------------
    def http_exchange(
        self,
        path: str,
        *,
        parent: JobTrace | BatchTrace | None,
        keys: int | None,
        attempt: int,
        status: int | None,
        error: BaseException | None,
        start_ns: int,
        seconds: float,
    ) -> None:
        """One HTTP attempt, recorded once it is over (its span gets its real start time)."""
        base = self._http_attributes.get(path)
        if base is None:
            base = {
                "http.request.method": "POST",
                **self._server,
                "url.template": self._base_path + path,
            }
            self._http_attributes[path] = base
        template = base["url.template"]
        attributes = dict(base)
        if status is not None:
            attributes["http.response.status_code"] = status
        error_type = None
        if error is not None and not isinstance(error, asyncio.CancelledError):
            # The HTTP conventions: the status code when the reply says error, else its type.
            # An attempt cut short by a cancellation (the client closing: every deploy) did
            # not fail: no error.type, on the span or the duration metric.
            error_type = str(status) if status is not None and status >= 400 else None
            error_type = error_type or type(error).__name__
            attributes["error.type"] = error_type
        instruments = self.instruments
        if instruments is not None:
            instruments.http_duration.record(seconds, attributes)
            endpoint = {"url.template": template}
            if attempt > 1:
                instruments.retries.add(1, endpoint)
            if status == 429:
                instruments.rate_limited.add(1, endpoint)
        if self.tracer is None:
            return
        attributes["url.full"] = self._url_prefix + path
        if attempt > 1:
            attributes["http.request.resend_count"] = attempt - 1
        if keys is not None:
            attributes["wujie.batch.keys"] = keys
        span = self.tracer.start_span(
            f"POST {template}",
            context=parent.context if parent is not None else None,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=start_ns,
        )
        if error is not None:
            _fail(span, error, error_type)
        span.end(start_ns + round(seconds * 1e9))

    # --- downloads --------------------------------------------------------------------------------
    def download_started(self, key: str | None, index: int, host: str | None) -> Span | None:
        """An image download (or save of inline bytes) begins (``key``: its job's, if known)."""
        if self.tracer is None:
            return None
        attributes: dict[str, Any] = {"wujie.image.index": index}
        if key is not None:
            attributes["wujie.job.key"] = key
        if host:
            attributes["server.address"] = _attribute_text(host)
        return self.tracer.start_span("wujie.download", attributes=attributes)

    def download_ended(
        self, span: Span | None, *, seconds: float, size: int | None, error: BaseException | None
    ) -> None:
        """It ended: ``size`` bytes saved, or ``error``."""
        instruments = self.instruments
        if instruments is not None:
            # A save whose caller gave up (or whose client closed) did not fail: cancelled.
            cancelled = isinstance(error, asyncio.CancelledError)
            said = "ok" if error is None else "cancelled" if cancelled else "error"
            attributes = {"wujie.download.outcome": said}
            if error is not None and not cancelled:
                attributes["error.type"] = type(error).__name__
            instruments.downloads.add(1, attributes)
            instruments.download_duration.record(seconds, attributes)
        if span is not None:
            if size is not None:
                span.set_attribute("wujie.download.bytes", size)
            if error is not None:
                _fail(span, error)
            span.end()


def _fail(span: Span, error: BaseException, error_type: str | None = None) -> None:
    if isinstance(error, asyncio.CancelledError):
        # Cancelled, not failed: a call on the wire when the client closes (every deploy),
        # or a caller that gave up. No error status, and no text: anyio's names a cancel
        # scope, a task and a source line.
        span.set_attribute("wujie.cancelled", True)
        return
    span.set_attribute("error.type", error_type or type(error).__name__)
    span.set_status(Status(StatusCode.ERROR, snippet(str(error), limit=200)))
