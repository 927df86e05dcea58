"""The submit cap holds in every 1-second window, as the emulator saw the submits arrive.

GCRA slots exactly ``1/cap`` apart put ``cap + 1`` submits into a closed 1-second window, and
arrival jitter (signing, the journal's intent, the loop waking late) does the rest; the
limiters keep ``cap + 1`` slots more than a second plus a jitter margin apart. Checked for the
fleet's limiter (several members sharing one Redis) and the single client's pacer.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from wujie_async import Limits, WujieClient
from wujie_async.emulator import Emulator, FaultConfig

from .conftest import FAST_POLL, EmulatorFactory
from .fleet_support import any_redis, fleet_name, member

# Slow: they run one after another. The margin covers arrival jitter of up to 50 ms, which
# four test workers on two cores can exceed (a run under such load counted 9 in a second).
pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CAP = 8


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    async with any_redis(tmp_path) as redis_url:
        yield redis_url


def busiest_closed_second(times: list[float]) -> int:
    """The most events in any closed window [t, t + 1] (both ends count: the strict reading)."""
    times = sorted(times)
    return max((bisect.bisect_right(times, t + 1.0) - i for i, t in enumerate(times)), default=0)


def arrivals(emu: Emulator) -> list[float]:
    timelines: dict[str, Any] = emu.stats()["timelines"]
    return [float(t["created"]) for t in timelines.values()]


def test_the_window_count_is_closed() -> None:
    assert busiest_closed_second([0.0, 0.5, 1.0]) == 3
    assert busiest_closed_second([0.0, 0.5, 1.0001]) == 2
    assert busiest_closed_second([]) == 0


async def submit_all(clients: list[WujieClient], per_client: int) -> None:
    jobs = await asyncio.gather(
        *(
            client.images.submit(prompt=f"{i}", model="dall-e-2")
            for i in range(per_client)
            for client in clients
        )
    )
    await asyncio.gather(*jobs)


async def submit_in_a_fleet(emu: Emulator, url: str, per_member: int) -> None:
    """Three members of one fleet, capped at CAP together, each submitting ``per_member``."""
    name = fleet_name()
    limits = Limits(max_submits_per_second=CAP)
    clients = [member(emu, url, name, limits=limits) for _ in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        await submit_all(clients, per_member)


def capped_client(emu: Emulator) -> WujieClient:
    """One client capped at CAP."""
    return WujieClient(
        emu.credentials,
        base_url=emu.base_url,
        poll=FAST_POLL,
        limits=Limits(max_submits_per_second=CAP),
    )


async def test_fleet_members_never_exceed_the_cap_in_any_second(
    url: str, emulator: EmulatorFactory
) -> None:
    async with emulator() as emu:
        await submit_in_a_fleet(emu, url, 7)  # 21 submits: about 2.6 s at the cap
        times = arrivals(emu)
    assert len(times) == 21
    assert busiest_closed_second(times) <= CAP, sorted(times)
    assert max(times) - min(times) < 20 / CAP * 1.25  # the cap is used, not just held


async def test_one_client_never_exceeds_the_cap_in_any_second(emulator: EmulatorFactory) -> None:
    async with emulator() as emu, capped_client(emu) as client:
        await submit_all([client], 21)
        times = arrivals(emu)
    assert len(times) == 21
    assert busiest_closed_second(times) <= CAP, sorted(times)
    assert max(times) - min(times) < 20 / CAP * 1.25


def submit_arrivals(emu: Emulator) -> list[float]:
    return [float(t) for t in emu.stats()["submit_arrivals"]]


# A gateway whose own limit is below the cap refuses some submits with 429 and Retry-After.
# A single client's resend went out when its Retry-After ended, past the cap: 10 submits in a
# second against a cap of 8 (two runs of the old code). A fleet's members already paused for
# the Retry-After (7 in its busiest second); the resend now takes a fleet slot as well (6).
REFUSING = FaultConfig(http_429=0.3, retry_after_s=1, endpoints=frozenset({"generations"}))


async def test_a_resend_after_a_429_takes_a_slot_of_the_cap(emulator: EmulatorFactory) -> None:
    async with emulator(faults=REFUSING) as emu, capped_client(emu) as client:
        await submit_all([client], 24)
        times = submit_arrivals(emu)
    assert emu.stats()["faults"]["http_429"] >= 3  # some were refused and sent again
    assert busiest_closed_second(times) <= CAP, sorted(times)


async def test_a_fleet_resend_after_a_429_takes_a_slot_of_the_fleet_cap(
    url: str, emulator: EmulatorFactory
) -> None:
    async with emulator(faults=REFUSING) as emu:
        await submit_in_a_fleet(emu, url, 8)
        times = submit_arrivals(emu)
    assert emu.stats()["faults"]["http_429"] >= 3
    assert busiest_closed_second(times) <= CAP, sorted(times)
