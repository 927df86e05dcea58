"""The batching poller at its default PollPolicy against gateways that report estimates their
own way: the emulator over loopback, on a fast-forwarding loop clock (a burst of "10-30 s"
jobs takes the CPU time of its calls). Asks per key are counted from the emulator's own record
of every batch call.

On the fake clock the gateway's ``complete_time`` cannot be placed on the client's clock (the
wall clock does not move with the loop's), so these runs are also the case of a gateway that
gives no usable end time: the hard case for learning when estimates are right.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import Counter
from typing import Any

import pytest

from wujie_async import PollPolicy, WujieClient

from .conftest import EmulatorFactory

pytestmark = [pytest.mark.anyio, pytest.mark.fake_clock]

JOBS = 200


async def burst(emulator: EmulatorFactory, **settings: Any) -> tuple[float, float]:
    """(mean asks per key, the worst lateness in seconds) of a burst at the default policy."""
    async with (
        emulator(
            time_scale=1.0, seed=5, job_seconds=(10, 30), estimate_basis="actual", **settings
        ) as emu,
        WujieClient(emu.credentials, base_url=emu.base_url, poll=PollPolicy()) as client,
    ):
        jobs = await asyncio.gather(
            *(client.images.submit(prompt=f"p{i}", model="gpt-image-1") for i in range(JOBS))
        )
        for job in jobs:
            await job
        stats = emu.stats()
    asks = Counter(key for call in stats["batch_keys"] for key in call)
    late = max(t["first_listed_done"] - t["done"] for t in stats["timelines"].values())
    return statistics.mean(asks[job.key] for job in jobs), late


@pytest.mark.parametrize(
    ("settings", "most_asks"),
    [
        pytest.param({}, 3.0, id="right estimates"),
        pytest.param({"estimate_while_queued": "generation"}, 3.5, id="countdown from start"),
        pytest.param({"estimate_while_queued": "absent"}, 4.0, id="none while queued"),
        pytest.param({"estimate_while_queued": "zero"}, 4.0, id="zero while queued"),
        pytest.param({"images_progressive": False}, 3.0, id="images at the end"),
        pytest.param({"estimate_rounding": "floor"}, 4.0, id="whole seconds, rounded down"),
        pytest.param({"estimate_rounding": "round"}, 4.0, id="whole seconds, rounded"),
    ],
)
async def test_asks_per_key_hold_across_gateways(
    emulator: EmulatorFactory, settings: dict[str, Any], most_asks: float
) -> None:
    asks, late = await burst(emulator, **settings)
    assert asks <= most_asks, asks
    assert late <= 1.0 + PollPolicy().min_interval, late
