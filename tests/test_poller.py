"""The batching poller at its default PollPolicy against gateways that report estimates their
own way: the emulator over loopback, on a fast-forwarding loop clock (a burst of "10-30 s"
jobs takes the CPU time of its calls). Asks per key are counted from the emulator's own record
of every batch call.

On the fake clock the gateway's ``complete_time`` cannot be placed on the client's clock (the
wall clock does not move with the loop's), so these runs are also the case of a gateway that
gives no usable end time: the hard case for learning when estimates are right.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import Counter
from typing import Any
from unittest import mock

import anyio
import pytest

from wujie_async import ImageJob, JobTimeoutError, Limits, PollPolicy, Timeouts, WujieClient
from wujie_async._poller import BatchPoller
from wujie_async._schedule_tuning import TUNING
from wujie_async._tracked import _new_tracked, _Tracked
from wujie_async.emulator import FaultConfig

from .conftest import EmulatorFactory, make_client, open_transport

pytestmark = [pytest.mark.anyio, pytest.mark.fake_clock]

JOBS = 200


async def burst(
    emulator: EmulatorFactory,
    *,
    jobs: int = JOBS,
    job_seconds: tuple[float, float] = (10, 30),
    **settings: Any,
) -> tuple[float, list[float]]:
    """(mean asks per key, each job's lateness in seconds, sorted) of a burst of ``jobs`` at
    the default policy.

    Wall time follows the fast-forwarding loop clock, as it follows a real one, so the
    gateway's unix stamps (``complete_time``) mean to the client what they say."""
    loop = asyncio.get_running_loop()
    offset = time.time() - loop.time()
    with mock.patch.object(time, "time", lambda: loop.time() + offset):
        return await _burst(emulator, jobs, job_seconds, **settings)


async def _burst(
    emulator: EmulatorFactory, count: int, job_seconds: tuple[float, float], **settings: Any
) -> tuple[float, list[float]]:
    async with (
        emulator(
            time_scale=1.0,
            seed=5,
            job_seconds=job_seconds,
            **{"estimate_basis": "actual", **settings},
        ) as emu,
        WujieClient(emu.credentials, base_url=emu.base_url, poll=PollPolicy()) as client,
    ):
        jobs = await asyncio.gather(
            *(client.images.submit(prompt=f"p{i}", model="gpt-image-1") for i in range(count))
        )
        for job in jobs:
            await job
        stats = emu.stats()
    asks = Counter(key for call in stats["batch_keys"] for key in call)
    late = sorted(t["first_listed_done"] - t["done"] for t in stats["timelines"].values())
    return statistics.mean(asks[job.key] for job in jobs), late


# While a model's window is unlearned its first jobs are scouts, asked every max_interval
# until their window opens: up to three asks more each in these bursts of 10-30 s jobs, the
# price of finding out early a gateway whose estimates run long (the test after this one).
SCOUT_ASKS = TUNING.scouts * 3 / JOBS
# Until a job of the model has ended, the one expected to end first (a 10 s job here) is asked
# every min_interval: about 20 asks in all, the price of seeing the first end at once however
# long the estimates run.
LOOKOUT_ASKS = 10.0 / PollPolicy().min_interval / JOBS


# Once a model's first figures are seen counting down (each job's check, ``Checks``), the
# jobs still waiting for their check go straight to their window: about 2.4 asks per key for
# right estimates in this burst, 3.15 with a check for every job before.
@pytest.mark.parametrize(
    ("settings", "most_asks"),
    [
        pytest.param({}, 2.25, id="right estimates"),
        pytest.param({"estimate_while_queued": "generation"}, 3.0, id="countdown from start"),
        pytest.param({"estimate_while_queued": "absent"}, 3.0, id="none while queued"),
        pytest.param({"estimate_while_queued": "zero"}, 3.0, id="zero while queued"),
        pytest.param({"images_progressive": False}, 2.25, id="images at the end"),
        # Whole seconds cost more: the next test.
        pytest.param({"estimate_rounding": "floor"}, 3.3, id="whole seconds, rounded down"),
        # Rounded to the nearest, as rounded down: rounding is learned in seconds. Learned
        # relative to each job's length, the half second of a 10 s job opened a 30 s job's
        # window 1.5 s early (4.2 asks per key here).
        pytest.param({"estimate_rounding": "round"}, 3.3, id="whole seconds, rounded"),
        # End stamps that say a job ended before it did must not teach that right estimates
        # end early (7.4, 8.3 and 14.3 asks per key here once; 2.4, 3.6 and 3.6 now).
        pytest.param({"stamp_rounding": "floor"}, 2.25, id="complete_time in whole seconds"),
        pytest.param({"stamp_skew": -1.0}, 3.5, id="gateway clock 1 s behind"),
        pytest.param({"stamp_skew": -3.0}, 3.5, id="gateway clock 3 s behind"),
        pytest.param({"stamp_skew": 3.0}, 2.25, id="gateway clock 3 s ahead"),
        # Every job ends up to a second after its estimate, whatever its length: learned in
        # seconds, as whole seconds rounded down (9.0 asks per key here when learned relative
        # to each job's length: a 10 s job's second opened a 30 s job's window 3 s early).
        # (The jobs' order of creation follows the sockets' order under load, and with it each
        # job's draws: 3.44-3.68 over twelve bursts here, 3.87 once in a loaded full run.)
        pytest.param({"end_tick": 1.0}, 3.75, id="ends recorded on a 1 s tick"),
    ],
)
async def test_asks_per_key_hold_across_gateways(
    emulator: EmulatorFactory, settings: dict[str, Any], most_asks: float
) -> None:
    asks, late = await burst(emulator, **settings)
    assert asks <= most_asks + SCOUT_ASKS + LOOKOUT_ASKS, asks
    assert late[-1] <= 1.0 + PollPolicy().min_interval, late[-1]


# An estimate in whole seconds places the end anywhere in a second after the figure (rounded
# down), around it, or before it (rounded up), and the gateway may give no end stamp to learn
# the rounding from. Each job is still seen ended within about min_interval, as polling each key
# every min_interval would: before, the window opened a quarter second after the figure and was
# learned only from the ends seen after it (p99 0.6 s rounded down, 0.74 s rounded, 1.2 s
# rounded up; 1.1 s and 1.6 s without end stamps). At most four asks per key, lookout and
# scouts included, whatever the rounding: rounding is learned in seconds, not relative to each
# job's length (rounded up, a 10 s job's second opened a 30 s job's window 3 s early: 5.0 asks
# per key here; to the nearest 4.25; without end stamps 4.1 and 3.8).
@pytest.mark.parametrize("stamps", [True, False], ids=["complete_time", "no complete_time"])
@pytest.mark.parametrize("rounding", ["floor", "round", "ceil"])
async def test_whole_second_estimates_are_seen_within_min_interval_of_the_end(
    emulator: EmulatorFactory, rounding: str, stamps: bool
) -> None:
    asks, late = await burst(emulator, estimate_rounding=rounding, progress_fields=stamps)
    assert late[int(len(late) * 0.99) - 1] <= PollPolicy().min_interval + 0.05, late[-5:]
    assert asks <= 4.0, asks


async def test_a_learned_whole_second_window_does_not_creep_later(
    emulator: EmulatorFactory,
) -> None:
    # Rounded to the nearest, no end stamps, a burst long enough that most jobs are asked by
    # the learned window: an end before the window's first ask proves only that it came that
    # early, and a window learned from such ends alone crept later (p99 0.82 s here). One job
    # in TUNING.sentinels asks a second early and sees the early ends close. (Without end
    # stamps the window opens a quarter step earlier than the earliest ends seen, where they
    # came on average: 3.0 asks per key, 2.9 before.)
    asks, late = await burst(emulator, jobs=2000, estimate_rounding="round", progress_fields=False)
    assert late[int(len(late) * 0.99) - 1] <= PollPolicy().min_interval + 0.05, late[-5:]
    assert asks <= 3.1, asks


@pytest.mark.parametrize("bias", [1.2, 1.5, 3.0, 5.0])
async def test_estimates_that_run_long_are_seen_within_min_interval_of_the_end(
    emulator: EmulatorFactory, bias: float
) -> None:
    # Every estimate 1.2 to 5 times the job's length, counting down as a right one would: the
    # schedule cannot tell it from a right one until a job ends. Waiting for the predicted
    # ends, half the jobs were seen 13 s (34 s) or more after they ended; with scouts alone,
    # the jobs that ended before eight scouts had were seen 2 to 11 s late (p99). The lookout
    # sees the first end at once, and that one end opens every other window as early.
    asks, late = await burst(emulator, faults=FaultConfig(estimate_bias=bias))
    assert late[int(len(late) * 0.99) - 1] <= PollPolicy().min_interval + 0.05, late[-5:]
    assert asks <= 3.0 + SCOUT_ASKS + LOOKOUT_ASKS, asks


# Right estimates but for one job in 20, told three times its length, with or without a queue
# before generation: each such job is seen by the end its progress allows. Without a queue they
# were seen when their estimates ran out (up to 40 s late); with one, at the bound a single
# reading set (p99 2.8 s late).
@pytest.mark.parametrize("queued", [(0.05, 0.25), (0.0, 0.0)], ids=["queued", "no queue"])
async def test_a_few_jobs_told_far_too_long_are_seen_within_min_interval_of_the_end(
    emulator: EmulatorFactory, queued: tuple[float, float]
) -> None:
    faults = FaultConfig(estimate_outliers=0.05)
    asks, late = await burst(emulator, faults=faults, queued_share=queued)
    assert late[int(len(late) * 0.99) - 1] <= PollPolicy().min_interval + 0.05, late[-5:]
    assert asks <= 2.6 + SCOUT_ASKS + LOOKOUT_ASKS, asks


# A gateway that gives no estimate at all, only complete_percent: a job's seconds left are told
# by how fast its progress grows (29 asks per key here before, asked by age alone, p99 0.77 s).
# In tenths of a percent the rate is known a second into generation; in whole percents only
# about a third of the way. A progress that moves only as images land (one here: not at all)
# tells nothing, and the job is asked by its age, as before.
@pytest.mark.parametrize(
    ("progress", "most_asks", "p99"),
    [
        pytest.param("time", 6.5, PollPolicy().min_interval, id="tenths of a percent"),
        # Whole percents: p99 0.48-0.55 s, as the readings' floors fall (the loop clock's
        # start shifts them a hair from run to run).
        pytest.param("whole", 18.0, PollPolicy().min_interval + 0.1, id="whole percents"),
        pytest.param("images", 32.0, 1.0, id="by images"),
    ],
)
async def test_without_estimates_the_end_is_told_by_the_progress(
    emulator: EmulatorFactory, progress: str, most_asks: float, p99: float
) -> None:
    asks, late = await burst(
        emulator, faults=FaultConfig(estimate_absent=1.0), progress_percent=progress
    )
    assert late[int(len(late) * 0.99) - 1] <= p99 + 0.05, late[-5:]
    assert asks <= most_asks, asks


# Estimates that are wrong, with complete_percent growing with time: once the model's jobs
# end closer to what their progress told (or every job is told the same figure, which says
# nothing of any job), each job goes by its progress as soon as it tells. Asks per key here
# before, by the estimates' learned windows alone: 19.9, 21.5, 25 and 25.
@pytest.mark.parametrize(
    ("settings", "most_asks"),
    [
        pytest.param({"estimate_basis": "typical"}, 4.8, id="one typical figure for every job"),
        pytest.param({"faults": FaultConfig(estimate_noise=0.5)}, 6.5, id="±50% noise"),
        pytest.param({"faults": FaultConfig(estimate_constant=30.0)}, 4.8, id="constant 30 s"),
        pytest.param({"faults": FaultConfig(estimate_bias=0.5)}, 9.0, id="twice too short"),
    ],
)
async def test_wrong_estimates_give_way_to_the_progress(
    emulator: EmulatorFactory, settings: dict[str, Any], most_asks: float
) -> None:
    asks, late = await burst(emulator, **settings)
    # The first ends of the burst come before anything is learned: the lookout sees the
    # first one, and the next few of that moment may be seen up to a second late.
    assert late[int(len(late) * 0.97) - 1] <= PollPolicy().min_interval + 0.05, late[-8:]
    assert late[-1] <= 1.0 + PollPolicy().min_interval, late[-1]
    assert asks <= most_asks, asks


async def test_a_job_on_its_estimate_is_asked_where_its_progress_puts_the_end(
    emulator: EmulatorFactory,
) -> None:
    # Estimates ±50% off and no complete_time: before the model's first ends show which figure
    # to go by, every job waits on its estimate, and the first ends of jobs told too long a
    # figure were seen up to 1.5 s late (p99 0.99 s). A job whose progress puts its end sooner
    # is asked there as well.
    asks, late = await burst(
        emulator, faults=FaultConfig(estimate_noise=0.5), progress_fields=False
    )
    assert late[int(len(late) * 0.99) - 1] <= PollPolicy().min_interval + 0.05, late[-5:]
    assert late[-1] <= 0.75, late[-5:]
    assert asks <= 6.5, asks


@pytest.mark.parametrize("job_seconds", [(1.0, 3.0), (2.0, 5.0)])
async def test_short_jobs_with_right_estimates_cost_at_most_three_asks(
    emulator: EmulatorFactory, job_seconds: tuple[float, float]
) -> None:
    # A job whose window opens soon after its first ask is not checked just before it: the ask
    # at the window is the check (jobs of 2-5 s cost 3.6 asks per key before, each checked
    # half a second before its window).
    asks, late = await burst(emulator, job_seconds=job_seconds)
    assert late[int(len(late) * 0.99) - 1] <= PollPolicy().min_interval + 0.05, late[-5:]
    assert asks <= 3.0, asks


# --- a poller that gathers (a fleet's leader): partial calls wait for keys coming due -----------
NO_ASKS = PollPolicy(
    first_poll_delay=3600, min_interval=3600, max_interval=3600, max_estimate_wait=3600
)


async def gathered_calls(
    emulator: EmulatorFactory,
    first_asks: list[float],
    *,
    gather: float,
    deadline: float = 600,
) -> tuple[list[tuple[float, int]], list[float | None]]:
    """What a poller that gathers for ``gather`` seconds does with one running job first due
    at each of ``first_asks`` (each with ``deadline``): its batch calls, as (seconds after it
    began tracking, keys asked), and when each job ended (None: still running)."""
    async with (
        emulator(time_scale=1.0, seed=3, job_seconds=(300, 300)) as emu,
        WujieClient(emu.credentials, base_url=emu.base_url, poll=NO_ASKS) as client,
    ):
        submitted = [
            await client.images.submit(prompt=f"p{i}", model="dall-e-2")
            for i in range(len(first_asks))
        ]
        async with open_transport(emu.base_url, emu.credentials) as transport:
            poller = BatchPoller(transport, PollPolicy(), Limits(), gather=gather)
            loop = asyncio.get_running_loop()
            start = loop.time()
            before = len(emu.stats()["batch_sizes"])
            ended: dict[str, float] = {}

            def note_end(shadow: ImageJob) -> None:
                ended[shadow.key] = round(loop.time() - start, 2)

            for job, first in zip(submitted, first_asks, strict=True):
                shadow = ImageJob(job.key, loop, deadline=start + deadline)
                poller.track(shadow, first)
                shadow.add_done_callback(note_end)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(poller.run)
                await asyncio.sleep(100)  # the fake clock jumps: no wall time passes
                tasks.cancel_scope.cancel()
            stats = emu.stats()
            unix_start = emu.gateway.clock.unix(start)
    calls = [
        (round(at - unix_start, 2), size)
        for (at, _), size in zip(
            stats["batch_callers"][before:], stats["batch_sizes"][before:], strict=True
        )
    ]
    return calls, [ended.get(job.key) for job in submitted]


async def test_a_gathering_poller_holds_a_partial_call_for_keys_coming_due(
    emulator: EmulatorFactory,
) -> None:
    calls, _ = await gathered_calls(emulator, [0.0, 0.3, 0.6, 1.7], gather=1.0)
    # The first key waits for the two that come due within its second (none is asked early);
    # the fourth, with no key coming due within its second, goes at once, with the lookout
    # (the job expected to end first, asked every min_interval: due at 1.1, it waited for it).
    assert calls[:2] == [(0.6, 3), (1.7, 2)], calls


async def test_a_gathering_poller_sends_a_full_call_at_once(emulator: EmulatorFactory) -> None:
    # (The 50 are asked again at 5 s, max_interval: their check that the estimate counts down;
    # their lookout, the one expected to end first, at 0.5 s: it waits for the 52nd.)
    calls, _ = await gathered_calls(emulator, [0.0] * 51 + [1.0], gather=3.0)
    assert calls[:2] == [(0.0, 50), (1.0, 3)], calls  # the 51st waits for company


async def test_a_key_is_not_held_past_its_deadline(emulator: EmulatorFactory) -> None:
    calls, ended = await gathered_calls(emulator, [0.0, 8.0], gather=30.0, deadline=5.0)
    # Held for the second key, the first would be asked only after its deadline.
    assert calls[0] == (0.0, 1), calls
    assert ended == [5.0, 5.0], ended  # each at its deadline


async def test_a_reply_applied_from_elsewhere_warns_only_of_keys_its_call_did_not_ask(
    emulator: EmulatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A fleet member applies the leader's replies: an entry for a key the call asked about
    but this member no longer tracks (it ended here meanwhile) is no gateway anomaly."""
    caplog.set_level(logging.WARNING, logger="wujie_async")
    async with emulator() as emu, open_transport(emu.base_url, emu.credentials) as transport:
        poller = BatchPoller(transport, PollPolicy(), Limits())
        loop = asyncio.get_running_loop()
        jobs = []
        for key in ("KA", "KB"):
            job = ImageJob(key, loop, deadline=loop.time() + 60)
            poller.track(job)
            jobs.append(job)
        done = {"key": "KA", "status": 4, "images": [{"url": "https://cdn.example/a.png"}]}
        poller.apply_reply(["KA"], {"list": [done]})
        assert jobs[0].done()
        running = [{"key": key, "status": 1} for key in ("KA", "KB")]
        poller.apply_reply(["KA", "KB"], {"list": running})
        assert "not asked about" not in caplog.text
        poller.apply_reply(["KB"], {"list": [*running, {"key": "KZ", "status": 1}]})
        assert "ignored 0 malformed entries and 2 entries for keys not asked about" in caplog.text
        for job in jobs:
            job.cancel()


# --- a 429 storm on batch queries: refused keys go in the next call ------------------------
async def test_keys_of_a_refused_batch_call_go_in_the_next_call_with_the_others(
    emulator: EmulatorFactory,
) -> None:
    # Half the calls refused with 429 (Retry-After 1 s), jobs of 2-4 s, 8 s deadlines. A
    # refused batch call used to be resent as it was, its keys held in it while other calls
    # went through: 13 to 17 of 40 jobs that ended at 3-4 s timed out "still running at its
    # deadline" (eight runs). Now a refused call's keys are due again after Retry-After and go
    # with every other key then due: 1 to 6 (38 runs).
    faults = FaultConfig(http_429=0.5, retry_after_s=1)  # on submits too: they come apart
    async with (
        emulator(time_scale=1.0, seed=3, job_seconds=(2, 4), faults=faults) as emu,
        WujieClient(emu.credentials, base_url=emu.base_url, timeouts=Timeouts(job=8)) as client,
    ):
        submitted = await asyncio.gather(
            *(client.images.submit(prompt=f"p{i}", model="dall-e-2") for i in range(40)),
            return_exceptions=True,  # a submit refused six times in a row gives up
        )
        jobs = [job for job in submitted if isinstance(job, ImageJob)]
        ended = await asyncio.gather(*jobs, return_exceptions=True)
        refused = client.stats.rate_limited
    timed_out = [error for error in ended if isinstance(error, JobTimeoutError)]
    assert refused >= 10  # the storm was on
    assert len(timed_out) <= 9, [str(error) for error in timed_out]
    for error in timed_out:  # each says what was seen, and why nothing more was
        assert "still running at its deadline" not in str(error)
        assert (
            "the batch calls are failing: RateLimitedError" in str(error)
            or "its last batch call failed: RateLimitedError" in str(error)
            or "when last reported" in str(error)
        ), str(error)
    assert client.stats.batch_errors == 0  # a refused call is a 429, not a failed call


async def test_a_deadline_says_when_the_job_was_last_reported_running(
    emulator: EmulatorFactory,
) -> None:
    async with (
        emulator(time_scale=1.0, job_seconds=(60, 60)) as emu,
        WujieClient(emu.credentials, base_url=emu.base_url) as client,
    ):
        job = await client.images.submit(prompt="p", model="dall-e-2", job_timeout=5)
        with pytest.raises(JobTimeoutError) as info:
            await job
    message = str(info.value)
    assert "still running when last reported, " in message, message
    assert "s before its deadline" in message, message


async def test_a_retry_after_of_an_hour_on_a_batch_query_does_not_park_the_jobs(
    emulator: EmulatorFactory,
) -> None:
    # A refused call's keys wait its Retry-After, but never more than max_interval.
    faults = FaultConfig(endpoints=frozenset({"info"}), burst_429=1, retry_after_s=3600)
    async with (
        emulator(time_scale=1.0, job_seconds=(2, 2), faults=faults) as emu,
        WujieClient(emu.credentials, base_url=emu.base_url) as client,
    ):
        loop = asyncio.get_running_loop()
        start = loop.time()
        job = await client.images.submit(prompt="p", model="dall-e-2")
        await job
        assert client.stats.rate_limited == 1
    assert loop.time() - start <= 2 + PollPolicy().max_interval + 1.0


async def test_a_gateway_taking_fewer_keys_per_call_is_asked_within_its_cap(
    emulator: EmulatorFactory,
) -> None:
    """The contract's 50 keys per call is assumed: a gateway that refuses more than 20
    (20010001) has the refused call asked in halves, and the poller keeps within what it
    took from then on; every job resolves (before: the same call failed until the deadline)."""
    async with emulator(time_scale=0.005, batch_cap=20) as emu, make_client(emu) as client:
        jobs = await asyncio.gather(
            *(client.images.submit(prompt=f"p{i}", model="dall-e-2") for i in range(120))
        )
        results = await asyncio.wait_for(asyncio.gather(*jobs), 30)
        stats = emu.stats()
    assert all(result.status == 4 for result in results)
    assert stats["batch_sizes"] and max(stats["batch_sizes"]) <= 20
    refused = stats["requests"]["info"] - len(stats["batch_sizes"])
    assert 1 <= refused <= 6  # the first over-cap calls only, not one per round


async def test_a_tracked_job_is_made_with_every_field_at_its_default() -> None:
    """The poller's record of a new job is built field by field (the submit's hot path): the
    same record as the dataclass's own constructor, every field set (a field added to
    ``KeyTiming`` or ``_Tracked`` and not to ``_new_tracked`` fails here, not in a poll)."""
    loop = asyncio.get_running_loop()
    job = ImageJob("k" * 32, loop, deadline=loop.time() + 60)
    made = _new_tracked(12.5, "gpt-image-1", job, None)
    expected = _Tracked(created_at=12.5, model="gpt-image-1", job=job)
    assert made == expected
    assert [getattr(made, name) for name in _Tracked.__dataclass_fields__] == [
        getattr(expected, name) for name in _Tracked.__dataclass_fields__
    ]
    job.cancel()
