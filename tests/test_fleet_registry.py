"""The key registry (every member's keys, their owners, read by each shard's leader) and the
report streams (a leader's answers, read by their member)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from wujie_async.fleet import RedisFleet
from wujie_async.fleet._errors import LeaseLostError
from wujie_async.fleet._exchange import Change, Inbox, KeyInfo, KeyRegistry, Report, post_reports
from wujie_async.fleet._lease import LeaderLease
from wujie_async.fleet._link import shard_of

from .fleet_support import any_redis, fleet_name, next_event, start_child, stop_child

pytestmark = pytest.mark.anyio


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    async with any_redis(tmp_path) as redis_url:
        yield redis_url


def info(model: str | None = "dall-e-2") -> KeyInfo:
    return KeyInfo(time.time(), None, time.time() + 600, model)


async def leading(fleet: RedisFleet, shard: int = 0) -> str:
    lease = LeaderLease(fleet, shard, f"leader-{shard}")
    assert await lease.try_acquire() == 0.0
    return lease.require(0)


async def test_a_leader_reads_the_whole_shard_then_its_changes(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), lease_seconds=30) as fleet:
        registry = KeyRegistry(fleet)
        first = info()
        await registry.write([("m1", "K1", first), ("m1", "K2", info(None)), ("m2", "K3", info())])
        fence = await leading(fleet)
        version, everything = await registry.read(0, fence, None)
        assert {(c.owner, c.job_key) for c in everything} == {
            ("m1", "K1"),
            ("m1", "K2"),
            ("m2", "K3"),
        }
        assert [c.info for c in everything if c.job_key == "K1"] == [first]
        assert version == 3
        # The owner of K1 is done with it; m2 attaches K1 and adds K4; one read has them all,
        # in order, and a removal is read once (its tombstone goes).
        await registry.write([("m1", "K1", None), ("m2", "K1", first), ("m2", "K4", info())])
        version, changes = await registry.read(0, fence, version)
        assert changes == [Change("m1", "K1", None), Change("m2", "K1", first), changes[2]]
        assert changes[2].job_key == "K4" and version == 6
        assert await registry.read(0, fence, version) == (version, [])
        changed = fleet.keys.changes(0)
        assert await fleet.call(lambda r: r.zcard(changed)) == 4  # live fields only
        # A limited read says how far it got; the next one goes on from there.
        await registry.write([("m3", f"L{i}", info()) for i in range(5)])
        later, some = await registry.read(0, fence, version, limit=2)
        assert [c.job_key for c in some] == ["L0", "L1"] and later == version + 2
        assert [c.job_key for c in (await registry.read(0, fence, later))[1]] == ["L2", "L3", "L4"]


async def test_a_read_needs_the_shards_lease(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        with pytest.raises(LeaseLostError):
            await KeyRegistry(fleet).read(0, "someone|1", None)


async def test_garbled_registrations_are_skipped_not_fatal(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), lease_seconds=30) as fleet:
        registry = KeyRegistry(fleet)
        good = info()
        await registry.write([("m", "GOOD", good)])
        hashed = fleet.keys.registered(0)
        nan = "[1.0, null, NaN, null]"
        garbage: dict[Any, Any] = {
            "no-space": good.encode(),
            "m NOT-JSON": "{",
            "m NOT-A-LIST": json.dumps({"t": 1}),
            "m NAN": nan,
            "m DEEP": "[" * 100_000,
            "m LONG-MODEL": json.dumps([1.0, None, 2.0, "x" * 200]),
            "m NEGATIVE-DELAY": json.dumps([1.0, -5, 2.0, None]),
            "m BOOL": json.dumps([True, None, 2.0, None]),
        }
        await fleet.call(lambda r: r.hset(hashed, mapping=garbage))
        _, changes = await registry.read(0, await leading(fleet), None)
        assert changes == [Change("m", "GOOD", good)]
        assert KeyInfo.decode(good.encode()) == good
        assert KeyInfo.decode(None) is None


async def test_keys_spread_over_shards_each_read_by_its_leader(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), shards=4, lease_seconds=30) as fleet:
        registry = KeyRegistry(fleet)
        keys = [f"KEY{i:03d}" for i in range(200)]
        await registry.write(("m1", key, info()) for key in keys)
        read: list[str] = []
        for shard in range(4):
            _, changes = await registry.read(shard, await leading(fleet, shard), None)
            assert all(shard_of(c.job_key, 4) == shard for c in changes)
            assert 20 < len(changes) < 80  # roughly even
            read += [c.job_key for c in changes]
        assert sorted(read) == keys


@pytest.mark.long
async def test_reports_reach_their_member_without_lost_wakeups(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        one, two = Inbox(fleet, "one"), Inbox(fleet, "two")
        entries: list[Any] = [{"key": "A", "status": 1}]
        # Posted before anyone reads: still delivered (no lost wake-ups).
        await post_reports(fleet, {"one": [Report(["A"], entries)], "two": [Report(["B"])]})
        got_one = await one.read(0.5)
        assert [(r.keys, r.data) for r in got_one] == [(["A"], entries)]
        assert [r.keys for r in await two.read(0.5)] == [["B"]]
        # A blocked reader wakes when a report is posted.
        reader = asyncio.create_task(two.read(5.0))
        await asyncio.sleep(0.1)
        await post_reports(fleet, {"two": [Report(ended={"C": ("UnknownJobError", "gone")})]})
        [verdict] = await asyncio.wait_for(reader, 1.0)
        assert verdict.ended == {"C": ("UnknownJobError", "gone")}
        # The wait is bounded.
        started = asyncio.get_running_loop().time()
        assert await one.read(0.2) == []
        assert asyncio.get_running_loop().time() - started < 1.0
        # Unacknowledged reports are read again by a new reader of the same member.
        assert await Inbox(fleet, "one").read(0.1) == got_one
        await one.ack(got_one)
        assert await Inbox(fleet, "one").read(0.1) == []
        stream = fleet.keys.reports("two")
        assert await fleet.call(lambda r: r.xlen(stream)) == 2
        assert 0 < await fleet.call(lambda r: r.pttl(stream))  # unread streams expire
        await two.drop()
        assert await fleet.call(lambda r: r.exists(stream)) == 0


async def test_a_malformed_stream_entry_is_skipped_not_fatal(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        stream = fleet.keys.reports("m")
        garbled: list[dict[Any, Any]] = [
            {"junk": "x"},
            {"b": "not json"},
            {"b": "[1]"},
            {"b": json.dumps({"k": "not a list", "d": [], "x": {}})},
            {"b": "[" * 100_000},  # nested deeper than json can follow
        ]
        for fields in garbled:
            await fleet.call(lambda r, fields=fields: r.xadd(stream, fields))  # type: ignore[misc]
        odd: dict[Any, Any] = {
            "b": json.dumps({"k": ["K", 7], "d": [], "x": {"E": "not a pair", "F": ["a", "b"]}})
        }
        await fleet.call(lambda r: r.xadd(stream, odd))
        await post_reports(fleet, {"m": [Report(["K"], [{"key": "K"}])]})
        reports = await Inbox(fleet, "m").read(0.2)
        assert [(r.keys, r.ended) for r in reports] == [(["K"], {"F": ("a", "b")}), (["K"], {})]


@pytest.mark.slow
async def test_reports_across_processes(url: str) -> None:
    """Two member processes register keys; a leader process answers each, exactly once."""
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
