"""Fleet mode under Redis trouble, checked from outside: real member processes, a real
redis-server of the test's own, the package's emulator in its own process."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from wujie_async import Credentials, WujieClient

from .conftest import FAST_POLL
from .fleet_support import (
    emulator_process,
    emulator_stats,
    first_batch_callers,
    fleet_name,
    own_redis,
)
from .test_fleet_processes import (
    assert_each_job_once_one_leader,
    busiest_second,
    go_until_running,
    members,
    wait_event,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_connections_cut_again_and_again_leave_one_poller(tmp_path: Path) -> None:
    # Every client connection is cut (CLIENT KILL TYPE normal) every 0.1 s for 3 s while
    # jobs run. Redis itself answers all along: no member may take it for away, go local and
    # poll its own keys (each member's one-second blocking read of its reports was cut at
    # the second kill, after its one re-ask, and every member became a poller for a moment).
    import redis.asyncio as aioredis

    n, rate, lease, timeout, kills, every = 30, 15.0, 2.0, 6.0, 30, 0.1
    async with (
        own_redis(tmp_path) as server,
        emulator_process(tmp_path, "emu", time_scale=2.0) as emu,  # jobs of 3-10 s
        aioredis.Redis(port=server.port) as admin,
    ):
        async with members(
            server.url, emu, fleet_name(), 3, n, rate, lease=lease, timeout=timeout
        ) as procs:
            await go_until_running(procs, emu, 30)
            leader = (await first_batch_callers(emu))[-1][1]
            storm_from = time.time()
            for _ in range(kills):
                await admin.client_kill_filter(_type="normal", skipme=True)
                await asyncio.sleep(every)
            done = [await wait_event(proc, "resolved", 60) for proc in procs]
        stats = await emulator_stats(emu)
    assert_each_job_once_one_leader(done, stats)
    assert stats["submits_accepted"] == 3 * n
    # One poller all along: the leader, or (a storm that kills its lease's renewals for its
    # whole lease, on a loaded machine) one hand-over to another member, never members that
    # each poll their own keys side by side (the calls of several callers interleaved).
    order = [who for t, who in sorted(stats["batch_callers"]) if t > storm_from]
    switches = sum(1 for one, next_one in itertools.pairwise(order) if one != next_one)
    assert order[0] == leader and switches <= 1, order
    created = [t["created"] for t in stats["timelines"].values()]
    assert busiest_second(created) <= rate  # the cap, in every second


def lags(done: list[dict[str, Any]], stats: dict[str, Any]) -> dict[str, float]:
    """Each job's wait, in seconds, from its end at the gateway to its resolution by its
    member (the child notes when each job resolves)."""
    timelines = stats["timelines"]
    return {
        key: at - timelines[key]["done"] for event in done for key, (at, _) in event["ends"].items()
    }


async def test_jobs_of_several_images_listed_after_done_resolve_whole(tmp_path: Path) -> None:
    # Jobs of 2, 3 and 4 images (one size a member) whose reports say done 0.9 s before they
    # list the last images. The leader knows no job's n; each job still resolves with all its
    # images, within the listing's delay and a few polls of its end.
    n, rate, lease, timeout, unlisted, scale = 20, 15.0, 2.0, 6.0, 3.0, 0.3
    extra = ("--done-unlisted-s", str(unlisted))
    async with (
        own_redis(tmp_path) as server,
        emulator_process(tmp_path, "emu", time_scale=scale, extra=extra) as emu,
    ):
        async with members(
            server.url, emu, fleet_name(), 3, n, rate,
            images=(2, 3, 4), lease=lease, timeout=timeout,
        ) as procs:  # fmt: skip
            await go_until_running(procs, emu, 1)
            done = [await wait_event(proc, "resolved", 60) for proc in procs]
        stats = await emulator_stats(emu)
    assert_each_job_once_one_leader(done, stats)
    for images, event in zip((2, 3, 4), done, strict=True):
        assert {count for _, count in event["ends"].values()} == {images}
    waits = lags(done, stats)
    assert max(waits.values()) < unlisted * scale + 1.5, sorted(waits.values())[-5:]
    created = [t["created"] for t in stats["timelines"].values()]
    assert busiest_second(created) <= rate


async def test_redis_away_longer_than_member_timeout(tmp_path: Path) -> None:
    # Redis down for 10 s, longer than member_timeout (6 s) and unavailable_wait (10 s counts
    # from the first failure), while members submit at the cap: every member polls its own
    # keys meanwhile, then there is one poller again, nobody local, each job paid once, no job
    # waits on Redis for its result, and the cap holds in every second.
    n, rate, lease, timeout, outage = 40, 15.0, 2.0, 6.0, 10.0
    async with (
        own_redis(tmp_path) as server,
        emulator_process(tmp_path, "emu", time_scale=1.0) as emu,
    ):
        async with members(
            server.url, emu, fleet_name(), 3, n, rate, lease=lease, timeout=timeout
        ) as procs:
            await go_until_running(procs, emu, 30)
            await first_batch_callers(emu)
            assert server.process is not None
            server.process.terminate()
            await asyncio.wait_for(server.process.wait(), 15)
            await asyncio.sleep(outage)
            async with own_redis(tmp_path, port=server.port):
                back_at = time.time()
                done = [await wait_event(proc, "resolved", 90) for proc in procs]
        stats = await emulator_stats(emu)
    # A submit that waited for Redis longer than unavailable_wait was not sent: the jobs
    # resolved are those accepted, whatever their number.
    resolved = sum(len(event["resolved"]) for event in done)
    assert stats["submits_accepted"] == resolved
    assert_each_job_once_one_leader(done, stats)
    after = [who for t, who in stats["batch_callers"] if t > back_at + lease]
    assert len(set(after)) <= 1, set(after)
    assert max(lags(done, stats).values()) < 2.0
    created = [t["created"] for t in stats["timelines"].values()]
    assert busiest_second(created) <= rate


async def test_leader_stopped_past_member_timeout_leaves_one_poller(tmp_path: Path) -> None:
    # The leader is frozen (SIGSTOP) for 9 s, past its lease and member_timeout: another member
    # leads within a lease; the thawed one joins again as a follower and sends no batch call;
    # each job is paid once, and the other members' jobs never wait on it.
    n, rate, lease, timeout, frozen = 40, 15.0, 2.0, 6.0, 9.0
    async with (
        own_redis(tmp_path) as server,
        emulator_process(tmp_path, "emu", time_scale=1.0) as emu,
    ):
        async with members(
            server.url, emu, fleet_name(), 3, n, rate, lease=lease, timeout=timeout
        ) as procs:
            await go_until_running(procs, emu, 30)
            [leader] = [p for p in procs if p.token == (await first_batch_callers(emu))[-1][1]]
            leader.proc.send_signal(signal.SIGSTOP)
            stopped_at = time.time()
            await asyncio.sleep(frozen)
            leader.proc.send_signal(signal.SIGCONT)
            thawed_at = time.time()
            done = [await wait_event(proc, "resolved", 90) for proc in procs]
        stats = await emulator_stats(emu)
    assert_each_job_once_one_leader(done, stats)
    calls = [(t, who) for t, who in stats["batch_callers"] if t > stopped_at]
    takeover = [t for t, who in calls if who != leader.token]
    assert takeover and takeover[0] - stopped_at < lease + 1.0
    assert [t for t, who in calls if t > thawed_at and who == leader.token] == []
    others = [event for proc, event in zip(procs, done, strict=True) if proc is not leader]
    assert max(lags(others, stats).values()) < 2.0
    created = [t["created"] for t in stats["timelines"].values()]
    assert busiest_second(created) <= rate


async def test_a_submit_answered_while_redis_is_away_returns_and_its_job_is_polled(
    tmp_path: Path,
) -> None:
    # Redis goes away while a submit is on the wire (the gateway holds its reply 1.5 s). The
    # job is paid: submit() returns it once the reply comes, its key kept in memory and
    # written when Redis answers, and its member polls it meanwhile. (It waited for Redis
    # for unavailable_wait, 10 s, neither returned, polled nor held to its deadline: a job
    # that ended meanwhile waited that long for its result.)
    from wujie_async.fleet import RedisFleet

    held = 1.5
    faults = {"slow_reply": 1.0, "slow_reply_s": held, "endpoints": "generations"}
    async with (
        own_redis(tmp_path) as server,
        emulator_process(tmp_path, "emu") as emu,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(emu["origin"] + "/_emulator/faults", json=faults) as reply:
            assert reply.status == 200, await reply.text()
        fleet = RedisFleet(server.url, name=fleet_name(), unavailable_wait=10.0)
        credentials = Credentials(app_id=emu["app_id"], private_key=emu["private_key"])
        async with WujieClient(
            credentials, base_url=emu["base_url"], poll=FAST_POLL, fleet=fleet
        ) as client:
            submit = asyncio.create_task(
                client.images.submit(prompt="a lighthouse", model="dall-e-2", job_timeout=6.0)
            )
            deadline = time.monotonic() + 10
            while (await emulator_stats(emu))["requests"].get("generations", 0) == 0:
                assert time.monotonic() < deadline, "the submit was not sent"
                await asyncio.sleep(0.02)
            assert server.process is not None
            server.process.terminate()
            await asyncio.wait_for(server.process.wait(), 15)
            away_at = time.monotonic()
            job = await asyncio.wait_for(submit, 30)
            returned = time.monotonic() - away_at
            result = await asyncio.wait_for(job, 30)
            resolved = time.monotonic() - away_at
    assert len(result.images) == 1
    assert returned < held + 2.0, returned
    assert resolved < held + 3.0, resolved
