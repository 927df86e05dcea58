"""Every benchmark scenario in one run, against an emulator in its own process.

    .venv/bin/pip install -e '.[bench]' && .venv/bin/python benchmarks/run.py

Writes benchmarks/results/latest.json, latest.md (the table) and latest.png (the plot, when
matplotlib is installed). Figures are measured fresh, in this run, on this machine: the
client's CPU is this process's; the emulator's is its own.

Scenarios (see README, "Performance"):
 1. HTTP calls per completed job: our batching poller vs a per-key poller baseline (one task
    per job, polling its own key every `interval`, as replicate-python and fal-client wait),
    same jobs, same interval.
 2. Resolution latency: from the emulator marking a job done to the future resolving.
 3. Client CPU per job vs the floor (plain aiohttp POSTs of the same bodies, one per job, same
    concurrency), and submit throughput vs the floor's requests/s.
 4. Event-loop lag of a 10 ms ticker while 10,000 jobs are in flight.
 5. Memory per pending job with 100,000 jobs pending.
 6. Scaling: the figures at N = 1k, 10k, 100k.
 7. The same on uvloop, when it is installed (--uvloop).
 8. Issue 12, jobs of real length (time_scale 1.0), see real_durations.py: burst, trickle
    (and a single job awaited alone), bad estimates, 3% random 429s, loop lag at 100k pending.

Pick scenarios with --only (e.g. --only burst,trickle); --quick runs small versions of them
(200 jobs of 2-6 s, ...) so a change can be checked in about a minute. Only a full run writes
latest.*; other runs write only-<scenarios>.* unless --name says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import platform
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import real_durations
from common import (  # the sibling module: python puts this script's folder on sys.path
    CONCURRENCY,
    GENERATIONS,
    INFO,
    INTERVAL,
    RESULTS,
    Gateway,
    calls_between,
    emulator,
    percentile,
    requests_for,
    run_client,
    run_floor,
    submit_all,
)
from common import run_per_key as per_key_baseline

import wujie_async
from wujie_async import ImageJob, Limits, PollPolicy, WujieClient

__all__ = [  # what cpu_profile.py uses from here
    "CONCURRENCY",
    "GENERATIONS",
    "INFO",
    "INTERVAL",
    "RESULTS",
    "Gateway",
    "emulator",
    "percentile",
    "requests_for",
    "run_floor",
    "submit_all",
]


# --- scenario: ours ------------------------------------------------------------------------------
async def run_ours(gateway: Gateway, count: int, *, lag: bool = False) -> dict[str, Any]:
    before = await gateway.stats()
    run = await run_client(gateway, requests_for(count), lag=lag)
    after = await gateway.stats()
    calls = calls_between(before, after)
    timelines = after["timelines"]
    latencies = [at - timelines[key]["done"] for key, at in run.resolved_at.items()]
    return {
        "jobs": count,
        "http_calls": calls,
        "requests_per_job": calls / count,
        "poll_calls_per_job": run.stats.batch_calls / count,
        "mean_batch_fill": run.stats.mean_batch_fill,
        "resolve_p50_s": percentile(latencies, 0.5),
        "resolve_p99_s": percentile(latencies, 0.99),
        "cpu_s": run.cpu_s,
        "cpu_per_job_us": run.cpu_s / count * 1e6,
        "submits_per_s": count / run.submit_wall_s,
        "wall_s": run.wall_s,
        "loop_lag_p99_ms": percentile(run.lags, 0.99) * 1e3 if lag else None,
        "loop_lag_max_ms": max(run.lags) * 1e3 if lag and run.lags else None,
    }


# --- scenario: the per-key baseline --------------------------------------------------------------
async def run_per_key(gateway: Gateway, count: int) -> dict[str, Any]:
    """The per-key baseline (common.run_per_key) on ``count`` jobs, in this script's figures."""
    run = await per_key_baseline(gateway, requests_for(count))
    return {
        "jobs": count,
        "http_calls": run.calls,
        "requests_per_job": run.calls / count,
        "poll_calls_per_job": (run.calls - count) / count,
        "resolve_p50_s": percentile(run.latencies, 0.5),
        "resolve_p99_s": percentile(run.latencies, 0.99),
        "cpu_per_job_us": run.cpu_s / count * 1e6,
        "wall_s": run.wall_s,
    }


# --- scenario: memory ----------------------------------------------------------------------------
async def run_memory(gateway: Gateway, count: int) -> dict[str, Any]:
    """Bytes per pending job: allocations still held once ``count`` jobs are submitted."""
    requests = requests_for(count + 1)
    poll = PollPolicy(
        first_poll_delay=3600, min_interval=3600, max_interval=3600, max_estimate_wait=3600
    )
    limits = Limits(max_concurrent_submits=CONCURRENCY)
    jobs: list[ImageJob] = []
    async with WujieClient(
        gateway.credentials, base_url=gateway.base_url, poll=poll, limits=limits
    ) as client:
        await client.images.submit(**requests[0])  # warm up: session, signer, pools

        async def submit(request: dict[str, Any]) -> None:
            jobs.append(await client.images.submit(**request))

        gc.collect()
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        await submit_all(submit, requests[1:])
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        still_pending = sum(not job.done() for job in jobs)
        for job in jobs:
            job.cancel()
    # The list holding the jobs is counted too: holding them is part of the cost.
    return {"jobs": still_pending, "bytes_per_pending_job": (held - base) / max(still_pending, 1)}


# --- orchestration -------------------------------------------------------------------------------
async def scenario(
    label: str, time_scale: float, work: Callable[[Gateway], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    print(f"  {label} ...", flush=True)
    async with emulator(time_scale, seed=11) as gateway:
        result = await work(gateway)
    print(f"    {json.dumps({k: _round(v) for k, v in result.items()})}", flush=True)
    return result


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


async def main_async(args: argparse.Namespace, only: list[str]) -> dict[str, Any]:
    sizes: list[int] = args.sizes
    time_scale: float = args.time_scale
    runs: dict[str, Any] = {"ours": {}, "per_key": {}, "floor": {}, "memory": {}}
    if "scaling" in only:
        for count in sizes:
            print(f"N = {count}", flush=True)
            runs["floor"][count] = await scenario(
                "floor", time_scale, functools.partial(run_floor, count=count)
            )
            runs["ours"][count] = await scenario(
                "ours", time_scale, functools.partial(run_ours, count=count, lag=True)
            )
            if count <= 10_000:  # 100k per-key pollers would only measure the emulator
                runs["per_key"][count] = await scenario(
                    "per-key baseline", time_scale, functools.partial(run_per_key, count=count)
                )
    if "memory" in only:
        memory_jobs: int = args.memory_jobs
        runs["memory"][memory_jobs] = await scenario(
            f"memory at {memory_jobs} pending",
            1.0,
            functools.partial(run_memory, count=memory_jobs),
        )
    blocks: dict[str, Any] = {}
    cache: dict[str, Any] = {}  # figures one issue-12 scenario may reuse from another
    real_sizes = real_durations.QUICK if args.quick else real_durations.FULL
    for name, work in real_durations.SCENARIOS.items():
        if name in only:
            print(f"{name} (jobs of real length, time_scale 1.0, unless said)", flush=True)
            blocks[name] = await work(real_sizes, cache)
    return {"runs": runs, "blocks": blocks}


def machine() -> dict[str, Any]:
    cpu_model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    loop = type(asyncio.get_event_loop_policy()).__module__.split(".")[0]
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "wujie_async": wujie_async.__version__,
        "loop": "uvloop" if loop == "uvloop" else "asyncio",
    }


def summarize(runs: dict[str, Any], headline: int) -> dict[str, Any]:
    ours, per_key, floor = (
        runs["ours"][headline],
        runs["per_key"][headline],
        runs["floor"][headline],
    )
    memory = next(iter(runs["memory"].values()))
    return {
        "jobs": headline,
        "poll_interval_s": INTERVAL,
        "requests_per_job_ours": ours["requests_per_job"],
        "requests_per_job_per_key": per_key["requests_per_job"],
        "poll_calls_ratio_per_key_to_ours": per_key["poll_calls_per_job"]
        / max(ours["poll_calls_per_job"], 1e-9),
        "resolve_p50_s": ours["resolve_p50_s"],
        "resolve_p99_s": ours["resolve_p99_s"],
        "resolve_p50_s_per_key": per_key["resolve_p50_s"],
        "resolve_p99_s_per_key": per_key["resolve_p99_s"],
        "cpu_per_job_us_ours": ours["cpu_per_job_us"],
        "cpu_per_job_us_floor": floor["cpu_per_job_us"],
        "cpu_per_job_ratio_to_floor": ours["cpu_per_job_us"] / floor["cpu_per_job_us"],
        "submits_per_s_ours": ours["submits_per_s"],
        "requests_per_s_floor": floor["requests_per_s"],
        "loop_lag_p99_ms": ours["loop_lag_p99_ms"],
        "loop_lag_max_ms": ours["loop_lag_max_ms"],
        "bytes_per_pending_job": memory["bytes_per_pending_job"],
        "pending_jobs_measured": memory["jobs"],
    }


TARGETS = [
    ("requests_per_job_ours", "<=", 1.1),
    ("poll_calls_ratio_per_key_to_ours", ">=", 15.0),
    ("cpu_per_job_ratio_to_floor", "<=", 1.3),
    ("loop_lag_p99_ms", "<=", 15.0),
    ("loop_lag_max_ms", "<=", 50.0),
    ("bytes_per_pending_job", "<=", 1024.0),
]


def verdicts(summary: dict[str, Any]) -> dict[str, bool]:
    met = {
        name: (summary[name] <= bound if op == "<=" else summary[name] >= bound)
        for name, op, bound in TARGETS
    }
    met["resolve_p99_within_per_key_plus_20ms"] = (
        summary["resolve_p99_s"] <= summary["resolve_p99_s_per_key"] + 0.020
    )
    met["submit_throughput_0.8x_floor"] = (
        summary["submits_per_s_ours"] >= 0.8 * summary["requests_per_s_floor"]
    )
    return met


def markdown(summary: dict[str, Any], runs: dict[str, Any], met: dict[str, bool]) -> str:
    lines = [
        f"Machine: {summary['machine']['cores']} cores, {summary['machine']['cpu_model']}, "
        f"Python {summary['machine']['python']}, aiohttp {summary['machine']['aiohttp']}, "
        f"{summary['machine']['loop']} loop; {summary['timestamp']}.",
        "",
        "| "
        + " | ".join(
            [
                "N",
                "calls/job ours",
                "calls/job per-key",
                "poll calls per-key/ours",
                "p50 / p99 resolve ours",
                "p50 / p99 resolve per-key",
                "CPU/job ours",
                "CPU/job floor",
                "submits/s ours",
                "floor req/s",
                "loop lag p99 / max",
            ]
        )
        + " |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for count, ours in sorted(runs["ours"].items()):
        per_key = runs["per_key"].get(count)
        floor = runs["floor"][count]
        pk = (
            (
                f"{per_key['requests_per_job']:.2f}",
                f"{per_key['poll_calls_per_job'] / max(ours['poll_calls_per_job'], 1e-9):.0f}x",
                f"{per_key['resolve_p50_s'] * 1e3:.0f} / {per_key['resolve_p99_s'] * 1e3:.0f} ms",
            )
            if per_key
            else ("not run", "-", "-")
        )
        lines.append(
            f"| {count:,} | {ours['requests_per_job']:.3f} | {pk[0]} | {pk[1]} | "
            f"{ours['resolve_p50_s'] * 1e3:.0f} / {ours['resolve_p99_s'] * 1e3:.0f} ms | {pk[2]} | "
            f"{ours['cpu_per_job_us']:.0f} µs | {floor['cpu_per_job_us']:.0f} µs | "
            f"{ours['submits_per_s']:.0f} | {floor['requests_per_s']:.0f} | "
            f"{ours['loop_lag_p99_ms']:.1f} / {ours['loop_lag_max_ms']:.1f} ms |"
        )
    lines += [
        "",
        f"Memory: {summary['bytes_per_pending_job']:.0f} bytes per pending job with "
        f"{summary['pending_jobs_measured']:,} jobs pending (tracemalloc).",
        "",
        "Targets: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in met.items()),
    ]
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = sorted(runs["ours"])
    fig, (calls, cpu) = plt.subplots(1, 2, figsize=(10, 4))
    calls.plot(sizes, [runs["ours"][n]["requests_per_job"] for n in sizes], "o-", label="ours")
    keyed = [n for n in sizes if n in runs["per_key"]]
    calls.plot(
        keyed, [runs["per_key"][n]["requests_per_job"] for n in keyed], "s-", label="per-key"
    )
    calls.set(xscale="log", xlabel="jobs", ylabel="HTTP calls per job", title="Calls per job")
    calls.legend()
    cpu.plot(sizes, [runs["ours"][n]["cpu_per_job_us"] for n in sizes], "o-", label="ours")
    cpu.plot(sizes, [runs["floor"][n]["cpu_per_job_us"] for n in sizes], "^-", label="floor")
    cpu.set(xscale="log", xlabel="jobs", ylabel="client CPU µs per job", title="CPU per job")
    cpu.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


SCENARIO_NAMES = ("scaling", "memory", *real_durations.SCENARIOS)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default=None, help="N values, comma-separated")
    parser.add_argument("--memory-jobs", type=int, default=None)
    parser.add_argument(
        "--time-scale", type=float, default=0.1,
        help="emulator latency scale of the scaling runs (0.1: a one-image gpt-image-1 job "
        "takes ~1.8 s); the issue-12 scenarios run at 1.0",
    )  # fmt: skip
    parser.add_argument(
        "--only", default=",".join(SCENARIO_NAMES),
        help=f"scenarios to run, comma-separated, among {','.join(SCENARIO_NAMES)}",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="small versions to iterate with in about a minute (200 jobs of 2-6 s, ...)",
    )  # fmt: skip
    parser.add_argument(
        "--name", default=None,
        help="results file name (default: latest for a full run, else only-<scenarios>)",
    )  # fmt: skip
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (if installed)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(SCENARIO_NAMES))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose among {list(SCENARIO_NAMES)}")
    default_sizes = "1000" if args.quick else "1000,10000,100000"
    args.sizes = [int(s) for s in (args.sizes or default_sizes).split(",")]
    if args.memory_jobs is None:
        args.memory_jobs = 10_000 if args.quick else 100_000
    full = set(only) == set(SCENARIO_NAMES) and not args.quick
    name = args.name or ("latest" if full else "only-" + "-".join(only))
    if args.uvloop:
        import uvloop  # type: ignore[import-not-found, unused-ignore]

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        name += "-uvloop" if args.name is None else ""
    measured = asyncio.run(main_async(args, only))
    runs, blocks = measured["runs"], measured["blocks"]
    summary: dict[str, Any] = {}
    table = ""
    if runs["per_key"] and runs["memory"]:
        headline = 10_000 if 10_000 in runs["per_key"] else max(runs["per_key"])
        summary = summarize(runs, headline)
    summary["machine"] = machine()
    summary["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    summary["time_scale"] = args.time_scale
    summary["quick"] = args.quick
    summary["scenarios"] = only
    if "jobs" in summary:
        summary["targets_met"] = verdicts(summary)
        table = markdown(summary, runs, summary["targets_met"])
    summary["runs"] = {k: {str(n): r for n, r in v.items()} for k, v in runs.items()}
    if runs["ours"]:
        summary["scaling_cpu_per_job_us"] = {
            str(n): runs["ours"][n]["cpu_per_job_us"] for n in sorted(runs["ours"])
        }
    summary.update(blocks)
    met = real_durations.verdicts(blocks)
    summary["targets_met_issue12"] = met
    if blocks:
        table += ("\n" if table else _machine_line(summary) + "\n\n") + real_durations.markdown(
            blocks, met
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(table)
    plotted = runs["ours"] and plot(runs, args.out / f"{name}.png")
    print(table)
    print(f"written: {args.out / name}.json/.md" + (" and .png" if plotted else ""))


def _machine_line(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    return (
        f"Machine: {m['cores']} cores, {m['cpu_model']}, Python {m['python']}, aiohttp "
        f"{m['aiohttp']}, {m['loop']} loop; {summary['timestamp']}."
    )


if __name__ == "__main__":
    main()
