"""The wujie-async command end to end, as a user runs it (real processes, real files)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import pytest

from wujie_async.cli._out_lock import remove_stale_temp_files
from wujie_async.cli._parser import build_parser
from wujie_async.cli._run_warnings import forget_failed_said

from .cli_helpers import (
    FAST,
    Served,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    manifest,
    proc_alive,
    running_cli,
    served_emulator,
)
from .helpers import eventually, png_size

pytestmark = pytest.mark.anyio


def check_manifest(out: Path) -> list[dict[str, object]]:
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    lines = [record for record in records if record["status"] == "saved"]
    for line in lines:
        data = (out / str(line["path"])).read_bytes()
        assert hashlib.sha256(data).hexdigest() == line["sha256"]
        assert len(data) == line["bytes"]
        png_size(data)
        assert line["path"] == f"{line['key']}-{line['index']}.png"
    files = {p.name for p in out.glob("*.png")}
    assert files == {str(line["path"]) for line in lines}  # no stray or half-written files
    assert not list(out.glob(".*.part"))
    return lines


@pytest.mark.slow
async def test_bulk_of_two_hundred_prompts(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(200)) + "\n")
    out = tmp_path / "out"
    code, _, err = await cli(
        "bulk", str(prompts), "--emulator", "--emulator-time-scale", "0.01",
        "--model", "dall-e-2", "-n", "2", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    lines = check_manifest(out)
    assert len(lines) == 400
    assert {line["prompt"] for line in lines} == {f"prompt number {i}" for i in range(200)}
    assert "200 line(s): saved 200; 400 image(s)" in err
    assert "progress: 200/200 lines" in err and "img/s" in err  # the progress line


@pytest.mark.long
async def test_jsonl_requests_and_failed_jobs_exit_1(tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    lines = [
        {"prompt": "one", "model": "gpt-image-1", "n": 2, "size": "1536x1024"},
        {"prompt": "two", "model": "dall-e-3", "quality": "hd"},
    ]
    requests.write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "out"
    code, _, err = await cli(
        "bulk", str(requests), "--emulator", "--emulator-time-scale", "0.01", "--out", str(out)
    )
    assert code == 0, err
    sizes = {png_size((out / str(line["path"])).read_bytes()) for line in check_manifest(out)}
    assert sizes == {(192, 128), (128, 128)}

    code, _, err = await cli(
        "bulk", str(requests), "--emulator", "--emulator-time-scale", "0.01",
        "--emulator-fault", "fail_jobs=1.0", "--out", str(tmp_path / "failing"),
    )  # fmt: skip
    assert code == 1
    assert "2 line(s): failed 2" in err and "fail_code=50000001" in err

    refused = tmp_path / "refused"
    fault = ["--emulator-fault", "fail_jobs=5"]
    code, _, err = await cli("bulk", str(requests), "--emulator", *fault, "--out", str(refused))
    assert code == 2 and "--emulator-fault fail_jobs: a probability, from 0 to 1" in err, err
    assert not refused.exists()  # said before OUT was made


async def test_the_manifest_is_private_as_the_journal_is(tmp_path: Path) -> None:
    """The manifest (prompts, keys, paths) was written 0644 beside a 0600 journal that is
    private "because it holds prompts". An older one is tightened by the next run."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    out = tmp_path / "out"
    bulk = ["bulk", str(prompts), "--emulator", "--emulator-time-scale", "0.01", "-o", str(out)]
    code, _, err = await cli(*bulk, "--model", "dall-e-2")
    assert code == 0, err
    manifest = out / "manifest.jsonl"
    assert manifest.stat().st_mode & 0o777 == 0o600
    manifest.chmod(0o644)  # written by an earlier version
    prompts.write_text("a fox\nan owl\n")
    code, _, err = await cli(*bulk, "--model", "dall-e-2")
    assert code == 0, err
    assert manifest.stat().st_mode & 0o777 == 0o600
    assert len(check_manifest(out)) == 2


async def test_bad_input_files_name_their_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "fine", "model": "dall-e-2"}\n'
        "# a comment\n"
        '{"prompt": "x", "model": "dall-e-3", "n": 4}\n'
        "not json\n"
        '["a list"]\n'
    )
    code, _, err = await cli("bulk", str(bad), "--emulator", "--out", str(tmp_path / "o"))
    assert code == 2
    assert f"{bad}:3: n: dall-e-3 allows n from 1 to 1" in err
    assert f"{bad}:4: not valid JSON" in err
    assert f"{bad}:5: must be a JSON object" in err
    assert not (tmp_path / "o").exists()  # nothing was started

    code, _, err = await cli("bulk", str(tmp_path / "missing.txt"), "--emulator")
    assert code == 2 and "cannot read" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    code, _, err = await cli("bulk", str(empty), "--emulator")
    assert code == 2 and "no prompts" in err


async def test_a_manifest_that_is_a_folder_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "out" / "manifest.jsonl").mkdir(parents=True)
    rows = tmp_path / "rows.txt"
    rows.write_text("a fox\n")
    code, _, err = await cli("bulk", str(rows), "--emulator", "-o", str(tmp_path / "out"))
    assert code == 2 and "manifest.jsonl is not a file" in err, err  # not "internal error"


async def test_resume_without_a_journal_says_where_one_comes_from(tmp_path: Path) -> None:
    # Straight after the README's run (--emulator keeps no journal): not the command that
    # just failed as its own advice.
    code, _, err = await cli("resume", str(tmp_path / "journal.sqlite"), "-o", str(tmp_path))
    assert code == 2 and "no journal at" in err
    assert "runs with --emulator keep none" in err, err


async def test_no_credentials_is_said_clearly(tmp_path: Path) -> None:
    out = tmp_path / "images"
    for command in (["generate", "a fox"], ["status", "K" * 32, "--wait"]):
        code, _, err = await cli(*command, "--out", str(out))
        assert code == 2
        assert "WUJIE_APP_ID" in err and "--emulator" in err
        assert not out.exists()  # said before the folder was made


@pytest.mark.long
async def test_each_cli_run_is_a_process_of_its_own(tmp_path: Path) -> None:
    # The tests fork `wujie-async` from a pre-imported server (tests/cli_helpers.py): each run
    # must still be a process with its own pid, signals and exit status, gone once it ended.
    creds = tmp_path / "creds.json"
    emulator = ("emulator", "--port", "0", "--credentials-out", str(creds))
    async with running_cli(*emulator) as proc:
        assert proc.pid != os.getpid()
        alive = lambda: proc.returncode is None  # noqa: E731
        await eventually(creds.exists, timeout=20, what="the credentials file", alive=alive)
        os.kill(proc.pid, 0)  # alive
        proc.send_signal(signal.SIGKILL)
        code, _, _ = await proc.finish(10)
    assert code == -signal.SIGKILL  # as asyncio reports a process a signal ended
    async with running_cli("generate", "x", "--emulator", "--emulator-time-scale", "0") as proc:
        code, _, err = await proc.finish(20)
    assert code == 2 and "--emulator-time-scale" in err, err
    with pytest.raises(TimeoutError):
        # never ends by itself: killed when the wait gives up
        await cli(*emulator, timeout=0.5, process=True)


async def test_generate_prints_the_saved_paths(tmp_path: Path) -> None:
    code, out, err = await cli(
        "generate", "a red fox", "-n", "3", "--model", "dall-e-2", "--emulator",
        "--emulator-time-scale", "0.01", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    paths = out.split()
    assert len(paths) == 3 and all(Path(p).exists() for p in paths)


@pytest.mark.long
async def test_generate_never_advises_running_itself_again_to_collect_its_job(
    tmp_path: Path,
) -> None:
    # generate run again sends a new job: "re-run the same command to collect them (they are
    # not sent again)" after a timeout paid a second time, and "resend them by adding
    # --retry-uncertain" named a flag generate does not have.
    fast = ("--emulator", "--emulator-time-scale", "0.05", "--progress", "none")
    out = tmp_path / "out"
    code, _, err = await cli("generate", "a fox", *fast, "--job-timeout", "0.05", "-o", str(out))
    assert code == 1, err
    [key] = [r["key"] for r in manifest(out) if r.get("error_code") == "timeout"]
    assert f"collect it with wujie-async status {key} --wait -o {out}" in err, err
    assert "re-run the same command" not in err, err
    code, _, err = await cli(
        "generate", "a fox", *fast, "--emulator-fault", "drop_after_accept=1", "-o", str(out)
    )
    assert code == 1 and "may have been charged without a reply" in err, err
    assert "--retry-uncertain" not in err and "run the same command again" in err, err
    gone = tmp_path / "gone"
    code, _, err = await cli(
        "generate", "a fox", *fast, "--emulator-fault", "images_gone=1", "-o", str(gone)
    )
    assert code == 1, err
    [key] = {r["key"] for r in manifest(gone) if r.get("error_code") == "gone"}
    assert f"wujie-async status {key} --wait -o {gone} asks for its newest listing" in err, err


async def test_generate_whose_image_is_over_the_cap_names_status_wait_not_a_rerun(
    tmp_path: Path,
) -> None:
    # "re-run with a larger --max-image-bytes to fetch it (the jobs are paid and not sent
    # again)": run again, generate sends a new job, paid again, and collects nothing of the first.
    fast = ("--emulator", "--emulator-time-scale", "0.01", "--progress", "none")
    out = tmp_path / "out"
    code, _, err = await cli("generate", "a fox", *fast, "--max-image-bytes", "100", "-o", str(out))
    assert code == 1, err
    [key] = [r["key"] for r in manifest(out) if r.get("error_code") == "download"]
    assert f"fetch it with wujie-async status {key} --wait -o {out} --max-image-bytes" in err, err
    assert "not sent again" not in err and "sends a new job, paid again" in err, err


@pytest.mark.long
async def test_generate_of_a_key_never_listed_names_status_wait_not_a_rerun(
    tmp_path: Path,
) -> None:
    # The key was handed out and never listed (the gateway's 30 s grace): uncertain, maybe
    # charged. The summary said "A re-run of the same command asks about them again" (run
    # again, generate sends a new job: paid twice) and "--retry-uncertain" (generate has none).
    out = tmp_path / "out"
    code, _, err = await cli(
        "generate", "a fox", "--emulator", "--emulator-time-scale", "0.01", "--progress", "none",
        "--emulator-fault", "absent_jobs=1", "--emulator-fault", "absent_s=600", "-o", str(out),
        timeout=90,
    )  # fmt: skip
    assert code == 1, err
    [key] = [r["key"] for r in manifest(out) if r.get("error_code") == "unknown_job"]
    assert f"wujie-async status {key} --wait -o {out}" in err, err
    assert "A re-run of the same command" not in err and "--retry-uncertain" not in err, err
    assert "running the same command again sends a new job, paid again" in err, err


@pytest.mark.long
async def test_generate_interrupted_names_the_command_that_collects_its_job(
    tmp_path: Path,
) -> None:
    # "interrupted: ... re-run the same command to collect them and send the rest": run
    # again, generate sent (and paid for) a second job and never collected the first.
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "3,3") as emu:
        out = tmp_path / "out"
        async with running_cli("generate", "a fox", "-o", str(out), env=emu.env) as run:
            await eventually(
                lambda: _accepted_at_least(emu, 1), what="the submit", alive=proc_alive(run)
            )
            run.send_signal(signal.SIGINT)
            code, _, err = await run.finish(30)
        assert code == 130, err
        assert "re-run the same command" not in err, err
        [collect] = [line.strip() for line in err.splitlines() if "--wait" in line]
        words = shlex.split(collect)
        assert words[:2] == ["wujie-async", "status"], collect
        code, stdout, err = await cli(*words[1:], env=emu.env)
        assert code == 0, err
        assert len(stdout.split()) == 1 and Path(stdout.split()[0]).exists()
        assert (await emu.stats())["submits_accepted"] == 1


async def _accepted_at_least(emu: Served, count: int) -> bool:
    return int((await emu.stats())["submits_accepted"]) >= count


@pytest.mark.slow
async def test_ctrl_c_then_resume_then_rerun(tmp_path: Path) -> None:
    async with served_emulator(tmp_path, "--time-scale", "0.05") as emu:
        env = emu.env
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(f"resumable {i}" for i in range(60)))
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "--model", "dall-e-2", "--out", str(out), "--rate", "20"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wujie_async", *bulk, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await eventually(
            lambda: (out / "manifest.jsonl").exists() and (out / "manifest.jsonl").read_text(),
            what="a manifest line",
            alive=lambda: proc.returncode is None,
        )
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 130, err.decode()
        assert f"wujie-async resume {out / 'journal.sqlite'}" in err.decode()
        accepted = (await emu.stats())["submits_accepted"]
        assert isinstance(accepted, int) and 0 < accepted < 60

        code, _, err_text = await cli(
            "resume", str(out / "journal.sqlite"), "--out", str(out), env=env
        )
        assert code == 0, err_text
        code, _, err_text = await cli(*bulk, env=env)
        assert code == 0, err_text
        assert "skipping" in err_text

        lines = check_manifest(out)
        assert sorted(str(line["prompt"]) for line in lines) == sorted(
            f"resumable {i}" for i in range(60)
        )
        assert (await emu.stats())["submits_accepted"] == 60  # none paid twice


def test_printed_commands_name_a_path_that_starts_with_a_dash_as_a_path(tmp_path: Path) -> None:
    """A relative --out or journal that starts with '-' (given as ./-runs) was printed as it
    is: pasted, the command's parser took the path for an option and the command failed."""
    journal = Path("-runs/journal.sqlite")
    said = forget_failed_said("the disk is full", journal, [3, 7])
    commands = re.findall(r"`(wujie-async [^`]*)`", said)
    assert len(commands) == 1, said
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert Path(args.journal) == journal, command


async def test_a_killed_runs_temporary_files_are_removed_by_the_next_run(tmp_path: Path) -> None:
    # `kill -9` while images downloaded left their `.wujie-*.part` files in OUT, and no later
    # run removed them: a folder of a big input, killed a few times, filled up with them. The
    # next bulk run (it holds the folder's lock) removes those no live process writes.
    out = tmp_path / "out"
    out.mkdir()
    left = [".wujie-0.0123456789ab.part", ".wujie.abcdef012345.part"]
    kept = [".wujie-1.fedcba987654.part", ".wujie-notes.part", "mine.part"]
    long_ago = 1_000_000_000
    for name in left + kept:
        (out / name).write_bytes(b"\x89PNG half")
        os.utime(out / name, (long_ago, long_ago))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    with (out / kept[0]).open("ab"):  # a download of a live `generate` into the same folder
        code, _, err = await cli("bulk", str(prompts), "--emulator", *FAST, "-o", str(out))
    assert code == 0, err
    assert not any((out / name).exists() for name in left)
    assert all((out / name).exists() for name in kept)
    assert len(list(out.glob("*.png"))) == 1


def test_stale_temporary_files_removed_are_counted_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stale, fresh = tmp_path / ".wujie-0.0123456789ab.part", tmp_path / ".wujie.abcdef012345.part"
    stale.write_bytes(b"")
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    fresh.write_bytes(b"")  # written after the run started: a live writer's
    caplog.set_level(logging.INFO, logger="wujie_async.cli")
    assert remove_stale_temp_files(tmp_path, fresh.stat().st_mtime - 1) == 1
    assert not stale.exists() and fresh.exists()
    assert "removed 1 temporary file(s)" in caplog.text
