"""OpenTelemetry's SDK, in memory, as a user's global providers for one test.

A process may set its global providers once; the fixture sets fresh ones for each test and puts
the API's globals back to "none set" afterwards, as opentelemetry's own test utilities do
(``opentelemetry.test.globals_test``), so the next test's clients see no provider.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.metrics import _internal as metrics_internal
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ExponentialHistogramDataPoint,
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once


def reset_globals() -> None:
    """Back to "no provider set" (what opentelemetry's test utilities do between tests)."""
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    metrics_internal._METER_PROVIDER_SET_ONCE = Once()
    metrics_internal._METER_PROVIDER = None


Point = NumberDataPoint | HistogramDataPoint | ExponentialHistogramDataPoint


@dataclass
class Otel:
    """The in-memory exporter and reader behind the global providers."""

    spans_exporter: InMemorySpanExporter
    reader: InMemoryMetricReader

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        found = self.spans_exporter.get_finished_spans()
        return [span for span in found if name is None or span.name == name]

    def metrics(self) -> dict[str, list[Point]]:
        """Metric name -> its data points (cumulative since the test began)."""
        data = self.reader.get_metrics_data()
        points: dict[str, list[Point]] = {}
        if data is None:
            return points
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    points.setdefault(metric.name, []).extend(metric.data.data_points)
        return points

    def total(self, name: str, **attributes: Any) -> float:
        """The sum (counters) or count (histograms) of ``name``'s points with ``attributes``."""
        total = 0.0
        for point in self.metrics().get(name, []):
            held = point.attributes or {}
            if all(held.get(k) == v for k, v in attributes.items()):
                total += point.value if isinstance(point, NumberDataPoint) else point.count
        return total


@pytest.fixture
def otel() -> Iterator[Otel]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    reset_globals()
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    try:
        yield Otel(exporter, reader)
    finally:
        reset_globals()
        tracer_provider.shutdown()
        meter_provider.shutdown()
