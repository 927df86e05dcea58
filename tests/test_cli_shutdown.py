"""The bulk CLI ends within its deadline, with the exit code its guide promises: a signal after
a disk stopped the run, and waits that a frozen disk or a hung name lookup could hold."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from wujie_async.cli._signals import TERM_GRACE_S

from .cli_helpers import (
    Served,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    manifest,
    manifest_so_far,
    proc_alive,
    running_cli,
    served_emulator,
)
from .helpers import eventually, full_disk

pytestmark = pytest.mark.anyio


async def _accepted(emu: Served) -> int:
    return int((await emu.stats())["submits_accepted"])


def _fill(disk: Path) -> None:
    """Write until the disk refuses."""
    with (disk / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(bytes(4096))


def _keys_recorded_since(emu: Served, out: Path, before: int) -> Callable[[], Awaitable[bool]]:
    """A submit accepted after the disk filled, and every accepted key in a pending row: a row
    was written after the disk refused it (room made), so the run stopped sending then."""

    async def check() -> bool:
        accepted = await _accepted(emu)
        keys = {r.get("key") for r in manifest_so_far(out) if r["status"] == "pending"}
        return accepted > before and len(keys) == accepted

    return check


@pytest.mark.long
async def test_sigterm_after_a_full_disk_stopped_the_run_exits_143(tmp_path: Path) -> None:
    """A disk that filled stops the sending (exit 3 if nothing else comes) while the jobs out
    are still collected; a SIGTERM then stops the run as it stops any run: the jobs out are
    left pending and the exit code is 143 (it was 3, the signal quitting at once as a
    second one would)."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "30,30") as emu:
        prompts = tmp_path / "prompts.txt"
        # Rows of 3 KB: the full disk refuses the next one (tmpfs pages).
        prompts.write_text("".join(f"term {i} {'x' * 3000}\n" for i in range(10)))
        with full_disk(tmp_path / "disk", size="1m", fill=False) as disk:
            out = disk / "out"
            bulk = ["bulk", str(prompts), "-o", str(out), "--no-journal", "--rate", "2"]
            async with running_cli(*bulk, env=emu.env) as run:
                alive = proc_alive(run)
                await eventually(lambda: _accepted_ge(emu, 2), what="2 submits", alive=alive)
                await anyio.to_thread.run_sync(_fill, disk)
                before = await _accepted(emu)
                await eventually(
                    _keys_recorded_since(emu, out, before), what="a refused row", alive=alive
                )
                run.send_signal(signal.SIGTERM)
                code, _, err = await run.finish(TERM_GRACE_S + 10)
            assert code == 143, err
            assert "stopped: the manifest could not be written (No space left" in err
            assert "stopped by SIGTERM: submitted jobs keep running on the gateway" in err
            sent = await _accepted(emu)
            assert 0 < sent < 10
            pending = {r["key"] for r in manifest(out) if r["status"] == "pending"}
            assert len(pending) == sent  # every paid job's key kept


async def _accepted_ge(emu: Served, count: int) -> bool:
    return await _accepted(emu) >= count
