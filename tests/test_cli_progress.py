"""Progress output and hostile job replies in `bulk` (issue 10; issue 9 items 8 and 12)."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from wujie_async.cli._progress import Tally
from wujie_async.emulator._png import render_png

from .cli_helpers import (
    CLEAN_ENV,
    FAST,
    cli,
    cli_zygote,  # noqa: F401  # stops the fork server before run_guard looks
    manifest,
    proc_alive,
    running_cli,
)
from .helpers import eventually, png_size

pytestmark = pytest.mark.anyio

# A job per prompt; the prompt picks what the gateway does wrong with it.
HOSTILE_FAIL_MESSAGE = "[/nope] [bold]x \x1b]0;PWNED-TITLE\x07\x1b[2J\x1b[31mred\x9b"


def inline_png(size: int) -> str:
    return base64.b64encode(render_png("K", 0, size, size)).decode()


@asynccontextmanager
async def hostile_jobs_gateway(
    files_host: str = "127.0.0.1",
    finished: set[str] | None = None,
    cost: int | None = None,
    submits: list[str] | None = None,
) -> AsyncIterator[str]:
    """Submits get key = prompt; the batch reply does what the prompt says. Yields base URL.

    Image URLs point at ``files_host`` (the same server, also listening there). The job
    ``partial`` has one of its two images until the test adds it to ``finished``. ``cost``:
    the ``integral_cost`` every ended job reports; ``submits`` gets each submit's prompt.
    """
    finished = finished if finished is not None else set()
    origin = ""
    files_origin = ""

    async def submit(request: web.Request) -> web.Response:
        body = await request.json()
        if submits is not None:
            submits.append(body["prompt"])
        return web.json_response({"code": "200", "message": "ok", "data": {"key": body["prompt"]}})

    def entry(key: str) -> dict[str, object]:
        image = {"url": f"{files_origin}/files/{key}.png"}
        if key == "partial":
            if key in finished:
                second = {"url": f"{files_origin}/files/{key}1.png"}
                return {"key": key, "status": 4, "images": [image, second]}
            return {"key": key, "status": 2, "complete_percent": 50, "images": [image]}
        if key == "inline":  # b64_json only: bare base64, and a data URL
            inline = [
                {"b64_json": inline_png(8)},
                {"b64_json": "data:image/png;base64," + inline_png(9)},
            ]
            return {"key": key, "status": 4, "images": inline}
        if key == "short":  # asked for n=2, gives one image
            return {"key": key, "status": 4, "images": [image]}
        if key == "badurl":
            return {"key": key, "status": 4, "images": [{"url": "https://[::1"}, image]}
        if key == "markup":
            return {
                "key": key,
                "status": 3,
                "fail_message": {"fail_code": 7, "fail_message": HOSTILE_FAIL_MESSAGE},
            }
        second = {"url": f"{files_origin}/files/{key}1.png"}
        return {"key": key, "status": 4, "images": [image, second]}

    async def info(request: web.Request) -> web.Response:
        sent = await request.json()
        keys = sent if isinstance(sent, list) else sent.get("keys", [])
        listed = [entry(key) for key in keys]
        if cost is not None:
            for item in listed:
                if item["status"] in (3, 4):
                    item["integral_cost"] = cost
        data = {"list": listed}
        return web.json_response({"code": "200", "message": "ok", "data": data})

    async def file(request: web.Request) -> web.Response:
        return web.Response(body=render_png("K", 0, 8, 8), content_type="image/png")

    app = web.Application()
    app.router.add_post("/wj-open/v1/ai/wj/images/generations", submit)
    app.router.add_post("/wj-open/v1/ai/wj/images/info", info)
    app.router.add_get("/files/{name}", file)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    files_origin = origin
    if files_host != "127.0.0.1":
        await web.TCPSite(runner, files_host, 0).start()
        files_origin = f"http://{files_host}:{runner.addresses[1][1]}"
    try:
        yield f"{origin}/wj-open/v1"
    finally:
        await runner.cleanup()


def pem_file(tmp_path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "key.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pem


def gateway_flags(tmp_path: Path, base_url: str) -> tuple[str, ...]:
    return (
        "--app-id",
        "app",
        "--private-key-file",
        str(pem_file(tmp_path)),
        "--base-url",
        base_url,
    )


@pytest.mark.long
async def test_b64_json_images_are_saved_like_url_images(tmp_path: Path) -> None:
    rows = tmp_path / "rows.txt"
    rows.write_text("inline\nfine\n")
    out = tmp_path / "out"
    async with hostile_jobs_gateway() as base_url:
        code, stdout, err = await cli(
            "bulk", str(rows), "--model", "dall-e-2", "-n", "2", "-o", str(out), "--json",
            *gateway_flags(tmp_path, base_url),
        )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["outcomes"]["saved"] == 2
    inline = sorted(
        (r for r in manifest(out) if r["key"] == "inline"), key=lambda record: record["index"]
    )
    assert [r["path"] for r in inline] == ["inline-0.png", "inline-1.png"]
    assert [png_size((out / r["path"]).read_bytes()) for r in inline] == [(8, 8), (9, 9)]
    assert (out / "inline-0.png").stat().st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def private_address() -> str | None:
    """An address of this machine that is neither loopback nor public, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # UDP: nothing is sent
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    ip = ipaddress.ip_address(address)
    return None if ip.is_loopback or ip.is_global else address


@pytest.mark.long
async def test_image_urls_on_private_addresses_need_the_flag(tmp_path: Path) -> None:
    host = private_address()
    if host is None:
        pytest.skip("this machine has no private (non-loopback, non-public) address")
    rows = tmp_path / "rows.txt"
    rows.write_text("fine\n")
    out = tmp_path / "out"
    async with hostile_jobs_gateway(files_host=host) as base_url:
        flags = (*gateway_flags(tmp_path, base_url), "--allow-http", "-o", str(out), "--json")
        bulk = ("bulk", str(rows), "--model", "dall-e-2", "-n", "2", *flags)
        code, stdout, err = await cli(*bulk)
        assert code == 1, err
        (failed,) = [r for r in manifest(out) if r["status"] == "failed"]
        assert failed["error_code"] == "download"
        assert "--allow-private-addresses" in failed["error"] and "allow_private" not in err

        # The job itself succeeded: the re-run with the flag fetches its images, sends nothing.
        code, stdout, err = await cli(*bulk, "--allow-private-addresses")
        assert code == 0, err
        assert json.loads(stdout)["outcomes"]["saved"] == 1
        assert sorted(p.name for p in out.glob("*.png")) == ["fine-0.png", "fine-1.png"]


@pytest.mark.long
async def test_per_job_problems_fail_that_job_only_and_server_text_is_inert(
    tmp_path: Path,
) -> None:
    pem = pem_file(tmp_path)
    rows = tmp_path / "rows.txt"
    rows.write_text("short\nbadurl\nmarkup\nfine\n")
    out = tmp_path / "out"
    async with hostile_jobs_gateway() as base_url:
        code, stdout, err = await cli(
            "bulk", str(rows), "--model", "dall-e-2", "-n", "2", "--no-journal",
            "--app-id", "app", "--private-key-file", str(pem), "--base-url", base_url,
            "-o", str(out), "--json", "--progress", "rich",
        )  # fmt: skip
    assert code == 1, err
    assert "Traceback" not in err and "MarkupError" not in err
    assert "\x1b" not in err and "\x9b" not in err and "\x07" not in err
    assert "[/nope]" in err  # shown as text, not parsed as markup
    outcomes = json.loads(stdout)["outcomes"]
    assert outcomes["saved"] == 1 and outcomes["failed"] == 3
    failed = {r["line"]: r for r in manifest(out) if r["status"] == "failed"}
    assert set(failed) == {1, 2, 3}
    assert all("\x1b" not in r["error"] for r in failed.values())
    # Reported done with 1 of 2 images: said as such, not as a failed download.
    assert failed[1]["error_code"] == "incomplete" and "1 of 2 image" in failed[1]["error"]
    assert failed[2]["error_code"] == "download"


@pytest.mark.long
async def test_a_job_collected_again_is_not_charged_again(tmp_path: Path) -> None:
    """A line whose images could not be saved is collected by every re-run: what its job
    cost is recorded once, so re-runs spend nothing and the budget keeps its room."""
    rows = tmp_path / "rows.txt"
    rows.write_text("badurl\nfine\n")
    out = tmp_path / "out"
    async with hostile_jobs_gateway(cost=8) as base_url:
        flags = (*gateway_flags(tmp_path, base_url), "--allow-http", "-o", str(out), "--json")
        bulk = ("bulk", str(rows), "--model", "dall-e-2", "-n", "2", "--progress", "none")
        for _ in range(3):  # the first run pays; the others only collect badurl again
            code, stdout, err = await cli(*bulk, *flags)
            assert code == 1, err
            summary = json.loads(stdout)
            assert summary["points_total"] == 16, (summary, manifest(out))
            # A plain re-run fetches the images again; --retry-failed would change nothing.
            assert "re-run the same command to fetch them again" in err
            assert "--retry-failed" not in err
        assert summary["points"] == 0
        assert sum(r.get("points") or 0 for r in manifest(out)) == 16
        # A new line fits a budget of 24 at 4 points an image: 16 spent, 8 left.
        rows.write_text("badurl\nfine\nmore\n")
        budget = ("--max-points", "24", "--point-price", "dall-e-2=4")
        code, stdout, err = await cli(*bulk, *flags, *budget)
        summary = json.loads(stdout)
        assert summary["outcomes"]["not_sent"] == 0, err
        assert (summary["points"], summary["points_total"]) == (8, 24)


@pytest.mark.long
async def test_without_a_journal_an_image_not_saved_is_fetched_again_never_resent(
    tmp_path: Path,
) -> None:
    rows = tmp_path / "rows.txt"
    rows.write_text("badurl\n")
    out = tmp_path / "out"
    submits: list[str] = []
    async with hostile_jobs_gateway(submits=submits) as base_url:
        flags = (*gateway_flags(tmp_path, base_url), "--allow-http", "-o", str(out), "--json")
        bulk = ("bulk", str(rows), "--model", "dall-e-2", "-n", "2", "--no-journal", *flags)
        for extra in ((), ("--retry-failed",)):  # the job succeeded: nothing to resend
            code, _, err = await cli(*bulk, *extra)
            assert code == 1, err
        assert submits == ["badurl"]
        failed = [r["error_code"] for r in manifest(out) if r["status"] == "failed"]
        assert failed == ["download", "download"]  # image 1 was saved, image 0 never can be


@pytest.mark.long
async def test_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    rows = tmp_path / "rows.txt"
    rows.write_text("\n".join(f"p{i}" for i in range(6)))
    code, _, err = await cli(
        "bulk", str(rows), "--emulator", "--emulator-time-scale", "0.1", "--model", "dall-e-2",
        "--progress-interval", "0.2", "-o", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("progress: ")]
    assert len(lines) >= 3, err
    assert lines[-1].startswith("progress: 6/6 lines (100%)")
    for line in lines:
        assert "to send " in line and "at the gateway " in line and "lines/s" in line
        assert "img/s" in line and " -" not in line  # no negative counts


async def test_no_negative_counts_when_submits_are_refused(tmp_path: Path) -> None:
    rows = tmp_path / "rows.txt"
    rows.write_text("\n".join(f"p{i}" for i in range(5)))
    code, _, err = await cli(
        "bulk", str(rows), "--emulator", *FAST, "-o", str(tmp_path / "out"),
        "--emulator-fault", "business_error=1.0", "--emulator-fault",
        "business_error_code=20010001",
    )  # fmt: skip
    assert code == 1
    assert "generating -" not in err
    last = [line for line in err.splitlines() if line.startswith("progress:")][-1]
    assert "rejected 5" in last and "failed" not in last  # each outcome under its own name


async def test_rich_progress_keeps_bar_count_and_eta_at_80_columns(tmp_path: Path) -> None:
    rows = tmp_path / "rows.txt"
    rows.write_text("\n".join(f"p{i}" for i in range(4)))
    code, _, err = await cli(
        "bulk", str(rows), "--emulator", *FAST, "-o", str(tmp_path / "out"), "--progress",
        "rich", env=CLEAN_ENV | {"COLUMNS": "80", "TERM": "xterm"},
    )  # fmt: skip
    assert code == 0, err
    assert "lines" in err and "4/4" in err and "ETA" in err


@pytest.mark.long
async def test_quiet_prints_only_the_summary(tmp_path: Path) -> None:
    rows = tmp_path / "rows.txt"
    rows.write_text("a\nb\n")
    code, _, err = await cli(
        "bulk", str(rows), "--emulator", *FAST, "-o", str(tmp_path / "out"), "--quiet",
        "--emulator-fault", "fail_jobs=1.0",
    )  # fmt: skip
    assert code == 1
    assert err.strip().splitlines() == [err.strip().splitlines()[0]]
    assert "failed 2" in err


@pytest.mark.long
async def test_a_partly_saved_job_resumes_without_duplicate_manifest_lines(tmp_path: Path) -> None:
    rows = tmp_path / "rows.txt"
    rows.write_text("partial\nfine\n")
    out = tmp_path / "out"
    finished: set[str] = set()
    async with hostile_jobs_gateway(finished=finished) as base_url:
        bulk = (
            "bulk", str(rows), "--model", "dall-e-2", "-n", "2", "-o", str(out),
            *gateway_flags(tmp_path, base_url),
        )  # fmt: skip
        async with running_cli(*bulk) as proc:
            await eventually(
                lambda: any(r.get("key") == "partial" for r in manifest(out)),
                what="image 0 of the partial job",
                alive=proc_alive(proc),
            )
            proc.send_signal(signal.SIGINT)
            code, _, err_text = await proc.finish(20)
        assert code == 130, err_text
        partial = [r for r in manifest(out) if r["key"] == "partial"]
        assert [(r["status"], r.get("index")) for r in partial] == [("saved", 0), ("pending", None)]

        finished.add("partial")
        code, _, err_text = await cli(*bulk)
        assert code == 0, err_text
    saved = [(r["key"], r["index"]) for r in manifest(out) if r["status"] == "saved"]
    assert sorted(saved) == [("fine", 0), ("fine", 1), ("partial", 0), ("partial", 1)]
    assert sorted(p.name for p in out.glob("*.png")) == [
        "fine-0.png", "fine-1.png", "partial-0.png", "partial-1.png"
    ]  # fmt: skip


def test_progress_says_to_send_and_at_the_gateway_not_the_gateways_job_statuses() -> None:
    """40 of 60 jobs queued at the gateway showed "queued 0 · generating 60": "queued" meant
    "not sent yet". The labels say what the counts are: lines to send, and lines whose job the
    gateway took (queued there or generating)."""
    tally = Tally(70)
    for line in range(1, 61):
        tally.move(line, "generating")
    tally.move(61, "submitting")  # counted with those to send: the gateway has not taken it
    detail = tally.detail()
    assert detail.startswith("to send 10 · at the gateway 60 · saving 0 · saved 0"), detail
    assert "queued" not in detail and "generating" not in detail
