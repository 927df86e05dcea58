"""How the default poll schedule fares against gateways that report estimates differently.

    .venv/bin/python benchmarks/schedule_probe.py [--jobs 600] [--trickle] [--only NAME,...]

Each variant is a burst of jobs (``--trickle``: 3 jobs a second for 60 s) of 10-30 s whose
estimates are right in substance, reported the way a gateway written from the contract alone
might (rounded to whole seconds, counting down only once generation starts, absent or zero
while queued, images only at the end), or wrong ("bad: ..."), with ``complete_percent``
growing with time unless a variant says. The client and an in-process emulator share a
fast-forwarding loop clock (looptime), so a burst of "30 s" jobs takes the CPU time of its
calls, not 30 s, and asks per key, calls per job and how late each end is seen are exact,
independent of the machine's load. Default ``PollPolicy()``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import time
from collections import Counter
from typing import Any

import looptime

from wujie_async import ImageJob, PollPolicy, WujieClient
from wujie_async.emulator import Emulator, EmulatorConfig, FaultConfig

VARIANTS: dict[str, dict[str, Any]] = {
    "right (our emulator)": {},
    "whole seconds (floor)": {"estimate_rounding": "floor"},
    "whole seconds (round)": {"estimate_rounding": "round"},
    "whole seconds (ceil)": {"estimate_rounding": "ceil"},
    "countdown from generation": {"estimate_while_queued": "generation"},
    "absent while queued": {"estimate_while_queued": "absent"},
    "zero while queued": {"estimate_while_queued": "zero"},
    "images at the end": {"images_progressive": False},
    "floor + generation + images at end": {
        "estimate_rounding": "floor",
        "estimate_while_queued": "generation",
        "images_progressive": False,
    },
    "no complete_time": {"progress_fields": False},
    "no queue": {"queued_share": (0.0, 0.0)},
    "progress fast then slowly (square root)": {"progress_percent": "sqrt"},
    "progress slowly then fast (squared)": {"progress_percent": "squared"},
    "progress from 10% (offset)": {"progress_percent": "offset"},
    "complete_time in whole seconds": {"stamp_rounding": "floor"},
    "gateway clock 1 s behind": {"stamp_skew": -1.0},
    "gateway clock 3 s behind": {"stamp_skew": -3.0},
    "gateway clock 3 s ahead": {"stamp_skew": 3.0},
    "ends recorded on a 0.5 s tick": {"end_tick": 0.5},
    "ends recorded on a 1 s tick": {"end_tick": 1.0},
    "ends recorded on a 1 s tick + no complete_time": {"end_tick": 1.0, "progress_fields": False},
    "bad: ±50% noise": {"faults": FaultConfig(estimate_noise=0.5)},
    "bad: ±20% noise": {"faults": FaultConfig(estimate_noise=0.2)},
    "bad: one typical figure for every job": {"estimate_basis": "typical"},
    "bad: one typical figure + progress by images": {
        "estimate_basis": "typical",
        "progress_percent": "images",
    },
    "bad: constant 30 s": {"faults": FaultConfig(estimate_constant=30.0)},
    "bad: constant 100 s (jobs of 10-30 s)": {"faults": FaultConfig(estimate_constant=100.0)},
    "bad: 3x pessimistic": {"faults": FaultConfig(estimate_bias=3.0)},
    "bad: 1 job in 20 told 3x its length": {"faults": FaultConfig(estimate_outliers=0.05)},
    "bad: 1 job in 20 told 3x its length + no queue": {
        "faults": FaultConfig(estimate_outliers=0.05),
        "queued_share": (0.0, 0.0),
    },
    "bad: 1 job in 20 told 3x its length + progress from 10%": {
        "faults": FaultConfig(estimate_outliers=0.05),
        "queued_share": (0.0, 0.0),
        "progress_percent": "offset",
    },
    "bad: 1 job in 20 told 2x its length": {
        "faults": FaultConfig(estimate_outliers=0.05, estimate_outlier_factor=2.0)
    },
    "bad: 1 job in 20 told 3x its length + progress from 10% + queues": {
        "faults": FaultConfig(estimate_outliers=0.05),
        "progress_percent": "offset",
    },
    "bad: 1 job in 20 told half its length": {
        "faults": FaultConfig(estimate_outliers=0.05, estimate_outlier_factor=0.5)
    },
    "bad: 1 job in 20 told 3x its length + whole percents": {
        "faults": FaultConfig(estimate_outliers=0.05),
        "progress_percent": "whole",
    },
    "bad: 2x optimistic": {"faults": FaultConfig(estimate_bias=0.5)},
    "bad: absent": {"faults": FaultConfig(estimate_absent=1.0)},
    "bad: absent + progress in whole percents": {
        "faults": FaultConfig(estimate_absent=1.0),
        "progress_percent": "whole",
    },
    "bad: absent + progress by images": {
        "faults": FaultConfig(estimate_absent=1.0),
        "progress_percent": "images",
    },
    "bad: ±50% noise + clock 3 s behind": {
        "faults": FaultConfig(estimate_noise=0.5),
        "stamp_skew": -3.0,
    },
    "bad: ±50% noise + no complete_time": {
        "faults": FaultConfig(estimate_noise=0.5),
        "progress_fields": False,
    },
    "whole seconds (ceil) + no complete_time": {
        "estimate_rounding": "ceil",
        "progress_fields": False,
    },
    "whole seconds (round) + no complete_time": {
        "estimate_rounding": "round",
        "progress_fields": False,
    },
    "bad: whole seconds (floor) + no complete_time": {
        "estimate_rounding": "floor",
        "progress_fields": False,
    },
}


async def burst(
    jobs: int, settings: dict[str, Any], policy: PollPolicy, *, per_second: float = 0.0
) -> dict[str, Any]:
    """``jobs`` submitted together, or ``per_second`` (a trickle)."""
    config = EmulatorConfig(
        time_scale=1.0, seed=5, job_seconds=(10, 30), **{"estimate_basis": "actual", **settings}
    )
    async with (
        Emulator(config) as emu,
        WujieClient(emu.credentials, base_url=emu.base_url, poll=policy) as client,
    ):

        async def submit(i: int) -> ImageJob:
            await asyncio.sleep(i / per_second if per_second else 0.0)
            return await client.images.submit(prompt=f"p{i}", model="gpt-image-1")

        submitted = await asyncio.gather(*(submit(i) for i in range(jobs)))
        for job in submitted:
            await job
        stats = emu.stats()
    asks = Counter(key for call in stats["batch_keys"] for key in call)
    late = sorted(t["first_listed_done"] - t["done"] for t in stats["timelines"].values())
    return {
        "asks_per_key": round(statistics.mean(asks[job.key] for job in submitted), 2),
        "calls_per_job": round((jobs + stats["batch_calls"]) / jobs, 3),
        "seen_late_p50_s": round(late[len(late) // 2], 3),
        "seen_late_p99_s": round(late[int(len(late) * 0.99) - 1], 3),
        "seen_late_max_s": round(late[-1], 3),
    }


def _follow(loop: asyncio.AbstractEventLoop, offset: float) -> float:
    return loop.time() + offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument(
        "--trickle", action="store_true", help="3 jobs a second for 60 s instead of a burst"
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="NAME,...",
        help="comma-separated variant names (no name has a comma): "
        + "; ".join(VARIANTS).replace("%", "%%"),
    )
    args = parser.parse_args()
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in VARIANTS]
    if unknown:
        parser.error(f"--only: unknown variant(s) {unknown}; variants: {'; '.join(VARIANTS)}")
    wanted = [name for name in VARIANTS if not only or name in only]
    results = {}
    for name in wanted:
        started = time.perf_counter()
        loop = looptime.new_event_loop(start=time.monotonic())
        # Wall time follows the loop's fake clock, so unix stamps (complete_time) map onto it.
        wall = time.time
        time.time = functools.partial(_follow, loop, wall() - loop.time())
        try:
            jobs, per_second = (180, 3.0) if args.trickle else (args.jobs, 0.0)
            figures = loop.run_until_complete(
                burst(jobs, VARIANTS[name], PollPolicy(), per_second=per_second)
            )
        finally:
            time.time = wall
            loop.close()
        results[name] = figures
        print(f"{name:46} {json.dumps(figures)}  ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
