"""How a job reads the images its reports list: the newest listing wins, a placeholder (an
image with neither a URL nor ``b64_json``) is not an image, and a job reported done with
fewer images than it makes is not a success (IncompleteJobError).

Each test runs a WujieClient against a small gateway on loopback, written here: it checks
every request's signature (RSA PKCS#1 v1.5 over ``original``, as the contract says), and
answers each key's batch entries from a script of stages that the test moves on, one at a
time, once the client has read the current one. It serves the images too.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from wujie_async import (
    Credentials,
    GeneratedImage,
    ImageJob,
    ImageResult,
    IncompleteJobError,
    JobError,
    JobStatus,
    WujieClient,
)
from wujie_async._auth import verify_signature
from wujie_async._fan_out import DONE_UNLISTED_SEEN
from wujie_async._job_info import JobInfo
from wujie_async.cli._outcome import classify
from wujie_async.emulator._png import render_png

from .cli_helpers import CLEAN_ENV, cli, cli_zygote, manifest  # noqa: F401
from .conftest import FAST_POLL, INSTANT_RETRY, EmulatorFactory, make_client
from .helpers import GENERATIONS, INFO
from .hostile import throwaway_credentials

pytestmark = pytest.mark.anyio

WAIT_S = 10.0  # a generous bound on every wait: nothing here should take a second
PLACEHOLDER: dict[str, Any] = {"url": None, "b64_json": None, "revised_prompt": None}


@dataclass
class _Script:
    """One key's entries, stage by stage (the last stage repeats)."""

    stages: list[dict[str, Any]]
    stage: int = 0
    answered: int = 0  # replies sent at the current stage
    read: asyncio.Event = field(default_factory=asyncio.Event)  # the client read the stage


@dataclass
class ListingGateway:
    """A gateway whose batch entries a test scripts, key by key, stage by stage.

    Submits get keys ``K00000``, ``K00001``, ... in order. ``script(key, *stages)`` sets a
    key's entries (``key`` is added to each); ``read(key)`` waits until the client has read
    the current stage (it asked about the key again after a reply at that stage: the poller
    asks about a key only once it has handled the last reply for it); ``advance(key)`` moves
    the key on. ``png(name)`` serves distinct PNG bytes at ``url(name)``; any other file is
    404, as an expired URL is.
    """

    credentials: Credentials
    base_url: str = ""
    submits: int = 0
    scripts: dict[str, _Script] = field(default_factory=dict)
    # The stages of a key no test scripted, set at its submit (for runs that submit on their
    # own, as the command line does); None: such a key is absent from replies.
    stages_of: Callable[[str], list[dict[str, Any]]] | None = None
    submitted: dict[str, asyncio.Event] = field(
        default_factory=lambda: collections.defaultdict(asyncio.Event)
    )
    files: dict[str, bytes] = field(default_factory=dict)
    fetched: Counter[str] = field(default_factory=Counter)
    refused: int = 0  # requests whose signature did not verify

    def script(self, key: str, *stages: dict[str, Any]) -> None:
        self.scripts[key] = _Script([{"key": key, **stage} for stage in stages])

    async def read(self, key: str) -> None:
        await asyncio.wait_for(self.scripts[key].read.wait(), WAIT_S)

    async def read_again(self, key: str) -> None:
        """Wait until the client has read the current stage once more."""
        script = self.scripts[key]
        script.read = asyncio.Event()  # set at the next ask: the reply before it was read
        await self.read(key)

    def advance(self, key: str) -> None:
        script = self.scripts[key]
        assert script.stage + 1 < len(script.stages)
        script.stage += 1
        script.answered = 0
        script.read = asyncio.Event()

    def png(self, name: str) -> bytes:
        data = render_png(name, len(self.files), 8, 8)
        self.files[name] = data
        return data

    def url(self, name: str) -> str:
        return f"{self.base_url}/files/{name}"

    # --- the server's side ---------------------------------------------------------------
    def _signed(self, request: web.Request) -> bool:
        try:
            header = json.loads(request.headers["Authorization"])
            original = json.loads(header["original"])
        except (KeyError, ValueError, TypeError):
            return False
        return header.get("appId") == self.credentials.app_id == original.get(
            "appId"
        ) and verify_signature(self.credentials.public_key(), header["original"], header["sign"])

    def _refusal(self) -> web.Response:
        self.refused += 1
        envelope = {"code": "401", "message": "bad sign", "data": None}
        return web.json_response(envelope, status=401)

    async def submit(self, request: web.Request) -> web.Response:
        if not self._signed(request):
            return self._refusal()
        key = f"K{self.submits:05d}"
        self.submits += 1
        if self.stages_of is not None and key not in self.scripts:
            self.script(key, *self.stages_of(key))
        self.submitted[key].set()
        return web.json_response({"code": "200", "message": "success", "data": {"key": key}})

    async def info(self, request: web.Request) -> web.Response:
        if not self._signed(request):
            return self._refusal()
        listed = []
        for key in await request.json():
            script = self.scripts.get(key)
            if script is None:
                continue
            if script.answered:
                script.read.set()
            script.answered += 1
            listed.append(script.stages[script.stage])
        data = {"list": listed}
        return web.json_response({"code": "200", "message": "success", "data": data})

    async def file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.fetched[name] += 1
        data = self.files.get(name)
        if data is None:
            return web.Response(status=404, text="expired")
        return web.Response(body=data, content_type="image/png")


@asynccontextmanager
async def listing_gateway() -> AsyncIterator[ListingGateway]:
    gateway = ListingGateway(throwaway_credentials())
    app = web.Application()
    app.router.add_post(GENERATIONS, gateway.submit)
    app.router.add_post(INFO, gateway.info)
    app.router.add_get("/files/{name}", gateway.file)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    gateway.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield gateway
    finally:
        await runner.cleanup()


@asynccontextmanager
async def client_of(gateway: ListingGateway) -> AsyncIterator[WujieClient]:
    async with WujieClient(
        gateway.credentials, base_url=gateway.base_url, poll=FAST_POLL, retry=INSTANT_RETRY
    ) as client:
        yield client
    assert gateway.refused == 0  # every request was signed with the client's key


def image(url: str, revised_prompt: str | None = None) -> dict[str, Any]:
    return {"url": url, "b64_json": None, "revised_prompt": revised_prompt}


def running(*images: dict[str, Any]) -> dict[str, Any]:
    return {"status": 1, "complete_percent": 50, "expected_seconds": 1, "images": list(images)}


def done(*images: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"status": 4, "complete_percent": 100, "images": list(images), **extra}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def submit(client: WujieClient, n: int) -> ImageJob:
    return await client.images.submit(prompt="a lighthouse", model="dall-e-2", n=n)


async def incomplete(job: ImageJob) -> IncompleteJobError:
    with pytest.raises(IncompleteJobError) as info:
        await job.result(timeout=WAIT_S)
    return info.value


# --- the newest listing wins ---------------------------------------------------------------
async def test_final_urls_listed_at_the_end_replace_the_temporary_ones(tmp_path: Path) -> None:
    """Images listed while running with temporary URLs, then at status 4 with their final
    URLs (and revised prompts): the result and save use the final ones."""
    async with listing_gateway() as gateway, client_of(gateway) as client:
        job = await submit(client, 2)
        finals = [gateway.png("final-0.png"), gateway.png("final-1.png")]
        gateway.script(
            job.key,
            running(image(gateway.url("temp-0.png")), image(gateway.url("temp-1.png"))),
            done(
                image(gateway.url("final-0.png"), "a lighthouse at dusk"),
                image(gateway.url("final-1.png"), "a lighthouse at dawn"),
            ),
        )
        first = await asyncio.wait_for(job.image(0), WAIT_S)
        await gateway.read(job.key)
        assert first.url == gateway.url("temp-0.png")  # as first listed
        assert [i.url for i in job.images] == [gateway.url(f"temp-{i}.png") for i in (0, 1)]
        gateway.advance(job.key)

        result = await job.result(timeout=WAIT_S)
        assert result.status == JobStatus.SUCCEEDED
        assert result.images == (
            GeneratedImage(0, gateway.url("final-0.png"), None, "a lighthouse at dusk"),
            GeneratedImage(1, gateway.url("final-1.png"), None, "a lighthouse at dawn"),
        )
        assert tuple(job.images) == result.images
        # A per-image future resolves once: image(0) now gives the newest listing (the job
        # holds it); the image it first resolved with is unchanged.
        assert (await job.image(0)).url == gateway.url("final-0.png")
        assert first.url == gateway.url("temp-0.png")

        saved = await job.save(tmp_path)
        assert [s.sha256 for s in saved] == [sha256(data) for data in finals]
        assert [s.path.read_bytes() for s in saved] == finals
        assert gateway.fetched == {"final-0.png": 1, "final-1.png": 1}  # no temporary URL
        assert client.stats.jobs_succeeded == 1 and client.stats.jobs_failed == 0


async def test_a_done_report_listing_nothing_is_asked_again_for_the_final_urls(
    tmp_path: Path,
) -> None:
    """Images listed while running at temporary URLs (gone once the job ends), then done
    reports that list nothing for a moment, then the final URLs: the job waits for them
    rather than settling on the temporary ones."""
    async with listing_gateway() as gateway, client_of(gateway) as client:
        job = await submit(client, 1)
        final = gateway.png("final.png")  # temp.png is not served: it expired with the job
        gateway.script(
            job.key,
            running(image(gateway.url("temp.png"))),
            done(integral_cost=2),
            done(image(gateway.url("final.png")), integral_cost=2),
        )
        await gateway.read(job.key)
        gateway.advance(job.key)
        await gateway.read_again(job.key)  # "done, nothing listed" read twice: still tracked
        assert not job.done()
        gateway.advance(job.key)

        result = await job.result(timeout=WAIT_S)
        assert result.images == (GeneratedImage(0, gateway.url("final.png")),)
        [saved] = await job.save(tmp_path)
        assert saved.sha256 == sha256(final)
        assert gateway.fetched == {"final.png": 1}


async def test_done_reports_that_never_list_images_are_waited_for_only_at_first() -> None:
    """A gateway whose done reports list no images (it listed them while the job ran): the
    first jobs wait the grace for a final listing and end with the images they hold; once
    that was seen DONE_UNLISTED_SEEN times, a job ends at its first done report."""
    async with listing_gateway() as gateway, client_of(gateway) as client:
        jobs = [await submit(client, 1) for _ in range(DONE_UNLISTED_SEEN + 1)]
        for job in jobs:
            gateway.png(f"{job.key}.png")
            gateway.script(job.key, running(image(gateway.url(f"{job.key}.png"))), done())
        for job in jobs[:-1]:
            await gateway.read(job.key)
            gateway.advance(job.key)
        for job in jobs[:-1]:
            result = await job.result(timeout=WAIT_S)
            assert result.images == (GeneratedImage(0, gateway.url(f"{job.key}.png")),)
            assert gateway.scripts[job.key].answered > 1  # asked again, within the grace
        last = jobs[-1]
        await gateway.read(last.key)
        gateway.advance(last.key)
        await last.result(timeout=WAIT_S)
        assert gateway.scripts[last.key].answered == 1  # settled at its first done report
        assert client.stats.jobs_succeeded == len(jobs)


async def test_bulk_saves_from_the_final_listing_and_records_a_cost_that_came_last(
    tmp_path: Path,
) -> None:
    """The command line on a gateway that lists each image while the job runs and says what
    it cost only at the end: line 1's first URL is a temporary one, gone by the time it is
    fetched (the final listing is used); line 2's only row is written once the job ended,
    with its cost. The manifest's points add up to what was charged."""
    async with listing_gateway() as gateway:
        finals = {key: gateway.png(f"final-{key}.png") for key in ("K00000", "K00001")}
        first_url = {"K00000": "temp-K00000.png", "K00001": "final-K00001.png"}
        gateway.stages_of = lambda key: [
            running(image(gateway.url(first_url[key]))),
            done(image(gateway.url(f"final-{key}.png")), integral_cost=2),
        ]
        prompts = tmp_path / "two.txt"
        prompts.write_text("a lighthouse\na harbour\n")
        out = tmp_path / "out"
        env = CLEAN_ENV | {
            "WUJIE_APP_ID": gateway.credentials.app_id,
            "WUJIE_PRIVATE_KEY": gateway.credentials.private_key,
            "WUJIE_BASE_URL": gateway.base_url,
        }
        args = (
            "bulk", str(prompts), "-o", str(out), "--json", "--progress", "none",
            "--model", "dall-e-2", "--allow-private-addresses", "--concurrency", "1",
        )  # fmt: skip
        run = asyncio.create_task(cli(*args, env=env))
        for key in ("K00000", "K00001"):
            await asyncio.wait_for(gateway.submitted[key].wait(), WAIT_S)
            await gateway.read(key)
            await gateway.read_again(key)  # its image fetched (or refused) meanwhile, or not
            gateway.advance(key)
        code, stdout, err = await asyncio.wait_for(run, 50)
    assert code == 0, err
    rows = manifest(out)
    assert [r["status"] for r in rows] == ["saved", "saved"]
    assert {r["key"]: r["sha256"] for r in rows} == {k: sha256(d) for k, d in finals.items()}
    assert [r.get("points") for r in rows] == [2, 2]
    assert json.loads(stdout)["points"] == 4
    assert gateway.fetched["temp-K00000.png"] >= 1  # tried first, expired


async def test_an_image_held_is_never_lost_to_a_later_listing(tmp_path: Path) -> None:
    """A later listing with a placeholder at an image's index, or none at all, keeps it."""
    async with listing_gateway() as gateway, client_of(gateway) as client:
        job = await submit(client, 2)
        data = [gateway.png("a.png"), gateway.png("b.png")]
        gateway.script(
            job.key,
            running(image(gateway.url("a.png"))),
            running(PLACEHOLDER, image(gateway.url("b.png"))),  # a placeholder where a was
            done(),  # the terminal report lists nothing
        )
        await gateway.read(job.key)
        gateway.advance(job.key)
        second = await asyncio.wait_for(job.image(1), WAIT_S)
        await gateway.read(job.key)
        assert [i.url for i in job.images] == [gateway.url("a.png"), gateway.url("b.png")]
        gateway.advance(job.key)

        result = await job.result(timeout=WAIT_S)
        assert result.images == (GeneratedImage(0, gateway.url("a.png")), second)
        saved = await job.save(tmp_path)
        assert [s.sha256 for s in saved] == [sha256(d) for d in data]


async def test_a_listing_that_repeats_itself_is_no_change() -> None:
    """The same images listed again and again: no update for the streams to wake on."""
    async with listing_gateway() as gateway, client_of(gateway) as client:
        job = await submit(client, 2)
        gateway.script(job.key, running(image(gateway.url("a.png"))), done())
        await gateway.read(job.key)
        seen = job._version
        for _ in range(2):  # two more reads of the same report
            await gateway.read_again(job.key)
        assert job._version == seen
        gateway.advance(job.key)
        with pytest.raises(IncompleteJobError):
            await job.result(timeout=WAIT_S)


# --- a placeholder is not an image ---------------------------------------------------------
async def test_a_placeholder_does_not_resolve_an_image(tmp_path: Path) -> None:
    async with listing_gateway() as gateway, client_of(gateway) as client:
        job = await submit(client, 1)
        data = gateway.png("real.png")
        gateway.script(
            job.key,
            running(PLACEHOLDER),
            running({"url": "", "b64_json": ""}),  # empty text is no image either
            running(image(gateway.url("real.png"))),
            done(image(gateway.url("real.png"))),
        )
        waiting = asyncio.create_task(job.image(0))
        for _ in range(2):
            await gateway.read(job.key)
            assert not waiting.done()
            assert job.images == () and job.snapshot().images == ()
            gateway.advance(job.key)
        landed = await asyncio.wait_for(waiting, WAIT_S)
        assert landed == GeneratedImage(0, gateway.url("real.png"))
        await gateway.read(job.key)
        gateway.advance(job.key)
        result = await job.result(timeout=WAIT_S)
        assert result.images == (landed,)
        [saved] = await job.save(tmp_path)
        assert saved.sha256 == sha256(data)


# --- done with fewer images than the job makes ---------------------------------------------
async def test_done_with_none_of_one_image_is_incomplete(tmp_path: Path) -> None:
    async with listing_gateway() as gateway, client_of(gateway) as client:
        job = await submit(client, 1)
        gateway.script(job.key, done(PLACEHOLDER, integral_cost=8))
        error = await incomplete(job)
        assert error.job_key == job.key
        assert error.expected == 1 and error.landed == 0
        assert error.result.images == () and error.result.status == JobStatus.SUCCEEDED
        assert "the gateway reported the job done with 0 of 1 image(s)" in str(error)
        assert isinstance(error, JobError)
        assert job.exception() is error and job.snapshot().error is error
        with pytest.raises(IncompleteJobError):
            await job.image(0)
        with pytest.raises(IncompleteJobError) as saving:
            await job.save(tmp_path)
        assert saving.value.result == error.result
        assert list(tmp_path.iterdir()) == []
        stats = client.stats
        assert stats.jobs_failed == 1 and stats.jobs_succeeded == 0
        assert stats.points_charged == 8  # it was paid: counted as ever


async def test_images_listed_a_moment_after_the_job_is_done_are_collected(
    tmp_path: Path,
) -> None:
    # A gateway may turn the status to 4 before it lists the images: the job is asked about
    # again for a few seconds rather than ending short at once (its paid images were lost:
    # an ended job is never asked about again).
    async with listing_gateway() as gateway, client_of(gateway) as client:
        job = await submit(client, 2)
        data = [gateway.png("a.png"), gateway.png("b.png")]
        first, second = image(gateway.url("a.png")), image(gateway.url("b.png"))
        gateway.script(job.key, done(), done(first), done(first, second))
        await gateway.read_again(job.key)  # read "done, no image" twice: still tracked
        assert not job.done() and job.status == JobStatus.SUCCEEDED
        gateway.advance(job.key)
        await gateway.read_again(job.key)
        gateway.advance(job.key)
        result = await job.result(timeout=WAIT_S)
        assert [saved.sha256 for saved in await job.save(tmp_path)] == [sha256(d) for d in data]
    assert [i.index for i in result.images] == [0, 1]
    assert client.stats.jobs_succeeded == 1 and client.stats.jobs_failed == 0


async def test_done_with_one_of_two_images_is_incomplete_and_the_one_is_kept(
    tmp_path: Path,
) -> None:
    async with listing_gateway() as gateway, client_of(gateway) as client:
        job = await submit(client, 2)
        data = gateway.png("only.png")
        gateway.script(
            job.key,
            running(),
            done(image(gateway.url("only.png")), PLACEHOLDER, integral_cost=16),
        )
        second = asyncio.create_task(job.image(1))  # waiting before the end
        await gateway.read(job.key)
        gateway.advance(job.key)

        error = await incomplete(job)
        assert error.expected == 2 and error.landed == 1
        assert error.result.images == (GeneratedImage(0, gateway.url("only.png")),)
        assert str(error) == (
            f"job {job.key}: the gateway reported the job done with 1 of 2 image(s)"
        )
        assert await job.image(0) == error.result.images[0]
        with pytest.raises(IncompleteJobError):
            await asyncio.wait_for(second, WAIT_S)
        with pytest.raises(IncompleteJobError):
            await job.image(1)

        with pytest.raises(IncompleteJobError) as saving:
            await job.save(tmp_path)
        [file] = list(tmp_path.iterdir())
        assert file.name == f"{job.key}-0.png"
        assert sha256(file.read_bytes()) == sha256(data)
        assert saving.value.result == error.result and saving.value.expected == 2
        assert any(file.name in note for note in saving.value.__notes__)
        # The job's own error carries no note of a save (a new error per save call).
        assert not getattr(error, "__notes__", [])
        assert client.stats.jobs_failed == 1 and client.stats.points_charged == 16

        status, code, message = classify(error)
        assert (status, code) == ("failed", "incomplete")
        assert message == f"job {job.key}: the gateway reported it done with 1 of 2 image(s)"


async def test_a_missing_first_image_makes_the_job_incomplete_too() -> None:
    """Two images listed, the first a placeholder: one of two came."""
    async with listing_gateway() as gateway, client_of(gateway) as client:
        job = await submit(client, 2)
        gateway.script(job.key, done(PLACEHOLDER, image(gateway.url("b.png"))))
        error = await incomplete(job)
        assert error.landed == 1 and error.result.images == (
            GeneratedImage(1, gateway.url("b.png")),
        )
        assert (await job.image(1)).url == gateway.url("b.png")
        with pytest.raises(IncompleteJobError):
            await job.image(0)


async def test_an_attached_key_without_n_accepts_what_came_but_not_nothing() -> None:
    async with listing_gateway() as gateway, client_of(gateway) as client:
        gateway.script("EMPTY", done())
        gateway.script("SOME", done(image(gateway.url("a.png"))))
        empty = client.images.attach("EMPTY")
        some = client.images.attach("SOME")
        error = await incomplete(empty)
        assert error.expected == 1 and error.result.images == ()
        result = await some.result(timeout=WAIT_S)
        assert result.images == (GeneratedImage(0, gateway.url("a.png")),)
        # An attached key whose n is given is held to it.
        gateway.script("TWO", done(image(gateway.url("a.png"))))
        assert (await incomplete(client.images.attach("TWO", n=2))).expected == 2


async def test_images_past_n_are_neither_results_nor_fetched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job of n=1 reported done with three image URLs: one image, one fetch, one file."""
    async with listing_gateway() as gateway, client_of(gateway) as client:
        job = await submit(client, 1)
        data = gateway.png("a.png")
        gateway.png("b.png")
        gateway.png("c.png")
        gateway.script(
            job.key,
            done(
                image(gateway.url("a.png")),
                image(gateway.url("b.png")),
                image(gateway.url("c.png")),
            ),
        )
        result = await job.result(timeout=WAIT_S)
        assert result.images == (GeneratedImage(0, gateway.url("a.png")),)
        saved = await job.save(tmp_path)
        assert [file.name for file in tmp_path.iterdir()] == [f"{job.key}-0.png"]
        assert len(saved) == 1 and sha256((tmp_path / f"{job.key}-0.png").read_bytes()) == sha256(
            data
        )
        assert gateway.fetched == Counter({"a.png": 1})
    assert "listed more images than a job asked for" in caplog.text


def test_an_entry_lists_at_most_a_jobs_images() -> None:
    """A reply listing a million placeholders builds ten (n is at most 10): the rest is not
    read, let alone validated one by one."""
    raw = {"key": "K", "status": 1, "images": [{}] * 1_000_000}
    entry = JobInfo.read(raw)
    assert entry.images is not None and len(entry.images) == 10


def test_classify_cleans_what_it_quotes() -> None:
    error = IncompleteJobError(
        job_key="K\x1b]0;PWNED\x07\x1b[2J1", result=ImageResult("K", 4, ()), expected=3
    )
    status, code, message = classify(error)
    assert (status, code) == ("failed", "incomplete")
    assert message == "job K1: the gateway reported it done with 0 of 3 image(s)"


# --- a normal job is unchanged -------------------------------------------------------------
async def test_a_normal_job_is_unchanged(emulator: EmulatorFactory, tmp_path: Path) -> None:
    async with emulator() as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="a cat", model="dall-e-2", n=3)
        counts = [len(update.images) async for update in job.updates()]
        assert counts == sorted(counts) and counts[-1] == 3  # images only ever land
        firsts = [await job.image(index) for index in range(3)]
        result = await job
        assert result.status == JobStatus.SUCCEEDED and result.images == tuple(firsts)
        assert [image.index for image in result.images] == [0, 1, 2]
        saved = await job.save(tmp_path)
        assert [s.index for s in saved] == [0, 1, 2]
        for s in saved:
            assert sha256(s.path.read_bytes()) == s.sha256
        assert client.stats.jobs_succeeded == 1 and client.stats.jobs_failed == 0
