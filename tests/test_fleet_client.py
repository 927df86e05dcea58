"""WujieClient(fleet=...): one poller, one rate, one journal for every member (one process)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.abc
import pytest

from wujie_async import (
    InvalidRequestError,
    JobProtocolError,
    JobTimeoutError,
    Limits,
    PollPolicy,
    SubmitUncertainError,
    UnknownJobError,
    WujieClient,
)
from wujie_async._key_timing import KeyTiming
from wujie_async._schedule import PollSchedule
from wujie_async.emulator import FaultConfig
from wujie_async.fleet import FleetMismatchError, FleetUnavailableError, RedisFleet
from wujie_async.fleet._exchange import Report, post_reports
from wujie_async.fleet._journal import _INTENT, RedisJournal
from wujie_async.fleet._lease import LeaderLease
from wujie_async.fleet._limiter import FleetLimiter
from wujie_async.fleet._link import shard_of
from wujie_async.fleet._membership import Membership, new_member_id
from wujie_async.testing import INSTANT_RETRY

from .conftest import FAST_POLL, EmulatorFactory
from .fleet_support import (
    any_redis,
    fleet_name,
    fleet_of,
    forget_fleet,
    free_port,
    member,
    own_redis,
)
from .helpers import eventually
from .hostile import all_running, images_at, scripted_gateway, throwaway_credentials

pytestmark = pytest.mark.anyio


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    async with any_redis(tmp_path) as redis_url:
        yield redis_url


def roles(*clients: WujieClient) -> list[str]:
    return sorted(fleet_of(client).role for client in clients)


@pytest.mark.long
async def test_members_share_one_poller(url: str, emulator: EmulatorFactory) -> None:
    name = fleet_name()
    async with emulator() as emu, member(emu, url, name) as a, member(emu, url, name) as b:
        await eventually(lambda: roles(a, b) == ["follower", "leader"])
        jobs = [
            await c.images.submit(prompt=f"p{i}", model="dall-e-2")
            for i in range(30)
            for c in (a, b)
        ]
        results = await asyncio.gather(*jobs)
        assert all(len(r.images) == 1 for r in results)
        callers = {caller for _, caller in emu.stats()["batch_callers"]}
        leader = a if fleet_of(a).role == "leader" else b
        follower = b if leader is a else a
        assert len(callers) == 1, callers  # one poller for the fleet: the leader
        assert follower.stats.batch_calls == 0
        assert leader.stats.batch_calls == emu.stats()["batch_calls"]
        assert fleet_of(leader).leader_calls == leader.stats.batch_calls
        await eventually(lambda: fleet_of(a).batch_calls > 0 and fleet_of(a).size == 2)
        assert fleet_of(a).mean_batch_fill > 1
        assert emu.stats()["submits_accepted"] == 60
    assert WujieClient(emu.credentials, base_url=emu.base_url).stats.fleet is None


async def test_a_member_loads_its_intent_script_when_it_joins(
    url: str, emulator: EmulatorFactory
) -> None:
    # A submit writes its journal intent between its rate slot and its send: that way must not
    # hold a NOSCRIPT round trip (a member's first intent, or its first after Redis restarted).
    sha = hashlib.sha1(_INTENT.encode()).hexdigest()
    name = fleet_name()
    async with RedisFleet(url, name=name) as probe:
        await probe.call(lambda r: r.script_flush())
        async with emulator() as emu, member(emu, url, name):
            assert await probe.call(lambda r: r.script_exists(sha)) == [True]


@pytest.mark.long
@pytest.mark.parametrize(("batch_wait", "first_call"), [(1.0, 2), (0, 1)])
async def test_the_leader_lets_a_call_wait_for_keys_coming_due(
    url: str, emulator: EmulatorFactory, batch_wait: float, first_call: int
) -> None:
    # batch_wait: a call that is not full waits up to that long for more of the fleet's keys
    # to come due. The second key comes due about 0.3 s after the first.
    name = fleet_name()
    poll = dataclasses.replace(FAST_POLL, first_poll_delay=1.0)
    async with (
        emulator() as emu,
        member(emu, url, name, poll=poll, batch_wait=batch_wait) as only,
    ):
        await eventually(lambda: fleet_of(only).role == "leader")
        first = await only.images.submit(prompt="a", model="dall-e-2")
        await asyncio.sleep(0.3)  # spacing the submits, not waiting for an outcome
        second = await only.images.submit(prompt="b", model="dall-e-2")
        await asyncio.gather(first, second)
        asked = emu.stats()["batch_keys"][0]
        assert len(asked) == first_call and asked[0] == first.key, asked


@pytest.mark.long
async def test_a_leader_that_closes_hands_over_at_once(url: str, emulator: EmulatorFactory) -> None:
    # A long lease: a successor that waited for it to run out would take 10 s. Closing stops
    # the leading task first, and must still give the lease up.
    name = fleet_name()
    async with (
        emulator() as emu,
        member(emu, url, name, lease_seconds=10.0) as a,
        member(emu, url, name, lease_seconds=10.0) as b,
    ):
        await eventually(lambda: roles(a, b) == ["follower", "leader"])
        leader, follower = (a, b) if fleet_of(a).role == "leader" else (b, a)
        job = await follower.images.submit(prompt="p", model="dall-e-2")
        await leader.aclose()
        loop = asyncio.get_running_loop()
        closed_at = loop.time()
        await eventually(lambda: fleet_of(follower).role == "leader", timeout=8)
        assert loop.time() - closed_at < 3.0  # the lease was given up, not left to expire
        assert len((await asyncio.wait_for(job.result(), 8)).images) == 1


@pytest.mark.long
async def test_a_new_leader_judges_a_running_job_by_its_age_since_submit(
    url: str, emulator: EmulatorFactory
) -> None:
    # Jobs of 1.5 s without estimates: the schedule waits until a job is as old as the
    # shortest it has seen end. A leader that takes over a job 1 s into its life must count
    # its age from the submit (it ends 0.5 s later), not from the takeover (1.5 s later).
    poll = PollPolicy(
        first_poll_delay=0.05,
        min_interval=0.05,
        max_interval=0.2,
        max_estimate_wait=10.0,
        batch_fill_horizon=0.02,
    )
    name = fleet_name()
    config = {"time_scale": 1.0, "job_seconds": (1.5, 1.6)}
    async with (
        emulator(**config, faults=FaultConfig(estimate_absent=1.0)) as emu,
        member(emu, url, name, poll=poll, lease_seconds=10.0) as a,
        member(emu, url, name, poll=poll, lease_seconds=10.0) as b,
    ):
        await eventually(lambda: roles(a, b) == ["follower", "leader"])
        leader, follower = (a, b) if fleet_of(a).role == "leader" else (b, a)
        warm = [await follower.images.submit(prompt=f"w{i}", model="dall-e-2") for i in range(12)]
        await asyncio.wait_for(asyncio.gather(*warm), 15)  # the follower learns how long jobs last
        job = await follower.images.submit(prompt="taken over", model="dall-e-2")
        resolved: list[float] = []
        job.add_done_callback(lambda _: resolved.append(time.time()))
        await asyncio.sleep(0.8)  # the job ages (not a wait for something to not happen)
        await leader.aclose()
        await asyncio.wait_for(job.result(), 10)
        done = emu.stats()["timelines"][job.key]["done"]
        assert fleet_of(follower).role == "leader"
        assert resolved[0] - done < 0.6, resolved[0] - done


@pytest.mark.long
async def test_a_key_attached_by_two_members_resolves_in_both(
    url: str, emulator: EmulatorFactory
) -> None:
    # A status endpoint in every worker attaches the same key: each member is an owner of it,
    # and the leader's reports reach both (one key, asked about once per call).
    name = fleet_name()
    async with (
        emulator(time_scale=0.2) as emu,
        member(emu, url, name) as a,
        member(emu, url, name) as b,
    ):
        job = await a.images.submit(prompt="shared", model="dall-e-2")
        other = b.images.attach(job.key)
        ended: list[float] = []
        for each in (job, other):
            each.add_done_callback(lambda _: ended.append(time.monotonic()))
        first, second = await asyncio.wait_for(asyncio.gather(job, other), 10)
        assert first.images == second.images
        assert max(ended) - min(ended) < 0.5  # the same report, not a second owner's turn
        asked = [keys.count(job.key) for keys in emu.stats()["batch_keys"]]
        assert max(asked) == 1


async def test_each_ended_job_is_learned_once_in_each_process(
    url: str, emulator: EmulatorFactory
) -> None:
    # The leader asks by its member's poll schedule (a new leader starts from what its member
    # learned, and the member learns from every job it leads for). The member's own jobs end
    # in both of its process's pollers, the leader's shadow's and its own (from the report):
    # each must be learned once, not weighted double in the schedule's samples. A follower
    # learns from its own jobs, as ever.
    name = fleet_name()
    async with (
        emulator() as emu,
        member(emu, url, name, lease_seconds=10.0) as a,
        member(emu, url, name, lease_seconds=10.0) as b,
    ):
        await eventually(lambda: roles(a, b) == ["follower", "leader"])
        leader, follower = (a, b) if fleet_of(a).role == "leader" else (b, a)
        mine = [await leader.images.submit(prompt=f"l{i}", model="dall-e-2") for i in range(6)]
        theirs = [await follower.images.submit(prompt=f"f{i}", model="dall-e-2") for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*mine, *theirs), 20)
        assert fleet_of(leader).role == "leader"  # it led for every job
        assert fleet_of(leader).jobs_learned == 6 + 4
        assert fleet_of(follower).jobs_learned == 4


async def test_a_key_both_members_own_is_learned_once_by_the_leader(
    url: str, emulator: EmulatorFactory
) -> None:
    # The leader's member attaches a follower's key: from then on its own job learns from
    # that key's reports, and the leader's shadow of it no longer does.
    name = fleet_name()
    async with (
        emulator(time_scale=0.2) as emu,
        member(emu, url, name, lease_seconds=10.0) as a,
        member(emu, url, name, lease_seconds=10.0) as b,
    ):
        await eventually(lambda: roles(a, b) == ["follower", "leader"])
        leader, follower = (a, b) if fleet_of(a).role == "leader" else (b, a)
        job = await follower.images.submit(prompt="shared", model="dall-e-2")
        other = leader.images.attach(job.key)
        await asyncio.wait_for(asyncio.gather(job, other), 10)
        assert fleet_of(leader).role == "leader"
        assert (fleet_of(leader).jobs_learned, fleet_of(follower).jobs_learned) == (1, 1)


@pytest.mark.long
async def test_a_member_that_takes_the_lead_mid_job_learns_its_jobs_once(
    url: str, emulator: EmulatorFactory
) -> None:
    # Whoever leads: a follower's jobs still running when its leader closes end under its own
    # leadership, in its leader's shadows and in its own jobs, and are learned once.
    name = fleet_name()
    config = {"time_scale": 1.0, "job_seconds": (3.0, 3.5)}  # a hand-over takes about 0.5 s
    async with (
        emulator(**config) as emu,
        member(emu, url, name, lease_seconds=10.0) as a,
        member(emu, url, name, lease_seconds=10.0) as b,
    ):
        await eventually(lambda: roles(a, b) == ["follower", "leader"])
        leader, follower = (a, b) if fleet_of(a).role == "leader" else (b, a)
        jobs = [await follower.images.submit(prompt=f"p{i}", model="dall-e-2") for i in range(4)]
        await leader.aclose()
        await eventually(lambda: fleet_of(follower).role == "leader", timeout=8)
        assert not any(job.done() for job in jobs)  # they end under its lead
        await asyncio.wait_for(asyncio.gather(*jobs), 15)
        assert fleet_of(follower).jobs_learned == 4


def test_a_shadow_of_the_members_own_job_adds_no_figure_to_the_schedule() -> None:
    # The leader's shadow of its member's job and the member's own job are two records of one
    # job in one schedule: the shadow is planned by its reports but adds no figure to what the
    # schedule learns (here, whole-second estimates: the third makes the model's coarse).
    schedule = PollSchedule(FAST_POLL)
    own, shadow = KeyTiming(created_at=0.0, model="m"), KeyTiming(created_at=0.0, model="m")
    for timing, learn in ((own, True), (shadow, False)):
        for now, left in ((0.5, 9.0), (1.5, 8.0)):
            schedule.report(timing, now, expected_seconds=left, learn=learn)
    assert shadow.predicted_end == own.predicted_end == 9.5  # planned all the same
    assert not schedule.coarse("m")  # two whole-second figures of one job, not four
    schedule.report(own, 2.5, expected_seconds=7.0)
    assert schedule.coarse("m")


async def test_a_job_done_before_its_last_image_is_listed_resolves_in_a_fleet(url: str) -> None:
    """A gateway may say "succeeded" a moment before it lists the last images: a client asks
    again within a grace. The leader knows no job's n, so its poll of the key ended at a done
    report listing one image of two, and the member's job, told nothing more, waited for its
    deadline. Its member asks about it itself once the leader's reports about it stop."""
    name = fleet_name()
    asks: dict[str, int] = {}

    def script(keys: list[str]) -> list[dict[str, Any]]:
        # Per key: generating, then done with one image listed, then done with both.
        entries = []
        for key in keys:
            seen = asks[key] = asks.get(key, 0) + 1
            images = [
                {"url": f"https://cdn.example/{key}-{i}.png"} for i in range(min(seen, 3) - 1)
            ]
            entries.append({"key": key, "status": 1 if seen == 1 else 4, "images": images})
        return entries

    def client_of(base_url: str) -> WujieClient:
        fleet = RedisFleet(url, name=name, lease_seconds=10.0)
        return WujieClient(
            throwaway_credentials(),
            base_url=base_url,
            poll=FAST_POLL,
            retry=INSTANT_RETRY,
            fleet=fleet,
        )

    async with (
        scripted_gateway(script) as gateway,
        client_of(gateway.base_url) as a,
        client_of(gateway.base_url) as b,
    ):
        await eventually(lambda: roles(a, b) == ["follower", "leader"])
        for client in (a, b):  # the leader's own job and a follower's
            job = await client.images.submit(prompt="two", model="dall-e-2", n=2)
            result = await asyncio.wait_for(job.result(), 10)
            assert [image.index for image in result.images] == [0, 1]
            assert asks[job.key] == 3  # the third ask (its member's own) listed both


@pytest.mark.long
async def test_two_owners_of_a_key_each_keep_their_own_deadline(
    url: str, emulator: EmulatorFactory
) -> None:
    # The leader asks about a key until its last owner's deadline: an owner that waits
    # longer is not failed at another owner's (earlier) deadline.
    name = fleet_name()
    async with (
        emulator(time_scale=0.3) as emu,
        member(emu, url, name) as a,
        member(emu, url, name) as b,
    ):
        job = await a.images.submit(prompt="shared", model="dall-e-2", job_timeout=0.1)
        patient = b.images.attach(job.key, job_timeout=60)
        with pytest.raises(JobTimeoutError):
            await job
        assert (await asyncio.wait_for(patient, 30)).status == 4


@pytest.mark.long
@pytest.mark.parametrize("garbled", ["counters", "type"])
async def test_garbled_fleet_figures_are_not_taken_for_redis_away(
    url: str, emulator: EmulatorFactory, garbled: str
) -> None:
    # The fleet's figures are another process's writes. Counters that are not numbers, or a
    # key of another type, must not crash the member's watch or read as Redis away (which
    # would send every member to local polling, again and again).
    name = fleet_name()
    async with emulator() as emu, RedisFleet(url, name=name) as observer:
        stats = observer.keys.stats
        if garbled == "counters":
            await observer.call(lambda r: r.hset(stats, "batch_calls", "lots"))
            await observer.call(lambda r: r.hset(stats, "keys_polled", "\u00b2"))
        else:
            await observer.call(lambda r: r.set(stats, "not a hash"))
        async with member(emu, url, name) as only:
            await eventually(lambda: fleet_of(only).role == "leader")
            await only.images.submit(prompt="p", model="dall-e-2")
            await eventually(lambda: only.stats.batch_calls > 0)
            async with member(emu, url, name):  # the figures are read: the size changes
                await eventually(lambda: fleet_of(only).size == 2)
            assert fleet_of(only).role == "leader"
            assert fleet_of(only).batch_calls == 0


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


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@127.0.0.1:{port}/0",
        "redis://127.0.0.1:{port}/0?password=hunter2",
        "redis://user:hunter2@[::1]:{port}/0",
        "redis://hunter2@127.0.0.1:{port}/0",  # a password where the user name goes
        "redis://hunter2:@127.0.0.1:{port}/0",
        "unix:///nonexistent/{port}.sock?db=0&password=hunter2",
    ],
)
async def test_unreachable_redis_at_start_names_the_url(
    emulator: EmulatorFactory, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The password, as ``user:password@`` or as redis-py's ``?password=`` (the only form for
    a unix socket), is in no message, repr or log line."""
    caplog.set_level(logging.DEBUG)
    port = free_port()
    url = url.format(port=port)
    async with emulator() as emu:
        fleet = RedisFleet(url, name=fleet_name(), command_timeout=1.0)
        client = WujieClient(emu.credentials, base_url=emu.base_url, fleet=fleet)
        with pytest.raises(FleetUnavailableError) as caught:
            await client.open()
    message = str(caught.value)
    assert str(port) in message and "***" in message
    for text in (message, repr(fleet), repr(fleet.config), caplog.text):
        assert "hunter2" not in text


async def test_a_read_only_replica_at_start_is_named(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    (tmp_path / "replica").mkdir()
    async with own_redis(tmp_path) as primary:
        replica_of = ("--replicaof", "127.0.0.1", str(primary.port))
        async with (
            own_redis(tmp_path / "replica", extra=replica_of) as replica,
            emulator() as emu,
        ):
            client = member(emu, replica.url, fleet_name(), command_timeout=1.0)
            with pytest.raises(FleetUnavailableError, match="read-only replica") as caught:
                await client.open()
            assert "point the fleet at the primary" in str(caught.value)
            assert not emu.stats()["requests"]  # nothing reached the gateway


async def test_a_member_of_another_gateway_is_refused_at_open(
    url: str, emulator: EmulatorFactory
) -> None:
    # Members of one fleet name on different gateways were not told apart: the leader asked
    # its own gateway about the others' keys, and their paid jobs failed as unknown.
    name = fleet_name()
    async with emulator() as ours, emulator() as theirs, member(ours, url, name) as first:
        stranger = member(theirs, url, name)
        with pytest.raises(FleetMismatchError) as caught:
            await stranger.open()
        error = caught.value
        assert error.base_url == theirs.base_url and error.fleet_base_url == ours.base_url
        assert ours.base_url in str(error) and theirs.base_url in str(error)
        assert "another fleet name" in str(error)
        assert not theirs.stats()["requests"]  # nothing was sent
        # Same base URL, another app id: refused too; the app id is not written to Redis.
        other_app = dataclasses.replace(ours.credentials, app_id="another-app")
        fleet = RedisFleet(url, name=name, lease_seconds=1.0)
        with pytest.raises(FleetMismatchError, match="another app id"):
            await WujieClient(other_app, base_url=ours.base_url, fleet=fleet).open()
        async with RedisFleet(url, name=name) as probe:
            stored = await probe.call(lambda redis: redis.hgetall(probe.keys.gateway))
        assert stored["base_url"] == ours.base_url
        assert ours.credentials.app_id not in str(stored)  # only a hash of it
        assert fleet_of(first).role == "leader"
        async with member(ours, url, name) as second:  # the same gateway: welcome
            job = await second.images.submit(prompt="x", model="dall-e-2")
            await job
    async with member(theirs, url, name) as moved:  # nobody alive: the fleet may move
        assert fleet_of(moved).role in ("leader", "follower")


async def test_a_member_spelling_the_same_gateway_otherwise_is_welcome(
    url: str, emulator: EmulatorFactory
) -> None:
    # A base URL whose scheme was written in capitals (or with its default port, or a
    # trailing slash) names the same gateway: it was refused as another one.
    name = fleet_name()
    async with emulator() as emu, member(emu, url, name) as first:
        spelled = "HTTP" + emu.base_url.removeprefix("http") + "/"
        fleet = RedisFleet(url, name=name, lease_seconds=1.0)
        async with WujieClient(
            emu.credentials, base_url=spelled, poll=FAST_POLL, retry=INSTANT_RETRY, fleet=fleet
        ) as second:
            job = await second.images.submit(prompt="x", model="dall-e-2")
            await job
        assert fleet_of(first).role == "leader"


@pytest.mark.long
async def test_members_that_were_there_first_take_a_lost_fleet_back_from_another_gateway(
    url: str, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis lost the fleet (a restart without AOF, FLUSHALL) and a client of another gateway
    # opened before any member came back: it took the fleet, and the members that had been
    # there all along were refused on joining again ("may not join again") and stayed local,
    # each polling its own keys, for as long as the newcomer lived. Seniority: they win the
    # fleet back, and the newcomer is the one kept out.
    caplog.set_level(logging.WARNING, "wujie_async.fleet")
    name = fleet_name()
    async with (
        emulator(time_scale=0.05) as ours,
        emulator(time_scale=0.05, seed=8) as theirs,  # keys of its own: not the same as ours
        RedisFleet(url, name=name) as observer,
        member(ours, url, name, member_timeout=1.5) as first,
    ):
        await eventually(lambda: fleet_of(first).role == "leader", what="a leader")
        for _ in range(20):
            stranger = member(theirs, url, name, member_timeout=1.5)
            await forget_fleet(observer)
            with contextlib.suppress(FleetMismatchError):  # `first` was back first: again
                await stranger.open()
                break
        else:
            raise AssertionError("the stranger never opened on the forgotten fleet")
        try:
            await eventually(
                lambda: fleet_of(stranger).role == "local" and "may not join again" in caplog.text,
                what="the stranger kept out",
            )
            assert "takes the fleet back" in caplog.text
            await eventually(lambda: fleet_of(first).role == "leader", what="first leading")
            jobs = [await c.images.submit(prompt="x", model="dall-e-2") for c in (first, stranger)]
            async with asyncio.timeout(20):
                await asyncio.gather(*jobs)
            assert fleet_of(first).role == "leader" and fleet_of(stranger).role == "local"
            asked_ours = {key for keys in ours.stats()["batch_keys"] for key in keys}
            asked_theirs = {key for keys in theirs.stats()["batch_keys"] for key in keys}
            assert jobs[1].key not in asked_ours and jobs[0].key not in asked_theirs
        finally:
            await stranger.aclose()
        assert fleet_of(first).role == "leader"


async def _keep_out(
    first: WujieClient, observer: RedisFleet, theirs: Any, caplog: pytest.LogCaptureFixture
) -> tuple[Membership, str]:
    """Move the fleet to ``theirs`` gateway (a record anew, one member of it joined) and drop
    ``first``'s member info: joining again, it is refused and kept out. Returns the other
    gateway's member and ``first``'s member id."""
    other = Membership(observer, new_member_id())
    other.use_gateway(theirs.base_url, theirs.credentials.app_id)
    record: dict[Any, Any] = {
        "fingerprint": other.gateway[0],
        "base_url": theirs.base_url,
        "epoch": "0",
    }
    await observer.call(lambda r: r.delete(observer.keys.gateway))  # a record anew
    await observer.call(lambda r: r.hset(observer.keys.gateway, mapping=record))
    await other.join()
    first_id = first.fleet_member
    assert first_id is not None
    await observer.call(lambda r: r.hdel(observer.keys.member_info, first_id))
    await eventually(lambda: "may not join again" in caplog.text, what="first kept out")
    return other, first_id


@pytest.mark.long
async def test_a_member_kept_out_by_the_gateway_check_keeps_its_jobs(
    url: str, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # A member kept out (the fleet's live members use another gateway) sent no heartbeat:
    # another member's resume() claimed its accepted jobs and asked its own gateway about
    # them, which did not know them (they ended unknown).
    caplog.set_level(logging.WARNING, "wujie_async.fleet")
    name = fleet_name()
    async with (
        emulator(time_scale=1.0, job_seconds=(8, 8)) as ours,
        emulator() as theirs,
        RedisFleet(url, name=name) as observer,
        member(ours, url, name, member_timeout=3.0) as first,
    ):
        job = await first.images.submit(prompt="x", model="dall-e-2")
        # The fleet went to another gateway, recorded before `first` joined: joining again
        # (its info dropped), `first` is refused.
        other, first_id = await _keep_out(first, observer, theirs, caplog)

        async def silent_long() -> bool:
            await other.heartbeat()
            return (await other.members())[first_id] > 1.5

        await eventually(silent_long, what="first silent for 1.5 s")
        claim = await RedisJournal(observer, other.member_id).claim_dead(1.5)
        assert claim.entries == [] and first_id not in claim.dead_members
        await asyncio.wait_for(job, 20)
        assert not theirs.stats()["batch_keys"]


@pytest.mark.long
async def test_a_kept_out_member_that_is_gone_leaves_its_jobs_to_its_own_gateway(
    url: str, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # A member kept out by the gateway check that left (or was killed, its mark gone stale)
    # was dead to every member: one of the fleet's other gateway claimed its accepted jobs
    # and asked its own gateway about them, which did not know them (paid jobs ended
    # unknown). They wait for a member of the gateway it was kept out with.
    caplog.set_level(logging.WARNING, "wujie_async.fleet")
    name = fleet_name()
    async with (
        emulator(time_scale=1.0, job_seconds=(30, 30)) as ours,
        emulator() as theirs,
        RedisFleet(url, name=name) as observer,
    ):
        first = member(ours, url, name, member_timeout=3.0)
        async with first:
            job = await first.images.submit(prompt="x", model="dall-e-2")
            other, first_id = await _keep_out(first, observer, theirs, caplog)
        assert job.key is not None
        theirs_journal = RedisJournal(observer, other.member_id)
        theirs_journal.use_gateway(*other.gateway)
        claim = await theirs_journal.claim_dead(1.5)
        assert claim.entries == [] and first_id not in claim.dead_members
        # A member of its own gateway takes them.
        mine = Membership(observer, new_member_id())
        mine.use_gateway(ours.base_url, ours.credentials.app_id)
        await observer.call(lambda r: r.delete(observer.keys.gateway))
        await other.leave()
        await mine.join()
        mine_journal = RedisJournal(observer, mine.member_id)
        mine_journal.use_gateway(*mine.gateway)
        claim = await mine_journal.claim_dead(1.5)
        assert [entry.job_key for entry in claim.entries] == [job.key], claim
        assert first_id in claim.dead_members


async def test_a_fleet_that_lost_its_gateway_is_not_taken_by_another_gateway(
    url: str, emulator: EmulatorFactory
) -> None:
    # Redis lost the fleet (FLUSHALL, a restart without AOF) while its members submitted on:
    # their journal writes put them back on the member list, but not the fleet's gateway, so a
    # client of another gateway opening before they joined again was let in and took the
    # fleet, and every member was kept out ("may not join again"), polling its own keys. A
    # member's first journal write after the loss writes the gateway again: refused.
    name = fleet_name()
    async with (
        emulator() as ours,
        emulator() as theirs,
        RedisFleet(url, name=name) as observer,
        member(ours, url, name) as first,
    ):
        await forget_fleet(observer)
        job = await first.images.submit(prompt="x", model="dall-e-2")
        stranger = member(theirs, url, name)
        with pytest.raises(FleetMismatchError) as caught:
            await stranger.open()
        assert caught.value.fleet_base_url == ours.base_url
        assert not theirs.stats()["requests"]  # nothing was sent
        await job
        assert fleet_of(first).role != "local"


def test_gateway_spellings_compare_equal() -> None:
    from wujie_async._gateway_identity import same_gateway as _same_gateway

    same = _same_gateway("https://api.example.com/wj-open/v1")
    for spelling in (
        "HTTPS://API.Example.COM/wj-open/v1",
        "https://api.example.com:443/wj-open/v1/",
    ):
        assert _same_gateway(spelling) == same
    for other in (
        "https://api.example.com:8443/wj-open/v1",
        "http://api.example.com/wj-open/v1",
        "https://api.example.com/WJ-OPEN/v1",
    ):
        assert _same_gateway(other) != same
    assert _same_gateway("http://[::1]:80/x") == _same_gateway("http://[::1]/x") == "http://[::1]/x"
    assert _same_gateway("http://[::1]:8080/x") == "http://[::1]:8080/x"


async def test_resume_logs_at_info_only_when_it_resumed_something(
    url: str, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Queue consumers call resume() every few seconds: "resumed 0 job(s)" was an INFO line
    # each time.
    caplog.set_level(logging.DEBUG, logger="wujie_async")
    name = fleet_name()
    async with emulator(time_scale=0.05) as emu, member(emu, url, name) as survivor:
        caplog.clear()
        assert await survivor.resume() == []
        said = [r for r in caplog.records if r.getMessage().startswith("resumed ")]
        assert [r.levelno for r in said] == [logging.DEBUG]
        async with member(emu, url, name) as doomed:
            await doomed.images.submit(prompt="d", model="dall-e-2")
        caplog.clear()
        claimed = await survivor.resume()
        assert len(claimed) == 1
        said = [r for r in caplog.records if r.getMessage().startswith("resumed ")]
        assert [r.levelno for r in said] == [logging.INFO]
        await asyncio.gather(*claimed)


@pytest.mark.long
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
        again = await survivor.resume()  # now its own: the same jobs, none claimed twice
        assert all(any(job is mine for mine in claimed) for job in again)
        await asyncio.gather(*claimed)
        assert emu.stats()["submits_accepted"] == 5  # attached, never resubmitted
        found = await survivor.find_submit("nope")
        assert found is None


@pytest.mark.long
async def test_a_job_that_timed_out_is_resumed_by_its_own_member(
    url: str, emulator: EmulatorFactory
) -> None:
    async with emulator(time_scale=0.3) as emu, member(emu, url, fleet_name()) as client:
        job = await client.images.submit(prompt="slow", model="dall-e-2", job_timeout=0.1)
        with pytest.raises(JobTimeoutError):
            await job
        [again] = await client.resume(job_timeout=60)
        assert again.key == job.key and (await again).status == 4
        assert emu.stats()["submits_accepted"] == 1


async def test_find_submit_works_fleet_wide(url: str, emulator: EmulatorFactory) -> None:
    name = fleet_name()
    async with emulator() as emu, member(emu, url, name) as a, member(emu, url, name) as b:
        job = await a.images.submit(prompt="tagged", tag="msg-1", model="dall-e-2")
        found = await b.find_submit("msg-1")
        assert found is not None and found.job_key == job.key
        await job
        await a.journal_entries()  # the whole fleet's rows
        assert [e.job_key for e in await b.journal_entries("accepted", "succeeded")] == [job.key]


async def test_an_empty_tag_finds_no_other_messages_submit(
    url: str, emulator: EmulatorFactory
) -> None:
    """A queue consumer whose message has an empty id finds no submit of it: an empty tag
    is no filter in Redis, and find_submit("") returned another message's submit (the newest
    row), as find_submit(None) did: the consumer attached to it and never sent its own."""
    name = fleet_name()
    async with emulator() as emu, member(emu, url, name) as a, member(emu, url, name) as b:
        job = await a.images.submit(prompt="tagged", tag="msg-1", model="dall-e-2")
        untagged = await a.images.submit(prompt="untagged", model="dall-e-2")
        assert await b.find_submit("") is None
        assert await b.journal_entries(tag="") == []
        found = await b.find_submit("msg-1")  # a tag still finds its own submit
        assert found is not None and found.job_key == job.key
        await asyncio.gather(job, untagged)


@pytest.mark.long
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
            assert fleet_of(clients[0]).rate == 20
        assert elapsed >= 29 / 20 * 0.95  # 30 submits at 20/s fleet-wide, not 60/s


@pytest.mark.long
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
                assert fleet_of(client).role == "local"
                assert "polls its own keys" in caplog.text
                # The stated submit policy: wait up to unavailable_wait, then a typed error.
                with pytest.raises(FleetUnavailableError, match="not sent"):
                    await client.images.submit(prompt="while away", model="dall-e-2")
                async with own_redis(tmp_path, port=port, appendonly=True):
                    await eventually(lambda: fleet_of(client).role == "leader", timeout=15)
                    assert "rejoined" in caplog.text
                    job = await client.images.submit(prompt="back", model="dall-e-2")
                    await asyncio.wait_for(job, 10)
                    assert emu.stats()["submits_accepted"] == 11

                    # The outcomes of the jobs that ended while Redis was away waited for it.
                    async def all_succeeded() -> bool:
                        entries = await client.journal_entries()
                        return sorted(entry.state for entry in entries) == ["succeeded"] * 11

                    await eventually(all_succeeded, timeout=10, what="every outcome journaled")
            finally:
                await client.aclose()


@pytest.mark.long
async def test_submits_tried_again_at_once_after_a_long_outage_are_sent_once_redis_is_back(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    """Queue consumers try a refused submit again at once, several at a time, on two members
    sharing the fleet's rate. Redis away longer than unavailable_wait refuses them; once it
    is back they are sent. (Each refusal counted as a fresh failure of Redis: a member's
    overlapping tries, each waiting for a slot of the shared rate, kept the outage alive for
    each other, and every submit of that member was refused long after Redis answered.)"""
    port = free_port()
    name = fleet_name()
    async with emulator(time_scale=0.05) as emu:
        async with own_redis(tmp_path, port=port) as server:
            clients = [
                member(
                    emu,
                    server.url,
                    name,
                    limits=Limits(max_submits_per_second=4),  # turns wait for the shared rate
                    command_timeout=0.2,
                    unavailable_wait=0.5,
                )
                for _ in range(2)
            ]
            for client in clients:
                await client.open()
            refused = [0] * 8
            sent_after = [0] * 8
            back = asyncio.Event()

            async def consumer(i: int) -> None:
                client = clients[i % 2]
                while True:
                    try:
                        await client.images.submit(prompt=f"c{i}", model="dall-e-2")
                    except FleetUnavailableError:
                        refused[i] += 1
                        await asyncio.sleep(0)  # at once, but let the others run
                        continue
                    if back.is_set():
                        sent_after[i] += 1

            consumers = [asyncio.create_task(consumer(i)) for i in range(8)]
            try:
                assert server.process is not None
                server.process.terminate()
                await asyncio.wait_for(server.process.wait(), 15)
                await eventually(lambda: all(refused), timeout=15, what="every consumer refused")
                async with own_redis(tmp_path, port=port):
                    back.set()
                    await eventually(
                        lambda: all(sent_after), timeout=15, what="every consumer sent again"
                    )
            finally:
                for task in consumers:
                    task.cancel()
                await asyncio.gather(*consumers, return_exceptions=True)
                for client in clients:
                    await client.aclose()


@pytest.mark.long
async def test_time_queued_for_the_fleet_rate_is_not_time_waiting_for_redis(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    """Submits queued behind the fleet's rate longer than unavailable_wait survive a Redis
    freeze shorter than it: the wait for Redis counts from its first failure."""
    async with emulator(time_scale=0.05) as emu, own_redis(tmp_path) as server:
        limits = Limits(max_submits_per_second=2)
        client = member(
            emu, server.url, fleet_name(), limits=limits, command_timeout=0.2, unavailable_wait=1.5
        )
        async with client:
            submits = [
                asyncio.create_task(client.images.submit(prompt=f"q{i}", model="dall-e-2"))
                for i in range(10)
            ]
            # About 1.6 s in: the others have queued for more than unavailable_wait.
            await eventually(lambda: emu.stats()["submits_accepted"] >= 4, timeout=10)
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)  # commands miss their 0.2 s deadline
            try:
                await asyncio.sleep(0.9)  # the freeze itself, shorter than unavailable_wait
            finally:
                server.process.send_signal(signal.SIGCONT)
            jobs = await asyncio.wait_for(asyncio.gather(*submits), 20)
            assert len(jobs) == 10 and emu.stats()["submits_accepted"] == 10


@pytest.mark.long
async def test_submits_queued_behind_a_frozen_redis_fail_together_at_unavailable_wait(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    """Submits queued for the fleet's rate while Redis is frozen do not each spend a command
    deadline in turn (20 x 0.5 s): they all fail once Redis has failed for unavailable_wait."""
    async with emulator(time_scale=0.05) as emu, own_redis(tmp_path) as server:
        limits = Limits(max_submits_per_second=2)
        client = member(
            emu, server.url, fleet_name(), limits=limits, command_timeout=0.5, unavailable_wait=1.5
        )
        async with client:
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                submits = [
                    asyncio.create_task(client.images.submit(prompt=f"f{i}", model="dall-e-2"))
                    for i in range(20)
                ]
                # unavailable_wait + one command deadline, and room for a loaded machine; each
                # submit in turn would take 20 x 0.5 s.
                outcomes = await asyncio.wait_for(
                    asyncio.gather(*submits, return_exceptions=True), 6
                )
            finally:
                server.process.send_signal(signal.SIGCONT)
        assert all(isinstance(o, FleetUnavailableError) for o in outcomes), outcomes
        assert "not sent" in str(outcomes[-1])
        assert emu.stats()["submits_accepted"] == 0


@pytest.mark.long
async def test_a_key_redis_was_away_for_is_journaled_when_it_returns(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    # Redis goes away while a submit is on the wire: its key cannot be journaled within
    # unavailable_wait, so submit() returns the job with the key kept in memory. The key is
    # written again in the background and lands when Redis returns (AOF kept the intent).
    port = free_port()
    faults = FaultConfig(slow_reply=1.0, slow_reply_s=1.0, endpoints=frozenset({"generations"}))
    async with emulator(time_scale=0.05, faults=faults) as emu:
        async with own_redis(tmp_path, port=port, appendonly=True) as server:
            client = member(
                emu, server.url, fleet_name(), command_timeout=0.5, unavailable_wait=0.5
            )
            await client.open()
            try:
                submit = asyncio.create_task(client.images.submit(prompt="x", model="dall-e-2"))
                await eventually(lambda: emu.stats()["requests"].get("generations", 0) == 1)
                assert server.process is not None
                server.process.terminate()
                await asyncio.wait_for(server.process.wait(), 15)
                job = await asyncio.wait_for(submit, 15)  # returned, the key kept in memory
                async with own_redis(tmp_path, port=port, appendonly=True):
                    await eventually(lambda: fleet_of(client).role != "local", timeout=15)

                    async def journaled() -> bool:
                        rows = await client.journal_entries()
                        return [row.job_key for row in rows] == [job.key]

                    await eventually(journaled, timeout=15, what="the key in the journal")
                    assert await client.uncertain_submits() == []
                    await asyncio.wait_for(job, 10)
                    assert emu.stats()["submits_accepted"] == 1
            finally:
                await client.aclose()


@pytest.mark.long
async def test_a_redis_that_refuses_writes_sends_nothing_and_says_why(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    # A full Redis (maxmemory reached, no eviction) answers but refuses every write: no
    # journal intent can be written, so no submit may go out. The jobs already out go on
    # (polled locally); once Redis has room again the member rejoins, their outcomes are
    # journaled, and submits go out again.
    async with (
        emulator(time_scale=0.05) as emu,
        own_redis(tmp_path) as server,
        RedisFleet(server.url, name=fleet_name()) as observer,
    ):
        name = observer.config.name
        client = member(emu, server.url, name, command_timeout=0.5, unavailable_wait=0.5)
        async with client:
            jobs = [await client.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(3)]
            await observer.call(lambda r: r.config_set("maxmemory", 1))  # full: no room at all
            with pytest.raises(FleetUnavailableError, match="not sent") as refused:
                await client.images.submit(prompt="while full", model="dall-e-2")
            assert "refuses writes (out of memory" in str(refused.value)
            assert emu.stats()["submits_accepted"] == 3  # nothing was sent
            await asyncio.wait_for(asyncio.gather(*jobs), 20)
            await observer.call(lambda r: r.config_set("maxmemory", 0))
            await eventually(lambda: fleet_of(client).role != "local", timeout=10)
            job = await client.images.submit(prompt="room again", model="dall-e-2")
            await asyncio.wait_for(job, 10)
            assert emu.stats()["submits_accepted"] == 4

            async def journaled() -> bool:
                entries = await client.journal_entries()
                return sorted(entry.state for entry in entries) == ["succeeded"] * 4

            await eventually(journaled, timeout=10)


@pytest.mark.long
async def test_redis_losing_everything_mid_run_splits_nothing(
    url: str, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis restarted without its data (no AOF), while two members have jobs running: the
    # member list, the registry and the lease are gone. Each member finds out at its next
    # heartbeat or lease renewal, joins again and registers its keys again: one leader again,
    # nobody local for good, every job resolved by the leader's reports.
    caplog.set_level(logging.WARNING, "wujie_async.fleet")
    name = fleet_name()
    options: dict[str, Any] = {"member_timeout": 0.9, "lease_seconds": 0.6}
    async with (
        emulator(time_scale=0.3) as emu,
        RedisFleet(url, name=name) as observer,
        member(emu, url, name, **options) as a,
        member(emu, url, name, **options) as b,
    ):
        await eventually(lambda: roles(a, b) == ["follower", "leader"])
        jobs = [
            await c.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(8) for c in (a, b)
        ]
        wiped = await observer.call(lambda r: r.keys(f"*{name}*"))
        assert wiped
        await observer.call(lambda r: r.delete(*wiped))
        lost_at = time.time()
        results = await asyncio.wait_for(asyncio.gather(*jobs), 30)
        assert all(len(result.images) == 1 for result in results)
        await eventually(lambda: roles(a, b) == ["follower", "leader"], timeout=10)
        late = [who for at, who in emu.stats()["batch_callers"] if at > lost_at + 1.5]
        assert len(set(late)) <= 1, late  # one poller again
        assert emu.stats()["submits_accepted"] == 16


@pytest.mark.long
async def test_a_member_declared_dead_while_alive_joins_again_and_keeps_its_jobs(
    url: str, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # The fleet declares a member dead (a long pause, say) while its jobs run. When it finds
    # out (its heartbeat is refused) it joins again as a member, registers its keys again and
    # its jobs resolve as before; it does not stay local, and they are not claimable any more.
    caplog.set_level(logging.WARNING, "wujie_async.fleet")
    name = fleet_name()
    async with (
        emulator(time_scale=0.2) as emu,
        RedisFleet(url, name=name) as observer,
        member(emu, url, name, member_timeout=0.6) as survivor,
        member(emu, url, name, member_timeout=0.6) as paused,
    ):
        jobs = [await paused.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(5)]
        members, me = observer.keys.members, paused.fleet_member
        assert me is not None
        await observer.call(lambda r: r.zadd(members, {me: 0}))  # dead now
        await eventually(lambda: "joined again" in caplog.text)
        assert "declared dead" in caplog.text
        assert fleet_of(paused).role != "local"
        assert await survivor.resume() == []  # alive again: nothing to claim
        await asyncio.wait_for(asyncio.gather(*jobs), 20)
        assert fleet_of(paused).role != "local"
        assert emu.stats()["submits_accepted"] == 5


@pytest.mark.long
async def test_a_member_redis_forgot_resumes_at_once_and_finishes_its_jobs(
    url: str, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis lost the fleet's keys (a restart without AOF, FLUSHALL). ``resume()`` said "not
    a live fleet member" until the next heartbeat (10 s away by default); it now joins again
    at once, and the jobs of before and after go on to the end."""
    caplog.set_level(logging.WARNING, "wujie_async.fleet")
    name = fleet_name()
    async with (
        emulator(time_scale=0.2) as emu,
        RedisFleet(url, name=name) as observer,
        member(emu, url, name) as forgotten,
    ):
        before = await forgotten.images.submit(prompt="before", model="dall-e-2")
        assert await forget_fleet(observer) > 0
        assert await forgotten.resume() == []  # it follows its jobs already: none again
        assert "joined again" in caplog.text
        assert forgotten.fleet_member in await observer.call(
            lambda r: r.zrange(observer.keys.members, 0, -1)
        )
        after = await forgotten.images.submit(prompt="after", model="dall-e-2")
        await asyncio.wait_for(asyncio.gather(before, after), 20)
        assert emu.stats()["submits_accepted"] == 2


@pytest.mark.long
async def test_a_member_redis_forgot_writes_its_journal_rows_again_so_its_jobs_can_be_claimed(
    url: str, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis lost the fleet's keys, journal rows included. The member joined again and its
    keys were polled, but the rows of its jobs were gone: were it to die later, nobody could
    claim those paid jobs (resume() returned none of them). It writes them again."""
    caplog.set_level(logging.WARNING, "wujie_async.fleet")
    name = fleet_name()
    async with (
        emulator(time_scale=1.0, job_seconds=(6, 6)) as emu,
        RedisFleet(url, name=name) as observer,
        member(emu, url, name) as survivor,
    ):
        doomed = member(emu, url, name)
        async with doomed:
            jobs = [await doomed.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(3)]
            keys = {job.key for job in jobs}
            assert await forget_fleet(observer) > 0
            await eventually(lambda: "3 journal rows Redis had lost" in caplog.text)
            rows = await doomed.journal_entries("accepted")
            assert {row.job_key for row in rows} == keys
            assert all(row.request["model"] == "dall-e-2" for row in rows)
        # It left (as a member that died would, only sooner): its paid jobs are claimed.
        resumed = await survivor.resume()
        assert {job.key for job in resumed} == keys
        await asyncio.wait_for(asyncio.gather(*resumed), 30)
        assert emu.stats()["submits_accepted"] == 3


@pytest.mark.long
async def test_members_redis_forgot_join_again_long_before_their_next_heartbeat(
    url: str, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A FLUSHALL with the default member_timeout (30 s: a heartbeat every 10 s): the members
    read the member list every second, find themselves gone and join again with their keys
    then, so a new leader polls them; they waited for their next heartbeat (up to 10 s)."""
    caplog.set_level(logging.WARNING, "wujie_async.fleet")
    name = fleet_name()
    async with (
        emulator(time_scale=0.2) as emu,
        RedisFleet(url, name=name) as observer,
        member(emu, url, name, lease_seconds=1.0) as a,
        member(emu, url, name, lease_seconds=1.0) as b,
    ):
        await eventually(lambda: roles(a, b) == ["follower", "leader"])
        jobs = [
            await c.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(4) for c in (a, b)
        ]
        assert await forget_fleet(observer) > 0
        # Their journal writes put them back on the list, but not as joined (no info).
        jobs += [await c.images.submit(prompt="after", model="dall-e-2") for c in (a, b)]

        async def both_joined_again() -> bool:
            # Listed again, and each has said so (its line comes just after its listing).
            joined = await observer.call(lambda r: r.hkeys(observer.keys.member_info))
            listed = {a.fleet_member, b.fleet_member} <= set(joined)
            return listed and caplog.text.count("joined again") >= 2

        # Well inside the 10 s to the next heartbeat (the members joined a moment ago).
        await eventually(both_joined_again, timeout=5, what="both members joined again")
        await asyncio.wait_for(asyncio.gather(*jobs), 20)
        assert roles(a, b) == ["follower", "leader"]
        assert emu.stats()["submits_accepted"] == 10


async def test_reports_are_checked_like_replies_and_verdicts_end_jobs(
    url: str, emulator: EmulatorFactory
) -> None:
    # A leader's reports are other processes' writes: a malformed entry fails its own job
    # only, a garbled stream entry or verdict is skipped, and the member carries on. Here the
    # test holds the lease and plays the leader.
    name = fleet_name()
    async with emulator() as emu, RedisFleet(url, name=name, lease_seconds=30) as fake:
        lease = LeaderLease(fake, 0, "the-test")
        assert await lease.try_acquire() == 0.0
        async with member(emu, url, name, lease_seconds=30) as client:
            assert client.fleet_member is not None
            me: str = client.fleet_member
            ok, bad, lost, other = (client.images.attach(f"KEY-{k}") for k in "ABCD")
            entries = [
                {"key": ok.key, "status": 4, "complete_percent": 100,
                 "images": [{"url": "https://files.example/a.png"}]},
                {"key": bad.key, "status": "not a status"},
                {"key": "NOT-ASKED", "status": 4},
            ]  # fmt: skip
            stream = fake.keys.reports(me)
            await fake.call(lambda r: r.xadd(stream, {"b": "not json"}))
            await fake.call(lambda r: r.xadd(stream, {"junk": "x"}))
            await post_reports(
                fake,
                {
                    me: [
                        Report(keys=[ok.key, bad.key], data=entries),
                        Report(ended={lost.key: ("UnknownJobError", "not listed for 30s")}),
                        Report(ended={other.key: ("SystemExit", "not an error we know")}),
                        Report(ended={bad.key: ("JobProtocolError", "listed only malformed")}),
                    ]
                },
            )
            assert len((await asyncio.wait_for(ok, 5)).images) == 1
            with pytest.raises(UnknownJobError, match="fleet's leader"):
                await asyncio.wait_for(lost, 5)
            with pytest.raises(JobProtocolError):
                await asyncio.wait_for(bad, 5)
            assert not other.done()
            assert fleet_of(client).role == "follower"
            assert emu.stats()["batch_calls"] == 0  # nobody asked the gateway: the test did


async def test_a_429_on_a_submit_pauses_every_member(url: str, emulator: EmulatorFactory) -> None:
    from wujie_async.emulator import FaultConfig

    name = fleet_name()
    faults = FaultConfig(burst_429=1, retry_after_s=2, endpoints=frozenset({"generations"}))
    async with emulator(faults=faults) as emu, member(emu, url, name) as a:
        loop = asyncio.get_running_loop()
        refused_at = loop.time()
        submitting = asyncio.create_task(a.images.submit(prompt="after a 429", model="dall-e-2"))
        async with RedisFleet(url, name=name) as other:
            pause = FleetLimiter(other, 1.0)
            paused = await eventually(pause.paused_for, what="the fleet's pause")
        assert 0 < paused <= 2.0  # every member's next submit waits for it
        job = await submitting  # sent again once the pause is over: in the fleet's rate too
        assert a.stats.rate_limited == 1
        assert loop.time() - refused_at >= 2.0 - 0.1
        await job


def pollers_per_shard(
    stats: dict[str, Any], shard: Callable[[str], int]
) -> dict[int, list[tuple[float, str]]]:
    """Each shard's batch calls, in time order, as (time, caller); a call must stay in one."""
    calls: dict[int, list[tuple[float, str]]] = {}
    for (at, who), keys in zip(stats["batch_callers"], stats["batch_keys"], strict=True):
        shards = {shard(key) for key in keys}
        assert len(shards) == 1, f"one batch call asked about shards {shards}"
        calls.setdefault(shards.pop(), []).append((float(at), str(who)))
    return {shard: sorted(times) for shard, times in calls.items()}


@pytest.mark.long
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
    by_shard = pollers_per_shard(stats, lambda key: shard_of(key, shards))
    assert set(by_shard) == set(range(shards))  # 60 keys land in every shard
    for calls in by_shard.values():
        # One poller per shard at a time: the caller changes only at a takeover (none here).
        assert len({who for _, who in calls}) == 1, calls
    asked_together = [keys for keys in stats["batch_keys"] if len(keys) > 1]
    keys_of = [{job.key for job in jobs[i :: len(clients)]} for i in range(len(clients))]
    # The fleet polls for everyone: some call mixes keys of different members.
    assert any(sum(1 for mine in keys_of if mine & set(keys)) > 1 for keys in asked_together)
    assert stats["submits_accepted"] == 60


@pytest.mark.long
async def test_a_redis_that_refuses_the_reports_is_not_rejoined_in_a_storm(
    tmp_path: Path, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # A Redis at its memory limit took a rejoin's small writes and refused the leader's
    # reports: the member went local, rejoined at once, took every key into a call, was
    # refused again, every few milliseconds (up to 219 batch calls a second). A user that may
    # not XADD makes that cycle happen every time: each rejoin after a loss that soon after
    # the last waits twice as long as the one before.
    import redis.asyncio as aioredis

    async with own_redis(tmp_path) as server:
        admin: Any = aioredis.Redis.from_url(server.url)
        try:
            await admin.execute_command(
                "ACL", "SETUSER", "member", "on", ">pw", "~*", "&*", "+@all", "-xadd"
            )
        finally:
            await admin.aclose()
        url = server.url.replace("redis://", "redis://member:pw@")
        long_jobs = {"time_scale": 1.0, "job_seconds": (60.0, 60.0)}
        async with emulator(**long_jobs) as emu:
            with caplog.at_level(logging.WARNING, logger="wujie_async.fleet"):
                async with member(emu, url, fleet_name(), command_timeout=2.0) as client:
                    await client.images.submit(prompt="x", model="dall-e-2")

                    def rejoins() -> list[float]:
                        return [
                            record.created
                            for record in caplog.records
                            if "rejoined" in record.getMessage()
                        ]

                    await eventually(lambda: len(rejoins()) >= 5, what="five rejoins")
                    times = rejoins()
    # Each loss comes soon after its rejoin; then waits of 0.25, 0.5, 1 and 2 s (a few ms
    # each, before), not one tick of the member's watch (a second) each.
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    shown = [round(gap, 3) for gap in gaps]
    assert gaps[0] < 0.9, shown
    assert gaps[2] >= 1.0 and gaps[3] >= 2.0, shown


async def test_a_fleet_submit_given_an_earlier_jobs_key_is_uncertain_and_that_job_resumed(
    url: str,
) -> None:
    """A gateway whose key counter was reset hands an earlier member's key out again: the
    fleet's journal refuses it by itself (no ``refuse_keys``), the submit is uncertain, and
    ``resume()`` collects the earlier job from its own row."""
    name = fleet_name()

    def client_of(base_url: str) -> WujieClient:
        fleet = RedisFleet(url, name=name, lease_seconds=1.0, member_timeout=0.5)
        return WujieClient(
            throwaway_credentials(), base_url=base_url, retry=INSTANT_RETRY, fleet=fleet
        )

    done = images_at("https://cdn.example/a.png")
    async with scripted_gateway(all_running) as first, client_of(first.base_url) as client:
        earlier = await client.images.submit(prompt="earlier", model="dall-e-2")
    async with scripted_gateway(done) as restarted, client_of(restarted.base_url) as client:
        with pytest.raises(SubmitUncertainError, match="earlier job in the journal"):
            await client.images.submit(prompt="new", model="dall-e-2")
        [uncertain] = await client.uncertain_submits()
        assert uncertain.request["prompt"] == "new" and uncertain.job_key is None
        [job] = await client.resume()
        assert job.key == earlier.key and job.request is not None
        assert job.request["prompt"] == "earlier"
        await asyncio.wait_for(job, 10)


@contextlib.asynccontextmanager
async def reply_holding_proxy(
    upstream_port: int, marker: bytes, hold: float
) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A TCP proxy to Redis on 127.0.0.1 that holds back, ``hold`` seconds, the reply to a
    command whose bytes hold ``marker`` (a reply slow on its way back: a busy network, a
    loop that reads late); yields its URL and an event set when it holds one."""
    holding = asyncio.Event()
    pumps: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, held: list[bool],
                   requests: bool) -> None:  # fmt: skip
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if requests:
                    held[:] = [marker in data]  # the next reply is this command's
                elif held == [True] and not data.startswith(b"-"):  # not a NOSCRIPT
                    held.clear()
                    holding.set()
                    await asyncio.sleep(hold)
                sink.write(data)
                await sink.drain()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        writers.extend((writer, up_writer))
        held: list[bool] = []
        for work in (pump(reader, up_writer, held, True), pump(up_reader, writer, held, False)):
            task = asyncio.create_task(work)
            pumps.add(task)
            task.add_done_callback(pumps.discard)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0", holding
    finally:
        server.close()
        for task in list(pumps):
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await server.wait_closed()


async def test_resume_leaves_alone_a_key_its_own_submit_is_receiving(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    """resume() runs while a submit of the same member has its key journaled but has not
    returned yet (the key write's reply still on its way). resume() attached the key too;
    the submit's job then replaced it in the poller, and the job resume() returned never
    ended (its awaiters hung until the job timeout, the job long done)."""
    async with own_redis(tmp_path) as server, emulator(time_scale=0.01) as emu:
        # The accepted-key write: from "intent" to "accepted", the key (RESP bulk strings).
        marker = b"$6\r\nintent\r\n$8\r\naccepted\r\n$32\r\n"
        async with (
            reply_holding_proxy(server.port, marker, hold=1.0) as (url, holding),
            member(emu, url, fleet_name()) as client,
        ):
            submit = asyncio.create_task(client.images.submit(prompt="p", model="dall-e-2"))
            await asyncio.wait_for(holding.wait(), 10)  # its key is in Redis, reply held
            [entry] = await client.journal_entries("accepted")  # written, submit() out
            resumed = await client.resume()
            job = await submit
            assert entry.job_key == job.key
            assert [j.key for j in resumed] == []
            await asyncio.wait_for(job, 10)


async def test_attach_of_a_key_its_own_submit_is_receiving_is_that_submits_job(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    """attach(key) while a submit of the same client has its key journaled but has not
    returned yet: two jobs were made for the key, the submit's replaced the attached one in
    the poller, and the attached one never ended until its job timeout. One job now."""
    # The job runs on past the submit's return (2 s): the attached job is still pending then.
    async with own_redis(tmp_path) as server, emulator(time_scale=1, job_seconds=(2, 2)) as emu:
        marker = b"$6\r\nintent\r\n$8\r\naccepted\r\n$32\r\n"  # the accepted-key write
        async with (
            reply_holding_proxy(server.port, marker, hold=0.5) as (url, holding),
            member(emu, url, fleet_name()) as client,
        ):
            submit = asyncio.create_task(client.images.submit(prompt="p", model="dall-e-2"))
            await asyncio.wait_for(holding.wait(), 10)  # its key is in Redis, reply held
            [entry] = await client.journal_entries("accepted")
            assert entry.job_key is not None
            attached = client.images.attach(entry.job_key, job_timeout=60)
            job = await submit
            results = await asyncio.wait_for(asyncio.gather(job, attached), 10)
            assert results[0] == results[1] and len(results[0].images) == 1
            assert job is attached
            assert client.stats.jobs_succeeded == 1 and client.stats.jobs_outstanding == 0


async def test_attach_charged_to_the_budget_of_a_key_its_own_submit_is_receiving_counts_once(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    """attach(key, charge_budget=True) while a submit of the same client is receiving that
    key: one job, whose cost the submit's reservation already holds. The attach held it
    again, and the job's end counted its points twice (4 spent for a job charged 2: the next
    submit, which had room, was refused)."""
    limits = Limits(max_points=8, point_prices={"dall-e-2": 4})
    async with own_redis(tmp_path) as server, emulator(time_scale=1, job_seconds=(1, 1)) as emu:
        marker = b"$6\r\nintent\r\n$8\r\naccepted\r\n$32\r\n"  # the accepted-key write
        async with (
            reply_holding_proxy(server.port, marker, hold=0.5) as (url, holding),
            member(emu, url, fleet_name(), limits=limits) as client,
        ):
            body = {"prompt": "p", "model": "dall-e-2"}
            submit = asyncio.create_task(client.images.submit(prompt="p", model="dall-e-2"))
            await asyncio.wait_for(holding.wait(), 10)  # its key is in Redis, reply held
            [entry] = await client.journal_entries("accepted")
            assert entry.job_key is not None
            attached = client.images.attach(entry.job_key, request=body, charge_budget=True)
            job = await submit
            assert job is attached
            await asyncio.wait_for(job, 10)
            assert job.points_charged == 2
            # 4 spent of 8 (the table's 4: it counts a job reported at 2 at 4; counted
            # twice, 8): a job of 4 fits.
            await asyncio.wait_for(client.images.submit(prompt="q", model="dall-e-2"), 10)


async def test_a_submit_handed_a_job_attached_without_its_request_keeps_its_request_and_n(
    tmp_path: Path, emulator: EmulatorFactory
) -> None:
    """attach(key) with no request while the client's own submit (n=2) is receiving that
    key: the submit returned the attached job, with request None and n None, so job.request
    said nothing of what was sent and a job done with 1 image of 2 was not incomplete."""
    async with own_redis(tmp_path) as server, emulator(time_scale=1, job_seconds=(1, 1)) as emu:
        marker = b"$6\r\nintent\r\n$8\r\naccepted\r\n$32\r\n"  # the accepted-key write
        async with (
            reply_holding_proxy(server.port, marker, hold=0.5) as (url, holding),
            member(emu, url, fleet_name()) as client,
        ):
            submit = asyncio.create_task(client.images.submit(prompt="p", model="dall-e-2", n=2))
            await asyncio.wait_for(holding.wait(), 10)  # its key is in Redis, reply held
            [entry] = await client.journal_entries("accepted")
            assert entry.job_key is not None
            attached = client.images.attach(entry.job_key)
            job = await submit
            assert job is attached
            assert job.request is not None and job.request["prompt"] == "p"
            assert job.n == 2
            result = await asyncio.wait_for(job, 10)
            assert len(result.images) == 2


async def test_a_submit_cancelled_after_its_key_came_back_counts_as_accepted(
    tmp_path: Path, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A submit cancelled by its caller while its key was being journaled (a request handler
    whose client went away): the key came back, its job is tracked and journaled accepted.
    The stats and the close line counted it as an uncertain submit (no key, may have been
    charged; "uncertain_submits() lists them", which listed nothing) and not as accepted."""
    caplog.set_level(logging.INFO, logger="wujie_async")
    async with own_redis(tmp_path) as server, emulator(time_scale=1, job_seconds=(1, 1)) as emu:
        marker = b"$6\r\nintent\r\n$8\r\naccepted\r\n$32\r\n"  # the accepted-key write
        async with (
            reply_holding_proxy(server.port, marker, hold=0.5) as (url, holding),
            member(emu, url, fleet_name()) as client,
        ):
            submit = asyncio.create_task(client.images.submit(prompt="p", model="dall-e-2"))
            await asyncio.wait_for(holding.wait(), 10)  # its key is in Redis, reply held
            submit.cancel()
            with pytest.raises(asyncio.CancelledError):
                await submit
            [job] = client.jobs()
            await asyncio.wait_for(job, 10)
            assert await client.uncertain_submits() == []
            stats = client.stats
            assert (stats.submits, stats.submit_errors, stats.submits_uncertain) == (1, 0, 0)
    [closed] = [r.getMessage() for r in caplog.records if "client closed" in r.getMessage()]
    assert closed.startswith(
        "client closed: 1 submit(s) accepted, 0 raised (not accepted); 1 job(s) succeeded"
    ), closed


class _Elsewhere(aiohttp.abc.AbstractResolver):
    """Resolves every host to a port of 127.0.0.1 where nothing listens: a member cut off
    from the gateway, with the others' base URL."""

    def __init__(self) -> None:
        self._port = free_port()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": self._port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass


def _stepped_down(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "steps down as leader" in r.getMessage()]


@pytest.mark.long
async def test_a_leader_cut_off_from_the_gateway_steps_down(
    url: str, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # A leader whose batch calls all failed (the gateway unreachable from its machine) kept
    # renewing its lease: the other members' jobs were asked about by nobody.
    # Leases of 2 s, renewed every 0.67 s: a loop the host starved for 0.67 s (its cut-off
    # leader retrying at once) lost a lease of 1 s before the 3 s of failures that step down.
    caplog.set_level(logging.INFO, logger="wujie_async")
    name = fleet_name()
    async with (
        emulator(time_scale=0.02) as emu,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=_Elsewhere())) as cut,
    ):
        base_url = emu.base_url.replace("127.0.0.1", "localhost")
        fleet = RedisFleet(url, name=name, lease_seconds=2.0)
        async with WujieClient(
            emu.credentials, base_url=base_url, poll=FAST_POLL, retry=INSTANT_RETRY,
            fleet=fleet, session=cut,
        ) as cut_off:  # fmt: skip
            await eventually(lambda: fleet_of(cut_off).role == "leader", what="a leader")
            healthy = WujieClient(
                emu.credentials, base_url=base_url, poll=FAST_POLL, retry=INSTANT_RETRY,
                fleet=RedisFleet(url, name=name, lease_seconds=2.0),
            )  # fmt: skip
            async with healthy:
                jobs = [
                    await healthy.images.submit(prompt=f"p{i}", model="dall-e-2") for i in range(3)
                ]
                async with asyncio.timeout(20):
                    await asyncio.gather(*jobs)
                assert fleet_of(healthy).role == "leader"
                assert fleet_of(cut_off).role == "follower"
                assert len(_stepped_down(caplog)) == 1
                callers = {caller for _, caller in emu.stats()["batch_callers"]}
                assert callers == {str(healthy.fleet_member).rsplit(":", 1)[-1]}


@pytest.mark.long
async def test_leaders_do_not_hand_over_on_and_on_when_the_gateway_fails_for_everyone(
    url: str, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Stepping down helps nobody when the gateway fails for every member: after one hand-over
    # per other member, the last leader stays (it has nobody left to hand over to).
    caplog.set_level(logging.INFO, logger="wujie_async")
    name = fleet_name()
    down = FaultConfig(http_5xx=1.0, endpoints=frozenset({"info"}))
    async with emulator(time_scale=0.02, faults=down) as emu, member(emu, url, name) as first:
        await eventually(lambda: fleet_of(first).role == "leader", what="a leader")
        async with member(emu, url, name) as second:
            jobs = [await second.images.submit(prompt=f"p{i}", model="dall-e-2") for i in range(2)]
            await eventually(lambda: fleet_of(second).role == "leader", what="a hand-over")

            def kept() -> int:
                return sum("keeps leading shard" in r.getMessage() for r in caplog.records)

            # The rule is asked every 3 lease lengths of failing: twice, it finds nobody.
            await eventually(lambda: kept() >= 2, what="two refusals to hand over")
            assert len(_stepped_down(caplog)) == 1
            assert fleet_of(second).role == "leader"
            emu.set_faults(FaultConfig())
            async with asyncio.timeout(20):
                await asyncio.gather(*jobs)


@pytest.mark.long
async def test_a_leader_whose_hand_over_found_no_taker_does_not_step_down_again(
    url: str, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # A failing leader whose only other live member never leads (kept out, broken): it
    # stepped down, took the lease back a lease length later (nobody took it) and stepped
    # down again every few lease lengths, its followers' keys unasked each time.
    caplog.set_level(logging.INFO, logger="wujie_async")
    name = fleet_name()
    down = FaultConfig(http_5xx=1.0, endpoints=frozenset({"info"}))
    async with (
        emulator(time_scale=0.02, faults=down) as emu,
        RedisFleet(url, name=name) as observer,
        member(emu, url, name, lease_seconds=0.5) as leader,
    ):
        await eventually(lambda: fleet_of(leader).role == "leader", what="a leader")
        await Membership(observer, new_member_id()).join()  # alive, and never leads
        job = await leader.images.submit(prompt="x", model="dall-e-2")

        def no_taker() -> int:
            return sum("found no taker" in r.getMessage() for r in caplog.records)

        await eventually(
            lambda: no_taker() or len(_stepped_down(caplog)) > 1,
            what="the leader staying, or stepping down again",
        )
        assert len(_stepped_down(caplog)) == 1
        assert fleet_of(leader).role == "leader"
        emu.set_faults(FaultConfig())
        await asyncio.wait_for(job, 20)


@pytest.mark.long
async def test_a_pause_in_hand_overs_ends_once_another_member_has_led(
    url: str, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # A leader whose hand-over found no taker does not step down again for 60 lease lengths.
    # That pause outlived its reason: another member led in between, the leader took the
    # lease back, its calls failed, and it kept leading ("its last hand-over found no taker")
    # though a member that could take over had opened meanwhile.
    caplog.set_level(logging.INFO, logger="wujie_async")
    name = fleet_name()
    down = FaultConfig(http_5xx=1.0, endpoints=frozenset({"info"}))
    take = "local t = redis.call('INCR', KEYS[2]) redis.call('SET', KEYS[1], 'x:1:x|' .. t)"
    async with (
        emulator(time_scale=0.02, faults=down) as emu,
        RedisFleet(url, name=name) as observer,
        member(emu, url, name, lease_seconds=0.5) as leader,
    ):
        await eventually(lambda: fleet_of(leader).role == "leader", what="a leader")
        await Membership(observer, new_member_id()).join()  # alive, and never leads
        job = await leader.images.submit(prompt="x", model="dall-e-2")
        await eventually(
            lambda: any("found no taker" in r.getMessage() for r in caplog.records),
            what="a hand-over that found no taker",
        )
        lease = (observer.keys.lease(0), observer.keys.lease_counter(0))
        await observer.call(lambda r: r.eval(take, 2, *lease))  # another holder leads
        await eventually(lambda: fleet_of(leader).role == "follower", what="the lease lost")
        await observer.call(lambda r: r.delete(lease[0]))
        await eventually(lambda: fleet_of(leader).role == "leader", what="the lease back")
        async with member(emu, url, name, lease_seconds=0.5) as taker:
            await eventually(
                lambda: fleet_of(taker).role == "leader", timeout=15, what="a hand-over"
            )
            assert len(_stepped_down(caplog)) == 2
            emu.set_faults(FaultConfig())
            await asyncio.wait_for(job, 20)
