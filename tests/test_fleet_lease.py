"""Membership (heartbeats, death, coming back) and the leader lease (terms, takeover, fencing)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from wujie_async.fleet import LeaseLostError, RedisFleet
from wujie_async.fleet._lease import LeaderLease
from wujie_async.fleet._membership import Membership, Standing

from .fleet_support import any_redis, fleet_name, next_event, start_child, stop_child

pytestmark = pytest.mark.anyio


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    async with any_redis(tmp_path) as redis_url:
        yield redis_url


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait for ``condition()`` (sync or async) to hold, checking every 10 ms."""
    deadline = time.monotonic() + timeout
    while True:
        held = condition()
        if asyncio.iscoroutine(held):
            held = await held
        if held:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def lease(fleet: RedisFleet, member: str, shard: int = 0) -> LeaderLease:
    return LeaderLease(fleet.connection, fleet.keys, shard, member, fleet.config.lease_seconds)


async def heartbeats(fleet: RedisFleet) -> dict[str, float]:
    """Every registered member -> seconds since its last heartbeat, as Redis sees it."""
    members = fleet.keys.members

    async def read(redis: Any) -> tuple[list[Any], list[str]]:
        return await redis.zrange(members, 0, -1, withscores=True), await redis.time()

    scores, (seconds, micros) = await fleet.connection.call(read)
    now = int(seconds) * 1000 + int(micros) / 1000
    return {member: (now - score) / 1000 for member, score in scores}


# --- membership ---------------------------------------------------------------------------------
async def test_a_silent_member_is_judged_dead_and_its_next_heartbeat_brings_it_back(
    url: str,
) -> None:
    async with RedisFleet(url, name=fleet_name(), member_timeout=0.6) as fleet:
        alive = Membership(fleet.connection, fleet.keys, "alive", 0.6)
        silent = Membership(fleet.connection, fleet.keys, "silent", 0.6)
        assert (await alive.beat()).standing == Standing.FORGOTTEN  # new: it joins
        assert (await silent.beat()).live == 2
        assert (await alive.beat()).standing == Standing.ALIVE

        async def judged_dead() -> bool:
            await alive.beat()
            return (await heartbeats(fleet))["silent"] > 0.6

        await until(judged_dead)
        assert (await alive.beat()).live == 1
        # Dead is a verdict on silence: its heartbeat says so, and brings it back.
        beat = await silent.beat()
        assert beat.standing == Standing.JUDGED_DEAD and beat.live == 2
        assert (await silent.beat()).standing == Standing.ALIVE


async def test_leaving_makes_a_member_dead_at_once(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        staying = Membership(fleet.connection, fleet.keys, "staying", 30.0)
        leaving = Membership(fleet.connection, fleet.keys, "leaving", 30.0)
        await staying.beat()
        await leaving.beat()
        await leaving.leave()
        assert (await staying.beat()).live == 1
        assert (await heartbeats(fleet))["leaving"] > 30.0


async def test_garbled_fleet_figures_read_as_zero_and_never_fail_a_heartbeat(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        me = Membership(fleet.connection, fleet.keys, "me", 30.0)
        stats = fleet.keys.stats
        await fleet.connection.call(lambda r: r.hset(stats, "batch_calls", "lots"))
        beat = await me.beat(calls=3, keys=90)
        assert (beat.batch_calls, beat.keys_polled) == (0, 90)
        await fleet.connection.call(lambda r: r.set(stats, "not a hash"))
        beat = await me.beat(calls=1, keys=50)
        assert (beat.batch_calls, beat.keys_polled, beat.live) == (0, 0, 1)


# --- lease --------------------------------------------------------------------------------------
async def test_one_leader_and_a_larger_token_on_every_takeover(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), lease_seconds=0.4) as fleet:
        first, second = lease(fleet, "a"), lease(fleet, "b")
        assert await first.try_acquire() == 0.0
        assert await second.try_acquire() > 0  # held: the holder's TTL comes back
        assert first.token is not None and second.token is None
        old_token = first.token
        await until(lambda: first.remaining() == 0)  # `first` never renews
        with pytest.raises(LeaseLostError):
            first.require(0.0)  # its own clock says so before Redis does anything

        async def takes_over() -> bool:
            return await second.try_acquire() == 0.0

        await until(takes_over)  # once Redis has expired it
        assert second.token is not None and second.token > old_token
        assert await first.renew() is False  # Redis refuses the old term too


async def test_release_hands_over_at_once(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), lease_seconds=30) as fleet:
        first, second = lease(fleet, "a"), lease(fleet, "b")
        await first.try_acquire()
        await first.release()
        assert first.token is None
        assert await second.try_acquire() == 0.0


async def test_background_renewal_keeps_the_lease_and_shards_are_independent(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), lease_seconds=0.3, shards=2) as fleet:
        a0, b1, b0 = lease(fleet, "a", 0), lease(fleet, "b", 1), lease(fleet, "b", 0)
        for each in (a0, b1):
            await each.start()
        try:
            await asyncio.wait_for(a0.leading.wait(), 2)
            await asyncio.wait_for(b1.leading.wait(), 2)
            token = a0.token
            await b0.start()
            renewed = a0.renewals
            await until(lambda: a0.renewals >= renewed + 10)  # more than 3 lease periods
            assert a0.token == token and b0.token is None  # renewed, never lost
            counter = fleet.keys.lease_counter(0)
            assert await fleet.connection.call(lambda r: r.get(counter)) == str(token)  # no term
        finally:
            for each in (a0, b1, b0):
                await each.aclose()


@pytest.mark.slow
async def test_a_killed_leader_is_replaced_within_the_lease_time(url: str) -> None:
    name, lease_seconds = fleet_name(), 1.0
    child = await start_child("leader", url, name, str(lease_seconds))
    try:
        joined = await next_event(child)
        first_act = await next_event(child)
        assert first_act["act"] is not None  # it leads and acts
        async with RedisFleet(url, name=name, lease_seconds=lease_seconds) as fleet:
            where = fleet.keys.lease(0)
            holder = await fleet.connection.call(lambda r: r.get(where))
            assert holder == f"{joined['member']}|{first_act['act']}"
            successor = lease(fleet, "successor")
            await successor.start()
            try:
                child.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                await asyncio.wait_for(successor.leading.wait(), lease_seconds + 1)
                took = time.monotonic() - killed
                assert took <= lease_seconds + 0.1, took
                assert successor.token is not None and successor.token > first_act["act"]
            finally:
                await successor.aclose()
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
            successor = lease(fleet, "successor")
            await successor.start()
            try:
                child.send_signal(signal.SIGSTOP)  # a GC pause far longer than the lease
                await asyncio.wait_for(successor.leading.wait(), lease_seconds + 1)
                took_over = time.time()
                child.send_signal(signal.SIGCONT)
                # The woken child looks at its lease before acting, and is refused: every
                # act it printed on the way came before the successor's term began.
                events = []
                while "refused" not in (event := await next_event(child, timeout=10)):
                    events.append(event)
                assert all(e["act"] == old_token and e["t"] < took_over for e in events)
                assert successor.token is not None  # the woken child did not take it back
            finally:
                await successor.aclose()
    finally:
        child.send_signal(signal.SIGCONT)
        await stop_child(child)
