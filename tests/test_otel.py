"""OpenTelemetry traces and metrics, read back from the SDK's in-memory exporter and reader,
against the emulator (the SDK is a dev dependency only; the package needs just the API)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from wujie_async import (
    AuthenticationError,
    Credentials,
    GeneratedImage,
    JobTimeoutError,
    PollPolicy,
    RetryPolicy,
    SensitivePromptError,
    WujieClient,
    WujieError,
)
from wujie_async._addresses import AddressRule
from wujie_async._contract import CODE_SENSITIVE_PROMPT
from wujie_async._download import Downloader
from wujie_async._errors import ProtocolError
from wujie_async.emulator import FaultConfig
from wujie_async.emulator._png import render_png
from wujie_async.fleet import RedisFleet

from .conftest import INSTANT_RETRY, EmulatorFactory, make_client
from .fleet_support import any_redis, fleet_name
from .helpers import eventually, sign_header
from .hostile import file_server, image_server, scripted_gateway, throwaway_credentials
from .otel_support import Otel, otel, reset_globals
from .test_poller_hostile import client_for

__all__ = ["otel"]  # the fixture, imported for its use here
pytestmark = pytest.mark.anyio
# The emulator's base URL path: url.template (and the HTTP span's name) is the whole path.
BASE_PATH = "/wj-open/v1"

GENERATIONS = "/ai/wj/images/generations"
INFO = "/ai/wj/images/info"


def by_key(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {str((span.attributes or {})["wujie.job.key"]): span for span in spans}


def span_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


async def test_http_calls_and_jobs_are_spans_with_their_attributes(
    otel: Otel, emulator: EmulatorFactory
) -> None:
    tracer = trace.get_tracer("the-users-app")
    async with emulator() as emu, make_client(emu) as client:
        with tracer.start_as_current_span("handle request") as request:
            jobs = [
                await client.images.submit(prompt=f"p{i}", model="gpt-image-1", n=2)
                for i in range(3)
            ]
        await asyncio.gather(*jobs)
    port = int(emu.base_url.split(":")[2].split("/")[0])

    job_spans = by_key(otel.spans("wujie.job"))
    assert set(job_spans) == {job.key for job in jobs}
    for job in jobs:
        span = job_spans[job.key]
        attributes = span.attributes or {}
        assert attributes["wujie.job.model"] == "gpt-image-1"
        assert attributes["wujie.job.n"] == 2
        assert attributes["wujie.job.status"] == "succeeded"
        assert attributes["wujie.job.images"] == 2
        assert attributes["wujie.job.asks"] == job_asks(otel, span)
        assert attributes["wujie.job.points"] == job.points_charged
        assert 0 <= float(attributes["wujie.job.lateness"]) < 5  # type: ignore[arg-type]
        assert span.parent is not None and span.parent.span_id == request.get_span_context().span_id
        assert span.status.status_code == StatusCode.UNSET
        assert {event.name for event in span.events} <= {"status"}

    submits = otel.spans(f"POST {BASE_PATH}{GENERATIONS}")
    assert len(submits) == 3
    job_ids = {span_id(span) for span in job_spans.values()}
    for span in submits:
        attributes = span.attributes or {}
        assert span.kind == SpanKind.CLIENT
        assert span.parent is not None and span.parent.span_id in job_ids
        assert attributes["http.request.method"] == "POST"
        assert attributes["server.address"] == "127.0.0.1"
        assert attributes["server.port"] == port
        assert attributes["url.full"] == f"http://127.0.0.1:{port}/wj-open/v1{GENERATIONS}"
        assert attributes["url.template"] == "/wj-open/v1/ai/wj/images/generations"
        assert attributes["http.response.status_code"] == 200
        assert "error.type" not in attributes

    batches = otel.spans("wujie.batch_query")
    assert batches
    linked: set[int] = set()
    for batch in batches:
        assert batch.parent is None  # a root: it serves many jobs, linked
        links = {link.context.span_id for link in batch.links}
        assert links <= job_ids
        assert len(links) == (batch.attributes or {})["wujie.batch.keys"]
        linked |= links
    assert linked == job_ids
    polls = otel.spans(f"POST {BASE_PATH}{INFO}")
    assert {span.parent.span_id for span in polls if span.parent} == {
        span_id(batch) for batch in batches
    }


def job_asks(otel: Otel, job_span: ReadableSpan) -> int:
    """How many batch calls linked this job's span: its asks, seen from the batch spans."""
    me = span_id(job_span)
    return sum(
        any(link.context.span_id == me for link in batch.links)
        for batch in otel.spans("wujie.batch_query")
    )


@pytest.mark.long
async def test_a_batch_span_links_no_more_than_its_fifty_keys(
    otel: Otel, emulator: EmulatorFactory
) -> None:
    # Every key's first ask waits until all 60 are in: the first call asks about 50 of them.
    poll = PollPolicy(first_poll_delay=1.0, min_interval=0.03, batch_fill_horizon=1.0)
    async with emulator() as emu, make_client(emu, poll=poll) as client:
        jobs = await asyncio.gather(
            *(client.images.submit(prompt=f"p{i}", model="dall-e-2") for i in range(60))
        )
        await asyncio.gather(*jobs)
    batches = otel.spans("wujie.batch_query")
    assert max(len(batch.links) for batch in batches) == 50
    linked = {link.context.span_id for batch in batches for link in batch.links}
    assert len(linked) == 60


async def test_retries_and_429s_are_counted_by_endpoint(
    otel: Otel, emulator: EmulatorFactory
) -> None:
    faults = FaultConfig(burst_429=2, retry_after_s=0, endpoints=frozenset({"generations"}))
    async with emulator(faults=faults) as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="p", model="dall-e-2")
        await job
    attempts = sorted(
        otel.spans(f"POST {BASE_PATH}{GENERATIONS}"), key=lambda span: span.start_time or 0
    )
    assert [(s.attributes or {})["http.response.status_code"] for s in attempts] == [429, 429, 200]
    assert [(s.attributes or {}).get("error.type") for s in attempts] == ["429", "429", None]
    assert [(s.attributes or {}).get("http.request.resend_count") for s in attempts] == [
        None,
        1,
        2,
    ]
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert otel.total("wujie.http.rate_limited", **{"url.template": BASE_PATH + GENERATIONS}) == 2
    assert otel.total("wujie.http.retries", **{"url.template": BASE_PATH + GENERATIONS}) == 2
    assert otel.total("wujie.http.retries", **{"url.template": BASE_PATH + INFO}) == 0
    assert otel.total("http.client.request.duration", **{"http.response.status_code": 429}) == 2


async def test_a_close_counts_no_retry_it_never_sent_and_no_call_it_cut_short(
    otel: Otel, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A submit waiting out a 429's Retry-After, and a batch call waiting for a slow reply,
    when the client closes: no retry was sent and no call answered, and nothing says so."""
    faults = FaultConfig(burst_429=1, retry_after_s=5, endpoints=frozenset({"generations"}))
    async with emulator(faults=faults) as emu:
        client = make_client(emu, retry=RetryPolicy())
        async with client:
            waiting = asyncio.ensure_future(client.images.submit(prompt="p", model="dall-e-2"))
            await eventually(lambda: emu.stats()["requests"].get("generations", 0) == 1)
        with contextlib.suppress(WujieError):
            await waiting
        assert emu.stats()["requests"]["generations"] == 1
    assert client.stats.retries == 0
    assert otel.total("wujie.http.retries") == 0

    slow = FaultConfig(slow_reply=1.0, slow_reply_s=60, endpoints=frozenset({"info"}))
    async with emulator(faults=slow) as emu:
        with caplog.at_level("DEBUG", logger="wujie_async"):
            async with make_client(emu) as client:
                job = await client.images.submit(prompt="p", model="dall-e-2")
                await eventually(lambda: emu.stats()["requests"].get("info", 0) == 1)
        assert job.done()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert f"POST {INFO} -> no reply" in logged and "cancel scope" not in logged, logged
    assert otel.total("wujie.batch.calls", **{"wujie.batch.outcome": "cancelled"}) == 1
    assert otel.total("wujie.batch.calls", **{"wujie.batch.outcome": "ok"}) == 0
    # Cut short by the close (every deploy has one): no error status, and none of anyio's text
    # (a cancel scope's address, a task, a source line).
    cut = otel.spans("wujie.batch_query") + otel.spans(f"POST {BASE_PATH}{INFO}")
    assert cut, [span.name for span in otel.spans()]
    for span in cut:
        assert span.status.status_code is not StatusCode.ERROR, (span.name, span.status)
        assert not span.status.description, span.status
        assert span.attributes is not None and span.attributes.get("wujie.cancelled") is True


async def test_a_job_cancelled_or_left_by_the_close_is_no_error_span(
    otel: Otel, emulator: EmulatorFactory
) -> None:
    """A job the client stops following (``job.cancel()``, or the close at every deploy, its
    journal resuming it later) did not fail: its span says cancelled, with no error status."""
    async with emulator(time_scale=1.0) as emu:
        async with make_client(emu) as client:
            dropped = await client.images.submit(prompt="dropped", model="dall-e-2")
            left = await client.images.submit(prompt="left", model="dall-e-2")
            dropped.cancel()
    spans = by_key(otel.spans("wujie.job"))
    for job in (dropped, left):
        span = spans[job.key]
        assert (span.attributes or {}).get("wujie.job.status") == "cancelled", span.attributes
        assert (span.attributes or {}).get("wujie.cancelled") is True, span.attributes
        assert span.status.status_code is not StatusCode.ERROR, span.status
        assert "error.type" not in (span.attributes or {}), span.attributes


async def test_a_call_or_save_cut_short_is_no_error_in_http_or_download_metrics(
    otel: Otel, emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """An HTTP attempt cut short by the close (every deploy has one) and a save whose caller
    gave up carry no error.type: an error rate read off error.type (the HTTP conventions'
    way) does not rise at each deploy."""
    slow = FaultConfig(slow_reply=1.0, slow_reply_s=60, endpoints=frozenset({"info"}))
    async with emulator(faults=slow) as emu:
        async with make_client(emu) as client:
            await client.images.submit(prompt="p", model="dall-e-2")
            await eventually(lambda: emu.stats()["requests"].get("info", 0) == 1)
    [cut] = otel.spans(f"POST {BASE_PATH}{INFO}")
    assert (cut.attributes or {}).get("wujie.cancelled") is True
    assert "error.type" not in (cut.attributes or {}), cut.attributes
    durations = otel.metrics()["http.client.request.duration"]
    assert len(durations) == 2  # the submit's attempt and the cut one
    assert all("error.type" not in (point.attributes or {}) for point in durations), durations

    everything = AddressRule.everything()
    async with image_server() as images, Downloader(addresses=everything) as downloader:
        save = asyncio.ensure_future(
            downloader.save(GeneratedImage(0, images.url("trickle")), tmp_path / "K1.{ext}")
        )
        await eventually(lambda: images.hits["trickle"] == 1)
        save.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await save
    [gave_up] = otel.spans("wujie.download")
    assert (gave_up.attributes or {}).get("wujie.cancelled") is True
    assert "error.type" not in (gave_up.attributes or {})
    assert otel.total("wujie.downloads", **{"wujie.download.outcome": "cancelled"}) == 1
    for name in ("wujie.downloads", "wujie.download.duration"):
        for point in otel.metrics()[name]:
            held = point.attributes or {}
            assert held.get("wujie.download.outcome") == "cancelled", held
            assert "error.type" not in held, held


async def test_points_of_a_job_whose_wait_timed_out_are_counted_once_when_it_ends(
    otel: Otel,
) -> None:
    """A gateway that reports integral_cost while the job runs (points taken up front): the
    job's wait times out (the job runs on), an attach collects it later. Its points are
    counted once, when it ends, as client.stats counts them."""
    ended = asyncio.Event()

    def script(keys: list[str]) -> list[dict[str, Any]]:
        status = 4 if ended.is_set() else 1
        images = [{"url": "https://img.example/1.png"}] if ended.is_set() else []
        return [{"key": k, "status": status, "integral_cost": 8, "images": images} for k in keys]

    async with scripted_gateway(script) as gateway, client_for(gateway) as client:
        job = await client.images.submit(prompt="p", model="dall-e-2", job_timeout=0.2)
        with pytest.raises(JobTimeoutError):
            await job
        ended.set()
        await client.images.attach(job.key, n=1)
        assert client.stats.points_charged == 8
    assert otel.total("wujie.points.charged") == 8


async def test_a_refused_submit_ends_its_job_span_with_the_error(
    otel: Otel, emulator: EmulatorFactory
) -> None:
    faults = FaultConfig(business_error=1.0, business_error_code=CODE_SENSITIVE_PROMPT)
    async with emulator(faults=faults) as emu, make_client(emu) as client:
        with pytest.raises(SensitivePromptError):
            await client.images.submit(prompt="p", model="dall-e-2")
    [span] = otel.spans("wujie.job")
    attributes = span.attributes or {}
    assert span.status.status_code == StatusCode.ERROR
    assert attributes["error.type"] == "SensitivePromptError"
    assert attributes["wujie.submit.outcome"] == "rejected"
    assert "wujie.job.key" not in attributes
    assert otel.total("wujie.submits", **{"wujie.submit.outcome": "rejected"}) == 1
    assert otel.total("wujie.submits", **{"wujie.submit.outcome": "accepted"}) == 0


async def test_the_model_attribute_has_few_values_whatever_callers_pass(
    otel: Otel, emulator: EmulatorFactory
) -> None:
    """A web app may pass its users' text as the model: a metric label must not take a new
    value for each (unknown models are ``other``)."""
    async with emulator() as emu, make_client(emu) as client:
        for i in range(5):
            with contextlib.suppress(WujieError):
                await client.images.submit(prompt="p", model=f"user-text-{i}")
        await client.images.submit(prompt="p", model="dall-e-2")
    models = {
        (point.attributes or {}).get("wujie.job.model") for point in otel.metrics()["wujie.submits"]
    }
    assert models == {"other", "dall-e-2"}
    assert {(s.attributes or {})["wujie.job.model"] for s in otel.spans("wujie.job")} == models


async def test_the_metrics_of_a_run(otel: Otel, emulator: EmulatorFactory) -> None:
    faults = FaultConfig(moderation_words=("forbidden",))
    async with emulator(faults=faults) as emu, make_client(emu) as client:
        jobs = [await client.images.submit(prompt=f"p{i}", model="dall-e-2") for i in range(8)]
        jobs.append(await client.images.submit(prompt="forbidden", model="dall-e-2"))
        pending = sum(not job.done() for job in jobs)  # read with no await in between
        assert pending and otel.total("wujie.jobs.in_flight") == pending
        await asyncio.gather(*jobs, return_exceptions=True)
        assert otel.total("wujie.jobs.in_flight") == 0
        stats = client.stats
    assert otel.total("wujie.submits", **{"wujie.submit.outcome": "accepted"}) == 9
    assert otel.total("wujie.jobs.ended", **{"wujie.job.status": "succeeded"}) == 8
    assert otel.total("wujie.jobs.ended", **{"wujie.job.status": "rejected"}) == 1
    assert otel.total("wujie.job.duration", **{"wujie.job.model": "dall-e-2"}) == 9
    assert otel.total("wujie.job.lateness") == 9  # the emulator reports complete_time
    assert otel.total("wujie.batch.calls", **{"wujie.batch.outcome": "ok"}) == stats.batch_calls
    assert otel.total("wujie.batch.keys") == stats.keys_polled
    assert otel.total("wujie.batch.fill") == stats.batch_calls
    assert otel.total("http.client.request.duration") == stats.http_calls
    charged = sum(job.points_charged or 0 for job in jobs)
    assert charged > 0
    assert otel.total("wujie.points.charged") == pytest.approx(charged)


async def test_an_attached_job_is_a_span_from_attach(otel: Otel, emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        async with make_client(emu) as first:
            key = (await first.images.submit(prompt="p", model="dall-e-2")).key
        otel.spans_exporter.clear()
        async with make_client(emu) as second:
            await second.images.attach(key)
    [span] = otel.spans("wujie.job")
    attributes = span.attributes or {}
    assert attributes["wujie.job.origin"] == "attach"
    assert attributes["wujie.job.key"] == key
    assert attributes["wujie.job.status"] == "succeeded"


async def test_downloads_are_traced(otel: Otel, tmp_path: Path) -> None:
    everything = AddressRule.everything()
    async with file_server() as origin, Downloader(addresses=everything) as downloader:
        png, html = (
            GeneratedImage(0, f"{origin}/files/png"),
            GeneratedImage(1, f"{origin}/files/html"),
        )
        saved = await downloader.save(png, tmp_path / "K1-0.{ext}", key="K1")
        with pytest.raises(ProtocolError):
            await downloader.save(html, tmp_path / "K1-1.{ext}", key="K1")
    ok, failed = sorted(otel.spans("wujie.download"), key=lambda s: s.start_time or 0)
    assert (ok.attributes or {})["wujie.download.bytes"] == saved.bytes
    assert (ok.attributes or {})["wujie.job.key"] == "K1"
    assert (ok.attributes or {})["server.address"] == "127.0.0.1"
    assert (failed.attributes or {})["error.type"] == "ProtocolError"
    assert failed.status.status_code == StatusCode.ERROR
    assert otel.total("wujie.downloads", **{"wujie.download.outcome": "ok"}) == 1
    assert otel.total("wujie.downloads", **{"wujie.download.outcome": "error"}) == 1
    [duration, *_] = otel.metrics()["wujie.download.duration"]
    assert tuple(duration.explicit_bounds)[:3] == (0.05, 0.1, 0.25)  # type: ignore[union-attr]


async def test_an_http_instrumentation_of_the_users_leaves_the_clients_requests_alone(
    otel: Otel, emulator: EmulatorFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A web app that instruments aiohttp's client (opentelemetry-instrumentation-aiohttp-
    client adds a TraceConfig to every ClientSession, and skips a request whose context holds
    the API's suppress-HTTP key) got a second CLIENT span for each API call, and for each
    download a span carrying the image's whole URL, a CDN's signed token included: the
    client's requests are made with that key set, as it records them itself."""
    from opentelemetry import context as otel_context

    key = otel_context._SUPPRESS_HTTP_INSTRUMENTATION_KEY
    seen: list[tuple[str, object]] = []

    async def on_request_start(
        session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestStartParams
    ) -> None:
        seen.append((params.url.path, otel_context.get_value(key)))

    instrumented = aiohttp.TraceConfig()
    instrumented.on_request_start.append(on_request_start)
    plain_init = aiohttp.ClientSession.__init__

    def init(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> None:
        kwargs["trace_configs"] = [*(kwargs.get("trace_configs") or ()), instrumented]
        plain_init(self, *args, **kwargs)

    monkeypatch.setattr(aiohttp.ClientSession, "__init__", init)  # as the instrumentor does
    async with emulator() as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="a fox", model="dall-e-2")
        [saved] = await job.save(tmp_path)
        async with aiohttp.ClientSession() as own:  # the app's own requests stay its own
            async with own.get(f"{emu.base_url}/nothing") as reply:
                await reply.read()
    assert saved.bytes > 0
    ours = [(path, told) for path, told in seen if not path.endswith("/nothing")]
    paths = {path for path, _ in ours}
    assert {BASE_PATH + GENERATIONS, BASE_PATH + INFO} <= paths
    assert any(path.startswith("/files/") for path in paths), paths  # the download
    assert all(told is True for _, told in ours), ours
    assert [told for path, told in seen if path.endswith("/nothing")] == [None]


async def test_a_fleet_members_role_is_a_gauge(
    otel: Otel, emulator: EmulatorFactory, tmp_path: Path
) -> None:
    async with (
        any_redis(tmp_path) as url,
        emulator() as emu,
        make_client(emu, fleet=RedisFleet(url, name=fleet_name())) as client,
    ):
        fleet = await eventually(
            lambda: (stats := client.stats.fleet) is not None and stats.role == "leader",
            what="the one member leading",
        )
        assert fleet
        assert otel.total("wujie.fleet.role", **{"wujie.fleet.role": "leader"}) == 1
        assert otel.total("wujie.fleet.role", **{"wujie.fleet.role": "follower"}) == 0


def test_the_fleet_role_hook_logs_each_change_once(caplog: pytest.LogCaptureFixture) -> None:
    from wujie_async._telemetry import Telemetry

    telemetry = Telemetry()
    with caplog.at_level(logging.INFO, logger="wujie_async"):
        telemetry.fleet_role_changed("follower", member="m1")
        telemetry.fleet_role_changed("follower", member="m1")
        telemetry.fleet_role_changed("leader", member="m1")
    lines = [r.getMessage() for r in caplog.records if r.name == "wujie_async"]
    assert lines == [
        "fleet member m1: role none -> follower",
        "fleet member m1: role follower -> leader",
    ]


async def test_a_client_opened_before_any_provider_records_nothing(
    emulator: EmulatorFactory,
) -> None:
    """The providers are resolved once, at open: none set then means no telemetry at all."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    reset_globals()
    try:
        async with emulator() as emu, make_client(emu) as client:
            trace.set_tracer_provider(tracer_provider)
            metrics.set_meter_provider(meter_provider)
            await (await client.images.submit(prompt="p", model="dall-e-2"))
        assert exporter.get_finished_spans() == ()
        data = reader.get_metrics_data()
        assert data is None or not data.resource_metrics
    finally:
        reset_globals()
        tracer_provider.shutdown()
        meter_provider.shutdown()


def _spans_and_metrics_text(otel: Otel) -> str:
    """Every name, attribute, event, link and status text of the spans, and every metric
    attribute, as one text to search."""
    parts: list[str] = []
    for span in otel.spans():
        parts += [span.name, repr(dict(span.attributes or {})), str(span.status.description)]
        parts += [f"{event.name} {dict(event.attributes or {})}" for event in span.events]
        parts += [repr(dict(link.attributes or {})) for link in span.links]
    for name, points in otel.metrics().items():
        parts += [name, *(repr(dict(point.attributes or {})) for point in points)]
    return "\n".join(parts)


@pytest.mark.long
async def test_no_secret_reaches_a_log_record_a_span_or_a_metric(
    otel: Otel, emulator: EmulatorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    png = render_png("K", 0, 8, 8)
    inline = base64.b64encode(png).decode()

    def script(keys: list[str]) -> list[Any]:
        image = {"url": None, "b64_json": inline, "revised_prompt": None}
        return [{"key": key, "status": 4, "images": [image], "complete_time": 1} for key in keys]

    started = int(time.time())
    faults = FaultConfig(burst_429=1, retry_after_s=0)
    async with emulator(faults=faults) as emu:
        async with make_client(emu) as client:  # a 429 and its retry, polls, a job's end
            await (await client.images.submit(prompt="p", model="dall-e-2"))
        wrong = Credentials(emu.credentials.app_id, throwaway_credentials().private_key)
        async with WujieClient(wrong, base_url=emu.base_url, retry=INSTANT_RETRY) as client:
            # a 401, re-signed, a 401 again
            with pytest.raises(AuthenticationError):
                await client.images.submit(prompt="p", model="dall-e-2")
    async with scripted_gateway(script) as gateway, client_for(gateway) as client:
        result = await (await client.images.submit(prompt="p", model="dall-e-2"))
        assert result.images[0].b64_json == inline
        await client.download(result.images[0], tmp_path / "inline.{ext}", key=result.key)
    ended = int(time.time())

    logged = caplog.text + "\n".join(repr(record.args) for record in caplog.records)
    recorded = _spans_and_metrics_text(otel)
    assert "POST /ai/wj/images/generations -> 429" in logged  # the story was told
    assert "wujie.job" in recorded and "wujie.download" in recorded
    secrets = ["Authorization", "secretKeyVersion", inline[100:160]]
    for credentials in (emu.credentials, wrong):
        key = credentials.private_key
        secrets += [key[i : i + 40] for i in range(0, len(key) - 40, 200)]
        for second in range(started - 1, ended + 2):  # every signature these runs can have made
            header = json.loads(sign_header(credentials.app_id, key, second))
            secrets.append(header["sign"])
    for secret in secrets:
        assert secret not in logged, secret
        assert secret not in recorded, secret


async def test_a_provider_that_fails_leaves_the_client_working(
    emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(trace.TracerProvider):
        def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
            raise RuntimeError("broken provider")

    reset_globals()
    try:
        trace.set_tracer_provider(Broken())
        async with emulator() as emu, make_client(emu) as client:
            result = await (await client.images.submit(prompt="p", model="dall-e-2"))
        assert result.status == 4
    finally:
        reset_globals()
    assert "OpenTelemetry could not be set up (RuntimeError: broken provider)" in caplog.text
