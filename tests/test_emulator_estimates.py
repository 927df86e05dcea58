"""The emulator's estimate knobs, status -1 and optional progress fields, over loopback.

Driven by the independent signing client in helpers.py, not by wujie_async's own client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from wujie_async.emulator import Emulator, FaultConfig

from .conftest import EmulatorFactory
from .helpers import GENERATIONS, INFO, SteppedClock, raw_post, sign_header

pytestmark = pytest.mark.anyio

# Jobs of 10-30 s (time_scale 1): long enough that nothing ends while a test looks at it.
LONG = {"time_scale": 1.0, "job_seconds": (10.0, 30.0)}
PROGRESS_FIELDS = {"queue_before_num", "start_gen_time", "complete_time", "integral_cost"}


async def submit_many(emu: Emulator, count: int, **fields: Any) -> list[str]:
    header = sign_header(emu.credentials.app_id, emu.credentials.private_key)
    keys = []
    for index in range(count):
        body = {"prompt": f"fox {index}", "model": "gpt-image-1", **fields}
        reply = await raw_post(emu.base_url, GENERATIONS, body, header=header)
        assert reply.status == 200 and reply.json()["code"] == "200", reply.body
        keys.append(reply.json()["data"]["key"])
    return keys


async def entries(emu: Emulator, keys: list[str]) -> dict[str, dict[str, Any]]:
    header = sign_header(emu.credentials.app_id, emu.credentials.private_key)
    listed: dict[str, dict[str, Any]] = {}
    for start in range(0, len(keys), 50):
        reply = await raw_post(emu.base_url, INFO, keys[start : start + 50], header=header)
        assert reply.status == 200 and reply.json()["code"] == "200", reply.body
        listed.update((e["key"], e) for e in reply.json()["data"]["list"])
    assert set(listed) == set(keys)
    return listed


def estimate_factors(emu: Emulator, listed: dict[str, dict[str, Any]]) -> list[float]:
    """Each job's whole estimate over its true length (1.0 is an estimate that is right)."""
    now = emu.gateway.clock.now()
    factors = []
    for key, entry in listed.items():
        job = emu.gateway.store.jobs[key]
        factors.append(
            (entry["expected_seconds"] + now - job.created_at) / (job.ends_at - job.created_at)
        )
    return factors


async def wait_until_all_ended(emu: Emulator) -> None:
    last_end = max(job.ends_at for job in emu.gateway.store.jobs.values())
    await asyncio.sleep(max(0.0, last_end - emu.gateway.clock.now()) + 0.01)


async def test_job_seconds_draws_each_job_length_from_the_range(
    emulator: EmulatorFactory,
) -> None:
    async with emulator(**LONG) as emu:
        await submit_many(emu, 30)
        lengths = [job.ends_at - job.created_at for job in emu.gateway.store.jobs.values()]
        assert all(10.0 <= length <= 30.0 for length in lengths)
        assert max(lengths) - min(lengths) > 5.0  # spread over the range, not one value
        queued = [
            (job.started_at - job.created_at) / (job.ends_at - job.created_at)
            for job in emu.gateway.store.jobs.values()
        ]
        assert all(0.05 <= share <= 0.25 for share in queued), queued


async def test_queued_share_sets_how_much_of_each_job_is_queued(
    emulator: EmulatorFactory,
) -> None:
    async with emulator(**LONG, queued_share=(0.0, 0.0)) as emu:
        keys = await submit_many(emu, 10)
        assert all(job.started_at == job.created_at for job in emu.gateway.store.jobs.values())
        assert all(entry["status"] == 1 for entry in (await entries(emu, keys)).values())
    async with emulator(**LONG, queued_share=(0.5, 0.5)) as emu:
        await submit_many(emu, 10)
        for job in emu.gateway.store.jobs.values():
            span = job.ends_at - job.created_at
            assert job.started_at - job.created_at == pytest.approx(0.5 * span)


async def test_actual_basis_gives_an_estimate_that_is_right(emulator: EmulatorFactory) -> None:
    async with emulator(**LONG, estimate_basis="actual") as emu:
        keys = await submit_many(emu, 20)
        factors = estimate_factors(emu, await entries(emu, keys))
        assert all(f == pytest.approx(1.0, abs=0.01) for f in factors), factors


async def test_default_basis_is_the_typical_figure_not_the_truth(
    emulator: EmulatorFactory,
) -> None:
    async with emulator(**LONG) as emu:
        keys = await submit_many(emu, 20)
        listed = await entries(emu, keys)
        # The typical length of a 10-30 s job is 20 s, whatever each job really takes.
        assert all(abs(e["expected_seconds"] - 20.0) < 0.5 for e in listed.values())
        assert max(estimate_factors(emu, listed)) > 1.2


async def test_estimate_noise_spreads_each_estimate_within_the_band(
    emulator: EmulatorFactory,
) -> None:
    faults = FaultConfig(estimate_noise=0.5)
    async with emulator(**LONG, estimate_basis="actual", faults=faults) as emu:
        keys = await submit_many(emu, 60)
        first = estimate_factors(emu, await entries(emu, keys))
        assert all(0.49 <= f <= 1.51 for f in first), first
        assert min(first) < 0.8 and max(first) > 1.2  # actually noisy, both ways
        # Drawn once per job: asked again, each job's estimate is the same estimate.
        again = estimate_factors(emu, await entries(emu, keys))
        assert again == pytest.approx(first, abs=0.01)


async def test_estimate_bias_multiplies_every_estimate(emulator: EmulatorFactory) -> None:
    faults = FaultConfig(estimate_bias=2.0)
    async with emulator(**LONG, estimate_basis="actual", faults=faults) as emu:
        keys = await submit_many(emu, 20)
        factors = estimate_factors(emu, await entries(emu, keys))
        assert all(f == pytest.approx(2.0, abs=0.02) for f in factors), factors


async def test_estimate_outliers_tell_a_share_of_jobs_a_multiple_of_their_length(
    emulator: EmulatorFactory,
) -> None:
    faults = FaultConfig(estimate_outliers=0.25, estimate_outlier_factor=3.0)
    async with emulator(**LONG, seed=3, estimate_basis="actual", faults=faults) as emu:
        keys = await submit_many(emu, 60)
        factors = estimate_factors(emu, await entries(emu, keys))
        right = [f for f in factors if f == pytest.approx(1.0, abs=0.02)]
        told_3x = [f for f in factors if f == pytest.approx(3.0, abs=0.05)]
        assert len(right) + len(told_3x) == len(factors), factors
        assert 5 <= len(told_3x) <= 30, factors  # about a quarter of 60


@pytest.mark.long
async def test_estimate_constant_is_always_the_same_placeholder(
    emulator: EmulatorFactory,
) -> None:
    faults = FaultConfig(estimate_constant=30.0)
    # Jobs of 0.5-1.5 s: still running 50 ms after the first look, over soon after, on the
    # emulator's clock, which the test moves (on the real one, a loaded host's ten submits
    # took long enough for some jobs to end before the second look).
    clock = SteppedClock()
    async with emulator(
        time_scale=0.05, job_seconds=(10.0, 30.0), faults=faults, clock=clock
    ) as emu:
        keys = await submit_many(emu, 10)
        listed = await entries(emu, keys)
        assert {e["expected_seconds"] for e in listed.values()} == {30.0}
        clock.advance(0.05)  # time passes: a placeholder does not count down
        later = await entries(emu, keys)
        assert {e["status"] for e in later.values()} <= {0, 1}
        assert {e["expected_seconds"] for e in later.values()} == {30.0}
        clock.advance(max(job.ends_at for job in emu.gateway.store.jobs.values()) - clock() + 0.01)
        done = await entries(emu, keys)
        assert {e["status"] for e in done.values()} == {4}
        assert {e["expected_seconds"] for e in done.values()} == {0.0}


@pytest.mark.long
async def test_estimate_absent_omits_expected_seconds(emulator: EmulatorFactory) -> None:
    async with emulator(**LONG, faults=FaultConfig(estimate_absent=1.0)) as emu:
        keys = await submit_many(emu, 5)
        for entry in (await entries(emu, keys)).values():
            assert "expected_seconds" not in entry
            assert entry["status"] in (0, 1) and "complete_percent" in entry
    async with emulator(**LONG, faults=FaultConfig(estimate_absent=0.5)) as emu:
        keys = await submit_many(emu, 40)
        given = sum("expected_seconds" in e for e in (await entries(emu, keys)).values())
        assert 8 <= given <= 32  # a per-job probability, not all or nothing


async def test_estimate_faults_can_be_set_over_http_for_new_jobs(
    emulator: EmulatorFactory,
) -> None:
    async with emulator(**LONG) as emu:
        before = await submit_many(emu, 3)
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{emu.origin}/_emulator/faults", json={"estimate_constant": 7}) as r,
        ):
            assert r.status == 200 and (await r.json())["estimate_constant"] == 7
        after = await submit_many(emu, 3)
        listed = await entries(emu, before + after)
        assert {listed[k]["expected_seconds"] for k in after} == {7}
        assert all(listed[k]["expected_seconds"] > 9 for k in before)  # drawn at creation


async def test_status_minus_one_ends_a_job_without_a_result(emulator: EmulatorFactory) -> None:
    faults = FaultConfig(end_without_result=1.0, endpoints=frozenset())
    async with emulator(faults=faults) as emu:
        keys = await submit_many(emu, 3, n=2)
        await wait_until_all_ended(emu)
        for entry in (await entries(emu, keys)).values():
            assert entry["status"] == -1
            assert entry["images"] == [] and entry["fail_message"] is None
            assert entry["expected_seconds"] == 0.0
            assert entry["integral_cost"] == 0  # nothing delivered, nothing charged
        stats = emu.stats()
        assert stats["jobs_by_state"]["ended_without_a_result"] == 3
        assert all(t["first_listed_done"] is not None for t in stats["timelines"].values())


async def test_end_without_result_is_a_per_job_probability(emulator: EmulatorFactory) -> None:
    async with emulator(faults=FaultConfig(end_without_result=0.5)) as emu:
        keys = await submit_many(emu, 40)
        await wait_until_all_ended(emu)
        statuses = [e["status"] for e in (await entries(emu, keys)).values()]
        assert set(statuses) == {-1, 4} and 8 <= statuses.count(-1) <= 32


@pytest.mark.long
async def test_progress_fields_appear_once_known(emulator: EmulatorFactory) -> None:
    async with emulator(**LONG) as emu:
        keys = await submit_many(emu, 20)
        listed = await entries(emu, keys)
        jobs = emu.gateway.store.jobs
        queued = [k for k, e in listed.items() if e["status"] == 0]
        assert len(queued) >= 10  # 1.5-7.5 s of queue each: all still queued
        now = emu.gateway.clock.now()
        for key in queued:
            entry = listed[key]
            assert "start_gen_time" not in entry and "complete_time" not in entry
            assert "integral_cost" not in entry
            # Jobs ahead: the other queued jobs that start first.
            ahead = sum(now < jobs[k].started_at < jobs[key].started_at for k in keys)
            assert entry["queue_before_num"] == ahead
        assert sorted(listed[k]["queue_before_num"] for k in queued) == list(range(len(queued)))
    async with emulator(time_scale=0.01, job_seconds=(10.0, 30.0)) as emu:
        keys = await submit_many(emu, 5, n=2)
        await wait_until_all_ended(emu)
        for key, entry in (await entries(emu, keys)).items():
            job = emu.gateway.store.jobs[key]
            unix = emu.gateway.clock.unix  # the wire carries unix seconds, jobs clock readings
            assert entry["status"] == 4 and "queue_before_num" not in entry
            assert entry["start_gen_time"] == pytest.approx(unix(job.started_at), abs=0.001)
            assert entry["complete_time"] == pytest.approx(unix(job.ends_at), abs=0.001)
            assert unix(job.created_at) < entry["start_gen_time"] < entry["complete_time"]
            assert abs(entry["complete_time"] - time.time()) < 60  # unix seconds, not loop time
            assert entry["integral_cost"] == 16  # 2 gpt-image-1 images at 8 points


async def test_progress_fields_can_be_switched_off(emulator: EmulatorFactory) -> None:
    async with emulator(progress_fields=False) as emu:
        keys = await submit_many(emu, 3)
        assert not any(PROGRESS_FIELDS & set(e) for e in (await entries(emu, keys)).values())
        await wait_until_all_ended(emu)
        assert not any(PROGRESS_FIELDS & set(e) for e in (await entries(emu, keys)).values())


# --- how estimates and images are reported: the settings a gateway may differ in -------------
@pytest.mark.long
async def test_estimates_in_whole_seconds(emulator: EmulatorFactory) -> None:
    checks: dict[str, Callable[[float, float], bool]] = {
        # ``exact`` is read just after the reply: a few tens of ms later at most.
        "floor": lambda value, exact: value - 0.1 <= exact < value + 1,
        "ceil": lambda value, exact: value - 1.1 < exact <= value,
        "round": lambda value, exact: abs(value - exact) <= 0.6,
    }
    for rounding, check in checks.items():
        async with emulator(**LONG, estimate_basis="actual", estimate_rounding=rounding) as emu:
            keys = await submit_many(emu, 10)
            listed = await entries(emu, keys)
            now = emu.gateway.clock.now()
            for key, entry in listed.items():
                value = entry["expected_seconds"]
                exact = emu.gateway.store.jobs[key].ends_at - now
                assert value == int(value) and check(value, exact), (rounding, value, exact)


async def test_end_tick_records_each_end_at_the_next_tick(emulator: EmulatorFactory) -> None:
    # A gateway whose workers report on a timer: the estimate counts down to the end the job
    # would have had, and the end comes at the next tick, up to a tick later.
    async with emulator(**LONG, estimate_basis="actual", end_tick=2.0) as emu:
        keys = await submit_many(emu, 20)
        listed = await entries(emu, keys)
        now = emu.gateway.clock.now()
        lates = []
        for key, entry in listed.items():
            job = emu.gateway.store.jobs[key]
            assert job.ends_at / 2.0 == pytest.approx(round(job.ends_at / 2.0)), job.ends_at
            late = job.ends_at - (now + entry["expected_seconds"])
            # Up to a tick, give or take the estimate's rounding (to 10 ms).
            assert -0.05 <= late <= 2.0 + 0.01, late
            lates.append(late)
        assert max(lates) - min(lates) > 0.5  # spread over the tick, not one value


@pytest.mark.long
async def test_an_estimate_may_leave_the_queue_out_or_be_absent_while_queued(
    emulator: EmulatorFactory,
) -> None:
    settings = {**LONG, "estimate_basis": "actual"}
    async with emulator(**settings, estimate_while_queued="generation") as emu:
        keys = await submit_many(emu, 10)
        now = emu.gateway.clock.now()
        for key, entry in (await entries(emu, keys)).items():
            job = emu.gateway.store.jobs[key]
            assert entry["status"] == 0  # every job still queued, at time_scale 1
            assert entry["expected_seconds"] == pytest.approx(
                job.ends_at - job.started_at, abs=0.01
            )
            assert entry["expected_seconds"] < job.ends_at - now  # the queue is left out
    for what, expected in (("absent", None), ("zero", 0.0)):
        async with emulator(**settings, estimate_while_queued=what) as emu:
            keys = await submit_many(emu, 5)
            for entry in (await entries(emu, keys)).values():
                assert entry.get("expected_seconds") == expected


@pytest.mark.long
async def test_images_may_be_listed_only_once_the_job_ends(emulator: EmulatorFactory) -> None:
    async with emulator(time_scale=0.02, images_progressive=False) as emu:
        [key] = await submit_many(emu, 1, n=4)
        job = emu.gateway.store.jobs[key]
        seen: list[int] = []
        while not seen or seen[-1] < 4:
            entry = (await entries(emu, [key]))[key]
            seen.append(len(entry["images"]))
            assert entry["status"] == 4 or not entry["images"]
            await asyncio.sleep(0.01)
        assert set(seen) <= {0, 4} and emu.gateway.clock.now() >= job.ends_at


async def test_progress_percent_is_given_as_configured(emulator: EmulatorFactory) -> None:
    async with emulator(**LONG, progress_percent="absent") as emu:
        keys = await submit_many(emu, 3, n=4)
        for entry in (await entries(emu, keys)).values():
            assert "complete_percent" not in entry
        job = emu.gateway.store.jobs[keys[0]]
    start, images = job.started_at, job.image_done_at
    assert len(images) == 4 and images[0] < images[1]
    span = images[-1] - start
    at = start + 0.333 * span  # a third of the generation time, before the second image
    assert job.percent_at(at, "time") == 33.3
    assert job.percent_at(at, "whole") == 33.0
    assert job.percent_at(at - 0.2 * span, "whole") == 13.0
    done = sum(1 for image in images if image <= at)
    assert job.percent_at(at, "images") == 25.0 * done
    assert job.percent_at(images[1], "images") == 50.0  # steps only as images land
    assert job.percent_at(start - 1.0, "time") == job.percent_at(start - 1.0, "images") == 0.0
    assert job.percent_at(at, "absent") is None
    # Uneven growth: fast and then slowly, or slowly and then fast (a quarter of the time).
    quarter = start + 0.25 * span
    assert job.percent_at(quarter, "sqrt") == 50.0
    # (Squared, a quarter is 6.25: a rounding tie that the loop clock's last bit decides.)
    assert job.percent_at(start + 0.3 * span, "squared") == 9.0
    assert job.percent_at(quarter, "offset") == 32.5  # 10% at the start, then evenly
    assert job.percent_at(images[-1], "sqrt") == job.percent_at(images[-1], "squared") == 100.0


async def test_images_may_be_listed_at_temporary_urls_before_a_late_final_listing(
    emulator: EmulatorFactory,
) -> None:
    """``finishing_s``, ``temporary_urls`` and ``done_unlisted_s``: images listed at temporary
    URLs while the job runs on after its last image, the cost only at the end, done reports
    without images for a moment, then the final URLs; a temporary URL expires with the job."""
    settings = {"finishing_s": 20.0, "temporary_urls": True, "done_unlisted_s": 10.0}
    async with emulator(time_scale=0.02, **settings) as emu, aiohttp.ClientSession() as http:
        [key] = await submit_many(emu, 1, n=2)
        job = emu.gateway.store.jobs[key]
        assert job.ends_at == pytest.approx(job.image_done_at[-1] + 0.4)
        seen: list[tuple[int, int, bool, bool]] = []
        temporary: list[str] = []
        while True:
            entry = (await entries(emu, [key]))[key]
            urls = [image["url"] for image in entry["images"]]
            temporary += [url for url in urls if "/files/tmp/" in url]
            seen.append(
                (
                    entry["status"],
                    len(urls),
                    "/files/tmp/" in "".join(urls),
                    "integral_cost" in entry,
                )
            )
            if entry["status"] == 4 and urls:
                break
            await asyncio.sleep(0.01)
        async with http.get(temporary[-1]) as expired:
            assert expired.status == 404
        async with http.get(urls[0]) as final:
            assert final.status == 200
    running = [s for s in seen if s[0] == 1 and s[1] == 2]
    assert running and all(tmp and not cost for _, _, tmp, cost in running)
    assert (4, 0, False, True) in seen  # done, the cost given, no image listed yet
    assert seen[-1] == (4, 2, False, True)  # then the final URLs
