"""RedisJournal: the SQLite journal's protocol, owners, and claims of dead members' jobs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from wujie_async import ClientStateError
from wujie_async.fleet import FleetUnavailableError, RedisFleet
from wujie_async.fleet._journal import RedisJournal
from wujie_async.fleet._membership import Membership, new_member_id

from .fleet_support import (
    any_redis,
    fleet_name,
    forget_fleet,
    next_event,
    own_redis,
    start_child,
    stop_child,
)
from .helpers import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    async with any_redis(tmp_path) as redis_url:
        yield redis_url


@contextlib.asynccontextmanager
async def opened(fleet: RedisFleet, member: str) -> AsyncIterator[RedisJournal]:
    journal = RedisJournal(fleet, member)
    await journal.open()
    try:
        yield journal
    finally:
        await journal.close()


async def test_the_sqlite_journal_protocol(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet, opened(fleet, "me") as journal:
        request = {"prompt": "a fox 🦊", "model": "dall-e-2"}
        done = await journal.record_intent("/gen", request, tag="msg-1")
        assert [e.state for e in await journal.entries("intent")] == ["intent"]
        await journal.record_accepted(done, "KEY-DONE")
        journal.record_outcome("KEY-DONE", "succeeded")
        later = await journal.record_intent("/gen", request)
        journal.record_accepted_later(later, "KEY-LATER")
        refused = await journal.record_intent("/gen", request)
        journal.record_unsent(refused, "rejected", "20010001 bad size")
        lost = await journal.record_intent("/edit", request)
        journal.record_unsent(lost, "uncertain", "reply lost")
        never = await journal.record_intent("/gen", request)
        journal.record_unsent(never, "unsent", "cancelled before sending")
        await journal.flush()

        every = await journal.entries()  # no states: every row, oldest first
        assert [(e.id, e.state) for e in every] == [
            (done, "succeeded"), (later, "accepted"), (refused, "rejected"),
            (lost, "uncertain"), (never, "unsent"),
        ]  # fmt: skip
        first = every[0]
        assert first.request == request and first.path == "/gen" and first.job_key == "KEY-DONE"
        assert first.tag == "msg-1" and first.created > 0 and first.error is None
        assert every[2].error == "20010001 bad size"
        assert [e.job_key for e in await journal.entries("accepted")] == ["KEY-LATER"]
        assert [e.id for e in await journal.entries(tag="msg-1")] == [done]
        assert [e.id for e in await journal.entries("accepted", tag="msg-1")] == []
        assert await journal.forget([done, refused, 999_999]) == 2
        assert [e.id for e in await journal.entries()] == [later, lost, never]
        assert await journal.entries(tag="msg-1") == []
        with pytest.raises(ValueError, match="final state"):
            journal.record_outcome("KEY-LATER", "accepted")

        # An uncertain row's key, found since: accepted, and the finder's to resume. A key a
        # row already holds, or a row that is not uncertain, is refused.
        assert not await journal.record_found_key(lost, "KEY-LATER")
        assert not await journal.record_found_key(never, "KEY-FOUND")
        async with opened(fleet, "finder") as finder:
            assert await finder.record_found_key(lost, "KEY-FOUND")
            assert not await finder.record_found_key(lost, "KEY-FOUND")
            [found] = await finder.entries("accepted", owned_by="finder")
            assert (found.id, found.job_key, found.error) == (lost, "KEY-FOUND", None)
            finder.record_outcome("KEY-FOUND", "succeeded")
            await finder.flush()
            assert [e.state for e in await finder.entries(tag=None)][-2:] == ["succeeded", "unsent"]


async def test_members_only_change_their_own_rows(url: str) -> None:
    async with (
        RedisFleet(url, name=fleet_name()) as fleet,
        opened(fleet, "owner") as mine,
        opened(fleet, "stranger") as other,
    ):
        row = await mine.record_intent("/gen", {"prompt": "x"})
        with pytest.raises(ClientStateError, match="not an intent of member stranger"):
            await other.record_accepted(row, "K")
        await mine.record_accepted(row, "K")
        other.record_outcome("K", "failed", "not mine")
        await other.flush()
        [entry] = await mine.entries()
        assert entry.state == "accepted"
        assert [e.id for e in await mine.entries(owned_by="owner")] == [row]
        assert await mine.entries(owned_by="stranger") == []


async def test_garbled_rows_strand_no_other_row_and_hold_up_no_record(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Rows are other processes' writes. A row overwritten with another type, or with a
    # request that is not JSON, must not fail every read (resume() would strand every job),
    # and a record for a garbled row must not hold up the records queued after it.
    async with RedisFleet(url, name=fleet_name()) as fleet, opened(fleet, "me") as journal:
        await Membership(fleet, "me").join()
        rows = {}
        for name in ("overwritten", "bad-request", "fine"):
            rows[name] = await journal.record_intent("/gen", {"prompt": name})
            await journal.record_accepted(rows[name], f"KEY-{name}")
        prefix = fleet.keys.journal_prefix
        overwritten = f"{prefix}row:{rows['overwritten']}"
        await fleet.call(lambda r: r.delete(overwritten))
        await fleet.call(lambda r: r.set(overwritten, "not a hash"))
        bad = f"{prefix}row:{rows['bad-request']}"
        await fleet.call(lambda r: r.hset(bad, "request", "{not json"))

        journal.record_outcome("KEY-overwritten", "succeeded")  # can never land
        journal.record_outcome("KEY-fine", "succeeded")  # must land all the same
        await asyncio.wait_for(journal.flush(), 10)
        listed = {entry.job_key: entry for entry in await journal.entries()}
        assert set(listed) == {"KEY-bad-request", "KEY-fine"}
        assert listed["KEY-fine"].state == "succeeded"
        assert listed["KEY-bad-request"].request == {}  # its key still resumes it
        await journal.entries()
        warned = [r.getMessage() for r in caplog.records if "fleet journal: rows" in r.getMessage()]
        assert len(warned) == 2  # once per row, not once per read
        claim = await journal.claim_dead()  # the claim script goes past the garbled row too
        assert claim.entries == []


async def test_claim_needs_a_live_claimer(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet, opened(fleet, "ghost") as journal:
        with pytest.raises(ClientStateError, match="not a live fleet member"):
            await journal.claim_dead()


@pytest.mark.long
async def test_rows_of_a_member_redis_forgot_are_claimable_if_it_dies_before_its_heartbeat(
    url: str,
) -> None:
    """Redis lost the fleet's keys (a restart without AOF, FLUSHALL); a member writes rows
    before its next heartbeat would make it a member again, and dies. Its rows must not be
    stranded: its first write makes it a member again, so its death is seen."""
    timeout = 0.6
    async with RedisFleet(url, name=fleet_name(), member_timeout=timeout) as fleet:
        doomed, heir = Membership(fleet, new_member_id()), Membership(fleet, new_member_id())
        await doomed.join()
        assert await forget_fleet(fleet) > 0
        async with opened(fleet, doomed.member_id) as journal:
            row = await journal.record_intent("generations", {"prompt": "p", "model": "dall-e-2"})
            await journal.record_accepted(row, "PAIDKEY")
        assert doomed.member_id in await heir.members()  # the write put it back
        await heir.join()
        deadline = asyncio.get_running_loop().time() + 10
        while (await heir.members())[doomed.member_id] <= timeout:  # it never heartbeats again
            assert await heir.heartbeat()
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        async with opened(fleet, heir.member_id) as journal:
            claim = await journal.claim_dead()
        assert claim.dead_members == [doomed.member_id]
        assert [entry.job_key for entry in claim.entries] == ["PAIDKEY"]


async def test_a_submit_out_when_redis_lost_its_rows_is_filed_under_its_own_row(
    url: str,
) -> None:
    """Redis lost the fleet's keys while submits were on the wire; the member wrote a new
    intent since. Row ids never come round again: each key lands on its own submit's row
    (written again when it was lost), and an uncertain end is kept, so find_submit and
    uncertain_submits tell the truth and a claim would find the jobs."""
    request = {"prompt": "p", "model": "dall-e-2"}
    async with RedisFleet(url, name=fleet_name()) as fleet, opened(fleet, "me") as journal:
        before = await journal.record_intent("generations", request, tag="A")
        lost = await journal.record_intent("generations", request, tag="C")
        later = await journal.record_intent("generations", request, tag="D")
        assert await forget_fleet(fleet) > 0
        since = await journal.record_intent("generations", request, tag="B")
        assert since not in (before, lost, later)
        await journal.record_accepted(before, "KEY-A")  # A's reply came after the loss
        await journal.record_accepted(since, "KEY-B")
        journal.record_unsent(lost, "uncertain", "reply lost")
        journal.record_accepted_later(later, "KEY-D")
        await journal.flush()
        rows = {entry.tag: entry for entry in await journal.entries()}
        assert {tag: (e.state, e.job_key) for tag, e in rows.items()} == {
            "A": ("accepted", "KEY-A"),
            "B": ("accepted", "KEY-B"),
            "C": ("uncertain", None),
            "D": ("accepted", "KEY-D"),
        }
        assert rows["A"].request == request and rows["C"].error == "reply lost"
        assert len({e.id for e in rows.values()}) == 4


async def test_a_key_write_asked_again_after_it_landed_is_not_a_claim(url: str) -> None:
    # The key's write ran, but its reply was lost (a dropped connection) or read after its
    # deadline (the loop stood still): it is asked once more. The second run found the row
    # accepted already and said "not an intent of member ... any more (claimed by another
    # member?)": the submit's key was reported unjournaled, and uncertain.
    async with RedisFleet(url, name=fleet_name()) as fleet, opened(fleet, "me") as journal:
        row = await journal.record_intent("/gen", {"prompt": "paid"}, tag="t")
        assert await journal.record_accepted(row, "PAID")
        assert await journal.record_accepted(row, "PAID")  # the same write, asked again
        [entry] = await journal.entries()
        assert (entry.id, entry.state, entry.job_key) == (row, "accepted", "PAID")
        other = await journal.record_intent("/gen", {"prompt": "other"})
        assert not await journal.record_accepted(other, "PAID")  # still an earlier job's key


async def test_a_member_only_a_journal_write_put_back_is_told_to_join_again(url: str) -> None:
    async with RedisFleet(url, name=fleet_name()) as fleet:
        me = Membership(fleet, new_member_id())
        await me.join()
        await forget_fleet(fleet)
        async with opened(fleet, me.member_id) as journal:
            await journal.record_intent("generations", {"prompt": "p", "model": "dall-e-2"})
        # Alive to a claim, yet its heartbeat says "unknown": it joins again and registers its
        # keys again, which Redis lost with the rest.
        assert await me.beat() == "unknown"
        await me.join()
        assert await me.beat() == "refreshed"


@pytest.mark.slow
async def test_two_claimers_split_dead_members_jobs_exactly_once(url: str) -> None:
    """Four member processes journal jobs and are SIGKILLed; two claimers race for them."""
    name, timeout = fleet_name(), 0.6
    children = [await start_child("journal", url, name, str(timeout), "5") for _ in range(4)]
    expected: dict[str, str] = {}  # job key -> dead member
    try:
        for child in children:
            joined = await next_event(child)
            expected |= dict.fromkeys(joined["keys"], joined["member"])
    finally:
        for child in children:
            await stop_child(child)  # SIGKILL: no goodbye, heartbeats just stop

    async with AsyncExitStack() as stack:
        claimers, members = [], []
        for _ in range(2):
            fleet = await stack.enter_async_context(
                RedisFleet(url, name=name, member_timeout=timeout)
            )
            members.append(Membership(fleet, new_member_id()))
            claimers.append(await stack.enter_async_context(opened(fleet, members[-1].member_id)))
        await asyncio.sleep(timeout + 0.2)  # the killed members' heartbeats expire

        async def claim_repeatedly(
            me: Membership, journal: RedisJournal
        ) -> tuple[list[str], list[str]]:
            keys: list[str] = []
            dead: list[str] = []
            for _ in range(20):
                await me.join()  # a live member (as its heartbeats would keep it)
                claim = await journal.claim_dead(timeout)
                keys += [e.job_key or "" for e in claim.entries]
                dead += claim.dead_members
            return keys, dead

        (keys_a, dead_a), (keys_b, dead_b) = await asyncio.gather(
            *(claim_repeatedly(me, journal) for me, journal in zip(members, claimers, strict=True))
        )
        assert not set(keys_a) & set(keys_b)  # never the same job twice
        assert sorted(keys_a + keys_b) == sorted(expected)  # and every job once
        assert sorted(dead_a + dead_b) == sorted(set(expected.values()))
        # Their in-flight intents are uncertain now, never resent silently.
        uncertain = await claimers[0].entries("uncertain")
        assert len(uncertain) == 4 and all("died before" in (e.error or "") for e in uncertain)
        # The claimers own the rows and can finish them; the dead are gone from the list.
        owned = await claimers[0].entries("accepted", owned_by=claimers[0].member_id)
        assert sorted(e.job_key or "" for e in owned) == sorted(keys_a)
        for key in keys_a:
            claimers[0].record_outcome(key, "succeeded")
        await claimers[0].flush()
        assert len(await claimers[1].entries("succeeded")) == len(keys_a)
        await members[1].join()
        assert (await claimers[1].claim_dead(timeout)).dead_members == []


async def test_a_redis_restart_with_aof_loses_nothing(tmp_path: Path) -> None:
    async with own_redis(tmp_path, appendonly=True) as server:
        fleet = RedisFleet(server.url, name=fleet_name(), command_timeout=0.5)
        async with fleet, opened(fleet, "me") as journal:
            row = await journal.record_intent("/gen", {"prompt": "kept"}, tag="t")
            await journal.record_accepted(row, "KEPT")
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)  # Redis stops (and flushes its AOF)
            await asyncio.wait_for(server.process.wait(), 15)
            with pytest.raises(FleetUnavailableError):
                await journal.entries()
            async with own_redis(tmp_path, appendonly=True, port=server.port):
                deadline = asyncio.get_running_loop().time() + 5
                while True:  # the same pool reconnects once Redis is back
                    try:
                        [entry] = await journal.entries("accepted")
                        break
                    except FleetUnavailableError:
                        assert asyncio.get_running_loop().time() < deadline
                        await asyncio.sleep(0.05)
                assert entry.job_key == "KEPT" and entry.tag == "t"


async def test_a_key_waiting_for_redis_is_not_restored_as_a_second_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis (with AOF) restarts while submits' keys wait to be written (one whose submit's
    write failed at once, then queued as the client queues it, one queued); the member
    rejoins and writes again the rows Redis lost before the keys land. The intents' rows
    survived: each key lands in its own, and is not taken for an earlier job's by a copy of
    that row (the submit raised SubmitUncertainError)."""
    async with own_redis(tmp_path, appendonly=True) as server:
        fleet = RedisFleet(server.url, name=fleet_name(), command_timeout=0.5)
        async with fleet, opened(fleet, "me") as journal:
            awaited = await journal.record_intent("/gen", {"prompt": "paid"}, tag="a")
            queued = await journal.record_intent("/gen", {"prompt": "paid"}, tag="q")
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)  # Redis stops (and flushes its AOF)
            await asyncio.wait_for(server.process.wait(), 15)
            with pytest.raises(FleetUnavailableError):  # one try: the job is paid
                await journal.record_accepted(awaited, "PAID-A")
            journal.record_accepted_later(awaited, "PAID-A")  # as the client does then
            journal.record_accepted_later(queued, "PAID-Q")
            await eventually(lambda: "records wait for Redis" in caplog.text)
            async with own_redis(tmp_path, appendonly=True, port=server.port):
                deadline = asyncio.get_running_loop().time() + 5
                while True:  # the member's rejoin (the same pool reconnects)
                    try:
                        assert await journal.restore() == 0
                        break
                    except FleetUnavailableError:
                        assert asyncio.get_running_loop().time() < deadline
                        await asyncio.sleep(0.01)
                await journal.flush()
                rows = {(e.id, e.state, e.job_key) for e in await journal.entries()}
                assert rows == {(awaited, "accepted", "PAID-A"), (queued, "accepted", "PAID-Q")}


@pytest.mark.long
async def test_close_gives_up_on_a_stalled_redis_within_its_deadline(tmp_path: Path) -> None:
    async with own_redis(tmp_path) as server:
        async with RedisFleet(server.url, name=fleet_name(), command_timeout=0.2) as fleet:
            journal = RedisJournal(fleet, "me")
            await journal.open()
            row = await journal.record_intent("/gen", {"prompt": "x"})
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                for _ in range(5):
                    journal.record_unsent(row, "unsent", "cancelled")
                started = asyncio.get_running_loop().time()
                await journal.close()
                assert asyncio.get_running_loop().time() - started < 0.6
            finally:
                server.process.send_signal(signal.SIGCONT)


@pytest.mark.long
@pytest.mark.parametrize("frozen_s", [0.6, 2.0], ids=["shorter", "longer-than-unavailable-wait"])
async def test_an_intent_write_retried_through_a_frozen_redis_makes_one_row_or_none(
    tmp_path: Path, frozen_s: float
) -> None:
    """Tries that timed out while Redis was frozen still run when it wakes: the retried
    intent makes one row (not a second, phantom intent that would read as uncertain), and an
    intent its submit gave up on makes no open row."""
    async with own_redis(tmp_path) as server:
        fleet = RedisFleet(server.url, name=fleet_name(), command_timeout=0.2, unavailable_wait=1)
        async with fleet:
            journal = RedisJournal(fleet, "me")
            await journal.open()
            await journal.warm()
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            loop = asyncio.get_running_loop()
            thaw = loop.call_later(frozen_s, server.process.send_signal, signal.SIGCONT)
            try:
                row: int | None = await journal.record_intent("/gen", {"prompt": "x"}, tag="t1")
            except FleetUnavailableError:
                row = None
            finally:
                thaw.cancel()
                server.process.send_signal(signal.SIGCONT)
            await asyncio.wait_for(journal.flush(), 10)
            rows = [(e.id, e.state) for e in await journal.entries(tag="t1")]
            await journal.close()
    if frozen_s < 1:
        assert row is not None and rows == [(row, "intent")]
    else:
        assert row is None and all(state == "unsent" for _, state in rows), rows


async def test_a_key_an_earlier_row_holds_is_not_written_on_a_second_row(url: str) -> None:
    """A gateway whose key counter was reset hands an earlier job's key out again. Before:
    the fleet's journal wrote it on the new row too, so the earlier row (still ``accepted``,
    its run stopped) was closed with the new job's outcome and its own images never
    collected. Now the write is refused (False), the new row stays an intent for the submit
    to end ``uncertain``, and the earlier row keeps its key."""
    request = {"prompt": "a fox", "model": "dall-e-2"}
    async with RedisFleet(url, name=fleet_name()) as fleet, opened(fleet, "me") as journal:
        earlier = await journal.record_intent("/gen", request)
        assert await journal.record_accepted(earlier, "KEY-1") is True
        again = await journal.record_intent("/gen", {**request, "prompt": "new"})
        assert await journal.record_accepted(again, "KEY-1") is False
        [intent] = await journal.entries("intent")
        assert intent.id == again and intent.job_key is None
        journal.record_unsent(again, "uncertain", "the key of an earlier job")
        journal.record_outcome("KEY-1", "succeeded")
        await journal.flush()
        rows = {row.id: row for row in await journal.entries()}
        assert (rows[earlier].state, rows[earlier].job_key) == ("succeeded", "KEY-1")
        assert (rows[again].state, rows[again].job_key) == ("uncertain", None)


async def test_a_read_sees_the_records_queued_before_it(url: str) -> None:
    """``record_unsent`` and ``record_outcome`` are queued, not awaited: a read right after
    (``uncertain_submits()`` after a ``SubmitUncertainError``) went to Redis before them, and
    missed the row (as the SQLite journal, whose reads follow its writes, never does)."""
    request = {"prompt": "a fox", "model": "dall-e-2"}
    async with RedisFleet(url, name=fleet_name()) as fleet, opened(fleet, "me") as journal:
        for index in range(30):
            row = await journal.record_intent("/gen", request)
            journal.record_unsent(row, "uncertain", "reply lost")
            assert row in [entry.id for entry in await journal.entries("uncertain")], index
            accepted = await journal.record_intent("/gen", request)
            await journal.record_accepted(accepted, f"KEY-{index}")
            journal.record_outcome(f"KEY-{index}", "succeeded")
            assert accepted in [entry.id for entry in await journal.entries("succeeded")], index
