"""CLI conventions: --json everywhere, stdin input, shell completion, --allow-http for base
URLs, help text, flag errors said once."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from wujie_async import _lock_file
from wujie_async.cli import build_parser
from wujie_async.cli._out_lock import LOCK_NAME

from .cli_helpers import (
    CLEAN_ENV,
    FAST,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    manifest,
    served_emulator,
)
from .helpers import eventually

pytestmark = pytest.mark.anyio


@pytest.mark.long
async def test_json_from_generate_no_wait_status_and_journal_list(tmp_path: Path) -> None:
    async with served_emulator(tmp_path) as emu:
        code, out, err = await cli("generate", "a fox", "--no-wait", "--json", env=emu.env)
        assert code == 0, err
        key = json.loads(out)["key"]
        code, out, err = await cli("status", key, "NOSUCHKEY", "--json", env=emu.env)
        assert code == 1, err  # one key is not found
        known, unknown = (json.loads(line) for line in out.splitlines())
        assert known["key"] == key and known["found"] and known["status"]
        assert unknown == unknown | {"key": "NOSUCHKEY", "found": False}

        code, out, err = await cli(
            "generate", "an owl", "--json", "-o", str(tmp_path / "o"), env=emu.env
        )
        assert code == 0, err
        summary = json.loads(out)
        assert summary["outcomes"]["saved"] == 1 and Path(summary["paths"][0]).exists()

        rows = tmp_path / "p.txt"
        rows.write_text("one\ntwo\n")
        code, _, err = await cli("bulk", str(rows), "-o", str(tmp_path / "b"), env=emu.env)
        assert code == 0, err
    code, out, err = await cli("journal", "list", "--json", "-o", str(tmp_path / "b"))
    assert code == 0, err
    listed = [json.loads(line) for line in out.splitlines()]
    assert [(row["line"], row["state"], row["key_usable"]) for row in listed] == [
        (1, "succeeded", True),
        (2, "succeeded", True),
    ]


async def test_bulk_reads_stdin(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = b'{"id": "a", "prompt": "a fox"}\n{"id": "b", "prompt": "an owl"}\n'
    code, _, err = await cli("bulk", "-", "--emulator", *FAST, "-o", str(out), stdin=rows)
    assert code == 0, err
    assert sorted(r["id"] for r in manifest(out)) == ["a", "b"]
    assert {r["input"] for r in manifest(out)} == {"<stdin>"}


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
async def test_completion_scripts_come_from_the_parser(shell: str) -> None:
    code, out, err = await cli("completion", shell)
    assert code == 0, err
    for name in ("generate", "bulk", "journal", "completion", "max-in-flight", "progress"):
        assert name in out, name
    if shell == "bash" and shutil.which("bash"):
        script = out + (
            'COMP_WORDS=(wujie-async bulk --progress ""); COMP_CWORD=3; _wujie_async; '
            'echo "${COMPREPLY[*]}"\n'
        )
        with anyio.fail_after(10):
            done = await anyio.run_process(["bash", "-c", script], check=False)
        assert done.stdout.decode().split() == ["auto", "rich", "plain", "none"], done.stderr


@pytest.mark.long
async def test_the_cli_uses_an_emulator_on_every_address_as_printed(tmp_path: Path) -> None:
    # Served on every address, it prints a loopback URL: plain http is allowed there, and the
    # image URLs built from it are too (0.0.0.0 ones were refused after the job was paid).
    async with served_emulator(tmp_path, "--host", "0.0.0.0") as emu:
        assert emu.base_url.startswith("http://127.0.0.1:")
        code, out, err = await cli("status", "K" * 32, "--json", env=emu.env)
        assert code == 1 and json.loads(out)["found"] is False, err  # reached it: not found
        code, out, err = await cli("generate", "a fox", "-o", str(tmp_path / "out"), env=emu.env)
        assert code == 0, err
        assert len(list((tmp_path / "out").glob("*.png"))) == 1
        # Reached at an address that is not loopback, plain http needs --allow-http.
        elsewhere = {**emu.env, "WUJIE_BASE_URL": emu.base_url.replace("127.0.0.1", "0.0.0.0")}
        code, _, err = await cli("status", "K" * 32, env=elsewhere)
        assert code == 2 and "--allow-http" in err and "allow_insecure_http" not in err


async def test_a_base_url_with_a_query_is_a_flag_error(tmp_path: Path) -> None:
    vector = json.loads((Path(__file__).parent / "data" / "auth.json").read_text())
    env = {
        **CLEAN_ENV,
        "WUJIE_APP_ID": "app",
        "WUJIE_PRIVATE_KEY": vector["private_key_pkcs8_der_base64"],
        "WUJIE_BASE_URL": "https://gate.example.com/wj-open/v1?x=1",
    }
    code, _, err = await cli("status", "K" * 32, env=env)
    assert code == 2 and "--base-url / WUJIE_BASE_URL: must not have a query" in err, err


async def test_a_bad_default_flag_is_said_once(tmp_path: Path) -> None:
    rows = tmp_path / "p.txt"
    rows.write_text("\n".join(f"prompt {i}" for i in range(5)))
    code, _, err = await cli("bulk", str(rows), "-n", "0", "--emulator")
    assert code == 2 and err.count("-n:") == 1 and "line" not in err, err


def test_help_texts_have_no_markup_and_no_repeated_choices() -> None:
    parser = build_parser()
    helps = [parser.format_help()]
    pending = [parser]
    while pending:
        current = pending.pop()
        for action in current._actions:
            choices = getattr(action, "choices", None)
            if isinstance(choices, dict):  # subcommands
                for sub in choices.values():
                    helps.append(sub.format_help())
                    pending.append(sub)
            elif choices is not None:
                assert len(list(choices)) == len(set(choices)), action.option_strings
    for text in helps:
        assert "`" not in text, text[:200]


@pytest.mark.long
def test_a_reader_that_leaves_early_ends_the_command_quietly() -> None:
    # `wujie-async ... | head -1`: the pipe closes before the command writes.
    proc = subprocess.Popen(
        [sys.executable, "-m", "wujie_async", "completion", "bash"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        error = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, error
    assert "internal error" not in error and "Traceback" not in error


async def test_every_json_ending_is_one_object_with_its_exit_code(tmp_path: Path) -> None:
    # With --json, a usage error (exit 2) and a busy --out (exit 4) printed nothing on stdout:
    # a script reading it got no JSON at all. Each prints one object (stderr as before).
    code, stdout, err = await cli("bulk", "rows.txt", "--json", "--no-such-flag")
    assert code == 2 and "unrecognized arguments: --no-such-flag" in err and "usage:" in err
    said = json.loads(stdout)
    assert said["exit_code"] == 2 and "--no-such-flag" in said["error"], said

    code, stdout, err = await cli("bulk", str(tmp_path / "missing.txt"), "--json", "--emulator")
    assert code == 2 and "missing.txt" in err, err
    said = json.loads(stdout)
    assert said["exit_code"] == 2 and "missing.txt" in said["error"], said

    code, stdout, err = await cli("bulk", "rows.txt", "--no-such-flag")  # no --json: as before
    assert code == 2 and stdout == "", stdout

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    out = tmp_path / "out"
    out.mkdir()
    held = _lock_file.take(out / LOCK_NAME)  # another run writes OUT
    try:
        code, stdout, err = await cli(
            "bulk", str(prompts), "-o", str(out), "--json", "--emulator", *FAST
        )
    finally:
        _lock_file.release(held)
    assert code == 4 and "in use by another run" in err, err
    said = json.loads(stdout)
    assert said == {"exit_code": 4, "error": said["error"]} and "in use" in said["error"], said

    code, stdout, err = await cli(
        "bulk", str(prompts), "-o", str(out), "--json", "--emulator", *FAST
    )
    assert code == 0, err
    [said] = [json.loads(line) for line in stdout.splitlines()]  # one object: the summary
    assert said["exit_code"] == 0 and said["error"] is None, said


async def test_an_out_folder_lock_that_is_a_link_is_refused_and_its_target_left_alone(
    tmp_path: Path,
) -> None:
    """A link planted as OUT's lock file (a folder others may write) was followed: the run
    emptied the file it pointed at and wrote its pid there."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "config.toml"
    victim.write_text("keep = true\n")
    (out / LOCK_NAME).symlink_to(victim)
    code, stdout, err = await cli(
        "bulk", str(prompts), "-o", str(out), "--json", "--emulator", *FAST
    )
    assert code == 2 and "symbolic link" in err, err
    assert json.loads(stdout)["exit_code"] == 2
    assert victim.read_text() == "keep = true\n"
    assert not (out / "manifest.jsonl").exists()  # nothing was sent


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
async def test_sigterm_during_start_up_ends_in_the_json_object(tmp_path: Path) -> None:
    # SIGTERM while the command starts (here: reading its input from stdin) killed it outright:
    # no summary, nothing on stdout for --json. It stops as at Ctrl-C, and says so: exit 143.
    process = await anyio.open_process(
        [sys.executable, "-m", "wujie_async", "bulk", "-", "-o", str(tmp_path / "out"),
         "--json", "--emulator", *FAST],
        env=CLEAN_ENV,
    )  # fmt: skip
    async with process:

        def catches_sigterm() -> bool:
            status = Path(f"/proc/{process.pid}/status").read_text()
            caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
            return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))

        await eventually(
            catches_sigterm, what="the SIGTERM handler", alive=lambda: process.returncode is None
        )
        process.terminate()
        with anyio.fail_after(30):
            code = await process.wait()
        assert process.stdout is not None and process.stderr is not None
        stdout = (await process.stdout.receive()).decode()
        err = b"".join([chunk async for chunk in process.stderr]).decode()
    assert code == 143, (code, err)
    assert "stopped by SIGTERM" in err, err
    said = json.loads(stdout)
    assert said["exit_code"] == 143 and "SIGTERM" in said["error"], said
