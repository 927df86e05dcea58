"""The bulk CLI as an outside tester ran it: a Ctrl-C at start-up stops the run, a re-run holds
the budget when the gateway reports no cost, refused credentials stop collecting, bad JSON is
bad input, and jobs another gateway took are counted as such."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from .cli_helpers import (
    Served,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
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

