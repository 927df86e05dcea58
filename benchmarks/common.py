"""What every benchmark script shares: the emulator in its own process, the request mix,
percentiles, a loop-lag ticker and the submit worker pool.

Run as a script it IS that emulator process (``python benchmarks/common.py --serve CONFIG``):
the benchmarks need settings the emulator's command line does not offer (job lengths, estimate
faults), so they start the emulator through this entry with a full EmulatorConfig as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from wujie_async import ClientStats, Credentials, ImageJob, Limits, PollPolicy, WujieClient

RESULTS = Path(__file__).resolve().parent / "results"
INTERVAL = 0.5  # the per-key baseline's poll interval (replicate-python's)
CONCURRENCY = 32  # submits on the wire at once, for ours and for the floor alike
GENERATIONS = "/ai/wj/images/generations"
INFO = "/ai/wj/images/info"


# --- the emulator, in its own process ------------------------------------------------------------
@dataclass
class Gateway:
    base_url: str
    credentials: Credentials

    @property
    def origin(self) -> str:
        return self.base_url.removesuffix("/wj-open/v1")

    async def stats(self, *, timelines: bool = True) -> dict[str, Any]:
        url = f"{self.origin}/_emulator/stats?timelines={int(timelines)}"
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            return await r.json()  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def emulator(time_scale: float, seed: int, **config: Any) -> AsyncIterator[Gateway]:
    """An emulator in its own process; ``config`` is more EmulatorConfig fields (faults as a
    dict of FaultConfig fields)."""
    settings = {"time_scale": time_scale, "seed": seed, **config}
    with tempfile.TemporaryDirectory() as folder:
        creds_path = Path(folder) / "creds.json"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", json.dumps(settings),
            "--credentials-out", str(creds_path),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            await asyncio.wait_for(proc.stdout.readline(), 30)
            creds = json.loads(creds_path.read_text())
            yield Gateway(creds["base_url"], Credentials(creds["app_id"], creds["private_key"]))
        finally:
            proc.terminate()
            await proc.wait()


def requests_for(count: int) -> list[dict[str, Any]]:
    """A realistic mix: mostly single images, some sets of 2-4, all three models."""
    mix = []
    for index in range(count):
        model = ("gpt-image-1", "dall-e-2", "dall-e-3")[index % 3]
        n = 1 if model == "dall-e-3" or index % 4 else 1 + index % 3
        mix.append({"prompt": f"benchmark prompt {index}", "model": model, "n": n})
    return mix


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def calls_between(before: dict[str, Any], after: dict[str, Any]) -> int:
    """API calls (submits and batch queries) the emulator received between two snapshots."""
    endpoints = ("generations", "edits", "info")
    return sum(after["requests"].get(e, 0) - before["requests"].get(e, 0) for e in endpoints)


class LagTicker:
    """Measures how late a 10 ms ticker fires: the event loop's responsiveness."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            planned = loop.time() + self.period
            await asyncio.sleep(self.period)
            self.lags.append(max(0.0, loop.time() - planned))

    def __enter__(self) -> LagTicker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def submit_all(
    submit: Callable[[dict[str, Any]], Awaitable[Any]], requests: list[dict[str, Any]]
) -> None:
    """Send ``requests`` through CONCURRENCY workers sharing one iterator, as the CLI does.

    A gather() over N coroutines would instead start N tasks in one loop iteration: a burst
    that measures the caller's choice, not the client (and that every caller can avoid).
    """
    pending = iter(requests)

    async def worker() -> None:
        while (request := next(pending, None)) is not None:
            await submit(request)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


# --- our client: one run, as every scenario drives it ---------------------------------------------
@dataclass
class ClientRun:
    """What one run of our client measured (see :func:`run_client`)."""

    jobs: int
    resolved_at: dict[str, float]  # key -> unix time its future resolved
    failed: int
    stats: ClientStats
    cpu_s: float
    wall_s: float
    submit_wall_s: float
    lags: list[float]  # the loop-lag ticker's, when asked for


async def paced(
    start_one: Callable[[dict[str, Any]], Awaitable[Any]],
    requests: list[dict[str, Any]],
    per_second: float,
) -> None:
    """Start ``start_one(request)`` for each request at ``per_second``, as web requests come."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    tasks = []
    for index, request in enumerate(requests):
        delay = began + index / per_second - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(start_one(request)))
    await asyncio.gather(*tasks)


async def run_client(
    gateway: Gateway,
    requests: list[dict[str, Any]],
    *,
    per_second: float | None = None,
    lag: bool = False,
    poll: PollPolicy | None = None,
) -> ClientRun:
    """Our client, as the benchmarks run it: submit every request (through the worker pool, or
    paced at ``per_second``), then wait for every job; public API only. ``poll``: the default
    ``PollPolicy()`` a user gets, unless a scenario says otherwise."""
    resolved_at: dict[str, float] = {}
    jobs: list[ImageJob] = []
    poll = poll or PollPolicy()
    limits = Limits(max_concurrent_submits=CONCURRENCY, max_connections=64)
    cpu0, wall0 = time.process_time(), time.monotonic()
    ticker = LagTicker()

    def note(job: ImageJob) -> None:
        resolved_at[job.key] = time.time()

    async with WujieClient(
        gateway.credentials, base_url=gateway.base_url, poll=poll, limits=limits
    ) as client:

        async def submit(request: dict[str, Any]) -> None:
            job = await client.images.submit(**request)
            job.add_done_callback(note)  # at once: jobs may end while others are submitted
            jobs.append(job)

        failed = 0
        with ticker if lag else contextlib.nullcontext():
            if per_second is None:
                await submit_all(submit, requests)
            else:
                await paced(submit, requests, per_second)
            submit_wall = time.monotonic() - wall0
            for job in jobs:
                try:
                    await job
                except Exception:
                    failed += 1
        stats = client.stats
    return ClientRun(
        jobs=len(requests),
        resolved_at=resolved_at,
        failed=failed,
        stats=stats,
        cpu_s=time.process_time() - cpu0,
        wall_s=time.monotonic() - wall0,
        submit_wall_s=submit_wall,
        lags=ticker.lags,
    )


# --- the per-key baseline: how replicate-python and fal-client wait ----------------------------
TERMINAL = (-1, 3, 4, 5)  # the contract's end states: no result, failed, succeeded, moderated


@dataclass
class PerKeyRun:
    """What one per-key run measured (each script turns it into its own figures)."""

    calls: int  # HTTP calls the emulator counted, submits included
    polls: int  # single-key info calls
    latencies: list[float]  # seconds from each job's end to its poller noticing it
    cpu_s: float
    wall_s: float


async def run_per_key(
    gateway: Gateway, requests: list[dict[str, Any]], *, per_second: float | None = None
) -> PerKeyRun:
    """A competent per-key poller: pooled session, cached signature, one task per job polling
    its own key every INTERVAL; submits through the same CONCURRENCY workers, or paced."""
    header = gateway.credentials.header_at(int(time.time()))
    headers = {"Authorization": header, "Content-Type": "application/json"}
    slots = asyncio.Semaphore(CONCURRENCY)
    resolved: dict[str, float] = {}
    polls = 0
    before = await gateway.stats(timelines=False)
    cpu0, wall0 = time.process_time(), time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:

        async def post(path: str, body: Any) -> Any:
            async with http.post(gateway.base_url + path, json=body, headers=headers) as reply:
                return json.loads(await reply.read())

        async def one(request: dict[str, Any]) -> None:
            nonlocal polls
            async with slots:
                key = (await post(GENERATIONS, request))["data"]["key"]
            while True:
                await asyncio.sleep(INTERVAL)
                polls += 1
                entries = (await post(INFO, [key]))["data"]["list"]
                if entries and entries[0]["status"] in TERMINAL:
                    resolved[key] = time.time()
                    return

        if per_second is None:
            await asyncio.gather(*(one(r) for r in requests))
        else:
            await paced(one, requests, per_second)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    after = await gateway.stats()
    done = after["timelines"]
    return PerKeyRun(
        calls=calls_between(before, after),
        polls=polls,
        latencies=[resolved[key] - done[key]["done"] for key in resolved],
        cpu_s=cpu,
        wall_s=wall,
    )


# --- the floor: what any client must spend ------------------------------------------------------
async def run_floor(gateway: Gateway, count: int) -> dict[str, Any]:
    """Plain aiohttp POSTs of the same submit bodies, one per job, same workers."""
    requests = requests_for(count)
    header = gateway.credentials.header_at(int(time.time()))
    headers = {"Authorization": header, "Content-Type": "application/json"}
    cpu0, wall0 = time.process_time(), time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:

        async def post(request: dict[str, Any]) -> None:
            url = gateway.base_url + GENERATIONS
            async with http.post(url, json=request, headers=headers) as reply:
                json.loads(await reply.read())

        await submit_all(post, requests)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return {"jobs": count, "cpu_per_job_us": cpu / count * 1e6, "requests_per_s": count / wall}


# --- the emulator process's own entry ------------------------------------------------------------
async def _serve(settings: dict[str, Any], credentials_out: Path) -> None:
    from wujie_async.emulator import Emulator, EmulatorConfig, FaultConfig

    faults = dict(settings.pop("faults", {}))
    if "endpoints" in faults:
        faults["endpoints"] = frozenset(faults["endpoints"])
    if settings.get("job_seconds") is not None:
        settings["job_seconds"] = tuple(settings["job_seconds"])
    config = EmulatorConfig(**settings, faults=FaultConfig(**faults))
    async with Emulator(config) as emu:
        data = {
            "app_id": emu.credentials.app_id,
            "private_key": emu.credentials.private_key,
            "base_url": emu.base_url,
        }
        fd = os.open(credentials_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        print(f"serving {emu.base_url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the benchmarks' emulator process")
    parser.add_argument("--serve", required=True, help="EmulatorConfig fields as JSON")
    parser.add_argument("--credentials-out", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(_serve(json.loads(args.serve), args.credentials_out))
