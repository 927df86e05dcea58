"""Membership (heartbeats, death, joining again) and the fenced leader lease (takeover, stalls)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from wujie_async.fleet import RedisFleet
from wujie_async.fleet._errors import FleetMismatchError, LeaseLostError
from wujie_async.fleet._exchange import KeyRegistry
from wujie_async.fleet._journal import RedisJournal
from wujie_async.fleet._lease import LeaderLease
from wujie_async.fleet._membership import Membership, new_member_id

from .fleet_support import (
    any_redis,
    fleet_name,
    forget_fleet,
    next_event,
    start_child,
    stop_child,
)
from .helpers import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    async with any_redis(tmp_path) as redis_url:
        yield redis_url


# --- membership ---------------------------------------------------------------------------------
async def live_members(fleet: RedisFleet, membership: Membership) -> list[str]:
    """The members whose heartbeat is younger than ``member_timeout``, sorted."""
    timeout = fleet.config.member_timeout
    return sorted(m for m, age in (await membership.members()).items() if age <= timeout)


@pytest.mark.long
async def test_a_silent_member_is_dead_until_it_joins_again(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), member_timeout=0.6) as fleet:
        alive, silent = Membership(fleet, new_member_id()), Membership(fleet, new_member_id())
        await alive.join()
        await silent.join()
        assert await live_members(fleet, alive) == sorted([alive.member_id, silent.member_id])

        async def silent_dead() -> bool:  # only `alive` heartbeats
            assert await alive.heartbeat()
            return (await alive.members())[silent.member_id] > 0.6

        await eventually(silent_dead, timeout=10, what="the silent member's death")
        assert await live_members(fleet, alive) == [alive.member_id]
        assert await silent.heartbeat() is False  # too late: a heartbeat does not revive it
        assert await live_members(fleet, alive) == [alive.member_id]
        await silent.join()  # joining again does
        assert await silent.heartbeat() is True
        assert await live_members(fleet, alive) == sorted([alive.member_id, silent.member_id])


async def test_leaving_makes_a_member_dead_at_once(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        staying, leaving = Membership(fleet, new_member_id()), Membership(fleet, new_member_id())
        await staying.join()
        await leaving.join()
        await leaving.leave()
        assert await live_members(fleet, staying) == [staying.member_id]
        assert (await staying.members())[leaving.member_id] > fleet.config.member_timeout
        assert await leaving.heartbeat() is False


@pytest.mark.long
async def test_a_kept_out_member_keeps_its_jobs_until_it_leaves(url: str) -> None:
    # Refused on joining again (the fleet's live members use another gateway), a member sent
    # no heartbeat, and its jobs were claimed by a member that asks another gateway. Gone,
    # they go to a member of its own gateway alone.
    async with RedisFleet(url, name=fleet_name()) as fleet:
        ours, theirs = Membership(fleet, new_member_id()), Membership(fleet, new_member_id())
        ours.use_gateway("https://ours.example", "app")
        theirs.use_gateway("https://theirs.example", "app")
        await ours.join()
        journal = RedisJournal(fleet, ours.member_id)
        await journal.record_accepted(await journal.record_intent("/p", {"prompt": "x"}), "k1")
        # The fleet went to another gateway: its record is of another epoch, not fresh (not a
        # newcomer's after Redis lost the fleet), so `ours` does not win it back.
        record: dict[Any, Any] = {"fingerprint": theirs.gateway[0], "epoch": "0"}
        await fleet.call(lambda r: r.delete(fleet.keys.gateway))  # a record anew
        await fleet.call(lambda r: r.hset(fleet.keys.gateway, mapping=record))
        await theirs.join()
        heir = RedisJournal(fleet, theirs.member_id)

        async def ours_silent() -> bool:
            assert await theirs.heartbeat()
            with pytest.raises(FleetMismatchError):
                await ours.join()  # kept out, it tries again (as a member does every beat)
            return (await theirs.members())[ours.member_id] > 0.5

        await eventually(ours_silent, timeout=10, what="`ours` silent for 0.5 s")
        assert (await heir.claim_dead(0.5)).entries == []
        await ours.leave()  # gone: its jobs are claimable at once, by a member of its gateway
        heir.use_gateway(*theirs.gateway)
        assert (await heir.claim_dead(0.5)).entries == []  # theirs asks another gateway
        await theirs.leave()
        mate = Membership(fleet, new_member_id())
        mate.use_gateway("https://ours.example", "app")
        await mate.join()
        own = RedisJournal(fleet, mate.member_id)
        own.use_gateway(*mate.gateway)
        assert [entry.job_key for entry in (await own.claim_dead(0.5)).entries] == ["k1"]


async def gateways(fleet: RedisFleet) -> tuple[Membership, Membership, Membership]:
    """Two members of one gateway that joined, and a newcomer of another gateway."""
    ours, mate, theirs = (Membership(fleet, new_member_id()) for _ in range(3))
    for membership, base_url in ((ours, "ours"), (mate, "ours"), (theirs, "theirs")):
        membership.use_gateway(f"https://{base_url}.example", "app")
    await ours.join()
    await mate.join()
    return ours, mate, theirs


async def test_a_newcomers_record_dated_by_a_clock_set_back_keeps_no_old_member_out(
    url: str,
) -> None:
    # Redis restarted without AOF on a host whose clock is behind the old one, and a client of
    # another gateway opened first: its record was dated before the old members' joins, so
    # every old member was refused for as long as it lived. No clock decides it now.
    async with RedisFleet(url, name=fleet_name()) as fleet:
        ours, mate, theirs = await gateways(fleet)
        await forget_fleet(fleet)
        # The record as the newcomer dated it by a Redis clock set back (before both joins).
        record: dict[Any, Any] = {"fingerprint": theirs.gateway[0], "since": "1"}
        await fleet.call(lambda r: r.hset(fleet.keys.gateway, mapping=record))
        await theirs.join()
        assert await ours.join() == [theirs.member_id]  # there first: it wins the fleet back
        assert await mate.join() == []
        for _ in range(2):  # the newcomer is kept out, and never wins it back: no ping-pong
            with pytest.raises(FleetMismatchError):
                await theirs.join()
        other = Membership(fleet, new_member_id())
        other.use_gateway("https://theirs.example", "app")
        with pytest.raises(FleetMismatchError):
            await other.join()
        # Lost again, the fleet goes to whichever old member comes back first; a member refused
        # since it joined never wins against the fleet's live members.
        await forget_fleet(fleet)
        await mate.join()
        with pytest.raises(FleetMismatchError):
            await theirs.join()
        assert await ours.join() == []


async def test_winning_the_fleet_back_takes_no_lease_from_its_own_gateway(url: str) -> None:
    # A member winning the fleet back took every shard's lease: also one a member of its own
    # gateway had taken again (free after the loss) before joining again, a needless hand-over.
    async with RedisFleet(url, name=fleet_name(), lease_seconds=5.0) as fleet:
        ours, mate, theirs = await gateways(fleet)
        await forget_fleet(fleet)
        await theirs.join()
        mates, its = LeaderLease(fleet, 0, mate.member_id), LeaderLease(fleet, 1, theirs.member_id)
        assert await mates.try_acquire() == 0.0 and await its.try_acquire() == 0.0
        dropped = await ours.join()
        assert dropped == [theirs.member_id]
        for shard in (0, 1):
            await LeaderLease(fleet, shard, ours.member_id).try_acquire(take_from=dropped)
        assert await mates.renew()  # still its own
        assert not await its.renew()  # the newcomer's leader is fenced out


# --- lease --------------------------------------------------------------------------------------
@pytest.mark.long
async def test_one_leader_and_a_larger_token_on_every_takeover(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), lease_seconds=0.4) as fleet:
        first, second = LeaderLease(fleet, 0, "a"), LeaderLease(fleet, 0, "b")
        assert await first.try_acquire() == 0.0
        assert await second.try_acquire() > 0  # held: the holder's TTL comes back
        assert first.token is not None and second.token is None
        old_fence, old_token = first.require(0.1), first.token
        # `first` never renews: its own clock says its lease is gone before Redis does.
        await eventually(lambda: first.remaining() == 0, what="the lease's end, locally")
        with pytest.raises(LeaseLostError):
            first.require(0.0)

        async def taken() -> bool:
            return await second.try_acquire() == 0.0

        await eventually(taken, timeout=5, what="the lease's end in Redis")
        assert second.token is not None and second.token > old_token
        # Redis refuses the stale fence too (a frozen process that skipped the local check).
        with pytest.raises(LeaseLostError):
            await KeyRegistry(fleet).read(0, old_fence, None)
        assert await first.renew() is False
        await KeyRegistry(fleet).read(0, second.require(0.1), None)


async def test_a_member_takes_its_own_lease_again_at_once(url: str) -> None:
    # Back from a short Redis outage, a leader finds the lease still its own: it leads again
    # with a new token, without waiting for its old lease to run out.
    async with RedisFleet(url, name=fleet_name(), lease_seconds=30) as fleet:
        mine, other = LeaderLease(fleet, 0, "me"), LeaderLease(fleet, 0, "other")
        await mine.try_acquire()
        token = mine.token
        assert token is not None
        mine.step_down()  # as when Redis went away
        assert await mine.try_acquire() == 0.0
        assert mine.token is not None and mine.token > token
        assert await other.try_acquire() > 0


async def test_a_lease_without_a_ttl_is_waited_for_not_taken(url: str) -> None:
    # Another process's write: a lease value with no TTL. Nobody takes it, and nobody spins.
    async with RedisFleet(url, name=fleet_name()) as fleet:
        key = fleet.keys.lease(0)
        await fleet.call(lambda r: r.set(key, "garbled"))
        lease = LeaderLease(fleet, 0, "me")
        assert await lease.try_acquire() > 0.1
        assert lease.token is None


async def test_release_hands_over_at_once(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), lease_seconds=30) as fleet:
        first, second = LeaderLease(fleet, 0, "a"), LeaderLease(fleet, 0, "b")
        await first.try_acquire()
        await first.release()
        assert first.token is None
        assert await second.try_acquire() == 0.0


@pytest.mark.long
async def test_renewal_keeps_the_lease_and_shards_are_independent(url: str) -> None:
    async with RedisFleet(url, name=fleet_name(), lease_seconds=0.3, shards=2) as fleet:
        a0, b1, b0 = (
            LeaderLease(fleet, 0, "a"),
            LeaderLease(fleet, 1, "b"),
            LeaderLease(fleet, 0, "b"),
        )
        await asyncio.wait_for(a0.acquire(), 2)
        await asyncio.wait_for(b1.acquire(), 2)  # another shard: another lease
        token = a0.token
        keeping = asyncio.create_task(a0.keep())
        waiting = asyncio.create_task(b0.acquire())  # tries again each time the TTL could end
        try:
            # More than three lease periods: the lease would have run out without renewals.
            await eventually(
                lambda: a0.renewals >= 10 or keeping.done(), timeout=10, what="10 renewals"
            )
            assert (
                not keeping.done() and a0.token == token and not waiting.done() and b0.token is None
            )
            assert a0.remaining() > 0.1
        finally:
            keeping.cancel()
            waiting.cancel()
            await asyncio.gather(keeping, waiting, return_exceptions=True)


@pytest.mark.slow
async def test_a_killed_leader_is_replaced_within_the_lease_time(url: str) -> None:
    name, lease_seconds = fleet_name(), 1.0
    child = await start_child("leader", url, name, str(lease_seconds))
    try:
        await next_event(child)  # it has joined
        first_act = await next_event(child)
        assert first_act["act"] is not None  # it leads and acts
        async with RedisFleet(url, name=name, lease_seconds=lease_seconds) as fleet:
            successor = LeaderLease(fleet, 0, "successor")
            assert await successor.try_acquire() > 0  # the child holds the lease
            child.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.wait_for(successor.acquire(), lease_seconds + 1)
            took = time.monotonic() - killed
            assert took <= lease_seconds + 0.1, took
            assert successor.token is not None and successor.token > first_act["act"]
    finally:
        await stop_child(child)


async def events_until_refused(proc: Any) -> list[dict[str, Any]]:
    """The child's events up to the first one saying it may not act (its lease is gone)."""
    events = []
    while "refused" not in (event := await next_event(proc, timeout=10)):
        events.append(event)
    return events


@pytest.mark.slow
async def test_a_stalled_leader_does_not_act_after_losing_its_lease(url: str) -> None:
    name, lease_seconds = fleet_name(), 0.8
    child = await start_child("leader", url, name, str(lease_seconds))
    try:
        await next_event(child)
        old_token = (await next_event(child))["act"]
        async with RedisFleet(url, name=name, lease_seconds=lease_seconds) as fleet:
            successor = LeaderLease(fleet, 0, "successor")
            child.send_signal(signal.SIGSTOP)  # a GC pause far longer than the lease
            await asyncio.wait_for(successor.acquire(), lease_seconds + 1)
            took_over = time.time()
            await KeyRegistry(fleet).read(0, successor.require(0.1), None)
            keeping = asyncio.create_task(successor.keep())
            child.send_signal(signal.SIGCONT)
            # The thawed child checks its lease before it acts: everything it says until it
            # finds the lease gone was said before the takeover.
            events = await events_until_refused(child)
            assert successor.token is not None and not keeping.done()  # not taken back
            keeping.cancel()
        assert [e for e in events if e["t"] > took_over] == []
        assert all(e["act"] == old_token for e in events)
    finally:
        child.send_signal(signal.SIGCONT)
        await stop_child(child)
