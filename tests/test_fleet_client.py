"""WujieClient(fleet=...): one poller, one rate, one journal for every member (one process)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from wujie_async import (
    InvalidRequestError,
    JobFailedError,
    JobProtocolError,
    JobTimeoutError,
    Limits,
    UnknownJobError,
    WujieClient,
)
from wujie_async.fleet import FleetUnavailableError, RedisFleet
from wujie_async.fleet._limiter import FleetLimiter
from wujie_async.fleet._registry import KeyRegistry

from .conftest import FAST_POLL, INSTANT_RETRY, EmulatorFactory
from .fleet_support import any_redis, fleet_name, free_port, member, own_redis, role
from .hostile import scripted_gateway, throwaway_credentials
from .test_poller_hostile import done

pytestmark = pytest.mark.anyio


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    async with any_redis(tmp_path) as redis_url:
        yield redis_url


async def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_members_share_one_poller(url: str, emulator: EmulatorFactory) -> None:
    name = fleet_name()
    async with emulator() as emu, member(emu, url, name) as a, member(emu, url, name) as b:
        await wait_for(lambda: {role(a), role(b)} == {"leader", "follower"})
        jobs = [
            await c.images.submit(prompt=f"p{i}", model="dall-e-2")
            for i in range(30)
            for c in (a, b)
        ]
        results = await asyncio.gather(*jobs)
        assert all(len(r.images) == 1 for r in results)
        callers = {caller for _, caller in emu.stats()["batch_callers"]}
        leader = a if role(a) == "leader" else b
        follower = b if leader is a else a
        assert len(callers) == 1, callers  # one poller for the fleet: the leader
        assert follower.stats.batch_calls == 0
        assert leader.stats.batch_calls == emu.stats()["batch_calls"]
        await wait_for(lambda: (fleet := a.stats.fleet) is not None and fleet.batch_calls > 0)
        fleet = a.stats.fleet
        assert fleet is not None and fleet.size == 2 and 0 < fleet.mean_batch_fill <= 50
        assert emu.stats()["submits_accepted"] == 60
        assert emu.stats()["batch_keys"]  # every key was asked about by one leader, in calls
        assert sum(len(keys) for keys in emu.stats()["batch_keys"]) == leader.stats.keys_polled


async def test_the_leader_tells_an_owner_when_it_gives_up_on_a_key(
    url: str, emulator: EmulatorFactory
) -> None:
    # The gateway never lists an attached key. The leader gives up after its grace period
    # (1 s) and tells the owner, whose own grace (30 s) has not run out: its job fails now,
    # not at its deadline, with the leader's reason.
    name, patient = fleet_name(), replace(FAST_POLL, unknown_key_grace=30.0)
    async with emulator() as emu, member(emu, url, name) as first:
        await wait_for(lambda: role(first) == "leader")
        async with member(emu, url, name, poll=patient) as owner:
            await wait_for(lambda: role(owner) == "follower")
            job = owner.images.attach("0" * 32, job_timeout=60)
            with pytest.raises(UnknownJobError, match="fleet's poller gave up"):
                await asyncio.wait_for(job, 10)
            assert owner.stats.batch_calls == 0


async def test_a_followers_deadline_fires_in_its_own_process(
    url: str, emulator: EmulatorFactory
) -> None:
    # The leader polls; the job, its future and its deadline stay with its member.
    name, patient = fleet_name(), replace(FAST_POLL, unknown_key_grace=30.0)
    async with emulator() as emu, member(emu, url, name, poll=patient) as first:
        await wait_for(lambda: role(first) == "leader")
        async with member(emu, url, name, poll=patient) as owner:
            await wait_for(lambda: role(owner) == "follower")
            job = owner.images.attach("0" * 32, job_timeout=0.5)
            started = time.monotonic()
            with pytest.raises(JobTimeoutError):
                await asyncio.wait_for(job, 10)
            assert time.monotonic() - started < 2.0
            assert owner.stats.batch_calls == 0


async def heartbeats_after(fleet: RedisFleet, member_id: str, count: int) -> None:
    """Wait until ``member_id`` has heartbeated ``count`` times from now (seen in Redis)."""
    members, seen = fleet.keys.members, 0
    last = await fleet.connection.call(lambda r: r.zscore(members, member_id))
    deadline = time.monotonic() + 10
    while seen < count:
        assert time.monotonic() < deadline, "no heartbeat"
        await asyncio.sleep(0.02)
        score = await fleet.connection.call(lambda r: r.zscore(members, member_id))
        if score != last:
            seen, last = seen + 1, score


@pytest.mark.parametrize("garbled", ["counters", "type"])
async def test_garbled_fleet_figures_are_not_taken_for_redis_away(
    url: str, emulator: EmulatorFactory, garbled: str
) -> None:
    # The fleet's stats hash is another process's writes. Counters that are not numbers, or
    # a key of another type, must not crash the member's watch task or read as Redis away
    # (which would send every member to local polling, again and again).
    name = fleet_name()
    async with emulator() as emu, RedisFleet(url, name=name) as observer:
        stats = observer.keys.stats
        if garbled == "counters":
            await observer.connection.call(lambda r: r.hset(stats, "batch_calls", "lots"))
            await observer.connection.call(lambda r: r.hset(stats, "keys_polled", "\u00b2"))
        else:
            await observer.connection.call(lambda r: r.set(stats, "not a hash"))
        async with member(emu, url, name) as only:
            await wait_for(lambda: role(only) == "leader")
            job = await only.images.submit(prompt="p", model="dall-e-2")
            await job
            assert only.fleet_member is not None
            await heartbeats_after(observer, only.fleet_member, 2)  # both read the figures
            assert role(only) == "leader"
            fleet = only.stats.fleet
            assert fleet is not None and fleet.batch_calls == 0 and fleet.leader_calls > 0


async def test_a_journal_path_and_a_fleet_are_refused(
    url: str, tmp_path: Path, emulator: EmulatorFactory
) -> None:
    async with emulator() as emu:
        with pytest.raises(InvalidRequestError, match="journal"):
            WujieClient(
                emu.credentials,
                base_url=emu.base_url,
                journal=tmp_path / "j.sqlite",
                fleet=RedisFleet(url, name=fleet_name()),
            )


async def test_unreachable_redis_at_start_names_the_url(emulator: EmulatorFactory) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    async with emulator() as emu:
        client = member(emu, url, fleet_name(), command_timeout=1.0)
        with pytest.raises(FleetUnavailableError) as caught:
            await client.open()
    message = str(caught.value)
    assert f"127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}" in message
    assert "hunter2" not in message and "***" in message


async def test_resume_claims_a_dead_members_jobs_without_resubmitting(
    url: str, emulator: EmulatorFactory
) -> None:
    name = fleet_name()
    async with emulator(time_scale=0.05) as emu, member(emu, url, name) as survivor:
        async with member(emu, url, name) as doomed:
            keys = {
                (await doomed.images.submit(prompt=f"d{i}", model="dall-e-2")).key for i in range(5)
            }
        # Closing left the fleet at once; its accepted keys wait for a claimer.
        claimed = await survivor.resume()
        assert {job.key for job in claimed} == keys
        assert await survivor.resume() == []  # claimed once
        await asyncio.gather(*claimed)
        assert emu.stats()["submits_accepted"] == 5  # attached, never resubmitted
        found = await survivor.find_submit("nope")
        assert found is None


async def test_find_submit_works_fleet_wide(url: str, emulator: EmulatorFactory) -> None:
    name = fleet_name()
    async with emulator() as emu, member(emu, url, name) as a, member(emu, url, name) as b:
        job = await a.images.submit(prompt="tagged", tag="msg-1", model="dall-e-2")
        found = await b.find_submit("msg-1")
        assert found is not None and found.job_key == job.key
        await job
        await a.journal_entries()  # the whole fleet's rows
        assert [e.job_key for e in await b.journal_entries("accepted", "succeeded")] == [job.key]


async def test_fleet_rate_holds_across_members(url: str, emulator: EmulatorFactory) -> None:
    name = fleet_name()
    limits = Limits(max_submits_per_second=20)
    async with emulator() as emu:
        clients = [member(emu, url, name, limits=limits) for _ in range(3)]
        async with contextlib.AsyncExitStack() as stack:
            for client in clients:
                await stack.enter_async_context(client)
            started = time.monotonic()
            await asyncio.gather(
                *(
                    c.images.submit(prompt=f"{i}", model="dall-e-2")
                    for i in range(10)
                    for c in clients
                )
            )
            elapsed = time.monotonic() - started
        assert elapsed >= 29 / 20 * 0.95  # 30 submits at 20/s fleet-wide, not 60/s
        fleet = clients[0].stats.fleet
        assert fleet is not None and fleet.rate == 20


async def test_redis_lost_mid_run_falls_back_and_rejoins(
    tmp_path: Path, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "wujie_async.fleet")
    port = free_port()
    name = fleet_name()
    async with emulator(time_scale=0.05) as emu:
        async with own_redis(tmp_path, port=port, appendonly=True) as server:
            client = member(emu, server.url, name, command_timeout=0.5, unavailable_wait=0.5)
            await client.open()
            try:
                jobs = [
                    await client.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(10)
                ]
                assert server.process is not None
                server.process.terminate()
                await asyncio.wait_for(server.process.wait(), 15)
                # Nothing hangs: the member polls its own keys while Redis is away.
                results = await asyncio.wait_for(asyncio.gather(*jobs), 20)
                assert len(results) == 10
                assert role(client) == "local"
                assert "polls its own keys" in caplog.text
                # The stated submit policy: wait up to unavailable_wait, then a typed error.
                with pytest.raises(FleetUnavailableError, match="not sent"):
                    await client.images.submit(prompt="while away", model="dall-e-2")
                async with own_redis(tmp_path, port=port, appendonly=True):
                    await wait_for(lambda: role(client) != "local", 15)
                    assert "rejoined" in caplog.text
                    job = await client.images.submit(prompt="back", model="dall-e-2")
                    await asyncio.wait_for(job, 10)
                    assert emu.stats()["submits_accepted"] == 11
            finally:
                await client.aclose()


async def test_a_429_on_a_submit_pauses_every_member(url: str, emulator: EmulatorFactory) -> None:
    from wujie_async.emulator import FaultConfig

    name = fleet_name()
    faults = FaultConfig(burst_429=1, retry_after_s=2, endpoints=frozenset({"generations"}))
    async with emulator(faults=faults) as emu, member(emu, url, name) as a:
        job = await a.images.submit(prompt="after a 429", model="dall-e-2")  # retried, then ok
        assert a.stats.rate_limited == 1
        async with RedisFleet(url, name=name) as other:
            paused = await FleetLimiter(other.connection, other.keys, 1.0).paused_for()
        assert 0 < paused <= 2.0  # every member's next submit waits for it
        await job


def pollers_per_shard(
    stats: dict[str, Any], shard_of: Callable[[str], int]
) -> dict[int, list[tuple[float, str]]]:
    """Each shard's batch calls, in time order, as (time, caller); a call must stay in one."""
    calls: dict[int, list[tuple[float, str]]] = {}
    for (at, who), keys in zip(stats["batch_callers"], stats["batch_keys"], strict=True):
        shards = {shard_of(key) for key in keys}
        assert len(shards) == 1, f"one batch call asked about shards {shards}"
        calls.setdefault(shards.pop(), []).append((float(at), str(who)))
    return {shard: sorted(times) for shard, times in calls.items()}


async def test_shards_spread_the_polling_one_poller_per_shard(
    url: str, emulator: EmulatorFactory
) -> None:
    name, shards = fleet_name(), 3
    async with emulator(time_scale=0.02) as emu, contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(member(emu, url, name, shards=shards)) for _ in range(3)
        ]
        jobs = [
            await client.images.submit(prompt=f"{i}", model="dall-e-2")
            for i in range(20)
            for client in clients
        ]
        results = await asyncio.wait_for(asyncio.gather(*jobs), 20)
        assert all(len(result.images) == 1 for result in results)
        stats = emu.stats()
    fleet = RedisFleet(url, name=name, shards=shards)
    registry = KeyRegistry(fleet.connection, fleet.keys, shards=shards, lease_seconds=1)
    by_shard = pollers_per_shard(stats, registry.shard_of)
    assert set(by_shard) == set(range(shards))  # 60 keys land in every shard
    for calls in by_shard.values():
        # One poller per shard at a time: the caller changes only at a takeover (none here).
        assert len({who for _, who in calls}) == 1, calls
    asked_together = [keys for keys in stats["batch_keys"] if len(keys) > 1]
    keys_of = [{job.key for job in jobs[i :: len(clients)]} for i in range(len(clients))]
    # The fleet polls for everyone: some call mixes keys of different members.
    assert any(sum(1 for mine in keys_of if mine & set(keys)) > 1 for keys in asked_together)
    assert stats["submits_accepted"] == 60


async def test_a_followers_jobs_meet_hostile_entries_as_a_lone_clients_do(url: str) -> None:
    # The leader asks; the follower judges every entry of the reports itself, exactly as it
    # judges its own replies: a bad entry costs its own job, never the follower (or leader).
    def script(keys: list[str]) -> list[Any]:
        entries: list[Any] = [{"nokey": True}, "junk", None, {"key": "NOT-ASKED", "status": 4}]
        for key in keys:
            kind = int(key[1:]) % 4
            if kind == 1:
                entries.append({"key": key, "status": 1, "expected_seconds": math.nan})
                entries.append({**done(key), "complete_percent": math.inf})
            elif kind == 2:
                failure = {"fail_code": "\u00b2", "fail_message": "\x1b]0;PWNED\x07"}
                entries.append({"key": key, "status": 3, "fail_message": failure})
            elif kind == 3:
                entries.append({"key": key, "status": "done"})
            else:
                entries.append(done(key))
        return entries

    name = fleet_name()
    async with scripted_gateway(script) as gateway:
        clients = [
            WujieClient(
                throwaway_credentials(),
                base_url=gateway.base_url,
                poll=FAST_POLL,
                retry=INSTANT_RETRY,
                fleet=RedisFleet(url, name=name, lease_seconds=1.0),
            )
            for _ in range(2)
        ]
        async with clients[0] as first, clients[1] as second:
            await wait_for(lambda: {role(first), role(second)} == {"leader", "follower"})
            follower = first if role(first) == "follower" else second
            jobs = [
                await follower.images.submit(prompt=f"p{i}", model="dall-e-2") for i in range(8)
            ]
            outcomes = await asyncio.gather(*jobs, return_exceptions=True)
            for job, outcome in zip(jobs, outcomes, strict=True):
                kind = int(job.key[1:]) % 4
                if kind in (0, 1):
                    assert not isinstance(outcome, BaseException), (job.key, outcome)
                    assert 0 <= job.progress <= 100
                elif kind == 2:
                    assert isinstance(outcome, JobFailedError) and outcome.fail_code is None
                    assert "\x1b" not in str(outcome)
                else:
                    assert isinstance(outcome, JobProtocolError) and "malformed" in str(outcome)
            assert follower.stats.batch_calls == 0  # every reply came through the leader
            late = await follower.images.submit(prompt="late", model="dall-e-2")
            await asyncio.wait_for(asyncio.gather(late, return_exceptions=True), 10)  # lives on
