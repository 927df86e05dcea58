"""Paid work is never lost, round 3: file names, bad journal rows, SIGTERM, re-runs without a
journal, journal papercuts and honest progress, each against an emulator over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import resource
import shlex
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import anyio
import pytest

from wujie_async.cli._signals import TERM_GRACE_S

from .cli_helpers import (
    FAST,
    Served,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    final_outcomes,
    keys_in_rows_after_a_refusal,
    manifest,
    proc_alive,
    reserve_size,
    running_cli,
    served_emulator,
)
from .conftest import EmulatorFactory, make_client
from .helpers import eventually, full_disk

pytestmark = pytest.mark.anyio


def accepted_at_least(emu: Served, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return int((await emu.stats())["submits_accepted"]) >= count

    return check


def submits_arrived(emu: Served, count: int = 1) -> Callable[[], Awaitable[bool]]:
    """Submits the emulator received, answered or not (one held by ``slow_reply`` counts)."""

    async def check() -> bool:
        return int((await emu.stats())["requests"].get("generations", 0)) >= count

    return check


def write_rows(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- 1 and 2: file names are checked before anything is sent -------------------------------------
@pytest.mark.long
@pytest.mark.parametrize(
    ("ids", "says"),
    [
        (["a/b", "a_b"], "would both be saved as 'a_b-0.{ext}'"),
        ([".", ".."], "would both be saved as '_-0.{ext}'"),
        (["ok", "L" * 300], "longer than 255 bytes"),
    ],
)
async def test_names_that_could_not_be_saved_are_refused_before_any_submit(
    tmp_path: Path, ids: list[str], says: str
) -> None:
    rows = write_rows(tmp_path / "rows.jsonl", [{"id": i, "prompt": f"p {i}"} for i in ids])
    async with served_emulator(tmp_path) as emu:
        code, _, err = await cli(
            "bulk", str(rows), "--name", "{id}-{index}.{ext}", "-o", str(tmp_path / "out"),
            env=emu.env,
        )  # fmt: skip
        assert code == 2, err
        assert says in err and "nothing was sent" in err
        assert (await emu.stats())["submits_accepted"] == 0
    assert manifest(tmp_path / "out") == []


async def test_images_of_one_job_never_share_a_name(tmp_path: Path) -> None:
    rows = write_rows(tmp_path / "rows.jsonl", [{"id": "x", "prompt": "p", "n": 2}])
    code, _, err = await cli(
        "bulk", str(rows), "--name", "{id}.{ext}", "--emulator", *FAST, "-o", str(tmp_path / "o")
    )
    assert code == 2 and "its images 0 and 1 would both be saved as 'x.{ext}'" in err


async def test_no_image_may_take_the_manifest_s_name(tmp_path: Path) -> None:
    rows = write_rows(tmp_path / "rows.jsonl", [{"id": "manifest.jsonl", "prompt": "p"}])
    code, _, err = await cli(
        "bulk", str(rows), "--name", "{id}", "--emulator", *FAST, "-o", str(tmp_path / "o")
    )
    assert code == 2 and "the run's own file" in err


# --- 3: one bad journal row does not strand the others -------------------------------------------
async def test_resume_skips_a_row_with_an_unusable_key_and_resumes_the_rest(
    emulator: EmulatorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = tmp_path / "jobs.sqlite"
    async with emulator(time_scale=1.0) as emu:
        async with make_client(emu, journal=journal) as client:
            jobs = [await client.images.submit(prompt=f"{i}", model="dall-e-2") for i in range(3)]
        with sqlite3.connect(journal) as db:
            for bad in ("KEY\nX", "K" * 200):
                db.execute(
                    "INSERT INTO submits (path, request, state, job_key, created, updated) "
                    "VALUES ('/ai/wj/images/generations', '{}', 'accepted', ?, 0, 0)",
                    (bad,),
                )
        caplog.set_level(logging.WARNING, logger="wujie_async")
        async with make_client(emu, journal=journal) as client:
            resumed = await client.resume()
            assert sorted(job.key for job in resumed) == sorted(job.key for job in jobs)
            for job in resumed:
                job.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("2 journal row(s)" in text and "row id 4, 5" in text for text in warnings)


@pytest.mark.long
async def test_the_cli_resume_and_journal_list_go_past_a_bad_row(tmp_path: Path) -> None:
    async with served_emulator(tmp_path, "--time-scale", "0.1") as emu:
        prompts = tmp_path / "p.txt"
        prompts.write_text("one\ntwo\n")
        out = tmp_path / "out"
        async with running_cli("bulk", str(prompts), "-o", str(out), env=emu.env) as proc:
            await eventually(accepted_at_least(emu, 2), what="2 submits", alive=proc_alive(proc))
            proc.send_signal(signal.SIGINT)
            code, _, err = await proc.finish(20)
        assert code == 130, err
        journal = out / "journal.sqlite"
        with sqlite3.connect(journal) as db:
            db.execute(
                "INSERT INTO submits (path, request, state, job_key, tag, created, updated) "
                "VALUES ('/ai/wj/images/generations', '{}', 'accepted', 'KEY\nX', 'id:bad', 0, 0)"
            )
        code, listing, err = await cli("journal", "list", "--journal", str(journal))
        assert code == 0, err
        assert "'KEY_X' (not a usable key)" in listing or "(not a usable key)" in listing
        assert "3 row(s)" in listing
        code, _, err = await cli("resume", str(journal), "--out", str(out), env=emu.env)
        assert code == 1, err  # the bad row ends failed; the two good ones are saved
        assert "warning: 1 journal row(s) hold a job key that is not usable (row id 3)" in err
        assert sorted(final_outcomes(out).values()).count("saved") == 2


# --- 6: SIGTERM stops like Ctrl-C -----------------------------------------------------------------
@pytest.mark.long
async def test_sigterm_stops_gently_says_how_to_continue_and_a_rerun_pays_nothing_twice(
    tmp_path: Path,
) -> None:
    async with served_emulator(tmp_path, "--time-scale", "0.05") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(f"terminated {i}" for i in range(20)))
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), "--rate", "5"]
        async with running_cli(*bulk, "--json", env=emu.env) as proc:
            await eventually(accepted_at_least(emu, 3), what="3 submits", alive=proc_alive(proc))
            proc.send_signal(signal.SIGTERM)
            code, stdout, err = await proc.finish(30)
        assert code == 143, err
        assert "SIGTERM: stopping" in err and "line(s):" in err  # the summary
        assert "stopped by SIGTERM" in err and f"resume {out / 'journal.sqlite'}" in err
        summary = json.loads(stdout)
        assert summary["exit_code"] == 143
        # Every row and record reached its disk: no key to keep by hand.
        assert summary["manifest_unwritten_keys"] == summary["journal_uncommitted_keys"] == []
        accepted = (await emu.stats())["submits_accepted"]
        assert 0 < accepted < 20

        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        assert sorted(final_outcomes(out).values()) == ["saved"] * 20
        assert (await emu.stats())["submits_accepted"] == 20  # nothing paid twice


@pytest.mark.long
async def test_sigterm_quits_within_its_grace_when_a_submit_hangs(tmp_path: Path) -> None:
    """The gateway holds every submit's reply for a minute: after a SIGTERM the run waits
    TERM_GRACE_S for it (not Timeouts.request), then quits as at a second signal, within
    docker stop's 10 s; the line ends uncertain (it may have been charged), summary printed."""
    hang = ("--slow-reply", "1", "--slow-reply-s", "60", "--endpoints", "generations")
    async with served_emulator(tmp_path, *hang) as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("hanging\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), "--json"]
        async with running_cli(*bulk, env=emu.env) as proc:
            await eventually(submits_arrived(emu), what="the submit", alive=proc_alive(proc))
            proc.send_signal(signal.SIGTERM)
            code, stdout, err = await proc.finish(TERM_GRACE_S + 5)  # not 30 s
        assert code == 143, err
        assert json.loads(stdout)["outcomes"]["uncertain"] == 1
        assert "line 1" in err and "uncertain" in err


async def set_faults(emu: Served, faults: dict[str, object]) -> None:
    origin = emu.base_url.removesuffix("/wj-open/v1")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{origin}/_emulator/faults", json=faults) as reply:
            assert reply.status == 200, await reply.text()


@pytest.mark.long
async def test_a_line_not_sent_then_sent_by_a_killed_run_reads_uncertain(tmp_path: Path) -> None:
    """Run 1 leaves the line not_sent (over the budget); run 2 sends it and is killed while
    the submit is on the wire (the journal says uncertain); run 3 must not leave the manifest
    saying not_sent (nothing charged, a re-run sends it): the line reads uncertain there too,
    as in the journal and the summary, and is not sent again."""
    async with served_emulator(tmp_path) as emu:
        prompts = tmp_path / "one.txt"
        prompts.write_text("a lighthouse\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), "--json"]
        bulk += ["--point-price", "dall-e-2=2", "--progress", "none"]
        code, _, err = await cli(*bulk, "--max-points", "1", env=emu.env)
        assert code == 1 and final_outcomes(out) == {1: "not_sent"}, err

        await set_faults(emu, {"slow_reply": 1, "slow_reply_s": 60, "endpoints": ["generations"]})
        async with running_cli(*bulk, "--max-points", "10", env=emu.env) as proc:
            await eventually(submits_arrived(emu), what="the submit", alive=proc_alive(proc))
            proc.send_signal(signal.SIGKILL)
            await proc.finish(10)
        await set_faults(emu, {})

        code, stdout, err = await cli(*bulk, "--max-points", "10", env=emu.env)
        assert code == 1, err
        assert json.loads(stdout)["outcomes"]["uncertain"] == 1
        assert final_outcomes(out) == {1: "uncertain"}
        assert (await emu.stats())["requests"]["generations"] == 1  # never sent again


@pytest.mark.long
@pytest.mark.parametrize("journal", [[], ["--no-journal"]])
async def test_retry_uncertain_resends_uncertain_lines_only_when_asked(
    tmp_path: Path, journal: list[str]
) -> None:
    """Every submit's reply is lost (the job exists): the line ends uncertain, and a plain
    re-run never resends it; --retry-uncertain does (the user checked the console), with or
    without a journal, and the journal's old uncertain row is superseded."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1") as emu:
        prompts = tmp_path / "one.txt"
        prompts.write_text("a lighthouse\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), *journal]
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 1 and final_outcomes(out) == {1: "uncertain"}, err
        assert "--retry-uncertain" in err
        await set_faults(emu, {})
        prompts.write_text("a lighthouse\na harbour\n")  # a line added: sent by the re-run
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 1 and final_outcomes(out) == {1: "uncertain", 2: "saved"}, err
        assert (await emu.stats())["submits_accepted"] == 2  # never resent unasked
        assert "skipping 1 line(s)" in err and "uncertain ones are never resent" in err, err
        code, _, err = await cli(*bulk, "--retry-uncertain", env=emu.env)
        assert code == 0 and final_outcomes(out) == {1: "saved", 2: "saved"}, err
        assert (await emu.stats())["submits_accepted"] == 3  # paid again, as asked
        # The saved line is skipped, and the words say what this mode does with the other.
        assert "skipping 1 line(s)" in err and "never resent" not in err, err
        assert "uncertain ones are sent again (--retry-uncertain)" in err, err
        if journal:  # --no-journal
            return
        code, listed, err = await cli(
            "journal", "list", "--status", "uncertain", "--journal", str(out / "journal.sqlite")
        )
        assert code == 0 and "a lighthouse" not in listed, (listed, err)


@pytest.mark.long
async def test_lines_refused_for_the_rate_are_sent_by_a_plain_rerun(tmp_path: Path) -> None:
    """A 429 storm on submits outlasts the client's retries: nothing was created, so the lines
    end not_sent (not rejected, which only --retry-failed resends) and the re-run sends them."""
    faults = ("--http-429", "1", "--endpoints", "generations", "--retry-after-s", "0")
    async with served_emulator(tmp_path, *faults) as emu:
        prompts = tmp_path / "two.txt"
        prompts.write_text("a\nb\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), "--json"]
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 1 and final_outcomes(out) == {1: "not_sent", 2: "not_sent"}, err
        assert {r["error_code"] for r in manifest(out)} == {"http_429"}
        assert (await emu.stats())["submits_accepted"] == 0
        await set_faults(emu, {})
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0 and final_outcomes(out) == {1: "saved", 2: "saved"}, err
        assert (await emu.stats())["submits_accepted"] == 2


@pytest.mark.long
async def test_resume_writes_the_input_line_of_an_id_row(tmp_path: Path) -> None:
    """An id row's journal tag holds no line number: resume takes it from the manifest."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "3,3") as emu:
        rows = write_rows(
            tmp_path / "rows.jsonl",
            [{"id": "alpha", "prompt": "first"}, {"prompt": "second"}],
        )
        out = tmp_path / "out"
        bulk = ["bulk", str(rows), "--model", "dall-e-2", "-o", str(out)]
        async with running_cli(*bulk, env=emu.env) as proc:
            await eventually(accepted_at_least(emu, 2), what="2 submits", alive=proc_alive(proc))
            proc.send_signal(signal.SIGTERM)
            code, _, err = await proc.finish(10)
        assert code == 143, err
        code, _, err = await cli("resume", str(out / "journal.sqlite"), "-o", str(out), env=emu.env)
        assert code == 0, err
    by_line = {(r.get("id"), r["line"]) for r in manifest(out)}
    assert by_line == {("alpha", 1), (None, 2)}, by_line


@pytest.mark.long
async def test_sigterm_sends_no_line_that_was_waiting_for_room(tmp_path: Path) -> None:
    """Lines taken by a submitter but waiting for --max-in-flight room are not sent after
    the signal: the run ends at once (not when a job ends), they end not_sent, and the
    re-run sends them."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "20,20") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(f"waiting {i}" for i in range(6)))
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out)]
        async with running_cli(*bulk, "--max-in-flight", "2", "--json", env=emu.env) as proc:
            await eventually(accepted_at_least(emu, 2), what="2 submits", alive=proc_alive(proc))
            proc.send_signal(signal.SIGTERM)
            code, stdout, err = await proc.finish(10)  # the jobs take 20 s: not waited for
        assert code == 143, err
        assert (await emu.stats())["submits_accepted"] == 2  # nothing sent after the signal
        outcomes = json.loads(stdout)["outcomes"]
        assert outcomes["not_sent"] == 4 and outcomes["uncertain"] == 0, outcomes


@pytest.mark.long
async def test_sigterm_without_a_journal_leaves_the_keys_and_a_rerun_pays_nothing_twice(
    tmp_path: Path,
) -> None:
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "3,3") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(f"running {i}" for i in range(3)))
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), "--no-journal"]
        async with running_cli(*bulk, env=emu.env) as proc:
            await eventually(accepted_at_least(emu, 3), what="3 submits", alive=proc_alive(proc))
            proc.send_signal(signal.SIGTERM)
            code, _, err = await proc.finish(10)
        assert code == 143, err
        pending = [r for r in manifest(out) if r["status"] == "pending"]
        assert len(pending) == 3 and all(r["error_code"] == "interrupted" for r in pending)
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        assert sorted(final_outcomes(out).values()) == ["saved"] * 3
        assert (await emu.stats())["submits_accepted"] == 3  # collected by key, never resent


@pytest.mark.long
@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
async def test_lines_added_above_resend_nothing(tmp_path: Path, journal: bool) -> None:
    """A .txt row is known by its line and request: when lines are added above it (a header,
    a new prompt), its request still recognises it, and only the new line is sent."""
    async with served_emulator(tmp_path) as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a cat\na dog\na cat\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out)]
        if not journal:
            bulk.append("--no-journal")
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        prompts.write_text("# my batch\na fox\na cat\na dog\n\na cat\n")
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        # "a cat" on line 3 is where it was; "a dog" and the second "a cat" moved.
        assert "2 line(s) moved since they were recorded" in err
        assert (await emu.stats())["submits_accepted"] == 4  # 3, then only "a fox"
        assert len(list(out.glob("*.png"))) == 4


@pytest.mark.long
async def test_a_full_disk_with_the_default_journal_is_refused_the_same_way(
    tmp_path: Path,
) -> None:
    """The room is set aside before the journal is opened on that disk: exit 2, one message."""
    async with served_emulator(tmp_path) as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("full\n")
        with full_disk(tmp_path / "disk") as disk:
            out = disk / "out"
            out.mkdir()
            code, _, err = await cli("bulk", str(prompts), "-o", str(out), env=emu.env)
        assert code == 2, err
        assert "no room on its disk" in err and "nothing was sent" in err
        assert (await emu.stats())["submits_accepted"] == 0


@pytest.mark.long
async def test_a_key_the_full_disk_refused_is_on_disk_before_a_kill(tmp_path: Path) -> None:
    """Without a journal, a job's key refused by a disk that just filled is written at once
    (with room set aside for it), not held in memory until the run ends: a run killed outright
    then pays for no line again."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "30,30") as emu:
        prompts = tmp_path / "prompts.txt"
        # Long prompts: rows of 3 KB, so the full disk refuses the next one (tmpfs pages).
        prompts.write_text("".join(f"kill {i} {'x' * 3000}\n" for i in range(10)))
        with full_disk(tmp_path / "disk", size="1m", fill=False) as disk:
            out = disk / "out"
            bulk = ["bulk", str(prompts), "-o", str(out), "--no-journal", "--rate", "2"]
            async with running_cli(*bulk, env=emu.env) as run:
                await eventually(accepted_at_least(emu, 2), what="2 submits", alive=proc_alive(run))
                reserved = reserve_size(out)
                assert reserved > 0  # set aside before anything was sent

                def fill() -> None:
                    with (
                        (disk / "filler").open("wb", buffering=0) as filler,
                        contextlib.suppress(OSError),
                    ):
                        while True:
                            filler.write(bytes(4096))

                await anyio.to_thread.run_sync(fill)

                await eventually(
                    keys_in_rows_after_a_refusal(emu, out, reserved),
                    what="every key, a row refused",
                    alive=proc_alive(run),
                )
                run.send_signal(signal.SIGKILL)
                await run.finish(10)
            sent = (await emu.stats())["submits_accepted"]
            assert sent < 10
            (disk / "filler").unlink()
            code, _, err = await cli(*bulk, "--job-timeout", "0.3", env=emu.env)
            assert code == 1, err  # the jobs out time out: collected later
            assert (await emu.stats())["submits_accepted"] == 10  # each line paid once


@pytest.mark.long
async def test_a_disk_that_fills_mid_run_still_records_every_paid_job(tmp_path: Path) -> None:
    """Images fill the disk mid-run: the run stops sending, and the rows of the jobs still out
    (keys included) are written once their downloads end (room was set aside for them), so
    the re-run the summary advises collects them rather than paying for their lines again,
    without a journal too."""
    async with served_emulator(tmp_path, "--time-scale", "0.05") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("".join(f"disk {i}\n" for i in range(40)))
        with full_disk(tmp_path / "disk", size="300k", fill=False) as disk:
            out = disk / "out"
            bulk = ["bulk", str(prompts), "-o", str(out), "--no-journal", "--rate", "10"]
            code, _, err = await cli(*bulk, env=emu.env)
            assert code == 3, err
            # An image or the manifest (whichever the disk refuses first) stops the run.
            assert "could not be saved" in err or "could not be written" in err
            assert "nothing more was sent" in err
            assert "could not record" not in err  # every row written in the end
            sent = (await emu.stats())["submits_accepted"]
            assert 0 < sent <= 40  # the disk usually fills first (not on a slow machine)
            assert not (out / ".wujie-async.reserve").exists()
            remount = ["mount", "-o", "remount,size=8m", str(disk)]
            await anyio.to_thread.run_sync(lambda: subprocess.run(remount, check=True))
            code, _, err = await cli(*bulk, env=emu.env)
            assert code == 0, err
            assert (await emu.stats())["submits_accepted"] == 40  # each line paid once
            assert sorted(set(final_outcomes(out).values())) == ["saved"]


@pytest.mark.long
async def test_a_disk_too_full_for_images_but_not_for_rows_stops_the_run(tmp_path: Path) -> None:
    """Images refused for the disk's sake while the manifest rows still fit: every later job
    would be paid for and refused the same way, so the first refusal stops the run (it went
    on sending every line before) and the re-run collects the jobs by key."""
    async with served_emulator(tmp_path, "--time-scale", "0.05") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("".join(f"room {i}\n" for i in range(40)))
        # About 106 KB set aside for the rows, then room for two images of 34 KB: the third
        # is refused, and the rows (a few hundred bytes each) keep fitting.
        with full_disk(tmp_path / "disk", size="200k", fill=False) as disk:
            out = disk / "out"
            bulk = ["bulk", str(prompts), "-o", str(out), "--no-journal"]
            code, _, err = await cli(*bulk, "--rate", "2", env=emu.env)
            assert code == 3, err
            assert "stopped: an image could not be saved (No space left on device)" in err
            assert "nothing more was sent" in err and "could not record" not in err
            # About 4 sent here; 21 before, when only the manifest's refusal stopped the run.
            sent = (await emu.stats())["submits_accepted"]
            assert 0 < sent <= 12
            outcomes = final_outcomes(out)
            assert list(outcomes.values()).count("not_sent") == 40 - sent
            remount = ["mount", "-o", "remount,size=8m", str(disk)]
            await anyio.to_thread.run_sync(lambda: subprocess.run(remount, check=True))
            code, _, err = await cli(*bulk, "--rate", "20", env=emu.env)
            assert code == 0, err
            assert (await emu.stats())["submits_accepted"] == 40  # each line paid once
            assert sorted(set(final_outcomes(out).values())) == ["saved"]


@pytest.mark.long
async def test_a_disk_with_no_room_for_the_manifest_is_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    """Without room for the manifest rows a run would pay for jobs it cannot record: a disk
    already full is refused up front (the room a run sets aside cannot be taken)."""
    with full_disk(tmp_path / "disk") as disk:
        out = disk / "out"
        out.mkdir()
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(f"full {i}" for i in range(4)))
        code, _, err = await cli(
            "bulk", str(prompts), "--emulator", *FAST, "-o", str(out), "--no-journal",
            "--concurrency", "1", "--json",
        )  # fmt: skip
        assert code == 2, err
        assert "Traceback" not in err and "internal error" not in err
        assert "no room on its disk" in err and "nothing was sent" in err
        assert not (out / ".wujie-async.reserve").exists()


@pytest.mark.long
async def test_a_file_size_limit_under_the_manifests_room_is_named_as_such(tmp_path: Path) -> None:
    """Files may not grow past 32 KB (RLIMIT_FSIZE): the room a run sets aside for its
    manifest cannot be taken, and the refusal says why ("File too large"), not "no room on
    its disk" of a disk with gigabytes free. Nothing is sent."""
    async with served_emulator(tmp_path) as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("".join(f"prompt {i}\n" for i in range(3)))
        out = tmp_path / "out"

        def small_files() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, resource.RLIM_INFINITY))

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wujie_async", "bulk", str(prompts), "-o", str(out),
            "--no-journal", env=emu.env, preexec_fn=small_files,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        err = stderr.decode()
        assert proc.returncode == 2, err
        assert "no room on its disk" not in err, err
        assert "File too large" in err and "nothing was sent" in err, err
        assert (await emu.stats())["submits_accepted"] == 0


@pytest.mark.long
async def test_an_id_row_changed_after_its_job_was_sent_says_so_and_is_not_stuck(
    tmp_path: Path,
) -> None:
    async with served_emulator(tmp_path) as emu:
        rows: list[dict[str, object]] = [
            {"id": "fox", "prompt": "a fox"},
            {"id": "cat", "prompt": "a cat", "n": 1},
        ]
        file = write_rows(tmp_path / "rows.jsonl", rows)
        out = tmp_path / "out"
        bulk = ["bulk", str(file), "--model", "dall-e-2", "-o", str(out)]
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        rows = [{"id": "fox", "prompt": "a red fox"}, {"id": "cat", "prompt": "a cat", "n": 2}]
        write_rows(file, rows)
        for _ in range(2):  # the same each time: nothing sent, nothing stuck
            code, _, err = await cli(*bulk, env=emu.env)
            assert code == 0, err
            assert "2 row(s) with an id changed since their jobs were sent" in err
        assert (await emu.stats())["submits_accepted"] == 2
        assert len(list(out.glob("*.png"))) == 2


@pytest.mark.long
async def test_a_settled_line_the_manifest_lacks_is_recorded_by_the_rerun(tmp_path: Path) -> None:
    """A run killed after the journal knew a line's fate but before the manifest did: the
    re-run writes that line's outcome (here: uncertain, never resent)."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("lost reply\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), "--json"]
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 1, err
        assert final_outcomes(out) == {1: "uncertain"}
        (out / "manifest.jsonl").unlink()  # as if killed before the row was written
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 1, err
        assert json.loads(stdout)["outcomes"]["uncertain"] == 1
        assert final_outcomes(out) == {1: "uncertain"}
        (record,) = manifest(out)
        assert record["error_code"] and record["error"]
        assert (await emu.stats())["submits_accepted"] == 1  # never resent


@pytest.mark.long
async def test_a_name_an_earlier_job_saved_under_is_never_overwritten(tmp_path: Path) -> None:
    async with served_emulator(tmp_path) as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a cat\na dog\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out)]
        bulk += ["--name", "{line}-{index}.{ext}"]
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        prompts.write_text("a cat\na bird\n")  # line 2 is a new row, named like the old one
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
    saved = [r for r in manifest(out) if r["status"] == "saved"]
    assert len(saved) == 3 and len({r["path"] for r in saved}) == 3
    for record in saved:  # every file the manifest names is still the one it recorded
        body = (out / record["path"]).read_bytes()
        assert hashlib.sha256(body).hexdigest() == record["sha256"], record["path"]
    bird = next(r for r in saved if r["prompt"] == "a bird")
    assert bird["path"] == f"2-0-{bird['key']}.png"


# --- 7: re-runs without a journal continue the manifest ------------------------------------------
@pytest.mark.long
async def test_a_rerun_without_a_journal_continues_and_another_input_is_refused(
    tmp_path: Path,
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    out = tmp_path / "out"
    run = ("bulk", str(prompts), "--emulator", *FAST, "-o", str(out))
    code, _, err = await cli(*run)
    assert code == 0, err
    code, _, err = await cli(*run)
    assert code == 0, err
    assert "skipping 3 line(s)" in err
    assert len(list(out.glob("*.png"))) == 3 and len(manifest(out)) == 3
    assert {record["input"] for record in manifest(out)} == {str(prompts.resolve())}

    other = tmp_path / "other.txt"
    other.write_text("d\n")
    code, _, err = await cli("bulk", str(other), "--emulator", *FAST, "-o", str(out))
    assert code == 2 and "holds the manifest of another input" in err
    assert len(manifest(out)) == 3


# --- 9: journal papercuts ------------------------------------------------------------------------
async def test_journal_commands_refuse_a_file_that_is_not_a_journal_and_create_nothing(
    tmp_path: Path,
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# not a journal\n")
    for command in (["journal", "list"], ["journal", "forget", "1", "--yes"]):
        code, _, err = await cli(*command, "--journal", str(readme))
        assert code == 2 and "is not a wujie-async journal" in err, err
    code, _, err = await cli("resume", str(readme), "--emulator")
    assert code == 2 and "is not a wujie-async journal" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


async def test_a_run_folder_given_for_its_journal_names_the_journal_in_it(
    tmp_path: Path,
) -> None:
    # `resume out/` (the folder, not its journal) said "out: cannot read it (Is a directory)".
    out = tmp_path / "out"
    out.mkdir()
    (out / "journal.sqlite").write_bytes(b"")
    code, _, err = await cli("resume", str(out), "--emulator")
    assert code == 2, err
    assert f"{out} is a folder, not a journal" in err, err
    assert f"wujie-async resume {out / 'journal.sqlite'} -o {out}" in err, err
    code, _, err = await cli("journal", "list", "--journal", str(out))
    assert code == 2 and f"--journal {out / 'journal.sqlite'}, or -o {out}" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["journal.sqlite"]


async def test_forget_names_rows_it_does_not_know_and_forgets_nothing(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.sqlite"
    async with emulator() as emu, make_client(emu, journal=journal) as client:
        await client.images.generate(prompt="a", model="dall-e-2", tag="line:1:abc")
    code, _, err = await cli("journal", "forget", "1", "999", "nosuchid", "--yes",
                             "--journal", str(journal))  # fmt: skip
    assert (
        code == 2 and "no journal row for 999, nosuchid" in err and "nothing was forgotten" in err
    )
    code, listing, _ = await cli("journal", "list", "--journal", str(journal))
    assert code == 0 and "1 row(s)" in listing


async def test_forget_takes_rows_as_journal_list_prints_them(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    # `journal list` prints "line 4" and "id fox"; pasted into `journal forget` they read
    # "no journal row for line 4", though line 4 was right there.
    journal = tmp_path / "journal.sqlite"
    async with emulator() as emu, make_client(emu, journal=journal) as client:
        await client.images.generate(prompt="a", model="dall-e-2", tag="line:4:abc")
        await client.images.generate(prompt="b", model="dall-e-2", tag="id:fox")
    code, listing, _ = await cli("journal", "list", "--journal", str(journal))
    assert code == 0 and "line 4 " in listing and "id fox " in listing, listing
    # The folder named: CI's working directory holds the README's out/ (a run's folder).
    code, _, err = await cli("journal", "forget", "line 4", "id fox", "--yes",
                             "--journal", str(journal), "-o", str(tmp_path))  # fmt: skip
    assert code == 0 and "forgot 2 row(s)" in err, err
    code, listing, _ = await cli("journal", "list", "--journal", str(journal))
    assert code == 0 and "0 row(s)" in listing, listing


async def test_a_journal_in_use_exits_4(emulator: EmulatorFactory, tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite"
    async with emulator() as emu, make_client(emu, journal=journal):
        code, _, err = await cli("journal", "forget", "1", "--yes", "--journal", str(journal))
        assert code == 4 and "in use" in err
        # Listing only reads: it reads beside the writer.
        code, listing, err = await cli("journal", "list", "--journal", str(journal))
        assert code == 0 and "0 row(s)" in listing, err


@pytest.mark.long
@pytest.mark.parametrize("second", [["--no-journal"], ["--journal", "other.sqlite"]])
async def test_a_second_run_into_the_same_out_folder_exits_4_and_pays_nothing(
    tmp_path: Path, second: list[str]
) -> None:
    """Two runs of one input into one --out would each plan from the manifest before the
    other wrote it, and both pay: the second is refused, whatever journal it keeps."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "6,6") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(f"once {i}" for i in range(3)))
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out)]
        async with running_cli(*bulk, "--no-journal", env=emu.env) as first:
            await eventually(accepted_at_least(emu, 3), what="3 submits", alive=proc_alive(first))
            if second[0] == "--journal":
                second = ["--journal", str(tmp_path / second[1])]
            code, _, err = await cli(*bulk, *second, env=emu.env)
            assert code == 4 and "in use by another run (process" in err, err
            assert (await emu.stats())["submits_accepted"] == 3
            first.send_signal(signal.SIGTERM)
            code, _, err = await first.finish(10)
        assert code == 143, err
        code, _, err = await cli(*bulk, "--no-journal", env=emu.env)  # the lock is free again
        assert code == 0, err
        assert (await emu.stats())["submits_accepted"] == 3  # collected by key, never resent


@pytest.mark.long
async def test_a_torn_last_manifest_line_costs_no_other_row(tmp_path: Path) -> None:
    """A crash mid-write leaves a torn last line: the next run's first row starts on a line
    of its own (written onto the torn one, both were unreadable and the work redone, or with
    no key to collect by, paid again, on every run)."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "0.2,0.2") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("first\nsecond\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), "--no-journal"]
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        path = out / "manifest.jsonl"
        text = path.read_text()
        path.write_text(text[: len(text) - 40])  # the last row torn, no newline
        code, _, err = await cli(*bulk, env=emu.env)  # its line is done again
        assert code == 0, err
        code, stdout, err = await cli(*bulk, "--json", env=emu.env)
        assert code == 0, err
        assert json.loads(stdout)["images"] == 0  # nothing left: the last run's rows all read
        assert (await emu.stats())["submits_accepted"] == 2  # collected by key, never resent
        lines = path.read_text().splitlines()
        assert [_parses(line) for line in lines].count(False) == 1
        final = {row["line"]: row["status"] for row in map(json.loads, filter(_parses, lines))}
        assert final == {1: "saved", 2: "saved"}


@pytest.mark.long
async def test_a_manifest_line_torn_inside_a_character_costs_no_other_row(tmp_path: Path) -> None:
    """A row the disk cut short inside a character (a prompt in Chinese: three bytes each) made
    the manifest no UTF-8 text: every later run of the folder, its re-run, `resume` and
    `journal list|forget|resend`, ended "internal error: UnicodeDecodeError" (and a user who
    moved the manifest away to get going paid for every line again). It is a torn line as
    any other: skipped, the rest read."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "0.2,0.2") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("一只狐狸\n一只猫头鹰\n", encoding="utf-8")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out)]
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        path = out / "manifest.jsonl"
        raw = path.read_bytes()
        cut = raw.rindex("猫".encode()) + 1  # inside the last row's prompt's second character
        path.write_bytes(raw[:cut])
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        code, stdout, err = await cli(*bulk, "--json", env=emu.env)
        assert code == 0, err
        assert json.loads(stdout)["images"] == 0  # nothing left: the last run's rows all read
        assert (await emu.stats())["submits_accepted"] == 2  # collected by key, never resent
        code, stdout, err = await cli("journal", "list", "--json", "-o", str(out))
        assert code == 0 and len(stdout.splitlines()) == 2, err
        code, _, err = await cli("journal", "forget", "2", "--yes", "-o", str(out))
        assert code == 0 and "forgot" in err, err


@pytest.mark.long
async def test_without_a_journal_a_run_killed_outright_pays_for_no_line_again(
    tmp_path: Path,
) -> None:
    """``kill -9`` without a journal: the manifest has each accepted job's key from the
    moment it was accepted, so the re-run collects those jobs instead of paying again."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "3,3") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("one\ntwo\nthree\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), "--no-journal"]

        async def keys_recorded() -> bool:
            return len({r.get("key") for r in manifest(out) if r["status"] == "pending"}) == 3

        async with running_cli(*bulk, env=emu.env) as run:
            await eventually(keys_recorded, what="3 keys in the manifest", alive=proc_alive(run))
            run.send_signal(signal.SIGKILL)
            code, _, _ = await run.finish(10)
        assert code == -signal.SIGKILL
        code, _, err = await cli(*bulk, env=emu.env, timeout=60)
        assert code == 0, err
        assert (await emu.stats())["submits_accepted"] == 3  # collected by key, never resent
        assert sorted(set(final_outcomes(out).values())) == ["saved"]


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` read-only even for root (a read-only bind mount); skips where not allowed."""
    path.chmod(0o444)
    try:
        if os.geteuid() == 0:
            bound = subprocess.run(
                ["mount", "--bind", "-o", "ro", str(path), str(path)],
                capture_output=True,
                check=False,
            )
            if bound.returncode != 0:
                pytest.skip(f"cannot bind-mount read-only: {bound.stderr.decode().strip()}")
            subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=False)
            try:
                yield
            finally:
                subprocess.run(["umount", "-l", str(path)], check=False)
        else:
            yield
    finally:
        path.chmod(0o644)


@pytest.mark.long
async def test_a_read_only_manifest_is_a_usage_error_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "0.2,0.2") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("first\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), "--no-journal"]
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        prompts.write_text("first\nsecond\n")
        with read_only(out / "manifest.jsonl"):
            code, _, err = await cli(*bulk, env=emu.env)
        assert code == 2 and "cannot write" in err and "manifest.jsonl" in err, err
        assert "nothing was sent" in err
        assert (await emu.stats())["submits_accepted"] == 1


@pytest.mark.long
async def test_without_a_journal_an_id_row_edited_while_its_job_runs_is_recorded_as_sent(
    tmp_path: Path,
) -> None:
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "1.5,1.5") as emu:
        file = write_rows(tmp_path / "rows.jsonl", [{"id": "fox", "prompt": "a fox"}])
        out = tmp_path / "out"
        bulk = ["bulk", str(file), "--model", "dall-e-2", "-o", str(out), "--no-journal"]
        code, _, err = await cli(*bulk, "--job-timeout", "0.2", env=emu.env)
        assert code == 1, err
        write_rows(file, [{"id": "fox", "prompt": "a red fox"}])
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        assert "1 row(s) with an id changed since their jobs were sent" in err
        assert (await emu.stats())["submits_accepted"] == 1
        saved = [r for r in manifest(out) if r["status"] == "saved"]
        assert [r["prompt"] for r in saved] == ["a fox"]  # the request its job was


@pytest.mark.long
@pytest.mark.parametrize("journal", [[], ["--no-journal"]])
async def test_the_job_of_a_line_edited_while_it_ran_is_still_collected(
    tmp_path: Path, journal: list[str]
) -> None:
    """A line without an id is its place and its request: edited, it is a new line, and the
    job sent for the old one is paid all the same. The re-run collects it and says so."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "1.5,1.5") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a fox\na cat\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), *journal]
        code, _, err = await cli(*bulk, "--job-timeout", "0.2", env=emu.env)
        assert code == 1, err
        prompts.write_text("a red fox\na cat\n")
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        assert "collecting 1 job(s) sent for rows no longer in the input" in err
        assert (await emu.stats())["submits_accepted"] == 3  # the red fox is a new line
        saved = sorted(r["prompt"] for r in manifest(out) if r["status"] == "saved")
        assert saved == ["a cat", "a fox", "a red fox"]
        code, _, err = await cli(*bulk, env=emu.env)  # nothing left to do
        assert code == 0 and "collecting" not in err, err
        assert (await emu.stats())["submits_accepted"] == 3


@pytest.mark.long
@pytest.mark.parametrize("own", [True, False])
async def test_a_removed_line_whose_job_only_the_journal_knows(tmp_path: Path, own: bool) -> None:
    """Killed outright with a journal, then the line removed: only the journal has the key.
    The folder's own journal holds this input's jobs only (one input per folder): the job is
    collected, and held against --max-points. A journal kept elsewhere may be shared by
    inputs: the job is named, with the command that collects it (and is not held)."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "3,3") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a fox\n")
        out = tmp_path / "out"
        journal = out / "journal.sqlite" if own else tmp_path / "shared.sqlite"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out)]
        bulk += [] if own else ["--journal", str(journal)]
        bulk += ["--max-points", "8", "--point-price", "dall-e-2=8"]

        def journaled() -> bool:
            if not journal.exists():
                return False
            with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
                query = "SELECT COUNT(*) FROM submits WHERE state = 'accepted' AND job_key != ''"
                with contextlib.suppress(sqlite3.Error):
                    return bool(db.execute(query).fetchone()[0] == 1)
            return False

        async with running_cli(*bulk, env=emu.env) as run:
            await eventually(journaled, what="the key in the journal", alive=proc_alive(run))
            run.send_signal(signal.SIGKILL)
            await run.finish(10)
        prompts.write_text("a cat\n")
        code, _, err = await cli(*bulk, env=emu.env)
        if own:
            assert code == 1, err  # "a cat" is over the budget: the fox's job holds it
            assert "collecting 1 job(s) sent for rows no longer in the input" in err
            saved = [r["prompt"] for r in manifest(out) if r["status"] == "saved"]
            assert saved == ["a fox"]
        else:
            assert "1 job(s) in the journal may still be running for rows no longer" in err
            assert f"wujie-async resume {journal} -o {out}" in err
            return
        assert (await emu.stats())["submits_accepted"] == 1  # the budget held


@pytest.mark.long
async def test_a_journal_that_cannot_record_intents_stops_the_run_with_nothing_sent(
    tmp_path: Path,
) -> None:
    """Files may not grow past 70 KB (RLIMIT_FSIZE): an image fits, the journal soon does not.
    A line whose intent could not be written was not sent: it ends `not_sent` (it said
    `failed`, with --retry-failed offered to "resend" it), and the run stops at once, exit 3
    (every later line failed the same way, exit 1)."""
    async with served_emulator(tmp_path) as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("".join(f"prompt {i}\n" for i in range(8)))
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), "--json"]

        def small_files() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (70 * 1024, resource.RLIM_INFINITY))

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wujie_async", *bulk, env=emu.env, preexec_fn=small_files,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        err = stderr.decode()
        assert proc.returncode == 3, err
        outcomes = json.loads(stdout)["outcomes"]
        assert outcomes["failed"] == 0 and outcomes["not_sent"] >= 1, outcomes
        assert "stopped: the journal refused a submit" in err and "--retry-failed" not in err
        unsent = [r for r in manifest(out) if r["status"] == "not_sent"]
        assert {r["error_code"] for r in unsent} <= {"journal", "not_sent"}, unsent
        assert (await emu.stats())["submits_accepted"] == 8 - outcomes["not_sent"]

        code, again, err = await cli(*bulk, env=emu.env)  # room again: the rest is sent
        assert code == 0 and json.loads(again)["outcomes"]["saved"] == 8, err
        assert (await emu.stats())["submits_accepted"] == 8


@pytest.mark.long
async def test_a_rerun_counts_uncertain_lines_against_the_budget(tmp_path: Path) -> None:
    """Lines left uncertain may have been charged: a re-run holds their price as spent. It
    counted only the manifest's points, and sent more (120 points of a 100 budget)."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a fox\nan owl\na cat\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), "--json"]
        bulk += ["--max-points", "16", "--point-price", "dall-e-2=8", "--concurrency", "1"]
        code, stdout, err = await cli(*bulk, env=emu.env)
        outcomes = json.loads(stdout)["outcomes"]
        assert code == 1 and (outcomes["uncertain"], outcomes["not_sent"]) == (2, 1), err
        assert (await emu.stats())["submits_accepted"] == 2  # and charged: 16 points

        await emu.set_faults()
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["not_sent"] == 1, err
        assert "up to 16 on uncertain lines of a 16 budget" in err, err
        assert (await emu.stats())["submits_accepted"] == 2  # the budget held


@pytest.mark.long
async def test_a_rerun_after_a_kill_counts_the_journals_uncertain_lines_against_the_budget(
    tmp_path: Path,
) -> None:
    """A run killed outright while submits were on the wire leaves their lines uncertain in
    the journal only (no manifest row). The re-run held nothing for them and sent the rest:
    the budget was passed by what they were charged (240 points on a 200 budget)."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a fox\nan owl\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), "--json"]
        bulk += ["--max-points", "16", "--point-price", "dall-e-2=8"]
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 2, err
        assert (await emu.stats())["submits_accepted"] == 2  # and charged: 16 points
        # As a kill -9 leaves it: the journal's rows read uncertain, the manifest has none.
        (out / "manifest.jsonl").write_text("")

        await emu.set_faults()
        prompts.write_text("a fox\nan owl\na cat\n")  # one line more, never sent
        code, stdout, err = await cli(*bulk, env=emu.env)
        outcomes = json.loads(stdout)["outcomes"]
        assert code == 1 and (outcomes["uncertain"], outcomes["not_sent"]) == (2, 1), err
        assert "up to 16 on uncertain lines of a 16 budget" in err, err
        assert (await emu.stats())["submits_accepted"] == 2  # the budget held


@pytest.mark.long
@pytest.mark.parametrize("journal", [[], ["--no-journal"]])
async def test_an_uncertain_line_the_budget_kept_from_its_resend_stays_uncertain(
    tmp_path: Path, journal: list[str]
) -> None:
    """`--retry-uncertain` on a budget with no room: the line is not resent, and its row
    reads `not_sent`. That row made it a line never sent: the next plain re-run held nothing
    for it and sent it again without being asked (without a journal), or spent its share
    on other lines (with one). It stays uncertain, held at its price."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a fox\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "-o", str(out), "--json", *journal]
        bulk += ["--max-points", "8", "--point-price", "gpt-image-1=8"]
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 1, err
        await emu.set_faults()
        code, stdout, err = await cli(*bulk, "--retry-uncertain", env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["not_sent"] == 1, err
        prompts.write_text("a fox\nan owl\n")  # a line more: no room for it either
        code, stdout, err = await cli(*bulk, env=emu.env)
        outcomes = json.loads(stdout)["outcomes"]
        assert code == 1 and (outcomes["uncertain"], outcomes["not_sent"]) == (1, 1), err
        assert "up to 8 on uncertain lines" in err, err
        assert (await emu.stats())["submits_accepted"] == 1


@pytest.mark.long
@pytest.mark.parametrize("journal", [[], ["--no-journal"]])
async def test_a_rerun_sends_no_new_first_job_of_a_kind_whose_first_reply_was_lost(
    tmp_path: Path, journal: list[str]
) -> None:
    """The first job of a kind lost its reply (it may have been charged) and no price is
    known: the run ends the kind's other lines `unpriced`, as the library's budget does. The
    re-run counted that line at nothing and sent another "first" job: 16 points charged on
    an 8-point budget (and one more job per re-run while replies keep being lost)."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a fox\nan owl\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "-o", str(out), "--json", "--max-points", "8", *journal]
        code, stdout, err = await cli(*bulk, env=emu.env)
        outcomes = json.loads(stdout)["outcomes"]
        assert code == 1 and (outcomes["uncertain"], outcomes["not_sent"]) == (1, 1), err

        await emu.set_faults()
        code, stdout, err = await cli(*bulk, env=emu.env)
        outcomes = json.loads(stdout)["outcomes"]
        assert code == 1 and (outcomes["uncertain"], outcomes["not_sent"]) == (1, 1), err
        assert "--point-price" in err, err
        assert [r["error_code"] for r in manifest(out) if r["status"] == "not_sent"] == [
            "unpriced",
            "unpriced",
        ]
        stats = await emu.stats()
        assert stats["submits_accepted"] == 1 and stats["points_charged"] <= 8

        # With the price given, the budget holds the lost line at it: nothing fits.
        code, stdout, err = await cli(*bulk, "--point-price", "gpt-image-1=8", env=emu.env)
        assert code == 1 and "up to 8 on uncertain lines" in err, err
        assert (await emu.stats())["submits_accepted"] == 1


@pytest.mark.long
@pytest.mark.parametrize("journal", [[], ["--no-journal"]])
async def test_lines_that_moved_while_their_jobs_ran_are_collected_once(
    tmp_path: Path, journal: list[str]
) -> None:
    """A line added at the top moves every line down: the re-run collects each job under
    its new place, and the run after that has nothing left to do (the old place's row was
    taken for a row no longer in the input, and collected again on every run)."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "1,1") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a fox\na cat\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out), *journal]
        code, _, err = await cli(*bulk, "--job-timeout", "0.2", env=emu.env)
        assert code == 1, err
        prompts.write_text("a new first line\na fox\na cat\n")
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        assert "2 line(s) moved" in err and "collecting" not in err
        code, stdout, err = await cli(*bulk, "--json", env=emu.env)
        assert code == 0, err
        assert "collecting" not in err and json.loads(stdout)["images"] == 0
        assert (await emu.stats())["submits_accepted"] == 3


@pytest.mark.long
async def test_a_manifest_row_with_a_junk_n_is_no_internal_error(tmp_path: Path) -> None:
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "1,1") as emu:
        file = write_rows(tmp_path / "rows.jsonl", [{"id": "fox", "prompt": "a fox"}])
        out = tmp_path / "out"
        bulk = ["bulk", str(file), "--model", "dall-e-2", "-o", str(out), "--no-journal"]
        code, _, err = await cli(*bulk, "--job-timeout", "0.2", env=emu.env)
        assert code == 1, err
        path = out / "manifest.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows[-1]["n"] = "abc"  # a hand-edited (or damaged) manifest
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        code, _, err = await cli(*bulk, env=emu.env)
        assert code != 70 and "internal error" not in err, err
        assert (await emu.stats())["submits_accepted"] == 1


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


# --- 10: progress says each outcome by its name, and rates of this run's own lines ---------------
async def test_progress_counts_outcomes_by_name_and_a_rerun_shows_no_inflated_rate(
    tmp_path: Path,
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"p{i}" for i in range(4)))
    out = tmp_path / "out"
    run = ("bulk", str(prompts), "--emulator", *FAST, "-o", str(out), "--progress", "plain")
    code, _, err = await cli(*run)
    assert code == 0, err
    code, _, err = await cli(*run)
    last = [line for line in err.splitlines() if line.startswith("progress:")][-1]
    assert "saved 4" in last and "0.0 lines/s" in last, last  # nothing waited for this time


@pytest.mark.long
@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
async def test_a_line_repeated_on_a_re_run_is_sent_as_a_row_of_its_own(
    tmp_path: Path, journal: bool
) -> None:
    """Two identical lines stay two rows, also when the second is added on a re-run: with a
    journal it was taken for the first line moved, read "saved" and never sent (exit 0)."""
    async with served_emulator(tmp_path) as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a cat\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out)]
        if not journal:
            bulk.append("--no-journal")
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        prompts.write_text("a cat\na cat\na cat\n")
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        assert (await emu.stats())["submits_accepted"] == 3
        saved = {r["line"] for r in manifest(out) if r["status"] == "saved"}
        assert saved == {1, 2, 3} and len(list(out.glob("*.png"))) == 3


@pytest.mark.long
@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
async def test_a_key_the_gateway_hands_out_again_is_not_taken_for_the_earlier_job(
    tmp_path: Path, journal: bool
) -> None:
    """A gateway restarted with its key counter (here: the same seed) gives a new line the
    key an earlier run saved under: the line read "saved" with no row or image of its own,
    its cost uncounted (exit 0). It ends uncertain, as a key reused within a run does."""
    prompts = tmp_path / "prompts.txt"
    out = tmp_path / "out"
    bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out)]
    if not journal:
        bulk.append("--no-journal")
    prompts.write_text("a cat\n")
    async with served_emulator(tmp_path, "--seed", "7") as emu:
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
    [first] = [r["key"] for r in manifest(out) if r["status"] == "saved"]
    prompts.write_text("a cat\na dog\n")
    async with served_emulator(tmp_path, "--seed", "7") as emu:
        code, _, err = await cli(*bulk, env=emu.env)
        assert (await emu.stats())["submits_accepted"] == 1
    assert code == 1, err
    last = final_outcomes(out)
    assert last[1] == "saved" and last[2] == "uncertain", last
    [row] = [r for r in manifest(out) if r["line"] == 2]
    assert first in row["error"] and "earlier job" in row["error"]
    assert len(list(out.glob("*.png"))) == 1


@pytest.mark.long
@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
async def test_a_line_whose_image_urls_are_gone_is_resent_by_retry_failed(
    tmp_path: Path, journal: bool
) -> None:
    """An image URL that answers 404 (the gateway cleaned up old results): the line said
    "re-run to fetch them again", which never worked, and --retry-failed collected the same
    gone URLs again: no way to get the image. It ends `gone`; a plain re-run asks once more
    (never resends), and --retry-failed sends it again as a new job."""
    async with served_emulator(tmp_path) as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a cat\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out)]
        if not journal:
            bulk.append("--no-journal")
        await emu.set_faults(images_gone=1.0)
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 1, err
        assert final_outcomes(out) == {1: "failed"}
        assert manifest(out)[-1]["error_code"] == "gone"
        assert "URLs are gone" in err and "--retry-failed sends them again" in err
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 1 and (await emu.stats())["submits_accepted"] == 1, err
        await emu.set_faults()
        code, _, err = await cli(*bulk, "--retry-failed", env=emu.env)
        assert code == 0, err
        assert (await emu.stats())["submits_accepted"] == 2
        assert final_outcomes(out) == {1: "saved"} and len(list(out.glob("*.png"))) == 1


@pytest.mark.long
async def test_a_gone_lines_resend_the_journal_holds_is_collected_not_paid_again(
    tmp_path: Path,
) -> None:
    """A `--retry-failed` run had its resend of a `gone` line accepted and was killed before
    writing a row of it: the journal holds the new key, the manifest only the old `gone`
    row of the line. The next `--retry-failed` run took the line's old row for the new job's
    and sent it a third time; it collects the new job."""
    from wujie_async import Credentials, WujieClient

    async with served_emulator(tmp_path) as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a cat\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out)]
        await emu.set_faults(images_gone=1.0)
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 1 and manifest(out)[-1]["error_code"] == "gone", err
        await emu.set_faults()
        # The killed run's resend, as it would have journaled it (same tag, new key).
        env = emu.env
        credentials = Credentials(env["WUJIE_APP_ID"], env["WUJIE_PRIVATE_KEY"])
        async with WujieClient(
            credentials, base_url=env["WUJIE_BASE_URL"], journal=out / "journal.sqlite"
        ) as client:
            job = await client.images.submit(
                prompt="a cat", model="dall-e-2", tag=manifest(out)[-1]["tag"]
            )
            await job
        code, _, err = await cli(*bulk, "--retry-failed", env=emu.env)
        assert code == 0, err
        assert (await emu.stats())["submits_accepted"] == 2
        assert manifest(out)[-1]["key"] == job.key and final_outcomes(out) == {1: "saved"}


@pytest.mark.long
async def test_journal_resend_refuses_a_key_the_gateway_hands_out_again(tmp_path: Path) -> None:
    """As bulk: a resend given the key of an earlier saved job (a gateway restarted with its
    key counter) said "resent 1 row(s): 1 saved" with no image or row of its own."""
    prompts = tmp_path / "prompts.txt"
    out = tmp_path / "out"
    bulk = ["bulk", str(prompts), "--model", "dall-e-2", "-o", str(out)]
    prompts.write_text("a cat\n")
    async with served_emulator(tmp_path, "--seed", "7") as emu:
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
    prompts.write_text("a cat\na dog\n")
    async with served_emulator(tmp_path, "--seed", "8") as emu:
        await emu.set_faults(drop_after_accept=1.0)
        await cli(*bulk, env=emu.env)
    assert final_outcomes(out)[2] == "uncertain"
    async with served_emulator(tmp_path, "--seed", "7") as emu:
        code, _, err = await cli(
            "journal", "resend", "--all-uncertain", "--yes", "-o", str(out), env=emu.env
        )
    assert code != 0 and "1 saved" not in err, err
    assert final_outcomes(out)[2] == "uncertain"
    assert "earlier job" in [r for r in manifest(out) if r["line"] == 2][-1]["error"]
    assert len(list(out.glob("*.png"))) == 1


async def test_a_line_number_names_the_id_row_the_summary_printed_at_that_line(
    tmp_path: Path,
) -> None:
    """The summary printed `line 3 (id c): uncertain`; `journal resend 3 --yes` then resent
    the row of id "3" (input line 4, which may have been charged: paid twice) and `journal
    resend 'line 3'` said no row was line 3. An id row is its manifest line's too: `3` names
    two rows and is refused, `line 3` names the row printed at line 3."""
    rows = write_rows(
        tmp_path / "rows.jsonl",
        [
            {"id": i, "prompt": p}
            for i, p in (("a", "one"), ("b", "two"), ("c", "three"), ("3", "four"))
        ],
    )
    out = tmp_path / "out"
    async with served_emulator(tmp_path) as emu:
        await emu.set_faults(drop_after_accept=1.0)
        code, _, err = await cli(
            "bulk", str(rows), "--model", "dall-e-2", "-o", str(out), env=emu.env
        )
        assert code == 1 and "line 3 (id c): uncertain" in err, err
        await emu.set_faults()
        resend = ("journal", "resend", "--yes", "-o", str(out))
        code, _, err = await cli(*resend, "3", env=emu.env)
        assert code == 2 and "'3' names two rows, id 3 and line 3" in err, err
        assert (await emu.stats())["submits_accepted"] == 4
        code, _, err = await cli(*resend, "line 3", env=emu.env)
        assert code == 0 and "1 saved" in err, err
    assert [r["prompt"] for r in manifest(out) if r["status"] == "saved"] == ["three"]
    assert final_outcomes(out) == {1: "uncertain", 2: "uncertain", 3: "saved", 4: "uncertain"}


async def test_the_commands_an_edited_line_is_refused_with_name_its_folder(
    tmp_path: Path,
) -> None:
    """A line edited between runs holds two uncertain requests; `journal resend 1 -o res`
    said to send one with `wujie-async journal resend 'row 3'` and drop the other with
    `wujie-async journal forget 'row 1'`: pasted, they acted on ./out/, another folder (a
    resend there pays for a row of another run). They name the folder now."""
    prompts = tmp_path / "prompts.txt"
    res = tmp_path / "res"
    bulk = ("bulk", str(prompts), "--model", "dall-e-2", "-o", str(res))
    async with served_emulator(tmp_path) as emu:
        await emu.set_faults(drop_after_accept=1.0)
        prompts.write_text("apple\npear\n")
        await cli(*bulk, env=emu.env)
        prompts.write_text("apple red\npear\n")  # line 1 edited: a new request, sent too
        await cli(*bulk, env=emu.env)
        await emu.set_faults()
        code, _, err = await cli("journal", "resend", "1", "--yes", "-o", str(res), env=emu.env)
        assert code == 2 and "holds 2 requests" in err, err
        resend, forget = re.findall(r"`wujie-async (journal [^`]*)`", err)
        assert f"-o {res}" in resend and f"-o {res}" in forget, err
        code, _, err = await cli(*shlex.split(forget), "--yes", env=emu.env)
        assert code == 0 and "forgot 1 row(s)" in err, err
        code, _, err = await cli(*shlex.split(resend), "--yes", env=emu.env)
        assert code == 0 and "1 saved" in err, err
        assert (await emu.stats())["submits_accepted"] == 4
    assert [r["prompt"] for r in manifest(res) if r["status"] == "saved"] == ["apple red"]


@pytest.mark.long
async def test_a_stopped_resend_counts_its_running_jobs_and_names_the_rows_it_kept(
    tmp_path: Path,
) -> None:
    """SIGTERM stopped `journal resend` with its two jobs running (paid): its summary said
    `resent 2 row(s): 0 saved`, no word of them. Stopped while its submits waited out a
    429, it said to resend the rows kept back with `wujie-async journal resend` again: no
    rows and no folder, a usage error (or ./out/'s journal) when pasted. It counts
    `pending 2` now, and names the rows and the folder."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\nfour\n")
    res = tmp_path / "res"
    async with served_emulator(tmp_path, "--time-scale", "1") as emu:
        await emu.set_faults(drop_after_accept=1.0)
        code, _, err = await cli(
            "bulk", str(prompts), "--model", "dall-e-2", "-o", str(res), env=emu.env
        )
        assert final_outcomes(res) == dict.fromkeys(range(1, 5), "uncertain"), err
        await emu.set_faults()
        resend = ("journal", "resend", "--yes", "-o", str(res))
        async with running_cli(*resend, "line 1", "line 2", env=emu.env) as running:
            await eventually(accepted_at_least(emu, 6), timeout=20)
            running.send_signal(signal.SIGTERM)
            code, _, err = await running.finish(30)
        assert code == 143 and "resent 2 row(s): 0 saved · pending 2" in err, err
        await emu.set_faults(burst_429=100, retry_after_s=10)
        async with running_cli(*resend, "line 3", "line 4", env=emu.env) as running:
            await eventually(submits_arrived(emu, 7), timeout=20)
            running.send_signal(signal.SIGTERM)
            code, _, err = await running.finish(30)
    assert code == 143 and "not_sent 2" in err, err
    assert f"`wujie-async journal resend 'line 3' 'line 4' -o {res}`" in err, err


@pytest.mark.parametrize(("first", "said"), [({"id": "x"}, "'id x'"), ({}, "'row 2'")])
async def test_a_line_number_whose_id_changed_between_runs_names_no_row_until_said_which(
    tmp_path: Path, first: dict[str, str], said: str
) -> None:
    """Line 2 was id x (or had no id), then (edited) id y, both sent without a reply: now
    that a line number names the id rows at that line, `journal resend 2` would send both
    (two jobs for one line). It is refused, naming each row in a form that names it alone
    (`'row 2'` for a row without an id: `'line 2'` names both); `'id y'` sends the one
    meant."""
    rows = tmp_path / "rows.jsonl"
    out = tmp_path / "out"
    bulk = ("bulk", str(rows), "--model", "dall-e-2", "-o", str(out))
    async with served_emulator(tmp_path) as emu:
        await emu.set_faults(drop_after_accept=1.0)
        write_rows(rows, [{"id": "w", "prompt": "one"}, {**first, "prompt": "two"}])
        await cli(*bulk, env=emu.env)
        write_rows(rows, [{"id": "w", "prompt": "one"}, {"id": "y", "prompt": "two, edited"}])
        await cli(*bulk, env=emu.env)
        await emu.set_faults()
        resend = ("journal", "resend", "--yes", "-o", str(out))
        code, _, err = await cli(*resend, "2", env=emu.env)
        assert code == 2 and "'2' names 2 rows at that line" in err, err
        assert f"say which ({said} or 'id y')" in err, err
        assert (await emu.stats())["submits_accepted"] == 3
        code, _, err = await cli(*resend, "id y", env=emu.env)
        assert code == 0 and "1 saved" in err, err
    assert [r["prompt"] for r in manifest(out) if r["status"] == "saved"] == ["two, edited"]
