"""Saves cut off are found again: a job whose ``job.save()`` a SIGTERM (or a cancel, or a
closing client) cut off is returned by ``resume()``; one whose save failed for good is not.
Temporary files a killed save left are removed by a later save into the folder, once old.
And ``job.save``/``client.download`` refuse bad arguments before downloading anything.

(From an outside tester: a worker killed by a plain SIGTERM mid-save left rows reading
``succeeded``, so ``resume()`` returned nothing and the paid images were never saved.)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from wujie_async import ClientStateError, InvalidRequestError, ProtocolError, TransportError
from wujie_async._errors import shown_key
from wujie_async.emulator._png import render_png

from .conftest import EmulatorFactory, make_client
from .helpers import eventually, freezable_disk, freeze, reported_locals
from .hostile import image_server, images_at, scripted_gateway
from .test_saving import client_on, names

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
HOUR = 3600.0


@dataclass
class HeldImages:
    """An image server whose images (``/img/<index>``, each its own PNG) are held while
    ``held``: their headers and a few bytes, then nothing until ``released``."""

    origin: str = ""
    held: bool = True
    asked: Counter[int] = field(default_factory=Counter)
    requests: asyncio.Event = field(default_factory=asyncio.Event)  # set at each request
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, index: int) -> str:
        return f"{self.origin}/img/{index}"


def png(index: int) -> bytes:
    return render_png("K", index, 8, 8)


@asynccontextmanager
async def held_images() -> AsyncIterator[HeldImages]:
    server = HeldImages()

    async def handle(request: web.Request) -> web.StreamResponse:
        index = int(request.match_info["index"])
        body = png(index)
        if not server.held:
            return web.Response(body=body, content_type="image/png")
        response = web.StreamResponse(
            headers={"Content-Length": str(len(body)), "Content-Type": "image/png"}
        )
        await response.prepare(request)
        await response.write(body[:16])
        server.asked[index] += 1
        server.requests.set()
        await server.released.wait()
        return response

    app = web.Application()
    app.router.add_get("/img/{index}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield server
    finally:
        server.released.set()
        await runner.cleanup()


async def until(server: HeldImages, check: Any, *, alive: asyncio.Future[Any]) -> None:
    """Wait for ``check()`` (on each request the server takes); fail at once if ``alive``
    (the process being watched) ends first."""
    async with asyncio.timeout(20):
        while not check():
            server.requests.clear()
            waiting = asyncio.ensure_future(server.requests.wait())
            await asyncio.wait({waiting, alive}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            assert not alive.done() or check(), "the child ended before the images were asked"


def row_state(journal: Path) -> str:
    """The state of the journal's one row (read beside its writer)."""
    db = sqlite3.connect(f"{journal.absolute().as_uri()}?mode=ro", uri=True)
    try:
        (state,) = db.execute("SELECT state FROM submits").fetchone()
    finally:
        db.close()
    return str(state)


@pytest.mark.long
async def test_a_save_cut_off_by_sigterm_is_resumed_and_its_images_saved(
    tmp_path: Path,
) -> None:
    journal, folder = tmp_path / "jobs.sqlite", tmp_path / "out"
    async with held_images() as images:
        async with scripted_gateway(images_at(images.url(0), images.url(1))) as gateway:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.save_child", gateway.base_url, str(folder),
                "journal", str(journal), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
            try:
                assert child.stdout is not None
                said = (await asyncio.wait_for(child.stdout.readline(), 20)).decode().split()
                assert said[0] == "saving", said
                key = said[1]
                exited = asyncio.ensure_future(child.wait())
                # Both images are being downloaded: the save is under way; and the job's row
                # reads succeeded (its outcome is written as the downloads begin).
                await until(images, lambda: len(images.asked) == 2, alive=exited)
                await eventually(
                    lambda: row_state(journal) == "succeeded",
                    interval=0.01,
                    what="the job's row recorded succeeded",
                    alive=lambda: child.returncode is None,
                )
                child.send_signal(signal.SIGTERM)  # the default action: no clean-up at all
                assert await exited == -signal.SIGTERM
            finally:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
            assert row_state(journal) == "succeeded"  # what left resume() nothing to do
            images.held = False
            async with client_on(gateway.base_url, journal=journal) as client:
                resumed = await client.resume()
                assert [job.key for job in resumed] == [key]
                saved = await resumed[0].save(folder)
                again = await client.resume()  # the save ended: nothing left
    assert again == []
    assert [image.index for image in saved] == [0, 1]
    for image in saved:
        assert image.path.read_bytes() == png(image.index)
        assert image.sha256 == hashlib.sha256(png(image.index)).hexdigest()


def two_jobs(held: str, gone: str) -> Any:
    """A batch script: job K00000's image is at ``held``, every other job's at ``gone``."""

    def script(keys: list[str]) -> list[dict[str, Any]]:
        return [
            {"key": key, "status": 4, "images": [{"url": held if key == "K00000" else gone}]}
            for key in keys
        ]

    return script


async def test_a_cancelled_save_is_resumed_and_one_that_failed_for_good_is_not(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "jobs.sqlite"
    async with (
        held_images() as held,
        image_server() as images,
        scripted_gateway(two_jobs(held.url(0), images.url("gone"))) as gateway,
    ):
        async with client_on(gateway.base_url, journal=journal) as client:
            cut, failed = [
                await client.images.submit(prompt=f"p{i}", model="dall-e-2") for i in range(2)
            ]
            saving = asyncio.ensure_future(cut.save(tmp_path / "out"))
            await until(held, lambda: held.asked[0] == 1, alive=saving)
            # A save in progress in this process is its own: not handed out again.
            assert await client.resume() == []
            saving.cancel()  # a web request dropped, a caller's timeout
            with pytest.raises(asyncio.CancelledError):
                await saving
            with pytest.raises(ProtocolError, match="404"):  # an expired image: told once
                await failed.save(tmp_path / "out")
            # This process's own resume() returns it too (a queue consumer's recovery loop),
            # the job it holds, though the job ended here lately.
            assert await client.resume() == [cut]
            held.held = False
        async with client_on(gateway.base_url, journal=journal) as client:
            resumed = await client.resume()
            assert [job.key for job in resumed] == [cut.key]
            await resumed[0].save(tmp_path / "out")
            assert await client.resume() == []
    assert names(tmp_path / "out") == [f"{cut.key}-0.png"]


async def test_a_save_failed_on_the_network_is_resumed_and_saved_once_it_can_be(
    tmp_path: Path,
) -> None:
    """An image server cutting every body short until the retries are spent (a 5xx, a dropped
    connection, a server too slow would do the same): the save raised, and its row was
    recorded as ended, so no later resume() returned the paid job, though a try a minute
    later would have saved it. Only what trying again cannot mend (an expired image) ends it."""
    journal = tmp_path / "jobs.sqlite"
    async with image_server() as images:
        where = [images.url("cut")]

        def script(keys: list[str]) -> list[dict[str, Any]]:
            return [{"key": key, "status": 4, "images": [{"url": where[0]}]} for key in keys]

        async with scripted_gateway(script) as gateway:
            async with client_on(gateway.base_url, journal=journal) as client:
                job = await client.images.submit(prompt="p", model="dall-e-2")
                with pytest.raises(TransportError, match="cut short"):
                    await job.save(tmp_path / "out")
            where[0] = images.url("png")  # the image server answers again
            async with client_on(gateway.base_url, journal=journal) as client:
                [resumed] = await client.resume()
                assert resumed.key == job.key
                [saved] = await resumed.save(tmp_path / "out")
                assert await client.resume() == []
    assert hashlib.sha256(saved.path.read_bytes()).hexdigest() == saved.sha256


async def test_a_journal_of_before_gains_the_save_columns_and_resumes_as_before(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "old.sqlite"
    with sqlite3.connect(journal) as db:  # the schema before saves were recorded
        db.execute(
            "CREATE TABLE submits (id INTEGER PRIMARY KEY, path TEXT NOT NULL, request TEXT "
            "NOT NULL, state TEXT NOT NULL, job_key TEXT, tag TEXT, error TEXT, created REAL "
            "NOT NULL, updated REAL NOT NULL, base_url TEXT, gateway TEXT)"
        )
        db.execute(
            "INSERT INTO submits (path, request, state, job_key, created, updated) VALUES "
            "('/g', '{}', 'succeeded', 'K00000', 1, 1)"
        )
    db.close()
    async with image_server() as images, scripted_gateway(images_at(images.url("png"))) as gw:
        async with client_on(gw.base_url, journal=journal) as client:
            assert await client.resume() == []  # a succeeded row: no save was ever asked
    with sqlite3.connect(journal) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(submits)")}
        row = db.execute("SELECT save_asked, save_ended FROM submits").fetchone()
    db.close()
    assert {"save_asked", "save_ended"} <= columns
    assert row == (None, None)


# --- temporary files left by a killed save --------------------------------------------------
async def test_a_save_removes_our_temporary_files_left_long_ago_and_nothing_else(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    old = time.time() - 2 * HOUR
    left = [".wujie-0.0123456789ab.part", ".wujie-1.ba9876543210.part", ".wujie.00aa11bb22cc.part"]
    kept = [
        ".wujie-0.fedcba987654.part",  # fresh: maybe a live save's (another process)
        ".other.0123456789ab.part",  # not ours
        ".wujie-0.notourtoken1.part",  # not a name of ours
        "photo.wujie-0.0123456789ab.part",
    ]
    for name in left + kept:
        (folder / name).write_bytes(b"x")
        if name != ".wujie-0.fedcba987654.part":
            os.utime(folder / name, (old, old))
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"keep me")
    link = folder / ".wujie-2.0123456789ab.part"
    link.symlink_to(target)
    os.utime(link, (old, old), follow_symlinks=False)
    kept.append(link.name)
    async with image_server() as images:
        async with (
            scripted_gateway(images_at(images.url("png"))) as gateway,
            client_on(gateway.base_url) as client,
        ):
            job = await client.images.submit(prompt="p", model="dall-e-2")
            await job.save(folder)
            later = folder / ".wujie-3.0123456789ab.part"  # left after this client's sweep
            later.write_bytes(b"x")
            os.utime(later, (old, old))
            await job.save(folder)  # once per folder and client
            await client.download(job.images[0], folder / "again.{ext}")  # (never sweeps)
    assert names(folder) == sorted([*kept, later.name, f"{job.key}-0.png", "again.png"])
    assert target.read_bytes() == b"keep me"


# --- arguments refused before anything is downloaded ----------------------------------------
async def test_bad_folders_paths_and_keys_are_refused_before_downloading(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"mine")
    async with image_server() as images:
        async with (
            scripted_gateway(images_at(images.url("png"))) as gateway,
            client_on(gateway.base_url) as client,
        ):
            job = await client.images.submit(prompt="p", model="dall-e-2")
            image = (await job).images[0]
            with pytest.raises(InvalidRequestError, match="directory"):
                await job.save(None)  # type: ignore[arg-type]
            for folder in (a_file, a_file / "below"):
                with pytest.raises(InvalidRequestError, match="directory") as refused:
                    await job.save(folder)
                assert str(a_file) in str(refused.value)
            with pytest.raises(InvalidRequestError, match="path"):
                await client.download(image, None)  # type: ignore[arg-type]
            with pytest.raises(InvalidRequestError, match="key"):
                await client.download(image, tmp_path / "x.{ext}", key=5)  # type: ignore[arg-type]
        assert images.hits["png"] == 0  # nothing was downloaded
    assert a_file.read_bytes() == b"mine"
    assert names(tmp_path) == ["a-file"]


async def test_a_save_ended_by_its_client_closing_is_resumed(tmp_path: Path) -> None:
    journal = tmp_path / "jobs.sqlite"
    async with held_images() as held, scripted_gateway(images_at(held.url(0))) as gateway:
        client = client_on(gateway.base_url, journal=journal)
        async with client:
            job = await client.images.submit(prompt="p", model="dall-e-2")
            saving = asyncio.ensure_future(job.save(tmp_path / "out"))
            await until(held, lambda: held.asked[0] == 1, alive=saving)
        # (the client closed under the save: a shutdown's SIGTERM handler does this)
        with pytest.raises(ClientStateError):
            await saving
        held.held = False
        async with client_on(gateway.base_url, journal=journal) as client:
            resumed = await client.resume()
            assert [resumed_job.key for resumed_job in resumed] == [job.key]
            await resumed[0].save(tmp_path / "out")
    assert names(tmp_path / "out") == [f"{job.key}-0.png"]


async def test_a_save_cut_off_on_another_gateway_is_left_and_said_as_such(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client of another gateway leaves a job whose save was cut off to a client of its own
    gateway, and its WARNING says what the row is: a job that succeeded and waits for its
    save, not an accepted one (the message said "accepted", and the row reads succeeded)."""
    journal = tmp_path / "jobs.sqlite"
    async with (
        held_images() as held,
        scripted_gateway(two_jobs(held.url(0), held.url(0))) as home,
        scripted_gateway(two_jobs(held.url(0), held.url(0))) as other,
    ):
        async with client_on(home.base_url, journal=journal) as client:
            job = await client.images.submit(prompt="p", model="dall-e-2")
            saving = asyncio.ensure_future(job.save(tmp_path / "out"))
            await until(held, lambda: held.asked[0] == 1, alive=saving)
            saving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await saving
        assert row_state(journal) == "succeeded"
        caplog.set_level(logging.WARNING, logger="wujie_async")
        async with client_on(other.base_url, journal=journal) as client:
            assert await client.resume() == []
        [warning] = [r.getMessage() for r in caplog.records if "resume:" in r.getMessage()]
        assert "1 succeeded job(s) whose save was cut off" in warning, warning
        assert "accepted" not in warning, warning
        assert home.base_url in warning and other.base_url in warning, warning
        assert other.asked == []  # never asked of the wrong gateway
        held.held = False
        async with client_on(home.base_url, journal=journal) as client:
            [again] = await client.resume()
            await again.save(tmp_path / "out")
    assert names(tmp_path / "out") == [f"{job.key}-0.png"]


@pytest.mark.long
async def test_a_save_goes_on_when_the_journals_disk_stops_answering(
    emulator: EmulatorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The journal's file system freezes (``fsfreeze``, as a hung NFS mount): ``job.save()``
    into another folder waits a moment for its record, then saves, with a WARNING; the record
    lands once the disk thaws. It waited for the record with no bound: the images, paid for,
    were never saved while the journal's disk stayed frozen."""
    caplog.set_level(logging.WARNING, logger="wujie_async")
    with freezable_disk(tmp_path / "disk") as disk:
        journal = disk / "jobs.sqlite"
        async with emulator() as emu, make_client(emu, journal=journal) as client:
            job, *others = [
                await client.images.submit(prompt=f"a fox {i}", model="dall-e-2") for i in range(3)
            ]
            await asyncio.gather(job, *others)
            with freeze(disk):
                async with asyncio.timeout(10):  # the record is waited for 2 s
                    saved = await job.save(tmp_path / "out")
                    await asyncio.gather(*(other.save(tmp_path / "out") for other in others))
                assert [image.path.name for image in saved] == [f"{job.key}-0.png"]
                # One line for the three saves (one per save was a flood), its first one.
                [warning] = [r.getMessage() for r in caplog.records if "save" in r.getMessage()]
                assert shown_key(job.key) in warning and "not recorded yet" in warning, warning
        db = sqlite3.connect(f"{journal.absolute().as_uri()}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT state, save_asked, save_ended FROM submits").fetchall()
        finally:
            db.close()
        assert len(rows) == 3
        for state, asked, ended in rows:
            assert state == "succeeded" and asked is not None and ended is not None, rows


@pytest.mark.parametrize("kind", ["gone", "cut"])  # refused for good; cut short, retried
async def test_a_failed_saves_frames_keep_no_signed_url(kind: str, tmp_path: Path) -> None:
    """The message never names an image's URL (a CDN's carries a signed token), but the
    frames of the save kept it as a local, which an error reporter recording locals stores."""
    async with image_server() as images:
        url = images.url(f"{kind}?X-Amz-Signature=tok3n-s3cret")
        async with (
            scripted_gateway(images_at(url)) as gateway,
            client_on(gateway.base_url) as client,
        ):
            job = await client.images.submit(prompt="p", model="dall-e-2")
            with pytest.raises(ProtocolError if kind == "gone" else TransportError) as info:
                await job.save(tmp_path / "out")
    seen = reported_locals(info.value)
    assert any(line.startswith("_jobs.py:save:") for line in seen)  # locals are recorded
    assert [line for line in seen if "tok3n" in line] == []
