"""The journal: one writer across processes, files at rest, unsent submits, bad rows, and what
happens when a write fails (a full disk, another writer holding the file)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from wujie_async import (
    ClientStateError,
    InvalidRequestError,
    JobTimeoutError,
    JournalFile,
    JournalLockedError,
    Limits,
    SubmitUncertainError,
    TransportError,
    WujieClient,
)
from wujie_async._journal import Journal
from wujie_async.emulator import Emulator, FaultConfig

from .conftest import INSTANT_RETRY, EmulatorFactory, make_client
from .helpers import eventually, freezable_disk, freeze, reported_locals
from .hostile import all_running, images_at, scripted_gateway, throwaway_credentials

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]

# A process that opens a client on a journal, says so, and waits to be stopped.
HOLDER = """
import asyncio, sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from wujie_async import Credentials, WujieClient

key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()

async def main() -> None:
    client = WujieClient(Credentials("a", key), base_url="http://127.0.0.1:9", journal=sys.argv[1])
    async with client:
        print("open", flush=True)
        # Hold the journal until told (a line on stdin) or for argv[2] seconds at most.
        await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), float(sys.argv[2]))

asyncio.run(main())
"""


def _holder(journal: Path, seconds: float = 60) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(journal), str(seconds)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _wait_open(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
    assert line.strip() == "open", process.stderr.read() if process.stderr else line


# --- one writer ----------------------------------------------------------------------------------
@pytest.mark.long
@pytest.mark.parametrize("stop", ["exit", "kill"])
async def test_a_journal_has_one_writer_across_processes(
    emulator: EmulatorFactory, tmp_path: Path, stop: str
) -> None:
    """Issue 9 item 2: a second process on the same journal fails fast, naming the first."""
    journal = tmp_path / "jobs.sqlite"
    first = _holder(journal)
    try:
        await _wait_open(first)
        async with emulator() as emu:
            client = make_client(emu, journal=journal)
            started = time.monotonic()
            with pytest.raises(JournalLockedError) as info:
                await client.open()
            assert time.monotonic() - started < 2
            assert isinstance(info.value, ClientStateError)
            assert info.value.pid == first.pid and info.value.host == socket.gethostname()
            message = str(info.value)
            assert str(first.pid) in message and socket.gethostname() in message
            assert "another journal" in message or "use another" in message
            await client.aclose()

            # A second process gets the same error (and a clean exit, no hang).
            second = _holder(journal)
            _, err = await asyncio.to_thread(second.communicate, timeout=30)
            assert second.returncode != 0 and "JournalLockedError" in err, err
            assert f"process {first.pid}" in err

            if stop == "kill":
                first.send_signal(signal.SIGKILL)
            else:  # a clean exit: it closes its client
                assert first.stdin is not None
                first.stdin.write("\n")
                first.stdin.flush()
            await asyncio.to_thread(first.wait, 30)
            assert stop == "kill" or first.returncode == 0, first.stderr
            # The lock went with its holder, however it ended.
            async with make_client(emu, journal=journal) as again:
                assert await again.journal_entries() == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.kill()
        first.communicate()  # reaps it and closes its pipes


async def test_two_clients_in_one_process_cannot_share_a_journal(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    journal = tmp_path / "jobs.sqlite"
    async with emulator() as emu:
        async with make_client(emu, journal=journal):
            with pytest.raises(JournalLockedError, match=f"process {os.getpid()}"):
                await make_client(emu, journal=journal).open()
        # Closing released it.
        async with make_client(emu, journal=journal) as client:
            await client.images.generate(prompt="x", model="dall-e-2")


async def test_a_client_that_fails_to_open_holds_no_journal_and_no_session(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    journal = tmp_path / "jobs.sqlite"
    async with emulator() as emu:
        closed = aiohttp.ClientSession()
        await closed.close()
        failed = make_client(emu, journal=journal, session=closed)
        with pytest.raises(ClientStateError, match="session given to the client is closed"):
            await failed.open()
        assert "state='closed'" in repr(failed)
        async with make_client(emu, journal=journal) as client:  # the journal is free again
            await client.images.generate(prompt="x", model="dall-e-2")


async def test_journal_files_are_private(emulator: EmulatorFactory, tmp_path: Path) -> None:
    """Issue 9 item 15: prompts, edit images and tags at rest are readable by the owner only."""
    journal = tmp_path / "jobs.sqlite"
    old = os.umask(0o022)
    try:
        async with emulator() as emu, make_client(emu, journal=journal) as client:
            await client.images.generate(prompt="x", model="dall-e-2")
            names = ["jobs.sqlite", "jobs.sqlite-wal", "jobs.sqlite-shm", "jobs.sqlite.lock"]
            modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in names}
            assert modes == dict.fromkeys(names, 0o600)
    finally:
        os.umask(old)


async def test_a_lock_file_that_is_a_link_is_refused_and_its_target_left_alone(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """Whoever may write in the journal's folder (a shared one) could put a link where its
    lock file goes: the client's open followed it, emptied the file it points at (a key file,
    a config), wrote its pid into it, and took its group's and others' access away."""
    journal = tmp_path / "jobs.sqlite"
    victim = tmp_path / "authorized_keys"
    victim.write_text("ssh-ed25519 AAAA keep-me\n")
    victim.chmod(0o644)
    (tmp_path / "jobs.sqlite.lock").symlink_to(victim)
    async with emulator() as emu:
        with pytest.raises(ClientStateError, match=r"jobs\.sqlite\.lock") as info:
            await make_client(emu, journal=journal).open()
    assert "link" in str(info.value)
    assert victim.read_text() == "ssh-ed25519 AAAA keep-me\n"
    assert victim.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
async def test_a_link_planted_as_the_journals_wal_or_shm_leaves_its_target_alone(
    emulator: EmulatorFactory, tmp_path: Path, suffix: str
) -> None:
    """The journal takes group and other access from its ``-wal`` and ``-shm``: by path, that
    followed a link planted in their place and chmod-ed the file it points at."""
    journal = tmp_path / "jobs.sqlite"
    async with emulator() as emu, make_client(emu, journal=journal) as client:
        await client.images.generate(prompt="x", model="dall-e-2")
    victim = tmp_path / "shared-notes.txt"
    victim.write_text("keep me\n")
    victim.chmod(0o644)
    companion = tmp_path / f"jobs.sqlite{suffix}"
    companion.unlink(missing_ok=True)
    companion.symlink_to(victim)
    with contextlib.suppress(ClientStateError):  # whether SQLite takes such a file is its own
        async with JournalFile(journal, read_only=True) as reader:
            await reader.entries()
    assert victim.stat().st_mode & 0o777 == 0o644
    assert victim.read_text() == "keep me\n"


# --- unsent --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_submit_that_never_connected_is_unsent(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """Issue 9 item 16: refused connections never reached the gateway: unsent, not uncertain."""
    async with emulator() as emu:
        credentials = emu.credentials
    journal = tmp_path / "jobs.sqlite"
    base_url = f"http://127.0.0.1:{_free_port()}/wj-open/v1"  # nothing listens there
    refused = WujieClient(credentials, base_url=base_url, journal=journal, retry=INSTANT_RETRY)
    async with refused as client:
        with pytest.raises(TransportError) as info:
            await client.images.submit(prompt="refused", model="dall-e-2")
        assert info.value.reached_server is False
        assert await client.uncertain_submits() == []
    async with WujieClient(credentials, base_url=base_url, journal=journal) as client:
        [row] = await client.journal_entries()
        assert row.state == "unsent" and row.request["prompt"] == "refused"
        assert await client.uncertain_submits() == []


async def test_submits_cancelled_before_sending_are_unsent(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """Issue 9 item 16: a cancel while the intent is being written leaves no orphan intent."""
    journal = tmp_path / "jobs.sqlite"
    faults = FaultConfig(slow_reply=1.0, slow_reply_s=0.2, endpoints=frozenset({"generations"}))
    async with emulator(faults=faults) as emu:
        limits = Limits(max_concurrent_submits=50)
        async with make_client(emu, journal=journal, limits=limits) as client:
            tasks = [
                asyncio.create_task(client.images.submit(prompt=f"p{i}", model="dall-e-2"))
                for i in range(50)
            ]
            await asyncio.sleep(0)  # every task is now waiting for its intent to be written
            await asyncio.sleep(0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.3)  # the requests that did go out are answered
        reached = {job.prompt for job in emu.gateway.store.jobs.values()}
    async with make_client(emu, journal=journal) as client:
        rows = await client.journal_entries()
    assert len(rows) == 50
    states = {row.state for row in rows}
    assert states <= {"unsent", "uncertain"}, states
    unsent = {row.request["prompt"] for row in rows if row.state == "unsent"}
    assert unsent, "no submit was cancelled before sending"
    assert not unsent & reached  # an unsent row's request never reached the gateway


# --- bad rows, entries, forget -------------------------------------------------------------------
async def test_a_bad_row_does_not_break_resume(
    emulator: EmulatorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 9 item 17: one non-JSON ``request`` column is reported and skipped over."""
    journal = tmp_path / "jobs.sqlite"
    async with emulator(time_scale=1.0) as emu:
        async with make_client(emu, journal=journal) as client:
            jobs = [await client.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(3)]
        with sqlite3.connect(journal) as db:
            db.execute("UPDATE submits SET request='{not json' WHERE job_key=?", (jobs[1].key,))
            db.execute("UPDATE submits SET request='[1]' WHERE job_key=?", (jobs[2].key,))
        caplog.set_level(logging.WARNING, logger="wujie_async")
        async with make_client(emu, journal=journal) as client:
            resumed = await client.resume()
            assert [job.key for job in resumed] == [job.key for job in jobs]
            assert resumed[1].request == {} and resumed[0].request == jobs[0].request
            for job in resumed:
                job.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("journal row 2" in text and "not JSON" in text for text in warnings), warnings
    assert any("journal row 3" in text for text in warnings), warnings


BAD_JOURNAL_CALLS: list[tuple[str, Callable[[WujieClient], object], str]] = [
    # None matched every row: a queue consumer whose message had no id attached to another
    # message's job (the latest row's) and never sent its own.
    ("find_submit(None)", lambda c: c.find_submit(None), "tag"),  # type: ignore[arg-type]
    ("find_submit(5)", lambda c: c.find_submit(5), "tag"),  # type: ignore[arg-type]
    ("find_submit(b't-b')", lambda c: c.find_submit(b"t-b"), "tag"),  # type: ignore[arg-type]
    ("find_submit(surrogate)", lambda c: c.find_submit("t-\ud800"), "tag"),
    ("journal_entries(tag=5)", lambda c: c.journal_entries(tag=5), "tag"),  # type: ignore[arg-type]
    ("journal_entries('sent')", lambda c: c.journal_entries("sent"), "states[0]"),
    ("journal_entries(.., None)", lambda c: c.journal_entries("failed", None), "states[1]"),  # type: ignore[arg-type]
    # A bare str was taken character by character ("ABC": keys "A", "B" and "C").
    ("refuse_keys('ABC')", lambda c: c.refuse_keys("ABC"), "keys"),
    ("refuse_keys(b'ABC')", lambda c: c.refuse_keys(b"ABC"), "keys"),  # type: ignore[arg-type]
    ("refuse_keys(5)", lambda c: c.refuse_keys(5), "keys"),  # type: ignore[arg-type]
    ("refuse_keys([None])", lambda c: c.refuse_keys([None]), "keys[0]"),  # type: ignore[list-item]
    ("refuse_keys(['K', 5])", lambda c: c.refuse_keys(["K", 5]), "keys[1]"),  # type: ignore[list-item]
]


@pytest.mark.parametrize(
    ("call", "field"),
    [(call, field) for _, call, field in BAD_JOURNAL_CALLS],
    ids=[label for label, _, _ in BAD_JOURNAL_CALLS],
)
async def test_a_journal_call_refuses_an_argument_no_row_could_match(
    emulator: EmulatorFactory,
    tmp_path: Path,
    call: Callable[[WujieClient], object],
    field: str,
) -> None:
    """Each was taken as "no filter" or "no row", or refused with a bare ValueError or nothing
    at all; now an ``InvalidRequestError`` naming the argument and its rule."""
    async with emulator() as emu, make_client(emu, journal=tmp_path / "jobs.sqlite") as client:
        await client.images.submit(prompt="untagged", model="dall-e-2")
        await client.images.submit(prompt="tagged", model="dall-e-2", tag="t-b")
        with pytest.raises(InvalidRequestError) as caught:
            result = call(client)
            if inspect.isawaitable(result):
                await result
        assert caught.value.field == field and caught.value.rule
        assert (await client.find_submit("t-b")) is not None  # a str still finds its row


async def test_journal_entries_and_forget_submits(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    journal = tmp_path / "jobs.sqlite"
    async with emulator() as emu, make_client(emu, journal=journal) as client:
        await client.images.generate(prompt="a", model="dall-e-2")
        await client.images.submit(prompt="b", model="dall-e-2", tag="t-b")
        with pytest.raises(InvalidRequestError, match=r"states\[0\]: must be one of"):
            await client.journal_entries("sent")
        everything = await client.journal_entries()
        assert [row.request["prompt"] for row in everything] == ["a", "b"]
        [tagged] = await client.journal_entries(tag="t-b")
        assert tagged.request["prompt"] == "b"
        assert await client.journal_entries("rejected") == []
        assert await client.forget_submits([everything[0].id, 999]) == 1
        assert await client.forget_submits([]) == 0
        with pytest.raises(TypeError):
            await client.forget_submits(["1"])  # type: ignore[list-item]
        assert [row.id for row in await client.journal_entries()] == [tagged.id]


async def test_a_key_found_for_an_uncertain_submit_makes_its_row_accepted(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    # A reply lost after the gateway accepted the submit: its row is uncertain. The key found
    # since (the console, a manifest) settles it, once; a key another row holds does not.
    journal = tmp_path / "jobs.sqlite"
    async with emulator() as emu, make_client(emu, journal=journal) as client:
        held = await client.images.submit(prompt="kept", model="dall-e-2")
        emu.set_faults(FaultConfig(drop_after_accept=1.0, endpoints=frozenset({"generations"})))
        with pytest.raises(SubmitUncertainError):
            await client.images.submit(prompt="lost", model="dall-e-2")
        emu.set_faults(FaultConfig())
        [row] = await client.uncertain_submits()
        [lost_key] = set(emu.stats()["timelines"]) - {held.key}
        assert not await client.record_submit_key(row.id, held.key)  # the other row's key
        with pytest.raises(InvalidRequestError, match="entry_id"):
            await client.record_submit_key(str(row.id), lost_key)  # type: ignore[arg-type]
        assert await client.record_submit_key(row.id, lost_key)
        assert not await client.record_submit_key(row.id, lost_key)
        assert await client.uncertain_submits() == []
        [resumed] = await client.resume()
        assert resumed.key == lost_key
        assert (await resumed.result(timeout=10)).status == 4


async def test_a_journal_file_refuses_arguments_of_another_type(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """``JournalFile(5)`` raised a bare TypeError, ``read_only="yes"`` (or ``"no"``) was read
    as its truth, and ``entries("sent")`` raised a bare ValueError."""
    journal = tmp_path / "jobs.sqlite"
    refused: list[tuple[dict[str, Any], list[str]]] = [
        ({"path": 5}, ["path"]),
        ({"path": b"jobs.sqlite"}, ["path"]),
        ({"path": journal, "read_only": "no"}, ["read_only"]),
        ({"path": journal, "read_only": 1}, ["read_only"]),
        ({"path": None, "read_only": None}, ["path", "read_only"]),
    ]
    for arguments, fields in refused:
        with pytest.raises(InvalidRequestError) as caught:
            JournalFile(**arguments)
        assert [field for field, _ in caught.value.violations] == fields, arguments
        # An error reporter records the half-made object's repr (the frame's self).
        assert "JournalFile(" in "\n".join(reported_locals(caught.value))
    async with emulator() as emu, make_client(emu, journal=journal) as client:
        await client.images.submit(prompt="b", model="dall-e-2", tag="t-b")
    for read_only in (False, True):
        async with JournalFile(str(journal), read_only=read_only) as reader:
            for states, tag, field in [(("sent",), None, "states[0]"), ((), 5, "tag")]:
                with pytest.raises(InvalidRequestError) as caught:
                    await reader.entries(*states, tag=tag)  # type: ignore[arg-type]
                assert caught.value.field == field
            assert [row.tag for row in await reader.entries(tag="t-b")] == ["t-b"]


async def test_a_journal_file_reads_and_forgets_without_a_client(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    journal = tmp_path / "jobs.sqlite"
    with pytest.raises(FileNotFoundError, match="no journal at"):
        async with JournalFile(journal):
            pass
    assert not journal.exists()  # nothing was created
    async with emulator() as emu:
        async with make_client(emu, journal=journal) as client:
            await client.images.generate(prompt="a", model="dall-e-2")
            await client.images.submit(prompt="b", model="dall-e-2", tag="t-b")
            with pytest.raises(JournalLockedError):  # a live client holds it
                async with JournalFile(journal):
                    pass
        reader = JournalFile(journal)
        with pytest.raises(ClientStateError, match="not open"):
            await reader.entries()
        async with reader:
            everything = await reader.entries()
            assert [row.request["prompt"] for row in everything] == ["a", "b"]
            [tagged] = await reader.entries(tag="t-b")
            assert [row.id for row in await reader.entries("succeeded")] == [everything[0].id]
            with pytest.raises(InvalidRequestError, match=r"states\[0\]: must be one of"):
                await reader.entries("sent")
            assert await reader.forget([everything[0].id, 999]) == 1
        # Closing released the lock, and the forget was kept.
        async with make_client(emu, journal=journal) as client:
            assert [row.id for row in await client.journal_entries()] == [tagged.id]


async def test_a_read_only_journal_file_reads_beside_a_live_client(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """`JournalFile` took the writer lock just to read: a live client's journal could not be
    read at all (JournalLockedError). Read-only, it reads beside the writer, which goes on
    writing; it writes nothing itself, and forgetting is refused."""
    journal = tmp_path / "jobs.sqlite"
    not_a_journal = tmp_path / "empty.sqlite"
    sqlite3.connect(not_a_journal).close()
    with pytest.raises(FileNotFoundError, match="no journal at"):
        async with JournalFile(tmp_path / "none.sqlite", read_only=True):
            pass
    async with emulator() as emu:
        async with make_client(emu, journal=journal) as client:
            await client.images.generate(prompt="a", model="dall-e-2")
            async with JournalFile(journal, read_only=True) as reader:
                assert "read_only=True" in repr(reader)
                [done] = await reader.entries()
                assert done.request["prompt"] == "a"
                job = await client.images.submit(prompt="b", model="dall-e-2", tag="t-b")
                [tagged] = await reader.entries(tag="t-b")  # the writer's last commit
                assert tagged.job_key == job.key
                with pytest.raises(ClientStateError, match="read-only"):
                    await reader.forget([done.id])
                await job.result(timeout=10)
            # The client wrote on after the reader came and went.
            await client.images.generate(prompt="c", model="dall-e-2")
            assert len(await client.journal_entries()) == 3
    with pytest.raises(ClientStateError, match="cannot read journal"):
        async with JournalFile(not_a_journal, read_only=True):
            pass
    for path in tmp_path.glob("jobs.sqlite*"):
        assert path.stat().st_mode & 0o077 == 0, path


# --- writes that fail ----------------------------------------------------------------------------
@contextlib.contextmanager
def _write_locked(journal: Path) -> Iterator[None]:
    """Hold the journal's SQLite write lock from another connection (as a sqlite3 shell
    writing to the file would): the client's commits wait, then fail after 5 s."""
    db = sqlite3.connect(journal, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


async def _at_gateway(emu: Emulator, count: int) -> None:
    """Wait until the gateway has received ``count`` submits."""
    for _ in range(2000):
        if emu.stats()["requests"].get("generations", 0) >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the submit never reached the gateway")


@pytest.mark.long
async def test_a_key_interrupted_on_its_way_to_the_journal_is_kept(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """``record_accepted_later``: a submit cancelled after its key came back, while the key
    was being written. The key lands in the journal and its job is still followed."""
    journal = tmp_path / "jobs.sqlite"
    faults = FaultConfig(slow_reply=1.0, slow_reply_s=0.2, endpoints=frozenset({"generations"}))
    async with emulator(faults=faults) as emu, make_client(emu, journal=journal) as client:
        submit = asyncio.create_task(client.images.submit(prompt="x", model="dall-e-2"))
        await _at_gateway(emu, 1)  # the intent is written, the request is out
        with _write_locked(journal):
            await asyncio.sleep(0.4)  # the key came back; its write waits for the lock
            assert not submit.done()
            submit.cancel()
            with pytest.raises(asyncio.CancelledError):
                await submit
        [job] = client.jobs()
        await job.result(timeout=10)
        await asyncio.sleep(0.1)  # outcome records are queued, not awaited
        [row] = await client.journal_entries()
        assert (row.state, row.job_key) == ("succeeded", job.key)


@pytest.mark.long
async def test_a_job_that_timed_out_stays_resumable(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    # job_timeout is how long this client waits, not the job's fate: the job may still run,
    # and it is paid. Its row stays accepted, so resume() collects it; nothing is resent.
    async with emulator(time_scale=0.3) as emu:
        async with make_client(emu, journal=tmp_path / "jobs.sqlite") as client:
            job = await client.images.submit(prompt="slow", model="dall-e-2", job_timeout=0.1)
            followed = await client.images.submit(prompt="followed", model="dall-e-2")
            with pytest.raises(JobTimeoutError):
                await job
            rows = {row.job_key: row.state for row in await client.journal_entries()}
            assert rows[job.key] == "accepted"
            # The job this client still follows is not handed out a second time.
            [again] = await client.resume(job_timeout=60)
            assert again.key == job.key and (await again).status == 4
            await followed
            rows = {row.job_key: row.state for row in await client.journal_entries()}
            assert rows == {job.key: "succeeded", followed.key: "succeeded"}
        assert emu.stats()["submits_accepted"] == 2


@pytest.mark.slow
async def test_a_key_the_journal_cannot_write_is_returned_and_written_later(
    emulator: EmulatorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 9 item 9 on any machine: the key's write fails (the file is write-locked by
    another connection past SQLite's 5 s wait), the failed commit reaches its waiter, and
    submit() still returns the job and keeps the key in memory (a WARNING names it); the key
    is written again in the background, and lands once the lock is gone. (The listing of such
    a key by uncertain_submits() is checked on a full disk, below.)"""
    journal = tmp_path / "jobs.sqlite"
    faults = FaultConfig(slow_reply=1.0, slow_reply_s=0.2, endpoints=frozenset({"generations"}))
    async with emulator(faults=faults) as emu, make_client(emu, journal=journal) as client:
        submit = asyncio.create_task(client.images.submit(prompt="x", model="dall-e-2"))
        await _at_gateway(emu, 1)
        with _write_locked(journal):
            job = await asyncio.wait_for(submit, 15)
        assert f"accepted a submit as {job.key} but the journal could not" in caplog.text
        assert (await job.result(timeout=10)).status == 4
        assert await eventually(lambda: _no_uncertain(client))
        [row] = await client.journal_entries()
        assert row.job_key == job.key and row.state == "succeeded"


async def _no_uncertain(client: WujieClient) -> bool:
    return await client.uncertain_submits() == []


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (needs root or CAP_SYS_ADMIN); skipped where it cannot be mounted."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10)


def _fill(directory: Path) -> None:
    """Write until the filesystem is full, to the last byte."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (64 * 1024, 4096, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


async def test_disk_full_never_drops_a_paid_key(emulator: EmulatorFactory, small_fs: Path) -> None:
    """Issue 9 item 9 on a real 1 MiB filesystem: the disk fills while a submit is out."""
    journal = small_fs / "jobs.sqlite"
    faults = FaultConfig(slow_reply=1.0, slow_reply_s=0.2, endpoints=frozenset({"generations"}))
    async with emulator(faults=faults) as emu:
        async with make_client(emu, journal=journal) as client:
            submit = asyncio.create_task(client.images.submit(prompt="paid", model="dall-e-2"))
            await _at_gateway(emu, 1)
            _fill(small_fs)
            job = await asyncio.wait_for(submit, 10)  # returned, not lost
            [listed] = await client.uncertain_submits()
            assert listed.job_key == job.key and "full" in (listed.error or "")
            # Nothing else is sent while the journal cannot record it.
            with pytest.raises(ClientStateError, match="not sent"):
                await asyncio.wait_for(client.images.submit(prompt="x", model="dall-e-2"), 10)
            assert emu.stats()["requests"]["generations"] == 1
            assert (await job.result(timeout=10)).status == 4
        # aclose() above did not hang on the failing journal.
        (small_fs / "filler").unlink()
        async with make_client(emu, journal=journal) as client:
            [row] = await client.uncertain_submits()  # the intent of a run that lost its key
            assert row.request["prompt"] == "paid"
            # Its key, found since (the console, a manifest), makes the row accepted: resume()
            # collects the job, and the key is no other row's.
            with pytest.raises(InvalidRequestError, match="key"):
                await client.record_submit_key(row.id, "not a key")
            assert await client.record_submit_key(row.id, job.key)
            assert not await client.record_submit_key(row.id, job.key)  # accepted now
            [accepted] = await client.journal_entries("accepted")
            assert (accepted.id, accepted.job_key) == (row.id, job.key)
            assert await client.uncertain_submits() == []
            [resumed] = await client.resume()
            assert resumed.key == job.key and (await resumed.result(timeout=10)).status == 4


@pytest.mark.long
async def test_close_stops_waiting_for_a_frozen_disk_and_its_records_land_after_the_thaw(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The journal's file system freezes (``fsfreeze``: every write blocks, as on a hung NFS
    mount) with two records of a job queued. ``close()`` returns within its deadline with a
    WARNING naming the file, the records not committed and their key; the worker, left to
    its commit, writes them in order once the disk thaws and then lets the lock go. Closing
    waited for the last commit with no deadline: held for as long as the disk stayed frozen."""
    caplog.set_level(logging.WARNING, logger="wujie_async")
    with freezable_disk(tmp_path / "disk") as disk:
        path = disk / "jobs.sqlite"
        journal = Journal(path)
        await journal.open()
        row = await journal.record_intent("/generations", {"prompt": "a fox"}, tag="fox")
        worker = journal._worker._thread
        assert worker is not None
        with freeze(disk):
            journal.record_accepted_later(row, "KEY-FROZEN")
            journal.record_outcome("KEY-FROZEN", "succeeded")  # lands only after the key
            with anyio.fail_after(10):  # its deadline is 2 s
                await journal.close()
            # Queued after the freeze: the disk has taken neither, the worker waits on it.
            assert worker.is_alive()
            assert journal.uncommitted_keys() == ["KEY-FROZEN"]
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(
                str(path) in text and "2 record(s) not committed" in text and "KEY-FROZEN" in text
                for text in warnings
            ), warnings
        await anyio.to_thread.run_sync(worker.join, 30)
        assert not worker.is_alive(), "the worker did not finish once the disk thawed"
        assert journal.uncommitted_keys() == []
        async with JournalFile(path) as again:  # the lock was let go
            (entry,) = await again.entries()
        assert (entry.state, entry.job_key) == ("succeeded", "KEY-FROZEN")


async def test_a_key_the_journal_holds_on_an_earlier_row_is_refused_by_itself(
    tmp_path: Path,
) -> None:
    """A gateway whose key counter was reset (a restart) hands an earlier run's key out
    again. Before: the new submit was followed as that job, and the journal held the key on
    two rows, so the earlier job's row, still ``accepted`` (its run was stopped), was closed
    with the new job's outcome, and its own images were never collected. Now the journal
    itself refuses the key, without ``refuse_keys``: the submit may have been charged
    (``SubmitUncertainError``, its row ``uncertain``), and the earlier row is resumed."""
    path = tmp_path / "jobs.sqlite"

    def client_of(base_url: str) -> WujieClient:
        return WujieClient(
            throwaway_credentials(), base_url=base_url, retry=INSTANT_RETRY, journal=path
        )

    # One gateway (one base URL: a journal row is resumed from its own gateway only), whose
    # restart resets its key counter, and whose jobs are done by then.
    script = [all_running, images_at("https://cdn.example/a.png")]
    async with scripted_gateway(lambda keys: script[0](keys)) as gateway:
        async with client_of(gateway.base_url) as client:
            earlier = await client.images.submit(prompt="earlier", model="dall-e-2")
        gateway.submits, script[0] = 0, script[1]  # restarted
        async with client_of(gateway.base_url) as client:
            with pytest.raises(SubmitUncertainError, match="earlier job in the journal") as refused:
                await client.images.submit(prompt="new", model="dall-e-2")
            assert earlier.key in str(refused.value) and gateway.submits == 1
            [uncertain] = await client.uncertain_submits()
            assert uncertain.request["prompt"] == "new" and uncertain.job_key is None
            [job] = await client.resume()
            assert job.key == earlier.key and job.request is not None
            assert job.request["prompt"] == "earlier"
            await asyncio.wait_for(job, 10)
    async with JournalFile(path) as journal:
        rows = {row.request["prompt"]: row for row in await journal.entries()}
    assert rows["earlier"].state == "succeeded" and rows["new"].state == "uncertain"


@pytest.mark.long
async def test_a_client_names_the_keys_its_journal_did_not_commit(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """``WujieClient.uncommitted_journal_keys()``: none without a journal, none once a healthy
    journal committed; the key of a job that ended while the journal's disk was frozen after
    a close that stopped waiting for it, and none again once the disk thawed and the worker
    wrote it."""
    async with emulator(time_scale=1.0, job_seconds=(1.0, 1.0)) as emu:
        async with make_client(emu) as plain:
            assert plain.uncommitted_journal_keys() == []
        with freezable_disk(tmp_path / "disk") as disk:
            client = make_client(emu, journal=disk / "jobs.sqlite")
            assert client.uncommitted_journal_keys() == []  # unopened
            async with client:
                job = await client.images.submit(prompt="a fox", model="dall-e-2")
                assert client.uncommitted_journal_keys() == []  # its key is committed
                with freeze(disk):
                    assert (await job.result(timeout=10)).status == 4  # its end is queued
                    with anyio.fail_after(10):  # the journal's close waits 2 s
                        await client.aclose()
                    assert client.uncommitted_journal_keys() == [job.key]
            await eventually(
                lambda: client.uncommitted_journal_keys() == [],
                what="the record committed once the disk thawed",
            )


async def test_a_record_a_submit_waited_for_is_not_listed_as_uncommitted(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """The worker told the waiters first and forgot the records after: a submit that resumed
    at once (a loaded machine) found its own committed key in uncommitted_journal_keys()."""
    async with (
        emulator(time_scale=1.0, job_seconds=(30.0, 30.0)) as emu,
        make_client(emu, journal=tmp_path / "jobs.sqlite") as client,
    ):
        listed = []
        for index in range(200):
            job = await client.images.submit(prompt=f"fox {index}", model="dall-e-2")
            if job.key in client.uncommitted_journal_keys():
                listed.append(job.key)
            job.cancel()
        assert listed == []


@pytest.mark.parametrize("job_timeout", [-1, 0, True, float("nan"), float("inf"), "30"])
async def test_resume_refuses_a_bad_job_timeout_with_no_row_to_use_it(
    emulator: EmulatorFactory, tmp_path: Path, job_timeout: object
) -> None:
    """It was checked only once a row was attached: a consumer's resume(job_timeout=-1) on an
    empty journal passed, and failed only the day a row was there."""
    async with emulator() as emu, make_client(emu, journal=tmp_path / "j.sqlite") as client:
        with pytest.raises(InvalidRequestError) as info:
            await client.resume(job_timeout=job_timeout)  # type: ignore[arg-type]
        assert info.value.field == "job_timeout"
