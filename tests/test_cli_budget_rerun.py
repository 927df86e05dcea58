"""What ``bulk`` tells a user to run when ``--max-points`` kept back lines it was resending."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .cli_helpers import (
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    served_emulator,
)

pytestmark = pytest.mark.anyio


@pytest.mark.long
async def test_the_budget_hint_of_a_retry_keeps_the_flag_that_chose_the_lines(
    tmp_path: Path,
) -> None:
    """`--retry-failed` with a budget too small for every failed line: the lines kept back
    are still failed to a re-run, yet the summary said "re-run with a larger --max-points",
    and that re-run skipped them (failed 1, nothing sent)."""
    async with served_emulator(tmp_path) as emu:
        rows = tmp_path / "rows.txt"
        rows.write_text("a fox\na hen\n")
        out = tmp_path / "out"
        budget = ("--model", "dall-e-2", "--point-price", "dall-e-2=2")
        await emu.set_faults(fail_jobs=1.0)
        bulk = ("bulk", str(rows), "-o", str(out), "--json", *budget)
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["failed"] == 2, err
        await emu.set_faults()
        code, stdout, err = await cli(*bulk, "--retry-failed", "--max-points", "2", env=emu.env)
        assert code == 1 and json.loads(stdout)["outcomes"]["not_sent"] == 1, err
        hint = "re-run with a larger --max-points and --retry-failed to send them"
        assert hint in err, err
        code, stdout, err = await cli(*bulk, "--retry-failed", "--max-points", "4", env=emu.env)
        assert code == 0 and json.loads(stdout)["outcomes"]["saved"] == 2, err
        assert (await emu.stats())["submits_accepted"] == 4
