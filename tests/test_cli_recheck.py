"""Uncertain lines whose job the gateway accepted, asked about again by a re-run, ``resume``
and under ``--max-points``, as a user runs them."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from wujie_async import (
    Credentials,
    JobProtocolError,
    Limits,
    PollPolicy,
    UnknownJobError,
    WujieClient,
)

from .cli_helpers import (
    Served,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    manifest,
    served_emulator,
)

pytestmark = pytest.mark.anyio

# A gateway that forgets a job the moment it ends (it cleans up old results).
FORGETFUL = ("--retain-finished-s", "0")
FOX = {"id": "fox", "prompt": "a fox", "model": "dall-e-2"}


def _client(
    emu: Served, journal: Path | None = None, *, max_response_bytes: int | None = None
) -> WujieClient:
    """A library client on the served emulator, with a short unknown-key grace (and
    ``max_response_bytes``, when given)."""
    credentials = Credentials(
        app_id=emu.env["WUJIE_APP_ID"], private_key=emu.env["WUJIE_PRIVATE_KEY"]
    )
    poll = dataclasses.replace(PollPolicy(), first_poll_delay=0.02, min_interval=0.02)
    poll = dataclasses.replace(poll, unknown_key_grace=1.0)
    limits = (
        Limits() if max_response_bytes is None else Limits(max_response_bytes=max_response_bytes)
    )
    return WujieClient(
        credentials, base_url=emu.base_url, journal=journal, poll=poll, limits=limits
    )


async def _forgotten_fox(emu: Served, rows: Path, out: Path, *, journal: bool) -> str:
    """The state an earlier run leaves of a line whose job the gateway listed and then forgot:
    the manifest's row says uncertain (``unknown_job``) with its key, and the journal's (with
    ``journal``) failed. Returns the key."""
    rows.write_text(json.dumps(FOX) + "\n")
    out.mkdir()
    path = out / "journal.sqlite" if journal else None
    async with _client(emu, path) as client:
        job = await client.images.submit(prompt="a fox", model="dall-e-2", tag="id:fox")
        with pytest.raises(UnknownJobError) as info:
            await job
    row = {
        "status": "uncertain", "line": 1, "id": "fox", "tag": "id:fox", "model": "dall-e-2",
        "prompt": "a fox", "key": job.key, "error_code": "unknown_job",
        "input": str(rows.resolve()), "error": str(info.value),
    }  # fmt: skip
    (out / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    return job.key


@pytest.mark.long
@pytest.mark.parametrize("journal", [True, False])
async def test_a_rerun_ends_a_key_no_longer_listed_without_waiting_the_whole_grace(
    tmp_path: Path, journal: bool
) -> None:
    """Asked about again, a key the gateway no longer lists ended only after the whole 30 s
    grace, which waits for a new key to be listed at all: this key was listed long ago. It
    ends after a few seconds of replies now, still uncertain (never failed, never resent)."""
    async with served_emulator(tmp_path, *FORGETFUL) as emu:
        rows, out = tmp_path / "rows.jsonl", tmp_path / "out"
        key = await _forgotten_fox(emu, rows, out, journal=journal)
        started = time.monotonic()
        bulk = ["bulk", str(rows), "-o", str(out), "--json", "--retry-failed"]
        code, stdout, err = await cli(*bulk, *([] if journal else ["--no-journal"]), env=emu.env)
        assert time.monotonic() - started < 15.0, err
        assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 1, err
        assert "asking the gateway again about 1 uncertain line(s)" in err, err
        last = manifest(out)[-1]
        assert last["status"] == "uncertain" and last["key"] == key, last
        assert (await emu.stats())["submits_accepted"] == 1  # never resent unasked


@pytest.mark.long
async def test_resume_collects_an_uncertain_job_the_gateway_now_reports_readably(
    tmp_path: Path,
) -> None:
    """A job the gateway accepted and then reported only unreadably (here: over the reply
    cap) ends uncertain; its journal row reads failed. `resume` left it alone (a bulk re-run
    asks about it again): it asks now, saves its images once and counts its cost once."""
    async with served_emulator(tmp_path) as emu:
        rows, out = tmp_path / "rows.jsonl", tmp_path / "out"
        rows.write_text(json.dumps(FOX) + "\n")
        out.mkdir()
        async with _client(emu, out / "journal.sqlite", max_response_bytes=150) as client:
            job = await client.images.submit(prompt="a fox", model="dall-e-2", tag="id:fox")
            with pytest.raises(JobProtocolError) as info:
                await job
        row = {
            "status": "uncertain", "line": 1, "id": "fox", "tag": "id:fox", "model": "dall-e-2",
            "prompt": "a fox", "key": job.key, "error_code": "protocol_error",
            "input": str(rows.resolve()), "error": str(info.value),
        }  # fmt: skip
        (out / "manifest.jsonl").write_text(json.dumps(row) + "\n")
        resume = ["resume", str(out / "journal.sqlite"), "-o", str(out), "--json"]
        code, stdout, err = await cli(*resume, env=emu.env)
        said = json.loads(stdout)
        assert code == 0 and said["outcomes"]["saved"] == 1 and said["images"] == 1, err
        assert "asking the gateway again about 1 uncertain line(s)" in err, err
        [saved] = [r for r in manifest(out) if r["status"] == "saved"]
        assert saved["key"] == job.key and (out / saved["path"]).is_file(), saved
        assert said["points"] == saved["points"] == 2, said  # dall-e-2: 2 points an image
        code, stdout, err = await cli(*resume, env=emu.env)
        said = json.loads(stdout)
        assert code == 0 and said["lines"] == 0 and said["points"] == 0, err
        assert len([r for r in manifest(out) if r["status"] == "saved"]) == 1
        code, stdout, err = await cli("bulk", str(rows), "-o", str(out), "--json", env=emu.env)
        said = json.loads(stdout)
        assert code == 0 and said["outcomes"]["saved"] == 1 and said["points_total"] == 2, err
        assert (await emu.stats())["submits_accepted"] == 1  # never paid again


@pytest.mark.long
async def test_an_unpriced_uncertain_job_collected_now_is_charged_to_the_budget(
    tmp_path: Path,
) -> None:
    """An uncertain line of a kind with no known price counts nothing among what uncertain
    lines may have cost; asked about again and found done, its cost was not charged to
    --max-points either: the lines sent after it went past the budget by what it cost."""
    async with served_emulator(tmp_path) as emu:
        rows, out = tmp_path / "rows.jsonl", tmp_path / "out"
        fox = {**FOX, "n": 4}  # 8 points at the emulator's 2 an image
        hens = [{"id": f"hen{i}", "prompt": f"hen {i}", "model": "gpt-image-1"} for i in range(3)]
        rows.write_text("".join(json.dumps(row) + "\n" for row in [fox, *hens]))
        out.mkdir()
        async with _client(emu, out / "journal.sqlite", max_response_bytes=150) as client:
            job = await client.images.submit(prompt="a fox", model="dall-e-2", n=4, tag="id:fox")
            with pytest.raises(JobProtocolError) as info:
                await job
        row = {
            "status": "uncertain", "line": 1, "id": "fox", "tag": "id:fox", "model": "dall-e-2",
            "prompt": "a fox", "n": 4, "key": job.key, "error_code": "protocol_error",
            "input": str(rows.resolve()), "error": str(info.value),
        }  # fmt: skip
        (out / "manifest.jsonl").write_text(json.dumps(row) + "\n")
        # 30 points: the fox's 8 and two hens at 8; the hens go half a second apart, so the
        # fox (asked about at once) is told by the third.
        budget = ["--max-points", "30", "--point-price", "gpt-image-1=8", "--rate", "2"]
        code, stdout, err = await cli(
            "bulk", str(rows), "-o", str(out), "--json", *budget, env=emu.env
        )
        said = json.loads(stdout)
        assert said["outcomes"]["saved"] == 3 and said["outcomes"]["not_sent"] == 1, err
        assert code == 1 and said["points_total"] == 24 <= 30, said
        assert [r["error_code"] for r in manifest(out) if r["status"] == "not_sent"] == ["budget"]
        assert (await emu.stats())["submits_accepted"] == 3  # the fox, and two hens
