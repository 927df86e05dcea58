"""The key log (who follows which key, by shard, read by its leader) and the reports."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from wujie_async.fleet import RedisFleet
from wujie_async.fleet._registry import Follow, KeyRegistry, Leave
from wujie_async.fleet._reports import Announce, Ending, Reply, ReportInbox, ReportOutbox

from .fleet_support import any_redis, fleet_name

pytestmark = pytest.mark.anyio


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    async with any_redis(tmp_path) as redis_url:
        yield redis_url


def registry(fleet: RedisFleet) -> KeyRegistry:
    return KeyRegistry(fleet.connection, fleet.keys, shards=fleet.config.shards, lease_seconds=1)


def job(key: str, model: str | None = "dall-e-2", *, age: float = 0.0) -> Follow:
    return Follow(key=key, model=model, first_delay=None, age=age, deadline_in=60.0)


async def test_a_leader_reads_who_follows_what_from_its_term_on(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        keys = registry(fleet)
        await keys.follow("m1", [job("BEFORE")])  # before the term: announced again if need be
        cursor = await keys.begin_term(0)
        await keys.follow("m1", [job("K1", age=5.0), Follow("K2", None, 0.0, 0.0, 30.0)])
        await keys.leave("m2", ["K1"])
        cursor, changes = await keys.changes(0, cursor, wait=1.0)
        assert changes == [
            Follow("K1", "dall-e-2", None, 5.0, 60.0, owner="m1"),
            Follow("K2", None, 0.0, 0.0, 30.0, owner="m1"),
            Leave("K1", "m2"),
        ]
        # Nothing new: the read waits its time and returns nothing.
        cursor, changes = await keys.changes(0, cursor, wait=0.1)
        assert changes == []
        # A blocked read wakes when a member follows a key.
        later = asyncio.create_task(keys.changes(0, cursor, wait=5.0))
        await keys.follow("m3", [job("K3")])
        _, changes = await asyncio.wait_for(later, 2.0)
        assert [change.key for change in changes] == ["K3"]


async def test_keys_spread_over_shards(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), shards=4) as fleet:
        keys = registry(fleet)
        cursors = [await keys.begin_term(shard) for shard in range(4)]
        names = [f"KEY{i:03d}" for i in range(200)]
        await keys.follow("m1", [job(name) for name in names])
        found: list[str] = []
        for shard, cursor in enumerate(cursors):
            _, changes = await keys.changes(shard, cursor, wait=0.1)
            assert all(keys.shard_of(change.key) == shard for change in changes)
            assert 20 < len(changes) < 80  # roughly even
            found += [change.key for change in changes]
        assert sorted(found) == names


async def test_garbled_log_entries_are_skipped(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        keys = registry(fleet)
        log = fleet.keys.keys_log(0)
        cursor = await keys.begin_term(0)
        garbled: list[dict[Any, Any]] = [
            {"junk": "x"},
            {"k": "K", "o": "m", "f": "{"},
            {"k": "K", "o": "m", "f": "[" * 100_000},
            {"k": "K", "o": "m", "f": json.dumps([None, None, "soon", 60])},
            {"k": "K", "o": "m", "f": json.dumps([None, None, 1, float("nan")])},
            {"k": "K", "o": "m", "f": json.dumps([1, 2])},
            {"k": "K", "o": "m", "f": json.dumps({"a": 1})},
        ]

        async def add(redis: Any, fields: dict[Any, Any]) -> None:
            await redis.xadd(log, fields)

        for fields in garbled:
            await fleet.connection.call(functools.partial(add, fields=fields))
        await keys.follow("m", [job("GOOD", model="x" * 500)])
        _, changes = await keys.changes(0, cursor, wait=0.1)
        assert [(change.key, len(getattr(change, "model", ""))) for change in changes] == [
            ("GOOD", 100)
        ]


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
        await outbox.post([("one", Announce(3))])
        got_one = await one.read(0.5)
        assert got_one == [Reply(("A",), [entry]), Announce(3)]
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
