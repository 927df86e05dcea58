"""Membership (heartbeats, death) and the fenced leader lease (takeover, stalled leaders)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from wujie_async.fleet import LeaseLostError, RedisFleet

from .fleet_support import any_redis, fleet_name, next_event, start_child, stop_child

pytestmark = pytest.mark.anyio


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    async with any_redis(tmp_path) as redis_url:
        yield redis_url


# --- membership ---------------------------------------------------------------------------------
async def test_a_silent_member_dies_and_cannot_come_back(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), member_timeout=0.6) as fleet:
        async with fleet.membership() as alive, fleet.membership() as silent:
            await silent.aclose(leave=False)  # stops heartbeating, without leaving
            assert sorted(await alive.live_members()) == sorted([alive.member_id, silent.member_id])
            await asyncio.sleep(0.9)  # longer than member_timeout; `alive` heartbeats every 0.2 s
            assert await alive.live_members() == [alive.member_id]
            assert await alive.dead_members() == [silent.member_id]
            assert await silent.heartbeat() is False  # too late: dead for good
            assert silent.lost.is_set() and not silent.alive
            assert alive.alive


async def test_leaving_makes_a_member_dead_at_once(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        async with fleet.membership() as staying:
            leaving = fleet.membership()
            await leaving.start()
            await leaving.aclose()
            assert await staying.dead_members() == [leaving.member_id]
            assert await staying.live_members() == [staying.member_id]


# --- lease --------------------------------------------------------------------------------------
async def test_one_leader_and_a_larger_token_on_every_takeover(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), lease_seconds=0.4) as fleet:
        first, second = fleet.lease(0, "a"), fleet.lease(0, "b")
        assert await first.try_acquire() == 0.0
        assert await second.try_acquire() > 0  # held: the holder's TTL comes back
        assert first.token is not None and second.token is None
        old_fence, old_token = first.require(0.1), first.token
        await asyncio.sleep(0.45)  # `first` never renews: its lease expires
        with pytest.raises(LeaseLostError):
            first.require(0.0)  # its own clock says so before Redis does anything
        assert await second.try_acquire() == 0.0
        assert second.token is not None and second.token > old_token
        # Redis refuses the stale fence too (a frozen process that skipped the local check).
        with pytest.raises(LeaseLostError):
            await fleet.registry().take_due(0, old_fence, limit=10, hold=1.0)
        assert await first.renew() is False
        await fleet.registry().take_due(0, second.require(0.1), limit=10, hold=1.0)


async def test_release_hands_over_at_once(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), lease_seconds=30) as fleet:
        first, second = fleet.lease(0, "a"), fleet.lease(0, "b")
        await first.try_acquire()
        await first.release()
        assert first.token is None
        assert await second.try_acquire() == 0.0


async def test_background_renewal_keeps_the_lease_and_shards_are_independent(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), lease_seconds=0.3, shards=2) as fleet:
        async with fleet.lease(0, "a") as a0, fleet.lease(1, "b") as b1:
            await asyncio.wait_for(a0.leading.wait(), 2)
            await asyncio.wait_for(b1.leading.wait(), 2)
            token = a0.token
            async with fleet.lease(0, "b") as b0:
                await asyncio.sleep(1.0)  # more than 3 lease periods
                assert a0.token == token and b0.token is None  # renewed, never lost
                assert a0.remaining() > 0.1


async def events_until(proc: Any, stop: float) -> list[dict[str, Any]]:
    events = []
    while (left := stop - time.monotonic()) > 0:
        try:
            events.append(await next_event(proc, timeout=left))
        except TimeoutError:
            break
    return events


@pytest.mark.slow
async def test_a_killed_leader_is_replaced_within_the_lease_time(url: str) -> None:
    name, lease_seconds = fleet_name(), 1.0
    child = await start_child("leader", url, name, str(lease_seconds))
    try:
        await next_event(child)  # it has joined
        first_act = await next_event(child)
        assert first_act["act"] is not None  # it leads and acts
        async with RedisFleet(url, name=name, lease_seconds=lease_seconds) as fleet:
            async with fleet.lease(0, "successor") as successor:
                await asyncio.sleep(0.3)
                assert successor.token is None  # the child holds the lease
                child.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                await asyncio.wait_for(successor.leading.wait(), lease_seconds + 1)
                took = time.monotonic() - killed
                assert took <= lease_seconds + 0.1, took
                assert successor.token is not None and successor.token > first_act["act"]
    finally:
        await stop_child(child)


@pytest.mark.slow
async def test_a_stalled_leader_does_not_act_after_losing_its_lease(url: str) -> None:
    name, lease_seconds = fleet_name(), 0.8
    child = await start_child("leader", url, name, str(lease_seconds))
    try:
        await next_event(child)
        old_token = (await next_event(child))["act"]
        async with RedisFleet(url, name=name, lease_seconds=lease_seconds) as fleet:
            async with fleet.lease(0, "successor") as successor:
                child.send_signal(signal.SIGSTOP)  # a GC pause far longer than the lease
                await asyncio.wait_for(successor.leading.wait(), lease_seconds + 1)
                took_over = time.time()
                await fleet.registry().take_due(0, successor.require(0.1), limit=5, hold=1)
                child.send_signal(signal.SIGCONT)
                events = await events_until(child, time.monotonic() + 0.8)
                assert successor.token is not None  # the woken child did not take it back
        late = [e for e in events if e.get("act") == old_token and e["t"] > took_over]
        assert late == []
        assert all(e["act"] == old_token for e in events)  # it never led again
    finally:
        child.send_signal(signal.SIGCONT)
        await stop_child(child)
