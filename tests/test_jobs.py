"""ImageJob against the emulator over loopback: its state, and its stream of updates."""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from wujie_async import ImageJob, JobStatus, JobUpdate, ModerationRejectedError
from wujie_async.emulator import FaultConfig
from wujie_async.emulator._png import render_png

from .conftest import EmulatorFactory, make_client
from .hostile import scripted_gateway
from .test_poller_hostile import client_for

pytestmark = pytest.mark.anyio


async def collect(updates: AsyncIterator[JobUpdate]) -> list[JobUpdate]:
    return [update async for update in updates]


@pytest.mark.long
async def test_updates_follow_a_job_to_its_end(emulator: EmulatorFactory) -> None:
    async with emulator(time_scale=0.02) as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="a fox", model="gpt-image-1", n=3)
        updates = await asyncio.wait_for(collect(job.updates()), 30)
    first, last = updates[0], updates[-1]
    assert first.status is None and first.status_name == "pending" and not first.done
    assert last.done and last.status == JobStatus.SUCCEEDED and last.error is None
    assert last.progress == 100.0 and len(last.images) == 3
    assert [update.done for update in updates].count(True) == 1  # the end comes once, last
    assert any(u.status == JobStatus.GENERATING and 0 < u.progress < 100 for u in updates)
    # one update per change: no two in a row are the same
    for before, after in itertools.pairwise(updates):
        assert before != after
    # images only ever grow
    counts = [len(update.images) for update in updates]
    assert counts == sorted(counts)


async def test_progress_without_images_is_an_update_too(emulator: EmulatorFactory) -> None:
    async with emulator(time_scale=0.02) as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="a fox", model="dall-e-3")  # one image, at the end
        updates = await asyncio.wait_for(collect(job.updates()), 30)
    running = [u for u in updates if not u.done and u.status is not None]
    assert running and all(not u.images for u in running)


async def test_many_consumers_see_the_same_end_and_cost_no_extra_calls(
    emulator: EmulatorFactory,
) -> None:
    async with emulator(time_scale=0.02) as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="a fox", model="dall-e-2", n=2)
        streams = await asyncio.wait_for(
            asyncio.gather(*(collect(job.updates()) for _ in range(5))), 30
        )
        calls = client.stats.batch_calls
        reports = emu.stats()["requests"]["info"]
    ends = {stream[-1] for stream in streams}
    assert len(ends) == 1 and next(iter(ends)).done
    # the streams only read what the poller's calls brought: every call is the poller's own
    assert reports == calls


@pytest.mark.long
async def test_a_slow_consumer_sees_the_latest_state_not_a_backlog(
    emulator: EmulatorFactory,
) -> None:
    async with emulator(time_scale=0.02) as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="a fox", model="gpt-image-1", n=4)
        stream = job.updates()
        first = await anext(stream)
        assert not first.done
        await job.result(timeout=30)  # many changes happen while nobody reads
        second = await anext(stream)
        assert second.done and len(second.images) == 4  # the end, at once: changes merged
        with pytest.raises(StopAsyncIteration):
            await anext(stream)


async def test_the_last_update_of_a_failed_job_carries_its_error(
    emulator: EmulatorFactory,
) -> None:
    faults = FaultConfig(moderation_words=("forbidden",))
    async with emulator(faults=faults) as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="forbidden fruit", model="dall-e-2")
        updates = await asyncio.wait_for(collect(job.updates()), 30)
    assert updates[-1].done and isinstance(updates[-1].error, ModerationRejectedError)


async def test_updates_of_a_cancelled_job_end(emulator: EmulatorFactory) -> None:
    async with emulator(time_scale=1.0) as emu, make_client(emu) as client:
        job = await client.images.submit(prompt="a fox", model="dall-e-2")
        stream = job.updates()
        assert not (await anext(stream)).done
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        job.cancel()
        last = await asyncio.wait_for(waiting, 5)
        assert last.done and last.error is not None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "5", True])
async def test_a_wait_bound_that_is_not_a_number_of_seconds_is_refused_by_name(
    emulator: EmulatorFactory, bad: object
) -> None:
    # NaN made job.result(timeout=nan) and job.image(0, timeout=nan) wait for ever; a string
    # failed in float arithmetic; as_completed and aclose raised a bare ValueError.
    from wujie_async import InvalidRequestError

    async with emulator(time_scale=1.0, job_seconds=(30.0, 30.0)) as emu:
        client = make_client(emu)
        async with client:
            job = await client.images.submit(prompt="a fox", model="gpt-image-1")
            for wait in (
                job.result(timeout=bad),  # type: ignore[arg-type]
                job.image(0, timeout=bad),  # type: ignore[arg-type]
                anext(client.as_completed([job], timeout=bad)),  # type: ignore[arg-type]
            ):
                with pytest.raises(InvalidRequestError, match="timeout: must be a finite"):
                    await asyncio.wait_for(wait, 5)
            with pytest.raises(InvalidRequestError, match="timeout: must be a finite"):
                await client.aclose(drain=True, timeout=bad)  # type: ignore[arg-type]
            assert not job.done()  # nothing was closed by the refused call


async def test_a_wait_that_runs_out_says_which_job_and_that_it_goes_on(
    emulator: EmulatorFactory,
) -> None:
    # asyncio's TimeoutError has no message: a web handler that showed (or logged) the error
    # of job.result(timeout=...) said "" of a job that was paid and still running.
    from wujie_async import JobTimeoutError

    async with emulator(time_scale=1.0, job_seconds=(30.0, 30.0)) as emu:
        async with make_client(emu) as client:
            job = await client.images.submit(prompt="a fox", model="gpt-image-1")
            for wait, what in (
                (job.result(timeout=0.01), "its result"),
                (job.image(0, 0.01), "image 0"),
            ):
                with pytest.raises(TimeoutError) as ran_out:
                    await asyncio.wait_for(wait, 5)
                assert not isinstance(ran_out.value, JobTimeoutError)
                assert str(ran_out.value).startswith(
                    f"job {job.key}: {what} did not come within this wait's 0.01 s (the job goes on"
                ), str(ran_out.value)
            assert not job.done()
            # The job's own deadline is still its JobTimeoutError, not this wait's error.
            short = await client.images.submit(
                prompt="a fox", model="gpt-image-1", job_timeout=0.05
            )
            with pytest.raises(JobTimeoutError):
                await short.result(timeout=5)
            with pytest.raises(JobTimeoutError):
                await short.image(0, timeout=5)
            job.cancel()


async def test_a_job_settled_by_the_client_says_so_in_its_repr(emulator: EmulatorFactory) -> None:
    # Closed while its last report said pending: its repr said "pending" although awaiting
    # it raised JobCancelledError (a log line that misled whoever read it).
    async with emulator(time_scale=1.0, job_seconds=(30.0, 30.0)) as emu:
        async with make_client(emu) as client:
            job = await client.images.submit(prompt="a fox", model="gpt-image-1")
            assert repr(job).endswith("%>") and "ended" not in repr(job)
    assert job.done()
    assert repr(job).endswith("ended: JobCancelledError>"), repr(job)


async def test_an_inline_image_is_its_size_in_reprs_not_its_bytes() -> None:
    """A result or an update logged with an inline image (``b64_json``) was megabytes of
    base64 in one log line; the image's repr gives its size instead."""
    inline = base64.b64encode(render_png("K", 0, 256, 256) + bytes(300_000)).decode()

    def listed(keys: list[str]) -> list[dict[str, Any]]:
        return [{"key": key, "status": 4, "images": [{"b64_json": inline}]} for key in keys]

    async with scripted_gateway(listed) as gateway, client_for(gateway) as client:
        job = await client.images.submit(prompt="p", model="dall-e-2")
        result = await job
        assert result.images[0].b64_json == inline  # the bytes are all there
        for shown in (repr(result), repr(job.snapshot()), repr(job.images)):
            assert len(shown) < 500, shown[:200]
            assert f"b64_json=<{len(inline):,} characters>" in shown


async def test_a_signed_url_and_a_long_revised_prompt_stay_out_of_reprs() -> None:
    """A result or an update logged with its images put the CDN's signed token (the URL's
    query: anyone holding it fetches the image) and the whole revised prompt (the gateway's
    text, of any length) into the log line; the repr shows where the image is and the
    prompt's start."""
    url = "https://cdn.example/ai/K-0.png?X-Amz-Signature=s1gnedT0ken&Expires=9"
    prompt = "a fox " * 20_000

    def listed(keys: list[str]) -> list[dict[str, Any]]:
        image = {"url": url, "revised_prompt": prompt}
        return [{"key": key, "status": 4, "images": [image]} for key in keys]

    async with scripted_gateway(listed) as gateway, client_for(gateway) as client:
        job = await client.images.submit(prompt="p", model="dall-e-2")
        result = await job
        assert result.images[0].url == url and result.images[0].revised_prompt == prompt
        for shown in (repr(result), repr(job.snapshot()), repr(job.images)):
            assert "s1gnedT0ken" not in shown and "Expires" not in shown, shown[:300]
            assert "url='https://cdn.example/ai/K-0.png?<hidden>'" in shown, shown[:300]
            assert len(shown) < 800, shown[:300]


async def test_a_generate_cut_short_leaves_its_paid_job_tracked(emulator: EmulatorFactory) -> None:
    # What the library guide's web-app section says: a generate() whose caller's deadline ran
    # out returns no key, but its job (accepted, paid) goes on, tracked until it ends.
    async with emulator(time_scale=1.0, job_seconds=(2.0, 2.0)) as emu:
        async with make_client(emu) as client:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.8):  # the submit's reply comes well before
                    await client.images.generate(prompt="a fox", model="dall-e-2")
            [job] = client.jobs()
            result = await asyncio.wait_for(job.result(), 10)
    assert result.key == job.key and len(result.images) == 1
    assert emu.stats()["submits_accepted"] == 1


async def test_a_job_made_on_the_submit_path_is_the_job_its_constructor_makes() -> None:
    """The submit path makes its job without the class call (``ImageJob._made``): every slot
    set as ``ImageJob(...)`` sets it (a slot added to ``__init__`` and not to ``_made`` fails
    here, not when the job is read)."""
    loop = asyncio.get_running_loop()

    def forget(job: ImageJob) -> None:
        del job

    request = {"prompt": "a cat", "model": "gpt-image-1"}
    made = ImageJob._made("k" * 32, loop, 60.0, request, 2, forget, None)
    built = ImageJob("k" * 32, loop, deadline=60.0, request=request, n=2, on_cancel=forget)
    # Each has a future of its own, pending on the loop: every other slot is equal.
    slots = [name for name in ImageJob.__slots__ if name not in ("__weakref__", "_future")]
    assert [getattr(made, name) for name in slots] == [getattr(built, name) for name in slots]
    for job in (made, built):
        assert job._future.get_loop() is loop and not job._future.done()
        job._future.cancel()
