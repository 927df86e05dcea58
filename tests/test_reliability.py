"""Faults, limits, cancellation, the journal and crash recovery, against the emulator."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from wujie_async import (
    ClientStateError,
    ImageJob,
    JobFailedError,
    Limits,
    PollPolicy,
    RetryPolicy,
    SubmitUncertainError,
    WujieClient,
    WujieError,
)
from wujie_async.emulator import FaultConfig

from .conftest import EmulatorFactory, make_client
from .helpers import eventually, stray_tasks

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
FAULT_RETRY = RetryPolicy(initial_wait=0.01, max_wait=1.0, max_attempts=10)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("count", "time_scale"), [(2_000, 0.005), (20_000, 0.002)], ids=["2k", "20k"]
)
async def test_journaled_jobs_through_every_fault(
    emulator: EmulatorFactory, tmp_path: Path, count: int, time_scale: float
) -> None:
    """Issue 9 "done when": the fault mix at volume: 0 hung, 0 paid twice, all accounted for."""
    faults = FaultConfig(
        http_5xx=0.05,
        drop_connection=0.01,
        drop_after_accept=0.01,
        burst_429=30,
        retry_after_s=1,
        html_reply=0.02,
        business_error=0.02,  # lock races (code 20010018): resent, never paid twice
        absent_jobs=0.1,
        absent_s=0.3,
        duplicate_entries=0.1,
        shuffle_entries=True,
        unknown_status=0.05,
        fail_jobs=0.02,
    )
    before = asyncio.all_tasks()
    async with emulator(faults=faults, time_scale=time_scale) as emu:
        client = make_client(emu, retry=FAULT_RETRY, journal=tmp_path / "jobs.sqlite")
        async with client:

            async def submit(index: int) -> ImageJob | BaseException:
                try:
                    return await client.images.submit(prompt=f"job {index}", model="dall-e-2")
                except WujieError as exc:
                    return exc

            half = count // 2
            submitted = await asyncio.gather(*(submit(i) for i in range(half)))
            emu.set_faults(replace(faults, burst_429=20))  # a second 429 burst, mid-run
            submitted += await asyncio.gather(*(submit(i) for i in range(half, count)))
            jobs = [s for s in submitted if isinstance(s, ImageJob)]
            await asyncio.wait_for(
                asyncio.gather(*(job.result() for job in jobs), return_exceptions=True), 50
            )
            assert all(job.done() for job in jobs)  # 0 hung
            uncertain_rows = await client.uncertain_submits()
        assert stray_tasks(before) == set()

        stats = emu.stats(timelines=False)
        store = emu.gateway.store.jobs
        errors = [s for s in submitted if not isinstance(s, ImageJob)]
        uncertain = [e for e in errors if isinstance(e, SubmitUncertainError)]
        # Every submit error is typed; every uncertain one carries its request.
        assert all(isinstance(e, WujieError) for e in errors)
        assert all(e.request["prompt"].startswith("job ") for e in uncertain)
        # Nothing silently lost: each accepted job is known, or its submit was reported uncertain.
        known = {job.key for job in jobs}
        assert known <= set(store)
        lost_replies = stats["faults"].get("drop_after_accept", 0)
        assert stats["submits_accepted"] == len(known) + lost_replies
        assert len(uncertain) >= lost_replies
        assert len(uncertain_rows) == len(uncertain)
        # Nothing paid twice: no prompt was accepted more than once.
        prompts = Counter(job.prompt for job in store.values())
        assert max(prompts.values()) == 1
        # Every job ended as the emulator's own record says it should.
        for job in jobs:
            truth, error = store[job.key].outcome, job.exception()
            if truth == 4:
                assert error is None, (job.key, error)
                assert len(job.images) == 1
            else:
                assert isinstance(error, JobFailedError) and truth == 3, (job.key, error)
        assert stats["faults"]["burst_429"] == 50
        for fault in ("http_5xx", "html_reply", "drop_connection", "duplicate_entries"):
            assert stats["faults"].get(fault, 0) > 0, fault
        assert stats["faults"].get("unknown_status", 0) > 0


@pytest.mark.long
@pytest.mark.fake_clock
async def test_adaptive_rate_limiting(emulator: EmulatorFactory) -> None:
    poll = PollPolicy(first_poll_delay=0.3, min_interval=0.3, max_interval=1.0)
    async with emulator(rate_limit_rps=100, time_scale=0.01) as emu:
        async with make_client(emu, poll=poll, retry=FAULT_RETRY) as client:
            run = asyncio.gather(
                *(client.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(500))
            )
            await asyncio.sleep(1.0)
            first_ones = client.stats.rate_limited
            first_requests = emu.stats()["requests"]["generations"]
            await asyncio.gather(*await run)
            later_ones = client.stats.rate_limited - first_ones
            later_requests = emu.stats()["requests"]["generations"] - first_requests
        # The first burst draws 429s (at most one per submit slot). After it the brake holds
        # the rate near what the gateway lets through: it cuts once more than 10% of replies
        # over a few seconds are 429s, so the share of 429s stays about there, never a storm.
        assert client.stats.rate_limited == emu.stats()["faults"]["rate_limited"]
        assert 0 < first_ones <= client.limits.max_concurrent_submits + 5, first_ones
        assert later_ones <= 0.15 * later_requests, (later_ones, later_requests)
    async with emulator(rate_limit_rps=100, time_scale=0.01) as emu:
        limits = Limits(max_submits_per_second=60)
        async with make_client(emu, poll=poll, limits=limits) as client:
            jobs = await asyncio.gather(
                *(client.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(500))
            )
            await asyncio.gather(*jobs)
            assert client.stats.rate_limited == 0
        assert emu.stats()["faults"].get("rate_limited", 0) == 0


async def test_stats_show_the_429_brake_rate_of_each_kind_of_call(
    emulator: EmulatorFactory,
) -> None:
    # Half the submits are refused with 429 (a sustained share: the submit brake cuts in);
    # batch queries never are, so their own brake stays off.
    faults = FaultConfig(http_429=0.5, retry_after_s=0, endpoints=frozenset({"generations"}))
    async with emulator(faults=faults) as emu:
        async with make_client(emu) as client:
            assert client.stats.submit_rate_limit is None
            assert client.stats.poll_rate_limit is None
            for index in range(60):
                await client.images.submit(prompt=f"{index}", model="dall-e-2")
                if client.stats.submit_rate_limit is not None:
                    break
            stats = client.stats
            assert stats.rate_limited >= 5
            assert stats.submit_rate_limit is not None and stats.submit_rate_limit > 0
            assert stats.poll_rate_limit is None


@pytest.mark.long
async def test_max_in_flight_bounds_outstanding_jobs(emulator: EmulatorFactory) -> None:
    async with emulator(time_scale=0.005) as emu:
        async with make_client(emu, limits=Limits(max_in_flight=20)) as client:
            peak = 0
            done = asyncio.Event()

            async def watch() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, client.stats.jobs_outstanding)
                    await asyncio.sleep(0.002)

            watcher = asyncio.create_task(watch())
            jobs = await asyncio.gather(
                *(client.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(200))
            )
            await asyncio.gather(*jobs)
            done.set()
            await watcher
            assert 0 < peak <= 20


@pytest.mark.long
async def test_cancelling_generate_cancels_the_submit_cleanly(
    emulator: EmulatorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    faults = FaultConfig(slow_reply=1.0, slow_reply_s=5.0, endpoints=frozenset({"generations"}))
    journal = tmp_path / "jobs.sqlite"
    async with emulator(faults=faults) as emu:
        client = make_client(emu, limits=Limits(max_in_flight=1), journal=journal)
        async with client:
            task = asyncio.create_task(client.images.generate(prompt="slow", model="dall-e-2"))
            await eventually(
                lambda: emu.stats()["faults"].get("slow_reply"), what="the submit on the wire"
            )
            with caplog.at_level("WARNING", logger="wujie_async"):
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            # Its caller is gone: the log is where anyone hears it may have been paid for.
            said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
            assert any(
                "cancelled by its caller while on the wire" in line
                and "may have accepted (and charged)" in line
                and "journal lists it as uncertain" in line
                for line in said
            ), said
            emu.set_faults(FaultConfig())
            # The in-flight slot was given back: another submit gets through.
            result = await client.images.generate(prompt="fast", model="dall-e-2")
            assert result.status == 4
            uncertain = await client.uncertain_submits()
        assert [row.request["prompt"] for row in uncertain] == ["slow"]


@pytest.mark.parametrize("stop", ["aclose", "stop_submitting"])
async def test_a_submit_waiting_to_retry_after_a_429_ends_unsent_when_stopped(
    emulator: EmulatorFactory, tmp_path: Path, stop: str
) -> None:
    """A 429 refused the submit outright, so while it waits for its retry nothing is on the
    wire: closing the client (or stop_submitting) ends it as not sent, never as "may have
    been charged", and the journal keeps it resendable."""
    faults = FaultConfig(http_429=1.0, retry_after_s=30, endpoints=frozenset({"generations"}))
    journal = tmp_path / "jobs.sqlite"
    retry = RetryPolicy(max_attempts=5, initial_wait=0.01, max_wait=60, max_elapsed=120)
    async with emulator(faults=faults) as emu:
        client = make_client(emu, journal=journal, retry=retry)
        async with client:
            submit = asyncio.create_task(client.images.submit(prompt="later", model="dall-e-2"))
            await eventually(lambda: emu.stats()["faults"].get("http_429", 0) >= 1, what="a 429")
            if stop == "aclose":
                await client.aclose()
            else:
                client.stop_submitting()
            with pytest.raises(ClientStateError, match=r"nothing was sent"):
                await asyncio.wait_for(submit, 10)
            if stop == "stop_submitting":
                assert await client.uncertain_submits() == []
        assert emu.stats()["requests"]["generations"] == 1
    with sqlite3.connect(journal) as db:
        assert db.execute("SELECT state FROM submits").fetchall() == [("unsent",)]


@pytest.mark.long
async def test_journal_records_intent_before_sending_and_key_before_returning(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    journal = tmp_path / "jobs.sqlite"
    faults = FaultConfig(slow_reply=1.0, slow_reply_s=0.5, endpoints=frozenset({"generations"}))

    def rows() -> list[tuple[Any, ...]]:
        with sqlite3.connect(journal) as db:
            return db.execute("SELECT state, job_key, request FROM submits").fetchall()

    async with emulator(faults=faults) as emu, make_client(emu, journal=journal) as client:
        submit = asyncio.create_task(client.images.submit(prompt="fox", model="dall-e-2"))
        await asyncio.sleep(0.2)  # the request is at the emulator, its reply held back
        assert emu.stats()["requests"]["generations"] == 1
        [(state, key, request)] = rows()
        assert state == "intent" and key is None and json.loads(request)["prompt"] == "fox"
        job = await submit
        assert rows()[0][:2] == ("accepted", job.key)  # durable before submit() returned
        await job
    assert rows()[0][:2] == ("succeeded", job.key)
    with sqlite3.connect(journal) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.long
async def test_journal_batches_its_writes(emulator: EmulatorFactory, tmp_path: Path) -> None:
    async with emulator() as emu:
        client = make_client(emu, journal=tmp_path / "jobs.sqlite")
        async with client:
            jobs = await asyncio.gather(
                *(client.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(1000))
            )
            await asyncio.gather(*jobs)
        # 1,000 intents + 1,000 keys + 1,000 outcomes, in far fewer transactions.
        assert 0 < client.stats.journal_commits < 1000, client.stats


@pytest.mark.long
async def test_the_journals_write_ahead_log_stays_small(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    # Folded into the file every 1,000 pages (SQLite's default), it grew to megabytes: 2.8 MB
    # for 120 submits on a nearly full disk, past the room the command line sets aside.
    wal = tmp_path / "jobs.sqlite-wal"
    largest = 0
    async with emulator() as emu, make_client(emu, journal=tmp_path / "jobs.sqlite") as client:
        for index in range(300):  # one at a time: a transaction each
            await client.images.submit(prompt=f"{index}", model="dall-e-2")
            largest = max(largest, wal.stat().st_size if wal.exists() else 0)
    assert 0 < largest < 1_200_000, largest


async def test_resume_and_uncertain_need_a_journal(emulator: EmulatorFactory) -> None:
    async with emulator() as emu, make_client(emu) as client:
        with pytest.raises(ClientStateError, match="journal"):
            await client.resume()


async def _emulator_stats(base_url: str) -> dict[str, Any]:
    origin = base_url.removesuffix("/wj-open/v1")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{origin}/_emulator/stats") as reply:
            return await reply.json()  # type: ignore[no-any-return]


@pytest.mark.slow
async def test_crash_and_resume(tmp_path: Path) -> None:
    creds_path, journal = tmp_path / "creds.json", tmp_path / "jobs.sqlite"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wujie_async.emulator", "--port", "0",
        "--credentials-out", str(creds_path), "--time-scale", "0.05",
        "--slow-reply", "1.0", "--slow-reply-s", "0.01",
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    child = None
    try:
        assert server.stdout is not None
        await asyncio.wait_for(server.stdout.readline(), 20)
        base_url = json.loads(creds_path.read_text())["base_url"]
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.crash_child", str(creds_path), str(journal), "400",
            cwd=ROOT, env=env,
        )  # fmt: skip

        async def sixty_accepted() -> bool:
            return int((await _emulator_stats(base_url))["submits_accepted"]) >= 60

        await eventually(
            sixty_accepted, interval=0.02, what="60 submits", alive=lambda: child.returncode is None
        )
        child.send_signal(signal.SIGKILL)
        await child.wait()
        before = await _emulator_stats(base_url)
        accepted_keys = set(before["timelines"])
        assert 60 <= len(accepted_keys) < 400  # killed mid-run

        creds = json.loads(creds_path.read_text())
        from wujie_async import Credentials

        credentials = Credentials(creds["app_id"], creds["private_key"])
        async with WujieClient(credentials, base_url=base_url, journal=journal) as client:
            resumed = await client.resume()
            uncertain = await client.uncertain_submits()
            results = await asyncio.gather(*(job.result(timeout=60) for job in resumed))
        assert all(result.status == 4 for result in results)
        with sqlite3.connect(journal) as db:
            journaled = {key for (key,) in db.execute("SELECT job_key FROM submits") if key}
        # Every key the emulator accepted is in the journal, except submits whose reply the kill
        # cut off, and those are each reported as uncertain.
        assert journaled <= accepted_keys
        assert len(accepted_keys - journaled) <= len(uncertain)
        assert {job.key for job in resumed} <= journaled
        after = await _emulator_stats(base_url)
        assert after["submits_accepted"] == before["submits_accepted"]  # nothing resubmitted
    finally:
        if child is not None and child.returncode is None:
            child.kill()
            await child.wait()
        server.terminate()
        await server.wait()


async def test_a_journal_that_cannot_open_fails_fast(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    async with emulator() as emu:
        client = make_client(emu, journal=tmp_path / "missing-dir" / "jobs.sqlite")
        with pytest.raises(ClientStateError, match="cannot open journal"):
            await asyncio.wait_for(client.open(), 10)
        await asyncio.wait_for(client.aclose(), 10)  # nothing to close, nothing hangs
