"""The key registry (whose keys, by shard, followed by a leader through its log) and reports."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from wujie_async.fleet import RedisFleet
from wujie_async.fleet._registry import KeyRegistry, Registration
from wujie_async.fleet._reports import Ending, Reply, ReportInbox, ReportOutbox

from .fleet_support import any_redis, fleet_name

pytestmark = pytest.mark.anyio


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    async with any_redis(tmp_path) as redis_url:
        yield redis_url


def registry(fleet: RedisFleet) -> KeyRegistry:
    return KeyRegistry(fleet.connection, fleet.keys, shards=fleet.config.shards, lease_seconds=1)


def job(key: str, model: str | None = "dall-e-2", *, age: float = 0.0) -> Registration:
    return Registration(key=key, model=model, first_delay=None, age=age, deadline_in=60.0)


async def test_a_leader_loads_the_registry_then_follows_its_log(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        keys = registry(fleet)
        await keys.register("m1", [job("K1", age=5.0), job("K2")])
        cursor, loaded = await keys.load(0)
        assert {(r.key, r.owners, r.model) for r in loaded} == {
            ("K1", ("m1",), "dall-e-2"), ("K2", ("m1",), "dall-e-2"),
        }  # fmt: skip
        [first] = [r for r in loaded if r.key == "K1"]
        assert 5.0 <= first.age < 6.0 and 58.0 < first.deadline_in <= 60.0
        assert first.first_delay is None
        # A second owner keeps the record (its submit time) and is added; a new key appears;
        # a key whose last owner lets go is gone. Each change comes once, in one read.
        await keys.register("m2", [job("K1", age=0.0)])
        await keys.register("m1", [Registration("K3", None, 0.0, 0.0, 60.0)])
        await keys.unregister("m1", ["K2", "NEVER"])
        cursor, changes = await keys.changes(0, cursor, wait=1.0)
        assert set(changes) == {"K1", "K2", "K3"}
        k1, k2, k3 = changes["K1"], changes["K2"], changes["K3"]
        assert k1 is not None and k1.owners == ("m1", "m2") and k1.age >= 5.0
        assert k2 is None
        assert k3 is not None and k3.model is None and k3.first_delay == 0.0
        # Nothing new: the read waits its time and returns nothing.
        cursor, changes = await keys.changes(0, cursor, wait=0.1)
        assert changes == {}
        # A blocked read wakes when a member registers a key.
        later = asyncio.create_task(keys.changes(0, cursor, wait=5.0))
        await keys.register("m3", [job("K4")])
        _, changes = await asyncio.wait_for(later, 2.0)
        assert list(changes) == ["K4"]


async def test_a_leader_removes_an_ended_record_only_if_it_did_not_change(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        keys = registry(fleet)
        await keys.register("m1", [job("ENDED"), job("CLAIMED")])
        _, loaded = await keys.load(0)
        await keys.register("claimer", [job("CLAIMED")])  # after the leader's read
        await keys.drop(0, loaded)
        _, left = await keys.load(0)
        assert [(r.key, r.owners) for r in left] == [("CLAIMED", ("m1", "claimer"))]


async def test_keys_spread_over_shards(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), shards=4) as fleet:
        keys = registry(fleet)
        names = [f"KEY{i:03d}" for i in range(200)]
        await keys.register("m1", [job(name) for name in names])
        found: list[str] = []
        for shard in range(4):
            _, loaded = await keys.load(shard)
            assert all(keys.shard_of(r.key) == shard for r in loaded)
            assert 20 < len(loaded) < 80  # roughly even
            found += [r.key for r in loaded]
        assert sorted(found) == names


async def test_garbled_records_are_skipped_or_replaced(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        keys = registry(fleet)
        where = fleet.keys.registry(0)
        garbled: dict[Any, Any] = {
            "NOT-JSON": "{",
            "DEEP": "[" * 100_000,
            "NO-OWNERS": json.dumps({"m": "x", "a": 1, "d": 2, "o": []}),
            "BAD-TIME": json.dumps({"a": "soon", "d": 2, "o": ["m"]}),
            "WRONG-OWNERS": json.dumps({"a": 1, "d": 2, "o": [1, None]}),
        }
        await fleet.connection.call(lambda r: r.hset(where, mapping=garbled))
        await keys.register("m1", [job("GOOD")])
        _, loaded = await keys.load(0)
        assert [r.key for r in loaded] == ["GOOD"]
        # A member registering a key whose record is garbled writes a new one.
        await keys.register("m1", [job("NOT-JSON"), job("BAD-TIME")])
        _, loaded = await keys.load(0)
        assert sorted(r.key for r in loaded) == ["BAD-TIME", "GOOD", "NOT-JSON"]


async def test_reports_reach_their_member_without_lost_wakeups(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        redis, names = fleet.connection, fleet.keys
        outbox = ReportOutbox(redis, names, expire_after=60)
        one, two = (
            ReportInbox(redis, names, "one", 10_000),
            ReportInbox(redis, names, "two", 10_000),
        )
        entry = {"key": "A", "status": 1}
        # Posted before anyone reads: still delivered (no lost wake-ups).
        await outbox.post([("one", Reply(("A",), [entry])), ("two", Ending("B", True, "gone"))])
        got_one = await one.read(0.5)
        assert got_one == [Reply(("A",), [entry])]
        assert await two.read(0.5) == [Ending("B", True, "gone")]
        # A blocked reader wakes when a report is posted.
        reader = asyncio.create_task(two.read(5.0))
        await outbox.post([("two", Reply(("C",), []))])
        assert await asyncio.wait_for(reader, 1.0) == [Reply(("C",), [])]
        # The wait is bounded.
        started = asyncio.get_running_loop().time()
        assert await one.read(0.2) == []
        assert asyncio.get_running_loop().time() - started < 1.0
        # What was not acknowledged is read again from the start (after Redis came back).
        one.rewind()
        assert await one.read(0.1) == got_one
        await one.ack(got_one)
        one.rewind()
        assert await one.read(0.1) == []
        stream = names.reports("two")
        assert 0 < await redis.call(lambda r: r.pttl(stream)) <= 60_000  # dies with its member


async def test_a_malformed_report_is_skipped_not_fatal(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        stream = fleet.keys.reports("m")

        async def add(fields: dict[Any, Any]) -> None:
            await fleet.connection.call(lambda r: r.xadd(stream, fields))

        for fields in (
            {"junk": "x"},
            {"r": "not json"},
            {"r": "[1]"},
            {"r": "[" * 100_000},  # nested deeper than json can follow
            {"r": json.dumps({"asked": ["K"] * 51, "entries": []})},  # more than one call
            {"r": json.dumps({"asked": [1], "entries": []})},
            {"r": json.dumps({"asked": ["K"], "entries": {}})},
            {"r": json.dumps({"ended": "K", "unknown": "yes"})},
            {"r": json.dumps({"asked": ["K"], "entries": ["x" * 2000]})},  # over the size cap
        ):
            await add(fields)
        await add({"r": json.dumps({"asked": ["K"], "entries": [{"key": "K"}]})})
        inbox = ReportInbox(fleet.connection, fleet.keys, "m", max_bytes=1000)
        assert await inbox.read(0.2) == [Reply(("K",), [{"key": "K"}])]
