from __future__ import annotations

import pytest

from wujie_async._ratelimit import AdaptiveLimiter, Pacer

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_no_limit_until_a_429_then_halved_observed_rate() -> None:
    clock = FakeClock()
    brake = AdaptiveLimiter(clock=clock)
    for _ in range(100):  # 100 requests per second
        await brake.acquire()
        clock.now += 0.01
    assert brake.rate is None
    brake.rate_limited()
    assert brake.rate == pytest.approx(50, rel=0.02)
    brake.rate_limited()  # same burst: not cut again
    assert brake.rate == pytest.approx(50, rel=0.02)
    clock.now += 1.1
    brake.rate_limited()
    assert brake.rate is not None and brake.rate < 50


async def test_recovers_additively_then_lifts_the_limit() -> None:
    clock = FakeClock()
    brake = AdaptiveLimiter(clock=clock)
    for _ in range(100):
        await brake.acquire()
        clock.now += 0.01
    brake.rate_limited()  # ceiling ~200, ramp ~20 per second, start at ~50
    successes = 0
    while brake.rate is not None:
        brake.succeeded()
        successes += 1
        assert successes < 10_000
    # From 50 to 200 at +20/s takes ~7.5 s of traffic, about sum(rate) successes.
    assert 500 < successes < 2000


async def test_pacer_spaces_callers_in_order() -> None:
    clock = FakeClock()
    pacer = Pacer(1000.0, clock=clock)
    await pacer.wait()
    assert pacer._next_slot == pytest.approx(clock.now + 0.001)
    pacer.rate = 10
    assert pacer.rate == pytest.approx(10)
