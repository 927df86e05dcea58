"""``edit``, ``status``, ``--no-wait`` and ``--name`` (issue 10), as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wujie_async.emulator._png import render_png

from .cli_helpers import (
    FAST,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    manifest,
    served_emulator,
)
from .helpers import png_size

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
