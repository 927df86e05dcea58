"""``wujie-async journal`` given ``--journal`` alone, its rows as JSON, and lines with several
rows, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
from pathlib import Path

import pytest

from wujie_async import Credentials, JobFailedError, SubmitUncertainError, WujieClient
from wujie_async.cli._run_warnings import forget_failed_said

from .cli_helpers import (
    Served,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    manifest,
    proc_alive,
    rows_with_ids,
    running_cli,
    served_emulator,
)
from .helpers import eventually

pytestmark = pytest.mark.anyio


@pytest.mark.long
async def test_journal_commands_given_journal_alone_leave_the_working_folder_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `--journal FILE` and no `-o`, `journal resend` saved into ./out/ of wherever it
    ran (taking its lock, appending to its manifest: another run's folder, perhaps), and
    `journal forget` judged by ./out/'s manifest: it forgot a succeeded row that is the only
    record of its job's key in the journal's own run folder (a re-run paid for it again)."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        rows = rows_with_ids(tmp_path, "r0")
        run = tmp_path / "run"
        code, stdout, err = await cli("bulk", str(rows), "-o", str(run), "--json", env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 1, err
        await emu.set_faults()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        journal = str(run / "journal.sqlite")
        accepted = (await emu.stats())["submits_accepted"]
        resend = ("journal", "resend", "--all-uncertain", "--yes", "--journal", journal)
        code, _, err = await cli(*resend, env=emu.env)
        assert code == 2 and "pass -o/--out" in err and "nothing was sent" in err, err
        assert list(elsewhere.iterdir()) == []
        assert (await emu.stats())["submits_accepted"] == accepted

        code, _, err = await cli(*resend, "-o", str(run), env=emu.env)
        assert code == 0, err
        (run / "manifest.jsonl").write_text("")  # what a run killed while saving leaves
        code, _, err = await cli("journal", "forget", "r0", "--yes", "--journal", journal)
        assert code == 2 and "paid twice" in err, err
        code, listing, _ = await cli("journal", "list", "--journal", journal)
        assert code == 0 and "succeeded" in listing, listing
        assert list(elsewhere.iterdir()) == []


@pytest.mark.long
async def test_journal_list_json_gives_the_line_of_a_row_with_an_id(tmp_path: Path) -> None:
    """`journal list --json` printed "line": null for every row with an id, though the run's
    manifest says which input line it is: a script had no line to show its user."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        rows = tmp_path / "rows.jsonl"
        rows.write_text(
            json.dumps({"prompt": "a plain line", "model": "dall-e-2"})
            + "\n"
            + json.dumps({"id": "fox", "prompt": "p", "model": "dall-e-2"})
            + "\n"
        )
        out = tmp_path / "out"
        code, _, err = await cli("bulk", str(rows), "-o", str(out), env=emu.env)
        assert code == 1, err
        for where in (("-o", str(out)), ("--journal", str(out / "journal.sqlite"))):
            code, stdout, err = await cli("journal", "list", "--json", *where)
            assert code == 0, err
            listed = sorted(
                (
                    (row["line"], row["id"], row["name"])
                    for row in map(json.loads, stdout.split("\n")[:-1])
                ),
                key=str,
            )
            assert listed == [(1, None, "line 1"), (2, "fox", "id fox")], listed


@pytest.mark.long
async def test_journal_list_json_takes_no_line_from_another_runs_manifest(tmp_path: Path) -> None:
    """A run whose journal is kept beside another run's manifest (`--journal d/journal.sqlite`
    with its images in e/, d/ being an earlier run's folder): `journal list --json --journal
    d/journal.sqlite` gave its id rows the lines of the earlier run's rows of the same ids.
    A manifest row gives a journal row its line only when it records that row's submit (its
    tag, its request, and its job key when it has one)."""
    async with served_emulator(tmp_path) as emu:
        earlier, now = tmp_path / "earlier.jsonl", tmp_path / "now.jsonl"
        earlier.write_text(
            "".join(
                json.dumps(row) + "\n"
                for row in (
                    {"prompt": "a plain line", "model": "dall-e-2"},
                    {"id": "fox", "prompt": "a fox", "model": "dall-e-2"},
                    {"id": "owl", "prompt": "an owl", "model": "dall-e-2"},
                )
            )
        )
        now.write_text(
            json.dumps({"id": "fox", "prompt": "a fox", "model": "dall-e-2"})  # the same request
            + "\n"
            + json.dumps({"id": "owl", "prompt": "a grey owl", "model": "dall-e-2"})
            + "\n"
        )
        folder, out = tmp_path / "d", tmp_path / "e"
        code, _, err = await cli("bulk", str(earlier), "-o", str(folder), "--no-journal",
                                 env=emu.env)  # fmt: skip
        assert code == 0, err
        journal = str(folder / "journal.sqlite")
        code, _, err = await cli("bulk", str(now), "-o", str(out), "--journal", journal,
                                 env=emu.env)  # fmt: skip
        assert code == 0, err
        for where, lines in (
            (("--journal", journal), [None, None]),  # d/ holds the earlier run's manifest
            (("--journal", journal, "-o", str(out)), [1, 2]),
        ):
            code, stdout, err = await cli("journal", "list", "--json", *where)
            assert code == 0, err
            listed = [(row["id"], row["line"]) for row in map(json.loads, stdout.splitlines())]
            assert listed == list(zip(["fox", "owl"], lines, strict=True)), (where, listed)


async def _submit_as_a_program(emu: Served, journal: Path, *, uncertain: bool) -> None:
    """A program on the run's journal submits line ``id fox`` again (its own client)."""
    credentials = Credentials(
        app_id=emu.env["WUJIE_APP_ID"], private_key=emu.env["WUJIE_PRIVATE_KEY"]
    )
    async with WujieClient(credentials, base_url=emu.base_url, journal=journal) as client:
        if uncertain:
            with pytest.raises(SubmitUncertainError):
                await client.images.submit(prompt="p", model="dall-e-2", tag="id:fox")
        else:
            await client.images.submit(prompt="p", model="dall-e-2", tag="id:fox")


@pytest.mark.long
async def test_resend_sends_a_line_of_several_uncertain_rows_once_and_settles_them_all(
    tmp_path: Path,
) -> None:
    """A line with two uncertain rows (sent twice without a reply): `journal resend` sent it
    once, as it should, but forgot only its latest row; the other stayed uncertain for ever,
    listed by `journal list --status uncertain` and never matched by a resend again."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        out = tmp_path / "out"
        out.mkdir()
        journal = out / "journal.sqlite"
        for _ in range(2):
            await _submit_as_a_program(emu, journal, uncertain=True)
        await emu.set_faults()
        accepted = (await emu.stats())["submits_accepted"]
        code, _, err = await cli(
            "journal", "resend", "--all-uncertain", "--yes", "-o", str(out), env=emu.env
        )
        assert code == 0 and "resent 1 row(s): 1 saved" in err, err
        assert (await emu.stats())["submits_accepted"] == accepted + 1
        code, listing, _ = await cli("journal", "list", "--status", "uncertain", "-o", str(out))
        assert code == 0 and "0 row(s)" in listing, listing
        assert [r["status"] for r in manifest(out)] == ["saved"]


@pytest.mark.long
async def test_resend_never_pays_again_for_a_line_another_row_of_which_was_paid(
    tmp_path: Path,
) -> None:
    """A line's older row holds a paid job and its latest row is uncertain: `journal resend`
    looked at the latest row only and sent the line again, a second paid job for it."""
    async with served_emulator(tmp_path) as emu:
        out = tmp_path / "out"
        out.mkdir()
        journal = out / "journal.sqlite"
        await _submit_as_a_program(emu, journal, uncertain=False)
        await emu.set_faults(drop_after_accept=1.0)
        await _submit_as_a_program(emu, journal, uncertain=True)
        await emu.set_faults()
        accepted = (await emu.stats())["submits_accepted"]
        code, _, err = await cli(
            "journal", "resend", "--all-uncertain", "--yes", "-o", str(out), env=emu.env
        )
        assert code == 0 and "1 line(s) with uncertain rows not resent: id fox is" in err, err
        assert "nothing to resend" in err, err
        code, _, err = await cli("journal", "resend", "fox", "--yes", "-o", str(out), env=emu.env)
        assert code == 2 and "nothing was sent" in err and "(paid)" in err, err
        assert (await emu.stats())["submits_accepted"] == accepted


@pytest.mark.long
async def test_resend_keeps_an_untagged_row_its_budget_kept_back(tmp_path: Path) -> None:
    """A program's journal holds uncertain rows with neither an id nor a line (no tag): all
    read line 0, and `journal resend --all-uncertain --max-points` that sent some of them
    forgot every one, the rows it kept back (maybe charged) too: never to be resent."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        out = tmp_path / "out"
        out.mkdir()
        credentials = Credentials(
            app_id=emu.env["WUJIE_APP_ID"], private_key=emu.env["WUJIE_PRIVATE_KEY"]
        )
        async with WujieClient(
            credentials, base_url=emu.base_url, journal=out / "journal.sqlite"
        ) as client:
            for prompt in ("alpha", "beta", "gamma"):
                with pytest.raises(SubmitUncertainError):
                    await client.images.submit(prompt=prompt, model="dall-e-2")
        await emu.set_faults()
        budget = ("--max-points", "8", "--point-price", "dall-e-2=4")
        resend = ("journal", "resend", "--all-uncertain", "--yes", "-o", str(out), *budget)
        code, _, err = await cli(*resend, env=emu.env)
        assert code == 1 and "resent 3 row(s): 2 saved" in err, err
        assert "1 row(s) not sent (a row with neither line nor id" in err, err
        code, stdout, _ = await cli("journal", "list", "--json", "-o", str(out))
        listed = [json.loads(line) for line in stdout.splitlines()]
        states = sorted((row["prompt"], row["state"]) for row in listed)
        assert states == [("alpha", "succeeded"), ("beta", "succeeded"), ("gamma", "uncertain")]


@pytest.mark.long
async def test_a_resend_stopped_early_counts_and_names_the_rows_it_did_not_send(
    tmp_path: Path,
) -> None:
    """Ctrl-C while a resend's first submit (it goes alone) is on the wire: the summary read
    "resent 3 row(s): 0 saved" and pointed at `resume`, which never sends, for the two rows
    the stop kept back (they are in the journal as they were, to be resent)."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        rows = rows_with_ids(tmp_path, "r0", "r1", "r2")
        out = tmp_path / "out"
        code, stdout, err = await cli("bulk", str(rows), "-o", str(out), "--json", env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 3, err
        sent = int((await emu.stats())["requests"]["generations"])
        await emu.set_faults(slow_reply=1.0, slow_reply_s=1.0, endpoints=["generations"])
        resend = ("journal", "resend", "--all-uncertain", "--yes", "-o", str(out))
        async with running_cli(*resend, env=emu.env) as run:

            async def arrived() -> bool:
                return int((await emu.stats())["requests"]["generations"]) > sent

            await eventually(arrived, what="the first resend", alive=proc_alive(run))
            run.send_signal(signal.SIGINT)
            code, _, err = await run.finish(30)
        assert code == 130, err
        assert re.search(r"resent 3 row\(s\): \d saved · .*not_sent 2", err), err
        kept = r"resend them with `wujie-async journal resend 'id r\d' 'id r\d' -o "
        assert re.search(kept + re.escape(f"{out}`"), err), err
        code, listing, _ = await cli("journal", "list", "--status", "uncertain", "-o", str(out))
        assert "2 row(s)" in listing, listing


@pytest.mark.long
async def test_retry_uncertain_stopped_early_forgets_the_old_row_of_a_line_left_pending(
    tmp_path: Path,
) -> None:
    """`bulk --retry-uncertain` stopped while the first line's new job ran: its line is left
    pending (collected by a re-run), yet its old uncertain row stayed, listed by `journal list
    --status uncertain` beside the new one after the re-run had collected its images."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        rows = rows_with_ids(tmp_path, "r0", "r1", "r2")
        out = tmp_path / "out"
        bulk = ("bulk", str(rows), "-o", str(out), "--json")
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 3, err
        await emu.set_faults(slow_reply=1.0, slow_reply_s=1.0, endpoints=["generations"])
        sent = int((await emu.stats())["requests"]["generations"])
        async with running_cli(*bulk, "--retry-uncertain", env=emu.env) as run:

            async def arrived() -> bool:
                return int((await emu.stats())["requests"]["generations"]) > sent

            await eventually(arrived, what="the first resend", alive=proc_alive(run))
            run.send_signal(signal.SIGINT)
            code, stdout, err = await run.finish(30)
        assert code == 130 and json.loads(stdout)["pending"] == 1, err
        code, listing, _ = await cli("journal", "list", "--status", "uncertain", "-o", str(out))
        assert "2 row(s)" in listing and "id r0" not in listing, listing


@pytest.mark.long
async def test_resume_without_out_collects_into_the_journals_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`resume run/journal.sqlite` from another folder (no -o) used ./out/ there: every
    job the run had saved was downloaded again into it under other names, its points said
    spent again, and the run's own folder was left as it was."""
    async with served_emulator(tmp_path) as emu:
        rows = rows_with_ids(tmp_path, "r0", "r1")
        run = tmp_path / "run"
        code, _, err = await cli("bulk", str(rows), "-o", str(run), env=emu.env)
        assert code == 0, err
        before = manifest(run)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        code, _, err = await cli("resume", str(run / "journal.sqlite"), env=emu.env)
        assert code == 0, err
        assert list(elsewhere.iterdir()) == []
        assert manifest(run) == before  # nothing left to collect: nothing saved again
        lone = tmp_path / "lone"
        lone.mkdir()
        (run / "journal.sqlite").rename(lone / "journal.sqlite")
        code, _, err = await cli("resume", str(lone / "journal.sqlite"), env=emu.env)
        assert code == 2 and "pass -o/--out" in err, err
        assert list(elsewhere.iterdir()) == []


@pytest.mark.long
async def test_resend_budget_holds_an_older_uncertain_row_of_the_line(tmp_path: Path) -> None:
    """A line sent without a reply (uncertain: maybe charged) and then again, failed: its
    latest row is failed. `journal resend --max-points` held only the latest row of each
    line as maybe charged, so the line's first submit was not held against the budget."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        out = tmp_path / "out"
        out.mkdir()
        journal = out / "journal.sqlite"
        await _submit_as_a_program(emu, journal, uncertain=True)
        await emu.set_faults(fail_jobs=1.0)
        credentials = Credentials(
            app_id=emu.env["WUJIE_APP_ID"], private_key=emu.env["WUJIE_PRIVATE_KEY"]
        )
        async with WujieClient(credentials, base_url=emu.base_url, journal=journal) as client:
            job = await client.images.submit(prompt="p", model="dall-e-2", tag="id:fox")
            with pytest.raises(JobFailedError):
                await job
        await emu.set_faults()
        accepted = (await emu.stats())["submits_accepted"]
        budget = ("--max-points", "4", "--point-price", "dall-e-2=4")
        resend = ("journal", "resend", "fox", "--yes", "-o", str(out), *budget)
        code, _, err = await cli(*resend, env=emu.env)
        assert code == 1 and "1 row(s) not sent (id fox): over the points budget" in err, err
        assert (await emu.stats())["submits_accepted"] == accepted


@pytest.mark.long
async def test_forget_and_list_refuse_a_manifest_that_is_no_file(tmp_path: Path) -> None:
    """`journal forget` read OUT/manifest.jsonl whatever it was: a FIFO there made it wait
    for a writer for ever, a folder was an internal error."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        rows = rows_with_ids(tmp_path, "r0")
        out = tmp_path / "out"
        code, _, err = await cli("bulk", str(rows), "-o", str(out), env=emu.env)
        assert code == 1, err
    (out / "manifest.jsonl").unlink()
    os.mkfifo(out / "manifest.jsonl")
    forget = ("journal", "forget", "r0", "--yes", "-o", str(out))
    code, _, err = await cli(*forget, process=True, timeout=20)
    assert code == 2 and "is not a run's manifest (a FIFO" in err, err
    (out / "manifest.jsonl").unlink()
    (out / "manifest.jsonl").mkdir()
    for command in (forget, ("journal", "list", "--json", "-o", str(out))):
        code, _, err = await cli(*command)
        assert code == 2 and "is not a run's manifest (a folder)" in err, err
    code, listing, _ = await cli("journal", "list", "-o", str(out))
    assert "1 row(s)" in listing, listing


@pytest.mark.long
async def test_an_interrupted_resume_says_it_collects_and_never_sends(tmp_path: Path) -> None:
    """Ctrl-C in `resume`: it said "re-run the same command to collect them and send the
    rest", then "(or collect only: wujie-async resume ...)", the same command again: resume
    never sends, and a user read that lines were left unsent."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "30,30") as emu:
        rows = rows_with_ids(tmp_path, "r0")
        out = tmp_path / "out"
        bulk = ("bulk", str(rows), "-o", str(out), "--job-timeout", "0.2")
        code, _, err = await cli(*bulk, env=emu.env)
        assert code == 1, err  # its wait ended long before the job: the row stays accepted
        resume = ("resume", str(out / "journal.sqlite"), "-o", str(out), "--progress", "none")
        async with running_cli(*resume, env=emu.env) as run:
            before = int((await emu.stats())["batch_calls"])
            await eventually(
                lambda: _more_batch_calls(emu, before), what="resume asks", alive=proc_alive(run)
            )
            run.send_signal(signal.SIGINT)
            code, _, err = await run.finish(30)
        assert code == 130, err
        assert "run it again to collect the rest (it sends nothing)" in err, err
        assert "send the rest" not in err and "collect only" not in err, err


async def _more_batch_calls(emu: Served, before: int) -> bool:
    return int((await emu.stats())["batch_calls"]) > before


@pytest.mark.long
async def test_resend_of_a_line_edited_between_runs_sends_one_request(tmp_path: Path) -> None:
    """Line 1 sent without a reply, then edited and sent again without a reply: the journal
    holds two rows of line 1 with different tags (two requests), and `journal resend 1` sent
    both, two paid jobs for one line (`--all-uncertain` too). Refused, naming the rows; the
    one meant is sent by its journal number."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        rows = tmp_path / "rows.jsonl"
        out = tmp_path / "out"
        for prompt in ("a red fox", "a blue fox"):
            rows.write_text(json.dumps({"prompt": prompt, "model": "dall-e-2"}) + "\n")
            code, stdout, err = await cli("bulk", str(rows), "-o", str(out), "--json", env=emu.env)
            assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 1, err
        code, listing, _ = await cli("journal", "list", "--json", "-o", str(out))
        listed = [json.loads(line) for line in listing.splitlines()]
        assert [(r["line"], r["state"], r["prompt"]) for r in listed] == [
            (1, "uncertain", "a red fox"),
            (1, "uncertain", "a blue fox"),
        ], listed
        old, new = (f"row {r['row']}" for r in listed)
        await emu.set_faults()
        accepted = (await emu.stats())["submits_accepted"]
        for named in (("1",), ("line 1",), ("--all-uncertain",)):
            code, _, err = await cli(
                "journal", "resend", *named, "--yes", "-o", str(out), env=emu.env
            )
            assert "line 1 holds 2 requests" in err and old in err and new in err, err
            assert (await emu.stats())["submits_accepted"] == accepted
        code, _, err = await cli("journal", "resend", new, "--yes", "-o", str(out), env=emu.env)
        assert code == 0 and "resent 1 row(s): 1 saved" in err, err
        assert (await emu.stats())["submits_accepted"] == accepted + 1
        code, listing, _ = await cli("journal", "list", "--json", "-o", str(out))
        left = [
            (f"row {r['row']}", r["state"], r["prompt"])
            for r in map(json.loads, listing.split("\n")[:-1])
        ]
        assert left[0] == (old, "uncertain", "a red fox"), listing  # the other request's row
        assert [row[1:] for row in left[1:]] == [("succeeded", "a blue fox")], listing


@pytest.mark.long
async def test_the_hint_after_a_failed_forget_keeps_the_lines_new_uncertain_row(
    tmp_path: Path,
) -> None:
    """A run sent line `id fox` again and its new submit got no reply either (row 2,
    uncertain: the only record of a job that may have been charged), and the journal did
    not forget the old row 1. The summary said to run `journal forget ROWS --yes`: given
    the line (`fox`), that dropped row 2 too. It names the old rows by number alone."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        out = tmp_path / "out"
        out.mkdir()
        journal = out / "journal.sqlite"
        for _ in range(2):
            await _submit_as_a_program(emu, journal, uncertain=True)
    said = forget_failed_said("the disk is full", journal, [1])
    [command] = [c for c in re.findall(r"`(wujie-async [^`]*)`", said) if " forget " in c]
    code, _, err = await cli(*shlex.split(command)[1:])
    assert code == 0 and "forgot 1 row(s)" in err, err
    code, listing, _ = await cli("journal", "list", "--json", "--journal", str(journal))
    assert [(r["row"], r["state"]) for r in map(json.loads, listing.split("\n")[:-1])] == [
        (2, "uncertain")
    ], listing


@pytest.mark.long
async def test_resend_tells_a_program_tag_reading_like_a_row_number_from_that_row(
    tmp_path: Path,
) -> None:
    """A program's journal: an uncertain submit tagged "#2" (its queue's message number) and
    journal row 2, an uncertain submit with no tag. Rows without a tag were grouped by "#N",
    so both were one line: `journal resend --all-uncertain` sent row 2's request alone and
    forgot both rows, the tagged request (that may have been charged) never sent nor kept."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        out = tmp_path / "out"
        out.mkdir()
        credentials = Credentials(
            app_id=emu.env["WUJIE_APP_ID"], private_key=emu.env["WUJIE_PRIVATE_KEY"]
        )
        journal = out / "journal.sqlite"
        async with WujieClient(credentials, base_url=emu.base_url, journal=journal) as client:
            for prompt, tag in (("tagged", "#2"), ("untagged", None)):
                with pytest.raises(SubmitUncertainError):
                    await client.images.submit(prompt=prompt, model="dall-e-2", tag=tag)
            rows = [(entry.id, entry.tag) for entry in await client.journal_entries()]
        assert rows == [(1, "#2"), (2, None)], rows
        await emu.set_faults()
        accepted = (await emu.stats())["submits_accepted"]
        code, _, err = await cli(
            "journal", "resend", "--all-uncertain", "--yes", "-o", str(out), env=emu.env
        )
        assert code == 0 and "resent 2 row(s): 2 saved" in err, err
        assert (await emu.stats())["submits_accepted"] == accepted + 2
        assert sorted(r["prompt"] for r in manifest(out)) == ["tagged", "untagged"]
