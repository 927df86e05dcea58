"""An ``integral_cost`` that is there but unreadable ("abc", -5, 1e30) is said, not dropped
in silence: one WARNING (repeats counted) names the field and what the value was, and a
budget refusing the kind for want of a price says the gateway reported it, unreadably (it
said the gateway "has not reported" the cost, which sent users looking for a missing field).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest

from wujie_async import BudgetExceededError, Limits, WujieClient

from .conftest import FAST_POLL, INSTANT_RETRY
from .hostile import scripted_gateway, throwaway_credentials

pytestmark = pytest.mark.anyio


def _done_costing(cost: Any) -> Any:
    def script(keys: list[str]) -> list[dict[str, Any]]:
        return [
            {
                "key": key,
                "status": 4,
                "images": [{"url": f"https://cdn.example.com/{key}.png"}],
                "integral_cost": cost,
            }
            for key in keys
        ]

    return script


def _cost_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "wujie_async"
        and record.levelno == logging.WARNING
        and "integral_cost" in record.getMessage()
    ]


@pytest.mark.parametrize(
    ("cost", "what"),
    [
        ("abc", "text that is no number"),
        (-5, "a number below 0"),
        (1e30, "a number over 1e+12"),
    ],
)
async def test_a_budget_refusal_says_the_cost_was_reported_unreadably(
    cost: Any, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="wujie_async")
    async with scripted_gateway(_done_costing(cost)) as gateway:
        client = WujieClient(
            throwaway_credentials(),
            base_url=gateway.base_url,
            poll=FAST_POLL,
            retry=INSTANT_RETRY,
            limits=Limits(max_points=100),
        )
        async with client:
            job = await client.images.submit(prompt="first", model="dall-e-2")
            await asyncio.wait_for(job, 10)
            assert job.points_charged is None
            with pytest.raises(BudgetExceededError) as info:
                await client.images.submit(prompt="second", model="dall-e-2")
        assert gateway.submits == 1
    refused = info.value
    assert refused.unpriced and refused.reported_unreadably
    assert "reported what a dall-e-2 job costs unreadably" in str(refused)
    assert "has not reported" not in str(refused)
    assert "Limits.point_prices" in str(refused)
    said = _cost_warnings(caplog)
    assert len(said) == 1 and what in said[0], said
    assert str(cost) not in said[0].replace("1e+12", "")  # what it was, not the value itself


async def test_repeated_unreadable_costs_are_one_warning_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="wujie_async")
    async with scripted_gateway(_done_costing("abc")) as gateway:
        client = WujieClient(
            throwaway_credentials(),
            base_url=gateway.base_url,
            poll=FAST_POLL,
            retry=INSTANT_RETRY,
        )
        async with client:
            jobs = [await client.images.submit(prompt=f"p{i}", model="dall-e-2") for i in range(20)]
            await asyncio.wait_for(asyncio.gather(*jobs), 10)
            assert [job.points_charged for job in jobs] == [None] * 20
            during = _cost_warnings(caplog)
            assert len(during) == 1, during
            assert "integral_cost as text that is no number" in during[0]
    # At close, what was held back: the first of them, with how many there were.
    after = _cost_warnings(caplog)[1:]
    assert len(after) == 1 and re.search(r"the first of (19|[2-9][0-9]) like this", after[0]), after
