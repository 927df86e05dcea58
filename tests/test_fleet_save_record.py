"""In fleet mode, saves cut off are found again, as with a SQLite journal: a member killed
while ``job.save()`` downloads paid images leaves its job to the member that claims its rows
(a worker started again is a new member), a member's own save cut off (cancelled) is its own
to resume (and the claimer's once it has closed), a save running in the process is not
returned, and a save that ended (saved, or failed for good) is returned by none.

(Before, the fleet's journal in Redis recorded no save: the row read ``succeeded``, no
member's ``resume()`` returned the job, and the images were lost once their URLs expired.)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from wujie_async import ImageJob, ProtocolError, WujieClient
from wujie_async.fleet import RedisFleet
from wujie_async.fleet._journal import RedisJournal
from wujie_async.fleet._membership import Membership, new_member_id

from .fleet_support import any_redis, fleet_name, own_redis
from .helpers import eventually
from .hostile import image_server, images_at, scripted_gateway
from .test_saving import client_on, names
from .test_saving_resume import held_images, png, until

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]


def fleet_member(base_url: str, redis_url: str, name: str) -> WujieClient:
    """A member that finds a member dead one second after its last heartbeat."""
    fleet = RedisFleet(redis_url, name=name, member_timeout=1.0, lease_seconds=0.5)
    return client_on(base_url, fleet=fleet)


async def states(redis_url: str, name: str) -> dict[str | None, str]:
    """Job key -> state of every row of fleet ``name`` (read as an outside member)."""
    async with RedisFleet(redis_url, name=name) as fleet:
        rows = await RedisJournal(fleet, new_member_id()).entries()
    return {row.job_key: row.state for row in rows}


async def resumed(client: WujieClient) -> list[ImageJob]:
    """What ``resume()`` returns once it returns something (a dead member's rows are
    claimed once its heartbeat is older than ``member_timeout``)."""
    jobs: list[ImageJob] = await eventually(
        client.resume, interval=0.05, timeout=10, what="resume() returned a job"
    )
    return jobs


@pytest.mark.long
async def test_a_member_killed_mid_save_leaves_its_job_to_a_new_member_that_saves_it(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "out"
    name = fleet_name()
    async with (
        any_redis(tmp_path) as redis_url,
        held_images() as images,
        scripted_gateway(images_at(images.url(0), images.url(1))) as gateway,
    ):
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.save_child", gateway.base_url, str(folder), "fleet",
            redis_url, name, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            assert child.stdout is not None
            said = (await asyncio.wait_for(child.stdout.readline(), 20)).decode().split()
            assert said[:1] == ["saving"], said
            key = said[1]
            exited = asyncio.ensure_future(child.wait())
            # Both downloads began (after the save's record, awaited), and the row reads
            # succeeded: what left every resume() nothing to do.
            await until(images, lambda: len(images.asked) == 2, alive=exited)
            assert await eventually(
                lambda: _state_is(redis_url, name, key, "succeeded"),
                interval=0.02, what="the job's row recorded succeeded",
            )  # fmt: skip
            child.send_signal(signal.SIGKILL)
            assert await exited == -signal.SIGKILL
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        images.held = False
        images.released.set()  # the killed child's downloads end
        # A worker started again is a new member: it claims the dead one's save.
        async with fleet_member(gateway.base_url, redis_url, name) as client:
            [job] = await resumed(client)
            assert job.key == key
            saved = await job.save(folder)
            assert await client.resume() == []  # the save ended: nothing left
    assert [image.index for image in saved] == [0, 1]
    for image in saved:
        assert image.path.read_bytes() == png(image.index)
        assert image.sha256 == hashlib.sha256(png(image.index)).hexdigest()


async def _state_is(redis_url: str, name: str, key: str, state: str) -> bool:
    return (await states(redis_url, name)).get(key) == state


def three_jobs(held: str, fine: str, gone: str) -> Any:
    """A batch script: K00000's image is at ``held``, K00001's at ``fine``, others' ``gone``."""
    where = {"K00000": held, "K00001": fine}

    def script(keys: list[str]) -> list[dict[str, Any]]:
        return [
            {"key": key, "status": 4, "images": [{"url": where.get(key, gone)}]} for key in keys
        ]

    return script


async def test_a_members_cancelled_save_is_its_own_cut_off_save_not_while_it_runs(
    tmp_path: Path,
) -> None:
    """The member's own save cut off (cancelled) is returned by its own resume(), the job
    it holds; a save running in the process is not returned meanwhile, and a save that ended
    leaves nothing."""
    name = fleet_name()
    async with (
        any_redis(tmp_path) as redis_url,
        held_images() as held,
        image_server() as images,
        scripted_gateway(three_jobs(held.url(0), images.url("png"), images.url("gone"))) as gw,
        fleet_member(gw.base_url, redis_url, name) as client,
        RedisFleet(redis_url, name=name) as fleet,
    ):
        own = RedisJournal(fleet, client.fleet_member or "")
        job = await client.images.submit(prompt="p", model="dall-e-2")
        saving = asyncio.ensure_future(job.save(tmp_path / "out"))
        await until(held, lambda: held.asked[0] == 1, alive=saving)
        # Recorded before the download began (the row reads so once the job's own outcome,
        # queued as it ended, has landed); but a save in progress here is not handed out.
        assert await eventually(lambda: _cut_off(own, job.key), what="the row succeeded")
        assert await client.resume() == []
        saving.cancel()  # a web request dropped, a caller's timeout
        with pytest.raises(asyncio.CancelledError):
            await saving
        assert await _cut_off(own, job.key)
        assert await client.resume() == [job]
        held.held = False
        [saved] = await job.save(tmp_path / "out")
        assert await eventually(lambda: _no_saves_cut_off(own), what="the save's end recorded")
        assert await client.resume() == []
    assert saved.path.read_bytes() == png(0)


async def _no_saves_cut_off(journal: RedisJournal) -> bool:
    return await journal.saves_cut_off() == []


async def _cut_off(journal: RedisJournal, key: str) -> bool:
    """``key``'s job is the one save cut off of the journal's member."""
    return [row.job_key for row in await journal.saves_cut_off()] == [key]


async def test_saves_that_ended_are_returned_by_no_member_and_one_cut_off_is(
    tmp_path: Path,
) -> None:
    """Saved, failed for good (an expired image), cut off (cancelled): the member closes
    (it leaves: its rows are claimable at once), and the one that claims them gets only the
    save cut off."""
    name = fleet_name()
    async with (
        any_redis(tmp_path) as redis_url,
        held_images() as held,
        image_server() as images,
        scripted_gateway(three_jobs(held.url(0), images.url("png"), images.url("gone"))) as gw,
    ):
        async with fleet_member(gw.base_url, redis_url, name) as first:
            cut, fine, failed = [
                await first.images.submit(prompt=f"p{i}", model="dall-e-2") for i in range(3)
            ]
            saving = asyncio.ensure_future(cut.save(tmp_path / "out"))
            await until(held, lambda: held.asked[0] == 1, alive=saving)
            await fine.save(tmp_path / "out")
            with pytest.raises(ProtocolError, match="404"):  # told once, for good
                await failed.save(tmp_path / "out")
            saving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await saving
        held.held = False
        async with fleet_member(gw.base_url, redis_url, name) as second:
            [job] = await resumed(second)
            assert job.key == cut.key
            await job.save(tmp_path / "out")
            assert await second.resume() == []
    assert names(tmp_path / "out") == [f"{cut.key}-0.png", f"{fine.key}-0.png"]


@pytest.mark.long
async def test_a_save_goes_on_when_redis_stops_answering_and_is_recorded_once_it_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = fleet_name()
    async with (
        own_redis(tmp_path) as server,
        image_server() as images,
        scripted_gateway(images_at(images.url("png"))) as gw,
        client_on(gw.base_url, fleet=RedisFleet(server.url, name=name)) as client,
        RedisFleet(server.url, name=name) as fleet,
    ):
        assert server.process is not None
        job = await client.images.submit(prompt="p", model="dall-e-2")
        await job
        server.process.send_signal(signal.SIGSTOP)  # a frozen Redis: nothing answers
        try:
            with caplog.at_level(logging.WARNING, logger="wujie_async"):
                async with asyncio.timeout(3.5):  # the record's 2 s, then the download
                    [saved] = await job.save(tmp_path / "out")
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert saved.path.read_bytes() == png(0)
        assert any("is not recorded yet" in r.getMessage() for r in caplog.records)
        # The record landed once Redis answered, and the save's end after it: nothing left.
        own = RedisJournal(fleet, client.fleet_member or "")
        assert await eventually(lambda: _no_saves_cut_off(own), what="the save's end recorded")


async def test_a_dead_members_saves_cut_off_go_to_one_claimer_and_ended_ones_to_none(
    tmp_path: Path,
) -> None:
    """claim_dead hands a dead member's saves that never ended to one claimer, in the atomic
    script that hands out its accepted rows; a save it ended stays ended, a forgotten row is
    gone from the claimer's list."""
    timeout = 0.3
    async with (
        any_redis(tmp_path) as url,
        RedisFleet(url, name=fleet_name(), member_timeout=timeout) as fleet,
    ):
        dead = Membership(fleet, new_member_id())
        await dead.join()
        keys = [f"PAID{i}" for i in range(6)]
        writer = RedisJournal(fleet, dead.member_id)
        await writer.open()
        try:
            for key in keys:
                row = await writer.record_intent("generations", {"prompt": key})
                await writer.record_accepted(row, key)
                writer.record_outcome(key, "succeeded")
                await writer.record_save_asked(key)
            writer.record_save_ended(keys[0])  # saved: nobody's to resume
            assert {e.job_key for e in await writer.saves_cut_off()} == set(keys[1:])
        finally:
            await writer.close()
        heirs = [Membership(fleet, new_member_id()) for _ in range(2)]

        async def dead_expired() -> bool:
            for heir in heirs:
                await heir.join()  # live members, as their heartbeats would keep them
            return (await heirs[0].members())[dead.member_id] > timeout

        await eventually(dead_expired, interval=0.05, what="the member's heartbeat expired")
        journals = [RedisJournal(fleet, heir.member_id) for heir in heirs]
        claims = await asyncio.gather(*(journal.claim_dead() for journal in journals))
        assert sorted(len(claim.dead_members) for claim in claims) == [0, 1]
        lists = [[e.job_key for e in await journal.saves_cut_off()] for journal in journals]
        assert sorted(lists, key=len) == [[], keys[1:]]  # all to one claimer, oldest first
        heir = journals[0] if lists[0] else journals[1]
        [gone] = [e.id for e in await heir.saves_cut_off() if e.job_key == keys[1]]
        assert await heir.forget([gone]) == 1
        assert [e.job_key for e in await heir.saves_cut_off()] == keys[2:]


async def test_a_save_ending_after_its_journal_closed_is_said_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with any_redis(tmp_path) as url, RedisFleet(url, name=fleet_name()) as fleet:
        journal = RedisJournal(fleet, new_member_id())
        await journal.open()
        await journal.close()
        with caplog.at_level(logging.WARNING, logger="wujie_async.fleet"):
            journal.record_save_ended("PAIDKEY")  # a save that succeeded must not raise
    assert any("save was not recorded" in r.getMessage() for r in caplog.records)
