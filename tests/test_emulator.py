"""The emulator over real loopback sockets, driven by the minimal client in helpers.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from wujie_async import Credentials, WujieClient
from wujie_async.emulator import DOWNSCALE, Emulator, EmulatorConfig, FaultConfig

from .conftest import EmulatorFactory, make_client
from .helpers import (
    EDITS,
    GENERATIONS,
    INFO,
    SteppedClock,
    eventually,
    png_size,
    raw_get,
    raw_post,
    sign_header,
)

pytestmark = pytest.mark.anyio


def header_for(emu: Emulator, timestamp: int | None = None) -> str:
    return sign_header(emu.credentials.app_id, emu.credentials.private_key, timestamp)


async def submit(emu: Emulator, body: dict[str, Any]) -> dict[str, Any]:
    reply = await raw_post(emu.base_url, GENERATIONS, body, header=header_for(emu))
    assert reply.status == 200, reply.body
    return reply.json()  # type: ignore[no-any-return]


async def info(emu: Emulator, keys: list[str]) -> dict[str, Any]:
    reply = await raw_post(emu.base_url, INFO, keys, header=header_for(emu))
    assert reply.status == 200, reply.body
    return reply.json()  # type: ignore[no-any-return]


async def new_key(emu: Emulator, **fields: Any) -> str:
    body = {"prompt": "a red fox", "model": "gpt-image-1", **fields}
    reply = await submit(emu, body)
    assert reply["code"] == "200", reply
    return str(reply["data"]["key"])


# --- auth ---------------------------------------------------------------------------------------
async def test_a_correctly_signed_request_is_accepted(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        reply = await submit(emu, {"prompt": "fox", "model": "dall-e-2"})
        assert reply["code"] == "200" and len(reply["data"]["key"]) == 32


async def test_the_shared_vector_app_can_be_registered(
    emulator: EmulatorFactory, auth_vector: dict[str, Any]
) -> None:
    from wujie_async import Credentials

    async with emulator() as emu:
        emu.register(Credentials(auth_vector["app_id"], auth_vector["private_key_pem"]))
        header = sign_header(auth_vector["app_id"], auth_vector["private_key_pem"])
        reply = await raw_post(emu.base_url, INFO, [], header=header)
        assert reply.status == 200 and reply.json()["code"] == "200"
        # The vector's own header is signed for a fixed, long-past timestamp: stale.
        reply = await raw_post(emu.base_url, INFO, [], header=auth_vector["header"])
        assert reply.status == 401 and "too old" in reply.json()["message"]


def _forged(emu: Emulator) -> str:
    header = json.loads(header_for(emu))
    sign = bytearray(header["sign"].encode())
    sign[10] = ord("A") if sign[10] != ord("A") else ord("B")
    header["sign"] = sign.decode()
    return json.dumps(header)


def _other_app_original(emu: Emulator) -> str:
    header = json.loads(header_for(emu))
    header["original"] = json.dumps({"appId": "someoneelse", "timestamp": int(time.time())})
    return json.dumps(header)


@pytest.mark.parametrize(
    ("make_header", "reason"),
    [
        (lambda emu: None, "missing"),
        (lambda emu: "Bearer abc", "not a JSON object"),
        (lambda emu: "[1,2]", "not a JSON object"),
        (_forged, "does not verify"),
        (lambda emu: header_for(emu, int(time.time()) - 601), "too old"),
        (lambda emu: header_for(emu, int(time.time()) + 305), "future"),
        (lambda emu: sign_header("nobody", emu.credentials.private_key), "unknown appId"),
        (_other_app_original, "same appId"),
        (
            lambda emu: header_for(emu).replace('"secretKeyVersion":"1"', '"secretKeyVersion":"2"'),
            "secretKeyVersion",
        ),
    ],
)
async def test_bad_auth_gets_401_with_envelope(
    emulator: EmulatorFactory, make_header: Any, reason: str
) -> None:
    async with emulator() as emu:
        reply = await raw_post(
            emu.base_url, GENERATIONS, {"prompt": "x", "model": "dall-e-2"}, header=make_header(emu)
        )
        assert reply.status == 401
        body = reply.json()
        assert body["code"] == "401" and body["data"] is None
        assert reason in body["message"]
        assert emu.stats()["submits_accepted"] == 0


async def test_timestamp_window_edges_are_accepted(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        for offset in (-590, 290):
            reply = await raw_post(
                emu.base_url, INFO, [], header=header_for(emu, int(time.time()) + offset)
            )
            assert reply.status == 200, (offset, reply.body)


# --- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "gpt-image-1"}, "prompt"),
        ({"prompt": "x"}, "model"),
        ({"prompt": "x", "model": "dall-e-9"}, "model"),
        ({"prompt": "x", "model": "gpt-image-1", "n": 11}, "n"),
        ({"prompt": "x", "model": "gpt-image-1", "n": 0}, "n"),
        ({"prompt": "x", "model": "dall-e-3", "n": 2}, "n"),
        ({"prompt": "x", "model": "gpt-image-1", "quality": "hd"}, "quality"),
        ({"prompt": "x", "model": "dall-e-3", "quality": "high"}, "quality"),
        ({"prompt": "x", "model": "dall-e-2", "quality": "hd"}, "quality"),
        ({"prompt": "x", "model": "gpt-image-1", "size": "256x256"}, "size"),
        ({"prompt": "x", "model": "dall-e-2", "size": "1792x1024"}, "size"),
        ({"prompt": "x", "model": "dall-e-3", "size": "512x512"}, "size"),
        ({"prompt": "x", "model": "dall-e-3", "background": "opaque"}, "background"),
        ({"prompt": "x", "model": "gpt-image-1", "background": "pink"}, "background"),
        (
            {
                "prompt": "x",
                "model": "gpt-image-1",
                "background": "transparent",
                "output_format": "jpeg",
            },
            "background",
        ),
        ({"prompt": "x", "model": "gpt-image-1", "moderation": "high"}, "moderation"),
        ({"prompt": "x", "model": "gpt-image-1", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "model": "gpt-image-1", "output_compression": 50}, "output_compression"),
        (
            {
                "prompt": "x",
                "model": "gpt-image-1",
                "output_format": "jpeg",
                "output_compression": 101,
            },
            "output_compression",
        ),
        ({"prompt": "x", "model": "gpt-image-1", "style": "vivid"}, "style"),
        ({"prompt": "x", "model": "dall-e-3", "style": "loud"}, "style"),
    ],
)
async def test_each_rule_is_enforced_with_20010001_naming_the_field(
    emulator: EmulatorFactory, body: dict[str, Any], field: str
) -> None:
    async with emulator() as emu:
        reply = await submit(emu, body)
        assert reply["code"] == "20010001", reply
        assert f"{field}:" in reply["message"]
        assert emu.stats()["submits_accepted"] == 0


async def test_valid_requests_per_model_are_accepted(emulator: EmulatorFactory) -> None:
    bodies: list[dict[str, Any]] = [
        {
            "model": "gpt-image-1",
            "n": 10,
            "quality": "high",
            "size": "1536x1024",
            "background": "transparent",
            "output_format": "webp",
            "output_compression": 80,
            "moderation": "low",
        },
        {"model": "dall-e-2", "n": 3, "quality": "standard", "size": "256x256"},
        {"model": "dall-e-3", "quality": "hd", "size": "1792x1024", "style": "natural"},
    ]
    async with emulator() as emu:
        for body in bodies:
            assert (await submit(emu, {"prompt": "x", **body}))["code"] == "200", body
        assert emu.stats()["submits_accepted"] == 3


async def test_strict_regexps_knob_rejects_dall_e_values(emulator: EmulatorFactory) -> None:
    async with emulator(strict_regexps=True) as emu:
        reply = await submit(emu, {"prompt": "x", "model": "dall-e-3", "quality": "hd"})
        assert reply["code"] == "20010001" and "Validate[regexp" in reply["message"]


async def test_edit_rules(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        header = header_for(emu)
        reply = await raw_post(
            emu.base_url, EDITS, {"prompt": "x", "model": "gpt-image-1"}, header=header
        )
        assert reply.json()["code"] == "20010001" and "image:" in reply.json()["message"]
        two = {"prompt": "x", "model": "dall-e-2", "image": ["https://a/1.png", "https://a/2.png"]}
        reply = await raw_post(emu.base_url, EDITS, two, header=header)
        assert "exactly one" in reply.json()["message"]
        ok = {
            "prompt": "x",
            "model": "gpt-image-1",
            "image": ["https://a/1.png"],
            "mask": "https://a/m.png",
        }
        reply = await raw_post(emu.base_url, EDITS, ok, header=header)
        assert reply.json()["code"] == "200"


async def test_body_that_is_not_json_is_a_parameter_error(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        reply = await raw_post(
            emu.base_url, GENERATIONS, None, header=header_for(emu), raw_body=b"{oops"
        )
        assert reply.status == 200 and reply.json()["code"] == "20010001"


# --- jobs -----------------------------------------------------------------------------------------
@pytest.mark.long
async def test_job_lifecycle_follows_the_latency_model(emulator: EmulatorFactory) -> None:
    # Looks 20 ms apart on the emulator's clock (on the real one, a loaded host's look took
    # longer than the images' spacing, and no partial list was seen).
    clock = SteppedClock()
    async with emulator(time_scale=0.02, clock=clock) as emu:
        key = await new_key(emu, n=3)
        job = emu.gateway.store.jobs[key]
        assert (
            job.created_at
            < job.started_at
            < job.image_done_at[0]
            < job.image_done_at[2]
            == job.ends_at
        )
        seen: list[tuple[int, int, float]] = []
        while True:
            entry = (await info(emu, [key]))["data"]["list"][0]
            seen.append((entry["status"], len(entry["images"]), entry["complete_percent"]))
            if entry["status"] == 4:
                break
            assert emu.gateway.clock.now() < job.ends_at + 1.0, (
                "job did not finish within its timeline"
            )
            clock.advance(0.02)
        statuses = [s for s, _, _ in seen]
        assert statuses == sorted(statuses) and statuses[0] in (0, 1) and 1 in statuses
        # Images appear one by one while generating; progress never goes backwards.
        counts = [c for _, c, _ in seen]
        assert counts == sorted(counts) and counts[-1] == 3
        assert any(s == 1 and 0 < c < 3 for s, c, _ in seen), "no partial image list seen"
        assert [p for _, _, p in seen] == sorted(p for _, _, p in seen)
        assert seen[-1][2] == 100


async def test_expected_seconds_is_an_estimate_not_the_truth(emulator: EmulatorFactory) -> None:
    async with emulator(time_scale=1.0) as emu:
        key = await new_key(emu, n=2)
        entry = (await info(emu, [key]))["data"]["list"][0]
        job = emu.gateway.store.jobs[key]
        typical = 4.0 + 2 * 14.0  # TYPICAL_SECONDS for gpt-image-1, scale 1
        assert abs(entry["expected_seconds"] - typical) < 1.0
        assert abs((job.ends_at - job.created_at) - typical) > 0.01
        assert entry["status"] == 0 and entry["images"] == [] and entry["fail_message"] is None


async def test_images_are_real_pngs_at_the_downscaled_size(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        key = await new_key(emu, n=2, size="1536x1024")
        early = await raw_get(f"{emu.origin}/files/{key}/0.png")
        assert early.status == 404  # not generated yet
        await asyncio.sleep(emu.gateway.store.jobs[key].ends_at - emu.gateway.clock.now() + 0.01)
        entry = (await info(emu, [key]))["data"]["list"][0]
        urls = [image["url"] for image in entry["images"]]
        assert len(urls) == 2
        bodies = []
        for url in urls:
            assert url.startswith("http://127.0.0.1:")
            reply = await raw_get(url)
            assert reply.status == 200 and reply.headers["Content-Type"] == "image/png"
            assert png_size(reply.body) == (1536 // DOWNSCALE, 1024 // DOWNSCALE)
            bodies.append(reply.body)
        assert bodies[0] != bodies[1]
        assert (await raw_get(urls[0])).body == bodies[0]  # deterministic
        assert (await raw_get(f"{emu.origin}/files/{key}/2.png")).status == 404


async def test_batch_limit_and_unknown_keys(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        key = await new_key(emu)
        reply = await info(emu, [key] * 51)
        assert reply["code"] == "20010001" and "50" in reply["message"]
        reply = await info(emu, [key, "NOPE"] + ["X"] * 48)
        assert [entry["key"] for entry in reply["data"]["list"]] == [key]
        bad = await raw_post(emu.base_url, INFO, {"keys": [key]}, header=header_for(emu))
        assert bad.json()["code"] == "20010001"


async def test_keys_of_another_app_are_not_listed(emulator: EmulatorFactory) -> None:
    from wujie_async import Credentials

    other = Credentials("otherapp", Emulator().credentials.private_key)
    async with emulator() as emu:
        emu.register(other)
        key = await new_key(emu)
        header = sign_header("otherapp", other.private_key)
        reply = await raw_post(emu.base_url, INFO, [key], header=header)
        assert reply.json()["data"]["list"] == []


# --- faults ---------------------------------------------------------------------------------------
async def _many_infos(emu: Emulator, count: int) -> list[Any]:
    out: list[Any] = []
    header = header_for(emu)
    for _ in range(count):
        try:
            out.append(await raw_post(emu.base_url, INFO, [], header=header))
        except Exception as exc:  # a dropped connection surfaces as a client error
            out.append(exc)
    return out


@pytest.mark.parametrize(
    ("faults", "check"),
    [
        (FaultConfig(http_5xx=1.0), lambda r: r.status == 503 and r.json()["code"] == "500"),
        (
            FaultConfig(http_429=1.0, retry_after_s=3),
            lambda r: r.status == 429 and r.headers["Retry-After"] == "3",
        ),
        (
            FaultConfig(html_reply=1.0),
            lambda r: r.status == 200 and r.body.startswith(b"<!DOCTYPE html>"),
        ),
        (FaultConfig(drop_connection=1.0), lambda r: isinstance(r, Exception)),
    ],
)
async def test_request_fault_knobs(
    emulator: EmulatorFactory, faults: FaultConfig, check: Any
) -> None:
    async with emulator(faults=faults) as emu:
        replies = await _many_infos(emu, 5)
        assert all(check(r) for r in replies), replies


async def test_fault_probability_is_honoured(emulator: EmulatorFactory) -> None:
    async with emulator(faults=FaultConfig(http_5xx=0.3)) as emu:
        replies = await _many_infos(emu, 200)
        failed = sum(r.status == 503 for r in replies)
        assert 30 <= failed <= 90
        assert emu.stats()["faults"]["http_5xx"] == failed


async def test_burst_429_counts_down(emulator: EmulatorFactory) -> None:
    async with emulator(faults=FaultConfig(burst_429=3)) as emu:
        statuses = [r.status for r in await _many_infos(emu, 5)]
        assert statuses == [429, 429, 429, 200, 200]


async def test_slow_reply(emulator: EmulatorFactory) -> None:
    async with emulator(faults=FaultConfig(slow_reply=1.0, slow_reply_s=0.2)) as emu:
        started = time.monotonic()
        await _many_infos(emu, 1)
        assert time.monotonic() - started >= 0.2


async def test_business_error_and_drop_after_accept(emulator: EmulatorFactory) -> None:
    async with emulator(
        faults=FaultConfig(business_error=1.0, business_error_code="20110010")
    ) as emu:
        reply = await submit(emu, {"prompt": "x", "model": "dall-e-2"})
        assert reply["code"] == "20110010" and emu.stats()["submits_accepted"] == 0
    async with emulator(faults=FaultConfig(drop_after_accept=1.0)) as emu:
        with pytest.raises(Exception):  # noqa: B017 - any client-side connection error
            await submit(emu, {"prompt": "x", "model": "dall-e-2"})
        assert emu.stats()["submits_accepted"] == 1  # the job exists; its reply was lost


@pytest.mark.long
async def test_absent_duplicated_shuffled_and_unknown_status(emulator: EmulatorFactory) -> None:
    faults = FaultConfig(absent_jobs=1.0, absent_s=0.3, endpoints=frozenset())
    clock = SteppedClock()  # the first look within the 0.3 s, however slow the host
    async with emulator(time_scale=1.0, faults=faults, clock=clock) as emu:
        key = await new_key(emu)
        assert (await info(emu, [key]))["data"]["list"] == []
        clock.advance(0.35)
        assert len((await info(emu, [key]))["data"]["list"]) == 1
    faults = FaultConfig(duplicate_entries=1.0, shuffle_entries=True, unknown_status=1.0)
    async with emulator(time_scale=1.0, faults=FaultConfig()) as emu:
        keys = [await new_key(emu) for _ in range(20)]
        emu.set_faults(faults)
        listed = (await info(emu, keys))["data"]["list"]
        assert len(listed) == 40
        assert [e["key"] for e in listed[::2]] != keys  # shuffled
        assert {e["status"] for e in listed} == {2}


async def test_failing_and_moderated_jobs(emulator: EmulatorFactory) -> None:
    faults = FaultConfig(fail_jobs=1.0, moderation_words=("forbidden",), endpoints=frozenset())
    async with emulator(faults=faults) as emu:
        failing = await new_key(emu, n=2)
        moderated = await new_key(emu, prompt="a Forbidden thing")
        await asyncio.sleep(
            max(j.ends_at for j in emu.gateway.store.jobs.values()) - emu.gateway.clock.now() + 0.01
        )
        entries = {e["key"]: e for e in (await info(emu, [failing, moderated]))["data"]["list"]}
        assert entries[failing]["status"] == 3 and entries[failing]["images"] == []
        assert entries[failing]["fail_message"]["fail_message"]
        assert entries[moderated]["status"] == 5
        assert entries[moderated]["fail_message"]["fail_code"] == 20110001


@pytest.mark.long
async def test_rate_limit_per_app(emulator: EmulatorFactory) -> None:
    async with emulator(rate_limit_rps=5) as emu:
        header = header_for(emu)
        started = time.monotonic()
        replies = await asyncio.gather(
            *(raw_post(emu.base_url, INFO, [], header=header) for _ in range(12))
        )
        refilled = int((time.monotonic() - started) * 5) + 1
        statuses = [r.status for r in replies]
        assert 5 <= statuses.count(200) <= 5 + refilled
        assert statuses.count(429) == 12 - statuses.count(200)
        assert all(r.headers["Retry-After"] == "1" for r in replies if r.status == 429)
        await asyncio.sleep(0.5)
        assert (await _many_infos(emu, 1))[0].status == 200


async def test_faults_can_be_set_over_http(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.post(f"{emu.origin}/_emulator/faults", json={"http_5xx": 1.0}) as r:
                assert r.status == 200 and (await r.json())["http_5xx"] == 1.0
            async with session.post(f"{emu.origin}/_emulator/faults", json={"nope": 1}) as r:
                assert r.status == 400
            async with session.post(f"{emu.origin}/_emulator/faults", json={"fail_jobs": 5}) as r:
                assert r.status == 400 and "fail_jobs: a probability" in (await r.json())["error"]
        assert (await _many_infos(emu, 1))[0].status == 503


def test_settings_it_cannot_run_with_are_refused_before_it_starts() -> None:
    from wujie_async import InvalidRequestError

    cases: list[tuple[dict[str, Any], str]] = [
        ({"time_scale": "fast"}, "time_scale: expected a finite number, got 'fast'"),
        ({"time_scale": 0.0}, "time_scale: above 0"),
        ({"job_seconds": (30.0, 10.0)}, "job_seconds: LOW at most HIGH"),
        ({"queued_share": (0.2, 1.0)}, "queued_share: 0 <= LOW <= HIGH < 1"),
        ({"batch_cap": 0}, "batch_cap: above 0"),
        ({"finishing_s": -1.0}, "finishing_s: at least 0"),
        ({"faults": {"fail_jobs": 1.0}}, "faults: a FaultConfig, got dict"),
        ({"faults": FaultConfig(fail_jobs=5)}, "faults.fail_jobs: a probability, from 0 to 1"),
        ({"faults": FaultConfig(http_5xx="x")}, "faults.http_5xx: expected a finite number"),  # type: ignore[arg-type]
    ]
    for settings, says in cases:
        with pytest.raises(InvalidRequestError) as caught:
            Emulator(EmulatorConfig(**settings))
        assert says in str(caught.value), (settings, str(caught.value))
    with pytest.raises(InvalidRequestError, match="rate_limit_rps: above 0"):
        Emulator(EmulatorConfig(rate_limit_rps=0))  # a bucket that never fills
    # Below 0 where it means something; a plain set of endpoints, as a user writes one.
    Emulator(EmulatorConfig(faults=FaultConfig(endpoints={"info"})))  # type: ignore[arg-type]
    emu = Emulator(EmulatorConfig(seed=-3, stamp_skew=-2.0))
    with pytest.raises(InvalidRequestError, match="estimate_outliers: a probability"):
        emu.set_faults(FaultConfig(estimate_outliers=2.0))


# --- stats --------------------------------------------------------------------------------------
@pytest.mark.long
async def test_stats_counters_are_exact(emulator: EmulatorFactory) -> None:
    async with emulator() as emu:
        keys = [await new_key(emu, n=1) for _ in range(3)]
        await raw_post(emu.base_url, INFO, keys, header=None)  # 401, still a request
        await asyncio.sleep(
            max(j.ends_at for j in emu.gateway.store.jobs.values()) - emu.gateway.clock.now() + 0.01
        )
        await info(emu, keys[:2])
        await info(emu, keys)
        stats = (await raw_get(f"{emu.origin}/_emulator/stats")).json()
        assert stats["requests"] == {"generations": 3, "info": 3}
        assert stats["http_statuses"] == {"200": 5, "401": 1}
        assert stats["batch_sizes"] == [2, 3] and stats["batch_calls"] == 2
        assert stats["submits_accepted"] == 3
        assert stats["jobs_by_state"]["succeeded"] == 3
        timeline = stats["timelines"][keys[0]]
        assert timeline["created"] < timeline["done"] <= timeline["first_listed_done"]
        first = timeline["first_listed_done"]
        await info(emu, keys)
        assert emu.stats()["timelines"][keys[0]]["first_listed_done"] == first


# --- standalone -----------------------------------------------------------------------------------
@pytest.mark.long
@pytest.mark.parametrize(
    "entry", [["-m", "wujie_async.emulator"], ["-m", "wujie_async", "emulator"]]
)
async def test_standalone_emulator_writes_credentials(tmp_path: Path, entry: list[str]) -> None:
    creds_path = tmp_path / "creds.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *entry,
        "--port",
        "0",
        "--credentials-out",
        str(creds_path),
        "--time-scale",
        "0.01",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        creds = json.loads(creds_path.read_text())
        assert creds["base_url"].endswith("/wj-open/v1") and creds["base_url"] in line
        assert oct(creds_path.stat().st_mode & 0o777) == "0o600"
        header = sign_header(creds["app_id"], creds["private_key"])
        body = {"prompt": "x", "model": "dall-e-2"}
        reply = await raw_post(creds["base_url"], GENERATIONS, body, header=header)
        assert reply.json()["code"] == "200"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == 0


async def test_emulator_config_defaults_have_no_faults() -> None:
    config = EmulatorConfig()
    assert config.rate_limit_rps is None and not config.strict_regexps
    faults = config.faults
    assert not any(
        getattr(faults, name)
        for name in (
            "http_5xx",
            "http_429",
            "burst_429",
            "drop_connection",
            "drop_after_accept",
            "slow_reply",
            "html_reply",
            "business_error",
            "absent_jobs",
            "duplicate_entries",
            "shuffle_entries",
            "unknown_status",
            "fail_jobs",
            "moderation_words",
        )
    )


# --- the command line: one source of settings, env lines, safe files, clear errors ---------------
def _non_default(name: str, value: Any) -> Any:
    """A value for a FaultConfig field that differs from its default, by the default's type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 7
    if isinstance(value, float):
        return 0.25 if value != 0.25 else 0.5
    if isinstance(value, str):
        return value + "9"
    if isinstance(value, frozenset):
        return frozenset({"info"})
    if isinstance(value, tuple):
        return ("forbidden", "nope")
    if value is None:  # an optional number, off by default
        return 12.5
    raise AssertionError(f"FaultConfig.{name}: a field of a type the command line cannot set")


def _as_text(value: Any) -> str:
    if isinstance(value, frozenset | tuple):
        return ",".join(sorted(value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_every_fault_field_is_settable_from_the_command_line() -> None:
    import argparse
    import dataclasses

    from wujie_async.emulator import add_arguments, fault_config_from_pairs
    from wujie_async.emulator._server import config_from_args

    defaults = FaultConfig()
    wanted = {
        f.name: _non_default(f.name, getattr(defaults, f.name))
        for f in dataclasses.fields(FaultConfig)
    }
    argv = ["--time-scale", "0.5", "--rate-limit-rps", "3"]
    for name, value in wanted.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, _as_text(value)]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(argv))
    assert config.faults == FaultConfig(**wanted)
    assert config.time_scale == 0.5 and config.rate_limit_rps == 3
    # The key=value form (`--emulator-fault` in the main CLI) reads the same fields.
    pairs = [f"{name}={_as_text(value)}" for name, value in wanted.items()]
    assert fault_config_from_pairs(pairs) == FaultConfig(**wanted)
    # Old spellings still work, and repeated list flags add up.
    old = config_from_args(
        parser.parse_args(["--rate-limit", "2", "--moderation-word", "a", "--moderation-word", "b"])
    )
    assert old.rate_limit_rps == 2 and old.faults.moderation_words == ("a", "b")
    assert config_from_args(parser.parse_args([])) == EmulatorConfig()


def test_fault_pairs_name_the_field_and_the_rule() -> None:
    from wujie_async import InvalidRequestError
    from wujie_async.emulator import fault_config_from_mapping, fault_config_from_pairs

    with pytest.raises(InvalidRequestError) as info:
        fault_config_from_pairs(["burst_429=lots", "nope=1", "fail_jobs"])
    fields = [field for field, _ in info.value.violations]
    assert fields == ["burst_429", "nope", "fail_jobs"]
    assert "whole number" in info.value.violations[0][1]
    with pytest.raises(InvalidRequestError, match="finite"):
        fault_config_from_pairs(["http_5xx=nan"])
    assert fault_config_from_pairs(['endpoints=["info"]']).endpoints == frozenset({"info"})
    assert fault_config_from_mapping({"moderation_words": ["x"]}).moderation_words == ("x",)


def test_a_fault_in_a_whole_config_is_named_as_the_dataclass_names_it() -> None:
    # As JSON, a bad fault was named "fail_jobs"; given as FaultConfig, "faults.fail_jobs".
    from wujie_async import InvalidRequestError
    from wujie_async.emulator import EmulatorConfig, FaultConfig
    from wujie_async.emulator._options import check_config, emulator_config_from_json

    with pytest.raises(InvalidRequestError) as as_json:
        emulator_config_from_json({"faults": {"nope": 1}, "time_scale": "x"})
    assert [field for field, _ in as_json.value.violations] == ["faults.nope", "time_scale"]
    with pytest.raises(InvalidRequestError) as out_of_range:
        emulator_config_from_json({"faults": {"fail_jobs": 2}})
    assert out_of_range.value.field == "faults.fail_jobs"
    with pytest.raises(InvalidRequestError) as as_dataclass:
        check_config(EmulatorConfig(faults=FaultConfig(fail_jobs=2)))
    assert as_dataclass.value.field == "faults.fail_jobs"


async def _emulator_process(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wujie_async.emulator", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _exports(text: str) -> dict[str, str]:
    import shlex

    values = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        assert line.startswith("export "), line
        name, _, value = line.removeprefix("export ").partition("=")
        values[name] = shlex.split(value)[0]
    return values


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
    await asyncio.wait_for(proc.communicate(), 10)


@pytest.mark.long
async def test_print_env_says_url_port_and_time_scale_and_sets_the_burst() -> None:
    proc = await _emulator_process(
        "--port", "0", "--print-env", "--time-scale", "0.05",
        "--burst-429", "2", "--retry-after-s", "3", "--endpoints", "info",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 20)).decode() for _ in range(4)]
        banner = lines[0]
        env = _exports("".join(lines))
        assert set(env) == {"WUJIE_APP_ID", "WUJIE_PRIVATE_KEY", "WUJIE_BASE_URL"}
        port = env["WUJIE_BASE_URL"].split(":")[2].split("/")[0]
        assert banner.startswith("# ") and env["WUJIE_BASE_URL"] in banner
        assert f"port {port}" in banner and "time scale 0.05" in banner
        header = sign_header(env["WUJIE_APP_ID"], env["WUJIE_PRIVATE_KEY"])
        replies = [await raw_post(env["WUJIE_BASE_URL"], INFO, [], header=header) for _ in range(3)]
        assert [r.status for r in replies] == [429, 429, 200]
        assert replies[0].headers["Retry-After"] == "3"
        submit = await raw_post(
            env["WUJIE_BASE_URL"], GENERATIONS, {"prompt": "x", "model": "dall-e-2"}, header=header
        )
        assert submit.json()["code"] == "200"  # endpoints=info: submits are not faulted
    finally:
        await _stop(proc)


@pytest.mark.long
async def test_background_detaches_once_listening_and_prints_the_exports() -> None:
    proc = await _emulator_process("--port", "0", "--background", "--time-scale", "0.01")
    out, err = await asyncio.wait_for(proc.communicate(), 30)  # returns: nothing keeps the pipes
    assert proc.returncode == 0, err.decode()
    env = _exports(out.decode())
    pid = int(env["WUJIE_EMULATOR_PID"])
    try:
        header = sign_header(env["WUJIE_APP_ID"], env["WUJIE_PRIVATE_KEY"])
        body = {"prompt": "x", "model": "dall-e-2"}
        reply = await raw_post(env["WUJIE_BASE_URL"], GENERATIONS, body, header=header)
        assert reply.json()["code"] == "200"
        assert "time scale 0.01" in out.decode()
    finally:
        os.kill(pid, 15)
    for _ in range(100):  # it stops on SIGTERM
        try:
            await raw_post(env["WUJIE_BASE_URL"], INFO, [], header=None)
        except (OSError, aiohttp.ClientError):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the background emulator did not stop on SIGTERM")


@pytest.mark.long
async def test_served_on_every_address_it_prints_a_url_a_client_can_use(tmp_path: Path) -> None:
    # "0.0.0.0" is no address to connect to, and image URLs built from it were refused as
    # unspecified: the job was paid for and its image never saved.
    proc = await _emulator_process(
        "--host", "0.0.0.0", "--port", "0", "--background", "--time-scale", "0.01"
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    env = _exports(out.decode())
    try:
        assert env["WUJIE_BASE_URL"].startswith("http://127.0.0.1:"), env["WUJIE_BASE_URL"]
        credentials = Credentials(env["WUJIE_APP_ID"], env["WUJIE_PRIVATE_KEY"])
        async with WujieClient(credentials, base_url=env["WUJIE_BASE_URL"]) as client:
            job = await client.images.submit(prompt="x", model="dall-e-2")
            await asyncio.wait_for(job, 30)
            [saved] = await job.save(tmp_path)
        assert saved.path.stat().st_size == saved.bytes > 0
    finally:
        os.kill(int(env["WUJIE_EMULATOR_PID"]), 15)


@pytest.mark.long
@pytest.mark.parametrize(
    "entry", [["-m", "wujie_async.emulator"], ["-m", "wujie_async", "emulator"]]
)
async def test_a_port_in_use_is_one_line_and_exit_2(entry: list[str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *entry, "--port", str(port),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    message = err.decode()
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1, message
    assert f"port {port}" in message and "--port" in message


@pytest.mark.long
async def test_credentials_out_is_a_new_0600_file_and_never_follows_a_symlink(
    tmp_path: Path,
) -> None:
    existing = tmp_path / "creds.json"
    existing.write_text("old")
    existing.chmod(0o644)
    proc = await _emulator_process("--port", "0", "--credentials-out", str(existing))
    try:
        assert proc.stdout is not None
        banner = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert "wujie-async emulator serving" in banner
        assert oct(existing.stat().st_mode & 0o777) == "0o600"
        assert json.loads(existing.read_text())["base_url"] in banner
    finally:
        await _stop(proc)
    assert [p.name for p in tmp_path.iterdir()] == ["creds.json"]  # no temporary left

    target = tmp_path / "elsewhere.json"
    link = tmp_path / "link.json"
    link.symlink_to(target)
    proc = await _emulator_process("--port", "0", "--credentials-out", str(link))
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and "symlink" in err.decode() and "Traceback" not in err.decode()
    assert not target.exists() and link.is_symlink()


def test_credentials_files_named_in_the_readme_are_ignored_by_git() -> None:
    import fnmatch
    import re

    root = Path(__file__).resolve().parents[1]
    patterns = [
        line.strip() for line in (root / ".gitignore").read_text().splitlines() if line.strip()
    ]
    docs = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    text = "\n".join(path.read_text() for path in docs)
    names = set(re.findall(r"--credentials-out\s+([\w./-]+)", text))
    assert names, "the docs name no credentials file; drop this test"
    for name in names:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_every_emulator_setting_is_settable_from_the_command_line() -> None:
    import argparse
    import dataclasses

    from wujie_async.emulator import add_arguments
    from wujie_async.emulator._server import config_from_args

    argv = [
        "--time-scale", "0.5", "--seed", "3", "--rate-limit-rps", "9", "--strict-regexps",
        "--retain-finished-s", "30", "--job-seconds", "2,6", "--queued-share", "0,0.5",
        "--estimate-basis", "actual",
        "--no-progress-fields", "--estimate-rounding", "floor",
        "--estimate-while-queued", "generation", "--no-images-progressive",
        "--stamp-rounding", "floor", "--stamp-skew", "-1.5", "--end-tick", "0.5",
        "--progress-percent", "whole", "--finishing-s", "2", "--temporary-urls",
        "--done-unlisted-s", "1", "--batch-cap", "20", "--image-delivery", "b64_json",
        "--revised-prompts",
    ]  # fmt: skip
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(argv))
    wanted = EmulatorConfig(
        time_scale=0.5,
        seed=3,
        rate_limit_rps=9,
        strict_regexps=True,
        retain_finished_s=30,
        job_seconds=(2.0, 6.0),
        queued_share=(0.0, 0.5),
        estimate_basis="actual",
        progress_fields=False,
        estimate_rounding="floor",
        estimate_while_queued="generation",
        images_progressive=False,
        stamp_rounding="floor",
        stamp_skew=-1.5,
        end_tick=0.5,
        progress_percent="whole",
        finishing_s=2.0,
        temporary_urls=True,
        done_unlisted_s=1.0,
        batch_cap=20,
        image_delivery="b64_json",
        revised_prompts=True,
    )
    assert config == wanted
    settable = {f.name for f in dataclasses.fields(EmulatorConfig)} - {"faults"}
    assert {
        name for name in settable if getattr(wanted, name) == getattr(EmulatorConfig(), name)
    } == set()
    with pytest.raises(SystemExit):
        parser.parse_args(["--estimate-basis", "psychic"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--estimate-rounding", "sideways"])


def test_emulators_of_one_process_share_one_checked_key() -> None:
    # Loading a private key checks it (about 50 ms of CPU): a test run starts hundreds of
    # emulators, and each used to load the same generated key again.
    first, second = Emulator(), Emulator()
    assert first.credentials is second.credentials
    assert Emulator(app_id="another").credentials.app_id == "another"


@pytest.mark.parametrize(
    ("fault", "named"),
    [
        ({"endpoints": frozenset({"generation"})}, "endpoints"),  # a typo turned every fault off
        ({"http_5xx_status": 200}, "http_5xx_status"),  # a "5xx" fault that answers success
        ({"http_5xx_status": 404}, "http_5xx_status"),
        ({"html_status": 999}, "html_status"),
        ({"business_error_code": "200"}, "business_error_code"),  # success with data null
        ({"business_error_code": "abc"}, "business_error_code"),
    ],
)
def test_a_fault_setting_that_would_quietly_be_another_fault_is_refused(
    fault: dict[str, object], named: str
) -> None:
    from wujie_async import InvalidRequestError
    from wujie_async.emulator import EmulatorConfig, FaultConfig
    from wujie_async.emulator._options import check_config, fault_config_from_mapping

    with pytest.raises(InvalidRequestError) as info:
        check_config(EmulatorConfig(faults=FaultConfig(**fault)))  # type: ignore[arg-type]
    assert info.value.field == f"faults.{named}"
    as_json = {k: sorted(v) if isinstance(v, frozenset) else v for k, v in fault.items()}
    with pytest.raises(InvalidRequestError) as by_name:
        fault_config_from_mapping(as_json)  # the control endpoint's and the CLI's way in
    assert by_name.value.field == named


async def test_the_emulator_charges_what_its_guide_says(emulator: EmulatorFactory) -> None:
    """A budget test is written against the emulator's prices: the guide gives them."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "emulator.md").read_text()
    text = " ".join(guide.split())
    found = re.search(
        r"per image (\d+) for gpt-image-1, (\d+) for dall-e-3 and (\d+) for dall-e-2", text
    )
    assert found is not None, "the emulator guide gives no prices"
    models = ["gpt-image-1", "dall-e-3", "dall-e-2"]
    prices = dict(zip(models, map(int, found.groups()), strict=True))
    async with emulator() as emu, make_client(emu) as client:
        for model, price in prices.items():
            n = 1 if model == "dall-e-3" else 3
            job = await client.images.submit(prompt="a fox", model=model, n=n, size="1024x1024")
            await job
            assert job.points_charged == n * price, model


async def test_images_may_be_given_inline_with_revised_prompts(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """``image_delivery="b64_json"``: each listed image is the PNG its file would serve, inline
    (``url`` null), saved with the sha256 of those bytes; ``revised_prompts``: dall-e-3's
    images say how the prompt was rewritten, other models' do not."""
    import base64
    import hashlib

    async with (
        emulator(time_scale=0.01, image_delivery="b64_json", revised_prompts=True) as emu,
        make_client(emu) as client,
    ):
        three = await client.images.submit(prompt="a fox", model="dall-e-3")
        two = await client.images.submit(prompt="a cat", model="dall-e-2", n=2)
        done, other = await three, await two
        [image] = done.images
        assert image.url is None and image.b64_json is not None
        assert image.revised_prompt is not None and "a fox" in image.revised_prompt
        assert [i.revised_prompt for i in other.images] == [None, None]
        inline = base64.b64decode(image.b64_json)
        assert png_size(inline) == (1024 // DOWNSCALE, 1024 // DOWNSCALE)
        [saved] = await three.save(tmp_path)
        assert saved.path.read_bytes() == inline
        assert saved.sha256 == hashlib.sha256(inline).hexdigest()
        assert emu.stats()["requests"].get("files", 0) == 0  # nothing was downloaded


async def test_stale_copies_gaps_and_numbers_as_text_cost_no_job_and_no_image(
    emulator: EmulatorFactory, tmp_path: Path
) -> None:
    """A gateway listing a stale copy of every key (queued, no image) beside the fresh entry,
    in any order, leaving keys out of a reply now and then, and giving every number as text:
    every job still ends with all its images saved, at its price."""
    faults = FaultConfig(
        stale_duplicates=1.0, numbers_as_text=1.0, entries_missing=0.3, shuffle_entries=True
    )
    async with emulator(time_scale=0.01, faults=faults) as emu, make_client(emu) as client:
        jobs = [
            await client.images.submit(prompt=f"p{i}", model="gpt-image-1", n=1 + i % 3)
            for i in range(12)
        ]
        saved = [await job.save(tmp_path) for job in jobs]
        fired = emu.stats()["faults"]
    assert [len(images) for images in saved] == [1 + i % 3 for i in range(12)]
    assert client.stats.points_charged == 8 * sum(1 + i % 3 for i in range(12))
    assert fired["stale_duplicates"] > 0 and fired["numbers_as_text"] > 0, fired
    assert fired["entries_missing"] > 0, fired


async def test_a_reply_cut_mid_body_is_uncertain_for_a_submit_and_asked_again_for_a_poll(
    emulator: EmulatorFactory,
) -> None:
    """``cut_reply``: the headers and half the body, then a reset. A submit so answered was
    accepted (the emulator counts it) and is uncertain at the client; a batch call so answered
    is asked again, and the job still ends."""
    from wujie_async import SubmitUncertainError

    cut_submits = FaultConfig(cut_reply=1.0, endpoints=frozenset({"generations"}))
    async with emulator(time_scale=0.01, faults=cut_submits) as emu, make_client(emu) as client:
        with pytest.raises(SubmitUncertainError):
            await client.images.submit(prompt="p", model="dall-e-2")
        assert emu.stats()["submits_accepted"] == 1
        emu.set_faults(FaultConfig(cut_reply=1.0, endpoints=frozenset({"info"})))
        job = await client.images.submit(prompt="q", model="dall-e-2")
        await eventually(lambda: emu.stats()["faults"]["cut_reply"] >= 3)  # two polls cut
        assert not job.done()
        emu.set_faults(FaultConfig())
        assert len((await job).images) == 1
