"""Fleet mode against independent clients: 8 member processes, each a trickle of 1 job/s.

Each member submits a Poisson trickle (random gaps, 1 job/s on average), so the 8 together
ask for 8 submits/s on average with bursts above it.

    .venv/bin/pip install -e '.[fleet]'
    .venv/bin/python benchmarks/fleet.py            # 60 s of submits, jobs of 10-30 s
    .venv/bin/python benchmarks/fleet.py --quick    # 20 s of submits, jobs of 5-15 s

Both setups run at the same time, each against its own emulator process (same seed, same
model, same time scale): 8 processes with ``WujieClient(fleet=RedisFleet(...))`` sharing one
Redis (a redis-server this script starts, unless ``--redis URL``), and 8 processes with a plain
``WujieClient`` each. Every process has ``Limits(max_submits_per_second=CAP)``, CAP = 8 (the
account's bought rate, equal to the average demand): the fleet holds CAP for all of them (its
bursts wait a moment), the independent clients each hold it for themselves only (their
bursts go through).

Figures (written to benchmarks/results/fleet.json; --quick: fleet-quick.json):
  * HTTP calls per job, and batch (poll) calls per job, counted by each emulator;
  * resolution latency: from the emulator's end of a job to its future resolving in the
    member (p50, p99);
  * the most submits the emulator accepted in any 1-second window, against CAP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

RESULTS = Path(__file__).resolve().parent / "results"
MEMBERS = 8
CAP = 8.0  # submits/s, fleet-wide: the members' average demand together
MODEL = "gpt-image-1"  # typical 18 s at time scale 1 (gamma spread: about 10-30 s)


# --- one member process --------------------------------------------------------------------------
async def member(mode: str, creds: str, redis_url: str, name: str, seconds: float) -> None:
    from wujie_async import Credentials, Limits, WujieClient

    with open(creds) as handle:  # read once, before anything runs  # noqa: ASYNC230
        data = json.load(handle)
    fleet = None
    if mode == "fleet":
        from wujie_async.fleet import RedisFleet

        fleet = RedisFleet(redis_url, name=name)
    resolved: dict[str, float] = {}
    async with WujieClient(
        Credentials(app_id=data["app_id"], private_key=data["private_key"]),
        base_url=data["base_url"],
        limits=Limits(max_submits_per_second=CAP),
        fleet=fleet,
    ) as client:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        start = float(await asyncio.to_thread(sys.stdin.readline))
        await asyncio.sleep(max(0.0, start - time.time()) + random.uniform(0, 1))
        jobs = []

        async def submit(i: int) -> None:
            job = await client.images.submit(prompt=f"trickle {i}", model=MODEL)
            job.add_done_callback(lambda j: resolved.__setitem__(j.key, time.time()))
            jobs.append(job)

        submits = []
        stop = time.monotonic() + seconds
        i = 0
        while time.monotonic() < stop:
            submits.append(asyncio.create_task(submit(i)))
            i += 1
            await asyncio.sleep(random.expovariate(1.0))  # Poisson: 1 job/s on average
        await asyncio.gather(*submits)
        await asyncio.gather(*jobs, return_exceptions=True)
        stats = client.stats
        role = stats.fleet.role if stats.fleet is not None else None
        sys.stdout.write(
            json.dumps({"resolved": resolved, "role": role, "http": stats.http_calls}) + "\n"
        )
        sys.stdout.flush()


# --- the orchestra -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.asynccontextmanager
async def redis_server(folder: Path) -> AsyncIterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("no redis-server on PATH: pass --redis URL")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "yes", "--dir", str(folder), stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                break
            await asyncio.sleep(0.025)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        await proc.wait()


@contextlib.asynccontextmanager
async def emulator(folder: Path, label: str, time_scale: float) -> AsyncIterator[dict[str, Any]]:
    creds = folder / f"{label}.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wujie_async.emulator", "--port", "0", "--seed", "11",
        "--time-scale", str(time_scale), "--credentials-out", str(creds),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(600):  # the emulator writes it once it listens (30 s at most)
            if creds.exists():
                break
            await asyncio.sleep(0.05)
        data: dict[str, Any] = json.loads(creds.read_text())
        data["file"] = str(creds)
        data["origin"] = data["base_url"].split("/wj-open")[0]
        yield data
    finally:
        proc.terminate()
        await proc.wait()


async def emulator_stats(emu: dict[str, Any]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(emu["origin"] + "/_emulator/stats") as reply,
    ):
        stats: dict[str, Any] = await reply.json()
        return stats


def busiest_second(times: list[float]) -> int:
    times = sorted(times)
    best = first = 0
    for last, t in enumerate(times):
        while times[first] <= t - 1.0:
            first += 1
        best = max(best, last - first + 1)
    return best


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def figures(stats: dict[str, Any], outputs: list[dict[str, Any]]) -> dict[str, Any]:
    timelines = stats["timelines"]
    jobs = len(timelines)
    latencies = [
        (at - timelines[key]["done"]) * 1000
        for out in outputs
        for key, at in out["resolved"].items()
        if key in timelines
    ]
    requests = stats["requests"]
    http = sum(requests.values()) - requests.get("files", 0)
    return {
        "jobs": jobs,
        "http_calls_per_job": round(http / jobs, 3),
        "poll_calls_per_job": round(stats["batch_calls"] / jobs, 3),
        "mean_batch_fill": round(sum(stats["batch_sizes"]) / max(1, stats["batch_calls"]), 2),
        "resolution_ms_p50": round(quantile(latencies, 0.5), 1),
        "resolution_ms_p99": round(quantile(latencies, 0.99), 1),
        "max_submits_in_1s": busiest_second([t["created"] for t in timelines.values()]),
        "pollers": len({who for _, who in stats["batch_callers"]}),
        # Batch calls by each caller, most first: one leader's, and a handover's few.
        "calls_by_poller": sorted(Counter(who for _, who in stats["batch_callers"]).values())[::-1],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds, scale = (20.0, 0.5) if args.quick else (60.0, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        async with contextlib.AsyncExitStack() as stack:
            url = args.redis or await stack.enter_async_context(redis_server(folder))
            emus = {
                mode: await stack.enter_async_context(emulator(folder, mode, scale))
                for mode in ("fleet", "independent")
            }
            name = f"bench-{random.getrandbits(32):08x}"
            procs: dict[str, list[asyncio.subprocess.Process]] = {}
            for mode, emu in emus.items():
                child = ("--child", mode, emu["file"], url, name, str(seconds))
                procs[mode] = [
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        __file__,
                        *child,
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        limit=2**24,
                    )
                    for _ in range(MEMBERS)
                ]
            everyone = [p for group in procs.values() for p in group]
            for proc in everyone:
                assert proc.stdout is not None
                assert (await proc.stdout.readline()).strip() == b"ready"
            start = f"{time.time() + 1.0}\n".encode()
            for proc in everyone:
                assert proc.stdin is not None
                proc.stdin.write(start)
            outputs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in procs}
            for mode, group in procs.items():
                for proc in group:
                    out, _ = await proc.communicate()
                    outputs[mode].append(json.loads(out.decode().strip().splitlines()[-1]))
            result = {
                mode: figures(await emulator_stats(emus[mode]), outputs[mode]) for mode in emus
            }
    fleet, alone = result["fleet"], result["independent"]
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scenario": {
            "members": MEMBERS,
            "jobs_per_member_per_second": "1 on average (Poisson)",
            "submit_seconds": seconds,
            "time_scale": scale,
            "model": MODEL,
            "cap_submits_per_second": CAP,
            "quick": args.quick,
        },
        **result,
        "poll_calls_ratio": round(
            alone["poll_calls_per_job"] / max(fleet["poll_calls_per_job"], 1e-9), 2
        ),
        "p99_difference_ms": round(fleet["resolution_ms_p99"] - alone["resolution_ms_p99"], 1),
        "cap_with_5_percent": CAP * 1.05,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--redis", help="use this Redis instead of starting one")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, creds, url, name, seconds = args.child
        asyncio.run(member(mode, creds, url, name, float(seconds)))
        return
    figures_ = asyncio.run(run(args))
    RESULTS.mkdir(exist_ok=True)
    # A quick run never overwrites the full run's figures (latest.json takes fleet.json).
    name = "fleet-quick.json" if args.quick else "fleet.json"
    (RESULTS / name).write_text(json.dumps(figures_, indent=2) + "\n")
    print(json.dumps(figures_, indent=2))


if __name__ == "__main__":
    main()
