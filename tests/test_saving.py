"""Saving images from the library and the CLI: job.save, client.download, and what protects
them (issue 18 item 1; issue 17 item 4: a trickling image server; half-written files)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from wujie_async import (
    ClientStateError,
    DownloadPolicy,
    GeneratedImage,
    InvalidRequestError,
    JobFailedError,
    ProtocolError,
    RetryPolicy,
    SavedImage,
    TransportError,
    WujieClient,
)
from wujie_async.emulator import FaultConfig
from wujie_async.emulator._png import render_png

from .cli_helpers import cli, cli_zygote, manifest  # noqa: F401  # (the zygote fixture)
from .conftest import FAST_POLL, INSTANT_RETRY, EmulatorFactory, make_client
from .helpers import eventually, full_disk, png_size
from .hostile import (
    ImageServer,
    image_server,
    images_at,
    scripted_gateway,
    throwaway_credentials,
)

pytestmark = pytest.mark.anyio

PNG = render_png("K", 0, 8, 8)


def names(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden temporary files included."""
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inline_images(*texts: str) -> Callable[[list[str]], list[dict[str, Any]]]:
    def script(keys: list[str]) -> list[dict[str, Any]]:
        images = [{"url": None, "b64_json": text} for text in texts]
        return [{"key": key, "status": 4, "images": images} for key in keys]

    return script


def client_on(base_url: str, **options: Any) -> WujieClient:
    options.setdefault("poll", FAST_POLL)
    options.setdefault("retry", INSTANT_RETRY)
    return WujieClient(throwaway_credentials(), base_url=base_url, **options)


# --- job.save and client.download against the emulator ------------------------------------------
async def test_job_save_writes_every_image_with_the_sha256_it_reports(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "new" / "folder"
    async with emulator() as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="a cat", model="dall-e-2", n=3)
        saved = await job.save(folder)
    assert [image.index for image in saved] == [0, 1, 2]
    assert all(isinstance(image, SavedImage) for image in saved)
    for image in saved:
        assert image.path == folder / f"{job.key}-{image.index}.png"
        data = image.path.read_bytes()
        assert png_size(data)
        assert image.bytes == len(data) and image.sha256 == hashlib.sha256(data).hexdigest()
    assert names(folder) == [f"{job.key}-{index}.png" for index in range(3)]  # nothing else


@pytest.mark.long
async def test_a_full_disk_is_named_by_the_file_it_refused(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    # "[Errno 28] No space left on device" alone said nothing of where.
    import errno

    async with emulator() as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="a cat", model="dall-e-2")
        await job
        with full_disk(tmp_path / "disk") as disk:
            with pytest.raises(OSError) as caught:
                await job.save(disk / "images")
            assert caught.value.errno == errno.ENOSPC
            assert str(disk / "images") in str(caught.value), caught.value


async def test_client_download_saves_one_image_and_names_its_format(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    async with emulator() as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="a cat", model="dall-e-2", n=2)
        image = await job.image(1)
        (tmp_path / "cat.png").write_bytes(b"an older file")
        saved = await client.download(image, tmp_path / "cat.{ext}", key=job.key)
        exact = await client.download(image, str(tmp_path / "sub" / "exact.bin"))
        with pytest.raises(ProtocolError, match="neither a URL nor b64_json"):
            await client.download(GeneratedImage(0, None), tmp_path / "none.png")
    assert saved.path == tmp_path / "cat.png" and saved.index == 1
    assert sha256(saved.path) == saved.sha256 == exact.sha256  # the older file was replaced
    assert exact.path == tmp_path / "sub" / "exact.bin" and png_size(exact.path.read_bytes())
    with pytest.raises(ClientStateError, match="closed"):
        await client.download(image, tmp_path / "late.png")
    with pytest.raises(ClientStateError, match="closed"):
        await job.save(tmp_path)
    assert names(tmp_path) == ["cat.png", "sub"]


async def test_a_name_template_is_checked_before_waiting_and_never_gives_two_images_one_name(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    async with emulator() as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="a cat", model="dall-e-2", n=2)
        for template, rule in (
            ("{id}-{index}.{ext}", "the command line's row fields"),
            ("{line}-{key}.{ext}", "the command line's row fields"),
            ("cat-{index}.{ext}", "must use {key}"),
            ("../{key}-{index}.{ext}", "no path separators"),
            ("{key}-{nope}.{ext}", "unknown field"),
            ("{key:.0}-{index}.{ext}", "no format spec {key:.0}"),  # every job: "-0.png"
        ):
            with pytest.raises(InvalidRequestError, match=rule.replace("{", r"\{")):
                await job.save(tmp_path, name=template)
            assert not job.done()  # refused before the wait, not after
        with pytest.raises(InvalidRequestError, match="images 0 and 1 would both be saved"):
            await job.save(tmp_path, name="{key}.{ext}")
        assert job.done()
        assert emu.stats(timelines=False)["requests"].get("files", 0) == 0  # nothing fetched
        saved = await job.save(tmp_path, name="{index:03d}-{key}.{ext}")
    assert [image.path.name for image in saved] == [f"{i:03d}-{job.key}.png" for i in (0, 1)]
    assert names(tmp_path) == [image.path.name for image in saved]


async def test_a_failed_job_raises_its_error_and_saves_nothing(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    failing = FaultConfig(fail_jobs=1.0)
    async with emulator(faults=failing) as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="a cat", model="dall-e-2")
        with pytest.raises(JobFailedError):
            await job.save(tmp_path)
    assert names(tmp_path) == []


# --- b64_json images ------------------------------------------------------------------------------
async def test_inline_images_are_saved_like_downloads_and_capped_before_decoding(
    tmp_path: Path,
) -> None:
    encoded = base64.b64encode(PNG).decode()
    script = inline_images(encoded, "data:image/png;base64," + encoded)
    async with scripted_gateway(script) as gateway, client_on(gateway.base_url) as client:
        job = await client.images.submit(prompt="p", model="dall-e-2", n=2)
        saved = await job.save(tmp_path / "ok")
    assert [image.path.name for image in saved] == [f"{job.key}-0.png", f"{job.key}-1.png"]
    assert all(image.path.read_bytes() == PNG for image in saved)
    assert saved[0].sha256 == saved[1].sha256 == hashlib.sha256(PNG).hexdigest()

    # Over the cap: refused from the text's length, before a byte is decoded.
    small = DownloadPolicy(max_bytes=len(PNG) - 1)
    async with (
        scripted_gateway(inline_images(encoded)) as gateway,
        client_on(gateway.base_url, downloads=small) as client,
    ):
        job = await client.images.submit(prompt="p", model="dall-e-2")
        with pytest.raises(ProtocolError, match="larger than"):
            await job.save(tmp_path / "big")
    assert names(tmp_path / "big") == []


async def test_inline_images_wrapped_url_safe_or_unpadded_are_saved(tmp_path: Path) -> None:
    # A gateway re-encoding the image with its platform's encoder: MIME lines (Java's MIME
    # encoder, the base64 tool), the URL-safe alphabet, no padding. Each was "b64_json is not
    # valid base64": a paid image, its bytes in the reply, not saved (and a re-run could not
    # either). Base64 it is, so it is read; anything else is still refused.
    big = render_png("K", 1, 36, 36)  # over 76 columns, padded, with "-" or "_" when URL-safe
    encoded = base64.b64encode(big).decode()
    url_safe = base64.urlsafe_b64encode(big).decode()
    assert url_safe != encoded and encoded.endswith("=")
    texts = (
        base64.encodebytes(big).decode().replace("\n", "\r\n"),
        url_safe,
        encoded.rstrip("="),
        "data:image/png;base64," + base64.encodebytes(big).decode(),
    )
    async with (
        scripted_gateway(inline_images(*texts)) as gateway,
        client_on(gateway.base_url) as client,
    ):
        job = await client.images.submit(prompt="p", model="dall-e-2", n=len(texts))
        saved = await job.save(tmp_path / "ok")
        assert [image.path.read_bytes() for image in saved] == [big] * len(texts)
        assert {image.sha256 for image in saved} == {hashlib.sha256(big).hexdigest()}

    async with (
        scripted_gateway(inline_images(encoded[:-8] + "*%" + encoded[-6:])) as gateway,
        client_on(gateway.base_url) as client,
    ):
        job = await client.images.submit(prompt="p", model="dall-e-2")
        with pytest.raises(ProtocolError, match="not valid base64"):
            await job.save(tmp_path / "bad")
    assert names(tmp_path / "bad") == []


# --- half-written files ---------------------------------------------------------------------------
async def test_an_image_that_fails_half_way_leaves_no_file_and_the_others_stay_whole(
    tmp_path: Path,
) -> None:
    async with image_server() as images:
        script = images_at(images.url("png"), images.url("cut"))
        async with scripted_gateway(script) as gateway, client_on(gateway.base_url) as client:
            job = await client.images.submit(prompt="p", model="dall-e-2", n=2)
            with pytest.raises(TransportError) as info:
                await job.save(tmp_path)
        assert images.hits["cut"] == INSTANT_RETRY.max_attempts  # retried, then given up
    whole = tmp_path / f"{job.key}-0.png"
    assert names(tmp_path) == [whole.name]  # no half file, no temporary file
    assert whole.read_bytes() == PNG
    assert any(whole.name in note for note in info.value.__notes__)


SIGNED = "gone?X-Signature=9f3a7c2e1b&Expires=1700000000"  # an expired signed URL's path


async def test_a_failed_save_names_its_job_and_image_but_never_the_signed_url(
    tmp_path: Path,
) -> None:
    # An expired URL said only "image download refused | HTTP 404": which job, which image?
    async with image_server() as images:
        script = images_at(images.url("png"), images.url(SIGNED))
        async with scripted_gateway(script) as gateway, client_on(gateway.base_url) as client:
            job = await client.images.submit(prompt="p", model="dall-e-2", n=2)
            with pytest.raises(ProtocolError) as saving:
                await job.save(tmp_path)
            image = (await job).images[1]
            with pytest.raises(ProtocolError) as keyed:
                await client.download(image, tmp_path / "one.{ext}", key=job.key)
            with pytest.raises(ProtocolError) as keyless:
                await client.download(image, tmp_path / "two.{ext}")
    said = f"job {job.key}, image 1: image download refused | HTTP 404"
    assert str(saving.value) == said and str(keyed.value) == said
    assert str(keyless.value) == "image 1: image download refused | HTTP 404"
    for error in (saving.value, keyed.value, keyless.value):
        assert error.http_status == 404
        shown = [str(error), repr(error), *getattr(error, "__notes__", ())]
        assert not any("X-Signature" in text or "9f3a7c2e1b" in text for text in shown), shown


async def test_saves_of_one_job_sharing_one_failure_note_the_files_saved_once(
    tmp_path: Path,
) -> None:
    # Two requests of a web app save one job into one folder; its image 1 fails. Both saves
    # raise the one error of the one download, and each added "saved before this error was
    # raised: ..." to it: the notes piled up, two per caller.
    async with image_server() as images:
        script = images_at(images.url("png"), images.url("gone"))
        async with scripted_gateway(script) as gateway, client_on(gateway.base_url) as client:
            job = await client.images.submit(prompt="p", model="dall-e-2", n=2)
            await job
            first, second = await asyncio.gather(
                job.save(tmp_path), job.save(tmp_path), return_exceptions=True
            )
    assert isinstance(first, ProtocolError) and second is first  # one download, one error
    assert first.__notes__ == [f"saved before this error was raised: {job.key}-0.png"]


async def test_two_saves_of_one_image_into_one_folder_return_the_file_on_disk(
    tmp_path: Path,
) -> None:
    # Two requests of a web app save the same job at once, from an image server that sends
    # different bytes each time: both returned the same path, and one sha256 that was not
    # the file's. The second save joins the first: one download, one file, one sha256.
    async with image_server() as images:
        async with (
            scripted_gateway(images_at(images.url("varying"))) as gateway,
            client_on(gateway.base_url) as client,
        ):
            job = await client.images.submit(prompt="p", model="dall-e-2")
            await job
            both = asyncio.gather(job.save(tmp_path), job.save(tmp_path))
            await eventually(lambda: images.hits["varying"] >= 1)
            images.released.set()
            first, second = await both
        assert images.hits["varying"] == 1
    assert first == second
    assert names(tmp_path) == [first[0].path.name]
    assert first[0].sha256 == sha256(first[0].path)


async def test_saves_of_one_image_that_joined_a_failing_one_end_with_it(tmp_path: Path) -> None:
    # Joined saves of an image that cannot be saved: when the first failed, the next one
    # tried again after it, then the next (4 saves with a 1 s deadline ended at 1, 2, 3 and
    # 4 s): they end with the first one's error, from its one download.
    policy = DownloadPolicy(min_rate=None, deadline=0.5)
    async with image_server() as images:
        async with (
            scripted_gateway(images_at(images.url("silent"))) as gateway,
            client_on(gateway.base_url, downloads=policy) as client,
        ):
            job = await client.images.submit(prompt="p", model="dall-e-2")
            await job
            outcomes = await asyncio.gather(
                *(job.save(tmp_path) for _ in range(3)), return_exceptions=True
            )
            images.released.set()
        assert images.hits["silent"] == 1
    assert all(isinstance(outcome, TransportError) for outcome in outcomes), outcomes
    assert names(tmp_path) == []


# --- a trickling image server (issue 17 item 4) ---------------------------------------------------
@pytest.mark.long
async def test_a_trickling_image_server_fails_as_too_slow_once_the_retry_budget_is_spent(
    tmp_path: Path,
) -> None:
    """Every try fails after one rate window; no new try starts once max_elapsed is spent."""
    policy = DownloadPolicy(min_rate=2000, rate_window=0.2, deadline=None)
    retry = RetryPolicy(initial_wait=0.01, max_wait=0.01, max_attempts=100, max_elapsed=0.5)
    async with image_server() as images:
        async with (
            scripted_gateway(images_at(images.url("trickle"))) as gateway,
            client_on(gateway.base_url, downloads=policy, retry=retry) as client,
        ):
            job = await client.images.submit(prompt="p", model="dall-e-2")
            await job
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TransportError, match="image server was too slow") as info:
                await job.save(tmp_path)
            took = loop.time() - started
        assert "fewer than 400 bytes in 0.2 s" in str(info.value)
        assert 2 <= images.hits["trickle"] <= 4  # 0.5 s of budget, 0.2 s a try
    assert took < 0.5 + 0.2 + 2.0  # budget + the last try + a loaded machine's slack
    assert names(tmp_path) == []


@pytest.mark.long
async def test_the_per_image_deadline_bounds_every_try_and_wait(tmp_path: Path) -> None:
    policy = DownloadPolicy(min_rate=None, deadline=0.4)
    async with image_server() as images:
        async with (
            scripted_gateway(images_at(images.url("trickle"))) as gateway,
            client_on(gateway.base_url, downloads=policy) as client,
        ):
            job = await client.images.submit(prompt="p", model="dall-e-2")
            image = await job.image(0)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TransportError, match="too slow: the image was not saved within"):
                await client.download(image, tmp_path / "slow.png")
            took = loop.time() - started
        assert images.hits["trickle"] == 1
    assert took < 0.4 + 2.0
    assert names(tmp_path) == []


@pytest.mark.long
async def test_a_server_that_never_answers_fails_within_the_read_timeout(tmp_path: Path) -> None:
    policy = DownloadPolicy(read_timeout=0.5)
    retry = RetryPolicy(initial_wait=0.0, max_wait=0.0, max_attempts=3, max_elapsed=30)
    async with image_server() as images:
        async with (
            scripted_gateway(images_at(images.url("silent"))) as gateway,
            client_on(gateway.base_url, downloads=policy, retry=retry) as client,
        ):
            job = await client.images.submit(prompt="p", model="dall-e-2")
            with pytest.raises(TransportError, match=r"too slow: no reply within 0\.5 s"):
                await job.save(tmp_path)
        # The server counts a request when its handler starts, which on a loaded machine can
        # come after the client gave up on it.
        await eventually(lambda: images.hits["silent"] >= 3, what="3 tries", timeout=10)
        assert images.hits["silent"] == 3
    assert names(tmp_path) == []


def test_download_policy_values_are_checked() -> None:
    for bad in (
        {"max_bytes": 0},
        {"concurrency": 1.5},
        {"deadline": -1},
        {"min_rate": 0},
        {"rate_window": float("nan")},
        {"max_redirects": -1},
        {"allow_http": "yes"},
    ):
        with pytest.raises(InvalidRequestError, match="DownloadPolicy"):
            DownloadPolicy(**bad)
    DownloadPolicy(deadline=None, min_rate=None, max_redirects=0)


# --- the CLI: the same downloader, its flags and progress -----------------------------------------
def gateway_flags(tmp_path: Path, base_url: str) -> tuple[str, ...]:
    key = tmp_path / "key.pem"
    key.write_text(throwaway_credentials().private_key)
    return ("--app-id", "app", "--private-key-file", str(key), "--base-url", base_url)


async def bulk_against(
    tmp_path: Path, images: ImageServer, paths: tuple[str, ...], *flags: str
) -> tuple[int, str, str]:
    rows = tmp_path / "rows.txt"
    rows.write_text("one\n")
    async with scripted_gateway(images_at(*(images.url(path) for path in paths))) as gateway:
        return await cli(
            "bulk", str(rows), "--model", "dall-e-2", "-n", str(len(paths)), "--no-journal",
            "-o", str(tmp_path / "out"), "--json", *flags,
            *gateway_flags(tmp_path, gateway.base_url),
        )  # fmt: skip


@pytest.mark.long
async def test_a_trickling_image_ends_its_line_failed_as_too_slow_and_shows_saving(
    tmp_path: Path,
) -> None:
    async with image_server() as images:
        code, _, err = await bulk_against(
            tmp_path, images, ("trickle",), "--download-timeout", "1",
            "--progress", "plain", "--progress-interval", "0.05",
        )  # fmt: skip
    assert code == 1, err
    sent, record = manifest(tmp_path / "out")  # its key as it was accepted, then its end
    assert sent["status"] == "pending" and sent["key"] == record["key"]
    assert record["status"] == "failed" and record["error_code"] == "download"
    assert (
        "image server was too slow" in record["error"] and "--download-timeout" in record["error"]
    )
    progress = [line for line in err.splitlines() if line.startswith("progress: ")]
    assert any("at the gateway 0 · saving 1" in line for line in progress), err
    assert progress[-1].startswith("progress: 1/1") and "saving 0" in progress[-1]
    assert names(tmp_path / "out") == [".wujie-async.lock", "manifest.jsonl"]


@pytest.mark.long
async def test_the_manifest_names_only_whole_files_with_their_sha256(tmp_path: Path) -> None:
    async with image_server() as images:
        # A body cut short is retried, with backoff, until the one-second deadline.
        code, _, err = await bulk_against(
            tmp_path, images, ("png", "cut"), "--download-timeout", "1"
        )
    assert code == 1, err
    out = tmp_path / "out"
    saved = [record for record in manifest(out) if record["status"] == "saved"]
    failed = [record for record in manifest(out) if record["status"] == "failed"]
    assert [record["index"] for record in saved] == [0] and len(failed) == 1
    assert sha256(out / saved[0]["path"]) == saved[0]["sha256"]
    assert saved[0]["bytes"] == len(PNG)
    # No half file (the lock is bulk's: one run at a time in OUT).
    assert names(out) == sorted([saved[0]["path"], "manifest.jsonl", ".wujie-async.lock"])


async def test_download_flags_are_checked_before_anything_is_sent(tmp_path: Path) -> None:
    rows = tmp_path / "rows.txt"
    rows.write_text("one\n")
    for flags, said in (
        (("--download-timeout", "0"), "--download-timeout must be a positive, finite number"),
        (("--download-timeout", "inf"), "--download-timeout must be a positive, finite number"),
        (("--min-download-rate", "-1"), "--min-download-rate must be a finite number >= 0"),
        (("--rate", "inf"), "--rate must be a positive, finite number"),
        (("--max-points", "inf"), "--max-points must be a finite number >= 0"),
    ):
        code, _, err = await cli("bulk", str(rows), "--emulator", "-o", str(tmp_path), *flags)
        assert code == 2 and said in err, err


async def test_closing_the_client_ends_a_download_in_progress_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    async with image_server() as images:
        async with (
            scripted_gateway(images_at(images.url("trickle"))) as gateway,
            client_on(gateway.base_url) as client,
        ):
            job = await client.images.submit(prompt="p", model="dall-e-2")
            saving = asyncio.ensure_future(job.save(tmp_path))
            for _ in range(500):  # until the image server has the request (bounded)
                if images.hits["trickle"]:
                    break
                await asyncio.sleep(0.01)
            assert images.hits["trickle"] == 1 and not saving.done()
            await client.aclose()
            with pytest.raises(ClientStateError, match="closed"):
                await asyncio.wait_for(saving, 10)
    assert names(tmp_path) == []
