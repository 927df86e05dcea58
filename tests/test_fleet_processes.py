"""Fleet mode with real processes: members, an emulator of its own, a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .fleet_support import (
    any_redis,
    emulator_process,
    emulator_stats,
    first_batch_callers,
    fleet_name,
    next_event,
    own_redis,
    start_child,
    stop_child,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@dataclass
class Member:
    proc: asyncio.subprocess.Process
    token: str


async def wait_event(
    who: Member | asyncio.subprocess.Process, field: str, timeout: float = 40
) -> dict[str, Any]:
    proc = who.proc if isinstance(who, Member) else who
    while True:
        event = await next_event(proc, timeout)
        if field in event:
            return event


def busiest_second(times: list[float]) -> int:
    """The most events in any 1-second window (sliding, starting at each event)."""
    times = sorted(times)
    best, first = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - 1.0:
            first += 1
        best = max(best, last - first + 1)
    return best


def overlapping_pollers(callers: list[list[Any]]) -> int:
    """Batch calls made by a member other than the last caller within 0.5 s before it."""
    calls = sorted((float(t), str(who)) for t, who in callers)
    overlaps = 0
    for (t0, a), (t1, b) in itertools.pairwise(calls):
        if a != b and t1 - t0 < 0.5:
            overlaps += 1
    return overlaps


@contextlib.asynccontextmanager
async def members(
    url: str,
    emu: dict[str, Any],
    name: str,
    count: int,
    n: int,
    rate: float,
    *,
    images: tuple[int, ...] = (),
    **opts: float,
) -> AsyncIterator[list[Member]]:
    """``count`` member processes of fleet ``name``, each to submit ``n`` jobs (of
    ``images[i]`` images for the i-th member; 1 by default)."""
    lease, timeout = opts.get("lease", 1.0), opts.get("timeout", 3.0)
    procs = [
        await start_child(
            "member",
            url,
            name,
            emu["file"],
            str(n),
            str(rate),
            str(lease),
            str(timeout),
            images=images[i] if i < len(images) else 1,
        )
        for i in range(count)
    ]
    try:
        yield [Member(proc, (await wait_event(proc, "member"))["token"]) for proc in procs]
    finally:
        for proc in procs:
            await stop_child(proc)


def send(who: Member, line: str) -> None:
    assert who.proc.stdin is not None
    who.proc.stdin.write(line.encode() + b"\n")


async def go_until_running(procs: list[Member], emu: dict[str, Any], accepted: int) -> None:
    """Tell every member to submit its jobs, and wait until the emulator has accepted
    ``accepted`` of them (jobs are running)."""
    for proc in procs:
        send(proc, "go")
    deadline = time.monotonic() + 30
    while (await emulator_stats(emu))["submits_accepted"] < accepted:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


def assert_each_job_once_one_leader(done: list[dict[str, Any]], stats: dict[str, Any]) -> None:
    """Every member's jobs resolved ok, each paid once (``n`` jobs a member), and the
    members ended as one leader and its followers (nobody local)."""
    jobs = 0
    for event in done:
        assert set(event["resolved"].values()) == {"ok"}
        jobs += len(event["resolved"])
    assert stats["submits_accepted"] == jobs  # nothing lost, nothing paid twice
    roles = sorted(event["stats"]["fleet"]["role"] for event in done)
    assert roles == ["follower"] * (len(done) - 1) + ["leader"], roles


async def test_four_members_one_poller_one_rate(tmp_path: Path) -> None:
    n, rate = 500, 250.0
    async with (
        any_redis(tmp_path) as url,
        emulator_process(tmp_path, "fleet") as emu,
        emulator_process(tmp_path, "single") as alone,
    ):
        async with members(url, emu, fleet_name(), 4, n, rate) as procs:
            for proc in procs:
                send(proc, "go")
            done = [await wait_event(proc, "resolved", 50) for proc in procs]
        # The baseline runs after the fleet, not beside it: on a loaded machine the
        # emulator's arrival times (what the rate check reads) would bunch up.
        single = await start_child("single", alone["file"], str(4 * n), str(rate))
        try:
            baseline = await wait_event(single, "resolved", 50)
        finally:
            await stop_child(single)
        outcomes = [o for event in done for o in event["resolved"].values()]
        assert outcomes.count("ok") == 4 * n
        fleet, single_stats = await emulator_stats(emu), await emulator_stats(alone)
        assert fleet["submits_accepted"] == 4 * n
        assert list(baseline["resolved"].values()).count("ok") == 4 * n
        # One poller at a time: every batch call came from one member, bar a takeover.
        assert overlapping_pollers(fleet["batch_callers"]) == 0
        assert fleet["batch_calls"] <= 1.2 * single_stats["batch_calls"], (
            fleet["batch_calls"],
            single_stats["batch_calls"],
        )
        created = [t["created"] for t in fleet["timelines"].values()]
        assert busiest_second(created) <= rate * 1.05 + 1


async def test_sigkill_of_the_leader(tmp_path: Path) -> None:
    n, rate = 40, 0.0
    # Jobs of 1-4 s: the leader's jobs are surely still running when it is killed.
    async with (
        any_redis(tmp_path) as url,
        emulator_process(tmp_path, "emu", time_scale=0.3) as emu,
    ):
        async with members(url, emu, fleet_name(), 3, n, rate, lease=1.0, timeout=2.0) as procs:
            for proc in procs:
                send(proc, "go")
            submitted = [await wait_event(proc, "submitted") for proc in procs]
            before = await first_batch_callers(emu)
            leader_token = before[-1][1]
            [leader] = [p for p in procs if p.token == leader_token]
            leader.proc.send_signal(signal.SIGKILL)
            killed_at = time.time()
            survivors = [p for p in procs if p is not leader]
            done = [await wait_event(proc, "resolved") for proc in survivors]
            for event in done:
                assert set(event["resolved"].values()) == {"ok"}
            after = (await emulator_stats(emu))["batch_callers"]
            takeover = [t for t, who in after if t > killed_at and who != leader_token]
            assert takeover and takeover[0] - killed_at < 1.0 + 1.5  # lease + a tick or two
            # The killed member's accepted keys go to a survivor's resume(), exactly once.
            killed_keys = set(submitted[procs.index(leader)]["submitted"])
            await asyncio.sleep(2.5)  # its heartbeat expires (member_timeout 2 s)
            send(survivors[0], "resume")
            first = await wait_event(survivors[0], "claimed_resolved")
            send(survivors[1], "resume")
            second = await wait_event(survivors[1], "claimed_resolved")
            assert set(first["claimed_resolved"]) == killed_keys
            assert set(first["claimed_resolved"].values()) == {"ok"}
            assert second["claimed_resolved"] == {}
            assert (await emulator_stats(emu))["submits_accepted"] == 3 * n  # none paid twice


async def test_redis_restarted_mid_run(tmp_path: Path) -> None:
    n = 60
    async with (
        own_redis(tmp_path, appendonly=True) as server,
        emulator_process(tmp_path, "emu", time_scale=0.2) as emu,
    ):
        async with members(server.url, emu, fleet_name(), 2, n, 0.0, lease=1.0) as procs:
            for proc in procs:
                send(proc, "go")
            for proc in procs:
                await wait_event(proc, "submitted")
            assert server.process is not None
            stopped_at = time.time()  # the emulator stamps batch calls with the wall clock
            server.process.terminate()
            await asyncio.wait_for(server.process.wait(), 15)
            running = (await emulator_stats(emu))["jobs_by_state"]
            assert running.get("queued", 0) + running.get("generating", 0) > 0, running
            # Members poll their own keys meanwhile: wait for a batch call made without Redis.
            deadline = time.monotonic() + 15
            while not [
                t for t, _ in (await emulator_stats(emu))["batch_callers"] if t > stopped_at
            ]:
                assert time.monotonic() < deadline, "no batch call while Redis was down"
                await asyncio.sleep(0.05)
            async with own_redis(tmp_path, appendonly=True, port=server.port):
                done = [await wait_event(proc, "resolved") for proc in procs]
                for event in done:
                    assert set(event["resolved"].values()) == {"ok"}
                assert (await emulator_stats(emu))["submits_accepted"] == 2 * n
                for proc in procs:
                    send(proc, "resume")  # nothing was lost or left to claim
                    assert (await wait_event(proc, "claimed"))["claimed"] == []


async def test_a_stalled_leader_sends_nothing_after_losing_its_lease(tmp_path: Path) -> None:
    n, lease, stall = 150, 1.0, 2.0
    # Jobs of 1-4 s: the stalled leader's jobs are still running when it freezes. Slow batch
    # replies and 300 keys (more than 4 calls of 50 at once) keep the leader holding taken
    # keys while it waits for a free call slot, so the pause is likely to catch it with
    # keys in hand: only its lease check stops it from sending them after it thaws.
    async with (
        any_redis(tmp_path) as url,
        emulator_process(tmp_path, "emu", time_scale=0.3) as emu,
        aiohttp.ClientSession() as http,
    ):
        slow = {"slow_reply": 1.0, "slow_reply_s": 0.3, "endpoints": "info"}
        async with http.post(emu["origin"] + "/_emulator/faults", json=slow) as reply:
            assert reply.status == 200, await reply.text()
        async with members(url, emu, fleet_name(), 2, n, 0.0, lease=lease, timeout=6.0) as procs:
            for proc in procs:
                send(proc, "go")
            submitted = [await wait_event(proc, "submitted") for proc in procs]
            before = await first_batch_callers(emu)
            [leader] = [p for p in procs if p.token == before[-1][1]]
            [other] = [p for p in procs if p is not leader]
            send(leader, f"stall {stall}")  # a GC pause longer than its lease
            stalled_from = (await wait_event(leader, "stall_from"))["stall_from"]
            stalled_until = (await wait_event(leader, "stall_until"))["stall_until"]
            done = [await wait_event(proc, "resolved") for proc in procs]
            for event in done:
                assert set(event["resolved"].values()) == {"ok"}
            stats = await emulator_stats(emu)
        calls = list(zip(stats["batch_callers"], stats["batch_keys"], strict=True))
        # Fenced: the thawed leader found its lease gone and sent no batch call since...
        assert [t for (t, who), _ in calls if t > stalled_until and who == leader.token] == []
        # ...and its jobs resolved through the new leader's calls.
        leaders_keys = set(submitted[procs.index(leader)]["submitted"])
        asked = {
            k for (t, who), keys in calls if t > stalled_from and who == other.token for k in keys
        }
        assert leaders_keys & asked
        assert stats["submits_accepted"] == 2 * n


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-aof"])
async def test_a_redis_restart_leaves_one_poller_and_nobody_local(
    tmp_path: Path, appendonly: bool
) -> None:
    # Three members submit at a fleet-wide cap; Redis is restarted (with or without its
    # data) for 3 s, shorter than member_timeout, while jobs run. Within one lease after it is
    # back there is one poller again, no member stays local, no job is lost or paid twice,
    # and the cap holds in every second.
    n, rate, lease, timeout, outage = 40, 15.0, 2.0, 6.0, 3.0
    async with (
        own_redis(tmp_path, appendonly=appendonly) as server,
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
            async with own_redis(tmp_path, appendonly=appendonly, port=server.port):
                back_at = time.time()
                done = [await wait_event(proc, "resolved", 60) for proc in procs]
        stats = await emulator_stats(emu)
    assert_each_job_once_one_leader(done, stats)
    assert stats["submits_accepted"] == 3 * n
    after = [(t, who) for t, who in stats["batch_callers"] if t > back_at + lease]
    assert after, "no batch call after Redis came back"
    # One poller again: every call but a stray one or two (a member that falls back to local
    # polling for a moment on a slow Redis reply, then rejoins) comes from the one leader.
    callers = Counter(who for _, who in after)
    _, leading = callers.most_common(1)[0]
    assert len(after) - leading <= 2, callers
    created = [t["created"] for t in stats["timelines"].values()]
    assert busiest_second(created) <= rate, sorted(created)  # the cap, in every second


async def test_members_there_before_a_redis_restart_keep_the_fleet_from_another_gateway(
    tmp_path: Path,
) -> None:
    # Redis restarted without AOF, and a client of another gateway opened on the fleet's name
    # before any member came back (here: the members stopped meanwhile): it took the fleet,
    # and the three members, refused on joining again, stayed local (three pollers) for as
    # long as it lived. They were there first: they take the fleet back, and it is kept out.
    n, lease, timeout = 20, 2.0, 6.0
    name = fleet_name()
    async with (
        own_redis(tmp_path) as server,
        emulator_process(tmp_path, "emu", time_scale=1.0) as emu,
        emulator_process(tmp_path, "theirs") as theirs,
    ):
        async with members(server.url, emu, name, 3, n, 0, lease=lease, timeout=timeout) as procs:
            for proc in procs:
                send(proc, "go")
            deadline = time.monotonic() + 30
            while (await emulator_stats(emu))["submits_accepted"] < 3 * n:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            for proc in procs:
                proc.proc.send_signal(signal.SIGSTOP)
            try:
                assert server.process is not None
                server.process.terminate()
                await asyncio.wait_for(server.process.wait(), 15)
                async with (
                    own_redis(tmp_path, port=server.port),
                    members(server.url, theirs, name, 1, 1, 0, lease=lease, timeout=timeout) as (
                        stranger,
                    ),
                ):
                    for proc in procs:
                        proc.proc.send_signal(signal.SIGCONT)
                    done = [await wait_event(proc, "resolved", 60) for proc in procs]
                    send(stranger, "stats")
                    kept_out = await wait_event(stranger, "stats")
            finally:
                for proc in procs:
                    with contextlib.suppress(ProcessLookupError):
                        proc.proc.send_signal(signal.SIGCONT)
        stats = await emulator_stats(emu)
    for event in done:
        assert set(event["resolved"].values()) == {"ok"}
    assert stats["submits_accepted"] == 3 * n  # nothing lost, nothing paid twice
    roles = sorted(event["stats"]["fleet"]["role"] for event in done)
    assert roles == ["follower", "follower", "leader"]
    assert kept_out["stats"]["fleet"]["role"] == "local"
