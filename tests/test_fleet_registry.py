"""The key registry (due keys across members, by shard) and report delivery on streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from wujie_async.fleet import LeaseLostError, RedisFleet, Report

from .fleet_support import any_redis, fleet_name, next_event, start_child, stop_child

pytestmark = pytest.mark.anyio


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    async with any_redis(tmp_path) as redis_url:
        yield redis_url


async def test_the_leader_takes_due_keys_of_every_member_and_holds_them(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), shards=1) as fleet:
        registry = fleet.registry()
        await registry.register("m1", {"K1": 0.0, "K2": 0.0, "LATER": 5.0})
        await registry.register("m2", {"K3": 0.0})
        lease = fleet.lease(0, "leader")
        await lease.try_acquire()
        fence = lease.require(0.1)
        batch = await registry.take_due(0, fence, limit=50, hold=1.0)
        assert {(k.job_key, k.owner) for k in batch.keys} == {
            ("K1", "m1"), ("K2", "m1"), ("K3", "m2"),
        }  # fmt: skip
        assert batch.next_due_in is not None and 0.5 < batch.next_due_in <= 1.0  # held ones
        assert (await registry.take_due(0, fence, limit=50, hold=1.0)).keys == []  # in flight
        # After the poll: K1 finished, K2 and K3 come back in 0 s; K1 is not revived.
        await registry.remove(["K1"])
        assert await registry.reschedule(0, fence, {"K1": 0.0, "K2": 0.0, "K3": 0.0}) == 2
        again = await registry.take_due(0, fence, limit=1, hold=1.0)
        assert len(again.keys) == 1 and again.next_due_in == 0.0  # the limit holds
        assert set(await registry.owners(0)) == {"K2", "K3", "LATER"}
        # A key re-registered by another member (a claimer) changes owner.
        await registry.register("m3", {"LATER": 0.0})
        taken = await registry.take_due(0, fence, limit=50, hold=1.0)
        assert ("LATER", "m3") in {(k.job_key, k.owner) for k in taken.keys}


async def test_a_take_says_when_a_full_call_will_be_due(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), shards=1) as fleet:
        registry = fleet.registry()
        await registry.register("m", {f"K{i}": 1.0 + i * 0.1 for i in range(60)})
        lease = fleet.lease(0, "leader")
        await lease.try_acquire()
        batch = await registry.take_due(0, lease.require(0.1), limit=50, hold=1.0)
        assert batch.keys == []
        assert batch.next_due_in is not None and 0.9 < batch.next_due_in <= 1.0
        # The 50th key (K49) is due at 5.9 s: a full call's worth is due then.
        assert batch.full_due_in is not None and 5.8 < batch.full_due_in <= 5.9
        await registry.remove([f"K{i}" for i in range(20)])
        batch = await registry.take_due(0, lease.require(0.1), limit=50, hold=1.0)
        assert batch.full_due_in is None  # 40 keys left: never a full call


async def test_a_key_in_flight_comes_back_when_the_leader_dies_mid_poll(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), lease_seconds=0.2) as fleet:
        registry = fleet.registry()
        await registry.register("m1", {"K": 0.0})
        dying = fleet.lease(0, "dying")
        await dying.try_acquire()
        assert len((await registry.take_due(0, dying.require(0), limit=5, hold=0.3)).keys) == 1
        await asyncio.sleep(0.35)  # the leader never reports back; its lease and hold expire
        successor = fleet.lease(0, "successor")
        assert await successor.try_acquire() == 0.0
        batch = await registry.take_due(0, successor.require(0), limit=5, hold=0.3)
        assert [k.job_key for k in batch.keys] == ["K"]
        with pytest.raises(LeaseLostError):
            await registry.reschedule(0, "dying|1", {"K": 0.0})


async def test_keys_spread_over_shards_with_one_lease_each(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), shards=4) as fleet:
        registry = fleet.registry()
        keys = [f"KEY{i:03d}" for i in range(200)]
        await registry.register("m1", dict.fromkeys(keys, 0.0))
        taken: list[str] = []
        for shard in range(4):
            lease = fleet.lease(shard, f"leader{shard}")
            await lease.try_acquire()
            batch = await registry.take_due(shard, lease.require(0), limit=200, hold=5)
            assert all(registry.shard_of(k.job_key) == shard for k in batch.keys)
            assert 20 < len(batch.keys) < 80  # roughly even
            taken += [k.job_key for k in batch.keys]
        assert sorted(taken) == keys


async def test_reports_reach_two_members_in_one_process_without_lost_wakeups(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        one, two = fleet.inbox("one"), fleet.inbox("two")
        outbox = fleet.outbox()
        # Posted before anyone reads: still delivered (no lost wake-ups).
        await outbox.post([("one", Report("A", {"status": 1})), ("two", Report("B", {"s": 4}))])
        got_one = await one.read(0.5)
        assert [(r.job_key, r.body) for r in got_one] == [("A", {"status": 1})]
        # A blocked reader wakes when a report is posted.
        reader = asyncio.create_task(two.read(5.0))
        await asyncio.sleep(0.1)
        got_two = await asyncio.wait_for(reader, 1.0)
        assert [r.job_key for r in got_two] == ["B"]
        reader = asyncio.create_task(two.read(5.0))
        await asyncio.sleep(0.1)
        await outbox.post([("two", Report("C", {"status": 4}))])
        assert [r.job_key for r in await asyncio.wait_for(reader, 1.0)] == ["C"]
        # The wait is bounded.
        started = asyncio.get_running_loop().time()
        assert await one.read(0.2) == []
        assert asyncio.get_running_loop().time() - started < 1.0
        # Unacknowledged reports are read again by a new reader of the same member.
        assert await fleet.inbox("one").read(0.1) == got_one
        assert await one.ack(got_one) == 1
        assert await fleet.inbox("one").read(0.1) == []
        assert await two.pending() == 2
        await two.drop()
        assert await two.pending() == 0


async def test_a_malformed_stream_entry_is_skipped_not_fatal(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        stream = fleet.keys.reports("m")
        await fleet.call(lambda r: r.xadd(stream, {"junk": "x"}))
        await fleet.call(lambda r: r.xadd(stream, {"k": "K", "b": "not json"}))
        await fleet.call(lambda r: r.xadd(stream, {"k": "K", "b": "[1]"}))
        await fleet.call(lambda r: r.xadd(stream, {"k": "K", "b": "[" * 100_000}))  # deep
        await fleet.outbox().post([("m", Report("K", {"ok": True}))])
        assert [r.body for r in await fleet.inbox("m").read(0.2)] == [{"ok": True}]


@pytest.mark.slow
async def test_reports_across_processes(url: str) -> None:
    """Two member processes register keys; a leader process polls them all and reports."""
    name = fleet_name()
    members = [await start_child("reports", url, name, "30") for _ in range(2)]
    leader = await start_child("poller", url, name, "2")
    try:
        for member in members:
            await next_event(member)
        await next_event(leader)
        for member in members:
            seen = (await next_event(member, timeout=30))["seen"]
            assert len(seen) == 30 and set(seen.values()) == {1}  # each report exactly once
    finally:
        for proc in (*members, leader):
            with contextlib.suppress(ProcessLookupError):
                await stop_child(proc)
