"""A journal row remembers which gateway (base URL and app id) took its submit: a client of
another gateway leaves it alone, and a client of its own gateway collects it."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from wujie_async import Credentials, JournalFile, UnknownJobError, WujieClient
from wujie_async._gateway_identity import shown_base_url
from wujie_async.emulator import Emulator, EmulatorConfig

from .conftest import FAST_POLL, INSTANT_RETRY, EmulatorFactory, make_client
from .helpers import SteppedClock
from .hostile import throwaway_credentials

pytestmark = pytest.mark.anyio

# The table as journals before gateways were recorded made it.
_OLD_SCHEMA = """
CREATE TABLE submits (
    id       INTEGER PRIMARY KEY,
    path     TEXT NOT NULL,
    request  TEXT NOT NULL,
    state    TEXT NOT NULL,
    job_key  TEXT,
    tag      TEXT,
    error    TEXT,
    created  REAL NOT NULL,
    updated  REAL NOT NULL
);
CREATE INDEX submits_state ON submits(state);
CREATE INDEX submits_key ON submits(job_key);
CREATE INDEX submits_tag ON submits(tag);
"""


def _states(journal: Path) -> dict[str, str]:
    with sqlite3.connect(journal) as db:
        return dict(db.execute("SELECT job_key, state FROM submits").fetchall())


@asynccontextmanager
async def two_gateways(clock: SteppedClock) -> AsyncIterator[tuple[Emulator, Emulator]]:
    """Gateways A (its jobs run only as ``clock`` moves) and B, the same account on both."""
    async with (
        Emulator(EmulatorConfig(time_scale=0.005, seed=7), clock=clock) as gateway_a,
        Emulator(EmulatorConfig(time_scale=0.005, seed=7)) as gateway_b,
    ):
        gateway_b.register(gateway_a.credentials)
        yield gateway_a, gateway_b


async def _submit_frozen(emu: Emulator, journal: Path) -> str:
    """A job accepted by ``emu`` (whose clock stands still: it runs until the test moves it),
    journaled; the client closed."""
    async with make_client(emu, journal=journal) as submitter:
        job = await submitter.images.submit(prompt="a paid fox", model="dall-e-2")
    assert _states(journal) == {job.key: "accepted"}
    return job.key


async def test_resume_leaves_the_jobs_of_another_base_url_to_a_client_of_theirs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A journal's accepted (paid) rows, resumed by a client of another base URL (staging for
    production, a changed WUJIE_BASE_URL), were asked of a gateway that does not know them:
    each ended failed ("unknown key"), its images never collected, a bulk re-run's line
    ready to be paid for again. They are left accepted now, for a client of their gateway."""
    journal = tmp_path / "jobs.sqlite"
    clock = SteppedClock()
    async with two_gateways(clock) as (gateway_a, gateway_b):
        key = await _submit_frozen(gateway_a, journal)

        caplog.set_level(logging.WARNING, logger="wujie_async")
        async with make_client(
            gateway_b, journal=journal, base_url=gateway_b.base_url
        ) as elsewhere:
            assert await elsewhere.resume() == []
            # A queue consumer calls resume() every few seconds: the same rows are said once.
            assert await elsewhere.resume() == []
            [entry] = await elsewhere.journal_entries()
            assert entry.base_url == gateway_a.base_url
        assert _states(journal) == {key: "accepted"}
        [warning] = [r.getMessage() for r in caplog.records if "resume" in r.getMessage()]
        assert "1 accepted job(s)" in warning and gateway_a.base_url in warning, warning
        assert gateway_b.base_url in warning and "with a client of that gateway" in warning
        assert gateway_b.stats()["submits_accepted"] == 0

        async with make_client(gateway_a, journal=journal) as home:
            [job] = await home.resume()
            assert job.key == key
            clock.advance(30)  # the job runs to its end (well within the signature's window)
            assert (await job.result(timeout=30)).status == 4
        assert _states(journal) == {key: "succeeded"}


async def test_resume_leaves_the_jobs_of_another_app_id_at_the_same_base_url(
    emulator: EmulatorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second account on the same gateway does not know the first one's keys either."""
    journal = tmp_path / "jobs.sqlite"
    async with emulator(clock=SteppedClock()) as emu:
        key = await _submit_frozen(emu, journal)
        other = Credentials("another-app", throwaway_credentials().private_key)
        emu.register(other)
        caplog.set_level(logging.WARNING, logger="wujie_async")
        async with WujieClient(
            other, base_url=emu.base_url, journal=journal, poll=FAST_POLL, retry=INSTANT_RETRY
        ) as second:
            assert await second.resume() == []
        assert _states(journal) == {key: "accepted"}
        [warning] = [r.getMessage() for r in caplog.records if "resume" in r.getMessage()]
        assert "another app id" in warning and emu.base_url in warning, warning
        assert other.private_key not in warning
        async with make_client(emu, journal=journal) as home:
            [job] = await home.resume()
            assert job.key == key


async def test_a_journal_of_the_old_schema_migrates_and_its_rows_resume_as_before(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """A journal written before rows named their gateway opens (its table gains the two
    columns), and its accepted rows, of no known gateway, are resumed by any client."""
    journal = tmp_path / "old.sqlite"
    async with emulator() as emu:
        async with make_client(emu) as plain:
            job = await plain.images.submit(prompt="an old fox", model="dall-e-2")
        request = '{"prompt": "an old fox", "model": "dall-e-2"}'
        with sqlite3.connect(journal) as db:
            db.executescript(_OLD_SCHEMA)
            now = time.time()
            db.execute(
                "INSERT INTO submits (path, request, state, job_key, tag, created, updated)"
                " VALUES (?, ?, 'accepted', ?, 'line:1:x', ?, ?)",
                ("/generations", request, job.key, now, now),
            )
        async with JournalFile(journal, read_only=True) as reader:  # before any migration
            [old] = await reader.entries()
            assert old.job_key == job.key and old.base_url is None
        async with make_client(emu, journal=journal) as client:
            [resumed] = await client.resume()
            assert resumed.key == job.key
            assert (await resumed.result(timeout=30)).status == 4
            new = await client.images.submit(prompt="a new fox", model="dall-e-2")
            await new
            rows = {row.job_key: row for row in await client.journal_entries()}
        assert rows[job.key].state == "succeeded" and rows[job.key].base_url is None
        assert rows[new.key].base_url == emu.base_url
        assert rows[new.key].gateway_fingerprint is not None
        with sqlite3.connect(journal) as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(submits)")}
        assert {"base_url", "gateway"} <= columns


async def test_a_password_in_a_recorded_base_url_is_never_shown(
    emulator: EmulatorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients refuse a base URL with user:password@, but a journal file may hold anything
    (written by hand, or by another program): resume's WARNING shows it redacted."""
    assert shown_base_url("https://me:s3cret@api.example/v1") == "https://me:***@api.example/v1"
    assert shown_base_url("https://t0ken@api.example/v1") == "https://***@api.example/v1"
    assert shown_base_url("https://api.example/v1") == "https://api.example/v1"
    journal = tmp_path / "jobs.sqlite"
    async with emulator(clock=SteppedClock()) as emu:
        key = await _submit_frozen(emu, journal)
        with sqlite3.connect(journal) as db:
            db.execute(
                "UPDATE submits SET base_url = 'https://me:s3cret@api.example/v1', gateway = 'x'"
            )
        caplog.set_level(logging.WARNING, logger="wujie_async")
        async with make_client(emu, journal=journal) as client:
            assert await client.resume() == []
        [warning] = [r.getMessage() for r in caplog.records if "resume" in r.getMessage()]
        assert "https://me:***@api.example/v1" in warning and "s3cret" not in warning
        assert _states(journal) == {key: "accepted"}


async def test_a_job_of_another_gateway_attached_by_hand_leaves_its_row_alone(
    tmp_path: Path,
) -> None:
    """A queue consumer moved to another gateway finds a redelivered message's submit with
    find_submit() and attaches its key: unknown there, its job fails, and that end was
    recorded on the row of the gateway that took it (``failed`` for good, its paid images
    never collected, what resume() no longer does). A row is changed only by a client of its
    own gateway now; its job stays ``accepted`` for them."""
    journal = tmp_path / "jobs.sqlite"
    clock = SteppedClock()
    async with two_gateways(clock) as (gateway_a, gateway_b):
        async with make_client(gateway_a, journal=journal) as submitter:
            submitted = await submitter.images.submit(prompt="a fox", model="dall-e-2", tag="m1")
        async with make_client(
            gateway_b, journal=journal, base_url=gateway_b.base_url
        ) as elsewhere:
            found = await elsewhere.find_submit("m1")
            assert found is not None and found.job_key == submitted.key
            job = elsewhere.images.attach(found.job_key)
            with pytest.raises(UnknownJobError):
                await job
            with pytest.raises(UnknownJobError):
                await job.save(tmp_path / "out")  # nor is a save recorded on that row
        assert _states(journal) == {submitted.key: "accepted"}
        with sqlite3.connect(journal) as db:
            assert db.execute("SELECT save_asked, save_ended FROM submits").fetchall() == [
                (None, None)
            ]
        db.close()

        async with make_client(gateway_a, journal=journal) as home:
            [resumed] = await home.resume()
            clock.advance(30)  # the job runs to its end
            assert (await resumed.result(timeout=30)).status == 4
        assert _states(journal) == {submitted.key: "succeeded"}
