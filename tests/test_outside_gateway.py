"""The library and the command line against a gateway written from API.md alone.

``tests/outside_gateway.py`` follows the wire contract but differs from the emulator wherever
the contract leaves room (see its docstring); these tests check that nothing hangs past its
deadline, nothing is lost or paid twice, and every failure is typed and names its cause.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from wujie_async import (
    JobFailedError,
    JobProtocolError,
    Limits,
    ModerationRejectedError,
    ParameterError,
    PollPolicy,
    ProtocolError,
    ResponseTooLargeError,
    SensitivePromptError,
    SubmitUncertainError,
    Timeouts,
    UnknownJobError,
    WujieClient,
    WujieError,
)
from wujie_async._image_fetch import NOT_FOUND_TRIES

from .cli_helpers import CLEAN_ENV, cli
from .conftest import INSTANT_RETRY
from .hostile import throwaway_credentials
from .outside_gateway import POLL, OutsideGateway, outside_gateway

pytestmark = pytest.mark.anyio


def client_for(gateway: OutsideGateway, **kwargs: Any) -> WujieClient:
    kwargs.setdefault("poll", POLL)
    kwargs.setdefault("retry", INSTANT_RETRY)
    kwargs.setdefault("timeouts", Timeouts(job=20, request=5, close=5))
    return WujieClient(throwaway_credentials(), base_url=gateway.base_url, **kwargs)


def reply(status: int, body: str) -> Callable[[web.Request], web.Response]:
    headers = {"Content-Type": "application/json;charset=UTF-8"}
    return lambda request: web.Response(status=status, body=body.encode(), headers=headers)


@pytest.mark.parametrize(
    ("message", "error", "said"),
    [
        ("null", SensitivePromptError, "prompt contains sensitive words (the gateway gave no"),
        ("12", ParameterError, "12"),
        ('{"zh":"参数错误"}', ParameterError, "参数错误"),
    ],
)
async def test_a_refusal_whose_message_is_not_text_is_still_a_refusal(
    message: str, error: type[WujieError], said: str
) -> None:
    # {"code":"20110001","message":null}: a serializer that writes every unset field. The
    # refusal read as "not an envelope", which a submit takes for "may have been accepted":
    # SubmitUncertainError, the line uncertain, never resent, its points held as spent.
    code = "20110001" if error is SensitivePromptError else "20010001"
    async with outside_gateway() as gateway, client_for(gateway) as client:
        gateway.submit_script.append(
            reply(200, f'{{"code":"{code}","message":{message},"data":null}}')
        )
        with pytest.raises(error) as info:
            await client.images.submit(prompt="normal fox", model="dall-e-2")
    assert isinstance(info.value, SensitivePromptError | ParameterError)
    assert info.value.code == code and said in str(info.value)
    assert sum(gateway.submits.values()) == 1


async def test_a_lock_race_whose_message_is_null_is_sent_again() -> None:
    # 20010018 is safe to resubmit; with a null message it was "may have been accepted".
    async with outside_gateway() as gateway, client_for(gateway) as client:
        gateway.submit_script.append(reply(200, '{"code":"20010018","message":null,"data":null}'))
        job = await client.images.submit(prompt="fast fox", model="dall-e-2")
        result = await job.result(timeout=10)
    assert len(result.images) == 1
    assert sum(gateway.submits.values()) == 2 and len(gateway.accepted) == 1


# Each plan's outcome: (error type or None for success, images). See outside_gateway.PLANS.
OUTCOMES: dict[str, tuple[type[WujieError] | None, int]] = {
    "normal": (None, 2),
    "fast": (None, 3),  # done before the first ask; numbers and cost as strings
    "late": (None, 1),  # left out of the replies for a while (within the grace)
    "types": (None, 4),  # png as octet-stream, jpeg, webp, a gzipped png
    "dupstale": (None, 1),  # a stale copy beside the fresh entry, in any order
    "oddnums": (None, 1),
    "placeholder": (None, 2),  # images without a URL while generating
    "costearly": (None, 1),  # the cost listed while generating only
    "inline": (None, 5),  # b64_json as data URLs, wrapped, URL-safe unpadded, padded by spaces
    "failmid": (JobFailedError, 0),  # escape codes and markup in the fail message
    "noresult": (JobFailedError, 0),
    "moderated": (ModerationRejectedError, 0),
    "malformed": (JobProtocolError, 0),
    "never": (UnknownJobError, 0),
}


@pytest.mark.long
async def test_every_job_ends_its_own_way_and_every_image_is_saved_whole(tmp_path: Path) -> None:
    async with outside_gateway() as gateway, client_for(gateway) as client:
        gateway.late_seconds = 0.6
        jobs = {
            plan: await client.images.submit(
                prompt=f"{plan} fox", model="gpt-image-1", n=max(1, images)
            )
            for plan, (_, images) in OUTCOMES.items()
        }
        snapshots = {plan: asyncio.create_task(_last_update(job)) for plan, job in jobs.items()}
        for plan, job in jobs.items():
            error, images = OUTCOMES[plan]
            if error is None:
                saved = await job.save(tmp_path)
                assert [image.index for image in saved] == list(range(images)), plan
                for image in saved:
                    assert image.sha256 == gateway.sha256_of(job.key, image.index), plan
                    assert image.path.stat().st_size == image.bytes
                assert job.points_charged is not None and job.points_charged > 0, plan
            else:
                with pytest.raises(error) as info:
                    await job.result(timeout=10)
                assert job.key in str(info.value), plan
                assert "\x1b" not in str(info.value) and "<" not in str(info.value), plan
        for plan, snapshot in snapshots.items():
            update = await snapshot
            assert update.done and (update.error is None) == (OUTCOMES[plan][0] is None), plan
        stats = client.stats
    assert sum(gateway.submits.values()) == len(OUTCOMES) == len(gateway.accepted)
    assert stats.jobs_outstanding == 0 and stats.jobs_succeeded == 9 and stats.jobs_failed == 5
    failed = jobs["failmid"].exception()
    assert isinstance(failed, JobFailedError) and failed.fail_message == "red bold 失败"
    assert str(failed).isprintable()


async def _last_update(job: Any) -> Any:
    last = None
    async for update in job.updates():
        last = update
    return last


async def test_an_image_not_on_its_cdn_yet_is_asked_for_again(tmp_path: Path) -> None:
    # Images saved as each lands: the gateway lists a URL whose first GET answers 404 (the
    # upload or the CDN's copy still under way), then 200. The paid image failed to save
    # ("image download refused | HTTP 404", the CLI's line "gone") on one 404.
    async with outside_gateway() as gateway, client_for(gateway) as client:
        job = await client.images.submit(prompt="trickle fox", model="gpt-image-1", n=4)
        first = await job.image(1)  # a "flaky" image, saved the moment it is listed
        saved = await client.download(first, tmp_path / "first.{ext}", key=job.key)
        assert saved.sha256 == gateway.sha256_of(job.key, 1)
        everything = await job.save(tmp_path)
    assert [image.sha256 for image in everything] == [
        gateway.sha256_of(job.key, index) for index in range(4)
    ]
    assert gateway.image_hits[f"flaky:{job.key}:1"] == 3  # 404, 200, and 200 for job.save()
    assert gateway.image_hits[f"flaky:{job.key}:3"] == 2


async def test_an_image_gone_for_good_gets_a_few_tries_then_its_404(tmp_path: Path) -> None:
    async with outside_gateway() as gateway, client_for(gateway) as client:
        job = await client.images.submit(prompt="expired fox", model="gpt-image-1", n=2)
        with pytest.raises(ProtocolError) as info:
            await job.save(tmp_path)
    assert str(info.value) == f"job {job.key}, image 0: image download refused | HTTP 404"
    assert gateway.image_hits["gone"] == NOT_FOUND_TRIES
    assert [path.name for path in tmp_path.iterdir()] == [f"{job.key}-1.png"]


async def test_replies_compressed_as_x_gzip_are_read() -> None:
    # "Content-Encoding: x-gzip", gzip's old name (RFC 9110: read it as gzip). aiohttp leaves
    # it compressed: the submit's reply was "not JSON", SubmitUncertainError, and the key of
    # the job the gateway had accepted (and charged) was never read.
    async with outside_gateway() as gateway, client_for(gateway) as client:
        gateway.style = "x-gzip"
        job = await client.images.submit(prompt="normal fox", model="dall-e-2")
        result = await job.result(timeout=10)
    assert result.key == gateway.accepted[0] and len(result.images) == 1
    assert sum(gateway.submits.values()) == 1


async def test_an_x_gzip_reply_is_inflated_within_the_reply_cap() -> None:
    # 1 MB of spaces inside the envelope: some 1 KB of x-gzip, over a 64 KB cap once inflated.
    body = b'{"code":"200","message":"' + b" " * 1_000_000 + b'","data":{"key":"K1"}}'
    headers = {"Content-Encoding": "x-gzip", "Content-Type": "application/json"}
    async with (
        outside_gateway() as gateway,
        client_for(gateway, limits=Limits(max_response_bytes=65_536)) as client,
    ):
        gateway.submit_script.append(
            lambda request: web.Response(body=gzip.compress(body), headers=headers)
        )
        with pytest.raises(SubmitUncertainError) as info:
            await client.images.submit(prompt="normal fox", model="dall-e-2")
    assert isinstance(info.value.__cause__, ResponseTooLargeError)
    assert "65536-byte cap" in str(info.value)


async def test_a_gateway_that_closes_after_each_reply_without_saying_so() -> None:
    # A server (or a proxy before it) that closes every connection after its reply, with no
    # "Connection: close": the next request on the pooled connection cannot be written. Read
    # as "no reply", every other submit was SubmitUncertainError (a line uncertain, never
    # resent), though none of them had reached the gateway.
    async with outside_gateway() as gateway, client_for(gateway) as client:
        gateway.style = "drop"
        jobs = [
            await client.images.submit(prompt=f"fast fox {index}", model="dall-e-2")
            for index in range(8)
        ]
        results = [await job.result(timeout=10) for job in jobs]
    assert [result.key for result in results] == gateway.accepted
    assert sum(gateway.submits.values()) == 8 == len(set(gateway.accepted))


# What a bulk line of each plan ends as, in the manifest.
BULK_OUTCOMES = {
    "normal": "saved",
    "fast": "saved",
    "late": "saved",
    "trickle": "saved",  # one image a 404 at its first GET
    "dupstale": "saved",
    "oddnums": "saved",
    "inline": "saved",
    "types": "saved",
    "failmid": "failed",
    "noresult": "failed",
    "moderated": "moderated",
}


@pytest.mark.long
async def test_bulk_against_the_outside_gateway(tmp_path: Path) -> None:
    plans = list(BULK_OUTCOMES) * 3
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": f"{plan} line {index}", "model": "gpt-image-1", "n": 2}) + "\n"
            for index, plan in enumerate(plans)
        )
    )
    out = tmp_path / "out"
    async with outside_gateway() as gateway:
        gateway.late_seconds = 1.0
        creds = throwaway_credentials()
        env = CLEAN_ENV | {
            "WUJIE_APP_ID": creds.app_id,
            "WUJIE_PRIVATE_KEY": creds.private_key,
            "WUJIE_BASE_URL": gateway.base_url,
        }
        code, stdout, err = await cli("bulk", str(rows), "-o", str(out), "--json", env=env)
        assert code == 1, err  # failed and moderated lines
        again, _, err_again = await cli("bulk", str(rows), "-o", str(out), "--json", env=env)
        assert again == 1, err_again
    assert sum(gateway.submits.values()) == len(plans) == len(gateway.accepted)  # none twice
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    ended: dict[int, set[str]] = {}
    for row in manifest:
        ended.setdefault(row["line"], set()).add(row["status"])
        if row["status"] == "saved":
            data = (out / row["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row["sha256"]
            assert gateway.sha256_of(row["key"], row["index"]) == row["sha256"]
        else:
            assert "error" in row and str(row["error"]).isprintable(), row
    assert {line: ended[line] for line in ended} == {
        index + 1: {BULK_OUTCOMES[plan]} for index, plan in enumerate(plans)
    }
    summary = json.loads(stdout)
    assert summary["outcomes"]["saved"] == 24 and summary["points"] == summary["points_total"]
    assert "\x1b" not in err and "<script>" not in err


@pytest.mark.long
async def test_an_estimate_stuck_at_one_second_is_found_out() -> None:
    # "expected_seconds": 1 for the whole job, as a gateway that clamps its estimate gives it
    # once a job overran. Asked again within a step each time, the figure was never found out:
    # every job but its model's lookout was asked about every min_interval to its end, never
    # backing off by its age (3 jobs of 150 s: 269 calls, a call every 0.5 s).
    policy = PollPolicy(
        first_poll_delay=0.05,
        min_interval=0.05,
        max_interval=1.0,
        age_fraction=0.5,
        max_estimate_wait=1.0,
        batch_fill_horizon=0.05,
        unknown_key_grace=2.0,
    )
    async with outside_gateway() as gateway, client_for(gateway, poll=policy) as client:
        gateway.stuck_seconds = 4.0
        jobs = [
            await client.images.submit(prompt=f"stuckestimate {index}", model="dall-e-2")
            for index in range(3)
        ]
        for job in jobs:
            await job.result(timeout=15)
    gaps = [later - earlier for earlier, later in itertools.pairwise(gateway.info_times)]
    assert gateway.info_calls <= 20, gaps  # 41 before; about 13 now
