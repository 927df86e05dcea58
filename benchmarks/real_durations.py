"""Jobs of real length (time_scale 1.0), each scenario against per-key polling, at the default
``PollPolicy()`` a user gets (a tuned policy is reported beside the burst, never instead).

Used by run.py (``--only burst,trickle,gateways,bad_estimates,rate429,lag``). Every figure is
measured in this process (the client) against an emulator in its own process:
  burst          N jobs lasting 10-30 s, submitted at once through the worker pool
  trickle        5 new jobs per second for 60 s, each 10-30 s; and single jobs awaited alone
  gateways       the burst against gateways that report right estimates another way: no
                 complete_time, an estimate that leaves the queue out, whole seconds (rounded
                 down, to the nearest, or up without complete_time)
  bad_estimates  the burst with expected_seconds off by up to 50%, a constant 30 s, absent,
                 or in whole seconds rounded down
  rate429        jobs finished per second with 3% random 429s vs without (short jobs)
  lag            event-loop lag while N jobs are pending (none ends during the measure)
Resolution is "the emulator's record of when the job finished" to "the future resolved".
The per-key poller is one task per job asking about its own key every 0.5 s (INTERVAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from common import (
    CONCURRENCY,
    GENERATIONS,
    INFO,
    INTERVAL,
    TERMINAL,
    Gateway,
    LagTicker,
    calls_between,
    emulator,
    percentile,
    requests_for,
    run_client,
    run_floor,
    run_per_key,
    submit_all,
)

from wujie_async import ImageJob, Limits, PollPolicy, WujieClient

SEED = 12
# A tuned policy, reported beside the figures of record (which run the default PollPolicy()).
TUNED = PollPolicy(min_interval=INTERVAL, first_poll_delay=INTERVAL)
# Wrong estimates: FaultConfig fields.
BAD_ESTIMATES: dict[str, dict[str, Any]] = {
    "noise_50pct": {"estimate_noise": 0.5},
    "constant_30s": {"estimate_constant": 30.0},
    "absent": {"estimate_absent": 1.0},
    "long_1_5x": {"estimate_bias": 1.5},
    "long_3x": {"estimate_bias": 3.0},
}
# Right estimates reported another way a gateway may (EmulatorConfig fields): the schedule's
# promise must hold across them (whole seconds: at most 4 asks per key).
GATEWAYS: dict[str, dict[str, Any]] = {
    "whole_seconds_floor": {"estimate_rounding": "floor"},
    "whole_seconds_round": {"estimate_rounding": "round"},
    "whole_seconds_ceil_no_complete_time": {"estimate_rounding": "ceil", "progress_fields": False},
    "no_complete_time": {"progress_fields": False},
    "countdown_from_generation": {"estimate_while_queued": "generation"},
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    """How big each scenario is: the issue's figures, or a quick version to iterate with."""

    burst_jobs: int = 2000
    job_seconds: tuple[float, float] = (10.0, 30.0)
    trickle_per_s: float = 5.0
    trickle_s: float = 60.0
    single_rounds: int = 3
    rate429_jobs: int = 3000
    rate429_time_scale: float = 0.1
    lag_pending: int = 100_000
    lag_hold_s: float = 10.0


FULL = Sizes()
QUICK = Sizes(
    burst_jobs=200,
    job_seconds=(2.0, 6.0),
    trickle_s=12.0,
    single_rounds=1,
    rate429_jobs=500,
    lag_pending=10_000,
    lag_hold_s=3.0,
)


def real_jobs(sizes: Sizes, config: dict[str, Any] | None = None, **faults: Any) -> dict[str, Any]:
    """Emulator settings: jobs of sizes.job_seconds whose estimate is right unless faulted."""
    return {
        "job_seconds": list(sizes.job_seconds),
        "estimate_basis": "actual",
        **(config or {}),
        "faults": faults,
    }


def _figures(
    count: int,
    calls: int,
    asks: float,
    latencies: list[float],
    cpu: float,
    wall: float,
) -> dict[str, Any]:
    return {
        "jobs": count,
        "resolved": len(latencies),
        "calls_per_job": calls / count,
        "asks_per_key": asks / count,
        "resolve_p50_s": percentile(latencies, 0.5),
        "resolve_p99_s": percentile(latencies, 0.99),
        "resolve_max_s": max(latencies, default=float("nan")),
        "cpu_per_job_us": cpu / count * 1e6,
        "wall_s": wall,
    }


# --- ours ----------------------------------------------------------------------------------------
async def ours(
    gateway: Gateway,
    requests: list[dict[str, Any]],
    *,
    per_second: float | None = None,
    poll: PollPolicy | None = None,
) -> dict[str, Any]:
    """Our client at the default policy (or ``poll``): submit (all at once, or paced), then
    wait for every job."""
    before = await gateway.stats(timelines=False)
    run = await run_client(gateway, requests, per_second=per_second, poll=poll)
    after = await gateway.stats()
    done = after["timelines"]
    latencies = [at - done[key]["done"] for key, at in run.resolved_at.items()]
    stats = run.stats
    result = _figures(
        len(requests),
        calls_between(before, after),
        stats.keys_polled,
        latencies,
        run.cpu_s,
        run.wall_s,
    )
    result.update(
        jobs_failed=run.failed,
        mean_batch_fill=stats.mean_batch_fill,
        rate_limited=stats.rate_limited,
        jobs_per_s=len(requests) / run.wall_s,
    )
    return result


# --- the per-key baseline ------------------------------------------------------------------------
async def per_key(
    gateway: Gateway, requests: list[dict[str, Any]], *, per_second: float | None = None
) -> dict[str, Any]:
    """The per-key baseline (common.run_per_key), in this script's figures."""
    run = await run_per_key(gateway, requests, per_second=per_second)
    return _figures(len(requests), run.calls, run.polls, run.latencies, run.cpu_s, run.wall_s)


# --- the comparisons -----------------------------------------------------------------------------
def compare(mine: dict[str, Any], theirs: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """One block of latest.json: ours against per-key polling and the floor, same jobs."""
    return {
        "jobs": mine["jobs"],
        "calls_per_job": mine["calls_per_job"],
        "calls_per_job_per_key": theirs["calls_per_job"],
        "calls_ratio_per_key_to_ours": theirs["calls_per_job"] / mine["calls_per_job"],
        "asks_per_key": mine["asks_per_key"],
        "asks_per_key_per_key": theirs["asks_per_key"],
        "resolve_p50_s": mine["resolve_p50_s"],
        "resolve_p99_s": mine["resolve_p99_s"],
        "resolve_p50_s_per_key": theirs["resolve_p50_s"],
        "resolve_p99_s_per_key": theirs["resolve_p99_s"],
        "cpu_per_job_us": mine["cpu_per_job_us"],
        "cpu_per_job_us_floor": floor["cpu_per_job_us"],
        "cpu_ratio_to_floor": mine["cpu_per_job_us"] / floor["cpu_per_job_us"],
        "runs": {"ours": mine, "per_key": theirs, "floor": floor},
    }


def _say(label: str, result: dict[str, Any]) -> None:
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    print(f"    {label}: {json.dumps(shown)}", flush=True)


async def _in_emulator(
    label: str,
    settings: dict[str, Any],
    work: Callable[[Gateway], Awaitable[dict[str, Any]]],
    *,
    time_scale: float = 1.0,
) -> dict[str, Any]:
    print(f"  {label} ...", flush=True)
    async with emulator(time_scale, SEED, **settings) as gateway:
        result = await work(gateway)
    _say(label, result)
    return result


async def burst(sizes: Sizes, cache: dict[str, Any]) -> dict[str, Any]:
    """N jobs of 10-30 s submitted at once: ours, per-key, floor (each its own emulator)."""
    requests = requests_for(sizes.burst_jobs)
    settings = real_jobs(sizes)
    floor = await _in_emulator("burst floor", settings, lambda g: run_floor(g, len(requests)))
    mine = await _in_emulator("burst ours", settings, lambda g: ours(g, requests))
    tuned = await _in_emulator(
        "burst ours (tuned policy)", settings, lambda g: ours(g, requests, poll=TUNED)
    )
    theirs = await _in_emulator("burst per-key", settings, lambda g: per_key(g, requests))
    cache["burst_per_key"], cache["burst_floor"] = theirs, floor
    block = compare(mine, theirs, floor)
    block["tuned_policy"] = {
        "policy": "PollPolicy(min_interval=0.5, first_poll_delay=0.5)",
        **compare(tuned, theirs, floor),
    }
    return block


async def _burst_baselines(
    sizes: Sizes, cache: dict[str, Any], label: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per-key, floor) of the burst with right estimates: measured once per run, by the
    first scenario that needs them, and reused by the others."""
    requests = requests_for(sizes.burst_jobs)
    floor = cache.get("burst_floor")
    if floor is None:
        floor = cache["burst_floor"] = await _in_emulator(
            f"{label} floor", real_jobs(sizes), lambda g: run_floor(g, len(requests))
        )
    theirs = cache.get("burst_per_key")
    if theirs is None:
        theirs = cache["burst_per_key"] = await _in_emulator(
            f"{label} per-key", real_jobs(sizes), lambda g: per_key(g, requests)
        )
    return theirs, floor


async def gateways(sizes: Sizes, cache: dict[str, Any]) -> dict[str, Any]:
    """The burst at the default policy against gateways that report right estimates another
    way (no end time, an estimate that leaves the queue out, whole seconds)."""
    requests = requests_for(sizes.burst_jobs)
    theirs, floor = await _burst_baselines(sizes, cache, "gateways")
    variants = {}
    for name, config in GATEWAYS.items():
        mine = await _in_emulator(
            f"gateway ({name}) ours", real_jobs(sizes, config), lambda g: ours(g, requests)
        )
        variants[name] = compare(mine, theirs, floor)
    right = [block for name, block in variants.items() if not name.startswith("whole_")]
    whole = [block for name, block in variants.items() if name.startswith("whole_")]
    return {
        "asks_per_key": max(block["asks_per_key"] for block in right),
        "asks_per_key_whole_seconds": max(block["asks_per_key"] for block in whole),
        "resolve_p99_s": max(block["resolve_p99_s"] for block in right),
        "resolve_p99_s_whole_seconds": max(block["resolve_p99_s"] for block in whole),
        "resolve_p99_s_per_key": theirs["resolve_p99_s"],
        "variants": variants,
        "note": "each figure is the worst gateway's: of those with estimates to the hundredth, "
        "and of those with whole seconds (rounded down, to the nearest, up without end stamps)",
    }


async def trickle(sizes: Sizes, cache: dict[str, Any]) -> dict[str, Any]:
    """A web app: new jobs at a steady rate; then single jobs, each awaited alone."""
    count = round(sizes.trickle_per_s * sizes.trickle_s)
    requests = requests_for(count)
    settings = real_jobs(sizes)
    rate = sizes.trickle_per_s
    floor = await _in_emulator("trickle floor", settings, lambda g: run_floor(g, count))
    mine = await _in_emulator(
        "trickle ours", settings, lambda g: ours(g, requests, per_second=rate)
    )
    theirs = await _in_emulator(
        "trickle per-key", settings, lambda g: per_key(g, requests, per_second=rate)
    )
    block = compare(mine, theirs, floor)
    block["single"] = await _in_emulator(
        "single job awaited alone", settings, lambda g: single_jobs(g, sizes.single_rounds)
    )
    return block


async def single_jobs(gateway: Gateway, rounds: int) -> dict[str, Any]:
    """One job at a time: ours (a client already open, as in a web app) and a per-key loop,
    side by side on the same emulator; resolution of each."""
    mine: list[float] = []
    theirs: list[float] = []
    poll = PollPolicy()
    request = requests_for(1)[0]
    header = gateway.credentials.header_at(int(time.time()))
    headers = {"Authorization": header, "Content-Type": "application/json"}
    async with (
        WujieClient(gateway.credentials, base_url=gateway.base_url, poll=poll) as client,
        aiohttp.ClientSession() as http,
    ):

        async def post(path: str, body: Any) -> Any:
            async with http.post(gateway.base_url + path, json=body, headers=headers) as reply:
                return json.loads(await reply.read())

        async def ours_one() -> tuple[str, float]:
            job = await client.images.submit(**request)
            with contextlib.suppress(Exception):
                await job
            return job.key, time.time()

        async def per_key_one() -> tuple[str, float]:
            key = (await post(GENERATIONS, request))["data"]["key"]
            while True:
                await asyncio.sleep(INTERVAL)
                entries = (await post(INFO, [key]))["data"]["list"]
                if entries and entries[0]["status"] in TERMINAL:
                    return key, time.time()

        for _ in range(rounds):
            (key_a, at_a), (key_b, at_b) = await asyncio.gather(ours_one(), per_key_one())
            done = (await gateway.stats())["timelines"]
            mine.append(at_a - done[key_a]["done"])
            theirs.append(at_b - done[key_b]["done"])
    return {
        "rounds": rounds,
        "resolve_s": mine,
        "resolve_s_per_key": theirs,
        "resolve_max_s": max(mine),
        "resolve_max_s_per_key": max(theirs),
    }


async def bad_estimates(sizes: Sizes, cache: dict[str, Any]) -> dict[str, Any]:
    """The burst with a wrong estimate. The per-key poller never reads the estimate, so its
    figures are those of the burst with a right one: measured once per run (reused from the
    burst when it ran), not once per variant."""
    requests = requests_for(sizes.burst_jobs)
    theirs, floor = await _burst_baselines(sizes, cache, "bad estimates")
    variants = {}
    settings = {name: real_jobs(sizes, **faults) for name, faults in BAD_ESTIMATES.items()}
    settings["whole_seconds_floor"] = real_jobs(sizes, GATEWAYS["whole_seconds_floor"])
    for name, config in settings.items():
        mine = await _in_emulator(
            f"bad estimates ({name}) ours", config, lambda g: ours(g, requests)
        )
        variants[name] = compare(mine, theirs, floor)
    worst = {
        key: max(block[key] for block in variants.values())
        for key in ("calls_per_job", "asks_per_key", "resolve_p99_s", "cpu_ratio_to_floor")
    }
    return {
        **worst,
        "resolve_p99_s_per_key": theirs["resolve_p99_s"],
        "calls_ratio_per_key_to_ours": min(
            block["calls_ratio_per_key_to_ours"] for block in variants.values()
        ),
        "variants": variants,
        "note": "top-level figures are the worst variant's",
    }


async def rate429(sizes: Sizes, cache: dict[str, Any]) -> dict[str, Any]:
    """Jobs finished per second (submit of the first to the end of the last) with 3% random
    429s on every endpoint (Retry-After 1 s) against the same run without any."""
    requests = requests_for(sizes.rate429_jobs)
    scale = sizes.rate429_time_scale
    clean = await _in_emulator(
        "no 429s", {"faults": {}}, lambda g: ours(g, requests), time_scale=scale
    )
    noisy = await _in_emulator(
        "3% random 429s",
        {"faults": {"http_429": 0.03, "retry_after_s": 1}},
        lambda g: ours(g, requests),
        time_scale=scale,
    )
    return {
        "jobs": len(requests),
        "time_scale": scale,
        "jobs_per_s_no_429": clean["jobs_per_s"],
        "jobs_per_s_3pct_429": noisy["jobs_per_s"],
        "throughput_ratio": noisy["jobs_per_s"] / clean["jobs_per_s"],
        "mean_batch_fill_no_429": clean["mean_batch_fill"],
        "mean_batch_fill_3pct_429": noisy["mean_batch_fill"],
        "rate_limited": noisy["rate_limited"],
        "jobs_failed_3pct_429": noisy["jobs_failed"],
        "runs": {"no_429": clean, "http_429_3pct": noisy},
    }


class GcPauses:
    """Pauses of the garbage collector (ms) while inside ``with`` (re-enterable)."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self.full = 0
        self._begun: float | None = None

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._begun = time.perf_counter()
            self.full += info["generation"] == 2
        elif self._begun is not None:
            self.pauses.append((time.perf_counter() - self._begun) * 1e3)
            self._begun = None

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._on_gc)


async def lag(sizes: Sizes, cache: dict[str, Any]) -> dict[str, Any]:
    """Loop lag of a 10 ms ticker while N jobs are pending: during the submits, and over a
    hold period once all are pending (polling goes on; no job ends: they last 10-15 min).
    Measured twice, each with its own emulator: a default client, and ``gc_freeze=True``."""
    plain = await _lag_once(sizes, gc_freeze=False)
    frozen = await _lag_once(sizes, gc_freeze=True)
    return {**plain, **{f"{name}_gc_freeze": value for name, value in frozen.items()}}


async def _lag_once(sizes: Sizes, *, gc_freeze: bool) -> dict[str, Any]:
    count = sizes.lag_pending
    requests = requests_for(count)
    settings = {"job_seconds": [600.0, 900.0], "estimate_basis": "actual"}

    async def work(gateway: Gateway) -> dict[str, Any]:
        poll = PollPolicy()
        limits = Limits(max_concurrent_submits=CONCURRENCY, max_connections=64)
        jobs: list[ImageJob] = []
        async with WujieClient(
            gateway.credentials,
            base_url=gateway.base_url,
            poll=poll,
            limits=limits,
            gc_freeze=gc_freeze,
        ) as client:

            async def submit(request: dict[str, Any]) -> None:
                jobs.append(await client.images.submit(**request))

            with GcPauses() as pauses, LagTicker() as during:
                await submit_all(submit, requests)
            with pauses, LagTicker() as holding:
                await asyncio.sleep(sizes.lag_hold_s)
            pending = sum(not job.done() for job in jobs)
            for job in jobs:
                job.cancel()
        lags = during.lags + holding.lags
        return {
            "pending": pending,
            "loop_lag_max_ms": max(lags) * 1e3,
            "loop_lag_p99_ms": percentile(lags, 0.99) * 1e3,
            "loop_lag_max_ms_while_submitting": max(during.lags) * 1e3,
            "loop_lag_max_ms_all_pending": max(holding.lags) * 1e3,
            "hold_s": sizes.lag_hold_s,
            # The collector's own pauses (gc.callbacks): the loop lag above also holds
            # whatever else stalls the loop, a busy shared machine included.
            "gc_pause_max_ms": max(pauses.pauses, default=0.0),
            "gc_full_collections": pauses.full,
        }

    label = f"loop lag at {count:,} pending{' (gc_freeze=True)' if gc_freeze else ''}"
    return await _in_emulator(label, settings, work)


SCENARIOS: dict[str, Callable[[Sizes, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "burst": burst,
    "trickle": trickle,
    "bad_estimates": bad_estimates,
    "gateways": gateways,
    "rate429": rate429,
    "lag": lag,
}

# (block, figure, "<=" or ">=", bound or a function of the block) from issue 12.
TARGETS: list[tuple[str, str, str, Any]] = [
    ("burst", "resolve_p99_s", "<=", lambda b: b["resolve_p99_s_per_key"] + 0.020),
    ("burst", "calls_ratio_per_key_to_ours", ">=", 30.0),
    ("burst", "asks_per_key", "<=", 3.0),
    ("burst", "cpu_ratio_to_floor", "<=", 1.5),
    ("trickle", "resolve_p99_s", "<=", lambda b: b["resolve_p99_s_per_key"] + 0.020),
    ("trickle", "calls_ratio_per_key_to_ours", ">=", 10.0),
    ("trickle", "asks_per_key", "<=", 3.0),
    ("bad_estimates", "resolve_p99_s", "<=", lambda b: 2 * b["resolve_p99_s_per_key"]),
    ("bad_estimates", "calls_ratio_per_key_to_ours", ">=", 15.0),
    ("gateways", "asks_per_key", "<=", 3.0),
    ("gateways", "asks_per_key_whole_seconds", "<=", 4.0),
    ("gateways", "resolve_p99_s", "<=", lambda b: b["resolve_p99_s_per_key"] + 0.020),
    (
        "gateways",
        "resolve_p99_s_whole_seconds",
        "<=",
        lambda b: b["resolve_p99_s_per_key"] + 0.020,
    ),
    ("rate429", "throughput_ratio", ">=", 0.7),
    ("lag", "loop_lag_max_ms", "<=", 50.0),
]


def verdicts(blocks: dict[str, Any]) -> dict[str, bool]:
    met = {}
    for block, figure, op, bound in TARGETS:
        if block not in blocks:
            continue
        limit = bound(blocks[block]) if callable(bound) else bound
        value = blocks[block][figure]
        met[f"{block}.{figure}"] = value <= limit if op == "<=" else value >= limit
    return met


def markdown(blocks: dict[str, Any], met: dict[str, bool]) -> str:
    """The tables of the issue-12 scenarios."""
    lines: list[str] = []
    rows = [(name, blocks[name]) for name in ("burst", "trickle") if name in blocks]
    if "tuned_policy" in blocks.get("burst", {}):
        rows.append(("burst, tuned policy (beside the record)", blocks["burst"]["tuned_policy"]))
    rows += [
        (f"gateway: {name}", block)
        for name, block in blocks.get("gateways", {}).get("variants", {}).items()
    ]
    rows += [
        (f"bad estimates: {name}", block)
        for name, block in blocks.get("bad_estimates", {}).get("variants", {}).items()
    ]
    if rows:
        lines += [
            "| scenario | jobs | calls/job ours / per-key (ratio) | asks per key ours / per-key "
            "| resolve p50 / p99 ours | resolve p50 / p99 per-key | CPU/job ours / floor |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, b in rows:
            lines.append(
                f"| {name} | {b['jobs']:,} | {b['calls_per_job']:.2f} / "
                f"{b['calls_per_job_per_key']:.1f} ({b['calls_ratio_per_key_to_ours']:.0f}x) | "
                f"{b['asks_per_key']:.1f} / {b['asks_per_key_per_key']:.1f} | "
                f"{b['resolve_p50_s']:.2f} / {b['resolve_p99_s']:.2f} s | "
                f"{b['resolve_p50_s_per_key']:.2f} / {b['resolve_p99_s_per_key']:.2f} s | "
                f"{b['cpu_per_job_us']:.0f} / {b['cpu_per_job_us_floor']:.0f} µs "
                f"({b['cpu_ratio_to_floor']:.1f}x) |"
            )
    single = blocks.get("trickle", {}).get("single")
    if single:
        lines += [
            "",
            f"Single job awaited alone ({single['rounds']} rounds): resolution ours "
            + ", ".join(f"{v:.2f}" for v in single["resolve_s"])
            + " s; per-key "
            + ", ".join(f"{v:.2f}" for v in single["resolve_s_per_key"])
            + " s.",
        ]
    if "rate429" in blocks:
        r = blocks["rate429"]
        lines += [
            "",
            f"3% random 429s ({r['jobs']:,} jobs, time_scale {r['time_scale']}): "
            f"{r['jobs_per_s_3pct_429']:.0f} jobs/s vs {r['jobs_per_s_no_429']:.0f} without "
            f"({r['throughput_ratio']:.2f}x); batch fill {r['mean_batch_fill_3pct_429']:.1f} vs "
            f"{r['mean_batch_fill_no_429']:.1f}; {r['rate_limited']} 429s received.",
        ]
    if "lag" in blocks:
        lg = blocks["lag"]
        lines += [
            "",
            f"Loop lag with {lg['pending']:,} jobs pending: max {lg['loop_lag_max_ms']:.0f} ms "
            f"(while submitting {lg['loop_lag_max_ms_while_submitting']:.0f} ms, all pending "
            f"{lg['loop_lag_max_ms_all_pending']:.0f} ms), p99 {lg['loop_lag_p99_ms']:.1f} ms.",
            f"With gc_freeze=True: max {lg['loop_lag_max_ms_gc_freeze']:.0f} ms (while "
            f"submitting {lg['loop_lag_max_ms_while_submitting_gc_freeze']:.0f} ms, all pending "
            f"{lg['loop_lag_max_ms_all_pending_gc_freeze']:.0f} ms), "
            f"p99 {lg['loop_lag_p99_ms_gc_freeze']:.1f} ms.",
            f"Longest gc pause: {lg['gc_pause_max_ms']:.0f} ms ({lg['gc_full_collections']} "
            f"full collections), with gc_freeze=True {lg['gc_pause_max_ms_gc_freeze']:.0f} ms "
            f"({lg['gc_full_collections_gc_freeze']}).",
        ]
    if met:
        lines += [
            "",
            "Issue-12 targets: "
            + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in met.items()),
        ]
    return "\n".join(lines).lstrip("\n") + "\n"
