"""What telemetry costs the submit path and the poller: one run of N jobs, in one of three modes.

* ``absent``: opentelemetry cannot be imported at all (a meta-path blocker), as without the
  ``otel`` extra;
* ``no-provider``: opentelemetry-api is imported, no global provider is set (the extra
  installed, unused);
* ``sdk``: the SDK's tracer and meter providers are set (spans batched to an exporter that
  drops them, metrics kept in memory): every job, HTTP call and batch call is recorded.

The emulator runs in its own process (``common.emulator``). Prints one JSON line: the submit
phase's wall seconds (N submits through the CLI's 32-worker pool), and the whole run's wall and
CPU seconds (submits, then every job resolved). Compare modes run by run, in pairs: on a shared
machine only a paired ratio means anything, e.g. with hyperfine or ``/usr/bin/time`` in turns::

    python benchmarks/telemetry_overhead.py --mode absent --jobs 10000
    python benchmarks/telemetry_overhead.py --mode sdk --jobs 10000
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.abc
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class _BlockOpenTelemetry(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None, target: Any = None) -> None:
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(f"{name} is blocked (--mode absent)")
        return None


def _set_up(mode: str) -> None:
    if mode == "absent":
        sys.meta_path.insert(0, _BlockOpenTelemetry())
        return
    from opentelemetry import metrics, trace

    if mode == "no-provider":
        return
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(Drop()))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))


async def _run(jobs: int) -> dict[str, Any]:
    # Imported here, after _set_up: in --mode absent, nothing may import opentelemetry first.
    from common import CONCURRENCY, INTERVAL, emulator, requests_for, submit_all

    from wujie_async import ImageJob, Limits, PollPolicy, WujieClient

    poll = PollPolicy(min_interval=INTERVAL, first_poll_delay=INTERVAL)
    limits = Limits(max_concurrent_submits=CONCURRENCY, max_connections=64)
    requests = requests_for(jobs + 1)
    async with (
        emulator(0.01, 1) as gateway,
        WujieClient(
            gateway.credentials, base_url=gateway.base_url, poll=poll, limits=limits
        ) as client,
    ):
        made: list[ImageJob] = [await client.images.submit(**requests[0])]  # warm-up

        async def submit(request: dict[str, Any]) -> None:
            made.append(await client.images.submit(**request))

        cpu0, wall0 = time.process_time(), time.perf_counter()
        await submit_all(submit, requests[1:])
        submit_s = time.perf_counter() - wall0
        await asyncio.gather(*made, return_exceptions=True)
        return {
            "jobs": jobs,
            "submit_s": submit_s,
            "wall_s": time.perf_counter() - wall0,
            "cpu_s": time.process_time() - cpu0,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("absent", "no-provider", "sdk"), required=True)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--out", type=Path, help="also append the JSON line to this file")
    args = parser.parse_args()
    _set_up(args.mode)
    figures = {"mode": args.mode, **asyncio.run(_run(args.jobs))}
    line = json.dumps(figures)
    print(line)
    if args.out is not None:
        with args.out.open("a") as out:
            out.write(line + "\n")


if __name__ == "__main__":
    main()
