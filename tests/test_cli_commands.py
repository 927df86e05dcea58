"""``edit``, ``status``, ``--no-wait`` and ``--name`` (issue 10), as a user runs them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import resource
import sys
from pathlib import Path

import anyio
import pytest

from wujie_async.emulator._png import render_png

from .cli_helpers import (
    CLEAN_ENV,
    FAST,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    final_outcomes,
    manifest,
    running_cli,
    served_emulator,
)
from .helpers import png_size
from .hostile import recording_gateway, scripted_gateway, throwaway_credentials

pytestmark = pytest.mark.anyio


@pytest.mark.long
async def test_edit_sends_local_files_inline_and_urls_as_given(tmp_path: Path) -> None:
    source = tmp_path / "source.png"
    source.write_bytes(render_png("S", 0, 16, 16))
    mask = tmp_path / "mask.png"
    mask.write_bytes(render_png("M", 0, 16, 16))
    async with served_emulator(tmp_path) as emu:
        out = tmp_path / "out"
        code, stdout, err = await cli(
            "edit", "add a hat", "--image", str(source), "--image", "https://example.com/b.png",
            "--mask", str(mask), "--model", "gpt-image-1", "-n", "2", "--quality", "low",
            "-o", str(out), env=emu.env,
        )  # fmt: skip
        assert code == 0, err
        paths = stdout.split()
        assert len(paths) == 2 and all(Path(p).exists() for p in paths)
        stats = await emu.stats()
        assert stats["requests"]["edits"] == 1 and stats["requests"].get("generations", 0) == 0

        code, stdout, err = await cli(
            "edit", "add a hat", "--image", str(source), "--model", "dall-e-2", "--no-wait",
            env=emu.env,
        )  # fmt: skip
        assert code == 0, err
        assert len(stdout.strip()) == 32  # the job key
        assert (await emu.stats())["requests"]["edits"] == 2

    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    for flags, says in (
        (("--image", str(tmp_path / "missing.png")), "--image"),
        (("--image", str(not_an_image)), "not a PNG, JPEG or WEBP"),
        (("--image", str(source), "--image", str(source), "--model", "dall-e-2"), "--image"),
        (("--image", str(source), "--mask", str(not_an_image)), "--mask"),
    ):
        code, _, err = await cli("edit", "x", *flags, "--emulator", *FAST)
        assert code == 2 and says in err and "Traceback" not in err, (flags, err)
    code, _, err = await cli("edit", "x", "--emulator")
    assert code == 2 and "--image" in err  # required


@pytest.mark.long
async def test_status_of_keys_submitted_elsewhere_and_wait_saves_them(tmp_path: Path) -> None:
    async with served_emulator(tmp_path) as emu:
        code, stdout, err = await cli(
            "generate", "a fox", "--model", "dall-e-2", "-n", "2", "--no-wait", env=emu.env
        )
        assert code == 0, err
        key = stdout.strip()
        assert len(key) == 32

        code, stdout, err = await cli("status", key, env=emu.env)
        assert code == 0, err
        (line,) = stdout.strip().splitlines()
        assert line.startswith(key) and any(
            state in line for state in ("queued", "generating", "succeeded")
        )

        out = tmp_path / "out"
        code, stdout, err = await cli("status", key, "--wait", "-o", str(out), env=emu.env)
        assert code == 0, err
        paths = stdout.split()
        assert len(paths) == 2 and all(Path(p).exists() for p in paths)
        saved = [r for r in manifest(out) if r["status"] == "saved"]
        assert {(r["key"], r["index"]) for r in saved} == {(key, 0), (key, 1)}

        code, stdout, err = await cli("status", key, env=emu.env)
        assert code == 0 and "succeeded" in stdout and "2 image(s)" in stdout

        code, stdout, err = await cli("status", key, "NOSUCHKEY", env=emu.env)
        assert code == 1, err
        assert "NOSUCHKEY  not found" in stdout and "succeeded" in stdout

    code, _, err = await cli("status", "bad key\n", "--emulator")
    assert code == 2 and "KEY" in err and "Traceback" not in err


def _gateway_env(base_url: str) -> dict[str, str]:
    creds = throwaway_credentials()
    return CLEAN_ENV | {
        "WUJIE_APP_ID": creds.app_id,
        "WUJIE_PRIVATE_KEY": creds.private_key,
        "WUJIE_BASE_URL": base_url,
    }


@pytest.mark.parametrize(
    "mode",
    # A 5xx is retried within each call: about 10 s until the third call has failed.
    ["unauthorized", pytest.param("server-error", marks=pytest.mark.long)],
)
async def test_status_of_a_key_it_could_not_ask_about_is_no_answer_not_not_found(
    mode: str,
) -> None:
    # Every batch call fails (wrong credentials, a 5xx, a proxy's page): the gateway was never
    # asked, so "not found (the gateway does not list this key)" was false, and exit 1 sent a
    # user to resubmit a paid job. It reads "no answer" and exits 3, as a systemic error.
    async with recording_gateway() as gateway:
        env = _gateway_env(f"{gateway.origin}/{mode}")
        code, stdout, err = await cli("status", "K" * 32, env=env)
        assert code == 3, err
        assert "no answer" in stdout and "not found" not in stdout, stdout
        code, stdout, err = await cli("status", "K" * 32, "--json", env=env)
        assert code == 3, err
        said = json.loads(stdout)
        assert said["found"] is None and said["status"] == "no answer" and said["error"], said


async def test_status_of_a_key_listed_only_unreadably_is_not_not_found() -> None:
    # Listed, with a status no reader takes: the gateway knows the key (it may have run and
    # been charged). It read "not found", exit 1, like a wrong key.
    def script(keys: list[str]) -> list[dict[str, object]]:
        listed: list[dict[str, object]] = [{"key": key, "status": "success"} for key in keys]
        return [entry for entry in listed if entry["key"] != "NOSUCHKEY"]

    async with scripted_gateway(script) as gateway:
        env = _gateway_env(gateway.base_url)
        code, stdout, err = await cli("status", "K" * 32, "NOSUCHKEY", env=env)
    assert code == 1, err
    listed, unknown = stdout.splitlines()
    assert listed.startswith("K" * 32 + "  unreadable: ") and "malformed" in listed, listed
    # A key just handed out may not be listed yet: the line must not read as "never existed"
    # (a user then submits it again and pays twice).
    assert unknown.startswith("NOSUCHKEY  not found (the gateway does not list this key; "), unknown
    assert "may not be listed yet" in unknown and "--wait" in unknown, unknown


async def test_the_reply_cap_is_a_flag_for_gateways_that_list_images_inline() -> None:
    # A job of inline images (b64_json) is reported in one entry, larger than the 8 MiB reply
    # cap for 4 big gpt-image-1 images: the job, paid, ended "over the reply cap (raise
    # Limits.max_response_bytes)", a setting no command could change. --max-response-bytes
    # sets it (shown here both ways, on a small reply).
    png = base64.b64encode(render_png("K", 0, 64, 64)).decode()

    def script(keys: list[str]) -> list[dict[str, object]]:
        return [{"key": key, "status": 4, "images": [{"b64_json": png}]} for key in keys]

    async with scripted_gateway(script) as gateway:
        env = _gateway_env(gateway.base_url)
        code, stdout, err = await cli("status", "K1", "--max-response-bytes", "1000", env=env)
        assert code == 1, err
        assert "over the 1000-byte reply cap" in stdout and "--max-response-bytes" in stdout
        code, stdout, err = await cli("status", "K1", "--max-response-bytes", "100000", env=env)
        assert code == 0 and "succeeded" in stdout, (stdout, err)
    code, _, err = await cli("status", "K1", "--max-response-bytes", "0", env=env)
    assert code == 2 and "--max-response-bytes" in err, err


async def test_images_a_rerun_cannot_save_are_not_said_to_be_fetched_by_one(
    tmp_path: Path,
) -> None:
    # An image over the size cap, and bytes that are not an image: the summary said "re-run
    # the same command to fetch them again", which fails the same way every time. It says
    # what is wrong, and what helps (--max-image-bytes, which did not exist: no command could
    # save an image over 64 MiB).
    png = base64.b64encode(render_png("K", 0, 64, 64)).decode()
    listed = {"K00000": base64.b64encode(b"<html>sorry</html>").decode(), "K00001": png}

    def script(keys: list[str]) -> list[dict[str, object]]:
        return [{"key": key, "status": 4, "images": [{"b64_json": listed[key]}]} for key in keys]

    async with scripted_gateway(script) as gateway:
        env = _gateway_env(gateway.base_url)
        rows = tmp_path / "rows.txt"
        rows.write_text("a fox\na hen\n")
        out = tmp_path / "out"
        bulk = ["bulk", str(rows), "-o", str(out), "--concurrency", "1"]
        code, _, err = await cli(*bulk, "--max-image-bytes", "100", env=env)
        said = " ".join(err.split())
        assert code == 1 and "fetch them again" not in said, err
        assert "1 line(s) succeeded but an image is larger than the 100-byte cap" in said, err
        assert "re-run with a larger --max-image-bytes" in said, err
        assert "1 line(s) succeeded but the gateway listed an image whose bytes are not" in said
        code, _, err = await cli(*bulk, env=env)
        assert code == 1 and final_outcomes(out) == {1: "failed", 2: "saved"}, err
        assert gateway.submits == 2  # collected again, never sent again
    code, _, err = await cli(*bulk, "--max-image-bytes", "0", env=env)
    assert code == 2 and "--max-image-bytes" in err, err


@pytest.mark.long
async def test_name_template_names_the_files(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"id": "fox", "prompt": "a fox", "model": "dall-e-2", "n": 2})
        + "\n"
        + json.dumps({"id": "owl/../x", "prompt": "an owl", "model": "dall-e-2"})
        + "\n"
    )
    out = tmp_path / "out"
    code, _, err = await cli(
        "bulk", str(rows), "--emulator", *FAST, "-o", str(out), "--name", "{id}-{index}.{ext}"
    )
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == ["fox-0.png", "fox-1.png", "owl_.._x-0.png"]
    assert {r["path"] for r in manifest(out)} == {"fox-0.png", "fox-1.png", "owl_.._x-0.png"}
    assert png_size((out / "fox-1.png").read_bytes())

    code, stdout, err = await cli(
        "generate",
        "a cat",
        "--emulator",
        *FAST,
        "-o",
        str(out),
        "--name",
        "cat-{line}-{index}.{ext}",
    )
    assert code == 0, err
    assert Path(stdout.strip()).name == "cat-1-0.png"

    for template, says in (
        ("../{key}.{ext}", "path separators"),
        ("{prompt}.{ext}", "unknown field"),
        ("image.png", "{key}"),
        ("{id}.{ext}", "no id"),  # generate rows carry no id
    ):
        code, _, err = await cli(
            "generate", "x", "--emulator", "-o", str(tmp_path / "never"), "--name", template
        )
        assert code == 2 and "--name" in err and says in err, (template, err)
        assert not (tmp_path / "never").exists()  # refused before anything was sent


def _small_memory() -> None:
    # A read of /dev/zero in this process fails fast with MemoryError instead of taking the
    # machine's memory (the bug this guards: 2.5 GB in 6 s).
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, resource.RLIM_INFINITY))


async def _bounded_cli(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """``python -m wujie_async ARGS`` in a process of its own, its memory capped and its time
    bounded (an open of a FIFO with no writer never returns); killed if it is still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wujie_async", *args, env=env, cwd=cwd, preexec_fn=_small_memory,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.long
async def test_a_fifo_or_a_device_named_as_a_file_is_refused_before_it_is_read(
    tmp_path: Path,
) -> None:
    """A key file, an edit image or mask, a bulk input or a journal that is /dev/zero or a
    FIFO: the read filled memory (2.5 GB in 6 s) or the open blocked for ever. Each is now
    refused at once, exit 2, naming the flag or variable, before anything is sent."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    source = tmp_path / "source.png"
    source.write_bytes(render_png("S", 0, 16, 16))
    huge = tmp_path / "huge.png"
    with huge.open("wb") as file:
        file.truncate(26 * 1024 * 1024)  # sparse: refused by its size, never read
    gateway = ["--app-id", "app", "--base-url", "http://127.0.0.1:9/wj-open/v1"]
    emu = "--emulator"
    var = "WUJIE_PRIVATE_KEY_FILE"
    out = tmp_path / "never"
    from_env = {"WUJIE_APP_ID": "app", "WUJIE_BASE_URL": gateway[-1]}
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["edit", "x", "--image", str(fifo), emu], {}, "--image"),
        (["edit", "x", "--image", "/dev/zero", emu], {}, "--image"),
        (["edit", "x", "--image", str(source), "--mask", str(fifo), emu], {}, "--mask"),
        (["edit", "x", "--image", str(huge), emu], {}, "larger than 25 MB"),
        (["generate", "x", "--private-key-file", str(fifo), *gateway], {}, "--private-key-file"),
        (["generate", "x", "--private-key-file", "/dev/zero", *gateway], {}, "--private-key-file"),
        (["status", "K" * 32], {**from_env, var: "/dev/zero"}, var),
        (["status", "K" * 32], {**from_env, var: str(fifo)}, var),
        (["bulk", "/dev/zero", "--input-format", "txt", emu, "-o", str(out)], {}, "/dev/zero"),
        (["resume", str(fifo), "-o", str(out)], {}, "not a wujie-async journal"),
    ]  # fmt: skip
    # Side by side: ten starts of the command, one after another, were the test's 45 s on a
    # loaded host.
    ran = await asyncio.gather(
        *(_bounded_cli(*args, env={**CLEAN_ENV, **extra}, cwd=tmp_path) for args, extra, _ in cases)
    )
    for (args, _, says), (code, err) in zip(cases, ran, strict=True):
        assert code == 2 and says in err and "Traceback" not in err, (args, err)
        assert "regular file" in err or "larger than" in err, (args, err)
    assert not out.exists()  # refused before the run began


@pytest.mark.long
async def test_a_bulk_input_may_still_be_a_pipe(tmp_path: Path) -> None:
    """``bulk <(grep fox prompts.txt)``: a pipe is read whole, as stdin is; only devices are
    refused."""
    fifo = tmp_path / "prompts"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    args = ["bulk", str(fifo), "--input-format", "txt", "--emulator", *FAST, "-o", str(out)]

    def write() -> None:
        with fifo.open("w") as pipe:  # opens once the run opens its end for reading
            pipe.write("a fox\n")

    async with running_cli(*args) as running:
        try:
            with anyio.fail_after(30):
                await anyio.to_thread.run_sync(write, abandon_on_cancel=True)
        finally:  # a writer still waiting (the run never opened the pipe) is let go
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        code, _, err = await running.finish(30)
    assert code == 0, err
    assert [r["status"] for r in manifest(out)] == ["saved"]


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
async def test_an_emulator_port_out_of_range_is_a_usage_error(port: str) -> None:
    # It was "internal error: OverflowError: bind(): port must be 0-65535", exit 70.
    code, _, err = await cli("emulator", "--port", port, env=CLEAN_ENV)
    assert code == 2 and "argument --port: a port" in err and "internal error" not in err, err


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("bulk", "p.txt", "--emulatr"), "wujie-async bulk: error: unrecognized arguments: "
         "--emulatr (did you mean --emulator?)"),
        (("journal", "list", "--stauts", "uncertain"), "wujie-async journal list: error: "
         "unrecognized arguments: --stauts (did you mean --status?) uncertain"),
        (("generate", "a fox", "--qualty=high"), "wujie-async generate: error: unrecognized "
         "arguments: --qualty=high (did you mean --quality?)"),
    ],
)  # fmt: skip
async def test_a_mistyped_flag_is_named_by_its_command_with_the_flag_meant(
    args: tuple[str, ...], said: str
) -> None:
    # It read "wujie-async: error: unrecognized arguments: --emulatr" under the top usage
    # line, which names no option of bulk.
    code, _, err = await cli(*args, env=CLEAN_ENV)
    assert code == 2 and said in err, err
    assert f"usage: wujie-async {args[0]}" in err, err


async def test_a_bad_prompt_argument_is_named_as_the_usage_line_names_it() -> None:
    # The prompt is positional: "--prompt: ..." named an option that does not exist.
    code, _, err = await cli("generate", "", env=CLEAN_ENV)
    assert code == 2 and "error: prompt: required" in err and "--prompt" not in err, err


@pytest.mark.long
@pytest.mark.parametrize("wait", [True, False])
async def test_a_malformed_status_key_is_said_with_the_key_rule_before_anything(
    tmp_path: Path, wait: bool
) -> None:
    """A half-pasted key (a space in it) read "no credentials" when none were set, and with
    them made the output folder and started the client first: the key is what is wrong."""
    out = tmp_path / "out"
    flags = ("--wait", "-o", str(out)) if wait else ()
    code, stdout, err = await cli("status", "3E46BF62 A51256A9", *flags, "--json")
    assert code == 2, err
    said = json.loads(stdout)["error"]
    assert "is not a job key" in said and "1 to 128 characters" in said, said
    assert "credentials" not in err and not out.exists(), err


@pytest.mark.slow  # the client's whole 30 s grace for a key never listed
async def test_status_wait_of_a_key_never_listed_says_not_found_not_charged(
    tmp_path: Path,
) -> None:
    """`status KEY --wait` of a mistyped key said the key "was handed out: it may have run
    and been charged" and that the gateway had accepted it: nothing of this tool ever saw it."""
    out = tmp_path / "out"
    code, stdout, err = await cli(
        "status", "NOPE0000", "--wait", "-o", str(out), "--json", "--emulator", *FAST,
        timeout=80,
    )  # fmt: skip
    assert code == 1 and json.loads(stdout)["outcomes"]["uncertain"] == 1, err
    assert "not found" in manifest(out)[-1]["error"], manifest(out)
    assert "may have been charged" not in err and "accepted by the gateway" not in err, err
    assert "1 key(s) the gateway does not list (not found)" in err, err


@pytest.mark.long
async def test_status_of_a_key_given_twice_waits_and_saves_it_once(tmp_path: Path) -> None:
    """A key pasted twice (`status K K --wait`) downloaded every image twice over the same
    file, and the summary counted each twice ("4 image(s) saved", each path listed twice)."""
    async with served_emulator(tmp_path) as emu:
        code, stdout, err = await cli(
            "generate", "a fox", "--model", "dall-e-2", "-n", "2", "--no-wait", env=emu.env
        )
        assert code == 0, err
        key = stdout.strip()
        out = tmp_path / "out"
        code, stdout, err = await cli(
            "status", key, key, "--wait", "-o", str(out), "--json", env=emu.env
        )
        said = json.loads(stdout)
        assert code == 0 and said["lines"] == 1 and said["images"] == 2, said
        assert len(set(said["paths"])) == len(said["paths"]) == 2, said
        assert len([r for r in manifest(out) if r["status"] == "saved"]) == 2
        code, stdout, err = await cli("status", key, key, "--json", env=emu.env)
        assert code == 0 and len(stdout.splitlines()) == 1, stdout
