"""Points: counted from the gateway's integral_cost, and capped by Limits(max_points=...) before
anything is sent; checked against the emulator's own record of what it charged."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import math
from pathlib import Path
from typing import Any

import pytest

from wujie_async import (
    BudgetExceededError,
    ImageJob,
    InvalidRequestError,
    JobError,
    JobTimeoutError,
    Limits,
    SubmitUncertainError,
    WujieClient,
    WujieError,
)
from wujie_async._budget import Budget, RequestBody
from wujie_async.cli._manifest_prices import prices_charged
from wujie_async.emulator import Emulator, FaultConfig

from .cli_helpers import cli, cli_zygote, manifest, served_emulator  # noqa: F401
from .conftest import FAST_POLL, INSTANT_RETRY, EmulatorFactory, make_client
from .hostile import scripted_gateway, throwaway_credentials

pytestmark = pytest.mark.anyio


async def test_points_charged_is_what_the_gateway_charged(emulator: EmulatorFactory) -> None:
    async with emulator() as emu, make_client(emu) as client:
        jobs = [
            await client.images.submit(prompt="a", model="gpt-image-1", n=2),
            await client.images.submit(prompt="b", model="dall-e-2"),
        ]
        for job in jobs:
            await job
        assert client.stats.points_charged == emu.stats()["points_charged"] == 16 + 2
        assert [job.points_charged for job in jobs] == [16, 2]


async def test_a_job_whose_wait_timed_out_is_counted_once_when_attach_sees_it_end() -> None:
    """A gateway may report ``integral_cost`` while the job runs. A timeout ends the wait,
    not the job: its points are counted when the job ends, once (attach() waits afresh)."""
    finished = asyncio.Event()

    def script(keys: list[str]) -> list[dict[str, object]]:
        status = 4 if finished.is_set() else 1
        images = [{"url": "https://cdn.example/a.png"}] if finished.is_set() else []
        return [{"key": k, "status": status, "integral_cost": 8, "images": images} for k in keys]

    async with scripted_gateway(script) as gateway:
        client = WujieClient(
            throwaway_credentials(), base_url=gateway.base_url, poll=FAST_POLL, retry=INSTANT_RETRY
        )
        async with client:
            job = await client.images.submit(prompt="x", model="dall-e-2", job_timeout=0.3)
            with pytest.raises(JobTimeoutError):
                await asyncio.wait_for(job, 10)
            again = client.images.attach(job.key, n=1)
            finished.set()
            await asyncio.wait_for(again, 10)
            assert again.points_charged == 8
            assert client.stats.points_charged == 8


async def test_concurrent_submits_racing_for_the_last_points_never_overspend(
    emulator: EmulatorFactory,
) -> None:
    """The first job of a kind runs alone until its cost (8) is known; then reservations of 8
    hold the total to the budget (40) while 20 submits race for it."""
    async with emulator() as emu, make_client(emu, limits=Limits(max_points=40)) as client:

        async def submit(i: int) -> ImageJob | BaseException:
            try:
                return await client.images.submit(prompt=f"p{i}", model="gpt-image-1")
            except BudgetExceededError as exc:
                return exc

        outcomes = await asyncio.gather(*(submit(i) for i in range(20)))
        jobs = [o for o in outcomes if isinstance(o, ImageJob)]
        refused = [o for o in outcomes if isinstance(o, BudgetExceededError)]
        for job in jobs:
            await job
        assert len(jobs) == 5 and len(refused) == 15
        assert emu.stats()["submits_accepted"] == 5  # refused ones were never sent
        assert emu.stats()["points_charged"] == client.stats.points_charged == 40
        error = refused[-1]
        assert isinstance(error, WujieError) and error.max_points == 40 and error.needed == 8
        assert "max_points=40" in str(error) and "nothing was sent" in str(error)


async def test_a_price_table_reserves_before_any_job_ended(emulator: EmulatorFactory) -> None:
    prices = {"gpt-image-1": 8.0}
    limits = Limits(max_points=20, point_prices=prices)
    prices["gpt-image-1"] = math.nan  # the caller's table changed after the checks: not ours
    with pytest.raises(TypeError):
        limits.point_prices["gpt-image-1"] = 0  # type: ignore[index]
    async with emulator(time_scale=1.0) as emu, make_client(emu, limits=limits) as client:
        first = await client.images.submit(prompt="a", model="gpt-image-1")
        second = await client.images.submit(prompt="b", model="gpt-image-1")
        with pytest.raises(BudgetExceededError):
            await client.images.submit(prompt="c", model="gpt-image-1")  # 8 + 8 + 8 > 20
        assert emu.stats()["submits_accepted"] == 2
        first.cancel()
        second.cancel()


async def test_a_job_that_cost_more_than_the_table_says_raises_its_kinds_price(
    emulator: EmulatorFactory,
) -> None:
    # The table says 1 point, the gateway charges 8: the table alone let every submit through
    # at 1 point (36 points charged on a 30-point budget, three jobs at 12 held at 8 each).
    limits = Limits(max_points=20, point_prices={"gpt-image-1": 1.0})
    async with emulator() as emu, make_client(emu, limits=limits) as client:
        await (await client.images.submit(prompt="a", model="gpt-image-1"))
        assert client.stats.points_charged == 8
        second = await client.images.submit(prompt="b", model="gpt-image-1")  # 8 + 8 <= 20
        with pytest.raises(BudgetExceededError) as refused:
            await client.images.submit(prompt="c", model="gpt-image-1")
        assert refused.value.needed == 8
        await second
        assert emu.stats()["submits_accepted"] == 2 and client.stats.points_charged == 16


async def test_a_gateway_that_never_reports_costs_cannot_spend_past_the_budget_unseen(
    emulator: EmulatorFactory,
) -> None:
    # No integral_cost in any reply: the first job of a kind runs, succeeds, and says nothing
    # of its price. Going on would spend without counting; the next submit is refused, with
    # the fix named, before anything is sent.
    async with (
        emulator(progress_fields=False) as emu,
        make_client(emu, limits=Limits(max_points=1000)) as client,
    ):
        await (await client.images.submit(prompt="a", model="dall-e-2"))
        with pytest.raises(BudgetExceededError) as refused:
            await client.images.submit(prompt="b", model="dall-e-2")
        assert refused.value.unpriced and "Limits.point_prices" in str(refused.value)
        assert emu.stats()["submits_accepted"] == 1
    # With a price table the budget is held by it: 2 points a job, 3 jobs in 6 points.
    limits = Limits(max_points=6, point_prices={"dall-e-2": 2})
    async with (
        emulator(progress_fields=False) as emu,
        make_client(emu, limits=limits) as client,
    ):
        for prompt in "abc":
            await (await client.images.submit(prompt=prompt, model="dall-e-2"))
        with pytest.raises(BudgetExceededError) as refused:
            await client.images.submit(prompt="d", model="dall-e-2")
        assert not refused.value.unpriced and refused.value.spent == 6
        assert emu.stats()["submits_accepted"] == 3


async def test_a_probe_that_timed_out_leaves_its_kind_unpriced_not_free(
    emulator: EmulatorFactory,
) -> None:
    """The first job of a kind whose cost is unknown goes alone; when only the wait for it
    ends (a timeout), it runs on and will be charged at a price nobody knows. Letting the next
    one go as a new probe would spend without limit (one per timeout): it is refused."""
    async with (
        emulator(time_scale=1.0, job_seconds=(3.0, 3.0)) as emu,
        make_client(emu, limits=Limits(max_points=16)) as client,
    ):
        job = await client.images.submit(prompt="a", model="dall-e-2", job_timeout=0.2)
        with pytest.raises(JobTimeoutError):
            await job
        with pytest.raises(BudgetExceededError) as refused:
            await client.images.submit(prompt="b", model="dall-e-2")
        assert refused.value.unpriced and "timed out" in str(refused.value)
        assert emu.stats()["submits_accepted"] == 1


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param(FaultConfig(drop_after_accept=1.0), id="submit reply lost"),
        pytest.param(FaultConfig(absent_jobs=1.0, absent_s=30.0), id="key never listed"),
    ],
)
async def test_a_probe_that_ended_without_a_word_of_its_cost_leaves_its_kind_unpriced(
    emulator: EmulatorFactory, faults: FaultConfig
) -> None:
    """A first job of a kind whose submit's reply was lost (it may have been charged), or
    whose key the gateway never listed (it may run on): letting the next one go as a new
    probe spent without limit (8 lost replies charged 16 points on a 10-point budget, the
    client counting 0). Its kind is refused, as after a timeout."""
    async with (
        emulator(time_scale=1.0, job_seconds=(0.3, 0.3), faults=faults) as emu,
        make_client(
            emu,
            limits=Limits(max_points=10),
            poll=dataclasses.replace(FAST_POLL, unknown_key_grace=0.3),
        ) as client,
    ):
        with pytest.raises((SubmitUncertainError, JobError)):
            await (await client.images.submit(prompt="a", model="dall-e-2"))
        with pytest.raises(BudgetExceededError) as refused:
            await client.images.submit(prompt="b", model="dall-e-2")
        assert refused.value.unpriced and "reply lost" in str(refused.value)
        assert emu.stats()["submits_accepted"] == 1


async def test_a_failed_first_job_that_cost_nothing_is_no_price_for_its_kind(
    emulator: EmulatorFactory,
) -> None:
    """A moderated job costs 0: learning 0 as the kind's price let every later submit go at
    once (152 points on a 16-point budget). The next job of the kind goes alone, as a first."""
    faults = FaultConfig(moderation_words=("forbidden",))
    async with (
        emulator(time_scale=1.0, job_seconds=(0.3, 0.3), faults=faults) as emu,
        make_client(emu, limits=Limits(max_points=16)) as client,
    ):
        with pytest.raises(JobError):
            await (await client.images.submit(prompt="forbidden", model="gpt-image-1"))
        outcomes = await asyncio.gather(
            *(client.images.submit(prompt=f"p{i}", model="gpt-image-1") for i in range(4)),
            return_exceptions=True,
        )
        refused = [o for o in outcomes if isinstance(o, BudgetExceededError)]
        assert len(refused) == 2, outcomes  # 8 points each: two fit in 16
        for job in outcomes:
            if isinstance(job, ImageJob):
                await job
        assert emu.stats()["points_charged"] == 16
        assert emu.stats()["submits_accepted"] == 3


async def test_an_attached_job_charged_to_the_budget_holds_its_cost(
    emulator: EmulatorFactory,
) -> None:
    """``attach(..., charge_budget=True)``: a job already paid counts against this client's
    budget; of a kind whose cost is not known yet, it holds that kind's submits back until it
    ends (then its cost is known and counted)."""
    async with (
        emulator(time_scale=1.0, job_seconds=(0.6, 0.6)) as emu,
        make_client(emu) as other,
    ):
        paid = await other.images.submit(prompt="a", model="dall-e-2")  # costs 2
        body = {"prompt": "a", "model": "dall-e-2"}
        async with make_client(emu, limits=Limits(max_points=3)) as client:
            with pytest.raises(InvalidRequestError) as no_kind:  # nothing to price it by
                client.images.attach(paid.key, request={"prompt": "a"}, charge_budget=True)
            assert no_kind.value.field == "request"
            job = client.images.attach(paid.key, request=body, charge_budget=True)
            with pytest.raises(BudgetExceededError) as refused:
                await client.images.submit(prompt="b", model="dall-e-2")
            assert job.done() and refused.value.spent == 2  # it waited for the job to end
        assert emu.stats()["submits_accepted"] == 1

        priced = Limits(max_points=10, point_prices={"dall-e-2": 8})
        more = await other.images.submit(prompt="c", model="dall-e-2")
        async with make_client(emu, limits=priced) as client:
            job = client.images.attach(more.key, request=body, charge_budget=True)
            with pytest.raises(BudgetExceededError) as refused:
                await client.images.submit(prompt="d", model="dall-e-2")
            assert not job.done() and refused.value.reserved == 8  # refused at once
        async with make_client(emu, limits=priced) as client:
            client.images.attach(more.key, request=body)  # not charged: its own budget
            await client.images.submit(prompt="e", model="dall-e-2")
        assert emu.stats()["submits_accepted"] == 3


async def test_a_refused_submit_gives_its_points_back_an_uncertain_one_keeps_them(
    emulator: EmulatorFactory,
) -> None:
    limits = Limits(max_points=16, point_prices={"dall-e-2": 8})
    async with emulator(time_scale=1.0) as emu, make_client(emu, limits=limits) as client:
        emu.set_faults(FaultConfig(business_error=1.0, business_error_code="20010001"))
        with pytest.raises(WujieError) as refused:
            await client.images.submit(prompt="a", model="dall-e-2")
        assert not isinstance(refused.value, BudgetExceededError)
        emu.set_faults(FaultConfig(drop_after_accept=1.0))
        with pytest.raises(SubmitUncertainError):  # may have been charged: its 8 stay held
            await client.images.submit(prompt="b", model="dall-e-2")
        emu.set_faults(FaultConfig())
        job = await client.images.submit(prompt="c", model="dall-e-2")
        with pytest.raises(BudgetExceededError):
            await client.images.submit(prompt="d", model="dall-e-2")
        job.cancel()


def _only_key(emu: Emulator) -> str:
    [key] = emu.stats()["timelines"]
    return str(key)


async def _spent_when_refused(client: WujieClient) -> tuple[float, float]:
    """Submits of 8 points until one is refused; what the budget said then (spent, reserved)."""
    for _ in range(10):
        try:
            await client.images.submit(prompt="next", model="dall-e-2")
        except BudgetExceededError as refused:
            return refused.spent, refused.reserved
    raise AssertionError("the budget refused nothing")


@pytest.mark.parametrize(
    "found_by", ["the error's request", "the request alone", "the journal row"]
)
async def test_a_lost_reply_whose_key_is_attached_to_the_budget_is_counted_once(
    emulator: EmulatorFactory, tmp_path: Path, found_by: str
) -> None:
    """A submit whose reply was lost keeps its 8 points as spent (it may have been charged).
    Its key, found since and attached with ``charge_budget=True``, is that same job: counted
    again on top (8 + its 2), the budget refused submits it had room for. It counts once, at
    the table's 8 (the gateway reports 2: a job that succeeded counts at least its table
    price)."""
    limits = Limits(max_points=24, point_prices={"dall-e-2": 8})
    journal = tmp_path / "jobs.sqlite" if found_by == "the journal row" else None
    async with (
        emulator(time_scale=1.0, job_seconds=(0.3, 0.3)) as emu,
        make_client(emu, limits=limits, journal=journal) as client,
    ):
        emu.set_faults(FaultConfig(drop_after_accept=1.0))
        with pytest.raises(SubmitUncertainError) as lost:
            await client.images.submit(prompt="a", model="dall-e-2")
        emu.set_faults(FaultConfig())
        key = _only_key(emu)  # as read in the platform's console
        request: dict[str, Any] = lost.value.request
        if found_by == "the request alone":
            # Only exc.request kept (the error gone with its except block): the budget held
            # the error weakly, lost it, and counted the job twice.
            del lost
            gc.collect()
        if journal is not None:
            [row] = await client.uncertain_submits()
            assert await client.record_submit_key(row.id, key)
            request = (await client.journal_entries("accepted"))[0].request
        job = client.images.attach(key, request=request, charge_budget=True)
        assert (await asyncio.wait_for(job, 10)).images and job.points_charged == 2
        # 8 spent (counted twice: 16); 8 and 8 more fit in 24, the next 8 does not.
        assert await _spent_when_refused(client) == (8, 16)


async def test_a_reply_without_a_key_whose_key_is_attached_to_the_budget_is_counted_once() -> None:
    """A "success" that gave no usable key: the job may exist (charged), its key found in the
    console. Attached with the error's request and ``charge_budget=True``, it is that job:
    it counts once (at the table's 8, above the 2 reported), not the 8 kept for the submit
    and 8 more on top."""

    def script(keys: list[str]) -> list[dict[str, object]]:
        image = {"url": "https://files.example/a.png"}
        return [
            {"key": key, "status": 4, "images": [image], "integral_cost": 2}
            if key == "K00000"
            else {"key": key, "status": 1}  # the later jobs run on: their 8 stay held
            for key in keys
        ]

    def keyless_first(key: str) -> dict[str, object]:
        return {"Key": key} if key == "K00000" else {"key": key}

    limits = Limits(max_points=24, point_prices={"dall-e-2": 8})
    async with scripted_gateway(script, submit_data=keyless_first) as gateway:
        client = WujieClient(
            throwaway_credentials(),
            base_url=gateway.base_url,
            poll=FAST_POLL,
            retry=INSTANT_RETRY,
            limits=limits,
        )
        async with client:
            with pytest.raises(SubmitUncertainError, match="no key") as lost:
                await client.images.submit(prompt="a", model="dall-e-2")
            job = client.images.attach("K00000", request=lost.value.request, charge_budget=True)
            assert (await asyncio.wait_for(job, 10)).images and job.points_charged == 2
            assert await _spent_when_refused(client) == (8, 16)


async def test_a_job_whose_wait_ended_attached_to_the_budget_is_counted_once(
    emulator: EmulatorFactory,
) -> None:
    """A job whose wait timed out keeps its 8 points as spent (it runs on, and will be
    charged); attaching its key with ``charge_budget=True`` follows the same job: what it
    counts at its end (the table's 8, above the 2 reported) replaces the 8, rather than
    adding to them."""
    limits = Limits(max_points=24, point_prices={"dall-e-2": 8})
    async with (
        emulator(time_scale=1.0, job_seconds=(0.6, 0.6)) as emu,
        make_client(emu, limits=limits) as client,
    ):
        job = await client.images.submit(prompt="a", model="dall-e-2", job_timeout=0.1)
        with pytest.raises(JobTimeoutError):
            await asyncio.wait_for(job, 10)
        again = client.images.attach(job.key, request=job.request, charge_budget=True)
        assert again is not job
        await asyncio.wait_for(again, 10)
        assert again.points_charged == 2
        assert await _spent_when_refused(client) == (8, 16)


async def test_an_attach_of_another_job_with_an_equal_request_is_counted_on_its_own(
    emulator: EmulatorFactory,
) -> None:
    """Only the error's own request names the lost submit: an attach of another job with an
    equal body (an earlier run's, say) is counted on its own, and the lost submit stays
    counted (it may have been charged): nothing paid goes uncounted."""
    limits = Limits(max_points=24, point_prices={"dall-e-2": 8})
    async with (
        emulator(time_scale=1.0, job_seconds=(0.3, 0.3)) as emu,
        make_client(emu) as other,
    ):
        earlier = await other.images.submit(prompt="a", model="dall-e-2")
        await asyncio.wait_for(earlier, 10)
        async with make_client(emu, limits=limits) as client:
            emu.set_faults(FaultConfig(drop_after_accept=1.0))
            with pytest.raises(SubmitUncertainError) as lost:
                await client.images.submit(prompt="a", model="dall-e-2")
            emu.set_faults(FaultConfig())
            body = dict(lost.value.request)
            job = client.images.attach(earlier.key, request=body, charge_budget=True)
            await asyncio.wait_for(job, 10)
            # Each at the table's 8 (the attached one reported 2: counted at its table price).
            assert await _spent_when_refused(client) == (8 + 8, 8)


@pytest.mark.parametrize(
    "options",
    [{"max_points": -1}, {"max_points": True}, {"point_prices": {"gpt-image-1": "8"}}],
)
def test_bad_budget_settings_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        Limits(**options)  # type: ignore[arg-type]
    assert info.value.field.startswith("Limits.")


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("dall-e-2/1x1/zz/qq", "4 parts"),
        ("dall-e-2/1x1", "dall-e-2 takes no size '1x1'"),
        ("gpt-image-1/1024X1024", "no size"),
        ("dall-e-3/1024x1024/high", "dall-e-3 takes no quality 'high'"),
        ("a-new-model/big", "neither WIDTHxHEIGHT nor auto"),  # an unknown model's sizes too
        ("dall-e-2/", "an empty part"),
        ("", "an empty part"),
        # A known model mistyped, or a name a request is refused for: its jobs went unpriced
        # (an n=10 dall-e-2 job charged 20 points on a budget of 4).
        ("DALL-E-2", "did you mean 'dall-e-2'"),
        ("dalle-2/512x512", "did you mean 'dall-e-2'"),
        ("gpt_image_1", "did you mean 'gpt-image-1'"),
        ("dall-e-2 ", "no model's name"),
        (" gpt-image-1/auto", "no model's name"),
    ],
)
def test_a_price_key_that_can_never_match_is_refused(key: str, says: str) -> None:
    """It was taken, and its jobs went unpriced: a first job of the kind ran alone to learn
    its cost, or, on a gateway that reports none, the rest of its kind were refused."""
    with pytest.raises(InvalidRequestError) as info:
        Limits(max_points=10, point_prices={"dall-e-2": 2, key: 3})
    assert info.value.violations == [(info.value.field, info.value.rule)]
    assert info.value.field == "Limits.point_prices"
    assert repr(key) in info.value.rule and says in info.value.rule
    assert "MODEL, MODEL/SIZE or MODEL/SIZE/QUALITY" in info.value.rule


def test_price_keys_that_can_match_are_taken() -> None:
    keys = [
        "dall-e-2",
        "dall-e-2/auto",  # a dall-e-2 request that gives no size
        "dall-e-2/512x512/standard",
        "gpt-image-1/auto/high",
        "dall-e-3/1792x1024/hd",
        "a-new-model/2048x2048/ultra",  # a new model may bring new qualities
        "gpt-image-1.5",  # a newer model, not a misspelt one
        "通义万相-2.1",
    ]
    limits = Limits(max_points=10, point_prices=dict.fromkeys(keys, 1))
    assert limits.point_prices is not None and list(limits.point_prices) == keys


def test_a_rerun_takes_no_price_from_a_kind_no_price_key_can_name() -> None:
    """An unknown model's size is sent as given, but a price key's size must be WxH: such a
    kind's price from earlier runs is left out, not handed to Limits to refuse the run."""
    bodies: dict[str, dict[str, Any]] = {
        "1": {"prompt": "a", "model": "a-new-model", "size": "big"},
        "2": {"prompt": "b", "model": "dall-e-2", "n": 2},
    }
    records = [{"tag": tag, "status": "saved", "points": 4} for tag in bodies]
    assert prices_charged(records, bodies) == {"dall-e-2/auto/auto": 2}


async def test_bulk_refuses_a_point_price_key_that_can_never_match(tmp_path: Path) -> None:
    rows = tmp_path / "p.txt"
    rows.write_text("a fox\n")
    flags = ("--max-points", "10", "--point-price", "dall-e-2/1x1=3", "--emulator")
    code, _, err = await cli("bulk", str(rows), "-o", str(tmp_path / "out"), *flags)
    assert code == 2 and "--point-price 'dall-e-2/1x1=3'" in err and "no size" in err, err


async def test_the_budget_never_holds_a_negative_amount() -> None:
    """The request rules refuse n below 1; should one reach the budget all the same, it holds
    one image's price, never a negative amount that makes room for others (n=-100 at 5 points
    an image held -500 and let five jobs of 50 points through a 10-point budget)."""
    budget = Budget(10, {"gpt-image-2": 5})
    body = {"prompt": "a", "model": "gpt-image-2"}
    for n in (-100, 0):
        held = await budget.reserve(body, n)
        assert held.points == 5 and budget.reserved == 5
        held.release()
    attached = budget.hold(body, -100)
    assert attached.points == 5 and budget.reserved == 5
    with pytest.raises(BudgetExceededError):
        await budget.reserve(body, 2)  # 5 held + 10 > 10


@pytest.mark.long
async def test_bulk_max_points_stops_lines_and_a_rerun_with_more_continues(tmp_path: Path) -> None:
    prompts = tmp_path / "five.txt"
    prompts.write_text("a\nb\nc\nd\ne\n")
    out = tmp_path / "out"
    async with served_emulator(tmp_path) as emu:
        run = ("bulk", str(prompts), "-o", str(out), "--json", "--progress", "none")
        code, stdout, err = await cli(*run, "--max-points", "20", env=emu.env)
        assert code == 1, err
        summary = json.loads(stdout)
        assert summary["outcomes"]["saved"] == 2 and summary["outcomes"]["not_sent"] == 3
        assert summary["points"] == 16 and "over the points budget" in err
        assert (await emu.stats())["points_charged"] == 16
        refused = [r for r in manifest(out) if r["status"] == "not_sent"]
        assert len(refused) == 3 and {r["error_code"] for r in refused} == {"budget"}

        code, stdout, err = await cli(*run, "--max-points", "40", env=emu.env)
        assert code == 0, err
        summary = json.loads(stdout)
        assert summary["points"] == 24 and summary["points_total"] == 40
        assert (await emu.stats())["points_charged"] == 40  # the budget, never past it
        assert sum(r.get("points", 0) for r in manifest(out)) == 40


async def test_bulk_records_every_cost_on_a_gateway_that_bills_after_the_last_image(
    tmp_path: Path,
) -> None:
    """Images listed while the job runs, at temporary URLs; the cost only once the job has
    ended, after its last image; done reports that list no image for a moment. Every line is
    saved from the final URLs, and the manifest's points add up to what was charged."""
    prompts = tmp_path / "six.txt"
    prompts.write_text("".join(f"line {i}\n" for i in range(6)))
    out = tmp_path / "out"
    # Asked by age (no estimates): the running job's listing is seen.
    habits = ["--finishing-s", "100", "--temporary-urls", "--done-unlisted-s", "40"]
    habits += ["--estimate-absent", "1"]
    async with served_emulator(tmp_path, *habits) as emu:
        run = ("bulk", str(prompts), "-o", str(out), "--json", "--progress", "none", "-n", "2")
        code, stdout, err = await cli(*run, env=emu.env)
        assert code == 0, err
        charged = (await emu.stats())["points_charged"]
    rows = manifest(out)
    assert len(rows) == 12 and {r["status"] for r in rows} == {"saved"}
    assert sum(r.get("points", 0) for r in rows) == charged == json.loads(stdout)["points"]
    assert len([r for r in rows if "points" in r]) == 6  # one row per job carries its cost


@pytest.mark.long
async def test_a_rerun_with_the_same_budget_knows_what_earlier_runs_paid_per_image(
    tmp_path: Path,
) -> None:
    """48 of 50 points spent by the first run: the re-run knows a line costs 8 (from the
    manifest) and sends nothing, rather than a job to learn the price that passes the budget."""
    prompts = tmp_path / "nine.txt"
    prompts.write_text("".join(f"line {i}\n" for i in range(9)))
    out = tmp_path / "out"
    async with served_emulator(tmp_path) as emu:
        run = ("bulk", str(prompts), "-o", str(out), "--json", "--progress", "none")
        code, stdout, err = await cli(*run, "--max-points", "50", env=emu.env)
        assert code == 1, err
        assert json.loads(stdout)["points"] == 48
        code, stdout, err = await cli(*run, "--max-points", "50", env=emu.env)
        assert code == 1, err
        summary = json.loads(stdout)
        assert summary["points"] == 0 and summary["points_total"] == 48
        assert (await emu.stats())["points_charged"] == 48  # never past the budget
        assert summary["outcomes"]["not_sent"] == 3


@pytest.mark.long
async def test_bulk_on_a_gateway_that_reports_no_costs_needs_point_prices(tmp_path: Path) -> None:
    prompts = tmp_path / "three.txt"
    prompts.write_text("a\nb\nc\n")
    async with served_emulator(tmp_path, "--no-progress-fields") as emu:
        run = ("bulk", str(prompts), "--json", "--progress", "none", "--concurrency", "1")
        budget = ("--max-points", "100", "--model", "dall-e-2")
        code, stdout, err = await cli(*run, "-o", str(tmp_path / "a"), *budget, env=emu.env)
        assert code == 1, err
        outcomes = json.loads(stdout)["outcomes"]
        assert (outcomes["saved"], outcomes["not_sent"]) == (1, 2)
        assert "--point-price MODEL=POINTS" in err
        refused = [r for r in manifest(tmp_path / "a") if r["status"] == "not_sent"]
        assert {r["error_code"] for r in refused} == {"unpriced"}
        priced = (*budget, "--point-price", "dall-e-2=2")
        code, stdout, err = await cli(*run, "-o", str(tmp_path / "b"), *priced, env=emu.env)
        assert code == 0, err
        assert json.loads(stdout)["outcomes"]["saved"] == 3
        # Nothing in the manifest records their costs: a re-run counts them at the price given.
        assert "the gateway did not report what 3 job(s) of this run cost" in err
        assert "(about 6 at their kind's price)" in err and "lower it" not in err
        code, stdout, err = await cli(*run, "-o", str(tmp_path / "b"), *priced, env=emu.env)
        summary = json.loads(stdout)
        assert code == 0 and summary["points"] == 0, err
        assert summary["points_total"] == summary["points_estimated"] == 6
        code, _, err = await cli(*run, "-o", str(tmp_path / "c"), "--point-price", "x", env=emu.env)
        assert code == 2 and "--point-price 'x'" in err


@pytest.mark.long
@pytest.mark.parametrize("journal", [[], ["--no-journal"]])
async def test_a_rerun_counts_earlier_jobs_whose_cost_went_unreported_at_their_price(
    tmp_path: Path, journal: list[str]
) -> None:
    """A gateway that reports the cost of about two jobs in three. The first run spends the
    50-point budget (25 lines at 2); its manifest records less. The re-run counted only what
    rows record ("10 points spent (48 with earlier runs)" while 62 were charged): each earlier
    job saved without a reported cost now counts at its kind's price, toward the total with
    earlier runs and against the budget, so it sends nothing."""
    prompts = tmp_path / "thirty.txt"
    prompts.write_text("".join(f"line {i}\n" for i in range(30)))
    out = tmp_path / "out"
    async with served_emulator(tmp_path, "--cost-unreported", "0.34") as emu:
        run = ("bulk", str(prompts), "-o", str(out), "--json", "--progress", "none", *journal)
        budget = ("--model", "dall-e-2", "--max-points", "50", "--point-price", "dall-e-2=2")
        code, stdout, err = await cli(*run, *budget, env=emu.env)
        assert code == 1, err
        assert (await emu.stats())["points_charged"] == 50
        recorded = sum(r.get("points", 0) for r in manifest(out))
        assert 0 < recorded < 50 and json.loads(stdout)["points"] == recorded
        unreported = int(50 - recorded) // 2
        # One word on what comes next: a larger budget, never a smaller one.
        assert f"did not report what {unreported} job(s) of this run cost" in err, err
        assert f"(about {50 - recorded:g} at their kind's price)" in err
        assert "lower it" not in err and "with a larger --max-points" in err

        code, stdout, err = await cli(*run, *budget, env=emu.env)
        assert code == 1, err
        summary = json.loads(stdout)
        assert (await emu.stats())["points_charged"] == 50  # nothing sent past the budget
        assert summary["outcomes"]["not_sent"] == 5 and summary["points"] == 0
        assert summary["points_total"] == 50
        assert summary["points_estimated"] == 50 - recorded
        said = f"(50 with earlier runs, {50 - recorded:g} of it for {unreported} earlier job(s)"
        assert said in err, err


@pytest.mark.long
async def test_points_unreported_are_said_without_a_budget(tmp_path: Path) -> None:
    """No --max-points: "N points spent" said nothing of the jobs whose cost the gateway did
    not report (the note came only with a budget). It says what they cost at their kind's
    price, learned from the jobs that reported theirs."""
    prompts = tmp_path / "twelve.txt"
    prompts.write_text("".join(f"line {i}\n" for i in range(12)))
    out = tmp_path / "out"
    async with served_emulator(tmp_path, "--cost-unreported", "0.5") as emu:
        run = ("bulk", str(prompts), "-o", str(out), "--json", "--progress", "none")
        code, stdout, err = await cli(*run, "--model", "gpt-image-1", env=emu.env)
        assert code == 0, err
        charged = (await emu.stats())["points_charged"]
    rows = manifest(out)
    reported = [r for r in rows if "points" in r]
    spent = json.loads(stdout)["points"]
    assert spent == sum(r["points"] for r in reported) and 0 < len(reported) < 12
    unreported = 12 - len(reported)
    assert f"the gateway did not report what {unreported} job(s) of this run cost" in err, err
    assert f"(about {charged - spent:g} at their kind's price)" in err


@pytest.mark.long
@pytest.mark.parametrize("journal", [[], ["--no-journal"]])
async def test_bulk_max_points_counts_the_jobs_a_rerun_collects(
    tmp_path: Path, journal: list[str]
) -> None:
    """The budget is the input's across re-runs: jobs an earlier run left running (here: past
    its --job-timeout) are paid, and the re-run that collects them holds their cost."""
    prompts = tmp_path / "eight.txt"
    prompts.write_text("".join(f"line {i}\n" for i in range(8)))
    out = tmp_path / "out"
    async with served_emulator(tmp_path, "--time-scale", "1", "--job-seconds", "2,2") as emu:
        run = ("bulk", str(prompts), "-o", str(out), "--json", "--progress", "none", *journal)
        budget = ("--max-points", "40", "--point-price", "gpt-image-1=8")
        code, stdout, err = await cli(*run, *budget, "--job-timeout", "0.3", env=emu.env)
        assert code == 1, err
        assert (await emu.stats())["submits_accepted"] == 5  # 5 x 8 = the budget
        code, stdout, err = await cli(*run, *budget, env=emu.env)
        summary = json.loads(stdout)
        assert summary["outcomes"]["saved"] == 5 and summary["outcomes"]["not_sent"] == 3, err
        assert (await emu.stats())["submits_accepted"] == 5  # nothing new: the budget is spent
        assert (await emu.stats())["points_charged"] == 40
        assert summary["points_total"] == 40


async def test_an_attached_job_kept_at_a_reported_cost_above_the_estimate_holds_that_cost() -> None:
    """A job that ended short with 20 points reported (the table says 2) keeps 20 as spent;
    attached again to the budget, only the estimate (2) was held in their place, and the 18
    between were room for 9 more submits while the job was still out."""
    budget = Budget(25, {"dall-e-2": 1})
    body = {"model": "dall-e-2", "prompt": "x", "n": 2}
    reservation = await budget.reserve(body, 2)
    reservation.settle(20, maybe_charged=True)
    budget.maybe_charged("K1", reservation)
    assert (budget.spent, budget.reserved) == (20, 0)
    held = budget.hold_attached("K1", body, 2)
    assert (budget.spent, budget.reserved) == (0, 20)
    admitted = 0
    with pytest.raises(BudgetExceededError):
        for _ in range(20):
            await budget.reserve(body, 2)
            admitted += 1
    assert admitted == 2
    held.settle(20, succeeded=True)
    assert budget.spent == 20


async def test_a_lost_replys_request_is_not_kept_alive_by_the_budget() -> None:
    """The budget remembered a lost reply's request object itself (up to 1,024 of them): an
    edit's request carries its images, megabytes each. It now holds the request weakly."""
    import weakref

    budget = Budget(100, {"dall-e-2": 8})
    body = RequestBody(model="dall-e-2", prompt="x", image="iVBOR" * 100_000)
    reservation = await budget.reserve(body, 1)
    reservation.settle(None, maybe_charged=True)
    error = SubmitUncertainError("the reply was lost", request=body)
    budget.lost_reply(error, reservation)
    assert budget.hold_attached("K1", error.request, 1).points == 8  # taken back: counted once
    assert budget.spent == 0
    again = await budget.reserve(body, 1)
    again.settle(None, maybe_charged=True)
    budget.lost_reply(SubmitUncertainError("lost again", request=body), again)
    kept = weakref.ref(body)
    del body, error
    gc.collect()
    assert kept() is None


async def test_an_attached_job_of_an_unpriced_kind_that_succeeds_uncosted_holds_its_kind() -> None:
    """Held at what its first end reported (20), an attached job of a kind with no price
    looked priced: succeeding with no cost reported, it left its kind open to a new probe
    (whose cost, unreported too, would go uncounted) instead of holding it back."""
    budget = Budget(100)
    body = {"model": "dall-e-2", "prompt": "x", "n": 2}
    probe = await budget.reserve(body, 2)
    probe.settle(20, maybe_charged=True)  # ended short, 20 reported: no price for the kind
    budget.maybe_charged("K1", probe)
    held = budget.hold_attached("K1", body, 2)
    assert held.points == 20
    held.settle(None, succeeded=True)  # its images, and no cost said
    with pytest.raises(BudgetExceededError) as refused:
        await budget.reserve(body, 2)
    assert refused.value.unpriced
