"""CLI conventions: --json everywhere, stdin input, shell completion, --allow-http for base
URLs, help text, flag errors said once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from wujie_async.cli import build_parser

from .cli_helpers import (
    CLEAN_ENV,
    FAST,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    manifest,
    served_emulator,
)

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
