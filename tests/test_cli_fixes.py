"""The bulk CLI as an outside tester ran it: a Ctrl-C at start-up stops the run, a re-run holds
the budget when the gateway reports no cost, refused credentials stop collecting, bad JSON is
bad input, and jobs another gateway took are counted as such."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from wujie_async.cli._manifest import Manifest
from wujie_async.cli._rows import ROWS_DEADLINE_S
from wujie_async.cli._run_rows import RunRows
from wujie_async.cli._stops import OutputUnwritableError

from .cli_helpers import (
    Served,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    manifest,
    proc_alive,
    running_cli,
    served_emulator,
)
from .helpers import eventually, stop_process

pytestmark = pytest.mark.anyio


def _big_input(path: Path, lines: int) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": f"start {i} " + "x" * 100}) + "\n" for i in range(lines))
    )
    return path


async def _accepted(emu: Served) -> int:
    return int((await emu.stats())["submits_accepted"])


async def _accepted_ge(emu: Served, count: int) -> bool:
    return await _accepted(emu) >= count


@pytest.mark.long
async def test_sigint_while_a_background_run_starts_stops_it(tmp_path: Path) -> None:
    """A run started with SIGINT ignored (a script's background job, ``cmd &``) and sent
    SIGINT while it reads and plans a large input stops there: exit 130, and the gateway
    accepted no more jobs than the run reports. The signal was lost (the run installed its
    handler only once it started sending) and the run went on paying until a second one."""
    big = _big_input(tmp_path / "big.jsonl", 20_000)
    out = tmp_path / "out"
    async with served_emulator(tmp_path) as emu:
        # As a shell starts a background job: SIGINT ignored, then the command exec'd.
        ignored_then_exec = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.executable, sys.argv[1:])"  # noqa: E501
        argv = [sys.executable, "-m", "wujie_async", "bulk", str(big), "-o", str(out)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ignored_then_exec, *argv, "--json", "--progress", "none",
            env=emu.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            # The first thing it does that shows: its output folder, once the input is read.
            await eventually(
                out.exists, what="the output folder", alive=lambda: proc.returncode is None
            )
            proc.send_signal(signal.SIGINT)
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 10)
        finally:
            await stop_process(proc, sig=signal.SIGKILL)
        assert proc.returncode == 130, stderr.decode()[-2000:]
        ending = json.loads(stdout.decode().splitlines()[-1])
        assert ending["exit_code"] == 130
        outcomes = ending.get("outcomes") or {}
        taken = sum(outcomes.get(name, 0) for name in ("saved", "failed", "moderated"))
        taken += ending.get("pending") or 0
        accepted = await _accepted(emu)
        # Every job the gateway took is one the run reports (an uncertain line may be one).
        assert taken <= accepted <= taken + outcomes.get("uncertain", 0)
        assert accepted < 1_000


@pytest.mark.long
async def test_a_backlog_of_rows_on_a_slow_but_steady_disk_is_no_stalled_disk() -> None:
    """Many rows queued at once (a stop ends thousands of lines ``not_sent`` together) on a disk
    that takes them steadily, if slowly: the run waits for them, and does not stop as at a
    disk that took no row for ``ROWS_DEADLINE_S``. The oldest row's age was read as the disk's
    wait: a healthy backlog longer than 1.5 s stopped the run ("its disk took no row")."""
    read_end, write_end = os.pipe()
    # The "disk": a reader that takes 64 KiB every 10 ms, about 6 MB/s, never pausing long.
    taken = bytearray()

    def disk() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                taken.extend(chunk)
                time.sleep(0.01)

    reader = threading.Thread(target=disk, daemon=True)
    reader.start()
    stops: list[OutputUnwritableError] = []
    manifest = Manifest(os.fdopen(write_end, "wb", buffering=0), source="in.jsonl")
    rows = RunRows(manifest, not_written=[], stop=stops.append)
    count = 3000  # about 12 MB: some 2 s of writing, past ROWS_DEADLINE_S
    for line in range(1, count + 1):
        rows.write({"status": "not_sent", "line": line, "prompt": "x" * 4000})
    loop = asyncio.get_running_loop()
    started = loop.time()
    await rows.settle()
    took = loop.time() - started
    assert stops == [], stops
    assert not rows.held
    assert took > ROWS_DEADLINE_S  # the backlog outlasted the old deadline
    rows.close()
    await anyio.to_thread.run_sync(reader.join, 10)
    assert taken.count(b"\n") == count


@pytest.mark.long
@pytest.mark.parametrize("fault", ["cost_unreported", "cost_zero"])
async def test_a_rerun_sends_no_new_probe_for_a_kind_whose_cost_was_never_reported(
    tmp_path: Path, fault: str
) -> None:
    """A gateway that reports no cost, ``--max-points 20`` and no ``--point-price``: the first
    run sends one job of the kind to learn its price (it is never told) and keeps the rest
    back; a re-run knows from the manifest that such a job was charged at an unknown price,
    and sends nothing more of the kind: its lines end ``not_sent`` (``unpriced``) with the
    advice to pass ``--point-price``, exit 1. Each re-run sent one more such job (5 re-runs of
    the same command charged 80 points on the 20-point budget). A cost reported as 0 (a
    gateway that says 0 until the cost is settled) is none reported: it was read as paid 0."""
    async with served_emulator(tmp_path) as emu:
        await emu.set_faults(**{fault: 1.0})
        rows = tmp_path / "rows.jsonl"
        rows.write_text("".join(json.dumps({"prompt": f"p{i}", "n": 2}) + "\n" for i in range(6)))
        out = tmp_path / "out"
        bulk = ("bulk", str(rows), "-o", str(out), "--json", "--max-points", "20")
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["saved"] == 1, err
        first = int((await emu.stats())["submits_accepted"])
        assert first == 1
        for _ in range(2):
            code, stdout, err = await cli(*bulk, env=emu.env)
            summary = json.loads(stdout)
            assert code == 1, err
            assert summary["outcomes"]["not_sent"] == 5, err
            assert (
                "--point-price" in err and "never reported" in (out / "manifest.jsonl").read_text()
            )
            assert int((await emu.stats())["submits_accepted"]) == first  # no new probe
        # With the price given, the re-run holds the budget by it and sends what fits.
        code, stdout, err = await cli(*bulk, "--point-price", "gpt-image-1=1", env=emu.env)
        assert json.loads(stdout)["outcomes"]["saved"] > 1, err


def _another_accounts_key() -> str:
    """A private key the gateway does not know for this app id: its calls are refused (401)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.mark.long
async def test_collecting_with_refused_credentials_stops_at_once_with_exit_3(
    tmp_path: Path,
) -> None:
    """A run stopped while its jobs ran, then ``resume`` and the bulk re-run with a key the
    gateway refuses (401 on every batch call): each stops within seconds, exit 3, the summary
    naming the refused credentials, and the lines stay pending (collected with the right key).
    They polled for the jobs' whole deadline (902 s), then ended every line "timed out"."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "60,60") as emu:
        rows = tmp_path / "rows.txt"
        rows.write_text("a fox\na hen\n")
        out = tmp_path / "out"
        async with running_cli("bulk", str(rows), "-o", str(out), env=emu.env) as run:
            alive = proc_alive(run)
            await eventually(lambda: _accepted_ge(emu, 2), what="2 jobs accepted", alive=alive)
            run.send_signal(signal.SIGINT)
            code, _, err = await run.finish(20)
        assert code == 130, err
        refused = emu.env | {"WUJIE_PRIVATE_KEY": _another_accounts_key()}
        journal = str(out / "journal.sqlite")
        for command in (("resume", journal, "-o", str(out)), ("bulk", str(rows), "-o", str(out))):
            # Within seconds: the timeout fails the test (the jobs' deadline was 902 s); no
            # tighter bound on the clock, which a loaded machine would break.
            code, stdout, err = await cli(*command, "--json", env=refused, timeout=20, process=True)
            assert code == 3, err
            summary = json.loads(stdout)
            assert summary["exit_code"] == 3
            assert "refused the credentials" in summary["stopped"], summary
            assert "HTTP None" not in summary["stopped"], summary
            assert summary["pending"] == 2 and not any(summary["outcomes"].values()), summary
        # Every line's last row: pending, with its key (nothing ended "timed out").
        last = {record["line"]: record for record in manifest(out)}
        assert {record["status"] for record in last.values()} == {"pending"}
        assert all(record.get("key") for record in last.values())


@pytest.mark.parametrize(
    ("row", "said"),
    [
        (
            '{"prompt": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
            "not valid JSON (nested too deeply)",
        ),
        ('{"prompt": "a", "n": ' + "9" * 5000 + "}", "not valid JSON (an integer of more than"),
        ('{"prompt": "a fox", "prompt": "a hen"}', "prompt: given more than once in the row"),
    ],
    ids=["deep", "bigint", "repeated-key"],
)
async def test_json_rows_python_cannot_read_or_that_repeat_a_key_are_bad_input(
    tmp_path: Path, row: str, said: str
) -> None:
    """A JSONL line nested 100,000 deep (RecursionError) or holding a 5,000-digit integer
    (ValueError) ended the command as an internal error, exit 70; a row that gave "prompt"
    twice was sent with the last one, silently. Each is bad input: exit 2, naming its line,
    nothing sent."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "fine"}\n' + row + "\n")
    code, stdout, err = await cli(
        "bulk", str(rows), "-o", str(tmp_path / "out"), "--emulator", "--json"
    )
    assert code == 2, err
    assert f"{rows}:2: {said}" in err
    assert json.loads(stdout)["exit_code"] == 2
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
