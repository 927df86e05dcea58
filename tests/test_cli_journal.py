"""``wujie-async journal`` and the CLI conventions (issue 10), as a user runs them."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import sqlite3
import stat
import sys
from pathlib import Path

import pytest

from wujie_async import Credentials, _lock_file
from wujie_async.cli._out_lock import LOCK_NAME
from wujie_async.cli._run_warnings import forget_failed_said

from .cli_helpers import (
    CLEAN_ENV,
    FAST,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    final_outcomes,
    manifest,
    proc_alive,
    rows_with_ids,
    running_cli,
    served_emulator,
)
from .conftest import EmulatorFactory, make_client
from .helpers import eventually, stop_process

pytestmark = pytest.mark.anyio


@pytest.mark.long
async def test_uncertain_lines_are_listed_and_resent_only_when_confirmed(tmp_path: Path) -> None:
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        rows = rows_with_ids(tmp_path, "r0", "r1", "r2")
        out = tmp_path / "out"
        bulk = ["bulk", str(rows), "-o", str(out), "--json"]
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 1, err
        assert json.loads(stdout)["outcomes"]["uncertain"] == 3
        # The command that lists them names this run's journal (not the default one).
        assert f"journal list --status uncertain --journal {out / 'journal.sqlite'}" in err
        accepted = (await emu.stats())["submits_accepted"]

        # A re-run never resends them silently, even with --retry-failed.
        code, stdout, _ = await cli(*bulk, "--retry-failed", env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 3
        assert (await emu.stats())["submits_accepted"] == accepted

        code, listing, _ = await cli("journal", "list", "--status", "uncertain", "-o", str(out))
        assert code == 0 and "3 row(s)" in listing
        assert "id r0" in listing and "uncertain" in listing and "Error(" not in listing

        # No terminal, no --yes: nothing happens.
        code, _, err = await cli(
            "journal", "resend", "--all-uncertain", "-o", str(out), env=emu.env
        )
        assert code == 2 and "--yes" in err
        assert (await emu.stats())["submits_accepted"] == accepted

        async with served_emulator(tmp_path / "healthy") as healthy:
            code, _, err = await cli(
                "journal", "resend", "--all-uncertain", "--yes", "-o", str(out), env=healthy.env
            )
            assert code == 0, err
            assert (await healthy.stats())["submits_accepted"] == 3
        code, listing, _ = await cli("journal", "list", "--status", "uncertain", "-o", str(out))
        assert "0 row(s)" in listing
        assert set(final_outcomes(out).values()) == {"saved"}

        code, _, _ = await cli("journal", "forget", "r0", "--yes", "-o", str(out))
        assert code == 0
        code, listing, _ = await cli("journal", "list", "-o", str(out))
        assert "id r0" not in listing and "id r1" in listing


@pytest.mark.long
async def test_resend_stopped_by_a_systemic_error_exits_3_as_bulk_does(tmp_path: Path) -> None:
    """The account is out of points when the uncertain rows are resent: the sending stops,
    and `journal resend` exits 3 as bulk does (it exited 1, as for lines that failed)."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        rows = tmp_path / "rows.txt"
        rows.write_text("a fox\na hen\n")
        out = tmp_path / "out"
        code, stdout, err = await cli("bulk", str(rows), "-o", str(out), "--json", env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 2, err
        await emu.set_faults(business_error=1.0, business_error_code="20110010")
        resend = ("journal", "resend", "--all-uncertain", "--yes", "-o", str(out))
        code, _, err = await cli(*resend, env=emu.env)
        assert code == 3, err
        assert "resent 2 row(s): 0 saved" in err and "out of points" in err, err


@pytest.mark.long
async def test_a_key_only_the_manifest_kept_is_collected_and_never_paid_again(
    tmp_path: Path,
) -> None:
    # A full disk kept an accepted submit's key out of the journal (its row reads uncertain:
    # "the reply was never recorded") while the manifest, written once there was room, holds
    # it. Re-runs said "re-run to fetch it" and never did, and `journal resend`, the way
    # offered to settle an uncertain line, paid for the job a second time.
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        rows = tmp_path / "rows.txt"
        rows.write_text("a fox\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(rows), "-o", str(out), "--json"]
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 1, err
        [key] = (await emu.stats())["timelines"]  # the job the gateway accepted and charged
        # The row a run that lost its journal writes to a full disk leaves for this line.
        [uncertain] = manifest(out)
        found = {**uncertain, "status": "failed", "key": key, "error_code": "download"}
        with (out / "manifest.jsonl").open("a") as handle:
            handle.write(json.dumps(found) + "\n")
        await emu.set_faults()

        code, _, err = await cli("journal", "resend", "1", "--yes", "-o", str(out), env=emu.env)
        assert code == 2 and "would pay again" in err, err
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 0 and json.loads(stdout)["outcomes"]["saved"] == 1, err
        assert (await emu.stats())["submits_accepted"] == 1
        [saved] = [record for record in manifest(out) if record["status"] == "saved"]
        assert saved["key"] == key and (out / saved["path"]).is_file()
        code, listing, _ = await cli("journal", "list", "--status", "succeeded", "-o", str(out))
        assert key in listing


@pytest.mark.long
async def test_a_lost_journal_never_pays_again_for_what_the_manifest_says_saved(
    tmp_path: Path,
) -> None:
    # A damaged journal "cannot open", and deleting it is the obvious fix; a journal passed
    # by mistake (--journal other.sqlite) is as empty. The re-run planned from the journal
    # alone, and paid again for every saved line (90 submits for 30 lines).
    async with served_emulator(tmp_path) as emu:
        rows = tmp_path / "rows.txt"
        rows.write_text("".join(f"fox {i}\n" for i in range(4)))
        out = tmp_path / "out"
        bulk = ["bulk", str(rows), "-o", str(out), "--json"]
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 0 and json.loads(stdout)["outcomes"]["saved"] == 4, err
        for part in out.glob("journal.sqlite*"):
            part.unlink()
        rows.write_text("".join(f"fox {i}\n" for i in range(5)))  # and one line more
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 0 and json.loads(stdout)["outcomes"]["saved"] == 5, err
        other = ["--journal", str(tmp_path / "other.sqlite")]
        code, stdout, err = await cli(*bulk, *other, env=emu.env)
        assert code == 0 and json.loads(stdout)["outcomes"]["saved"] == 5, err
        assert (await emu.stats())["submits_accepted"] == 5  # the new line alone was sent


@pytest.mark.long
async def test_an_accepted_job_whose_reports_were_unreadable_is_not_resent_as_failed(
    tmp_path: Path,
) -> None:
    # What a gateway that lists a key only in malformed entries leaves: the journal's row says
    # failed, the manifest's uncertain (protocol_error: it may have run and been charged).
    # --retry-failed planned from the journal alone and paid for the job again.
    async with served_emulator(tmp_path) as emu:
        rows = tmp_path / "rows.txt"
        rows.write_text("a fox\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(rows), "-o", str(out), "--json"]
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        [saved] = manifest(out)
        with sqlite3.connect(out / "journal.sqlite") as db:
            db.execute("UPDATE submits SET state = 'failed' WHERE job_key = ?", (saved["key"],))
        unreadable = {
            **{k: saved[k] for k in ("line", "key", "input")},
            "status": "uncertain",
            "error_code": "protocol_error",
            "error": "the gateway has listed this key only in malformed entries for 30.2s",
        }
        with (out / "manifest.jsonl").open("a") as handle:
            handle.write(json.dumps(unreadable) + "\n")

        # The job's images are on disk (the manifest says so): it reads saved, never resent.
        code, stdout, err = await cli(*bulk, "--retry-failed", env=emu.env)
        assert code == 0 and json.loads(stdout)["outcomes"]["saved"] == 1, err
        assert (await emu.stats())["submits_accepted"] == 1  # not paid for again
        code, stdout, err = await cli(*bulk, "--retry-uncertain", env=emu.env)
        assert code == 0 and json.loads(stdout)["outcomes"]["saved"] == 1, err
        assert (await emu.stats())["submits_accepted"] == 2  # resent: asked for


@pytest.mark.long
async def test_a_rerun_collects_an_uncertain_job_the_gateway_now_reports_readably(
    tmp_path: Path,
) -> None:
    """A job the gateway accepted and then reported only unreadably (here: over the reply
    cap) ends uncertain. Re-runs never asked about it again: it stayed uncertain forever,
    though the gateway had run it (and charged for it). A plain re-run collects it now, its
    cost held once against --max-points (a double hold refused the new line)."""
    async with served_emulator(tmp_path) as emu:
        rows = tmp_path / "rows.txt"
        rows.write_text("a fox\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(rows), "-o", str(out), "--json"]
        code, stdout, err = await cli(*bulk, "--max-response-bytes", "150", env=emu.env)
        assert code == 1, err
        said = json.loads(stdout)
        assert said["outcomes"]["uncertain"] == 1, err
        [key] = (await emu.stats())["timelines"]
        assert [r["error_code"] for r in manifest(out)] == ["protocol_error"]

        rows.write_text("a fox\na hen\n")  # and a line more, within the budget
        budget = ["--max-points", "16", "--point-price", "gpt-image-1=8"]
        code, stdout, err = await cli(*bulk, *budget, env=emu.env)
        said = json.loads(stdout)
        assert code == 0 and said["outcomes"]["saved"] == 2, err
        assert (await emu.stats())["submits_accepted"] == 2  # the new line alone was sent
        assert said["points"] == 16 and said["points_total"] == 16, said
        assert "on uncertain lines" not in err, err
        [first] = [r for r in manifest(out) if r["line"] == 1 and r["status"] == "saved"]
        assert first["key"] == key and (out / first["path"]).is_file()
        code, listing, _ = await cli("journal", "list", "--status", "succeeded", "-o", str(out))
        assert key in listing

        code, stdout, err = await cli(*bulk, *budget, env=emu.env)
        said = json.loads(stdout)
        assert code == 0 and said["outcomes"]["saved"] == 2 and said["points_total"] == 16, err
        assert (await emu.stats())["submits_accepted"] == 2


@pytest.mark.long
async def test_an_uncertain_job_the_gateway_does_not_list_stays_uncertain(
    tmp_path: Path,
) -> None:
    """Asked about again, a key the gateway does not list at all (its result cleaned up) ends
    uncertain again, never failed: --retry-failed would pay for it a second time."""
    async with served_emulator(tmp_path) as emu:
        rows = tmp_path / "rows.jsonl"
        rows.write_text(json.dumps({"id": "fox", "prompt": "a fox", "model": "dall-e-2"}) + "\n")
        out = tmp_path / "out"
        out.mkdir()
        forgotten = {
            "status": "uncertain", "line": 1, "id": "fox", "tag": "id:fox", "model": "dall-e-2",
            "prompt": "a fox", "key": "F" * 32, "error_code": "unknown_job",
            "input": str(rows.resolve()),
            "error": "the gateway listed this job and has not for 30.0s",
        }  # fmt: skip
        (out / "manifest.jsonl").write_text(json.dumps(forgotten) + "\n")
        bulk = ["bulk", str(rows), "-o", str(out), "--json", "--retry-failed"]
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 1, err
        assert "asking the gateway again about 1 uncertain line(s)" in err, err
        last = manifest(out)[-1]
        assert last["status"] == "uncertain" and last["key"] == "F" * 32, last
        assert "earlier run saw it accepted" in last["error"], last
        assert (await emu.stats())["submits_accepted"] == 0  # never resent unasked


async def test_cli_conventions(tmp_path: Path) -> None:
    code, stdout, _ = await cli("--version")
    assert code == 0 and stdout.startswith("wujie-async ")

    code, stdout, err = await cli(
        "generate", "a fox", "--model", "gpt-image-1", "--size", "1536x1024", "--quality", "low",
        "--background", "opaque", "--output-format", "png", "--moderation", "low",
        "--job-timeout", "30", "--emulator", *FAST, "-o", str(tmp_path / "g"),
    )  # fmt: skip
    assert code == 0, err
    assert len(stdout.split()) == 1 and Path(stdout.strip()).exists()

    code, _, err = await cli("generate", "a fox", "--model", "dall-e-3", "-n", "3", "--emulator")
    assert code == 2 and "-n" in err and "Traceback" not in err

    code, stdout, err = await cli("generate", "a fox", "--no-wait", "--emulator", *FAST)
    assert code == 0, err
    assert len(stdout.strip()) == 32  # the job key


@pytest.mark.long
async def test_private_key_file_variable(tmp_path: Path) -> None:
    async with served_emulator(tmp_path) as emu:
        key_file = tmp_path / "key.pem"
        key_file.write_text(emu.env["WUJIE_PRIVATE_KEY"])
        env = {k: v for k, v in emu.env.items() if k != "WUJIE_PRIVATE_KEY"}
        env["WUJIE_PRIVATE_KEY_FILE"] = str(key_file)
        code, _, err = await cli("generate", "a fox", "-o", str(tmp_path / "o"), env=env)
        assert code == 0, err

        env["WUJIE_PRIVATE_KEY_FILE"] = str(tmp_path / "nope.pem")
        code, _, err = await cli("generate", "a fox", env=env)
        assert code == 2 and "WUJIE_PRIVATE_KEY_FILE" in err and "Traceback" not in err
        assert "nope.pem" in err  # a file name is shown

        # The key itself where its file name belongs: named, never echoed.
        key = emu.env["WUJIE_PRIVATE_KEY"]
        env["WUJIE_PRIVATE_KEY_FILE"] = key
        code, _, err = await cli("generate", "a fox", env=env)
        assert code == 2 and "WUJIE_PRIVATE_KEY_FILE" in err and "not a file name" in err
        body = [line for line in key.splitlines() if line and not line.startswith("-----")]
        assert body and not any(line[:20] in err for line in body)

        # A damaged key in the file is named by the variable that names the file.
        key_file.write_text(key.replace(body[1][:20], "A" * 20))
        env["WUJIE_PRIVATE_KEY_FILE"] = str(key_file)
        code, _, err = await cli("generate", "a fox", env=env)
        assert code == 2 and "WUJIE_PRIVATE_KEY_FILE:" in err, err


def test_credentials_from_env_reads_the_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wujie_async.emulator._server import _generated_key_pem

    key_file = tmp_path / "key.pem"
    key_file.write_text(_generated_key_pem())
    for name in list(CLEAN_ENV):
        if name.startswith("WUJIE_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("WUJIE_PRIVATE_KEY", raising=False)
    monkeypatch.setenv("WUJIE_APP_ID", "app")
    monkeypatch.setenv("WUJIE_PRIVATE_KEY_FILE", str(key_file))
    assert Credentials.from_env().app_id == "app"


@pytest.mark.long
async def test_resend_refuses_rows_whose_job_was_paid_and_rows_it_does_not_know(
    tmp_path: Path,
) -> None:
    """A row whose job is running (accepted) or ended with its images (succeeded) is not sent
    again: that would pay again and drop the row that leads to the first job's images."""
    async with served_emulator(tmp_path, "--time-scale", "1") as emu:
        rows = tmp_path / "rows.jsonl"
        rows.write_text(json.dumps({"id": "slow", "prompt": "p", "model": "dall-e-2"}) + "\n")
        out = tmp_path / "out"
        # Its wait ends long before the job (10 s or more): the row stays accepted.
        code, _, err = await cli(
            "bulk", str(rows), "-o", str(out), "--job-timeout", "1", env=emu.env
        )
        assert code == 1, err
        code, listing, _ = await cli("journal", "list", "-o", str(out))
        assert "accepted" in listing, listing
        accepted = (await emu.stats())["submits_accepted"]
        code, _, err = await cli("journal", "resend", "slow", "--yes", "-o", str(out), env=emu.env)
        assert code == 2, err
        assert "id slow is accepted: its job is running (paid)" in err
        assert "wujie-async resume" in err and "nothing was sent" in err
        code, _, err = await cli(
            "journal", "resend", "nope", "slow", "--yes", "-o", str(out), env=emu.env
        )
        assert code == 2 and "no journal row for nope" in err and "nothing was sent" in err
        assert (await emu.stats())["submits_accepted"] == accepted
    async with served_emulator(tmp_path / "fast") as emu:
        out = tmp_path / "done"
        code, _, err = await cli("bulk", str(rows), "-o", str(out), env=emu.env)
        assert code == 0, err
        code, _, err = await cli("journal", "resend", "slow", "--yes", "-o", str(out), env=emu.env)
        assert code == 2 and "id slow is succeeded" in err
        assert (await emu.stats())["submits_accepted"] == 1


@pytest.mark.long
async def test_the_resume_command_a_refused_resend_names_runs_as_printed(tmp_path: Path) -> None:
    """`journal resend` of a row whose job the gateway took refuses it and names the command
    that collects it: in a folder with a space that command, pasted, named two other paths
    (it was not quoted)."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "2,2") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a fox\n")
        out = tmp_path / "my out"
        code, _, err = await cli(
            "bulk", str(prompts), "-o", str(out), "--job-timeout", "0.2", env=emu.env
        )
        assert code == 1 and "timed out" in err, err  # its row stays accepted
        code, _, err = await cli("journal", "resend", "1", "--yes", "-o", str(out), env=emu.env)
        assert code == 2 and "nothing was sent" in err, err
        printed = re.search(r"`(wujie-async resume [^`]*)`", " ".join(err.split()))
        assert printed is not None, err
        command = shlex.split(printed.group(1))
        assert command[2:] == [str(out / "journal.sqlite"), "-o", str(out)], command
        code, _, err = await cli(*command[1:], env=emu.env)
        assert code == 0, err
        assert final_outcomes(out) == {1: "saved"}
        assert (await emu.stats())["submits_accepted"] == 1


def _fox_whose_key_went_unlisted(tmp_path: Path, status: str) -> tuple[Path, Path]:
    """An input of one line (id fox), and an output folder whose manifest says an earlier run
    ended it ``status`` with ``unknown_job``: its key (never a real job's) went unlisted."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "fox", "prompt": "a fox", "model": "dall-e-2"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    earlier = {
        "status": status, "line": 1, "id": "fox", "tag": "id:fox", "model": "dall-e-2",
        "prompt": "a fox", "key": "F" * 32, "error_code": "unknown_job",
        "input": str(rows.resolve()),
        "error": "the gateway has not listed this key for 30.0s",
    }  # fmt: skip
    (out / "manifest.jsonl").write_text(json.dumps(earlier) + "\n")
    return rows, out


async def test_an_uncertain_job_whose_wait_ends_untold_stays_counted_as_maybe_charged(
    tmp_path: Path,
) -> None:
    """Asked about again, an uncertain job whose wait ended (--job-timeout) before the gateway
    said anything of it is no more told than before: the summary dropped it from "up to ...
    on uncertain lines", and no other figure counted it."""
    rows, out = _fox_whose_key_went_unlisted(tmp_path, "uncertain")
    code, stdout, err = await cli(
        "bulk", str(rows), "-o", str(out), "--json", "--emulator", *FAST, "--job-timeout", "0.3",
        "--max-points", "100", "--point-price", "dall-e-2=8",
    )  # fmt: skip
    assert code == 1 and json.loads(stdout)["outcomes"]["failed"] == 1, err
    assert "asking the gateway again about 1 uncertain line(s)" in err, err
    assert manifest(out)[-1]["error_code"] == "timeout", manifest(out)[-1]
    assert "up to 8 on uncertain lines" in err, err


async def test_a_never_listed_key_an_older_run_recorded_failed_is_not_resent(
    tmp_path: Path,
) -> None:
    """Rows written before never-listed keys ended uncertain say ``failed``/``unknown_job``:
    such a job may have run and been charged, yet --retry-failed resent it (paid twice)."""
    rows, out = _fox_whose_key_went_unlisted(tmp_path, "failed")  # as rows were written then
    code, stdout, err = await cli(
        "bulk", str(rows), "-o", str(out), "--json", "--emulator", *FAST, "--job-timeout", "0.3",
        "--retry-failed",
    )  # fmt: skip
    assert code == 1 and json.loads(stdout)["outcomes"].get("saved", 0) == 0, err
    assert "asking the gateway again about 1" in err, err
    assert [r.get("key") for r in manifest(out)] == ["F" * 32] * 2, manifest(out)


@pytest.mark.long
async def test_rows_are_accepted_in_every_form_the_cli_prints_them(tmp_path: Path) -> None:
    """Summaries name a row ``line 1 (id r0)``, and `journal list` a row that names neither
    a line nor an id ``row 2`` (``#2`` then): `journal forget`/`resend` refused both ("no
    journal row")."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        rows = rows_with_ids(tmp_path, "r0", "r1", "r2")
        out = tmp_path / "out"
        code, stdout, err = await cli("bulk", str(rows), "-o", str(out), "--json", env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 3, err
        with sqlite3.connect(out / "journal.sqlite") as db:
            [(untagged,)] = db.execute("SELECT id FROM submits WHERE tag = 'id:r1'").fetchall()
            db.execute("UPDATE submits SET tag = NULL WHERE id = ?", (untagged,))
        code, listing, _ = await cli("journal", "list", "-o", str(out))
        assert f"row {untagged} " in listing, listing
        forget = ("journal", "forget", f"row {untagged}", "line 1 (id r0)", "--yes", "-o", str(out))
        code, _, err = await cli(*forget)
        assert code == 0 and "forgot 2 row(s)" in err, err
        code, listing, _ = await cli("journal", "list", "-o", str(out))
        assert "1 row(s)" in listing and "id r2" in listing, listing
        code, _, err = await cli("journal", "forget", "#999", "--yes", "-o", str(out))
        assert code == 2 and "no journal row for #999" in err, err


@pytest.mark.long
async def test_resend_takes_max_points_and_name_as_bulk_does(tmp_path: Path) -> None:
    """`journal resend` had neither --max-points nor --name: settling uncertain rows had no
    budget (the folder's input's, as bulk's: uncertain lines count as maybe charged) and
    saved every image under the key's name."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        rows = rows_with_ids(tmp_path, "r0", "r1", "r2")
        out = tmp_path / "out"
        code, stdout, err = await cli("bulk", str(rows), "-o", str(out), "--json", env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 3, err
    async with served_emulator(tmp_path / "healthy") as healthy:
        resend = ["journal", "resend", "--all-uncertain", "--yes", "-o", str(out)]
        code, _, err = await cli(*resend, "--name", "{id}-{nope}.{ext}", env=healthy.env)
        assert code == 2 and "--name" in err, err
        code, _, err = await cli(*resend, "--max-points", "-1", env=healthy.env)
        assert code == 2 and "--max-points must be" in err, err
        # 3 uncertain lines at 2 points each may have been charged: 4 of 10 are left.
        budget = ["--max-points", "10", "--point-price", "dall-e-2=2"]
        code, _, err = await cli(*resend, *budget, "--name", "{id}-{index}.{ext}", env=healthy.env)
        assert code == 1 and "resent 3 row(s): 2 saved" in err, err
        assert "1 row(s) not sent (id r2): over the points budget" in err, err
        assert (await healthy.stats())["submits_accepted"] == 2
        saved = [r for r in manifest(out) if r["status"] == "saved"]
        assert sorted(r["path"] for r in saved) == ["r0-0.png", "r1-0.png"], saved
        assert [r["error_code"] for r in manifest(out) if r["status"] == "not_sent"] == ["budget"]


@pytest.mark.long
async def test_resend_waits_for_no_other_run_into_its_folder(tmp_path: Path) -> None:
    """`journal resend` plans from OUT's manifest and writes there, yet took no folder lock:
    a bulk run into the same folder with another journal (or none) sent the same lines."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        rows = tmp_path / "rows.txt"
        rows.write_text("a fox\n")
        out = tmp_path / "out"
        code, stdout, err = await cli("bulk", str(rows), "-o", str(out), "--json", env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 1, err
        await emu.set_faults()
        held = _lock_file.take(out / LOCK_NAME)  # another run writes OUT
        try:
            code, _, err = await cli("journal", "resend", "1", "--yes", "-o", str(out), env=emu.env)
        finally:
            _lock_file.release(held)
        assert code == 4 and "in use by another run" in err, err
        assert (await emu.stats())["submits_accepted"] == 1


@pytest.mark.long
async def test_forget_keeps_the_only_record_of_a_paid_job(tmp_path: Path) -> None:
    """A run killed outright leaves a running job's key in its journal row alone (no manifest
    row names it). `journal forget` dropped that row when asked: the re-run then knew nothing
    of the job and sent its line again, paid twice. It refuses now, naming `resume`."""
    async with served_emulator(tmp_path, "--time-scale", "1") as emu:
        rows = tmp_path / "rows.jsonl"
        rows.write_text(json.dumps({"id": "slow", "prompt": "p", "model": "dall-e-2"}) + "\n")
        out = tmp_path / "out"
        code, _, err = await cli(
            "bulk", str(rows), "-o", str(out), "--job-timeout", "1", env=emu.env
        )
        assert code == 1, err  # its wait ended long before the job: the row stays accepted
        (out / "manifest.jsonl").write_text("")  # what a run killed outright leaves
        code, _, err = await cli("journal", "forget", "slow", "--yes", "-o", str(out))
        assert code == 2 and "paid twice" in err and "wujie-async resume" in err, err
        code, listing, _ = await cli("journal", "list", "-o", str(out))
        assert "accepted" in listing, listing


@pytest.mark.long
async def test_journal_list_reads_the_journal_of_a_run_in_progress(tmp_path: Path) -> None:
    """`journal list` took the journal's writer lock just to read it: while a bulk run used
    the journal it exited 4 ("one journal has one writer at a time"), so a user could not
    watch a long run's rows. It reads beside the writer now, which goes on undisturbed."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "3,3") as emu:
        rows = rows_with_ids(tmp_path, "r0", "r1", "r2")
        out = tmp_path / "out"
        async with running_cli("bulk", str(rows), "-o", str(out), env=emu.env) as run:

            async def accepted() -> bool:
                return int((await emu.stats())["submits_accepted"]) >= 3

            await eventually(accepted, what="3 submits", alive=proc_alive(run))
            code, listing, err = await cli("journal", "list", "-o", str(out))
            assert code == 0, err
            assert "3 row(s)" in listing and "accepted" in listing, listing
            assert all(f"id r{i}" in listing for i in range(3)), listing
            code, lines, err = await cli("journal", "list", "--json", "-o", str(out))
            assert code == 0, err
            listed = [json.loads(line) for line in lines.splitlines()]
            assert [row["id"] for row in listed] == ["r0", "r1", "r2"], listed
            code, listing, err = await cli(
                "journal", "list", "--status", "uncertain", "-o", str(out)
            )
            assert code == 0 and "0 row(s)" in listing, (listing, err)
            assert run.returncode is None  # read while the run held the journal
            code, _, err = await run.finish(60)
        assert code == 0, err
        assert set(final_outcomes(out).values()) == {"saved"}
        assert (await emu.stats())["submits_accepted"] == 3  # nothing paid twice
        code, listing, _ = await cli("journal", "list", "--status", "succeeded", "-o", str(out))
        assert code == 0 and "3 row(s)" in listing, listing
        for path in out.glob("journal.sqlite*"):
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


async def test_resend_refuses_rows_named_with_all_uncertain(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """`journal resend --all-uncertain ROWS` ignored ROWS and resent every uncertain row: a
    user naming one row paid for all of them. The pair is a usage error now."""
    journal = tmp_path / "journal.sqlite"
    async with emulator() as emu, make_client(emu, journal=journal) as client:
        await client.images.generate(prompt="a", model="dall-e-2", tag="id:fox")
        await client.images.generate(prompt="b", model="dall-e-2", tag="id:owl")
    with sqlite3.connect(journal) as db:  # the owl's reply was lost
        db.execute("UPDATE submits SET state = 'uncertain', job_key = NULL WHERE tag = 'id:owl'")
    out = tmp_path / "out"
    resend = ["journal", "resend", "--yes", "--emulator", "--journal", str(journal), "-o", str(out)]
    code, _, err = await cli(*resend, "fox", "--all-uncertain")
    assert code == 2, err
    assert "not both" in err and "nothing was sent" in err, err
    with sqlite3.connect(journal) as db:
        states = dict(db.execute("SELECT tag, state FROM submits").fetchall())
    assert states == {"id:fox": "succeeded", "id:owl": "uncertain"}, states


async def test_a_number_that_is_an_id_and_a_line_names_no_row_until_said_which(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """`journal forget 2` forgot both the row whose id is "2" and the row of input line 2
    (`journal resend 2` would have paid for both). Such a word is refused now, naming the two
    forms; `journal list --json` gives each row's `name`, the form these commands take."""
    journal = tmp_path / "journal.sqlite"
    async with emulator() as emu, make_client(emu, journal=journal) as client:
        await client.images.generate(prompt="x", model="dall-e-2", tag="id:2")
        await client.images.generate(prompt="y", model="dall-e-2", tag="line:2:abc")
        await client.images.generate(prompt="z", model="dall-e-2")
    # The folder named: CI's working directory holds the README's out/ (a run's folder).
    where = ("--journal", str(journal), "-o", str(tmp_path))
    code, _, err = await cli("journal", "forget", "2", "--yes", *where)
    assert code == 2, err
    assert "'2' names two rows, id 2 and line 2" in err and "nothing was forgotten" in err, err
    code, lines, err = await cli("journal", "list", "--json", *where)
    assert code == 0, err
    names = [json.loads(line)["name"] for line in lines.splitlines()]
    assert names == ["id 2", "line 2", "row 3"], names
    for name in names:
        code, _, err = await cli("journal", "forget", name, "--yes", *where)
        assert code == 0 and "forgot 1 row(s)" in err, err
    code, listing, _ = await cli("journal", "list", *where)
    assert code == 0 and "0 row(s)" in listing, listing


async def test_journal_list_writes_nothing_and_lists_a_killed_runs_intents_as_uncertain(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """Read-only, `journal list` no longer turns a killed run's intents into uncertain rows
    (a writer does that as it opens the journal): `--status uncertain` lists them too, as
    intents, and says what an intent is."""
    journal = tmp_path / "journal.sqlite"
    async with emulator() as emu, make_client(emu, journal=journal) as client:
        await client.images.generate(prompt="sent", model="dall-e-2", tag="id:done")
        await client.images.generate(prompt="killed", model="dall-e-2", tag="id:cut")
    with sqlite3.connect(journal) as db:  # what a run killed with its submit on the wire left
        db.execute("UPDATE submits SET state = 'intent', job_key = NULL WHERE tag = 'id:cut'")
    before = journal.read_bytes()
    code, listing, err = await cli("journal", "list", "--status", "uncertain", "--journal",
                                   str(journal))  # fmt: skip
    assert code == 0, err
    assert "id cut" in listing and "intent" in listing and "1 row(s)" in listing, listing
    assert "id done" not in listing, listing
    assert "1 row(s) read intent" in err and "may have been charged" in err, err
    assert journal.read_bytes() == before
    with sqlite3.connect(journal) as db:
        assert db.execute("SELECT state FROM submits WHERE tag = 'id:cut'").fetchall() == [
            ("intent",)
        ]


async def test_another_programs_sqlite_file_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """An SQLite file that is no journal passed the journal commands' check (its header is
    SQLite's): `journal forget` opened it for writing, gave it a `submits` table and put a
    lock file beside it, then said "no journal row"; `journal list` exited 1. Both are
    usage errors now (exit 2), and the file is left alone."""
    other = tmp_path / "app.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    db.close()
    before = other.read_bytes()
    for command in (["journal", "list"], ["journal", "forget", "1", "--yes"]):
        code, _, err = await cli(*command, "--journal", str(other))
        assert code == 2, err
        assert "is not a wujie-async journal (an SQLite file without its submits table)" in err
    assert other.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["app.sqlite"]


async def test_a_row_id_that_looks_like_a_journal_row_number_names_its_own_row(
    tmp_path: Path,
) -> None:
    """A row whose id is ``#1`` (an input's ticket number, say): `journal forget '#1'` took
    it for journal row 1, another line's row, and forgot that one (a resend would have sent
    the wrong line, paid). `#N` names a row that has neither a line nor an id; an id is its
    own row's."""
    async with served_emulator(tmp_path, "--drop-after-accept", "1.0") as emu:
        rows = rows_with_ids(tmp_path, "first", "#1")
        out = tmp_path / "out"
        run = ("bulk", str(rows), "-o", str(out), "--json", "--concurrency", "1")
        code, stdout, err = await cli(*run, env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 2, err
        with sqlite3.connect(out / "journal.sqlite") as db:
            [(first,)] = db.execute("SELECT id FROM submits WHERE tag = 'id:first'").fetchall()
        assert first == 1  # journal row 1 is the line with id "first"
        code, _, err = await cli("journal", "forget", "#1", "--yes", "-o", str(out))
        assert code == 0 and "forgot 1 row(s)" in err, err
        code, listing, _ = await cli("journal", "list", "-o", str(out))
        assert "1 row(s)" in listing and "id first" in listing, listing


async def test_the_row_numbers_the_cli_prints_never_name_a_row_whose_id_reads_so(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """Rows whose ids read `#1` and `#4` (an input's ticket numbers) beside journal rows 1
    and 4: the summary after a failed forget said to drop old row 1 with `journal forget '#1'
    --yes`, which forgot the row of id `#1` (its own id comes first: maybe a line's only
    record of a job that may have been charged) and kept row 1; `journal list` named
    untagged row 4 `#4`, which named the row of id `#4`. The CLI prints `row N` now, which
    no id shadows."""
    journal = tmp_path / "journal.sqlite"
    async with emulator() as emu, make_client(emu, journal=journal) as client:
        await client.images.generate(prompt="old", model="dall-e-2", tag="id:fox")  # row 1
        await client.images.generate(prompt="new", model="dall-e-2", tag="id:fox")  # row 2
        await client.images.generate(prompt="ticket 1", model="dall-e-2", tag="id:#1")
        await client.images.generate(prompt="untagged", model="dall-e-2")  # row 4
        await client.images.generate(prompt="ticket 4", model="dall-e-2", tag="id:#4")
    said = forget_failed_said("the disk is full", journal, [1])
    [command] = [c for c in re.findall(r"`(wujie-async [^`]*)`", said) if " forget " in c]
    code, _, err = await cli(*shlex.split(command)[1:])
    assert code == 0 and "forgot 1 row(s)" in err, err

    async def listed() -> dict[int, str]:
        code, lines, err = await cli("journal", "list", "--json", "--journal", str(journal))
        assert code == 0, err
        return {row["row"]: row["name"] for row in map(json.loads, lines.splitlines())}

    names = await listed()
    assert list(names) == [2, 3, 4, 5], names
    code, _, err = await cli("journal", "forget", names[4], "--yes", "--journal", str(journal))
    assert code == 0 and "forgot 1 row(s)" in err, err
    assert list(await listed()) == [2, 3, 5]
    # An id that reads "row 2" too: the word names two rows, and neither is forgotten.
    async with emulator() as emu, make_client(emu, journal=journal) as client:
        await client.images.generate(prompt="odd id", model="dall-e-2", tag="id:row 2")
    code, _, err = await cli("journal", "forget", "row 2", "--yes", "--journal", str(journal))
    assert code == 2 and "'row 2' names two rows, id row 2 and journal row 2" in err, err
    assert "('id row 2' or '#2')" in err and "nothing was forgotten" in err, err
    assert list(await listed()) == [2, 3, 5, 6]


_COME_AND_GO = """
import os, sys
print("going", flush=True)
while True:
    os.rename(sys.argv[1], sys.argv[2])
    os.rename(sys.argv[2], sys.argv[1])
"""


async def test_forget_judges_the_run_folder_by_the_manifest_it_read(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """`journal forget` looked at OUT/manifest.jsonl twice: once to read its rows, once to
    tell whether OUT is a run's folder. A manifest created between the two (a run starting
    there) made it judge a succeeded row by a manifest it had not read: "only this journal
    holds its key", refused, though the manifest names that key. One look answers both: a
    manifest that appears and goes while forget runs, always naming the key, never has the
    row refused."""
    journal = tmp_path / "journal.sqlite"
    async with emulator() as emu, make_client(emu, journal=journal) as client:
        job = await client.images.generate(prompt="p", model="dall-e-2", tag="id:fox")
    out = tmp_path / "out"
    out.mkdir()
    aside, manifest_path = out / "aside.jsonl", out / "manifest.jsonl"
    aside.write_text(json.dumps({"status": "saved", "tag": "id:fox", "key": job.key}) + "\n")
    copies = []
    with sqlite3.connect(journal) as source:
        for n in range(40):  # one in ten or so, or more, of the old forgets was refused
            copies.append(tmp_path / f"copy{n}.sqlite")
            with sqlite3.connect(copies[-1]) as target:
                source.backup(target)
            target.close()
    source.close()
    # Another process, as a run would be: it renames the file whole, never half written.
    toggling = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _COME_AND_GO, str(aside), str(manifest_path),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    refused = 0
    try:
        assert toggling.stdout is not None
        assert await toggling.stdout.readline() == b"going\n"
        for copy in copies:
            code, _, err = await cli(
                "journal", "forget", "fox", "--yes", "--journal", str(copy), "-o", str(out)
            )
            assert code in (0, 2), err
            refused += code == 2
    finally:
        await stop_process(toggling)
    assert refused == 0, f"{refused} of {len(copies)} forgets refused"


@pytest.mark.long
async def test_forget_keeps_the_only_record_of_a_job_that_succeeded(tmp_path: Path) -> None:
    """A run killed outright while it saved a job's images leaves its journal row
    `succeeded` and no manifest row naming its key: forgotten, the re-run sent its line again
    (paid twice), as for a row still `accepted`. Refused, naming `resume`, which saves them."""
    async with served_emulator(tmp_path) as emu:
        rows = tmp_path / "rows.jsonl"
        rows.write_text(json.dumps({"id": "done", "prompt": "p", "model": "dall-e-2"}) + "\n")
        out = tmp_path / "out"
        code, _, err = await cli("bulk", str(rows), "-o", str(out), env=emu.env)
        assert code == 0, err
        (out / "manifest.jsonl").write_text("")  # what a run killed outright leaves
        code, _, err = await cli("journal", "forget", "done", "--yes", "-o", str(out))
        assert code == 2 and "paid twice" in err and "wujie-async resume" in err, err
        code, listing, _ = await cli("journal", "list", "-o", str(out))
        assert "succeeded" in listing, listing
        assert (await emu.stats())["submits_accepted"] == 1


@pytest.mark.long
async def test_resume_collects_a_cancelled_rows_job_as_forget_says(tmp_path: Path) -> None:
    """A journal row `cancelled` (a program on the same journal cancelled its wait: the job
    was accepted, paid) with no manifest row: `journal forget` refuses it and names
    `resume`, which left it alone (only accepted and succeeded rows), so the row could be
    neither collected by it nor forgotten. `resume` collects it, as a bulk re-run does."""
    from wujie_async import WujieClient

    async with served_emulator(tmp_path) as emu:
        out = tmp_path / "out"
        out.mkdir()
        journal = out / "journal.sqlite"
        credentials = Credentials(
            app_id=emu.env["WUJIE_APP_ID"], private_key=emu.env["WUJIE_PRIVATE_KEY"]
        )
        async with WujieClient(credentials, base_url=emu.base_url, journal=journal) as client:
            job = await client.images.submit(prompt="p", model="dall-e-2", tag="id:fox")
            job.cancel()  # only its wait: the job runs on, paid
            await asyncio.sleep(0)  # its done callbacks (the journal's record) run first
        code, listing, _ = await cli("journal", "list", "-o", str(out))
        assert "cancelled" in listing, listing
        code, _, err = await cli("journal", "forget", "fox", "--yes", "-o", str(out))
        assert code == 2 and "wujie-async resume" in err, err
        code, _, err = await cli("resume", str(journal), "-o", str(out), env=emu.env)
        assert code == 0, err
        assert [r.get("key") for r in manifest(out) if r.get("status") == "saved"] == [job.key]
        code, _, err = await cli("journal", "forget", "fox", "--yes", "-o", str(out))
        assert code == 0 and "forgot 1 row(s)" in err, err
        assert (await emu.stats())["submits_accepted"] == 1


async def test_forget_keeps_a_job_whose_save_was_cut_off(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """A program's own journal: its succeeded rows were said to be jobs whose images it has,
    free to forget. Since rows record saves, one that succeeded while its ``job.save()`` was
    cut off (its images paid for and not on disk) is what resume() returns to save it:
    `journal forget --status succeeded` deleted it, and the images were lost. It is refused
    now; once the job is saved, its row is forgotten."""
    journal = tmp_path / "jobs.sqlite"
    forget = ("journal", "forget", "--status", "succeeded", "--yes", "--journal", str(journal))
    async with emulator() as emu:
        async with make_client(emu, journal=journal) as client:
            saved = await client.images.submit(prompt="saved", model="dall-e-2")
            await saved.save(tmp_path / "out")
            cut = await client.images.submit(prompt="cut off", model="dall-e-2")
            await cut
        # As a SIGTERM mid-save leaves its row: the save asked for, never ended.
        with sqlite3.connect(journal) as db:
            db.execute("UPDATE submits SET save_asked = 1.0 WHERE job_key = ?", (cut.key,))
        db.close()
        code, _, err = await cli(*forget)
        assert code == 2, err
        assert "job.save() was cut off (row 2)" in err and "nothing was forgotten" in err, err
        with sqlite3.connect(journal) as db:
            assert db.execute("SELECT COUNT(*) FROM submits").fetchone() == (2,)
        db.close()
        async with make_client(emu, journal=journal) as client:
            [again] = await client.resume()
            assert again.key == cut.key
            await again.save(tmp_path / "out")
    code, _, err = await cli(*forget)
    assert code == 0 and "forgot 2 row(s)" in err, err
