"""The budget's prices: per image of a model, size and quality, learned only from a cost the
gateway told (a reported 0 is none), and a job that succeeded never counted below its
expected cost; checked against the emulator's own record of what it charged."""

from __future__ import annotations

import asyncio

import pytest

from wujie_async import BudgetExceededError, ImageJob, Limits, WujieClient
from wujie_async._budget import Budget
from wujie_async.cli._manifest_prices import prices_charged
from wujie_async.emulator import FaultConfig

from .conftest import EmulatorFactory, make_client

pytestmark = pytest.mark.anyio

DALL_E_2 = {"prompt": "x", "model": "dall-e-2"}


async def _submit_until_refused(
    client: WujieClient, most: int = 40
) -> tuple[int, BudgetExceededError]:
    """Submits of dall-e-2 one after another, each awaited, until the budget refuses one:
    how many were sent, and the refusal."""
    for sent in range(most):
        try:
            job = await client.images.submit(prompt=f"p{sent}", model="dall-e-2")
        except BudgetExceededError as refused:
            return sent, refused
        await asyncio.wait_for(job, 10)
    raise AssertionError("the budget refused nothing")


async def test_a_job_reported_at_zero_counts_at_its_table_price(
    emulator: EmulatorFactory,
) -> None:
    """A gateway that reports ``integral_cost`` 0 until the cost is settled: each job's hold
    was freed at its end, and 30 jobs went on a 20-point budget whose table allows 10 (60
    points charged). A job that succeeded counts at its table price at least; the figures
    shown stay the gateway's."""
    limits = Limits(max_points=20, point_prices={"dall-e-2": 2})
    faults = FaultConfig(cost_zero=1.0)
    async with (
        emulator(job_seconds=(0.3, 0.3), faults=faults) as emu,
        make_client(emu, limits=limits) as client,
    ):
        sent, refused = await _submit_until_refused(client)
        assert sent == 10 and refused.spent == 20 and not refused.unpriced
        assert emu.stats()["points_charged"] == 20
        assert client.stats.points_charged == 0  # what the gateway reported


async def test_a_job_reported_below_its_table_price_counts_at_the_table(
    emulator: EmulatorFactory,
) -> None:
    """The table says 3 points an image, the gateway reports 2: the budget errs on the side
    of spending less and counts 3 (4 jobs went on 9 points, counted at 2 each)."""
    limits = Limits(max_points=9, point_prices={"dall-e-2": 3})
    async with emulator(job_seconds=(0.3, 0.3)) as emu, make_client(emu, limits=limits) as client:
        sent, refused = await _submit_until_refused(client)
        assert sent == 3 and refused.spent == 9
        assert emu.stats()["points_charged"] == client.stats.points_charged == 6


async def test_a_job_reported_at_zero_teaches_no_price(emulator: EmulatorFactory) -> None:
    """Without a table, a first job that succeeded reported at 0 taught its kind a price of
    0: every later submit went, uncounted. It is no price: the kind is held back as for a
    gateway that does not report costs, with ``Limits.point_prices`` named."""
    async with (
        emulator(job_seconds=(0.3, 0.3), faults=FaultConfig(cost_zero=1.0)) as emu,
        make_client(emu, limits=Limits(max_points=1000)) as client,
    ):
        sent, refused = await _submit_until_refused(client)
        assert sent == 1 and refused.unpriced and "Limits.point_prices" in str(refused)
        assert emu.stats()["submits_accepted"] == 1


async def test_a_price_is_per_image_whatever_the_n(emulator: EmulatorFactory) -> None:
    """One model, jobs of n=2, 3 and 4 at once after a job of n=1 cost 2: each n was a kind
    of its own with no price, and each went as a probe holding nothing (20 points charged on
    a 10-point budget). The price of an image holds them all."""
    async with (
        emulator(job_seconds=(0.3, 0.3)) as emu,
        make_client(emu, limits=Limits(max_points=10)) as client,
    ):
        await asyncio.wait_for(await client.images.submit(prompt="a", model="dall-e-2"), 10)
        outcomes = await asyncio.gather(
            *(client.images.submit(prompt=f"n{n}", model="dall-e-2", n=n) for n in (2, 3, 4)),
            return_exceptions=True,
        )
        jobs = [outcome for outcome in outcomes if isinstance(outcome, ImageJob)]
        refused = [outcome for outcome in outcomes if isinstance(outcome, BudgetExceededError)]
        assert len(jobs) == 1 and len(refused) == 2, outcomes  # 2 + 4 fit; 6 and 8 do not
        assert refused[0].needed == 6 and not refused[0].unpriced
        await asyncio.wait_for(asyncio.gather(*jobs), 10)
        assert emu.stats()["points_charged"] == 6


async def test_mixed_n_without_a_table_probe_once_and_stay_within_the_budget(
    emulator: EmulatorFactory,
) -> None:
    """Jobs of n=1, 2 and 3 of one model at once, no table, each image taking its time (a
    job of n=1 ends first): the first goes alone, the others wait for its price per image,
    and the spending stays within the budget. Each n probing alone, the jobs of n=1 went at
    2 points while the probes of n=2 and 3 were out holding nothing: 28 to 30 points were
    charged on 21, whatever the seed."""
    async with (
        emulator() as emu,
        make_client(emu, limits=Limits(max_points=21)) as client,
    ):

        async def one(i: int, n: int) -> None:
            try:
                job = await client.images.submit(prompt=f"p{i}", model="dall-e-2", n=n)
            except BudgetExceededError:
                return
            await asyncio.wait_for(job, 10)

        await asyncio.gather(*(one(i, n) for i, n in enumerate([1, 2, 3] * 10)))
        assert emu.stats()["points_charged"] <= 21
        assert emu.stats()["points_charged"] == client.stats.points_charged


async def test_jobs_out_of_an_unknown_kind_are_held_once_its_price_is_known() -> None:
    """Two attached jobs of a kind with no price hold nothing; once one of them ends with a
    cost (4 for 2 images), the other is held at that price: submits after it see it (two
    submits of 4 went in 12 points, 4 spent and the other job out)."""
    budget = Budget(12)
    body = {**DALL_E_2, "n": 2}
    first = budget.hold(body, 2)
    second = budget.hold(body, 2)
    first.settle(4, succeeded=True)
    assert (budget.spent, budget.reserved) == (4, 4)
    await budget.reserve(body, 2)
    with pytest.raises(BudgetExceededError):
        await budget.reserve(body, 2)
    second.settle(4, succeeded=True)
    assert budget.spent == 8


async def test_a_submit_waiting_for_a_probe_goes_once_any_job_of_its_kind_tells_the_price() -> None:
    """A submit of n=3 waits while the kind's jobs are out with no price; an attached job of
    n=1 that ends with its cost prices it (per image) before the probe of n=2 ends."""
    budget = Budget(100)
    probe = await budget.reserve({**DALL_E_2, "n": 2}, 2)
    attached = budget.hold(DALL_E_2, 1)
    waiting = asyncio.ensure_future(budget.reserve({**DALL_E_2, "n": 3}, 3))
    await asyncio.sleep(0)
    assert not waiting.done()
    attached.settle(5, succeeded=True)
    held = await asyncio.wait_for(waiting, 5)
    assert held.points == 15 and probe.points == 10 and budget.reserved == 25


async def test_a_tiny_cost_after_a_real_one_counts_at_the_most_an_image_cost() -> None:
    """Without a table a positive cost is the gateway's price, however small; but a job that
    succeeded counts at least the most an image of its kind cost before (8), so a gateway
    that under-reports some jobs cannot take the spending past what it showed."""
    budget = Budget(100)
    first = await budget.reserve(DALL_E_2, 1)
    first.settle(8, succeeded=True)
    second = await budget.reserve(DALL_E_2, 1)
    second.settle(0.001, succeeded=True)
    assert budget.spent == 16 and budget.estimate(("dall-e-2", "auto", "auto", 2)) == 16


async def test_a_wait_that_ended_at_a_reported_zero_keeps_its_hold() -> None:
    """A job whose wait timed out with ``integral_cost`` 0 said so far (the gateway reports 0
    until the cost is settled) runs on, and will be charged: its hold stays spent."""
    budget = Budget(10, {"dall-e-2": 4})
    held = await budget.reserve(DALL_E_2, 1)
    held.settle(0.0, maybe_charged=True)
    assert (budget.spent, budget.reserved) == (4, 0)


def test_a_rerun_learns_no_price_from_rows_charged_nothing() -> None:
    """A manifest row saved at 0 points (a gateway that reports 0 until the cost is settled)
    taught a re-run a price of 0: its lines went unbounded."""
    bodies = {"1": DALL_E_2, "2": {**DALL_E_2, "model": "dall-e-3"}}
    records = [
        {"tag": "1", "status": "saved", "points": 0},
        {"tag": "2", "status": "saved", "points": 6},
    ]
    assert prices_charged(records, bodies) == {"dall-e-3/auto/auto": 6}
