"""An outside check of "nothing lost, nothing paid twice, every saved file is real": a save
whose disk stops answering, the manifest's secrets, budgets and retries, and re-runs after a
process died, each against the emulator (or a small server here) over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import json
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from wujie_async import DownloadPolicy, ImageJob, WujieClient

from .cli_helpers import (
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    final_outcomes,
    manifest,
    manifest_so_far,
    proc_alive,
    running_cli,
    served_emulator,
)
from .conftest import EmulatorFactory, make_client
from .helpers import eventually, freezable_disk, freeze, full_disk

pytestmark = pytest.mark.anyio


class _StuckDisk:
    """Holds the first worker thread that raises ``event`` on a path under ``folder`` until
    ``thaw()``: a file step on a disk that stopped answering (a frozen file system, a hung
    NFS mount). Python's audit hook (``open``, ``os.rename`` for ``os.replace``) is the public
    place to hold it; nothing of ours is patched."""

    def __init__(self) -> None:
        self.event = ""
        self.folder = ""
        self.held = threading.Event()
        self.held_at = 0.0  # time.monotonic() (the loop's clock) when the step was held
        self.thawed = threading.Event()
        self.refusal: OSError | None = None  # what the held step raises once thawed

    def freeze(self, event: str, folder: Path) -> None:
        self.event, self.folder = event, str(folder)
        self.refusal = None
        self.held.clear()
        self.thawed.clear()

    def thaw(self, refusal: OSError | None = None) -> None:
        """Let the held step go on, or fail with ``refusal`` (a disk that answers with an
        error)."""
        self.event = ""
        if refusal is not None:
            self.refusal = refusal
        self.thawed.set()

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event != self.event or self.held.is_set() or not args:
            return
        if self.folder not in str(args[0]) or threading.current_thread() is threading.main_thread():
            return
        self.held_at = time.monotonic()
        self.held.set()
        self.thawed.wait(30)  # bounded: a broken test never holds the worker for good
        refusal, self.refusal = self.refusal, None
        if refusal is not None:
            raise refusal


_DISK = _StuckDisk()
sys.addaudithook(_DISK.hook)  # hooks cannot be removed: thawed, it costs a comparison
_OTHER_DISK = _StuckDisk()  # a second one, for a second folder
sys.addaudithook(_OTHER_DISK.hook)


@contextlib.asynccontextmanager
async def _a_job_and_a_stuck_disk(
    emulator: EmulatorFactory, folder: Path, deadline: float | None = 1.0
) -> AsyncIterator[tuple[WujieClient, ImageJob]]:
    """A client (its saves' deadline ``deadline``; None: the default) and a job of it that
    has ended, ``folder`` made, its disk stuck at the next file's creation under it until the
    block ends (thawed then, whatever happened)."""
    folder.mkdir()
    options = {} if deadline is None else {"downloads": DownloadPolicy(deadline=deadline)}
    async with emulator() as emu, make_client(emu, **options) as client:
        job = await client.images.submit(prompt="a cat", model="dall-e-2")
        await job
        _DISK.freeze("open", folder)
        try:
            yield client, job
        finally:
            _DISK.thaw()


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


# --- a save on a disk that stops answering ends by its deadline ---------------------------------
@pytest.mark.parametrize(
    ("event", "step"),
    [("open", "the temporary file's creation"), ("os.rename", "the rename to the final name")],
)
async def test_a_save_on_a_disk_that_stops_answering_ends_by_its_deadline(
    emulator: EmulatorFactory, tmp_path: Path, event: str, step: str
) -> None:
    """``DownloadPolicy.deadline`` bounds the whole save, its file steps too: a disk that
    stops answering fails the save with an ``OSError`` naming the deadline (it used to hold
    the caller until the disk answered, for ever on a hung mount). Once the disk answers, the
    image is complete under its name or not there, and no temporary file is left."""
    folder = tmp_path / "out"
    folder.mkdir()
    deadline = 1.0
    async with emulator() as emu:
        client = make_client(emu, downloads=DownloadPolicy(deadline=deadline))
        async with client:
            job = await client.images.submit(prompt="a cat", model="dall-e-2")
            await job
            whole = _files_of(await job.save(tmp_path / "whole"))
            _DISK.freeze(event, folder)
            try:
                saving = asyncio.create_task(job.save(folder))
                assert await asyncio.to_thread(_DISK.held.wait, 20), f"{step}: never reached"
                with anyio.fail_after(deadline + 10):  # it used to wait for the thaw (30 s)
                    with pytest.raises(OSError, match=r"DownloadPolicy\.deadline") as raised:
                        await saving
                assert _DISK.held.is_set() and not _DISK.thawed.is_set()
            finally:
                _DISK.thaw()
    assert str(folder) in str(raised.value)

    def settled() -> bool:  # names only: a temporary file may go while it is looked at
        return not [p for p in folder.iterdir() if p.name.startswith(".")]

    await eventually(settled, what=f"{step}: the temporary file removed once the disk answers")
    assert _files(folder).items() <= whole.items()  # complete under its name, or not there


async def test_a_step_that_ends_as_its_deadline_passes_leaves_no_temporary_file(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """The disk answers just as the save's deadline passes: the step's thread has ended (its
    clean-up already looked, and found the save not given up) when the save, woken by the
    deadline before the step's end reached the loop, gives up on it. Neither removed the
    temporary file: each left it to the other. The loop is held (as by the application's
    CPU-bound code) so that the deadline and the step's end reach it in that order."""
    folder = tmp_path / "out"
    loop = asyncio.get_running_loop()
    async with _a_job_and_a_stuck_disk(emulator, folder) as (_, job):
        saving = asyncio.create_task(job.save(folder))
        assert await asyncio.to_thread(_DISK.held.wait, 20)
        # The step's deadline is at most 1 s after it was held (STEP_GRACE_S).
        gives_up = _DISK.held_at + 1.0

        def busy_past_the_deadline() -> None:
            time.sleep(max(0.0, gives_up + 0.3 - time.monotonic()))

        def disk_answers() -> None:  # runs after the deadline's own timer
            _DISK.thaw()
            time.sleep(0.2)  # (loop held) the step ends on its thread meanwhile

        loop.call_soon(busy_past_the_deadline)
        loop.call_at(gives_up + 0.2, disk_answers)
        with anyio.fail_after(15), contextlib.suppress(Exception):
            await saving

    def settled() -> bool:  # names only: a temporary file may go while it is looked at
        return not [p for p in folder.iterdir() if p.name.startswith(".")]

    await eventually(settled, timeout=5, what="the temporary file removed")


async def test_an_inline_images_deadline_runs_from_when_it_gets_its_download_slot(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """An image listed inline (``b64_json``) waiting behind another save for its slot
    (``DownloadPolicy.concurrency``): its deadline runs from when it gets the slot, as a
    downloaded image's does. It ran from before the wait: a save that waited most of its
    deadline failed with ``EIO`` on a disk slow for a second, well within its own deadline."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    policy = DownloadPolicy(deadline=2.0, concurrency=1)
    async with emulator(image_delivery="b64_json") as emu:
        async with make_client(emu, downloads=policy) as client:
            jobs = [await client.images.submit(prompt="a cat", model="dall-e-2") for _ in "ab"]
            for job in jobs:
                await job
            _DISK.freeze("open", first)
            _OTHER_DISK.freeze("open", second)
            try:
                saving = asyncio.create_task(jobs[0].save(first))
                assert await asyncio.to_thread(_DISK.held.wait, 20)
                waiting = asyncio.create_task(jobs[1].save(second))  # behind the first
                await asyncio.sleep(1.5)  # the first holds the slot 1.5 s of its 2 s
                _DISK.thaw()
                await saving
                assert await asyncio.to_thread(_OTHER_DISK.held.wait, 20)
                await asyncio.sleep(1.2)  # a disk slow for 1.2 s, within the second's 2 s
                _OTHER_DISK.thaw()
                with anyio.fail_after(15):
                    saved = await waiting
            finally:
                _DISK.thaw()
                _OTHER_DISK.thaw()
    assert [s.path.parent for s in saved] == [second]


async def test_a_cancelled_save_whose_file_step_then_fails_logs_no_unretrieved_error(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """A save cancelled during a file step (which it waits for, to clean up), the step then
    failing (the disk full): the caller gets its cancel, and the step's error, answered by
    that cancel, is not logged by asyncio as "Task exception was never retrieved"."""
    folder = tmp_path / "out"
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        async with _a_job_and_a_stuck_disk(emulator, folder, deadline=None) as (_, job):
            saving = asyncio.create_task(job.save(folder))
            assert await asyncio.to_thread(_DISK.held.wait, 20)
            saving.cancel()
            _DISK.thaw(refusal=OSError(errno.ENOSPC, "No space left on device"))
            with anyio.fail_after(15), pytest.raises(asyncio.CancelledError):
                await saving
        del saving
        gc.collect()
    finally:
        loop.set_exception_handler(handler)
    assert [c["message"] for c in unhandled] == []


def _files_of(saved: list[Any]) -> dict[str, str]:
    return {s.path.name: s.sha256 for s in saved}


@pytest.mark.parametrize("how", ["job.save", "client.download"])
async def test_a_callers_timeout_around_a_save_on_a_stuck_disk_still_says_timeout(
    emulator: EmulatorFactory, tmp_path: Path, how: str
) -> None:
    """``asyncio.timeout`` around ``job.save()`` on a disk that stopped answering: the save
    waits for its file step (so that it can clean up) only until its own deadline, then the
    caller gets the ``TimeoutError`` it asked for (not the disk's error in its place)."""
    folder = tmp_path / "out"
    async with _a_job_and_a_stuck_disk(emulator, folder) as (client, job):
        with anyio.fail_after(15), pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                if how == "job.save":
                    await job.save(folder)
                else:
                    image = await job.image(0)
                    await client.download(image, folder / "cat.{ext}", key=job.key)
        assert not _DISK.thawed.is_set()  # it ended while the disk was still stuck

    def settled() -> bool:
        return not list(folder.iterdir())

    await eventually(settled, what="the temporary file removed once the disk answers")


async def test_a_directory_under_the_final_name_fails_the_save_and_leaves_no_file(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """A folder where the image's file goes (a user's mistake, another program's): the save
    raises the disk's ``OSError`` naming the file, and leaves no temporary file behind."""
    folder = tmp_path / "out"
    async with emulator() as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="a cat", model="dall-e-2")
        await job
        (folder / f"{job.key}-0.png").mkdir(parents=True)
        with pytest.raises(IsADirectoryError) as raised:
            await job.save(folder)
    assert str(folder) in str(raised.value)
    assert sorted(p.name for p in folder.iterdir()) == [f"{job.key}-0.png"]


@pytest.mark.long
async def test_a_bulk_run_whose_output_disk_froze_ends_with_its_summary_unasked(
    tmp_path: Path,
) -> None:
    """The output folder's file system freezes mid-run, and nobody signals the run: it stops
    sending (the manifest's disk took no row) and, its images' saves failing at
    ``--download-timeout``, prints its summary while the disk is still frozen. It waited for
    the disk, for ever on a hung mount, with no summary. Once the disk answers, the re-run
    collects every job by its key (the journal is on another disk) and pays for none again."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "1,2") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("".join(f"frozen {i}\n" for i in range(8)))
        journal = tmp_path / "journal.sqlite"
        with freezable_disk(tmp_path / "disk") as disk:
            out = disk / "out"
            bulk = [
                "bulk", str(prompts), "-o", str(out), "--model", "dall-e-2", "--rate", "4",
                "--journal", str(journal), "--download-timeout", "2", "--progress", "none",
            ]  # fmt: skip
            async with running_cli(*bulk, env=emu.env) as run:
                if not hasattr(run, "stderr"):
                    pytest.skip("needs the CLI's stderr while it runs (the fork server)")

                def one_saved() -> bool:
                    return any(row["status"] == "saved" for row in manifest_so_far(out))

                await eventually(one_saved, what="an image saved", alive=proc_alive(run))
                with freeze(disk):
                    await eventually(
                        lambda: "line(s):" in run.stderr().decode(),
                        what="the summary while the disk is frozen",
                        timeout=30,
                    )
                    err = run.stderr().decode()
                code, _, _ = await run.finish(20)
            assert code == 3, err
            assert "the disk did not finish writing the image within 2 s" in err
            accepted = int((await emu.stats())["submits_accepted"])
            code, _, err = await cli(*bulk, env=emu.env, timeout=60)
            assert code == 0, err
            assert int((await emu.stats())["submits_accepted"]) == accepted  # none paid again
            assert set(final_outcomes(out).values()) <= {"saved", "not_sent"}
            if "not_sent" in final_outcomes(out).values():  # stopped before sending them
                code, _, err = await cli(*bulk, env=emu.env, timeout=60)
                assert code == 0, err
            assert set(final_outcomes(out).values()) == {"saved"}
            for row in manifest(out):
                if row["status"] == "saved":
                    data = (out / row["path"]).read_bytes()
                    assert hashlib.sha256(data).hexdigest() == row["sha256"]


# --- generate on a disk that fills: the advice must not pay again ---------------------------------
@pytest.mark.long
@pytest.mark.parametrize("json_out", [False, True])
async def test_generate_whose_disk_filled_names_the_command_that_collects_its_job(
    tmp_path: Path, json_out: bool
) -> None:
    """``generate`` whose image the full disk refused said "then re-run the same command",
    which sends a new job (paid again): its job is paid and done, so the summary (and
    ``--json``'s ``error``) names ``status KEY --wait -o OUT`` instead, which saves it."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "2,2") as emu:
        with full_disk(tmp_path / "disk", size="512k", fill=False) as disk:
            out = disk / "out"
            generate = ["generate", "a fox", "--model", "dall-e-2", "-o", str(out)]
            generate += ["--json"] if json_out else []
            async with running_cli(*generate, env=emu.env) as run:

                async def accepted() -> bool:
                    return int((await emu.stats())["submits_accepted"]) >= 1

                await eventually(accepted, what="the job accepted", alive=proc_alive(run))
                with (disk / "filler").open("wb", buffering=0) as filler:
                    with contextlib.suppress(OSError):
                        while True:
                            filler.write(bytes(4096))
                code, stdout, err = await run.finish(60)
            assert code == 3, err
            said = json.loads(stdout)["error"] if json_out else err
            assert "re-run the same command" not in said, said
            key = job_key(await keys_of(emu))
            assert f"status {key} --wait -o {out}" in said
            (disk / "filler").unlink()
            status = ["status", key, "--wait", "-o", str(out)]
            code, _, err = await cli(*status, env=emu.env, timeout=60)
            assert code == 0, err
            assert int((await emu.stats())["submits_accepted"]) == 1  # collected, not paid again
            assert [row["status"] for row in manifest(out)][-1] == "saved"


async def keys_of(emu: Any) -> list[str]:
    return list((await emu.stats())["timelines"])


def job_key(keys: list[str]) -> str:
    (key,) = keys
    return key


# --- a manifest deleted mid-run, the journal kept ------------------------------------------------
@pytest.mark.long
async def test_a_manifest_deleted_mid_run_with_the_journal_kept_is_continued_by_the_rerun(
    tmp_path: Path,
) -> None:
    """The manifest alone deleted while a journaled run writes it: the run stops sending and
    lists the jobs it paid for. It said "a re-run of the same command would send every line
    again", which the journal it kept makes false (the re-run collects them, paying for none
    again): it says the journal decides."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "1,2") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("".join(f"line {i}\n" for i in range(10)))
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "-o", str(out), "--model", "dall-e-2", "--rate", "4"]
        async with running_cli(*bulk, "--progress", "none", env=emu.env) as run:

            def one_saved() -> bool:
                return any(row["status"] == "saved" for row in manifest_so_far(out))

            await eventually(one_saved, what="an image saved", alive=proc_alive(run))
            (out / "manifest.jsonl").unlink()
            code, _, err = await run.finish(60)
        assert code == 3, err
        assert "the manifest was deleted" in err
        assert "collects them and sends the rest if the journal is still there" in err, err
        accepted = int((await emu.stats())["submits_accepted"])
        code, _, err = await cli(*bulk, env=emu.env, timeout=60)
        assert code == 0, err
        assert int((await emu.stats())["submits_accepted"]) == 10
        assert accepted <= 10
        assert set(final_outcomes(out).values()) == {"saved"}
