"""Where the client's CPU goes: a breakdown against the floor, and a cProfile of a full run.

    .venv/bin/python benchmarks/cpu_profile.py [--jobs 10000]

Writes benchmarks/results/profile.txt. Every figure is client CPU per job, measured in this
process against one emulator in its own process:
  floor            plain aiohttp POSTs of the submit bodies (as in run.py)
  submit only      client.images.submit(...) with polling pushed out of the run
  full run         submit, poll until every job ended, resolve every future
then the garbage collector's pauses during a full run (gc.callbacks), and the cProfile of
one full run, sorted by own time. (It uses the public API only: the transport's own share
shows in the profile, under wujie_async/_transport.py and the modules it reads replies and
failures with: _envelopes.py, _body_decoding.py, _connections.py, _failures.py.)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import time
from typing import Any

import run  # the sibling module: python puts this script's folder first on sys.path

from wujie_async import ImageJob, Limits, PollPolicy, WujieClient

NO_POLLING = PollPolicy(
    first_poll_delay=3600, min_interval=3600, max_interval=3600, max_estimate_wait=3600
)
POLLING = PollPolicy(min_interval=run.INTERVAL, first_poll_delay=run.INTERVAL)


async def client_run(gateway: run.Gateway, count: int, *, poll: bool) -> float:
    """Client CPU seconds to submit ``count`` jobs (and, with ``poll``, to see them end)."""
    requests = run.requests_for(count)
    jobs: list[ImageJob] = []
    started = time.process_time()
    async with WujieClient(
        gateway.credentials,
        base_url=gateway.base_url,
        poll=POLLING if poll else NO_POLLING,
        limits=Limits(max_concurrent_submits=run.CONCURRENCY),
    ) as client:

        async def submit(request: dict[str, Any]) -> None:
            jobs.append(await client.images.submit(**request))

        await run.submit_all(submit, requests)
        for job in jobs:
            if poll:
                await job
            else:
                job.cancel()
    return time.process_time() - started


async def main(count: int) -> str:
    lines: list[str] = [f"{count:,} jobs, time_scale 0.1, {run.CONCURRENCY} submit workers", ""]
    async with run.emulator(0.1, seed=11) as gateway:
        floor = (await run.run_floor(gateway, count))["cpu_per_job_us"]
        rows = [
            ("floor", floor),
            ("submit only", await client_run(gateway, count, poll=False) / count * 1e6),
            ("full run", await client_run(gateway, count, poll=True) / count * 1e6),
        ]
        lines += [f"{name:15} {us:7.0f} µs/job  {us / floor:4.2f}x floor" for name, us in rows]

        pauses: list[float] = []
        begun: list[float] = []

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                begun.append(time.perf_counter())
            elif begun:
                pauses.append((time.perf_counter() - begun.pop()) * 1e3)

        gc.callbacks.append(on_gc)
        try:
            await client_run(gateway, count, poll=True)
        finally:
            gc.callbacks.remove(on_gc)
        longest = sorted(pauses, reverse=True)[:3]
        lines += [
            "",
            f"gc during a full run: {len(pauses)} collections, {sum(pauses):.0f} ms in all, "
            f"longest {', '.join(f'{p:.0f}' for p in longest)} ms",
            "",
        ]

        profiler = cProfile.Profile()
        profiler.enable()
        await client_run(gateway, count, poll=True)
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
    lines.append(out.getvalue())
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000)
    args = parser.parse_args()
    report = asyncio.run(main(args.jobs))
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    (run.RESULTS / "profile.txt").write_text(report)
    print(report[:3000])
