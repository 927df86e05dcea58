"""A bulk run's journal on another gateway (staging for production, a changed
WUJIE_BASE_URL, another account): its paid lines are neither collected there nor resent."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from .cli_helpers import CLEAN_ENV, cli, manifest
from .conftest import EmulatorFactory, make_client
from .helpers import SteppedClock

pytestmark = pytest.mark.anyio


def _journal_states(journal: Path) -> list[str]:
    with sqlite3.connect(journal) as db:
        return [state for (state,) in db.execute("SELECT state FROM submits ORDER BY id")]


async def test_a_rerun_on_another_gateway_neither_collects_nor_resends_its_paid_lines(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """The re-run asked the other gateway about the accepted lines' keys: unknown there, each
    ended "unknown key" and its row failed (its paid images never collected, one flag away
    from being paid again). Now those lines are left as they are, the summary names each
    with the base URL that took it and the command that collects them; the exit is 1."""
    clock = SteppedClock()  # gateway A's jobs run only when the test moves its clock
    async with emulator(clock=clock) as gateway_a, emulator() as gateway_b:
        gateway_b.register(gateway_a.credentials)  # the same account on both
        creds = gateway_a.credentials
        env_a = CLEAN_ENV | {
            "WUJIE_APP_ID": creds.app_id,
            "WUJIE_PRIVATE_KEY": creds.private_key,
            "WUJIE_BASE_URL": gateway_a.base_url,
        }
        env_b = env_a | {"WUJIE_BASE_URL": gateway_b.base_url}
        rows = tmp_path / "rows.txt"
        rows.write_text("a fox\nan owl\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(rows), "-o", str(out), "--json"]
        # Two jobs accepted (paid) by A, still running when the run stops waiting for them.
        code, stdout, err = await cli(*bulk, "--job-timeout", "0.2", env=env_a)
        assert code == 1 and json.loads(stdout)["outcomes"]["failed"] == 2, err
        assert _journal_states(out / "journal.sqlite") == ["accepted", "accepted"]

        for flags in ((), ("--retry-failed", "--retry-uncertain")):
            code, stdout, err = await cli(*bulk, *flags, "--job-timeout", "5", env=env_b)
            assert code == 1, err
            summary = json.loads(stdout)
            assert summary["outcomes"]["saved"] == 0 and summary["exit_code"] == 1, summary
            # Counted under their own name: known accepted, not "maybe charged, no reply".
            assert summary["outcomes"]["other_gateway"] == 2, summary
            assert summary["outcomes"]["uncertain"] == 0, summary
            assert "other_gateway 2" in err and "without a reply" not in err, err
            assert "line 1, line 2" in err and gateway_a.base_url in err, err
            assert f"--base-url {gateway_a.base_url}" in err, err
            assert creds.private_key not in err + stdout
            assert _journal_states(out / "journal.sqlite") == ["accepted", "accepted"]
            stats = gateway_b.stats()
            assert stats["submits_accepted"] == 0 and not stats["batch_keys"]

        # `resume` (collect only) leaves them as well.
        journal = str(out / "journal.sqlite")
        code, _, err = await cli("resume", journal, "-o", str(out), "--job-timeout", "5", env=env_b)
        assert code == 1 and f"--base-url {gateway_a.base_url}" in err, err
        assert _journal_states(out / "journal.sqlite") == ["accepted", "accepted"]
        assert not gateway_b.stats()["batch_keys"]

        clock.advance(30)  # A's jobs run to their end
        code, stdout, err = await cli(*bulk, env=env_a)
        assert code == 0 and json.loads(stdout)["outcomes"]["saved"] == 2, err
        assert gateway_a.stats()["submits_accepted"] == 2  # nothing was paid twice
        assert _journal_states(out / "journal.sqlite") == ["succeeded", "succeeded"]
        saved = [record for record in manifest(out) if record["status"] == "saved"]
        assert len(saved) == 2 and all((out / record["path"]).is_file() for record in saved)

        # The journal's listing says where each row went (--json: for scripts).
        code, listing, err = await cli("journal", "list", "--json", "-o", str(out))
        assert code == 0, err
        assert [json.loads(line)["base_url"] for line in listing.splitlines()] == [
            gateway_a.base_url
        ] * 2


async def test_a_resend_to_another_gateway_is_a_new_submit_recorded_as_that_gateways(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """`journal resend` of an uncertain row (no key: nothing to collect anywhere) sends a new
    submit to the gateway it is given, and the new row records that gateway, so that a
    resume on it collects the job (and one on the first gateway leaves it alone)."""
    journal = tmp_path / "journal.sqlite"
    async with emulator() as gateway_a, emulator() as gateway_b:
        gateway_b.register(gateway_a.credentials)
        async with make_client(gateway_a, journal=journal) as client:
            await client.images.generate(prompt="an owl", model="dall-e-2", tag="id:owl")
        with sqlite3.connect(journal) as db:  # the reply was lost
            db.execute("UPDATE submits SET state = 'uncertain', job_key = NULL")
        creds = gateway_a.credentials
        env_b = CLEAN_ENV | {
            "WUJIE_APP_ID": creds.app_id,
            "WUJIE_PRIVATE_KEY": creds.private_key,
            "WUJIE_BASE_URL": gateway_b.base_url,
        }
        out = tmp_path / "out"
        resend = ["journal", "resend", "owl", "--yes", "--journal", str(journal), "-o", str(out)]
        code, _, err = await cli(*resend, env=env_b)
        assert code == 0, err
        assert gateway_b.stats()["submits_accepted"] == 1
        code, listing, err = await cli("journal", "list", "--json", "--journal", str(journal))
        assert code == 0, err
        [row] = [json.loads(line) for line in listing.splitlines()]
        assert row["state"] == "succeeded" and row["base_url"] == gateway_b.base_url
