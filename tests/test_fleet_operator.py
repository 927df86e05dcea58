"""The fleet as an operator sees it: a Redis URL with an unreadable database refused, who
leads and how many keys are open, and a member told that the fleet gave its jobs away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from wujie_async import Credentials, InvalidRequestError, WujieClient
from wujie_async.fleet import RedisFleet
from wujie_async.testing import INSTANT_RETRY

from .conftest import FAST_POLL, EmulatorFactory
from .fleet_support import any_redis, emulator_process, fleet_name, fleet_of, forget_fleet, member
from .helpers import eventually, reported_locals, stop_process

pytestmark = pytest.mark.anyio


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    async with any_redis(tmp_path) as redis_url:
        yield redis_url


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret@127.0.0.1:6379/x",
        "redis://:s3cret@127.0.0.1:6379/1x",
        "rediss://:s3cret@127.0.0.1:6379/-1",
        "redis://:s3cret@127.0.0.1:6379/0/1",
        "redis://:s3cret@127.0.0.1:6379/%20",
    ],
)
def test_a_path_that_is_not_a_database_number_is_refused(url: str) -> None:
    # redis-py reads the path as the database and drops what it cannot read: redis://h/x used
    # database 0 without a word, though ?db=x was refused.
    with pytest.raises(InvalidRequestError) as caught:
        RedisFleet(url, name="x")
    assert caught.value.field == "url"
    assert "database number" in str(caught.value)
    for shown in (str(caught.value), repr(caught.value), *reported_locals(caught.value)):
        assert "s3cret" not in shown
    # A database number (percent-encoded too: redis-py reads it so), or no path, is fine.
    base = url.split("/")[:3]
    for path in ("", "/", "/15", "/%32"):
        RedisFleet("/".join(base) + path, name="x")


@pytest.mark.long
async def test_stats_say_who_leads_and_how_many_keys_are_open(
    url: str, emulator: EmulatorFactory
) -> None:
    # Only the leader's own log said it led ("leads shard 0"), and leader_keys counts every
    # key polled so far, not the keys open now.
    name = fleet_name()
    async with (
        emulator(time_scale=0.2) as emu,
        member(emu, url, name) as a,
        member(emu, url, name) as b,
    ):
        ids = {a.fleet_member, b.fleet_member}

        def one_leader_seen_by_both() -> bool:
            seen = {fleet_of(a).leaders, fleet_of(b).leaders}
            leading = [c.fleet_member for c in (a, b) if fleet_of(c).role == "leader"]
            return len(seen) == 1 and seen.pop() == tuple(leading) and leading[0] in ids

        await eventually(one_leader_seen_by_both)
        assert fleet_of(a).open_keys == fleet_of(b).open_keys == 0
        jobs = [await a.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(3)]
        assert fleet_of(a).open_keys == 3 and fleet_of(b).open_keys == 0
        await asyncio.wait_for(asyncio.gather(*jobs), 30)
        assert fleet_of(a).open_keys == 0


@pytest.mark.long
async def test_a_member_redis_forgot_is_not_said_to_be_declared_dead(
    url: str, emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # After a FLUSHALL the member said "declared dead (no heartbeat for 30s) or forgotten by
    # Redis": it had heartbeaten all along, and its rows, written again, tell which it was.
    caplog.set_level(logging.WARNING, "wujie_async.fleet")
    name = fleet_name()
    async with (
        emulator(time_scale=0.3) as emu,
        RedisFleet(url, name=name) as observer,
        member(emu, url, name) as a,
    ):
        jobs = [await a.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(3)]
        assert await forget_fleet(observer)
        await eventually(lambda: "joined again" in caplog.text)
        assert "forgotten by Redis (a FLUSHALL" in caplog.text
        assert "declared dead" not in caplog.text
        await asyncio.wait_for(asyncio.gather(*jobs), 30)
        assert fleet_of(a).jobs_claimed_by_others == 0


# A queue consumer's worker in its own process: it submits, then says for each job, as the
# job ends (where it would publish the result), whether another member claimed it.
_WORKER = """
import asyncio, json, logging, sys
from wujie_async import Credentials, WujieClient
from wujie_async.fleet import RedisFleet
from wujie_async.testing import INSTANT_RETRY

def say(**event):
    sys.stdout.write(json.dumps(event) + "\\n")
    sys.stdout.flush()

async def main(url, name, creds, n):
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    data = json.load(open(creds))
    fleet = RedisFleet(url, name=name, member_timeout=1.5, lease_seconds=0.5)
    client = WujieClient(
        Credentials(app_id=data["app_id"], private_key=data["private_key"]),
        base_url=data["base_url"], retry=INSTANT_RETRY, fleet=fleet,
    )
    async with client:
        def ended(job):
            say(ended=job.key, claimed=job.key in client.stats.fleet.keys_claimed_by_others)

        jobs = [await client.images.submit(prompt=str(i), model="dall-e-2") for i in range(n)]
        for job in jobs:
            job.add_done_callback(ended)
        say(submitted=[job.key for job in jobs])
        await asyncio.gather(*jobs, return_exceptions=True)
        say(claimed_by_others=client.stats.fleet.jobs_claimed_by_others)
        await asyncio.to_thread(sys.stdin.readline)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


async def _event(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line, "the worker exited"
    event: dict[str, Any] = json.loads(line)
    return event


@pytest.mark.long
async def test_a_frozen_member_knows_which_of_its_jobs_another_member_claimed(
    url: str, tmp_path: Path
) -> None:
    # A worker frozen (SIGSTOP) past member_timeout: another member's resume() claims its
    # jobs and resolves them. Woken, the worker went on and resolved them too, told nothing:
    # a queue consumer published every result twice. Now each job, as it ends there, is
    # among the worker's keys_claimed_by_others, though the leader's reports about it were
    # waiting when it woke.
    name = fleet_name()
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    extra = ("--job-seconds", "1.5,2")
    async with emulator_process(tmp_path, "emu", time_scale=1.0, extra=extra) as emu:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, str(script), url, name, emu["file"], "3",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        survivor = WujieClient(
            Credentials(app_id=emu["app_id"], private_key=emu["private_key"]),
            base_url=emu["base_url"],
            poll=FAST_POLL,
            retry=INSTANT_RETRY,
            fleet=RedisFleet(url, name=name, member_timeout=1.5, lease_seconds=0.5),
        )
        try:
            async with survivor:
                keys = set((await _event(worker))["submitted"])
                worker.send_signal(signal.SIGSTOP)
                claimed = await eventually(survivor.resume, timeout=20)
                assert {job.key for job in claimed} == keys
                await asyncio.wait_for(asyncio.gather(*claimed), 20)
                worker.send_signal(signal.SIGCONT)
                ends = [await _event(worker) for _ in keys]
                assert {end["ended"] for end in ends} == keys
                assert all(end["claimed"] for end in ends), ends
                assert (await _event(worker))["claimed_by_others"] == 3
                assert fleet_of(survivor).jobs_claimed_by_others == 0
        finally:
            with contextlib.suppress(ProcessLookupError):  # exited already
                worker.send_signal(signal.SIGCONT)
            _, err = await stop_process(worker)
        assert "other members claimed 3 of its jobs" in err.decode()
