"""``wujie-async bulk`` on its unhappy paths, end to end (the bulk job: `wujie_async.cli._bulk`)."""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import socket
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from wujie_async.cli._bulk_data import BulkResult
from wujie_async.cli._run_warnings import stop_said
from wujie_async.cli._stops import OutputUnwritableError

from .cli_helpers import (
    CLEAN_ENV,
    FAST,
    Served,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    final_outcomes,
    journal_keys,
    manifest,
    proc_alive,
    running_cli,
    served_emulator,
)
from .helpers import GENERATIONS, eventually
from .hostile import recording_gateway, serve, throwaway_credentials

pytestmark = pytest.mark.anyio


def prompts(tmp_path: Path, count: int, name: str = "prompts.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(f"prompt number {i}" for i in range(count)) + "\n")
    return path


# --- 1. outcomes ---------------------------------------------------------------------------------
async def test_every_line_has_one_outcome_in_the_manifest_and_the_json_summary(
    tmp_path: Path,
) -> None:
    requests = tmp_path / "rows.jsonl"
    rows = [
        {"id": "fox", "prompt": "a fox", "model": "dall-e-2", "n": 2},
        {"id": "nope", "prompt": "a forbidden thing", "model": "dall-e-2"},
        {"prompt": "an owl", "model": "dall-e-2"},
    ]
    requests.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    out = tmp_path / "out"
    code, stdout, err = await cli(
        "bulk", str(requests), "--emulator", *FAST, "-o", str(out), "--json",
        "--emulator-fault", 'moderation_words=["forbidden"]',
    )  # fmt: skip
    assert code == 1, err
    summary = json.loads(stdout)
    assert summary["lines"] == 3
    assert summary["outcomes"]["saved"] == 2 and summary["outcomes"]["moderated"] == 1
    records = manifest(out)
    saved = [r for r in records if r["status"] == "saved"]
    assert len(saved) == 3  # 2 images of "fox", 1 of "an owl"
    assert {r.get("id") for r in saved} == {"fox", None}
    (moderated,) = [r for r in records if r["status"] != "saved"]
    assert moderated["status"] == "moderated" and moderated["id"] == "nope"
    assert moderated["line"] == 2 and moderated["model"] == "dall-e-2" and moderated["key"]
    assert moderated["error_code"] and "Error(" not in moderated["error"]
    assert "\n" not in moderated["error"]
    assert "moderated 1" in err and "saved 2" in err  # the summary on stderr


async def test_a_submit_refused_per_line_is_rejected_not_a_crash(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = await cli(
        "bulk", str(prompts(tmp_path, 3)), "--emulator", *FAST, "-o", str(out), "--json",
        "--emulator-fault", "business_error=1.0",
        "--emulator-fault", "business_error_code=20110001",
    )  # fmt: skip
    assert code == 1, err
    assert json.loads(stdout)["outcomes"]["rejected"] == 3
    assert {r["error_code"] for r in manifest(out)} == {"20110001"}
    assert "Traceback" not in err


# --- 2. re-runs ----------------------------------------------------------------------------------
@pytest.mark.slow
async def test_retry_failed_until_all_saved_and_a_saved_line_is_never_resent(
    tmp_path: Path,
) -> None:
    async with served_emulator(tmp_path, "--fail-jobs", "0.3", "--seed", "3") as emu:
        file = prompts(tmp_path, 20)
        out = tmp_path / "out"
        bulk = ["bulk", str(file), "--model", "dall-e-2", "-o", str(out), "--json"]
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 1, err
        failed_first = json.loads(stdout)["outcomes"]["failed"]
        assert failed_first > 0

        # A plain re-run sends nothing: failed lines wait for --retry-failed, and say so.
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 1 and "--retry-failed" in err
        assert json.loads(stdout)["outcomes"]["failed"] == failed_first
        assert (await emu.stats())["submits_accepted"] == 20

        for _ in range(12):
            code, stdout, err = await cli(*bulk, "--retry-failed", env=emu.env)
            if code == 0:
                break
            assert code == 1, err
        assert code == 0, err
        assert json.loads(stdout)["outcomes"]["saved"] == 20
        finals = final_outcomes(out)
        assert sorted(finals) == list(range(1, 21)) and set(finals.values()) == {"saved"}
        failures = sum(1 for r in manifest(out) if r["status"] == "failed")
        # One paid submit per attempt a line needed; no saved line was ever sent again.
        assert (await emu.stats())["submits_accepted"] == 20 + failures
        saved = [r for r in manifest(out) if r["status"] == "saved"]
        assert len(saved) == 20 and len({r["key"] for r in saved}) == 20


@pytest.mark.long
@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
async def test_lines_that_timed_out_are_collected_by_a_rerun_never_resent(
    tmp_path: Path, journal: bool
) -> None:
    # --job-timeout is how long the run waits, not the jobs' fate: they are paid and may
    # still end. A plain re-run collects them by key (even --retry-failed does not resend).
    async with served_emulator(tmp_path, "--time-scale", "0.3") as emu:
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts(tmp_path, 3)), "--model", "dall-e-2", "-o", str(out)]
        bulk += ["--json"] if journal else ["--json", "--no-journal"]
        code, stdout, err = await cli(*bulk, "--job-timeout", "0.05", env=emu.env)
        assert code == 1, err
        assert json.loads(stdout)["outcomes"]["failed"] == 3
        assert "3 line(s) timed out" in err and "re-run the same command to collect" in err
        assert {r["error_code"] for r in manifest(out) if r["status"] != "pending"} == {"timeout"}
        code, stdout, err = await cli(*bulk, "--retry-failed", env=emu.env)
        assert code == 0, err
        assert json.loads(stdout)["outcomes"]["saved"] == 3
        assert (await emu.stats())["submits_accepted"] == 3


# --- 3. systemic errors --------------------------------------------------------------------------
@pytest.mark.long
async def test_wrong_app_id_stops_at_once_and_exits_3(tmp_path: Path) -> None:
    async with served_emulator(tmp_path) as emu:
        out = tmp_path / "out"
        env = emu.env | {"WUJIE_APP_ID": "not-my-app"}
        code, stdout, err = await cli(
            "bulk", str(prompts(tmp_path, 200)), "-o", str(out), "--concurrency", "8", "--json",
            env=env,
        )  # fmt: skip
        assert code == 3, err
        assert "WUJIE_APP_ID" in err and "Traceback" not in err
        assert err.count("stopped:") == 1  # one message, not 200
        stats = await emu.stats()
        # The first submit goes alone and stops the run: the gateway saw far fewer than
        # --concurrency submits (one, and its one retry with a fresh signature).
        assert stats["requests"].get("generations", 0) <= 2
        summary = json.loads(stdout)
        assert summary["outcomes"]["not_sent"] == 200 and summary["exit_code"] == 3
        assert summary["outcomes"]["uncertain"] == 0


@pytest.mark.long
async def test_wrong_base_path_is_not_uncertain_and_the_corrected_rerun_saves_all(
    tmp_path: Path,
) -> None:
    async with served_emulator(tmp_path) as emu:
        out = tmp_path / "out"
        file = prompts(tmp_path, 200)
        wrong = emu.base_url.replace("/wj-open/v1", "/wrong/v1")
        code, stdout, err = await cli(
            "bulk", str(file), "-o", str(out), "--model", "dall-e-2", "--json",
            env=emu.env | {"WUJIE_BASE_URL": wrong},
        )  # fmt: skip
        assert code == 3, err
        assert "--base-url" in err and "404" in err
        assert json.loads(stdout)["outcomes"]["uncertain"] == 0
        code, listing, err = await cli("journal", "list", "--status", "uncertain", "-o", str(out))
        assert code == 0 and "0 row(s)" in listing + err

        code, stdout, err = await cli(
            "bulk", str(file), "-o", str(out), "--model", "dall-e-2", "--json", env=emu.env
        )
        assert code == 0, err
        assert json.loads(stdout)["outcomes"]["saved"] == 200
        assert (await emu.stats())["submits_accepted"] == 200


@pytest.mark.long
async def test_a_gateway_that_refuses_connections_is_said_once_with_its_fix(
    tmp_path: Path,
) -> None:
    # The stop line wrapped the client's message, which names the URL and the fix already:
    # "stopped: cannot connect to URL (could not connect to URL: ...; check the base URL
    # (WUJIE_BASE_URL / --base-url) and the network); check --base-url / WUJIE_BASE_URL and
    # the network".
    key = tmp_path / "key.pem"
    key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base_url = f"http://127.0.0.1:{probe.getsockname()[1]}/wj-open/v1"
    code, _, err = await cli(
        "bulk", str(prompts(tmp_path, 3)), "-o", str(tmp_path / "out"), "--progress", "plain",
        "--app-id", "app", "--private-key-file", str(key), "--base-url", base_url,
    )  # fmt: skip
    assert code == 3, err
    [stopped] = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert stopped.startswith(f"stopped: could not connect to {base_url}: "), stopped
    assert stopped.count(base_url) == 1 and stopped.count("--base-url") == 1, stopped
    assert stopped.endswith("and the network"), stopped
    # The last progress line counts the lines the stop left as the summary does (it read
    # "1/3 lines (33%) · to send 2 · ... · not_sent 1" above "3 line(s): not_sent 3").
    last = [line for line in err.splitlines() if line.startswith("progress:")][-1]
    assert "3/3 lines" in last and "to send 0" in last and "not_sent 3" in last, last
    assert "3 line(s): not_sent 3" in err, err


@pytest.mark.long
async def test_connection_refused_stops_with_one_message(tmp_path: Path) -> None:
    async with served_emulator(tmp_path) as emu:
        env = emu.env
    # The emulator has stopped: its port now refuses connections.
    code, _, err = await cli(
        "bulk", str(prompts(tmp_path, 20)), "-o", str(tmp_path / "out"), env=env, timeout=50
    )
    assert code == 3, err
    assert err.count("stopped:") == 1 and "could not connect" in err and "--base-url" in err


async def test_a_gateway_answering_every_submit_with_a_5xx_stops_the_sending(
    tmp_path: Path,
) -> None:
    """Every submit answered 503 (a gateway that is down): each may have been accepted, so
    each ends uncertain and is never resent, and the run went on sending every line (100 of
    100 uncertain in two seconds, each to be checked in the console by hand). A streak of
    such submits stops the sending like a systemic error; a plain re-run sends the rest."""
    out = tmp_path / "out"
    code, stdout, err = await cli(
        "bulk", str(prompts(tmp_path, 100)), "--emulator", *FAST, "--json",
        "--emulator-fault", "http_5xx=1.0", "--emulator-fault", "endpoints=generations",
        "-o", str(out),
    )  # fmt: skip
    assert code == 3, err
    assert err.count("stopped:") == 1 and "8 submits in a row got no usable reply" in err, err
    outcomes = json.loads(stdout)["outcomes"]
    assert outcomes["uncertain"] < 40 and outcomes["not_sent"] > 60, outcomes
    assert len(final_outcomes(out)) == 100


async def test_a_proxy_asking_for_its_own_credentials_stops_the_run(tmp_path: Path) -> None:
    """A 407 from a proxy before the gateway: every request gets it. A refusal (nothing was
    accepted), and systemic: the run stops at once with one line saying so, not 20 lines
    each rejected."""
    async with served_emulator(tmp_path) as emu, recording_gateway() as proxy:
        env = {**emu.env, "WUJIE_BASE_URL": f"{proxy.origin}/proxy-auth-407"}
        code, _, err = await cli(
            "bulk", str(prompts(tmp_path, 20)), "-o", str(tmp_path / "out"), env=env
        )
    assert code == 3, err
    assert err.count("stopped:") == 1 and "asks for credentials of its own" in err, err
    assert proxy.hits["proxy-auth-407"] < 20


# --- 4. never a traceback ------------------------------------------------------------------
async def test_usage_problems_are_one_line_each(tmp_path: Path) -> None:
    file = prompts(tmp_path, 2)
    # Its own --out: the README's main job leaves a manifest in ./out of another input.
    code, _, err = await cli(
        "bulk", str(file), "-o", str(tmp_path / "out"),
        "--app-id", "x", "--private-key-file", str(tmp_path / "missing.pem"),
    )  # fmt: skip
    assert code == 2 and "--private-key-file" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    code, _, err = await cli("bulk", str(file), "--emulator", "-o", str(a_file))
    assert code == 2 and "--out" in err and "is a file" in err and "Traceback" not in err

    code, _, err = await cli("bulk", str(file), "--emulator", "-o", str(a_file / "below"))
    assert code == 2 and "--out" in err and "Traceback" not in err

    code, _, err = await cli("bulk", str(file), "--emulator", "-o", "/proc/no-such/out")
    assert code == 2 and "--out" in err and "Traceback" not in err
    assert "uvloop" not in err


@pytest.mark.long
async def test_emulator_port_in_use_is_one_line(tmp_path: Path) -> None:
    async with served_emulator(tmp_path) as emu:
        port = emu.base_url.split(":")[2].split("/")[0]
        code, _, err = await cli("emulator", "--port", port)
    assert code == 2 and "--port" in err and "in use" in err and "Traceback" not in err


# --- 5. inputs -----------------------------------------------------------------------------------
@pytest.mark.long
async def test_csv_and_json_inputs(tmp_path: Path) -> None:
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text("id,prompt,model,n\nfox,a fox,dall-e-2,2\nowl,an owl,dall-e-3,\n")
    out = tmp_path / "csv"
    code, stdout, err = await cli(
        "bulk", str(csv_file), "--emulator", *FAST, "-o", str(out), "--json"
    )
    assert code == 0, err
    assert json.loads(stdout)["outcomes"]["saved"] == 2
    records = manifest(out)
    assert sorted(r["prompt"] for r in records) == ["a fox", "a fox", "an owl"]  # no header row
    assert {r["id"] for r in records} == {"fox", "owl"}

    json_file = tmp_path / "rows.json"
    json_file.write_text(json.dumps(["a cat", {"prompt": "a dog", "model": "dall-e-2"}]))
    out = tmp_path / "json"
    code, stdout, err = await cli(
        "bulk", str(json_file), "--emulator", *FAST, "-o", str(out), "--json"
    )
    assert code == 0, err
    assert sorted(r["prompt"] for r in manifest(out)) == ["a cat", "a dog"]


async def test_input_errors_before_anything_is_sent(tmp_path: Path) -> None:
    xlsx = tmp_path / "rows.xlsx"
    xlsx.write_bytes(b"PK\x03\x04")
    code, _, err = await cli("bulk", str(xlsx), "--emulator")
    assert code == 2 and ".csv" in err and ".jsonl" in err and ".json" in err and ".txt" in err

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"id": "a", "prompt": "one", "model": "dall-e-2"}\n'
        '{"id": "a", "prompt": "two", "model": "dall-e-2"}\n'
        '{"prompt": "three", "model": "dall-e-2", "colour": "red"}\n'
    )
    out = tmp_path / "o"
    code, _, err = await cli("bulk", str(rows), "--emulator", "-o", str(out))
    assert code == 2
    assert f"{rows}:2: id:" in err and "unique" in err
    assert f"{rows}:3: colour: unknown field; allowed: id, prompt, model" in err
    assert not out.exists()

    bad_csv = tmp_path / "rows.csv"
    bad_csv.write_text("prompt,weight\nx,3\n")
    code, _, err = await cli("bulk", str(bad_csv), "--emulator")
    assert code == 2 and "weight: unknown column" in err

    # A quoted prompt spanning lines 2-4: the rows are named by their first lines (2 and 5).
    spanning = tmp_path / "spanning.csv"
    spanning.write_text('prompt,n\n"a cat\non two\nlines",11\nowl,0\n')
    code, _, err = await cli("bulk", str(spanning), "--emulator")
    assert code == 2 and f"{spanning}:2: n:" in err and f"{spanning}:5: n:" in err, err


async def test_a_line_is_what_an_editor_calls_a_line_and_a_bom_is_not_a_prompt(
    tmp_path: Path,
) -> None:
    # A form feed or U+2028 inside a prompt (or a JSON string) does not end its line: the
    # file has 3 prompts, 3 jobs are paid for, and the lines are numbered as an editor does.
    text = tmp_path / "odd.txt"
    text.write_bytes(b"one\x0cpage\r\ntwo \xe2\x80\xa8 more\n\n  \r\nthree\n")
    out = tmp_path / "txt"
    code, stdout, err = await cli("bulk", str(text), "--emulator", *FAST, "-o", str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout)["lines"] == 3
    assert sorted((r["line"], r["prompt"]) for r in manifest(out)) == [
        (1, "one\x0cpage"),
        (2, "two \u2028 more"),
        (5, "three"),
    ]
    rows = tmp_path / "odd.jsonl"
    rows.write_text('{"prompt": "a\u2028b"}\n{"prompt": "c"}\n', encoding="utf-8")
    code, _, err = await cli("bulk", str(rows), "--emulator", *FAST, "-o", str(tmp_path / "j"))
    assert code == 0, err
    assert sorted(r["prompt"] for r in manifest(tmp_path / "j")) == ["a\u2028b", "c"]

    # Piped with a byte order mark (a file saved by Notepad), stdin reads as the file does:
    # JSON lines parse, and no prompt is sent with the mark in front of it.
    bom = b"\xef\xbb\xbf"
    for name, data, prompt in (
        ("jsonl", bom + b'{"prompt": "a fox"}\r\n', "a fox"),
        ("text", bom + b"an owl\r\n", "an owl"),
    ):
        out = tmp_path / name
        code, _, err = await cli("bulk", "-", "--emulator", *FAST, "-o", str(out), stdin=data)
        assert code == 0, err
        assert [r["prompt"] for r in manifest(out)] == [prompt]


async def test_input_that_is_not_utf8_names_its_line_and_how_to_convert_it(
    tmp_path: Path,
) -> None:
    # A prompts file saved as UTF-16 (Notepad's "Unicode") or in a legacy encoding read
    # "cannot read: 'utf-8' codec can't decode byte 0xff in position 0"; piped into -, such
    # bytes were taken as lone surrogates and every line was refused as a bad prompt.
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("a red fox\nan owl\n".encode("utf-16"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a red fox\r\nan owl\r\nun café\n".encode("latin-1"))
    for args, stdin, said in (
        ((str(utf16),), None, f"{utf16}: is UTF-16 text"),
        ((str(latin1),), None, f"{latin1}:3: not UTF-8 (byte 0xe9)"),
        (("-",), latin1.read_bytes(), "<stdin>:3: not UTF-8 (byte 0xe9)"),
        (("-", "--input-format", "txt"), utf16.read_bytes(), "<stdin>: is UTF-16 text"),
    ):
        out = tmp_path / "out"
        code, _, err = await cli("bulk", *args, "--emulator", "-o", str(out), stdin=stdin)
        assert code == 2, err
        assert said in err and "must be UTF-8" in err and "iconv -f " in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists()


async def test_manifest_rows_holding_a_line_separator_are_read_back_not_paid_again(
    tmp_path: Path,
) -> None:
    # A prompt with U+2028 or U+0085 (escaped in the input) is written as it is in its row;
    # the re-run without a journal read such a row as two broken ones and paid for it again.
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a\\u2028b"}\n{"prompt": "c\\u0085d"}\n{"prompt": "e"}\n')
    args = ("bulk", str(rows), "--emulator", *FAST, "-o", str(tmp_path / "o"), "--no-journal")
    code, _, err = await cli(*args)
    assert code == 0, err
    code, stdout, err = await cli(*args, "--json")
    assert code == 0, err
    assert json.loads(stdout)["images"] == 0
    assert sorted(r["prompt"] for r in manifest(tmp_path / "o")) == ["a\u2028b", "c\x85d", "e"]


@pytest.mark.long
async def test_the_commands_a_stopped_run_prints_work_pasted_as_they_are(tmp_path: Path) -> None:
    """The summary of a stopped run prints the command that continues it, and the one that
    only collects: pasted into a shell, each ran as printed. They were printed unquoted, so
    an input or --out path with a space (or a --name with a space) broke them."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "1,1") as emu:
        folder = tmp_path / "my images"
        folder.mkdir()
        prompts = prompts_in = folder / "my prompts.txt"
        prompts.write_text("a fox\nan owl\n")
        out = folder / "out put"
        bulk = ["bulk", str(prompts_in), "-o", str(out), "--name", "{line} {index}.{ext}"]
        async with running_cli(*bulk, env=emu.env) as run:
            await eventually(lambda: _accepted_ge(emu, 2), what="2 submits", alive=proc_alive(run))
            run.send_signal(signal.SIGTERM)
            code, _, err = await run.finish(30)
        assert code == 143, err
        printed = [line.strip() for line in err.splitlines()]
        rerun = next(line for line in printed if line.startswith("wujie-async bulk"))
        assert shlex.split(rerun) == ["wujie-async", *bulk], rerun
        collect = next(line for line in printed if line.startswith("(or collect only: "))
        resume = shlex.split(collect.removeprefix("(or collect only: ").removesuffix(")"))
        assert resume[-2:] == ["--name", "{line} {index}.{ext}"], resume  # only when given
        code, _, err = await cli(*resume[1:], env=emu.env)  # as printed: it collects them
        assert code == 0, err
        assert sorted(path.name for path in out.glob("*.png")) == ["1 0.png", "2 0.png"]
        assert (await emu.stats())["submits_accepted"] == 2


@pytest.mark.long
async def test_the_rerun_command_of_a_stopped_stdin_run_says_to_feed_stdin(tmp_path: Path) -> None:
    """Pasted as printed, `wujie-async bulk - ...` waits for the terminal: the command a
    stopped run prints says the input goes on stdin again (a shell comment, so it still
    pastes)."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "1,1") as emu:
        bulk = ["bulk", "-", "-o", str(tmp_path / "out")]
        async with running_cli(*bulk, env=emu.env, stdin=b"a fox\nan owl\n") as run:
            await eventually(lambda: _accepted_ge(emu, 2), what="2 submits", alive=proc_alive(run))
            run.send_signal(signal.SIGTERM)
            code, _, err = await run.finish(30)
        assert code == 143, err
        rerun = next(line.strip() for line in err.splitlines() if "wujie-async bulk" in line)
        assert shlex.split(rerun, comments=True) == ["wujie-async", *bulk], rerun
        assert rerun.endswith("# fed the same input on stdin"), rerun


@pytest.mark.long
async def test_a_rerun_after_kill_and_resume_keeps_what_resume_saved(tmp_path: Path) -> None:
    """Killed outright before its manifest had a row, a journaled run is collected by
    `resume`; the re-run of the bulk command then took resume's rows for another input's:
    it fetched every image again and recorded each job's points a second time (the manifest
    added up to twice what the gateway charged).

    The kill waits for both keys in the journal, not just at the gateway: a kill between the
    two (a loaded host) rightly left a line uncertain."""
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "1,1") as emu:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a fox\nan owl\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(prompts), "-o", str(out), "--model", "dall-e-2", "--json"]
        async with running_cli(*bulk, env=emu.env) as run:
            await eventually(
                lambda: len(journal_keys(out / "journal.sqlite")) == 2,
                what="2 keys journaled",
                alive=proc_alive(run),
            )
            run.send_signal(signal.SIGKILL)
            await run.finish(30)
        assert manifest(out) == []
        code, _, err = await cli("resume", str(out / "journal.sqlite"), "-o", str(out), env=emu.env)
        assert code == 0, err
        code, stdout, err = await cli(*bulk, env=emu.env)
        assert code == 0, err
        summary = json.loads(stdout)
        assert summary["images"] == 0 and summary["points"] == 0, summary
        charged = (await emu.stats())["points_charged"]
        assert summary["points_total"] == charged == sum(r["points"] for r in manifest(out))
        assert (await emu.stats())["submits_accepted"] == 2


async def _accepted_ge(emu: Served, count: int) -> bool:
    return int((await emu.stats())["submits_accepted"]) >= count


@pytest.mark.long
async def test_a_second_ctrl_c_names_the_lines_that_may_have_been_charged(tmp_path: Path) -> None:
    async with served_emulator(tmp_path, "--slow-reply", "1.0", "--slow-reply-s", "2") as emu:
        rows = tmp_path / "rows.jsonl"
        rows.write_text(
            "".join(
                json.dumps({"id": f"r{i}", "prompt": f"p{i}", "model": "dall-e-2"}) + "\n"
                for i in range(4)
            )
        )
        out = tmp_path / "out"
        async with running_cli("bulk", str(rows), "-o", str(out), "--json", env=emu.env) as proc:

            async def first_submit_out() -> bool:
                return bool((await emu.stats())["faults"].get("slow_reply"))

            await eventually(first_submit_out, what="the first submit", alive=proc_alive(proc))
            proc.send_signal(signal.SIGINT)  # stop gently: would wait for the submit's reply
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGINT)  # quit now
            code, stdout, err = await proc.finish(20)
        assert code == 130, err
        assert "interrupted at once: 1 line(s)" in err and "line 1 (id r0)" in err
        assert "journal list --status uncertain" in err
        assert "CancelledError" not in err and "cancel scope" not in err and "Traceback" not in err
        summary = json.loads(stdout)
        assert summary["outcomes"]["uncertain"] == 1 and summary["outcomes"]["not_sent"] == 3
        assert final_outcomes(out) == {1: "uncertain", 2: "not_sent", 3: "not_sent", 4: "not_sent"}

        code, listing, _ = await cli("journal", "list", "--status", "uncertain", "-o", str(out))
        assert code == 0 and "id r0" in listing and "1 row(s)" in listing
        assert "interrupted while the submit was under way" in listing
        assert "CancelledError" not in listing and "cancel scope" not in listing


@pytest.mark.long
async def test_an_output_folder_deleted_mid_run_stops_it_and_names_what_was_paid(
    tmp_path: Path,
) -> None:
    # `rm -rf out` while a run wrote there: the run went on writing into the deleted manifest,
    # said "saved 40 ... (manifest: out/manifest.jsonl)" with exit 0, and the manifest named
    # did not exist (a re-run paid for every line again).
    import shutil

    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "1,3") as emu:
        rows = tmp_path / "rows.txt"
        rows.write_text("".join(f"fox {i}\n" for i in range(12)))
        out = tmp_path / "out"
        args = ["bulk", str(rows), "-o", str(out), "--max-in-flight", "2", "--no-journal"]
        async with running_cli(*args, env=emu.env) as proc:

            def first_saved() -> bool:
                return any(record["status"] == "saved" for record in manifest(out))

            await eventually(first_saved, what="a saved line", alive=proc_alive(proc))
            saved_before = {record["key"] for record in manifest(out)}
            shutil.rmtree(out)
            code, _, err = await proc.finish(60)
        assert code == 3, err
        assert "the manifest was deleted while this run wrote it" in err, err
        # The keys of what was saved before the deletion are named: nothing paid is lost.
        for key in saved_before:
            assert key in err, (key, err)
        accepted = (await emu.stats())["submits_accepted"]
        assert accepted < 12  # it stopped sending


@pytest.mark.parametrize("stop", ["manifest_cut_short", "manifest_gone"])
def test_rows_not_written_that_hold_no_key_are_not_said_to_be_listed(stop: str) -> None:
    """The words "the jobs they name are listed below" came with rows that named none (a line
    not sent, one sent without a reply): nothing was listed. Said so for that case; the keys,
    when rows hold some (bulk and `journal resend` share these words)."""
    keyless = [{"status": "uncertain", "line": 1}, {"status": "not_sent", "line": 2}]
    result = BulkResult(systemic=getattr(OutputUnwritableError, stop)(), unrecorded=keyless)
    said = stop_said(result, "http://127.0.0.1:1", app_id_flag=False) or ""
    assert "listed below" not in said and "none of them held a job key" in said, said
    result.unrecorded.append({"status": "pending", "line": 3, "key": "K3"})
    said = stop_said(result, "http://127.0.0.1:1", app_id_flag=False) or ""
    assert "listed below" in said and said.endswith(": K3"), said


async def test_rejected_submits_between_unanswered_ones_break_their_streak(
    tmp_path: Path,
) -> None:
    """A gateway that refuses a line (a business code: a usable reply, nothing charged)
    between submits it did not answer: the streak of "8 submits in a row without a usable
    reply" counted on across the refusals (only an accepted submit ended it), so a run whose
    gateway refused its sensitive prompts stopped sending as "down" after 8 sporadic 5xx."""
    seen = {"submits": 0}

    async def submit(request: web.Request) -> web.Response:
        seen["submits"] += 1
        if seen["submits"] % 5 == 0:  # every fifth: refused, with the contract's envelope
            body = {"code": "20110001", "message": "sensitive words", "data": None}
            return web.json_response(body)
        return web.json_response({"code": "503", "message": "busy", "data": None}, status=503)

    app = web.Application()
    app.router.add_post(GENERATIONS, submit)
    async with serve(app) as origin:
        creds = throwaway_credentials()
        env = CLEAN_ENV | {
            "WUJIE_APP_ID": creds.app_id,
            "WUJIE_PRIVATE_KEY": creds.private_key,
            "WUJIE_BASE_URL": origin,
        }
        out = tmp_path / "out"
        code, stdout, err = await cli(
            "bulk", str(prompts(tmp_path, 20)), "--concurrency", "1", "--json",
            "-o", str(out), env=env,
        )  # fmt: skip
    assert "in a row" not in err, err
    outcomes = json.loads(stdout)["outcomes"]
    assert outcomes.get("uncertain") == 16 and outcomes.get("rejected") == 4, outcomes
    assert code == 1, err
